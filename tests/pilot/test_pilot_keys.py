"""The pilot's two ways to learn what a killed predecessor's launches did
(nrm/pilot/attempts.py): task keys when nrmd keeps them exactly, the fence
process otherwise. Real nrmd, real pilots killed with SIGKILL."""

from __future__ import annotations

import glob
import json
import os
import signal

import pytest

from nrm.client import Client
from tests.nrmd import DaemonProcess, wait_for


def _jobs(tmp_path, ledger):
    slow = f'echo "start $0" >> {ledger}; sleep 5; echo "end $0" >> {ledger}'
    quick = f'echo "start $0" >> {ledger}; echo "end $0" >> {ledger}'
    path = tmp_path / "jobs.json"
    path.write_text(json.dumps([
        {"request": "submit", "jobs": [
            {"name": "slow", "execution": {"exec": "/bin/sh", "args": ["-c", slow, "slow"]}},
            {"name": "quick", "execution": {"exec": "/bin/sh", "args": ["-c", quick, "quick"]}},
            {"name": "after", "execution": {"exec": "/bin/sh", "args": ["-c", quick, "after"]},
             "dependencies": {"after": ["quick"]}}]},
        {"request": "control", "command": "finishAfterAllTasksDone"}]))
    return str(path)


def _assert_each_task_ran_once(ledger, aux):
    """Each task started and ended once (the tasks' own ledger), the slow
    one adopted while it ran, and every job reported SUCCEED."""
    with open(ledger) as f:
        lines = sorted(f.read().split("\n")[:-1])
    assert lines == sorted(f"{w} {n}" for w in ("start", "end")
                           for n in ("slow", "quick", "after"))
    with open(os.path.join(aux, "service.log")) as f:
        log = f.read()
    assert "'adopted_running': 1" in log, log
    with open(os.path.join(aux, "jobs.report")) as f:
        assert {e["state"] for e in map(json.loads, f)} == {"SUCCEED"}


@pytest.mark.parametrize("mode", ["keys", "fence"])
def test_a_resumed_pilot_adopts_what_ran_and_runs_the_rest_once(tmp_path, mode):
    """Killed while ``slow`` runs and ``quick`` has ended: the successor
    adopts both (one by its key, or by its fence file) and every task
    starts and ends once. ``--on-restart adopt`` makes nrmd's keys not
    exact, so that pilot uses the fence."""
    ledger = str(tmp_path / "ledger")
    wd = str(tmp_path / "wd")
    extra = () if mode == "keys" else ("--on-restart", "adopt")
    with DaemonProcess(*extra) as nrmd:
        proc = nrmd.popen_cli("pilot", "--file-path", _jobs(tmp_path, ledger), "--wd", wd,
                              "--nodes", "2")
        wait_for(lambda: os.path.exists(ledger) and "start slow" in open(ledger).read()
                 and "end quick" in open(ledger).read())
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        (aux,) = glob.glob(os.path.join(wd, ".nrm-pilot-*"))
        with open(os.path.join(aux, "journal.jsonl")) as f:
            keyed = any(json.loads(line)["t"] == "keys" for line in f)
        assert keyed == (mode == "keys")
        assert (os.listdir(os.path.join(aux, "runs")) == []) == (mode == "keys")
        r = nrmd.cli("pilot", "--resume", aux, "--nodes", "2")
        assert r.returncode == 0, r.stderr
        with Client(nrmd.rundir) as c:
            assert c.status()["keys"]["keys"] == 0      # the pilot's keys forgotten
    _assert_each_task_ran_once(ledger, aux)


def test_with_nrmd_full_of_keys_the_pilot_launches_under_the_fence(tmp_path):
    """nrmd refuses new keys past its bound (keys a killed pilot left):
    the pilot's launches fall back to the fence and the work gets done."""
    wd = str(tmp_path / "wd")
    path = tmp_path / "jobs.json"
    path.write_text(json.dumps([
        {"request": "submit", "jobs": [{"name": "t", "execution": {"exec": "/bin/true"},
                                        "iteration": {"stop": 3}}]},
        {"request": "control", "command": "finishAfterAllTasksDone"}]))
    with DaemonProcess() as nrmd:
        with Client(nrmd.rundir) as c:
            bound = c.status()["keys"]["max_per_user"]
            for start in range(0, bound, 4096):
                c.claim([f"old.{i}" for i in range(start, min(bound, start + 4096))])
            r = nrmd.cli("pilot", "--file-path", str(path), "--wd", wd, "--nodes", "2")
            assert r.returncode == 0, r.stderr
            assert c.status()["keys"]["keys"] == bound
        (aux,) = glob.glob(os.path.join(wd, ".nrm-pilot-*"))
        assert sorted(os.listdir(os.path.join(aux, "runs"))) == ["1.1", "2.1", "3.1"]
        with open(os.path.join(aux, "service.log")) as f:
            assert "with the fence" in f.read()     # one task, or a batch


def test_a_pilot_that_fell_back_to_the_fence_for_want_of_keys_resumes_exactly_once(tmp_path):
    """nrmd full of keys: the pilot launches under the fence, and is killed
    while ``slow`` runs and ``quick`` has ended. Its successor settles them
    by their files (no room is needed for their keys) and every task starts
    and ends once, without forgetting anything."""
    ledger = str(tmp_path / "ledger")
    wd = str(tmp_path / "wd")
    with DaemonProcess() as nrmd:
        with Client(nrmd.rundir) as c:
            bound = c.status()["keys"]["max_per_user"]
            for start in range(0, bound, 4096):
                c.claim([f"old.{i}" for i in range(start, min(bound, start + 4096))])
            proc = nrmd.popen_cli("pilot", "--file-path", _jobs(tmp_path, ledger), "--wd", wd,
                                  "--nodes", "2")
            wait_for(lambda: os.path.exists(ledger) and "start slow" in open(ledger).read()
                     and "end quick" in open(ledger).read())
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            (aux,) = glob.glob(os.path.join(wd, ".nrm-pilot-*"))
            assert len(os.listdir(os.path.join(aux, "runs"))) >= 2     # under the fence
            r = nrmd.cli("pilot", "--resume", aux, "--nodes", "2")
            assert r.returncode == 0, r.stderr
            assert c.status()["keys"]["keys"] == bound      # the old keys, untouched
            assert c.forget(prefix="old.") == bound
    _assert_each_task_ran_once(ledger, aux)
