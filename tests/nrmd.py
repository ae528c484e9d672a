"""A real nrmd in a temporary runtime dir, and checks the tests share."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import List, Optional

from nrm.tools.localnrmd import LocalNrmd

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.dirname(sys.executable)


def wait_for(predicate, timeout: float = 15.0, interval: float = 0.02):
    """Poll until ``predicate()`` is truthy; its value, or AssertionError."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")


CTRL_C_SCRIPT = """
import signal, sys, time
signal.signal(signal.SIGINT, lambda *a: (print("got INT", flush=True), sys.exit(42)))
print("ready", flush=True)
time.sleep(60)
"""


def check_ctrl_c_reaches_the_task(daemon: "DaemonProcess", manifest: str) -> None:
    """`nrm run` forwards the client's SIGINT: the task's handler runs."""
    p = daemon.popen_cli("run", manifest, sys.executable, "-c", CTRL_C_SCRIPT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout.readline() == b"ready\n"
    p.send_signal(signal.SIGINT)
    out, _ = p.communicate(timeout=10)
    assert out == b"got INT\n" and p.returncode == 42


def check_client_death_kills_the_task(daemon: "DaemonProcess", manifest: str) -> None:
    """A client killed while its task runs takes the task and its
    container with it (unless it ran with --detach)."""
    def orphan():
        listed = json.loads(daemon.cli("list", "--json").stdout)
        return [c for c in listed if c["id"] == "orphan"]
    p = daemon.popen_cli("run", "--container", "orphan", manifest, "sleep", "600",
                         stdout=subprocess.PIPE)
    wait_for(lambda: orphan() and orphan()[0]["tasks"])
    pid = orphan()[0]["tasks"][0]["pid"]
    p.kill()
    p.wait()
    wait_for(lambda: not orphan())
    wait_for(lambda: not _running(pid))


def _running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class DaemonProcess(LocalNrmd):
    """A real nrmd for a test: debug log, runtime dir under /tmp, run from
    the checkout."""

    def __init__(self, *extra: str, rundir: Optional[str] = None, env=None,
                 wrapper: Optional[List[str]] = None):
        super().__init__(*extra, rundir=rundir or tempfile.mkdtemp(prefix="nrmt-", dir="/tmp"),
                         env=env, wrapper=wrapper or (), log_level="debug", cwd=REPO)


def wait_subscribed(daemon: "DaemonProcess", topic: str, timeout: float = 15.0) -> None:
    """PUB/SUB: wait until nrmd has a listener's subscription to ``topic``
    (an event published before it would not reach that listener)."""
    def subscribed():
        r = daemon.cli("status", "--json")
        return r.returncode == 0 and topic in json.loads(r.stdout).get("subscriptions", ())
    wait_for(subscribed, timeout)
