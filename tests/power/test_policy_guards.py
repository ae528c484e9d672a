"""Damper, slowdown guard and the phase gate that aligns ranks."""

from __future__ import annotations

import pytest

from nrm.power.policy.guards import PhaseGate, SlowdownGuard, damper_skips


@pytest.mark.parametrize(
    "total_s, phases, damper_s, skips",
    [
        (0.0005, 1, 0.001, True),
        (0.002, 1, 0.001, False),
        (0.001, 1, 0.001, False),   # at the damper: acts
        (0.005, 10, 0.001, True),   # 5 ms over 10 phases is 0.5 ms per phase
        (0.05, 10, 0.001, False),
        (0.05, 0, 0.001, True),     # no phase at all
        (0.0, 1, 0.0, False),       # damper disabled
    ],
)
def test_damper(total_s, phases, damper_s, skips):
    assert damper_skips(total_s, phases, damper_s) is skips


@pytest.mark.parametrize(
    "factor, sequence, expected",
    [
        # (per-phase total, slowed) per step -> guard answers
        (1.1, [(1.0, True), (1.2, True)], [False, True]),
        (1.1, [(1.0, True), (1.05, True)], [False, False]),
        (1.1, [(1.0, False), (2.0, False)], [False, False]),        # full speed: never
        (1.1, [(1.2, True)], [False]),                                # no previous phase
        (1.0, [(1.0, True), (1.0, True), (1.01, True)], [False, False, True]),
        # The reference is the previous phase, read before it is replaced:
        (1.1, [(1.0, True), (1.05, True), (1.15, True)], [False, False, False]),
        (1.1, [(1.0, True), (1.0, False), (1.5, True)], [False, False, True]),
    ],
)
def test_slowdown_guard(factor, sequence, expected):
    guard = SlowdownGuard(factor)
    assert [guard.check(3, total, slowed) for total, slowed in sequence] == expected


def test_slowdown_guard_keeps_cpus_apart_and_forgets():
    guard = SlowdownGuard(1.1)
    guard.check(0, 1.0, True)
    assert guard.check(1, 5.0, True) is False
    assert guard.previous(0) == 1.0
    guard.forget(0)
    assert guard.check(0, 5.0, True) is False
    guard.forget()
    assert guard.previous(1) is None


@pytest.mark.parametrize("factor", [0.9, 0.0, float("nan")])
def test_slowdown_factor_below_one_is_rejected(factor):
    with pytest.raises(ValueError):
        SlowdownGuard(factor)


def _start(gate, sources):
    """Bring sources to a common point so that tests start from steady state."""
    for source in sources:
        gate.offer(source, source, 1, 0.0, 0.0, 0)
    # the last one's first message leaves the earlier ones without pending data
    gate.clear_pending()


def _offers(gate, script):
    return [gate.offer(*step) for step in script]


def test_first_message_fires_alone_then_others_wait():
    gate = PhaseGate()
    first = gate.offer(0, 0, 1, 1.0, 2.0, 1)
    assert [r.source for r in first.ready] == [0]
    second = gate.offer(1, 1, 1, 1.0, 2.0, 1)
    assert not second.fired  # source 0 is active and has nothing pending


@pytest.mark.parametrize(
    "script, fire_at, phases",
    [
        # equal aggregation: fires on the message that completes the round
        ([(0, 0, 2, 1.0, 2.0, 4), (1, 1, 2, 0.5, 2.0, 4)], 1, {0: 2, 1: 2}),
        # K = 2 against K = 4: they meet at the multiple of 4
        ([(0, 0, 2, 1.0, 2.0, 2), (1, 1, 4, 1.0, 4.0, 4), (0, 0, 2, 1.0, 2.0, 4)],
         2, {0: 4, 1: 4}),
        # a source that is behind keeps accumulating until it reaches the others
        ([(1, 1, 4, 1.0, 4.0, 4), (0, 0, 1, 0.5, 1.0, 1), (0, 0, 1, 0.5, 1.0, 2),
          (0, 0, 2, 1.0, 2.0, 4)], 3, {0: 4, 1: 4}),
        # one sender grows K past the other: the other catches up to 8
        ([(0, 0, 8, 4.0, 8.0, 8), (1, 1, 2, 1.0, 2.0, 2), (1, 1, 2, 1.0, 2.0, 4),
          (1, 1, 4, 2.0, 4.0, 8)], 3, {0: 8, 1: 8}),
        # seed-era senders without a phase count: the gate counts aggregations
        ([(0, 0, 1, 0.5, 1.0, 0), (1, 1, 1, 0.2, 1.0, 0)], 1, {0: 1, 1: 1}),
        ([(0, 0, 2, 0.5, 1.0, 0), (1, 1, 1, 0.2, 1.0, 0), (1, 1, 1, 0.2, 1.0, 0)],
         2, {0: 2, 1: 2}),
    ],
)
def test_gate_fires_at_common_phase_count(script, fire_at, phases):
    gate = PhaseGate()
    _start(gate, [0, 1])
    results = _offers(gate, script)
    fired = [i for i, r in enumerate(results) if r.fired]
    assert fired == [fire_at]
    ready = {r.source: r for r in results[fire_at].ready}
    assert {k: r.phases for k, r in ready.items()} == phases
    for source in (0, 1):
        sent = [s for s in script[:fire_at + 1] if s[0] == source]
        assert ready[source].compute_s == pytest.approx(sum(s[3] for s in sent))
        assert ready[source].total_s == pytest.approx(sum(s[4] for s in sent))
        assert gate.pending(source)[0] == 0  # consumed


def test_gate_restart_discards_pending_data():
    gate = PhaseGate()
    _start(gate, [0, 1])
    gate.offer(0, 0, 4, 9.0, 9.0, 8)
    result = gate.offer(0, 0, 1, 1.0, 2.0, 1)  # count went backwards: new program
    assert result.restarted
    assert gate.pending(0) == (1, 1)
    fired = gate.offer(1, 1, 1, 0.5, 2.0, 1)
    assert {r.source: r.compute_s for r in fired.ready} == {0: 1.0, 1: 0.5}


@pytest.mark.parametrize("stale_rounds, silent_after, drops", [(4, 4, False), (4, 5, True)])
def test_gate_drops_a_silent_source(stale_rounds, silent_after, drops):
    gate = PhaseGate(stale_rounds=stale_rounds)
    _start(gate, [0, 1])
    results = [gate.offer(0, 0, 1, 1.0, 2.0, n) for n in range(1, silent_after + 1)]
    assert all(not r.fired for r in results[:-1])
    last = results[-1]
    assert (last.dropped == ((1, 1),)) is drops
    assert last.fired is drops
    if drops:
        assert last.ready[0].phases == silent_after
        assert gate.sources == {0: 0}
        # it comes back with its next message and the gate waits for it again
        assert not gate.offer(1, 1, 1, 1.0, 2.0, 100).fired
        assert set(gate.sources) == {0, 1}


def test_gate_explicit_removal_then_poll():
    gate = PhaseGate()
    _start(gate, [0, 1, 2])
    gate.offer(0, 0, 1, 1.0, 2.0, 1)
    gate.offer(1, 1, 1, 1.0, 2.0, 1)
    assert not gate.poll().fired
    assert gate.remove(2) == 2
    assert gate.remove(2) is None
    assert {r.source for r in gate.poll().ready} == {0, 1}


def test_gate_rejects_empty_aggregation():
    with pytest.raises(ValueError):
        PhaseGate().offer(0, 0, 0, 1.0, 1.0)
    with pytest.raises(ValueError):
        PhaseGate(stale_rounds=0)
