"""THE LONG TEST (about a minute and a half): a 200-task workflow whose pilot
is killed with SIGKILL at 100 random moments and resumed each time; every
task must end exactly once.

Each task appends ``start NAME`` to one ledger (O_APPEND), sleeps, then
``end NAME``. A task killed mid-way and run again would leave two starts
and one end; a task run twice to completion leaves two ends. The resumed
pilot adopts what its predecessor launched (nrm/pilot/attempts.py), so the
ledger must hold exactly one start and one end per task.

The workflow's critical path (a chain of 121 tasks of 0.3 s) is longer than
the 100 kills can let it advance: each resumed pilot lives a random
0-0.2 s once it has replayed its journal, less than a task takes.
"""

from __future__ import annotations

import collections
import glob
import json
import os
import random
import signal
import time

import pytest

from tests.nrmd import DaemonProcess

KILLS = 100
pytestmark = pytest.mark.long


def workflow(ledger: str):
    def job(name, after=(), iteration=None):
        script = f'echo "start $0" >> {ledger}; sleep 0.3; echo "end $0" >> {ledger}'
        j = {"name": name, "execution": {"exec": "/bin/sh", "args": ["-c", script, name]}}
        if iteration:
            j["iteration"] = {"stop": iteration}
            j["execution"]["args"][-1] = f"{name}:${{it}}"
        if after:
            j["dependencies"] = {"after": list(after)}
        return j
    chain = [job("c0")]
    for i in range(1, 121):
        after = [f"c{i - 1}"] if i != 61 else ["fan"]
        chain.append(job(f"c{i}", after))
    fan = job("fan", ["c60"], iteration=79)
    return [{"request": "submit", "jobs": chain + [fan]},
            {"request": "control", "command": "finishAfterAllTasksDone"}]


def wait_for(predicate, proc, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            return False
        assert time.monotonic() < deadline, "the pilot did not get going"
        time.sleep(0.005)
    return True


def test_kill_9_at_100_moments_every_task_ends_exactly_once(tmp_path):
    ledger = str(tmp_path / "ledger")
    reqs = tmp_path / "jobs.json"
    reqs.write_text(json.dumps(workflow(ledger)))
    wd = str(tmp_path / "wd")
    rng = random.Random(int(os.environ.get("NRM_TEST_SEED", time.time())))
    kills = 0
    aux = None
    with DaemonProcess() as nrmd:
        args = ["pilot", "--file-path", str(reqs), "--wd", wd, "--nodes", "8"]
        while True:
            proc = nrmd.popen_cli(*args)
            if aux is None:
                def ready():
                    found = glob.glob(os.path.join(wd, ".nrm-pilot-*", "journal.jsonl"))
                    return bool(found) and os.path.getsize(found[0]) > 300
            else:
                def ready(n=kills):
                    try:
                        with open(os.path.join(aux, "service.log")) as f:
                            return f.read().count("resumed from") >= n
                    except OSError:
                        return False
            alive = wait_for(ready, proc)
            if aux is None:
                (aux,) = glob.glob(os.path.join(wd, ".nrm-pilot-*"))
                args = ["pilot", "--resume", aux, "--nodes", "8"]
            if kills == KILLS or not alive:
                break
            time.sleep(rng.uniform(0.0, 0.2))
            if proc.poll() is not None:
                break
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            kills += 1
        assert proc.wait(timeout=60) == 0
    assert kills == KILLS, f"the workflow ended after {kills} kills"
    with open(ledger) as f:
        lines = [line.split() for line in f]
    starts = collections.Counter(name for what, name in lines if what == "start")
    ends = collections.Counter(name for what, name in lines if what == "end")
    names = {f"c{i}" for i in range(121)} | {f"fan:{i}" for i in range(79)}
    assert set(ends) == names and len(names) == 200
    assert [n for n, c in ends.items() if c != 1] == []
    assert [n for n, c in starts.items() if c != 1] == []
    with open(os.path.join(aux, "jobs.report")) as f:
        report = {e["name"]: e for e in map(json.loads, f)}
    assert {e["state"] for e in report.values()} == {"SUCCEED"}
    assert set(report) == names | {"fan"}
