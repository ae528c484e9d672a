"""Where nrmd's own threads run (nrm/daemon/affinity.py): the rule as a
table, the listener with a fake clock, and the real move of this
process's threads."""

import os
import threading
from types import SimpleNamespace

import pytest

from nrm.daemon import affinity
from nrm.daemon.affinity import DaemonAffinity, choose, parse_daemon_cpus

F = frozenset
ALL = F({0, 1, 2, 3})


@pytest.mark.parametrize("waits, current, busy, expected, why", [
    ({}, ALL, F(), ALL, "no container: every cpu"),
    ({}, ALL, F({0, 1}), ALL, "no report: nothing known, nothing moved"),
    ({0: 0.5}, ALL, F({0, 1}), F({2, 3}), "cpus no container uses come first"),
    ({}, ALL, ALL, ALL, "busy everywhere, no report yet: no preference"),
    ({0: 0.0, 1: 0.4, 2: 0.1, 3: 0.0}, ALL, ALL, F({1}), "the cpu that waits most"),
    ({0: 0.3, 1: 0.3}, ALL, ALL, F({0}), "ties: the lowest cpu, the same every time"),
    ({0: 0.01, 1: 0.03}, ALL, ALL, ALL, "balanced: nothing to spare anywhere"),
    ({0: 0.36, 1: 0.4}, F({0}), ALL, F({0}), "stays while within the hysteresis"),
    ({0: 0.30, 1: 0.4}, F({0}), ALL, F({1}), "moves once another waits clearly more"),
    ({0: 0.5, 9: 0.9}, ALL, ALL, F({0}), "a cpu outside its mask is never chosen"),
    ({1: 0.4}, F({0}), ALL, F({1}), "the current cpu stopped reporting"),
])
def test_choose(waits, current, busy, expected, why):
    assert choose(waits, current, ALL, busy) == expected, why


@pytest.mark.parametrize("text, expected", [
    ("follow", None), ("all", F()), ("1", F({1})), ("0-2,5", F({0, 1, 2, 5}))])
def test_parse_daemon_cpus(text, expected):
    assert parse_daemon_cpus(text) == expected


@pytest.mark.parametrize("text", ["", "x", "3-1", "0,a"])
def test_parse_daemon_cpus_refuses(text):
    with pytest.raises(ValueError, match="--daemon-cpus"):
        parse_daemon_cpus(text)


class FakeLoop:
    def __init__(self):
        self.timers = []

    def call_later(self, delay, fn):
        timer = SimpleNamespace(delay=delay, fn=fn, cancelled=False)
        timer.cancel = lambda: setattr(timer, "cancelled", True)
        self.timers.append(timer)
        return timer

    def run_due(self):
        due = [t for t in self.timers if not t.cancelled]
        self.timers = []
        for t in due:
            t.fn()


def _container(cid, cpus):
    return SimpleNamespace(id=cid, slice=SimpleNamespace(cpus=cpus))


def _follower(allowed=F({0, 1})):
    now = [0.0]
    moves = []
    loop = FakeLoop()
    aff = DaemonAffinity(loop, None, apply=lambda cpus: moves.append(cpus) or 1,
                         clock=lambda: now[0], allowed=allowed)
    return aff, loop, now, moves


def test_follows_the_waiting_rank_and_gives_every_cpu_back_at_the_end():
    aff, loop, now, moves = _follower()
    c = _container("c1", [0, 1])
    aff.container_started(c)
    assert loop.timers == []            # no report yet: nothing to look at
    for _ in range(5):
        aff.on_phase(0, compute_ns=100, total_ns=100)      # critical: never waits
        aff.on_phase(1, compute_ns=50, total_ns=100)       # waits half of each phase
    loop.run_due()
    assert moves == [F({1})]
    assert aff.state() == {"mode": "follow", "cpus": "1", "moves": 1, "moved_to": {"1": 1}}
    aff.container_ended(c)
    loop.run_due()
    assert moves[-1] == F({0, 1})
    assert loop.timers == []            # nothing running, nothing to look at


def test_stale_reports_are_forgotten():
    aff, loop, now, moves = _follower()
    aff.container_started(_container("c1", [0, 1]))
    aff.on_phase(1, compute_ns=20, total_ns=100)
    loop.run_due()
    assert moves == [F({1})]
    now[0] += affinity.STALE_S + 0.1
    loop.run_due()
    assert moves == [F({1}), F({0, 1})]
    assert loop.timers == []            # nothing left to follow: no more looks


def test_the_wait_is_smoothed_over_reports():
    aff, loop, now, moves = _follower()
    aff.on_phase(1, compute_ns=0, total_ns=100)
    aff.on_phase(1, compute_ns=100, total_ns=100)
    assert aff.waits() == {1: pytest.approx(1 - affinity.ALPHA)}
    aff.on_phase(1, compute_ns=10, total_ns=0)      # an empty report changes nothing
    assert aff.waits() == {1: pytest.approx(1 - affinity.ALPHA)}


def test_fixed_cpus_are_applied_once_and_never_followed():
    moves = []
    loop = FakeLoop()
    aff = DaemonAffinity(loop, F({1}), apply=lambda cpus: moves.append(cpus) or 1,
                         allowed=F({0, 1}))
    aff.container_started(_container("c1", [0, 1]))
    aff.on_phase(0, compute_ns=0, total_ns=100)
    loop.run_due()
    assert moves == [F({1})] and loop.timers == []
    assert aff.state()["mode"] == "fixed"


def test_all_never_moves_anything():
    moves = []
    aff = DaemonAffinity(FakeLoop(), F(), apply=lambda cpus: moves.append(cpus) or 1,
                         allowed=F({0, 1}))
    aff.container_started(_container("c1", [0, 1]))
    aff.on_phase(1, compute_ns=0, total_ns=100)
    assert moves == [] and aff.state()["mode"] == "all"


def test_a_container_that_never_reported_ends_without_a_look():
    aff, loop, now, moves = _follower()
    aff.container_started(_container("c1", [0]))
    aff.container_started(_container("c2", [1]))
    aff.on_phase(1, compute_ns=0, total_ns=100)
    loop.run_due()
    assert moves == [F({1})]
    aff.container_ended(_container("c1", [0]))
    assert [t for t in loop.timers if t.delay == 0] == []
    aff.container_ended(_container("c2", [1]))
    loop.run_due()
    assert moves == [F({1}), F({0, 1})]


def test_closed_it_follows_nothing():
    aff, loop, now, moves = _follower()
    aff.close()
    aff.on_phase(1, compute_ns=0, total_ns=100)
    assert loop.timers == [] and moves == []


def test_a_move_that_fails_is_logged_and_kept_from_the_state(caplog):
    def refuse(cpus):
        raise PermissionError("not allowed")
    loop = FakeLoop()
    aff = DaemonAffinity(loop, None, apply=refuse, allowed=F({0, 1}))
    aff.container_started(_container("c1", [0, 1]))
    aff.on_phase(1, compute_ns=0, total_ns=100)
    loop.run_due()
    assert aff.current == F({0, 1}) and aff.moves == 0
    assert "cannot move nrmd's threads" in caplog.text


def test_set_own_affinity_moves_every_thread_of_the_process():
    mask = os.sched_getaffinity(0)
    one = F({min(mask)})
    stop = threading.Event()
    worker = threading.Thread(target=stop.wait)
    worker.start()
    try:
        assert affinity.set_own_affinity(one) >= 2
        assert os.sched_getaffinity(worker.native_id) == one
        assert os.sched_getaffinity(0) == one
    finally:
        affinity.set_own_affinity(mask)
        stop.set()
        worker.join()
    assert os.sched_getaffinity(0) == mask


def test_set_own_affinity_raises_when_this_thread_cannot_move():
    with pytest.raises(OSError):
        affinity.set_own_affinity({os.cpu_count() + 64})
    assert os.sched_getaffinity(0)
