"""nrm.pilot: scheduler, dependency graph, manager (pure; no daemon)."""

from __future__ import annotations

import pytest

from nrm.pilot import jobfile, model
from nrm.pilot.jobfile import Count
from nrm.pilot.manager import Manager
from nrm.pilot.scheduler import Pool, PoolError, Scheduler, parse_nodes, shape_of


@pytest.mark.parametrize("text,nodes", [
    ("4", [("n0", 4)]), ("n1:2", [("n1", 2)]), ("4,2,2", [("n0", 4), ("n1", 2), ("n2", 2)]),
    ("a:4,b:4", [("a", 4), ("b", 4)]),
])
def test_parse_nodes(text, nodes):
    assert parse_nodes(text) == nodes


@pytest.mark.parametrize("text", ["0", "x", "a:", "a:1,a:2", "1,,2"])
def test_parse_nodes_bad(text):
    with pytest.raises(PoolError):
        parse_nodes(text)


ALLOC = [
    # nodes, cores count, nodes count, expected allocation string
    ("4", None, None, "n0[0]"),
    ("4", Count(exact=3), None, "n0[0:1:2]"),
    ("2,2", Count(exact=3), None, "n0[0:1],n1[0]"),
    ("4", Count(min=1, max=3), None, "n0[0:1:2]"),
    ("4", Count(min=2, max=16), None, "n0[0:1:2:3]"),
    ("2,3", None, Count(exact=2), "n0[0:1],n1[0:1:2]"),
    ("2,3", Count(exact=2), Count(exact=2), "n0[0:1],n1[0:1]"),
    ("1,3", Count(exact=2), Count(exact=1), "n1[0:1]"),
    ("2", Count(exact=3), None, None),
]


@pytest.mark.parametrize("nodes,cores,count,expected", ALLOC)
def test_first_fit(nodes, cores, count, expected):
    pool = Pool(parse_nodes(nodes))
    alloc = pool.allocate(shape_of(cores, count))
    assert (None if alloc is None else str(alloc)) == expected
    if alloc is not None:
        pool.release(alloc)
        assert pool.free_total == pool.total


def test_system_core():
    pool = Pool(parse_nodes("2,2"), system_core=True)
    assert pool.total == 3 and str(pool.allocate(shape_of(None, None))) == "n0[1]"


def spec(name, cores=None, after=(), iteration=None):
    d = {"name": name, "execution": {"exec": "/bin/true"}}
    if cores:
        d["resources"] = {"numCores": cores}
    if after:
        d["dependencies"] = {"after": list(after)}
    if iteration:
        d["iteration"] = iteration
    return d


def submit(mgr, *jobs, now=0.0):
    req = jobfile.parse_requests([{"request": "submit", "jobs": list(jobs)}]).requests[0]
    return mgr.handle(req, now)


def drain(mgr, fail=()):
    """Run everything to the end: each placement exits at once."""
    order = []
    while True:
        placed = mgr.placements(1.0)
        if not placed:
            break
        for task, alloc in placed:
            order.append((task.name, str(alloc)))
            mgr.started(task, 1.0)
            mgr.ended(task, 1 if task.name in fail else 0, 2.0)
    return order


def test_backfill_small_task_passes_a_large_one():
    mgr = Manager(Pool(parse_nodes("4")), "/wd")
    submit(mgr, spec("small1", 3))
    submit(mgr, spec("big", 4), spec("small2", 1))
    first = mgr.placements(0.0)
    assert [t.name for t, _ in first] == ["small1", "small2"]


def test_dependencies_and_transitive_omission():
    mgr = Manager(Pool(parse_nodes("2")), "/wd")
    r = submit(mgr, spec("d", after=["c"]), spec("c", after=["b"]), spec("b"),
               spec("x", after=["nobody"]), spec("ok", after=["b"]))
    assert r["code"] == 0
    order = drain(mgr, fail={"b"})
    assert [n for n, _ in order] == ["b"]
    states = {n: j.state for n, j in mgr.jobs.items()}
    assert states == {"d": "OMITTED", "c": "OMITTED", "b": "FAILED", "x": "OMITTED",
                      "ok": "OMITTED"}
    assert [s for s, _ in mgr.jobs["d"].history] == ["QUEUED", "OMITTED"]
    assert mgr.done


def test_submit_is_atomic_and_names_unique():
    mgr = Manager(Pool(parse_nodes("2")), "/wd")
    assert submit(mgr, spec("a"))["code"] == 0
    r = submit(mgr, spec("b"), spec("a"))
    assert r["code"] == 1 and "already exist" in r["message"] and "b" not in mgr.jobs
    r = submit(mgr, spec("c"), spec("huge", 3))
    assert "Not enough resources for job huge" in r["message"] and "c" not in mgr.jobs
    r = submit(mgr, spec("bad name"))
    assert "invalid characters" in r["message"]
    r = submit(mgr, spec("n-${rcnt}"))
    assert r["data"]["jobs"] == ["n-5"]


def test_iterations_variables_and_parent_state():
    mgr = Manager(Pool(parse_nodes("2")), "/wd")
    submit(mgr, spec("it", iteration={"values": ["a", "b", "c"]}))
    submit(mgr, spec("after", after=["it"]))
    order = drain(mgr, fail={"it:1"})
    assert [n for n, _ in order] == ["it:0", "it:1", "it:2"]
    job = mgr.jobs["it"]
    assert job.state == "FAILED" and mgr.jobs["after"].state == "OMITTED"
    t = job.tasks[2]
    assert (t.variables["it"], t.variables["itval"], t.variables["jname"]) == (2, "c", "it")
    assert model.substitute("${root_wd}/${it}-${nope}", t.variables) == "/wd/2-${nope}"
    info = mgr.job_info(job, with_childs=True)
    assert info["iterations"]["failed"] == 1 and len(info["childs"]) == 3


def test_cancel_queued_omits_dependants_and_remove_frees_name():
    mgr = Manager(Pool(parse_nodes("1")), "/wd")
    submit(mgr, spec("a"), spec("b"), spec("c", after=["b"]))
    mgr.placements(0.0)                                  # a runs; b waits for a core
    req = jobfile.parse_requests([{"request": "cancelJob", "jobNames": ["b"]},
                                  {"request": "removeJob", "jobNames": ["b"]}]).requests
    assert mgr.handle(req[0], 1.0)["code"] == 0
    assert (mgr.jobs["b"].state, mgr.jobs["c"].state) == ("CANCELED", "OMITTED")
    assert mgr.handle(req[1], 1.0)["data"] == {"removed": 1}
    assert submit(mgr, spec("b"))["code"] == 0


@pytest.mark.parametrize("sched,expected", [
    ({"name": "split-into", "params": {"parts": 2}}, 4),
    ({"name": "split-into"}, 2),
    ({"name": "maximum-iters"}, 2),
])
def test_iteration_schedulers(sched, expected):
    s = jobfile.parse_job(spec("j", {"min": 1, "scheduler": sched}, iteration={"stop": 4}))
    cores, _ = model.task_counts(s, 8, 1)
    assert cores == Count(exact=expected)


def test_ten_thousand_chained_tasks_no_queue_scan():
    """10 000 jobs in chains of 10: all run, each placed once, in order of
    readiness. (Cost per task is measured in benchmarks/pilot.py.)"""
    mgr = Manager(Pool(parse_nodes("2")), "/wd")
    jobs = []
    for i in range(10_000):
        after = [f"j{i - 1}"] if i % 10 else []
        jobs.append(spec(f"j{i}", after=after))
    assert submit(mgr, *jobs)["code"] == 0
    order = drain(mgr)
    assert len(order) == 10_000 and len({n for n, _ in order}) == 10_000
    assert mgr.outcome()["SUCCEED"] == 10_000


def test_scheduler_skips_cancelled_lazily():
    pool = Pool(parse_nodes("1"))
    sched = Scheduler(pool)
    job = model.Job(jobfile.parse_job(spec("a", iteration={"stop": 3})), "a", 1, 0)
    tasks = [model.Task(job, i, None, None, i) for i in range(3)]
    for t in tasks:
        sched.push(t)
    tasks[0].state = "CANCELED"
    assert [t.name for t, _ in sched.schedule()] == ["a:1"]


def test_report_stamps_read_as_datetime_writes_them():
    """jobs.report's dates: the seconds' text is cached, the text is not
    changed (microseconds rounded half to even, as datetime does)."""
    import random
    from datetime import datetime

    from nrm.pilot.model import format_stamp
    rng = random.Random(7)
    base = 1765000000.0
    stamps = [base + rng.uniform(-1e6, 1e6) for _ in range(20000)]
    stamps += [base + k / 1e6 + 0.5e-6 for k in range(2000)]          # ties
    stamps += [base + 0.9999996, base + 0.9999995, base - 0.0000004]  # carries
    for ts in stamps:
        assert format_stamp(ts) == datetime.fromtimestamp(ts).strftime(
            "%Y-%m-%d %H:%M:%S.%f"), ts
