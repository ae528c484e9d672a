"""ContainerPolicy: configuration, decisions, guards, gate, reset and statistics."""

from __future__ import annotations

import pytest

from nrm.power.policy import ContainerPolicy, Decision
from nrm.power.policy.container import DUTY_CYCLE, FREQUENCY

GHZ = 1e9
GRID = [1.0 * GHZ, 1.5 * GHZ, 2.0 * GHZ, 2.5 * GHZ, 3.0 * GHZ]


def _round(policy, phase, per_source, aggregation=1):
    """Feed one message per source ``{source: (cpu, compute_s, total_s)}``; collect decisions."""
    out = []
    for source, (cpu, compute, total) in per_source.items():
        out += policy.on_phase(source, cpu, aggregation, compute, total, phase)
    return out


def _physical(policy, phase, units, top_hz=3.0 * GHZ):
    """One barrier-synchronised round: rank r computes ``units[r]`` s of full-speed work."""
    compute = {}
    for source, work in units.items():
        setting = policy.settings()[source]
        speed = setting["level"] / policy.levels
        if setting["frequency"] is not None:
            speed *= setting["frequency"] / top_hz
        compute[source] = work / speed
    total = max(compute.values())
    return _round(policy, phase, {s: (s, c, total) for s, c in compute.items()})


def _warm(policy, sources):
    """Get every source active with one start-up round that the damper ignores."""
    _round(policy, 1, {s: (s, 0.0, 0.0) for s in sources})
    _round(policy, 2, {s: (s, 0.0, 0.0) for s in sources})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"policy": "FOO"}, "unknown power policy"),
        ({"policy": "DVFS"}, "frequencies"),
        ({"policy": "combined"}, "frequencies"),
        ({"policy": "DDCM", "slowdown": 0.9}, "slowdown"),
        ({"policy": "DDCM", "damper_s": -1.0}, "damper"),
        ({"policy": "DDCM", "damper_s": float("nan")}, "damper"),
        ({"policy": "DDCM", "levels": 0}, "levels"),
        ({"policy": "DVFS", "frequencies": GRID, "margin": 1.0}, "margin"),
        ({"policy": "DVFS", "frequencies": GRID, "hysteresis": -0.5}, "hysteresis"),
        ({"policy": "DVFS", "frequencies": {0: GRID}}, "cpu 1"),
        ({"policy": "DVFS", "frequencies": "2000000"}, "string"),
        ({"policy": "DVFS", "frequencies": []}, "cpu 0"),
    ],
)
def test_configuration_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ContainerPolicy(cpus=[0, 1], **kwargs)


@pytest.mark.parametrize(
    "name, frequencies, expected",
    [
        (" ddcm ", None, {0: {"level": 16, "frequency": None}}),
        ("None", GRID, {0: {"level": 16, "frequency": 3.0 * GHZ}}),
        ("Dvfs", {0: GRID[:3]}, {0: {"level": 16, "frequency": 2.0 * GHZ}}),
        ("COMBINED", GRID, {0: {"level": 16, "frequency": 3.0 * GHZ}}),
    ],
)
def test_policies_start_at_full_speed(name, frequencies, expected):
    policy = ContainerPolicy(name, [0], frequencies=frequencies)
    assert policy.policy == name.strip().upper()
    assert policy.settings() == expected
    assert policy.reset() == []


@pytest.mark.parametrize(
    "name, expected",
    [
        ("DDCM", [Decision(1, DUTY_CYCLE, 16.0, 9.0, "ddcm")]),
        ("DVFS", [Decision(1, FREQUENCY, 3.0 * GHZ, 2.0 * GHZ, "dvfs")]),
        ("COMBINED", [Decision(1, FREQUENCY, 3.0 * GHZ, 2.0 * GHZ, "combined"),
                      Decision(1, DUTY_CYCLE, 16.0, 13.0, "combined")]),
        ("NONE", []),
    ],
)
def test_decisions_per_policy(name, expected):
    policy = ContainerPolicy(name, [0, 1], frequencies=GRID)
    _warm(policy, [0, 1])
    decisions = _round(policy, 3, {0: (0, 0.02, 0.02), 1: (1, 0.01, 0.02)})
    assert decisions == expected
    assert policy.stats["acted"] == len(expected)
    for phase in range(4, 10):
        assert _physical(policy, phase, {0: 0.02, 1: 0.01}) == []


def test_foreign_cpu_is_ignored_and_counted():
    policy = ContainerPolicy("DDCM", [0, 1])
    assert policy.on_phase(7, 5, 1, 0.0, 1.0, 1) == []
    assert policy.stats["foreign_cpu"] == 1
    assert policy.sources == {}
    assert 5 not in policy.settings()


@pytest.mark.parametrize(
    "args",
    [(0, 0, 0, 0.1, 0.2, 1), (0, 0, 1, -0.1, 0.2, 1), (0, 0, 1, 0.1, float("inf"), 1),
     (0, 0, 1, 0.1, 0.2, -1), (0, 0, 1.5, 0.1, 0.2, 1)],
)
def test_invalid_messages_are_counted(args):
    policy = ContainerPolicy("DDCM", [0])
    assert policy.on_phase(*args) == []
    assert policy.stats["invalid"] == 1
    assert policy.stats["phases"] == 0


@pytest.mark.parametrize(
    "aggregation, total_s, skipped",
    [(1, 0.0005, True), (10, 0.005, True), (1, 0.002, False), (10, 0.02, False)],
)
def test_damper_skips_short_phases(aggregation, total_s, skipped):
    policy = ContainerPolicy("DDCM", [0, 1], damper_s=0.001)
    _warm(policy, [0, 1])
    before = dict(policy.stats)
    decisions = _round(policy, 2 + aggregation, {0: (0, total_s, total_s), 1: (1, 0.0, total_s)},
                       aggregation=aggregation)
    assert (decisions == []) is skipped
    assert policy.stats["damper_skipped"] - before["damper_skipped"] == (2 if skipped else 0)


@pytest.mark.parametrize("growth, fires", [(1.2, True), (1.05, False)])
def test_slowdown_resets_a_slowed_cpu(growth, fires):
    policy = ContainerPolicy("DDCM", [0, 1], slowdown=1.1)
    _warm(policy, [0, 1])
    assert _round(policy, 3, {0: (0, 0.02, 0.02), 1: (1, 0.01, 0.02)})  # cpu 1 -> 9
    total = 0.02 * growth
    decisions = _round(policy, 4, {0: (0, total, total), 1: (1, 0.01 * 16 / 9, total)})
    reset = [Decision(1, DUTY_CYCLE, 9.0, 16.0, "slowdown")]
    assert (decisions == reset) is fires
    assert policy.stats["slowdown_resets"] == (1 if fires else 0)
    assert policy.settings()[1]["level"] == (16 if fires else 9)


def test_slowdown_does_not_touch_full_speed_cpus():
    policy = ContainerPolicy("DDCM", [0], slowdown=1.1)
    _warm(policy, [0])
    for phase, total in [(3, 0.01), (4, 0.05)]:
        assert _round(policy, phase, {0: (0, total, total)}) == []
    assert policy.stats["slowdown_resets"] == 0


def test_reset_returns_everything_to_full_speed():
    policy = ContainerPolicy("COMBINED", [0, 1], frequencies=GRID)
    _warm(policy, [0, 1])
    _round(policy, 3, {0: (0, 0.02, 0.02), 1: (1, 0.002, 0.02)})
    # need 0.3 GHz, but one step may not go below 3/16 of the current speed (0.5625 GHz)
    assert policy.settings()[1] == {"level": 9, "frequency": 1.0 * GHZ}
    policy.on_phase(0, 0, 1, 0.02, 0.02, 4)  # pending data measured before the reset
    assert policy.reset() == [Decision(1, FREQUENCY, 1.0 * GHZ, 3.0 * GHZ, "reset"),
                              Decision(1, DUTY_CYCLE, 9.0, 16.0, "reset")]
    assert policy.reset() == []
    assert policy.stats["resets"] == 2
    assert all(s == {"level": 16, "frequency": 3.0 * GHZ} for s in policy.settings().values())
    assert not policy.on_phase(1, 1, 1, 0.01, 0.02, 4)  # source 0's pending data is gone


def test_remove_source_releases_its_cpu_and_unblocks_the_gate():
    policy = ContainerPolicy("DDCM", [0, 1, 2])
    _warm(policy, [0, 1, 2])
    _round(policy, 3, {0: (0, 0.02, 0.02), 1: (1, 0.01, 0.02), 2: (2, 0.02, 0.02)})
    assert policy.settings()[1]["level"] == 9
    _round(policy, 4, {0: (0, 0.02, 0.02), 2: (2, 0.005, 0.02)})  # waits for source 1
    decisions = policy.remove_source(1)
    assert decisions == [Decision(1, DUTY_CYCLE, 9.0, 16.0, "remove"),
                         Decision(2, DUTY_CYCLE, 16.0, 5.0, "ddcm")]
    assert policy.remove_source(1) == []
    assert policy.stats["sources_dropped"] == 1


def test_two_ranks_on_one_cpu_serve_the_busier_one():
    policy = ContainerPolicy("DDCM", [0])
    for phase in (1, 2):
        _round(policy, phase, {0: (0, 0.0, 0.0), 1: (0, 0.0, 0.0)})
    decisions = _round(policy, 3, {0: (0, 0.005, 0.02), 1: (0, 0.01, 0.02)})
    assert decisions == [Decision(0, DUTY_CYCLE, 16.0, 9.0, "ddcm")]


def test_per_cpu_frequency_lists():
    grids = {0: GRID, 1: [1.2 * GHZ, 2.4 * GHZ]}
    policy = ContainerPolicy("DVFS", [0, 1], frequencies=grids)
    _warm(policy, [0, 1])
    decisions = _round(policy, 3, {0: (0, 0.01, 0.02), 1: (1, 0.008, 0.02)})
    assert decisions == [Decision(0, FREQUENCY, 3.0 * GHZ, 2.0 * GHZ, "dvfs"),
                         Decision(1, FREQUENCY, 2.4 * GHZ, 1.2 * GHZ, "dvfs")]


def test_statistics_over_a_scripted_run():
    policy = ContainerPolicy("DDCM", [0, 1], damper_s=0.001, slowdown=1.1)
    _warm(policy, [0, 1])                          # 4 messages, 2 fires, 3 damper skips
    _round(policy, 3, {0: (0, 0.02, 0.02), 1: (1, 0.01, 0.02)})     # cpu 1 -> 9
    _round(policy, 4, {0: (0, 0.0001, 0.0001), 1: (1, 0.0, 0.0001)})  # damper
    _round(policy, 5, {0: (0, 0.03, 0.03), 1: (1, 0.01, 0.03)})     # slowdown reset
    policy.on_phase(0, 9, 1, 0.01, 0.02, 6)                          # foreign
    policy.on_phase(0, 0, 0, 0.01, 0.02, 6)                          # invalid
    policy.reset()
    assert policy.stats == {
        "messages": 12, "phases": 10, "invalid": 1, "foreign_cpu": 1,
        "gate_waits": 5, "gate_fires": 5, "evaluations": 4, "acted": 1,
        "damper_skipped": 5, "slowdown_resets": 1, "resets": 1,
        "sources_dropped": 0, "restarts": 0, "warmup_skipped": 0,
        "settle_skipped": 0, "critical_holds": 0,
    }


@pytest.mark.parametrize("name", ["DDCM", "COMBINED"])
def test_warmup_phase_is_counted_not_acted_on(name):
    """Phase 1 of an MPI program runs from MPI_Init to the first collective: start-up skew."""
    policy = ContainerPolicy(name, [0, 1], frequencies=GRID, warmup_phases=1)
    assert _round(policy, 1, {1: (1, 0.0001, 0.0011), 0: (0, 0.0, 0.0001)}) == []
    assert policy.stats["warmup_skipped"] == 2 and policy.stats["phases"] == 2
    assert policy.stats["gate_fires"] == 0
    decisions = _round(policy, 2, {1: (1, 0.01, 0.02), 0: (0, 0.02, 0.02)})
    assert decisions and {d.cpu for d in decisions} == {1}
    assert policy.stats["warmup_skipped"] == 2


def test_without_warmup_the_start_up_phase_drives_a_decision():
    policy = ContainerPolicy("DDCM", [0, 1])
    assert _round(policy, 1, {1: (1, 0.0001, 0.0011)}) == [Decision(1, DUTY_CYCLE, 16.0, 3.0,
                                                                    "ddcm")]


def test_warmup_must_be_a_count():
    with pytest.raises(ValueError, match="warmup"):
        ContainerPolicy("DDCM", [0], warmup_phases=-1)


def test_settle_skips_the_round_after_a_change_but_keeps_the_guard():
    """The phase after a decision ran partly at the old setting: not evidence for another."""
    policy = ContainerPolicy("DDCM", [0, 1], settle_rounds=1)
    _warm(policy, [0, 1])
    assert _round(policy, 3, {0: (0, 0.02, 0.02), 1: (1, 0.01, 0.02)}) == [
        Decision(1, DUTY_CYCLE, 16.0, 9.0, "ddcm")]
    # mixed phase: looks like more slack than there is; without settling it would cut to 7
    assert _round(policy, 4, {0: (0, 0.02, 0.02), 1: (1, 0.012, 0.02)}) == []
    assert policy.stats["settle_skipped"] == 1
    assert _round(policy, 5, {0: (0, 0.02, 0.02), 1: (1, 0.012, 0.02)}) == [
        Decision(1, DUTY_CYCLE, 9.0, 7.0, "ddcm")]
    # the slowdown guard acts even while settling
    assert _round(policy, 6, {0: (0, 0.03, 0.03), 1: (1, 0.01, 0.03)}) == [
        Decision(1, DUTY_CYCLE, 7.0, 16.0, "slowdown")]
    assert policy.stats["settle_skipped"] == 2


def test_settle_must_be_a_count():
    with pytest.raises(ValueError, match="settle"):
        ContainerPolicy("DDCM", [0], settle_rounds=True)


@pytest.mark.parametrize("name, frequencies", [("DDCM", None), ("COMBINED", GRID)])
def test_a_slowed_critical_cpu_is_rescued_before_anyone_else_is_cut(name, frequencies):
    """Cpu 0 waits only because we slowed cpu 1 too much: speed cpu 1 up, leave cpu 0."""
    policy = ContainerPolicy(name, [0, 1], frequencies=frequencies)
    _warm(policy, [0, 1])
    _round(policy, 3, {0: (0, 0.02, 0.02), 1: (1, 0.01, 0.02)})
    slowed = policy.settings()[1]
    decisions = _round(policy, 4, {0: (0, 0.014, 0.02), 1: (1, 0.02, 0.02)})
    assert decisions and {d.cpu for d in decisions} == {1}
    after = policy.settings()[1]
    assert after["level"] * (after["frequency"] or 1) > slowed["level"] * (slowed["frequency"] or 1)
    assert policy.settings()[0] == {"level": 16, "frequency": 3.0 * GHZ if frequencies else None}
    assert policy.stats["critical_holds"] == 1
