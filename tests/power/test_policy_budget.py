"""The slowdown budget and the expected-cost choice (tables), and the manager that runs them."""

from __future__ import annotations

import pytest

from nrm.power.policy import ContainerPolicy, inwait
from nrm.power.policy.budget import Risk, change_rate, lateness_power, speed_floor
from nrm.power.policy.crossrank import choose, cover, phase_energy

GHZ = 1e9
GRID = [float((1000 + 200 * k) * 1_000_000) for k in range(8)]  # the emulated 1.0-2.4 GHz
FULL = (2.4 * GHZ, 16)


@pytest.mark.parametrize("episodes, phases, expected", [
    (0, 0, 1.0),          # nothing seen: anything may happen
    (0, 9, 0.1),          # quiet for 9 phases
    (1, 19, 0.1),         # critical once in 19 phases
    (2, 29, 0.1),
    (0, 99, 0.01),
    (-1, -5, 1.0),        # nonsense counts read as none
])
def test_change_rate_is_the_rule_of_succession(episodes, phases, expected):
    assert change_rate(episodes, phases) == pytest.approx(expected)


@pytest.mark.parametrize("rate, window, budget, expected", [
    (0.1, 2, 0.01, 1 / 1.05),      # critical every 10 phases: 5 % slower at most
    (1 / 41, 2, 0.01, 1 / 1.205),  # quiet for 40 phases
    (0.1, 1, 0.01, 1 / 1.1),       # a raise applied at the collective's exit: one phase late
    (0.01, 2, 0.01, 2 / 3),
    (0.1, 2, None, 0.0),           # no budget: no bound
    (0.0, 2, 0.01, 0.0),           # no risk: no bound
    (0.1, 2, 0.0, 1.0),            # nothing may be lost: full speed
])
def test_speed_floor_keeps_the_expected_loss_in_the_budget(rate, window, budget, expected):
    floor = speed_floor(rate, window, budget)
    assert floor == pytest.approx(expected)
    if budget and 0 < floor < 1:
        assert rate * window * (1 / floor - 1) == pytest.approx(budget)


@pytest.mark.parametrize("ranks, wait_level, expected", [
    (2, None, 3.0),          # static of 2 cpus + the other rank busy-polling
    (2, 1, 2.0625),          # ... waiting at level 1
    (4, None, 7.0),
    (1, 1, 1.0),
    (0, None, 1.0),          # read as one rank
])
def test_lateness_power(ranks, wait_level, expected):
    assert lateness_power(ranks, wait_level, 16) == pytest.approx(expected)


@pytest.mark.parametrize("setting, need, wait_level, expected", [
    (FULL, 0.5, None, 1.0),                  # busy-polls at full power all phase
    (FULL, 0.5, 1, 0.5 + 0.5 / 16),          # the wait at level 1
    ((1.2 * GHZ, 16), 0.5, None, 0.125),     # computes all phase at half speed, V^2 = 1/4
    ((2.4 * GHZ, 8), 0.5, 1, 0.5),           # duty cycle: the same energy per unit of work
    ((2.0 * GHZ, 16), 0.5, 1, 0.6 * (5 / 6) ** 3 + 0.4 * (5 / 6) ** 3 / 16),
])
def test_phase_energy(setting, need, wait_level, expected):
    assert phase_energy(setting, need, GRID, 16, wait_level) == pytest.approx(expected)


RATE10 = Risk(floor=0.0, rate=0.1, window=2, lateness=2.0625, wait_level=1)


@pytest.mark.parametrize("knob, need, risk, expected", [
    # Without a risk: the cheapest covering setting (cover).
    ("COMBINED", 0.92, None, FULL),
    ("DDCM", 0.5, None, (2.4 * GHZ, 8)),
    # In-wait throttling and no risk: the duty cycle to the need (the wait is free anyway).
    ("DDCM", 0.5, Risk(wait_level=1), (2.4 * GHZ, 8)),
    # ... with a shift every 10 phases slowing the compute does not pay: it only saves
    # 1/16 of the shortened wait, and risks a late phase of the whole container.
    ("DDCM", 0.5, RATE10, FULL),
    # No in-wait throttling: the duty cycle saves on the whole phase, down to the floor.
    ("DDCM", 0.5, Risk(floor=0.9, rate=0.1, window=2, lateness=3.0), (2.4 * GHZ, 15)),
    # A lower frequency is cheaper per unit of work: it pays at once, to the floor.
    ("DVFS", 0.5, Risk(floor=0.83, rate=1 / 41, window=2, lateness=3.0), (2.0 * GHZ, 16)),
    ("COMBINED", 0.5, Risk(floor=0.83, rate=1 / 41, window=2, lateness=2.0625, wait_level=1),
     (2.0 * GHZ, 16)),
    ("DVFS", 0.5, Risk(floor=0.95, rate=0.1, window=2, lateness=3.0), FULL),  # nothing fits
    ("DVFS", 0.5, Risk(floor=0.4), (1.2 * GHZ, 16)),    # the floor is below the need
])
def test_choose(knob, need, risk, expected):
    hz, level = choose(knob, need, GRID, 16, risk)
    assert (hz, level) == (pytest.approx(expected[0]), expected[1])
    assert hz / GRID[-1] * level / 16 >= max(need, risk.floor if risk else 0) - 1e-9


def _expected_cost(setting, need, risk):
    speed = setting[0] / GRID[-1] * setting[1] / 16
    return (phase_energy(setting, need, GRID, 16, risk.wait_level)
            + risk.rate * risk.window * (1 / speed - 1) * risk.lateness)


@pytest.mark.parametrize("need", [0.05 * k for k in range(1, 21)])
@pytest.mark.parametrize("rate", [0.0, 0.01, 0.1])
@pytest.mark.parametrize("floor", [0.0, 0.8])
def test_combined_never_costs_more_than_either_knob_as_run(need, rate, floor):
    # Each policy as the daemon runs it: DDCM and COMBINED with their waits throttled
    # (inwait.for_policy), DVFS's at level 16 (the cost model prices levels only:
    # as without); the same budget floor and rate.
    with_wait = Risk(floor=floor, rate=rate, window=2, lateness=lateness_power(2, 1, 16),
                     wait_level=1)
    without = Risk(floor=floor, rate=rate, window=2, lateness=lateness_power(2, None, 16))
    best = _expected_cost(choose("COMBINED", need, GRID, 16, with_wait), need, with_wait)
    assert best <= _expected_cost(choose("DDCM", need, GRID, 16, with_wait), need,
                                  with_wait) + 1e-12
    assert best <= _expected_cost(choose("DVFS", need, GRID, 16, without), need, without) + 1e-12


def test_choose_without_risk_is_cover():
    for knob in ("DDCM", "DVFS", "COMBINED"):
        for k in range(0, 21):
            assert choose(knob, k / 20, GRID, 16) == cover(knob, k / 20, GRID, 16)


# -- the manager with a budget (the daemon's configuration) -------------------

def _run(policy, shares_of, phases):
    """A lag-free closed loop; ``shares_of(phase)`` gives each rank's work (x 50 ms)."""
    seen = []
    for phase in range(1, phases + 1):
        settings = policy.settings()
        compute = {}
        for r, share in shares_of(phase).items():
            speed = settings[r]["level"] / 16 * (settings[r]["frequency"] or GRID[-1]) / GRID[-1]
            compute[r] = 0.05 * share / speed
        t = max(compute.values())
        for r in compute:
            policy.on_phase(r, r, 1, compute[r], t, phase)
        seen.append({r: (s["frequency"], s["level"]) for r, s in policy.settings().items()})
    return seen


def _policy(name, ranks=2, **kwargs):
    return ContainerPolicy(name, list(range(ranks)), frequencies=GRID, cross_rank=True,
                           slowdown_budget=0.01, **kwargs)


@pytest.mark.parametrize("phases, expected_hz", [
    (10, 2.4), (17, 2.2), (37, 2.2), (38, 2.0), (64, 2.0), (65, 1.8), (141, 1.4), (200, 1.4),
])
def test_dvfs_descends_as_the_quiet_record_grows(phases, expected_hz):
    # Rank 1 needs half speed and is never critical: the floor after n phases is
    # 1 / (1 + 0.01 * (n + 1) / 2); it reaches the need (+ margin: 1.4 GHz) after ~140.
    seen = _run(_policy("DVFS"), lambda _: {0: 1.0, 1: 0.5}, phases)
    assert seen[-1][0] == (2.4 * GHZ, 16)
    assert seen[-1][1] == (pytest.approx(expected_hz * GHZ), 16)


def test_ddcm_with_in_wait_throttling_keeps_the_compute_at_full_speed():
    # The contract throttles DDCM's waits; slowing the compute would only save 1/16
    # of the shortened wait, less than it risks, until the quiet record is long.
    policy = _policy("DDCM")
    assert policy.wait_throttle == inwait.WaitThrottle()
    seen = _run(policy, lambda _: {0: 1.0, 1: 0.5}, 100)
    assert all(s[1] == FULL for s in seen)
    assert policy.stats["acted"] == 0
    # Without it the duty cycle saves on the whole phase and is used, within the budget.
    policy = _policy("DDCM", wait_throttle=None)
    seen = _run(policy, lambda _: {0: 1.0, 1: 0.5}, 60)
    assert seen[-1][1] == (2.4 * GHZ, 13)


def test_a_rank_seen_critical_is_slowed_less_than_one_never_seen():
    # Ranks 1 and 2 both need half speed; rank 1 was the critical one once (phase 3).
    def shares(phase):
        return {0: 1.0, 1: 1.2 if phase == 3 else 0.5, 2: 0.5}
    policy = _policy("DVFS", ranks=3)
    seen = _run(policy, shares, 60)
    assert seen[-1][2] == (2.0 * GHZ, 16)
    assert seen[-1][1] == (2.2 * GHZ, 16)
    assert seen[-1][0] == FULL


def test_shifting_critical_rank_costs_at_most_the_budget():
    # The critical rank swaps every 10 phases: each swap finds the new critical
    # rank at most 1 / (1 + budget * quiet phases / window) slower than full speed.
    def shares(phase):
        return {0: 1.0, 1: 0.5} if (phase // 10) % 2 == 0 else {0: 0.5, 1: 1.0}
    policy = _policy("COMBINED")
    seen = _run(policy, shares, 40)
    for phase in (10, 20, 30):
        late = (phase // 10) % 2              # the rank that becomes critical
        hz, level = seen[phase - 2][late]     # its setting during that phase
        assert hz / GRID[-1] * level / 16 >= 1 / (1 + 0.01 * phase / 2) - 1e-9


def test_countdown_makes_no_compute_decision():
    policy = ContainerPolicy("COUNTDOWN", [0, 1], cross_rank=True, slowdown_budget=0.01)
    assert policy.wait_throttle == inwait.WaitThrottle()
    seen = _run(policy, lambda _: {0: 1.0, 1: 0.3}, 20)
    assert all(s == {0: (None, 16), 1: (None, 16)} for s in seen)
    # DVFS's waits drop the frequency, in its own knob; the duty cycle stays
    assert ContainerPolicy("DVFS", [0], frequencies=GRID).wait_throttle \
        == inwait.WaitThrottle(level=16, frequency=inwait.LOWEST)
    assert ContainerPolicy("NONE", [0]).wait_throttle is None


@pytest.mark.parametrize("kwargs, message", [
    ({"slowdown_budget": -0.01}, "slowdown_budget"),
    ({"slowdown_budget": float("inf")}, "slowdown_budget"),
    ({"slowdown_budget": "1%"}, "slowdown_budget"),
    ({"slowdown_budget": True}, "slowdown_budget"),
    ({"wait_throttle": "yes"}, "wait_throttle"),
])
def test_budget_configuration_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ContainerPolicy("DDCM", [0, 1], **kwargs)
