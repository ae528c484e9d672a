"""Cross-rank need, lag intervals, margins and the cheapest covering setting (tables)."""

from __future__ import annotations

import pytest

from nrm.power.policy import ContainerPolicy
from nrm.power.policy.crossrank import (cover, decide, margin, need_intervals, provision,
                                        successor_types, work_interval)

GHZ = 1e9
GRID = [float((1000 + 200 * k) * 1_000_000) for k in range(8)]  # the emulated 1.0-2.4 GHz


@pytest.mark.parametrize("compute, now, before, expected", [
    (0.05, 1.0, 1.0, (0.05, 0.05)),        # unmixed phase: exact work
    (0.05, 0.5, 1.0, (0.025, 0.05)),       # cut during the phase: between the two speeds
    (0.05, 1.0, 0.5, (0.025, 0.05)),       # raised during the phase
    (-1.0, 1.0, 1.0, (0.0, 0.0)),
])
def test_work_interval(compute, now, before, expected):
    assert work_interval(compute, now, before) == pytest.approx(expected)


@pytest.mark.parametrize("works, expected", [
    ({0: (1.0, 1.0), 1: (0.5, 0.5)}, {0: (1.0, 1.0), 1: (0.5, 0.5)}),
    ({0: (1.0, 1.0), 1: (0.4, 0.6)}, {0: (1.0, 1.0), 1: (0.4, 0.6)}),
    ({0: (0.8, 1.0), 1: (0.5, 0.5)}, {0: (0.8, 1.0), 1: (0.5, 0.625)}),
    ({0: (0.0, 0.0), 1: (0.0, 0.0)}, {0: (1.0, 1.0), 1: (1.0, 1.0)}),  # nothing known
])
def test_need_is_relative_to_the_critical_work(works, expected):
    got = need_intervals(works)
    assert {k: pytest.approx(v) for k, v in got.items()} == expected


@pytest.mark.parametrize("history, expected", [
    ([], 0.02), ([0.5], 0.02), ([0.5, 0.5, 0.5], 0.02),
    ([0.4, 0.6], 0.2),                       # spread 0.1 around 0.5: one sigma
])
def test_margin_is_statistical_not_a_whole_step(history, expected):
    assert margin(history) == pytest.approx(expected)


@pytest.mark.parametrize("knob, need, expected", [
    ("DDCM", 0.5, (2.4 * GHZ, 8)),
    ("DDCM", 0.51, (2.4 * GHZ, 9)),
    ("DDCM", 0.0, (2.4 * GHZ, 1)),
    ("DVFS", 0.5, (1.2 * GHZ, 16)),
    ("DVFS", 0.2, (1.0 * GHZ, 16)),          # below the lowest frequency: the lowest
    ("DVFS", 1.0, (2.4 * GHZ, 16)),
    ("COMBINED", 0.5, (1.2 * GHZ, 16)),
    ("COMBINED", 0.2, (1.0 * GHZ, 16)),      # computes as DVFS; the duty cycle is for the wait
    ("COMBINED", 1.0, (2.4 * GHZ, 16)),
    ("COMBINED", 0.92, (2.4 * GHZ, 16)),     # not DDCM's level 15: it keeps the grid's slack
    ("COMBINED", 0.05, (2.4 * GHZ, 1)),      # far below the lowest frequency: the level
])
def test_cover_is_the_cheapest_setting_of_the_knob(knob, need, expected):
    hz, level = cover(knob, need, GRID, 16)
    assert (hz, level) == (pytest.approx(expected[0]), expected[1])
    assert hz / GRID[-1] * level / 16 >= need - 1e-9


@pytest.mark.parametrize("need", [0.05 * k for k in range(1, 21)])
def test_combined_never_costs_more_than_either_knob(need):
    def cost(s):
        return s[1] / 16 * (s[0] / GRID[-1]) ** 3
    best = cost(cover("COMBINED", need, GRID, 16))
    assert best <= cost(cover("DDCM", need, GRID, 16)) + 1e-12
    assert best <= cost(cover("DVFS", need, GRID, 16)) + 1e-12


FULL = (2.4 * GHZ, 16)


@pytest.mark.parametrize("need, history, current, expected", [
    ((0.5, 0.5), [], FULL, (2.4 * GHZ, 9)),              # jump straight to the need + 2 %
    ((0.5, 1.0), [], FULL, FULL),                        # mixed phase: the high end holds it
    ((0.5, 0.5), [0.5, 0.5], (2.4 * GHZ, 9), (2.4 * GHZ, 9)),  # converged: a fixed point
    ((0.3, 0.9), [0.5], (2.4 * GHZ, 9), (2.4 * GHZ, 9)),  # wide interval: neither way
    ((0.7, 0.7), [0.5], (2.4 * GHZ, 9), (2.4 * GHZ, 12)),  # more work: up at once
    ((1.0, 1.0), [0.5], (2.4 * GHZ, 9), FULL),           # became critical: full speed
])
def test_decide_ddcm(need, history, current, expected):
    assert decide("DDCM", need, history, current, GRID, 16) == expected


def _run(policy, shares, phases, first=1):
    for phase in range(first, first + phases):
        settings = policy.settings()
        speed = {r: settings[r]["level"] / 16 * settings[r]["frequency"] / GRID[-1]
                 for r in shares}
        compute = {r: 0.05 * shares[r] / speed[r] for r in shares}
        t = max(compute.values())
        for r in shares:
            policy.on_phase(r, r, 1, compute[r], t, phase)


@pytest.mark.parametrize("name, expected", [
    ("DDCM", (2.4 * GHZ, 9)), ("DVFS", (1.4 * GHZ, 16)), ("COMBINED", (1.4 * GHZ, 16)),
])
def test_cross_rank_manager_slows_the_light_rank_to_its_need(name, expected):
    policy = ContainerPolicy(name, [0, 1], frequencies=GRID, cross_rank=True)
    _run(policy, {0: 1.0, 1: 0.5}, 10)
    settings = policy.settings()
    assert (settings[0]["frequency"], settings[0]["level"]) == FULL
    assert (settings[1]["frequency"], settings[1]["level"]) == expected


def test_cross_rank_guard_raises_only_the_late_rank():
    policy = ContainerPolicy("DDCM", [0, 1, 2], frequencies=GRID, cross_rank=True)
    _run(policy, {0: 1.0, 1: 0.5, 2: 0.5}, 6)
    assert [policy.settings()[r]["level"] for r in (0, 1, 2)] == [16, 9, 9]
    _run(policy, {0: 1.0, 1: 1.0, 2: 0.5}, 1, first=7)  # rank 1's work doubles
    assert [policy.settings()[r]["level"] for r in (0, 1, 2)] == [16, 16, 9]
    assert policy.stats["slowdown_resets"] == 1


@pytest.mark.parametrize("histories, widen, expected", [
    ([[0.5]], 1.0, 0.51),                     # one type: its need + the 2 % floor
    ([[0.5], [0.8]], 1.0, 0.816),             # a window over two types: the larger
    ([[0.5, 0.5], [0.8, 0.8]], 2.0, 0.832),   # a late cpu's widened margin
    ([[0.5], []], 1.0, None),                 # a type never seen: no prediction
    ([], 1.0, None),
    ([[0.99]], 1.0, 1.0),                     # never above full speed
])
def test_provision_per_phase_type(histories, widen, expected):
    got = provision(histories, widen)
    assert got == (None if expected is None else pytest.approx(expected))


@pytest.mark.parametrize("site, successors, window, expected", [
    (7, {7: 9, 9: 7}, 1, [9]),
    (7, {7: 9, 9: 7}, 2, [9, 7]),
    (7, {7: 7}, 2, [7, 7]),                   # one collective in the loop
    (7, {9: 7}, 1, None),                     # what follows 7 is not known yet
    (7, {7: 9}, 2, None),
])
def test_successor_types(site, successors, window, expected):
    assert successor_types(site, successors, window) == expected


def _run_typed(policy, types, phases):
    """Alternate phase types; ``types`` maps a site to each rank's share of the work."""
    sites = list(types)
    seen = []
    for phase in range(1, phases + 1):
        site = sites[phase % len(sites)]
        settings = policy.settings()
        seen.append((site, settings[1]["level"]))
        compute = {r: 0.05 * share / (settings[r]["level"] / 16)
                   for r, share in types[site].items()}
        t = max(compute.values())
        for r in compute:
            policy.on_phase(r, r, 1, compute[r], t, phase, site)
    return seen


@pytest.mark.parametrize("window, expected", [
    (1, {7: 9, 9: 14}),    # applied at the collective's exit: each type at its own need
    (2, {7: 15, 9: 15}),   # landing inside the next phase: one setting covers both types
])
def test_per_type_prediction_sets_the_next_phase_types_need(window, expected):
    policy = ContainerPolicy("DDCM", [0, 1], cross_rank=True, phase_window=window)
    seen = _run_typed(policy, {7: {0: 1.0, 1: 0.5}, 9: {0: 1.0, 1: 0.8}}, 12)
    # After a few phases, the level in force during each type's phase is its need's.
    assert {site: level for site, level in seen[-4:]} == expected


def test_unknown_phase_type_keeps_the_per_phase_rule():
    typed = ContainerPolicy("DDCM", [0, 1], frequencies=GRID, cross_rank=True)
    untyped = ContainerPolicy("DDCM", [0, 1], frequencies=GRID, cross_rank=True)
    _run(typed, {0: 1.0, 1: 0.5}, 6)
    _run(untyped, {0: 1.0, 1: 0.5}, 6)
    assert typed.settings() == untyped.settings()
    with pytest.raises(ValueError, match="phase_window"):
        ContainerPolicy("DDCM", [0, 1], cross_rank=True, phase_window=3)


def _run_lagged(policy, shares_of, phases, site, lag=0.4):
    """A closed loop whose decisions land ``lag`` of a phase late (mixed phases, inexact needs)."""
    def speeds():
        return {r: s["level"] / 16 * (s["frequency"] or GRID[-1]) / GRID[-1]
                for r, s in policy.settings().items()}

    levels = []
    old = new = speeds()
    previous_t = 0.0
    for phase in range(1, phases + 1):
        switch = lag * previous_t
        compute = {}
        for r, share in shares_of(phase).items():
            w = 0.05 * share
            if w <= switch * old[r]:
                compute[r] = w / old[r]
            else:
                compute[r] = switch + (w - switch * old[r]) / new[r]
        t = max(compute.values())
        previous_t = t
        for r in compute:
            policy.on_phase(r, r, 1, compute[r], t, phase, site)
        old, new = new, speeds()
        levels.append(tuple(sorted(new.items())))
    return levels


def _shifting(phase):
    return {0: 1.0, 1: 0.5} if (phase // 10) % 2 == 0 else {0: 0.5, 1: 1.0}


@pytest.mark.parametrize("knob", ["DDCM", "DVFS", "COMBINED"])
def test_one_call_site_is_treated_as_untyped(knob):
    # The site follows itself from the second firing on; from then on the
    # typed run must decide as the untyped one (an inexact need that moved
    # must not enter a type's history at its high end).
    typed = ContainerPolicy(knob, [0, 1], frequencies=GRID, cross_rank=True, warmup_phases=1)
    untyped = ContainerPolicy(knob, [0, 1], frequencies=GRID, cross_rank=True, warmup_phases=1)
    a = _run_lagged(typed, _shifting, 40, site=5)
    b = _run_lagged(untyped, _shifting, 40, site=0)
    assert a[12:] == b[12:]
