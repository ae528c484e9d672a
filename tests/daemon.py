"""A real nrmd in a temporary runtime dir, for tests and benchmarks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import List, Optional

import zmq

from nrm import paths, protocol

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.dirname(sys.executable)


def nrmd_argv() -> List[str]:
    return [sys.executable, "-m", "nrm.daemon.main"]


def nrm_argv() -> List[str]:
    return [sys.executable, "-m", "nrm.cli.main"]


def wait_for(predicate, timeout: float = 15.0, interval: float = 0.02):
    """Poll until ``predicate()`` is truthy; its value, or AssertionError."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")


def spawner_pids(daemon_pid: int) -> List[int]:
    """The daemon's nrm-spawner children. Its tasks are its children too:
    call this with no launch in flight (a task between clone and exec
    still bears the spawner's name)."""
    try:
        with open(f"/proc/{daemon_pid}/task/{daemon_pid}/children") as f:
            kids = [int(p) for p in f.read().split()]
    except OSError:
        return []
    out = []
    for kid in kids:
        try:
            with open(f"/proc/{kid}/comm") as f:
                if f.read().strip() == "nrm-spawner":
                    out.append(kid)
        except OSError:
            pass
    return out


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


class DaemonProcess:
    def __init__(self, *extra: str, rundir: Optional[str] = None, env=None,
                 wrapper: Optional[List[str]] = None):
        self.rundir = rundir or tempfile.mkdtemp(prefix="nrmt-", dir="/tmp")
        self.log_path = os.path.join(self.rundir, "nrmd.log")
        self.seed_uri = "ipc://" + os.path.join(self.rundir, "seed")
        self.args = list(extra)
        self.wrapper = list(wrapper or [])     # e.g. setpriv, to run as another user
        self.env = dict(os.environ, **(env or {}))
        self.env["NRM_RUNTIME_DIR"] = self.rundir
        self.proc: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 10.0) -> "DaemonProcess":
        argv = self.wrapper + nrmd_argv() + [
            "--runtime-dir", self.rundir, "--seed-downstream", self.seed_uri,
            "--log-level", "debug"] + self.args
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=self.env, cwd=REPO)
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nrmd exited with {self.proc.returncode}:\n{self.log()}")
            if self.ping(0.2):
                return
            time.sleep(0.02)
        raise RuntimeError(f"nrmd not ready after {timeout} s:\n{self.log()}")

    def ping(self, timeout: float = 1.0) -> bool:
        path = paths.upstream_uri(self.rundir)[len("ipc://"):]
        if not os.path.exists(path):
            return False
        ctx = zmq.Context.instance()
        s = ctx.socket(zmq.DEALER)
        s.linger = 0
        try:
            s.connect("ipc://" + path)
            s.send(protocol.encode(protocol.Status(id=1)))
            return bool(s.poll(int(timeout * 1000)))
        finally:
            s.close()

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def cli(self, *args: str, input=None, timeout: float = 60, **kwargs):
        env = dict(self.env, **kwargs.pop("env", {}))
        return subprocess.run(nrm_argv() + list(args), capture_output=True, input=input,
                              timeout=timeout, env=env, **kwargs)

    def popen_cli(self, *args: str, **kwargs) -> subprocess.Popen:
        env = dict(self.env, **kwargs.pop("env", {}))
        return subprocess.Popen(nrm_argv() + list(args), env=env, **kwargs)

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        finally:
            self._log.close()
