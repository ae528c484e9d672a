"""A real nrmd in a temporary runtime dir, and checks the tests share."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import List, Optional, Set

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


#: every runtime dir a test daemon ran in (remove_left_cgroups)
RUNDIRS: Set[str] = set()


class DaemonProcess(LocalNrmd):
    """A real nrmd for a test: debug log, runtime dir under /tmp, run from
    the checkout."""

    def __init__(self, *extra: str, rundir: Optional[str] = None, env=None,
                 wrapper: Optional[List[str]] = None):
        super().__init__(*extra, rundir=rundir or tempfile.mkdtemp(prefix="nrmt-", dir="/tmp"),
                         env=env, wrapper=wrapper or (), log_level="debug", cwd=REPO)
        RUNDIRS.add(self.rundir)


def remove_left_cgroups(rundirs) -> int:
    """Remove the empty cgroups of the daemons that ran in ``rundirs``.

    Why: a daemon's cgroups are removed by its own clean stop, or by the
    next daemon on the same runtime dir; a test that SIGKILLs one in a
    temporary runtime dir has neither, and each full run would leave a
    few dozen empty groups on the machine. Groups still holding a task
    are left (rmdir refuses them). Returns how many were removed."""
    from nrm.containers.runtimes.cgroup import own_v1_paths, v1_mounts
    from nrm.daemon.core import _rundir_key
    names = set()
    for rundir in rundirs:
        key = _rundir_key(rundir)
        names.update((f"nrm.{key}", f"nrm.emu.{key}"))
    own = own_v1_paths()
    removed = 0
    for controller, mount in v1_mounts().items():
        homes = {mount, os.path.join(mount, own.get(controller, "/").lstrip("/"))}
        for home in homes:
            for name in names:
                top = os.path.join(home, name)
                if not os.path.isdir(top):
                    continue
                for path, _dirs, _files in os.walk(top, topdown=False):
                    try:
                        os.rmdir(path)
                        removed += 1
                    except OSError:
                        pass
    return removed


def wait_subscribed(daemon: "DaemonProcess", topic: str, timeout: float = 15.0) -> None:
    """PUB/SUB: wait until nrmd has a listener's subscription to ``topic``
    (an event published before it would not reach that listener)."""
    def subscribed():
        r = daemon.cli("status", "--json")
        return r.returncode == 0 and topic in json.loads(r.stdout).get("subscriptions", ())
    wait_for(subscribed, timeout)
