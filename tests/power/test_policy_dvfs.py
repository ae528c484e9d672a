"""DVFS rule: round up to the grid, margin, hysteresis, critical path, minimum."""

from __future__ import annotations

import math

import pytest

from nrm.power.policy.dvfs import frequency_grid, next_frequency, round_up, step_up

GHZ = 1e9
COARSE = [1.0 * GHZ, 1.5 * GHZ, 2.0 * GHZ, 2.5 * GHZ, 3.0 * GHZ]
FINE = [round(2.0 + 0.1 * i, 1) * GHZ for i in range(11)]  # 2.0 .. 3.0 GHz


@pytest.mark.parametrize(
    "compute_s, total_s, current, grid, kwargs, expected, why",
    [
        (0.5, 1.0, 3.0, COARSE, {}, 2.0, "need 1.5 plus 5 % margin rounds up to 2.0"),
        (0.5, 1.0, 3.0, COARSE, {"margin": 0.0}, 1.5, "without margin an exact need stays"),
        (0.6, 1.0, 3.0, COARSE, {}, 2.0, "need 1.8 (1.89 with margin) rounds up"),
        (0.1, 1.0, 3.0, COARSE, {}, 1.0, "need below the grid: minimum available"),
        (0.0, 1.0, 3.0, COARSE, {}, 1.0, "idle cpu: minimum, never below"),
        (0.0, 1.0, 1.0, COARSE, {}, 1.0, "at the minimum stays there"),
        (0.9, 1.0, 3.0, FINE, {}, 3.0, "2.9 is a 3.3 % change, inside the 5 % band"),
        (0.9, 1.0, 3.0, FINE, {"hysteresis": 0.0}, 2.9, "no band: moves one step"),
        (0.85, 1.0, 3.0, FINE, {}, 2.7, "2.7 is a 10 % change: moves"),
        (0.96, 1.0, 2.0, COARSE, {}, 2.0, "4 % wait is not critical, never goes up"),
        (1.0, 1.0, 2.0, COARSE, {}, 2.5, "critical path: one step up"),
        (0.99, 1.0, 2.0, COARSE, {}, 2.5, "1 % wait is under half the margin: critical"),
        (1.0, 1.0, 2.5, FINE, {}, 2.6, "critical step of 4 % is not held by hysteresis"),
        (1.0, 1.0, 3.0, COARSE, {}, 3.0, "critical at the maximum stays"),
        (2.0, 1.0, 2.0, COARSE, {}, 2.5, "c > t read as c == t: critical"),
    ],
)
def test_next_frequency(compute_s, total_s, current, grid, kwargs, expected, why):
    got = next_frequency(compute_s, total_s, current * GHZ, grid, **kwargs)
    assert got == pytest.approx(expected * GHZ), why
    assert got in grid


@pytest.mark.parametrize(
    "compute_s, total_s, current_hz, expected, why",
    [
        (0.5, 0.0, 2.0 * GHZ, 2.0, "t == 0: keep the frequency"),
        (0.5, math.nan, 2.0 * GHZ, 2.0, "non-finite t: keep the frequency"),
        (0.5, 0.0, 1.7 * GHZ, 2.0, "off-grid frequency is rounded up onto the grid"),
        (0.5, 1.0, 0.0, 3.0, "unknown current frequency: maximum"),
        (0.5, 1.0, math.nan, 3.0, "non-finite current frequency: maximum"),
        (0.5, 1.0, 9.0 * GHZ, 3.0, "need (4.5 GHz) above the grid: maximum"),
        (1.0, 1.0, 1.7 * GHZ, 2.0, "critical from off the grid: next frequency above"),
    ],
)
def test_next_frequency_edge_cases(compute_s, total_s, current_hz, expected, why):
    assert next_frequency(compute_s, total_s, current_hz, COARSE) == expected * GHZ, why


@pytest.mark.parametrize(
    "grid, kwargs",
    [([], {}), ([0.0, -1.0], {}), ([math.nan], {}), (COARSE, {"margin": 1.0}),
     (COARSE, {"hysteresis": -0.1})],
)
def test_next_frequency_rejects_bad_configuration(grid, kwargs):
    with pytest.raises(ValueError):
        next_frequency(0.5, 1.0, 2.0 * GHZ, grid, **kwargs)


@pytest.mark.parametrize(
    "hz, rounded, stepped",
    [(0.5, 1.0, 1.0), (1.0, 1.0, 1.5), (1.2, 1.5, 1.5), (3.0, 3.0, 3.0), (4.0, 3.0, 3.0)],
)
def test_grid_helpers(hz, rounded, stepped):
    grid = frequency_grid(reversed(COARSE + COARSE))
    assert grid == COARSE
    assert round_up(hz * GHZ, grid) == rounded * GHZ
    assert step_up(hz * GHZ, grid) == stepped * GHZ


@pytest.mark.parametrize("work", [0.3, 0.55, 0.7, 0.82, 0.9])
def test_next_frequency_is_stable_once_moved(work):
    """The need (current x c/t) does not depend on the frequency, so a second pass holds."""
    first = next_frequency(work, 1.0, 3.0 * GHZ, FINE)
    needed = 3.0 * GHZ * work
    compute_at_first = needed / first
    assert compute_at_first <= 0.95 + 1e-12  # the margin leaves visible slack
    assert next_frequency(compute_at_first, 1.0, first, FINE) == first
