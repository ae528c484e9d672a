"""`nrm pilot`'s private nrmd started before the CLI's imports
(nrm/cli/early.py), and nrmd's --ready-fd that tells its starter it serves."""

from __future__ import annotations

import argparse
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
from nrm.cli.main import build_parser
from nrm.cli.pilot import NOT_YET
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
    (["--ur=tcp://h:1", "pilot"], None),             # abbreviations argparse would expand
    (["--runtime=/r", "pilot"], None),
    (["pilot", "--file-p", "j.json"], None),
    (["pilot", "--json=1"], None),
])
def test_which_command_lines_start_early(argv, expected):
    assert early._options(argv) == expected


def test_the_option_lists_match_the_parsers():
    """Every name early.py knows is a full option of nrm or nrm pilot, and
    every pilot option it does not know is one that serves an API or that
    the pilot refuses (either way, no early start)."""
    parser = build_parser("pilot")
    globals_ = {o for a in parser._actions for o in a.option_strings}
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    pilot_actions = sub.choices["pilot"]._actions
    valued = {o for a in pilot_actions if a.option_strings and a.nargs != 0
              for o in a.option_strings}
    flags = {o for a in pilot_actions if a.option_strings and a.nargs == 0
             for o in a.option_strings} - {"-h", "--help"}
    assert early.GLOBAL_VALUED <= globals_
    assert early.PILOT_VALUED <= valued and early.PILOT_FLAGS <= flags
    unknown = (valued - early.PILOT_VALUED) | (flags - early.PILOT_FLAGS)
    serving = {o for o in unknown if o.startswith(("--net", "--api-socket"))}
    assert unknown - serving == set(NOT_YET) - serving, unknown - serving


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
    env.pop("NRM_URI", None)
    return subprocess.run(nrm_argv() + list(argv), capture_output=True, timeout=120,
                          env=env, cwd=REPO)


def _private_dirs(tmp_path):
    return _private_dirs_in(tmp_path / "tmp")


def _private_dirs_in(path):
    return glob.glob(str(path / "nrm-pilot-*"))


def _no_daemon_left(rundir: str) -> bool:
    """nrmd removes its pid file when it stops; a pid file left must name
    no live process."""
    try:
        with open(os.path.join(rundir, "nrmd.pid")) as f:
            return not _running(int(f.read().split()[0]))
    except FileNotFoundError:
        return True


def _nrmds_under(path) -> list:
    """Live nrmd processes whose command line names a dir under ``path``."""
    out = []
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"nrm.daemon.main" in argv and any(str(path).encode() in a for a in argv) \
                and _running(int(pid)):
            out.append(int(pid))
    return out


def test_an_unused_early_nrmd_is_stopped_and_its_dir_removed(tmp_path, monkeypatch):
    jobs = tmp_path / "jobs.json"
    jobs.write_text("[]")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("NRM_URI", raising=False)
    tempfile.tempdir = None                               # TMPDIR read again
    try:
        early.maybe_start(["--runtime-dir", str(tmp_path / "none"), "pilot",
                           "--file-path", str(jobs), "--nodes", "1"])
        (rundir,) = _private_dirs_in(tmp_path)
        assert early.take(str(tmp_path / "other")) is None   # not where it looked: discarded
    finally:
        early.discard()
        tempfile.tempdir = None
    assert not os.path.exists(rundir)
    assert _nrmds_under(tmp_path) == []


def test_a_pilot_that_fails_before_taking_its_early_nrmd_stops_it(tmp_path):
    bad = tmp_path / "jobs.json"
    bad.write_text("[{\"request\": \"submit\",")          # not JSON: exit 2, nothing runs
    r = _cli(tmp_path, "pilot", "--file-path", str(bad), "--wd", str(tmp_path / "wd"),
             "--nodes", "1")
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.decode().strip().splitlines()) == 1, r.stderr
    assert _private_dirs(tmp_path) == []                  # stopped, and its dir removed
    assert _nrmds_under(tmp_path) == []


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
        assert early.take(str(rundir)) is None
    finally:
        early.discard()
        listener.close()


def test_nrmd_tells_its_starter_it_serves(tmp_path):
    (tmp_path / "rd").mkdir()
    d = LocalNrmd(rundir=str(tmp_path / "rd"), prefix="nrmt-").spawn()
    try:
        d.wait_ready(30)
        assert d.ping(5)
    finally:
        assert d.stop() == 0


@pytest.mark.parametrize("option, value, why", [
    ("--ready-fd", "987", "--ready-fd 987: not an open file descriptor"),
    ("--ready-fd", "1", "--ready-fd 1: not a pipe"),
    ("--daemon-cpus", "x", "--daemon-cpus 'x': want follow, all or a cpu list"),
    ("--daemon-cpus", "4096", "--daemon-cpus 4096: cpus 4096 are not in nrmd's affinity mask"),
])
def test_nrmd_refuses_a_startup_option_it_cannot_use_in_one_line(tmp_path, option, value, why):
    r = subprocess.run(nrmd_argv() + ["--runtime-dir", str(tmp_path / "rd"), option, value],
                       capture_output=True, timeout=60, cwd=REPO)
    assert r.returncode == 2
    errors = [line for line in r.stderr.decode().splitlines() if " ERROR " in line]
    assert len(errors) == 1 and why in errors[0], errors
    assert "Traceback" not in r.stderr.decode()


def test_a_starter_hears_nrmd_exit_before_ready(tmp_path):
    (tmp_path / "rd").mkdir()
    d = LocalNrmd("--spawners", "-1", rundir=str(tmp_path / "rd"), prefix="nrmt-").spawn()
    with pytest.raises(Exception) as err:
        d.wait_ready(30)
    first = str(err.value).splitlines()[0]
    assert "exited with 2" in first and "--spawners" in first, first
    assert d.proc.returncode == 2
