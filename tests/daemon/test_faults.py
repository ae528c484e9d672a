"""Faults a node meets: crashing and daemonizing tasks, unusable runtime
dirs and cgroups, a full disk. Clear errors, safe fallbacks, no crash."""

import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from tests.conftest import EXAMPLES, needs_root
from nrm.tools.localnrmd import nrmd_argv
from tests.nrmd import DaemonProcess, wait_for
from tests.daemon.test_restart import PHASE_SENDER, WHOLE_NODE, _gone

BASIC = os.path.join(EXAMPLES, "basic.yml")
SEGFAULT = "import ctypes; ctypes.string_at(0)"


NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def as_nobody(argv, **kwargs):
    return subprocess.run(NOBODY + argv, capture_output=True, timeout=30, **kwargs)


def _errors(stderr: bytes):
    """The daemon's error lines (its log goes to stderr), and no traceback."""
    text = stderr.decode()
    assert "Traceback" not in text
    return [line.split(": ", 1)[1] for line in text.splitlines() if " ERROR " in line]


def test_a_real_segfault_is_signal_11(daemon):
    r = daemon.cli("run", BASIC, sys.executable, "-c", SEGFAULT)
    assert r.returncode == 139


@needs_root()
@pytest.mark.parametrize("runtime", ["cgroup", "affinity"])
def test_a_task_that_forks_and_exits_leaves_nothing_behind(runtime):
    d = DaemonProcess("--hw", "emulated", "--runtime", runtime).start()
    try:
        r = d.cli("run", BASIC, "sh", "-c", "sleep 600 & echo $!; exit 0")
        assert r.returncode == 0
        orphan = int(r.stdout)
        wait_for(lambda: _gone(orphan), timeout=5)
    finally:
        assert d.stop() == 0


@needs_root()
def test_cgroup_runtime_catches_a_process_that_escapes_its_session():
    d = DaemonProcess("--hw", "emulated", "--runtime", "cgroup").start()
    try:
        r = d.cli("run", BASIC, "sh", "-c", "setsid sleep 600 & echo $!; sleep 0.2; exit 0")
        assert r.returncode == 0
        wait_for(lambda: _gone(int(r.stdout)), timeout=5)
    finally:
        assert d.stop() == 0


@needs_root()
def test_unwritable_runtime_dir_is_one_clear_line(tmp_path):
    forbidden = tmp_path / "private"
    forbidden.mkdir(mode=0o700)
    r = as_nobody(nrmd_argv() + ["--runtime-dir", str(forbidden / "nrm")],
                  env=dict(os.environ, PYTHONPATH=os.getcwd()))
    assert r.returncode != 0
    assert _errors(r.stderr) == [f"cannot use runtime dir {forbidden}/nrm: Permission denied"]


@needs_root()
def test_cgroups_unusable_auto_falls_back_and_cgroup_refuses():
    rundir = tempfile.mkdtemp(prefix="nrmt-nobody-")
    os.chown(rundir, 65534, 65534)
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    try:
        r = as_nobody(nrmd_argv() + ["--runtime-dir", rundir, "--hw", "emulated",
                                     "--runtime", "cgroup"], env=env)
        assert r.returncode != 0
        (err,) = _errors(r.stderr)
        assert err.startswith("runtime cgroup unavailable:") and "not root" in err
        d = DaemonProcess("--hw", "emulated", rundir=rundir, env={"PYTHONPATH": os.getcwd()},
                          wrapper=NOBODY)
        d.log_path = rundir + ".log"
        d.start()
        try:
            status = as_nobody([sys.executable, "-m", "nrm.cli.main", "status", "--json"],
                               env=dict(env, NRM_RUNTIME_DIR=rundir))
            runtime = json.loads(status.stdout)["runtime"]
            assert runtime["name"] == "affinity" and not runtime["isolates_memory"]
            assert any("not root" in n for n in runtime["notes"]), runtime["notes"]
        finally:
            assert d.stop() == 0
            os.unlink(d.log_path)
    finally:
        shutil.rmtree(rundir, ignore_errors=True)


@pytest.fixture
def small_tmpfs():
    path = tempfile.mkdtemp(prefix="nrmt-full-")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", path], check=True)
    yield path
    subprocess.run(["umount", "-l", path], check=False)
    os.rmdir(path)


def _fill(path: str) -> None:
    fd = os.open(os.path.join(path, "filler"), os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)


@needs_root()
def test_full_disk_refuses_unjournaled_control_writes_and_keeps_running(small_tmpfs):
    """With no room to journal a control's original, the control is not
    written (an unjournaled change could outlive a crash); tasks still run."""
    d = DaemonProcess("--hw", "emulated", "--runtime", "cgroup", rundir=small_tmpfs)
    d.log_path = small_tmpfs + ".log"
    d.start()
    try:
        _fill(small_tmpfs)
        assert d.cli("run", "-d", "--container", "pol", WHOLE_NODE,
                     sys.executable, "-c", PHASE_SENDER).returncode == 0
        status = wait_for(lambda: (lambda s: s if s["policy"]["write_errors"] else None)(
            json.loads(d.cli("status", "--json").stdout)), timeout=20)
        assert status["saved_controls"] == {}
        assert status["restart"]["state_log"]["write_errors"] > 0
        plain = d.cli("status").stdout.decode()
        assert "state log: INCOMPLETE" in plain and "control writes refused" in plain, plain
        r = d.cli("run", "--oversubscribe", BASIC, "echo", "still here")
        assert r.stdout == b"still here\n", (r.returncode, r.stderr)
        assert d.cli("kill", "pol").returncode == 0
        assert "refusing the write" in d.log()
    finally:
        rc = d.stop()
        os.unlink(d.log_path)
    assert rc == 0


@needs_root()
@pytest.mark.parametrize("owner, mode", [(65534, 0o700), (0, 0o777)])
def test_a_runtime_dir_others_control_is_refused(owner, mode):
    """nrmd would otherwise chmod another user's dir and open files in it
    that the other user planted: one line, and the dir is left as it was."""
    rundir = tempfile.mkdtemp(prefix="nrmt-theirs-")
    os.chown(rundir, owner, owner)
    os.chmod(rundir, mode)
    try:
        r = subprocess.run(nrmd_argv() + ["--runtime-dir", rundir, "--hw", "emulated"],
                           capture_output=True, timeout=30,
                           env=dict(os.environ, PYTHONPATH=os.getcwd()))
        assert r.returncode != 0
        (err,) = _errors(r.stderr)
        assert err.startswith(f"refusing runtime dir {rundir}"), err
        st = os.stat(rundir)
        assert (st.st_uid, st.st_mode & 0o777) == (owner, mode)
        assert os.listdir(rundir) == []
    finally:
        shutil.rmtree(rundir, ignore_errors=True)


def test_links_planted_in_the_runtime_dir_are_not_followed(tmp_path):
    """The lock, the journal's and the state log's temporary files are never
    opened through a symlink: the files they point to stay untouched."""
    from nrm.hw.journal import Journal
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    rundir = tmp_path / "run"
    rundir.mkdir(mode=0o700)
    os.symlink(victim, rundir / "nrmd.pid")
    r = subprocess.run(nrmd_argv() + ["--runtime-dir", str(rundir), "--hw", "emulated"],
                       capture_output=True, timeout=30,
                       env=dict(os.environ, PYTHONPATH=os.getcwd()))
    assert r.returncode != 0
    (err,) = _errors(r.stderr)
    assert err.startswith(f"cannot open {rundir}/nrmd.pid"), err
    os.unlink(rundir / "nrmd.pid")
    os.symlink(victim, rundir / "controls.journal.tmp")
    Journal(str(rundir / "controls.journal")).rewrite([{"backend": "b", "name": "n", "index": 0}])
    os.symlink(victim, rundir / "state.log.tmp")
    os.symlink(victim, rundir / "state.log")
    d = DaemonProcess("--hw", "emulated", rundir=str(rundir)).start()
    try:
        assert d.cli("run", BASIC, "true").returncode == 0
    finally:
        assert d.stop() == 0
    assert victim.read_text() == "precious\n"
    assert not os.path.islink(rundir / "state.log")
