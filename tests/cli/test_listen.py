"""`nrm listen`: events by topic prefix, an unknown topic refused at once,
and an exit (non-zero) when nrmd goes away, whether it closes the
connection (a crash) or stops answering (heartbeats)."""

import json
import shutil
import signal
import subprocess

import pytest

from tests.nrmd import DaemonProcess, wait_subscribed


@pytest.fixture
def own_daemon():
    """A daemon this test may kill or freeze."""
    d = DaemonProcess("--hw", "emulated", "--sensor-period", "0.1").start()
    yield d
    if d.proc.poll() is None:
        d.proc.send_signal(signal.SIGCONT)
        d.stop()
    shutil.rmtree(d.rundir, ignore_errors=True)


def _listen(d, *args):
    return d.popen_cli("listen", *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.parametrize("prefix", ["", "power", "pow"])
def test_topic_prefixes_still_work(daemon, prefix):
    r = daemon.cli("listen", "--json", "--topic", prefix, "-n", "2", timeout=30)
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stdout.decode().splitlines()]
    assert len(events) == 2 and all(e["topic"].startswith(prefix) for e in events)


def test_an_unknown_topic_is_refused_in_one_line(daemon):
    r = daemon.cli("listen", "--topic", "power", "--topic", "tasks", timeout=30)
    assert r.returncode == 2
    err = r.stderr.decode()
    assert err.count("\n") == 1 and "'tasks'" in err, err
    assert "container, task, power" in err, err


def test_listen_exits_when_nrmd_dies(own_daemon):
    listener = _listen(own_daemon, "--topic", "task")
    wait_subscribed(own_daemon, "task")
    own_daemon.proc.send_signal(signal.SIGKILL)
    own_daemon.proc.wait()
    _, err = listener.communicate(timeout=10)
    assert listener.returncode == 1 and b"lost the connection to nrmd" in err, err


def test_listen_exits_when_nrmd_stops_answering(own_daemon):
    """A frozen nrmd keeps its sockets open: only the heartbeats tell."""
    listener = _listen(own_daemon, "--topic", "task")
    wait_subscribed(own_daemon, "task")
    own_daemon.proc.send_signal(signal.SIGSTOP)
    try:
        _, err = listener.communicate(timeout=15)
    finally:
        own_daemon.proc.send_signal(signal.SIGCONT)
    assert listener.returncode == 1 and b"lost the connection to nrmd" in err, err
