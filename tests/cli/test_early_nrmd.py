"""`nrm pilot`'s private nrmd started before the CLI's imports
(nrm/cli/early.py), and nrmd's --ready-fd that tells its starter it serves."""

from __future__ import annotations

import glob
import json
import os
import pathlib
import shutil
import socket
import subprocess
import tempfile

import pytest

from nrm.cli import early
from nrm.tools.localnrmd import LocalNrmd, nrm_argv, nrmd_argv
from tests.nrmd import REPO, _running


@pytest.mark.parametrize("argv, expected", [
    (["pilot", "--file-path", "j.json", "--wd", "/w", "--nodes", "2"],
     {"--file-path": "j.json", "--wd": "/w", "--nodes": "2"}),
    (["--runtime-dir", "/r", "pilot", "--json", "--file=j.json"],
     {"--runtime-dir": "/r", "--file": "j.json"}),
    (["--uri", "tcp://h:1", "pilot"], {"--uri": "tcp://h:1"}),
    (["pilot", "--resume", "/aux"], {"--resume": "/aux"}),
    (["pilot", "status", "/aux"], None),            # an action: no nrmd needed
    (["pilot", "--file-path", "j.json", "stray"], None),
    (["run", "m.json", "true"], None),
    (["pilot", "--net"], None),                      # serves an API
    (["pilot", "--api-socket", "/s"], None),
    (["pilot", "--enable-proc-stats"], None),         # refused by the pilot
    (["pilot", "-h"], None),
    (["--timeout", "3"], None),                      # no verb
])
def test_which_command_lines_start_early(argv, expected):
    assert early._options(argv) == expected


@pytest.fixture
def tmp_path():
    """Short: a private nrmd's runtime dir is made in it, and a socket's
    path must fit in 108 bytes."""
    path = tempfile.mkdtemp(prefix="nrmt-e-", dir="/tmp")
    yield pathlib.Path(path)
    shutil.rmtree(path, ignore_errors=True)


def _cli(tmp_path, *argv, runtime_dir=None):
    """A real `nrm ARGV` whose temporary dirs (a private nrmd's runtime
    dir) are made under tmp_path/tmp."""
    tmp = tmp_path / "tmp"
    tmp.mkdir(exist_ok=True)
    env = dict(os.environ, TMPDIR=str(tmp), NRM_RUNTIME_DIR=runtime_dir or str(tmp_path / "none"))
    env.pop("SLURM_JOB_ID", None)
    return subprocess.run(nrm_argv() + list(argv), capture_output=True, timeout=120,
                          env=env, cwd=REPO)


def _private_dirs(tmp_path):
    return glob.glob(str(tmp_path / "tmp" / "nrm-pilot-*"))


def _no_daemon_left(rundir: str) -> bool:
    """nrmd removes its pid file when it stops; a pid file left must name
    no live process."""
    try:
        with open(os.path.join(rundir, "nrmd.pid")) as f:
            return not _running(int(f.read().split()[0]))
    except FileNotFoundError:
        return True


def test_a_pilot_that_fails_before_taking_its_early_nrmd_stops_it(tmp_path):
    bad = tmp_path / "jobs.json"
    bad.write_text("[{\"request\": \"submit\",")          # not JSON: exit 2, nothing runs
    r = _cli(tmp_path, "pilot", "--file-path", str(bad), "--wd", str(tmp_path / "wd"),
             "--nodes", "1")
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.decode().strip().splitlines()) == 1, r.stderr
    dirs = _private_dirs(tmp_path)
    assert dirs, "the early path did not start nrmd"
    assert all(_no_daemon_left(d) for d in dirs)


def test_a_pilot_runs_on_its_early_nrmd_and_stops_it(tmp_path):
    jobs = tmp_path / "jobs.json"
    jobs.write_text(json.dumps([{"request": "submit", "jobs": [
        {"name": "a", "execution": {"exec": "true"}, "iteration": {"stop": 3}}]},
        {"request": "control", "command": "finishAfterAllTasksDone"}]))
    r = _cli(tmp_path, "pilot", "--file-path", str(jobs), "--wd", str(tmp_path / "wd"),
             "--nodes", "2")
    assert r.returncode == 0, r.stderr
    (d,) = _private_dirs(tmp_path)
    assert _no_daemon_left(d)
    (log,) = glob.glob(str(tmp_path / "wd" / ".nrm-pilot-*" / "service.log"))
    assert f"started a private one in {d}" in open(log).read()


def test_no_early_nrmd_where_one_accepts(tmp_path):
    rundir = tmp_path / "rd"
    rundir.mkdir()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(rundir / "upstream"))
    listener.listen()
    try:
        early.maybe_start(["--runtime-dir", str(rundir), "pilot", "--resume", "/x"])
        assert early.take() is None
    finally:
        listener.close()


def test_nrmd_tells_its_starter_it_serves(tmp_path):
    (tmp_path / "rd").mkdir()
    d = LocalNrmd(rundir=str(tmp_path / "rd"), prefix="nrmt-").spawn()
    try:
        d.wait_ready(30)
        assert d.ping(5)
    finally:
        assert d.stop() == 0


def test_nrmd_refuses_a_ready_fd_that_is_not_open(tmp_path):
    r = subprocess.run(nrmd_argv() + ["--runtime-dir", str(tmp_path / "rd"),
                                      "--ready-fd", "987"], capture_output=True, timeout=60,
                       cwd=REPO)
    assert r.returncode == 2
    errors = [line for line in r.stderr.decode().splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "--ready-fd 987: not an open file descriptor" in errors[0], errors


def test_a_starter_hears_nrmd_exit_before_ready(tmp_path):
    (tmp_path / "rd").mkdir()
    d = LocalNrmd("--spawners", "-1", rundir=str(tmp_path / "rd"), prefix="nrmt-").spawn()
    with pytest.raises(Exception) as err:
        d.wait_ready(30)
    first = str(err.value).splitlines()[0]
    assert "exited with 2" in first and "--spawners" in first, first
    assert d.proc.returncode == 2
