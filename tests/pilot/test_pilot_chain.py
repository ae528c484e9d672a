"""nrm.pilot: iterations chained behind running ones on the same cores
(the manager's slots, pure), and a cancel of them through a real nrmd
(tests/pilot/test_pilot_run.py and the resume tests run chains too)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap

from nrm.pilot import jobfile
from nrm.pilot.manager import Manager
from nrm.pilot.scheduler import Pool, parse_nodes
from tests.nrmd import DaemonProcess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def spec(name, cores=None, after=(), iteration=None):
    d = {"name": name, "execution": {"exec": "/bin/true"}}
    if cores:
        d["resources"] = {"numCores": {"exact": cores}}
    if after:
        d["dependencies"] = {"after": list(after)}
    if iteration:
        d["iteration"] = {"stop": iteration}
    return d


def manager(nodes, *jobs, depth=4):
    mgr = Manager(Pool(parse_nodes(nodes)), "/wd")
    mgr.chain_depth = depth
    mgr.chainable = lambda job: True
    records = []
    mgr.record = records.append
    req = jobfile.parse_requests([{"request": "submit", "jobs": list(jobs)}]).requests[0]
    assert mgr.handle(req, 0.0)["code"] == 0
    return mgr, records


def names(placed):
    return [(t.name, str(a)) for t, a in placed]


def test_iterations_alternate_over_slots_and_hold_the_cores_until_the_chain_ends():
    mgr, _ = manager("2", spec("it", iteration=12))
    assert names(mgr.placements(1.0)) == [("it:0", "n0[0]"), ("it:1", "n0[1]")]
    it = mgr.jobs["it"].tasks
    mgr.started(it[0], 1.0)
    mgr.started(it[1], 1.0)
    assert names(mgr.commits(1.0)) == [("it:2", "n0[0]"), ("it:3", "n0[1]"), ("it:4", "n0[0]"),
                                       ("it:5", "n0[1]"), ("it:6", "n0[0]"), ("it:7", "n0[1]")]
    assert {t.state for t in it[2:8]} == {"SCHEDULED"} and it[8].state == "QUEUED"
    assert mgr.pool.free_total == 0
    mgr.ended(it[0], 0, 2.0)
    assert it[2].state == "EXECUTING" and it[2].started == 2.0   # nrmd started it then
    assert mgr.pool.free_total == 0 and mgr.placements(2.0) == []
    assert mgr.commits(2.0) == []                   # 3 left on the slot: more than half
    mgr.ended(it[2], 0, 3.0)
    assert names(mgr.commits(3.0)) == [("it:8", "n0[0]"), ("it:9", "n0[0]")]
    for task in it[1:8:2] + [it[4], it[6], it[8], it[9]]:    # each slot's chain in order
        mgr.ended(task, 0, 4.0)
    assert mgr.slots == {} and mgr.pool.free == [[0, 1]]
    assert names(mgr.placements(4.0)) == [("it:10", "n0[0]"), ("it:11", "n0[1]")]


def test_a_chained_exit_that_outruns_its_predecessors_keeps_its_executing_stamp():
    """nrmd's replies may bring a chained task's exit before the exit of
    the task it was chained behind: its history still shows it EXECUTING,
    from when nrmd started it, then SUCCEED."""
    mgr, _ = manager("1", spec("it", iteration=3))
    (first, _), = mgr.placements(1.0)
    mgr.started(first, 1.0)
    (second, _), (third, _) = mgr.commits(1.0)
    mgr.ended(second, 0, 2.5, real_start=2.0)          # its predecessor's exit comes later
    states = [(state, when) for state, when in zip(second._log[::2], second._log[1::2])]
    assert states[-2:] == [("EXECUTING", 2.0), ("SUCCEED", 2.5)], states
    assert second.started == 2.0
    mgr.ended(first, 0, 2.6)
    assert third.state == "EXECUTING"


def test_cores_go_back_once_when_the_chain_ends():
    mgr, _ = manager("2", spec("it", iteration=6))
    placed = mgr.placements(1.0) + mgr.commits(1.0)
    assert len(placed) == 6
    for task, _ in placed:
        if task.state == "SCHEDULED" and not task.chained:
            mgr.started(task, 1.0)
        mgr.ended(task, 0, 2.0)
    assert mgr.done and mgr.slots == {}
    assert mgr.pool.free == [[0, 1]] and mgr.pool.free_total == 2


def test_no_chaining_while_an_older_task_could_use_the_cores():
    # a (3 cores) becomes ready after gate ends, older than every iteration:
    # first-free placement would give it it:0's cores plus the free one
    mgr, _ = manager("3", spec("a", cores=3, after=["gate"]), spec("gate"),
                     spec("it", cores=2, iteration=8))
    assert names(mgr.placements(1.0)) == [("gate", "n0[0]"), ("it:0", "n0[1:2]")]
    it = mgr.jobs["it"].tasks
    assert names(mgr.commits(1.0)) == [("it:1", "n0[1:2]"), ("it:2", "n0[1:2]"),
                                       ("it:3", "n0[1:2]")]
    mgr.ended(mgr.jobs["gate"].tasks[0], 0, 2.0)
    assert mgr.placements(2.0) == []                # a needs 3, 1 free
    for task in it[:3]:
        mgr.ended(task, 0, 3.0)
        assert mgr.commits(3.0) == []               # a is older and would fit there
    mgr.ended(it[3], 0, 4.0)
    assert names(mgr.placements(4.0)) == [("a", "n0[0:1:2]")]


def test_other_jobs_and_ranges_are_not_chained():
    mgr, _ = manager("2", spec("x"), {"name": "r", "execution": {"exec": "true"},
                                      "resources": {"numCores": {"min": 1, "max": 2}},
                                      "iteration": {"stop": 3}}, spec("it", iteration=4))
    placed = mgr.placements(1.0)
    assert names(placed) == [("x", "n0[0]"), ("r:0", "n0[1]")]
    assert mgr.slots == {} and mgr.commits(1.0) == []


def test_a_chained_task_takes_nrmds_start_and_cancel_hands_it_to_the_kill():
    mgr, records = manager("1", spec("it", iteration=3))
    (head, _), = mgr.placements(1.0)
    mgr.started(head, 1.0)
    (second, _), (third, _) = mgr.commits(1.5)
    mgr.ended(head, 0, 3.0)                        # second: EXECUTING at 3.0 ...
    assert second.state == "EXECUTING"
    mgr.ended(second, 0, 4.0, real_start=2.0)      # ... nrmd started it at 2.0
    assert second.history[2] == ("EXECUTING", 2.0) and second.rtime == 2.0
    kill = mgr.cancel(mgr.jobs["it"], 4.5)
    assert kill == [third]                          # SCHEDULED, waiting in nrmd: killed there
    mgr.ended(third, None, 5.0, message="canceled", canceled=True)
    assert third.state == "CANCELED" and mgr.jobs["it"].state == "CANCELED"
    assert mgr.pool.free_total == 1
    assert [r.get("ch") for r in records if r["t"] == "p"] == [None, 1, 1]


def test_replay_rebuilds_the_chain_and_releases_its_cores_once():
    mgr, records = manager("2", spec("it", iteration=8))
    placed = mgr.placements(1.0)
    for task, _ in placed:
        mgr.started(task, 1.0)
    mgr.commits(1.0)
    it = mgr.jobs["it"].tasks
    mgr.ended(it[0], 0, 2.0, real_start=1.2)       # it:2 now runs on n0[0]
    again = Manager(Pool(parse_nodes("2")), "/wd")
    interrupted = again.replay(records)
    assert [t.name for t in interrupted] == [f"it:{i}" for i in range(1, 8)]
    assert again.pool.free_total == 0
    new = again.jobs["it"].tasks
    assert new[2].state == "EXECUTING" and new[4].state == "SCHEDULED"
    for task in interrupted:                        # never ran: back to the queue
        if task.state == "SCHEDULED":
            again.requeue(task, 3.0, "lost")
    assert again.pool.free_total == 0               # it:1 and it:2 still hold them
    again.ended(new[1], 0, 4.0)
    again.ended(new[2], 0, 4.0)
    assert again.pool.free == [[0, 1]] and again.pool.free_total == 2
    assert [t.name for t, _ in again.placements(5.0)] == ["it:3", "it:4"]
    assert again.slots == {}                        # chaining is the runner's choice


CANCEL_CHAIN = textwrap.dedent('''
    import collections, os, sys, time
    from nrm.pilot.qcg import Jobs, LocalManager

    wd = sys.argv[1]
    manager = LocalManager(['--wd', wd, '--nodes', '2'], {'init_timeout': 60})
    manager.submit(Jobs().add(name='it', exec='/bin/sh', iteration=12,
                              args=['-c', 'sleep 1; echo ${it} >> ledger']))
    time.sleep(1.5)
    info = manager.info_parsed('it', withChilds=True)['it']
    print('during:', sorted(collections.Counter(c.status for c in info.childs).items()))
    print('used:', manager.resources()['used_cores'])
    manager.cancel('it')
    print('cancelled:', manager.wait4('it'))
    info = manager.info_parsed('it', withChilds=True)['it']
    print('after:', sorted((c.iteration, c.status) for c in info.childs))
    manager.finish()
''')


def test_cancel_kills_the_committed_iterations_and_states_stay_truthful(tmp_path):
    path = tmp_path / "script.py"
    path.write_text(CANCEL_CHAIN)
    wd = tmp_path / "wd"
    with DaemonProcess() as nrmd:
        r = subprocess.run([sys.executable, str(path), str(wd)], capture_output=True,
                           text=True, timeout=120, env=nrmd.env, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    out = dict(line.split(": ", 1) for line in r.stdout.splitlines())
    during = dict(ast.literal_eval(out["during"]))
    # two run (one per core), the others wait in nrmd behind them (SCHEDULED)
    assert during.get("EXECUTING") == 2 and during.get("SCHEDULED", 0) >= 2, out
    assert out["used"] == "2" and out["cancelled"] == "{'it': 'CANCELED'}"
    after = ast.literal_eval(out["after"])
    assert {s for _, s in after} <= {"SUCCEED", "CANCELED"}
    ran = (wd / "ledger").read_text().split() if (wd / "ledger").exists() else []
    assert sorted(map(int, ran)) == sorted(i for i, s in after if s == "SUCCEED")
