"""nrm pilot status / report / --gantt, and the progress output: a real
pilot on a real nrmd, then its directory read from outside."""

from __future__ import annotations

import glob
import io
import json
import os
import time

import pytest

from nrm.pilot.manager import Manager
from nrm.pilot.progress import Progress
from nrm.pilot.jobfile import parse_requests
from nrm.pilot.scheduler import Pool
from tests.nrmd import DaemonProcess


@pytest.fixture(scope="module")
def nrmd():
    with DaemonProcess() as d:
        yield d


def jobs(tmp_path, *specs):
    path = tmp_path / "jobs.json"
    path.write_text(json.dumps([{"request": "submit", "jobs": list(specs)},
                                {"request": "control", "command": "finishAfterAllTasksDone"}]))
    return str(path)


def test_status_report_and_gantt_of_a_finished_pilot(nrmd, tmp_path):
    wd = str(tmp_path / "wd")
    r = nrmd.cli("pilot", "--file-path", jobs(tmp_path, {
        "name": "t", "execution": {"exec": "/bin/true"}, "iteration": {"stop": 20}}),
        "--wd", wd, "--nodes", "2")
    assert r.returncode == 0, r.stderr
    # plain lines without a terminal, the last one at the end
    assert r.stderr.decode().splitlines()[-2].startswith("nrm pilot: 20/20 tasks final")
    st = nrmd.cli("pilot", "status", wd, "--json")
    assert st.returncode == 0, st.stderr
    data = json.loads(st.stdout)
    assert data["Pilot"]["State"] == "finished"
    assert data["IterationStats"]["FinishedIterations"] == 20
    assert data["JobStats"]["FinishedJobs"] == 1
    rep = nrmd.cli("pilot", "report", wd, "--json", "--gantt", str(tmp_path / "g.png"))
    assert rep.returncode == 0, rep.stderr
    data = json.loads(rep.stdout)
    assert data["tasks"] == 20 and 0 < data["core_utilisation"] <= 1
    assert data["launch_to_start"]["median_ms"] >= 0
    assert data["end_to_next_start"]["median_ms"] is not None
    with open(tmp_path / "g.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    text = nrmd.cli("pilot", "report", wd)
    assert b"core utilisation" in text.stdout


def test_a_torn_or_corrupt_journal(nrmd, tmp_path):
    wd = str(tmp_path / "wd")
    r = nrmd.cli("pilot", "--file-path", jobs(tmp_path, {
        "name": "a", "execution": {"exec": "true"}}), "--wd", wd)
    assert r.returncode == 0, r.stderr
    (path,) = glob.glob(os.path.join(wd, ".nrm-pilot-*", "journal.jsonl"))
    with open(path, "a") as f:
        f.write('{"t": "e", "n"')               # a pilot writing, or killed mid-line
    st = nrmd.cli("pilot", "status", wd)
    assert st.returncode == 0 and b"FinishedJobs: 1" in st.stdout, st.stderr
    with open(path, "a") as f:
        f.write('\n{"t": "x"}\n')                # now a bad line before the end
    st = nrmd.cli("pilot", "status", os.path.dirname(path))
    lines = st.stderr.decode().splitlines()
    assert st.returncode == 2 and len(lines) == 1 and "corrupt" in lines[0]
    nothing = nrmd.cli("pilot", "report", str(tmp_path))
    assert nothing.returncode == 2 and b"no pilot here" in nothing.stderr


def test_status_of_a_running_pilot(nrmd, tmp_path):
    wd = str(tmp_path / "wd")
    proc = nrmd.popen_cli("pilot", "--file-path", jobs(tmp_path, {
        "name": "s", "execution": {"exec": "sleep", "args": ["3"]}, "iteration": {"stop": 2}}),
        "--wd", wd, "--nodes", "2")
    try:
        deadline = time.monotonic() + 30
        while True:
            st = nrmd.cli("pilot", "status", wd, "--json")
            if st.returncode == 0:
                data = json.loads(st.stdout)
                if data["IterationStats"]["ExecutingIterations"] == 2:
                    break
            assert time.monotonic() < deadline, st.stderr
            time.sleep(0.1)
        assert data["Pilot"]["State"] == "running"
    finally:
        assert proc.wait(timeout=30) == 0


def test_gantt_without_matplotlib_is_one_line(nrmd, tmp_path):
    wd = str(tmp_path / "wd")
    assert nrmd.cli("pilot", "--file-path", jobs(tmp_path, {
        "name": "a", "execution": {"exec": "true"}}), "--wd", wd).returncode == 0
    shadow = tmp_path / "shadow" / "matplotlib"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('not installed')\n")
    r = nrmd.cli("pilot", "report", wd, "--gantt", str(tmp_path / "g.png"),
                 env={"PYTHONPATH": str(tmp_path / "shadow")})
    lines = r.stderr.decode().splitlines()
    assert r.returncode == 2 and lines == [
        "nrm pilot: report: --gantt needs matplotlib (pip install 'nrm[plot]')"]


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_a_bar_on_a_terminal():
    mgr = Manager(Pool([("n0", 2)]), "/wd")
    for req in parse_requests([{"request": "submit", "jobs": [
            {"name": "t", "execution": {"exec": "x"}, "iteration": {"stop": 4}}]}]).requests:
        mgr.handle(req, 0.0)
    (task, _), _ = mgr.placements(1.0)
    mgr.started(task, 1.0)
    mgr.ended(task, 0, 2.0)
    out = Tty()
    progress = Progress(mgr, out)
    progress.update()
    assert out.getvalue().startswith("\r\x1b[K[") and "1/4 tasks final, 1 running" in \
        out.getvalue()
    progress.stop()
    assert out.getvalue().endswith("\r\x1b[K")
