"""SIGKILL of nrmd mid-run: the next start restores controls, then kills or
adopts what the dead daemon left running, and never starts a task twice."""

import contextlib
import json
import os
import signal
import subprocess

import pytest

from tests.conftest import EXAMPLES, needs_root
from tests.nrmd import DaemonProcess, wait_for, wait_subscribed

BASIC = os.path.join(EXAMPLES, "basic.yml")
WHOLE_NODE = os.path.join(EXAMPLES, "ddcm.json")     # asks for 2 cpus


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _crash(d: DaemonProcess) -> None:
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()


@contextlib.contextmanager
def _stopped_on_failure(d: DaemonProcess):
    """Before the deliberate crash, a failing test must not leak its daemon."""
    try:
        yield
    except BaseException:
        d.stop()
        raise


def _listed(d: DaemonProcess):
    return json.loads(d.cli("list", "--json").stdout)


@needs_root()
@pytest.mark.parametrize("runtime", ["cgroup", "affinity"])
def test_restart_after_sigkill_kills_orphans(runtime):
    d = DaemonProcess("--hw", "emulated", "--runtime", runtime).start()
    with _stopped_on_failure(d):
        assert d.cli("run", "-d", "--container", "orphan", BASIC,
                     "sh", "-c", "sleep 600 & exec sleep 601").returncode == 0
        pid = _listed(d)[0]["tasks"][0]["pid"]
        child = wait_for(lambda: open(f"/proc/{pid}/task/{pid}/children").read().split())
        _crash(d)
    assert not _gone(pid)                      # orphaned, still running
    d2 = DaemonProcess("--hw", "emulated", "--runtime", runtime, rundir=d.rundir).start()
    try:
        wait_for(lambda: _gone(pid) and _gone(int(child[0])), timeout=5)
        assert _listed(d2) == []
        assert "killed 2 processes left by a previous nrmd" in d2.log()
        restart = json.loads(d2.cli("status", "--json").stdout)["restart"]
        assert restart["on_restart"] == "kill" and restart["killed"] == 2
        assert "2 processes killed (left by a previous nrmd)" in d2.cli("status").stdout.decode()
    finally:
        assert d2.stop() == 0


@needs_root()
def test_adopt_keeps_the_task_in_its_slice_and_never_restarts_it(tmp_path):
    trigger, starts = tmp_path / "go", tmp_path / "starts"
    script = (f"echo started >> {starts}; while [ ! -e {trigger} ]; do sleep 0.02; done; "
              "echo adopted-output; exec sleep 600")
    d = DaemonProcess("--hw", "emulated", "--runtime", "cgroup").start()
    with _stopped_on_failure(d):
        client = d.popen_cli("run", "--container", "keep", BASIC, "sh", "-c", script,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        wait_for(starts.exists)
        before = _listed(d)[0]
        pid = before["tasks"][0]["pid"]
        _crash(d)
    _, err = client.communicate(timeout=10)       # the client learns it lost nrmd
    assert client.returncode != 0 and b"lost the connection to nrmd" in err
    d2 = DaemonProcess("--hw", "emulated", "--runtime", "cgroup", "--on-restart", "adopt",
                       rundir=d.rundir).start()
    try:
        (after,) = _listed(d2)
        assert after["id"] == "keep"
        assert (after["cpus"], after["mems"]) == (before["cpus"], before["mems"])
        assert [(t["pid"], t["adopted"]) for t in after["tasks"]] == [(pid, True)]
        cpuset = [line for line in open(f"/proc/{pid}/cgroup") if ":cpuset:" in line][0]
        assert f"/s{d2.proc.pid}-" in cpuset          # moved into the new daemon's cgroup
        status = json.loads(d2.cli("status", "--json").stdout)
        assert status["restart"]["containers_adopted"] == 1
        # its cpu is still reserved
        busy = d2.cli("run", WHOLE_NODE, "true")
        assert busy.returncode != 0 and "does not fit" in busy.stderr.decode()
        # its output, which no client reads any more, comes out as events
        listen = d2.popen_cli("listen", "--json", "--topic", "task", "-n", "2",
                              stdout=subprocess.PIPE)
        wait_subscribed(d2, "task")
        trigger.touch()
        wait_for(lambda: "sleep" in open(f"/proc/{pid}/comm").read())
        assert d2.cli("kill", "keep").returncode == 0
        out, _ = listen.communicate(timeout=10)
        events = [json.loads(line) for line in out.decode().splitlines()]
        assert [e["event"] for e in events] == ["output", "exit"]
        assert events[0]["data"] == "adopted-output\n"
        assert events[1]["status"] is None              # not our child: unknown
        wait_for(lambda: _gone(pid))
        assert _listed(d2) == []
        assert starts.read_text() == "started\n"        # never started twice
    finally:
        assert d2.stop() == 0


@needs_root()
def test_adopted_task_exit_ends_its_container(tmp_path):
    gate = tmp_path / "gate"       # the task ends when told, not before the new nrmd is up
    d = DaemonProcess("--hw", "emulated", "--runtime", "affinity").start()
    with _stopped_on_failure(d):
        assert d.cli("run", "-d", "--container", "short", BASIC, "sh", "-c",
                     f"while [ ! -e {gate} ]; do sleep 0.02; done").returncode == 0
        _crash(d)
    d2 = DaemonProcess("--hw", "emulated", "--runtime", "affinity", "--on-restart", "adopt",
                       rundir=d.rundir).start()
    try:
        assert [c["id"] for c in _listed(d2)] == ["short"]
        gate.touch()
        wait_for(lambda: _listed(d2) == [], timeout=10)
        assert d2.cli("run", WHOLE_NODE, "true").returncode == 0     # slice released
    finally:
        assert d2.stop() == 0
    assert not os.path.exists(os.path.join(d.rundir, "state.log"))  # clean stop: nothing left


PHASE_SENDER = """
import time
from nrm.downstream import Client
# one reporter per cpu, as MPI ranks would be: cpu 0 computes all the time,
# cpu 1 half of it, so DDCM slows cpu 1
ranks = [(Client("adoptee"), 0, 200_000_000), (Client("adoptee"), 1, 100_000_000)]
while True:
    for client, cpu, compute in ranks:
        client.phase_context(cpu, compute, 200_000_000)
    time.sleep(0.02)
"""


def _status(d):
    return json.loads(d.cli("status", "--json").stdout)


@needs_root()
def test_policy_controlled_run_survives_a_crash_restored_first_then_adopted():
    """Controls are put back before anything else; the adopted container's
    policy takes over again as soon as its phase contexts reach the new
    daemon (the sender reconnects by itself), and restores at its end."""
    import sys
    d = DaemonProcess("--hw", "emulated", "--runtime", "cgroup").start()
    with _stopped_on_failure(d):
        assert d.cli("run", "-d", "--container", "pol", WHOLE_NODE,
                     sys.executable, "-c", PHASE_SENDER).returncode == 0
        wait_for(lambda: _status(d)["saved_controls"], timeout=20)
        _crash(d)
    d2 = DaemonProcess("--hw", "emulated", "--runtime", "cgroup", "--on-restart", "adopt",
                       rundir=d.rundir).start()
    try:
        log = d2.log()
        restored, adopted = log.find("left by a previous nrmd that did not shut down"), \
            log.find("adopted 1 containers")
        assert 0 <= restored < adopted
        wait_for(lambda: _status(d2)["policy"]["decisions"] > 0, timeout=20)
        assert _status(d2)["saved_controls"]
        assert d2.cli("kill", "pol").returncode == 0
        wait_for(lambda: _listed(d2) == [])
        assert _status(d2)["saved_controls"] == {}
    finally:
        assert d2.stop() == 0


def _cap(d):
    return json.loads(d.cli("power", "--json").stdout)["cap_w"]


@needs_root()
@pytest.mark.parametrize("mode", ["adopt", "kill"])
def test_the_admins_power_cap_survives_a_crash_and_not_a_clean_stop(mode):
    """A crash is nobody's decision to lift the node's cap: the next nrmd,
    whatever --on-restart, puts it back; a clean stop lifts and forgets it."""
    d = DaemonProcess("--hw", "emulated").start()
    with _stopped_on_failure(d):
        assert d.cli("setpower", "35").returncode == 0
        _crash(d)
    d2 = DaemonProcess("--hw", "emulated", "--on-restart", mode, rundir=d.rundir).start()
    try:
        assert _cap(d2) == 35
        assert _status(d2)["restart"]["power_cap_restored_w"] == 35
        assert "put back after the previous nrmd's crash" in d2.cli("status").stdout.decode()
        assert "put back the power cap of 35.0 W" in d2.log()
    finally:
        assert d2.stop() == 0
    d3 = DaemonProcess("--hw", "emulated", "--on-restart", mode, rundir=d.rundir).start()
    try:
        assert _cap(d3) is None                 # d2 stopped cleanly
        assert d3.cli("setpower", "40").returncode == 0
        assert d3.cli("setpower", "off").returncode == 0
        _crash(d3)                              # cleared before the crash: stays cleared
    finally:
        d3.stop()
    d4 = DaemonProcess("--hw", "emulated", "--on-restart", mode, rundir=d.rundir).start()
    try:
        assert _cap(d4) is None
    finally:
        assert d4.stop() == 0


@needs_root()
@pytest.mark.parametrize("record", [b"{\"cap_w\": -5}\n", b"{\"cap_w\": true}\n",
                                    b"not json", b"{\"cap_w\": 1e400}\n"])
def test_a_bad_power_cap_record_is_ignored_in_one_line(record):
    d = DaemonProcess("--hw", "emulated")
    with open(os.path.join(d.rundir, "power_cap.json"), "wb") as f:
        f.write(record)
    d.start()
    try:
        assert _cap(d) is None
        assert "ignoring the power cap record" in d.log() and "Traceback" not in d.log()
    finally:
        assert d.stop() == 0
