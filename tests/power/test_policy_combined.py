"""COMBINED rule: frequency first, duty cycle for the remaining fraction."""

from __future__ import annotations

import math

import pytest

from nrm.power.policy.combined import cover, next_setting

GHZ = 1e9
GRID = [1.0 * GHZ, 1.5 * GHZ, 2.0 * GHZ, 2.5 * GHZ, 3.0 * GHZ]


def _speed(hz, level):
    return hz * level / 16


@pytest.mark.parametrize(
    "compute_s, total_s, hz, level, expected, why",
    [
        (0.5, 1.0, 3.0, 16, (2.0, 13),
         "need 1.5 GHz leaves no room for the relaxation level at 1.5: 2.0 GHz, 12+1 levels"),
        (0.3, 1.0, 3.0, 16, (1.0, 16), "need 0.9 GHz: minimum frequency, 15+1 levels"),
        (0.1, 1.0, 3.0, 16, (1.0, 9),
         "need 0.3 GHz, but one step keeps at least 3/16 of the speed (0.5625 GHz)"),
        (0.3 / 0.5625, 1.0, 1.0, 9, (1.0, 6), "next step reaches the need below the minimum"),
        (1.5 / 1.625, 1.0, 2.0, 13, (2.0, 13), "converged setting holds"),
        (0.8, 1.0, 2.0, 16, (2.0, 14), "small slack handled by modulation alone"),
        (0.9, 1.0, 2.0, 16, (2.0, 16), "less than one level to save: hold"),
        (1.0, 1.0, 2.0, 13, (2.0, 15),
         "critical at 1.625 GHz, effective level 8.7 of 16: one effective level up"),
        (0.98, 1.0, 2.0, 16, (2.5, 14),
         "waited less than half a level: critical; 17/16 of 2.0 GHz is 2.5 GHz x 14/16"),
        (1.0, 1.0, 3.0, 16, (3.0, 16), "critical at full speed stays"),
        (1.0, 1.0, 1.0, 4, (2.5, 16),
         "critical at 1/12 of full speed: DDCM's step at effective level 1.3 is 12 levels"),
    ],
)
def test_next_setting(compute_s, total_s, hz, level, expected, why):
    got_hz, got_level = next_setting(compute_s, total_s, hz * GHZ, level, GRID)
    assert (got_hz, got_level) == (pytest.approx(expected[0] * GHZ), expected[1]), why
    assert got_hz in GRID and 1 <= got_level <= 16


@pytest.mark.parametrize(
    "compute_s, total_s, hz, level, expected, why",
    [
        (0.5, 1.0, 2.0 * GHZ, 0, (3.0, 16), "unknown level: full speed"),
        (0.5, 1.0, 2.0 * GHZ, 17, (3.0, 16), "level above range: full speed"),
        (0.5, 1.0, -1.0, 8, (3.0, 16), "unknown frequency: full speed"),
        (0.5, 0.0, 2.0 * GHZ, 8, (2.0, 8), "t == 0: keep the setting"),
        (0.5, math.nan, 1.7 * GHZ, 8, (2.0, 8), "no information: keep, frequency on grid"),
        (5.0, 1.0, 2.0 * GHZ, 8, (2.0, 13),
         "c > t: critical; effective level 5.3 steps by 3 to 1.5625 GHz: 2.0 GHz x 13/16"),
    ],
)
def test_next_setting_edge_cases(compute_s, total_s, hz, level, expected, why):
    got = next_setting(compute_s, total_s, hz, level, GRID)
    assert got == (expected[0] * GHZ, expected[1]), why


@pytest.mark.parametrize("kwargs", [{"levels": 0}, {"max_drop": 0}, {"available_hz": []}])
def test_next_setting_rejects_bad_configuration(kwargs):
    args = {"available_hz": GRID, **kwargs}
    with pytest.raises(ValueError):
        next_setting(0.5, 1.0, 2.0 * GHZ, 8, **args)


@pytest.mark.parametrize(
    "target, relax, expected",
    [
        (1.5 * GHZ, 0, (1.5, 16)),
        (1.5 * GHZ, 1, (2.0, 13)),
        (0.1 * GHZ, 1, (1.0, 3)),
        (0.0, 1, (1.0, 1)),
        (2.9 * GHZ, 1, (3.0, 16)),
        (4.0 * GHZ, 0, (3.0, 16)),
    ],
)
def test_cover_picks_the_lowest_frequency_that_fits(target, relax, expected):
    hz, level = cover(target, GRID, 16, relax)
    assert (hz, level) == (expected[0] * GHZ, expected[1])
    assert _speed(hz, level) >= min(target, 3.0 * GHZ) - 1e-6


@pytest.mark.parametrize("work", [0.05, 0.2, 0.45, 0.5, 0.6, 0.75, 0.9])
def test_closed_loop_converges_keeps_slack_and_holds(work):
    """A cpu that needs ``work`` of full speed per phase of length 1."""
    hz, level = 3.0 * GHZ, 16
    for _ in range(6):
        compute = work * 3.0 * GHZ / _speed(hz, level)
        hz, level = next_setting(compute, 1.0, hz, level, GRID)
    compute = work * 3.0 * GHZ / _speed(hz, level)
    assert compute < 1.0 - 0.5 / level                       # not mistaken for the critical path
    assert next_setting(compute, 1.0, hz, level, GRID) == (hz, level)
    # at most the ceiling's level and the relaxation level above the need, at the frequency
    # chosen, and that frequency is the lowest that leaves room for them
    assert _speed(hz, level) <= work * 3.0 * GHZ + 2 * hz / 16 + 1e-6
    for lower in (f for f in GRID if f < hz):
        assert math.ceil(16 * work * 3.0 * GHZ / lower - 1e-9) + 1 > 16


@pytest.mark.parametrize("jitter", [-0.03, -0.01, 0.01, 0.03])
def test_converged_setting_ignores_small_noise(jitter):
    """Without a hold band every jitter would move the setting."""
    hz, level = 2.0 * GHZ, 13                     # converged for a need of 1.5 GHz
    compute = 1.5 / 1.625 * (1 + jitter)
    assert next_setting(compute, 1.0, hz, level, GRID) == (hz, level)


def test_start_up_phase_cannot_collapse_the_speed():
    """A first phase that is almost all wait (start-up skew) used to give 1.0 GHz x 1/16."""
    hz, level = next_setting(0.0001, 0.0011, 3.0 * GHZ, 16, GRID)
    assert _speed(hz, level) >= 3.0 * GHZ * 3 / 16
