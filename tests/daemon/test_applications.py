"""ApplicationManager: progress totals and rates, phase contexts, bounds."""

import pytest

from nrm.daemon.applications import ApplicationManager
from nrm.protocol import DExit, DPerformance, DPhaseContext, DProgress, DStart


class Clock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


def ids(container="c1", task="t1", app="a"):
    return dict(container=container, task=task, app=app)


def test_progress_total_and_rate_over_sliding_window():
    clock = Clock()
    am = ApplicationManager(window=10.0, bucket=1.0, clock=clock)
    assert am.handle(DStart(pid=7, **ids())) == []
    events = []
    for _ in range(20):  # 10 units per second for 20 s
        clock.t += 1.0
        events += am.handle(DProgress(payload=10, **ids()))
    topic, body = events[-1]
    assert topic == "progress"
    assert body["total"] == 200 and body["payload"] == 10
    assert body["rate"] == pytest.approx(10.0, rel=0.15)
    clock.t += 1.0
    am.handle(DProgress(payload=100, **ids()))  # a burst raises the rate
    assert am.progress_rate("c1", "t1", "a") > 15
    clock.t += 60  # silence: the window empties
    assert am.progress_rate("c1", "t1", "a") == 0.0
    snap = am.snapshot("c1")["apps"][0]
    assert snap["progress"] == 300 and snap["pids"] == [7] and snap["running"]


def test_rate_memory_is_bounded_by_buckets_not_messages():
    clock = Clock()
    am = ApplicationManager(window=5.0, bucket=0.5, clock=clock)
    for _ in range(100000):
        clock.t += 0.0001
        am.handle(DProgress(payload=1, **ids()))
    app = am._containers["c1"].apps[("t1", "a")]
    assert len(app.buckets) <= 5.0 / 0.5 + 1
    assert am.snapshot("c1")["apps"][0]["progress"] == 100000


def test_phase_context_latest_per_cpu():
    am = ApplicationManager(clock=Clock())
    for phase, cpu in ((1, 0), (1, 1), (4, 0)):
        (topic, body), = am.handle(DPhaseContext(rank=cpu, cpu=cpu, phase=phase, aggregation=1,
                                                 computetime=5, totaltime=10, **ids()))
        assert topic == "phase_context" and body["phase"] == phase
    cpus = am.phase_contexts("c1")
    assert set(cpus) == {0, 1} and cpus[0]["phase"] == 4 and cpus[1]["phase"] == 1
    assert am.phase_contexts("nope") == {}


@pytest.mark.parametrize("bad", [
    DPhaseContext(cpu=0, aggregation=0, computetime=1, totaltime=2, **ids()),
    DPhaseContext(cpu=0, aggregation=1, computetime=3, totaltime=2, **ids()),
    DPhaseContext(cpu=-1, aggregation=1, computetime=1, totaltime=2, **ids()),
    DPhaseContext(cpu=10 ** 9, aggregation=1, computetime=1, totaltime=2, **ids()),
    DProgress(payload=-5, **ids()),
])
def test_invalid_messages_are_dropped(bad):
    am = ApplicationManager(clock=Clock())
    assert am.handle(bad) == []
    assert am.counters["dropped_invalid"] == 1
    assert am.snapshot()["containers"] == {}


def test_performance_events():
    am = ApplicationManager(clock=Clock())
    (topic, body), = am.handle(DPerformance(event="instructions", payload=2e9, interval=0.5,
                                            **ids()))
    assert topic == "performance" and body["rate"] == 4e9
    (topic, body), = am.handle(DPerformance(event="cycles", payload=1.0, interval=0.0, **ids()))
    assert body["rate"] is None
    assert set(am.snapshot("c1")["apps"][0]["performance"]) == {"instructions", "cycles"}


def test_ranks_share_one_app_as_instances():
    am = ApplicationManager(clock=Clock())
    am.handle(DStart(pid=1, **ids()), peer="0:0:1")
    am.handle(DStart(pid=2, **ids()), peer="0:0:2")
    am.handle(DExit(**ids()))
    (app,) = am.snapshot("c1")["apps"]
    assert (app["starts"], app["exits"], app["running"]) == (2, 1, True)
    assert app["peers"] == ["0:0:1", "0:0:2"]
    am.handle(DExit(**ids()))
    assert not am.snapshot("c1")["apps"][0]["running"]


def test_caps_evict_finished_apps_first_then_drop():
    clock = Clock()
    am = ApplicationManager(max_apps_per_container=2, max_containers=2, clock=clock)
    for name in ("a", "b"):
        clock.t += 1
        am.handle(DStart(**ids(app=name)))
    am.handle(DProgress(payload=1, **ids(app="c")))  # full, nobody finished: dropped
    assert am.counters["dropped_apps"] == 1
    am.handle(DExit(**ids(app="a")))
    am.handle(DProgress(payload=1, **ids(app="c")))  # "a" finished: evicted for "c"
    assert {a["app"] for a in am.snapshot("c1")["apps"]} == {"b", "c"}

    am.handle(DStart(**ids(container="c2")))
    am.handle(DStart(**ids(container="c3")))  # two containers, none finished
    assert am.counters["dropped_containers"] == 1
    am.forget_container("c2")
    am.handle(DStart(**ids(container="c3")))
    assert sorted(am.containers()) == ["c1", "c3"]


def test_snapshot_shapes():
    am = ApplicationManager(clock=Clock())
    am.handle(DProgress(payload=3, **ids()))
    whole = am.snapshot()
    assert set(whole) == {"containers", "counters"}
    assert whole["containers"]["c1"]["apps"][0]["progress"] == 3
    assert am.snapshot("unknown") == {"apps": [], "cpus": {}}
    am.forget_container("c1")
    assert am.snapshot()["containers"] == {}


def test_bad_window_rejected():
    with pytest.raises(ValueError):
        ApplicationManager(window=1.0, bucket=2.0)
