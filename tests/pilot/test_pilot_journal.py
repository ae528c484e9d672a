"""The resume journal: durable records, a torn tail, replay into a manager,
and the attempt files that tell a resumed pilot what its tasks did."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess

import pytest

from nrm.pilot import attempts, journal
from nrm.pilot.attempts import Attempts, LaunchError
from nrm.pilot.jobfile import parse_requests
from nrm.pilot.manager import Manager
from nrm.pilot.resume import _skip_recorded_attempts
from nrm.pilot.scheduler import Pool

HEAD = {"t": "head", "v": journal.VERSION, "pilot": "abc"}


def write(path, lines: bytes):
    path.write_bytes(lines)
    return str(path)


def test_torn_last_line_is_skipped_and_cut_off(tmp_path):
    good = (json.dumps(HEAD) + "\n" + json.dumps({"t": "e", "n": 1}) + "\n").encode()
    path = write(tmp_path / "j", good + b'{"t": "e", "n"')
    records, intact = journal.read(path)
    assert [r["t"] for r in records] == ["head", "e"] and intact == len(good)
    j = journal.Journal(path, truncate_to=intact)
    j.append({"t": "e", "n": 2})
    j.close()
    records, _ = journal.read(path)
    assert [r.get("n") for r in records] == [None, 1, 2]


def test_a_bad_line_before_the_end_is_corruption(tmp_path):
    path = write(tmp_path / "j", (json.dumps(HEAD) + "\nxx\n" + json.dumps({"t": "e"}) + "\n")
                 .encode())
    with pytest.raises(journal.JournalError, match="line 2 is not a journal record"):
        journal.read(path)
    with pytest.raises(journal.JournalError, match="no journal header"):
        journal.read(write(tmp_path / "k", b'{"t": "e"}\n'))


def test_one_write_per_loop_turn_and_grouped_syncs(tmp_path):
    j = journal.Journal(str(tmp_path / "j"))
    path = str(tmp_path / "j")

    async def main():
        for i in range(1000):
            j.append({"t": "x", "n": i})
        await asyncio.sleep(0)              # the end of the turn writes them
        assert j.writes == 1 and os.path.getsize(path) > 0 and j.syncs == 0
        j.append({"t": "x", "n": 1000})
        j.write()                           # a launch writes what is buffered
        assert j.writes == 2
        await asyncio.sleep(2 * journal.SYNC_S)
        assert j.syncs == 1                 # one fdatasync covered both writes
        j.append({"t": "x", "n": 1001})
        await j.durable()                   # an acknowledgement waits for its own
        assert j.syncs == 2 and j.writes == 3

    asyncio.run(main())
    assert j.records == 1002
    j.close()
    with open(tmp_path / "j") as f:
        assert len(f.readlines()) == 1002


def test_a_second_pilot_on_the_same_journal_is_refused(tmp_path):
    j = journal.Journal(str(tmp_path / "j"))
    with pytest.raises(journal.JournalError, match="another pilot"):
        journal.Journal(str(tmp_path / "j"))
    j.close()


def run_manager(mgr, fail=()):
    """Drive placements to the end without a runner; seq of the placed tasks."""
    now = 1.0
    while not mgr.done:
        placed = mgr.placements(now)
        assert placed
        for task, _ in placed:
            mgr.started(task, now)
            now += 1
            mgr.ended(task, 1 if task.name in fail else 0, now)
    return now


REQUESTS = [
    {"request": "submit", "jobs": [
        {"name": "a", "execution": {"exec": "x"}},
        {"name": "it_${rcnt}", "execution": {"exec": "x"}, "iteration": {"stop": 3},
         "dependencies": {"after": ["a"]}},
        {"name": "b", "execution": {"exec": "x"}, "dependencies": {"after": ["a"]}},
        {"name": "c", "execution": {"exec": "x"}, "dependencies": {"after": ["b"]}}]},
    {"request": "cancelJob", "jobNames": ["c"]},
]


def snapshot(mgr):
    return {name: (job.state, job.history, [(t.state, t.history, t.attempt, t.exit_code)
                                            for t in job.tasks])
            for name, job in mgr.jobs.items()}


@pytest.mark.parametrize("cut", [2, 3, 7, 11, 14, None])
def test_replay_rebuilds_the_same_states(cut):
    records = []
    mgr = Manager(Pool([("n0", 2)]), "/wd")
    mgr.record = records.append
    for req in parse_requests(REQUESTS).requests:
        mgr.handle(req, 0.5)
    run_manager(mgr, fail=("b",))
    again = Manager(Pool([("n0", 2)]), "/wd")
    interrupted = again.replay(records[:cut])
    if cut is None:
        assert snapshot(again) == snapshot(mgr) and not interrupted and again.done
        assert again.pool.free_total == 2
        return
    # a cut journal: what was placed and not ended is handed back, its cores held
    assert again.pool.free_total == 2 - sum(t.allocation.ncores for t in interrupted)
    for task in interrupted:
        again.requeue(task, 100.0, "lost")
    run_manager(again, fail=("b",))
    states = {n: j.state for n, j in mgr.jobs.items()}
    assert {n: j.state for n, j in again.jobs.items()} == states
    assert all(t.attempt == 2 for t in interrupted)


@pytest.mark.parametrize("wrapper", ["fence", "sh"])
def test_attempt_files(tmp_path, wrapper):
    att = Attempts(str(tmp_path), "p1")
    if wrapper == "sh":
        att.fence = None
    else:
        assert att.fence is not None, "nrm-pilot-fence was not built (make setup)"
    # never started: fenced, and a late launch of it does not run the command
    assert att.inspect(1, 1) == ("lost", None)
    marker = tmp_path / "ran"
    argv = att.wrap(1, 1, ["touch", str(marker)], os.environ["PATH"], str(tmp_path))
    assert subprocess.run(argv).returncode == 75 and not marker.exists()
    # ran to the end: adopted with its exit code
    argv = att.wrap(2, 1, ["sh", "-c", "exit 3"], os.environ["PATH"], str(tmp_path))
    assert subprocess.run(argv).returncode == 3
    assert att.inspect(2, 1) == ("done", 3)
    argv = att.wrap(7, 1, ["sh", "-c", "kill -TERM $$"], os.environ["PATH"], str(tmp_path))
    assert subprocess.run(argv).returncode == 143      # a signal: 128+N, as a shell says
    assert att.inspect(7, 1) == ("done", 143)
    # still running: adopted by its pid
    argv = att.wrap(3, 1, ["sleep", "5"], os.environ["PATH"], str(tmp_path))
    proc = subprocess.Popen(argv)
    record = att.path(3, 1)
    while not os.path.exists(record) or not open(record).read().strip():
        pass
    assert att.inspect(3, 1) == ("running", proc.pid)
    proc.kill()
    proc.wait()
    assert att.inspect(3, 1) == ("lost", None)      # died without its exit code
    assert att.used() == {"1.1", "2.1", "3.1", "7.1"}      # one record per attempt
    with pytest.raises(LaunchError, match="cannot execute 'no-such-prog'"):
        att.wrap(4, 1, ["no-such-prog"], os.environ["PATH"], str(tmp_path))


def test_an_empty_record_is_a_wrapper_writing_its_pid(tmp_path, monkeypatch):
    att = Attempts(str(tmp_path), "p1")
    open(att.path(5, 1), "w").close()           # created, pid not yet written
    monkeypatch.setattr(attempts, "EMPTY_WAIT_S", 0.2)
    assert att.inspect(5, 1) == ("lost", None)  # ... and never: its wrapper died there
    with open(att.path(6, 1), "w") as f:
        f.write(f"{os.getpid()}\n")            # a live pid that is not this wrapper
    assert att.inspect(6, 1) == ("lost", None)


def test_a_requeued_task_skips_attempts_that_have_a_record(tmp_path):
    """After a machine crash the journal can lack a placement whose attempt
    record exists: the next attempt must not collide with it (its launch
    would find the record taken and exit 75 without running)."""
    mgr = Manager(Pool([("n0", 2)]), "/wd")
    records = []
    mgr.record = records.append
    for req in parse_requests(REQUESTS).requests:
        mgr.handle(req, 0.5)
    again = Manager(Pool([("n0", 2)]), "/wd")
    again.replay([r for r in records if r["t"] == "req"])
    att = Attempts(str(tmp_path), "p1")
    task_a = again.jobs["a"].tasks[0]
    for attempt in (1, 2):
        open(att.path(task_a.seq, attempt), "w").close()
    _skip_recorded_attempts(again, att.used())
    (placed, _), = again.placements(1.0)
    assert placed is task_a and placed.attempt == 3
