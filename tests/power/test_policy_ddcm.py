"""DDCM rule: slow-down with relaxation, drop cap, floor, critical path, edge cases."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nrm.power.policy.ddcm import default_max_drop, next_level


@pytest.mark.parametrize(
    "compute_s, total_s, level, expected, why",
    [
        (1.0, 2.0, 16, 9, "half the work needs 8 levels, plus one of relaxation"),
        (1.6, 2.0, 10, 9, "same work measured at level 10: the need is still 8 levels"),
        (16 / 9, 2.0, 9, 9, "converged: the need is exactly 8 levels, keep 9"),
        (14.0, 16.0, 16, 15, "one level of slack is enough to go down one level"),
        (0.3, 1.0, 16, 6, "need 4.8 levels -> 5 + 1"),
        (0.0, 1.0, 16, 3, "an idle cpu drops at most 13 levels at once"),
        (0.05, 1.0, 16, 3, "target 2 is capped by the 13-level drop"),
        (0.0, 1.0, 3, 1, "the floor is level 1"),
        (0.0, 1.0, 1, 1, "already at the floor: stays"),
        (0.875, 1.0, 8, 8, "need 7 of 8 levels: within the hold band"),
        (0.9, 1.0, 8, 8, "need 7.2: less than half a level of wait is not yet critical"),
        (0.95, 1.0, 8, 9, "need 7.6: waited under half a level, critical, step up"),
        (1.0, 1.0, 8, 10, "critical path at 8: step floor(16/8) = 2"),
        (1.0, 1.0, 4, 8, "critical path at 4: step floor(16/4) = 4"),
        (1.0, 1.0, 1, 16, "critical path at 1: step 16, capped at full speed"),
        (1.0, 1.0, 15, 16, "critical path at 15: one step to full speed"),
        (1.0, 1.0, 16, 16, "critical path at full speed: nothing to gain"),
        (0.97, 1.0, 16, 16, "near-critical at full speed stays"),
    ],
)
def test_next_level(compute_s, total_s, level, expected, why):
    assert next_level(compute_s, total_s, level) == expected, why


@pytest.mark.parametrize(
    "compute_s, total_s, level, expected, why",
    [
        (1.0, 0.0, 9, 9, "t == 0 carries no information: keep the level"),
        (1.0, -1.0, 9, 9, "negative t: keep the level"),
        (math.nan, 1.0, 9, 9, "non-finite compute: keep the level"),
        (1.0, math.inf, 9, 9, "non-finite total: keep the level"),
        (3.0, 2.0, 8, 10, "c > t is clock skew, read as c == t: critical path"),
        (-1.0, 2.0, 16, 3, "negative compute read as 0: maximum drop"),
        (1.0, 2.0, 0, 16, "level below range: unknown state, full speed"),
        (1.0, 2.0, 17, 16, "level above range: unknown state, full speed"),
        (1.0, 2.0, -3, 16, "negative level: full speed"),
        (1.0, 2.0, 8.5, 16, "fractional level is not a level: full speed"),
        (1.0, 2.0, 16.0, 9, "integral float level is accepted"),
        (0.0, 1.0, 0, 16, "out-of-range level wins over the maximum drop"),
    ],
)
def test_next_level_edge_cases(compute_s, total_s, level, expected, why):
    assert next_level(compute_s, total_s, level) == expected, why


@pytest.mark.parametrize(
    "compute_s, level, levels, max_drop, expected",
    [
        (0.0, 8, 8, None, 2),   # 13/16 of 8 levels = 6 levels at most
        (0.5, 8, 8, None, 5),   # need 4 levels + 1
        (0.0, 16, 16, 4, 12),   # explicit cap
        (0.0, 16, 16, 15, 1),
    ],
)
def test_next_level_other_scales(compute_s, level, levels, max_drop, expected):
    assert next_level(compute_s, 1.0, level, levels=levels, max_drop=max_drop) == expected


@pytest.mark.parametrize("levels, expected", [(16, 13), (8, 6), (1, 1), (32, 26)])
def test_default_max_drop(levels, expected):
    assert default_max_drop(levels) == expected


@pytest.mark.parametrize("kwargs", [{"levels": 0}, {"levels": True}, {"max_drop": 0}])
def test_next_level_rejects_bad_configuration(kwargs):
    with pytest.raises(ValueError):
        next_level(0.5, 1.0, 8, **kwargs)


@given(
    units=st.floats(min_value=0.0, max_value=1.0),
    level=st.integers(min_value=-2, max_value=20),
    compute=st.floats(),
    total=st.floats(),
)
def test_next_level_stays_in_range_and_converges(units, level, compute, total):
    assert 1 <= next_level(compute, total, level) <= 16
    # A cpu needing ``units`` of full speed, barrier at 1 s: once moved, it stays
    # (unless the first move was cut short by the 13-level cap).
    first = next_level(units, 1.0, 16)
    if first != 16 - default_max_drop(16):
        assert next_level(units * 16 / first, 1.0, first) == first
