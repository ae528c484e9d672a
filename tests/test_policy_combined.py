"""COMBINED rule: frequency first, duty cycle for the remaining fraction."""

from __future__ import annotations

import math

import pytest

from nrm.policy.combined import next_setting

GHZ = 1e9
GRID = [1.0 * GHZ, 1.5 * GHZ, 2.0 * GHZ, 2.5 * GHZ, 3.0 * GHZ]


@pytest.mark.parametrize(
    "compute_s, total_s, hz, level, expected, why",
    [
        (0.5, 1.0, 3.0, 16, (2.0, 13), "want 1.58: 2.0 GHz, then 13/16 covers 79 %"),
        (0.1, 1.0, 3.0, 16, (1.0, 6), "below the minimum frequency DDCM goes on: 6/16"),
        (0.3, 1.0, 3.0, 16, (1.0, 16), "want 0.95: minimum frequency, no modulation"),
        (1.5 / 1.625, 1.0, 2.0, 13, (2.0, 13), "converged setting holds"),
        (0.8, 1.0, 2.0, 16, (2.0, 14), "small slack handled by modulation alone"),
        (0.96, 1.0, 2.0, 16, (2.0, 16), "4 % wait: rounding would speed it up, hold"),
        (1.0, 1.0, 2.0, 13, (2.0, 16), "critical and modulated: drop modulation first"),
        (1.0, 1.0, 2.0, 16, (2.5, 16), "critical, unmodulated: one frequency step up"),
        (1.0, 1.0, 3.0, 16, (3.0, 16), "critical at full speed stays"),
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
        (5.0, 1.0, 2.0 * GHZ, 8, (2.0, 16), "c > t: critical"),
    ],
)
def test_next_setting_edge_cases(compute_s, total_s, hz, level, expected, why):
    got = next_setting(compute_s, total_s, hz, level, GRID)
    assert got == (expected[0] * GHZ, expected[1]), why


@pytest.mark.parametrize("kwargs", [{"levels": 0}, {"margin": -0.1}, {"available_hz": []}])
def test_next_setting_rejects_bad_configuration(kwargs):
    args = {"available_hz": GRID, **kwargs}
    with pytest.raises(ValueError):
        next_setting(0.5, 1.0, 2.0 * GHZ, 8, **args)


@pytest.mark.parametrize("work", [0.05, 0.2, 0.45, 0.6, 0.75, 0.9])
def test_next_setting_is_stable_and_keeps_slack(work):
    hz, level = next_setting(work, 1.0, 3.0 * GHZ, 16, GRID)
    speed = hz * level / 16
    compute_after = 3.0 * GHZ * work / speed
    assert compute_after <= 0.95 + 1e-12
    assert next_setting(compute_after, 1.0, hz, level, GRID) == (hz, level)
