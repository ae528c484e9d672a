"""A private nrmd for the caller's lifetime.

`make run`, the test suite, the benchmarks (and tools that need a daemon
where the node runs none) start nrmd the same way: in a fresh runtime dir of
their own, with its log in a file there, ready once it answers a status
request, stopped with SIGTERM (which restores every hardware control and
kills what it still runs). As a normal user it runs with the affinity
runtime; as root with cgroups. Only the process is started here: nothing
of the daemon is imported, and every request goes through the real sockets.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

from nrm import paths


def nrmd_argv() -> List[str]:
    return [sys.executable, "-m", "nrm.daemon.main"]


def nrm_argv() -> List[str]:
    return [sys.executable, "-m", "nrm.cli.main"]


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


class NrmdDidNotStart(RuntimeError):
    """The private nrmd exited or did not answer in time; the message ends
    with its log."""


class LocalNrmd:
    """One nrmd process in its own runtime dir.

    ``env`` is the environment its clients get (``NRM_RUNTIME_DIR`` points
    at the private dir); ``wrapper`` prefixes nrmd's command line (setpriv,
    to run it as another user)."""

    def __init__(self, *extra: str, rundir: Optional[str] = None,
                 env: Optional[Dict[str, str]] = None, wrapper: Sequence[str] = (),
                 log_level: str = "info", prefix: str = "nrm-", cwd: Optional[str] = None):
        self.rundir = rundir or tempfile.mkdtemp(prefix=prefix)
        self.log_path = os.path.join(self.rundir, "nrmd.log")
        self.seed_uri = "ipc://" + os.path.join(self.rundir, "seed")
        self.args = list(extra)
        self.wrapper = list(wrapper)
        self.log_level = log_level
        self.cwd = cwd
        self.env = dict(os.environ, **(env or {}))
        self.env["NRM_RUNTIME_DIR"] = self.rundir
        self.proc: Optional[subprocess.Popen] = None
        self._log = None
        self._ready_pipe = -1

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc is not None else None

    def start(self, timeout: float = 10.0) -> "LocalNrmd":
        self.spawn()
        try:
            self.wait_ready(timeout)
        except BaseException:       # not ready in time (or interrupted): not left running
            try:
                self.stop(timeout=2.0)
            except subprocess.TimeoutExpired:
                pass
            raise
        return self

    def spawn(self) -> "LocalNrmd":
        """Start the process and return at once; ``wait_ready`` waits for it.
        nrmd tells it is ready through a pipe (``--ready-fd``): no polling."""
        self._log = open(self.log_path, "ab")
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        argv = self.wrapper + nrmd_argv() + [
            "--runtime-dir", self.rundir, "--seed-downstream", self.seed_uri,
            "--log-level", self.log_level, "--ready-fd", str(write_end)] + self.args
        try:
            self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT,
                                         env=self.env, cwd=self.cwd, pass_fds=(write_end,))
        except BaseException:
            os.close(read_end)
            self._log.close()
            self._log = None
            raise
        finally:
            os.close(write_end)
        self._ready_pipe = read_end
        return self

    def wait_ready(self, timeout: float) -> None:
        """Until nrmd serves: its byte on the ready pipe (or, for a daemon
        started without one, its answer to a status request)."""
        pipe, self._ready_pipe = self._ready_pipe, -1
        if pipe < 0:
            return self._wait_answer(timeout)
        try:
            ready, _, _ = select.select([pipe], [], [], timeout)
            told = os.read(pipe, 1) if ready else None
        finally:
            os.close(pipe)
        if told:
            return
        if told is None:
            raise self._did_not_start(f"not ready after {timeout} s")
        try:                        # the pipe closed unwritten: nrmd exited
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        raise self._did_not_start(f"exited with {self.proc.returncode}")

    def _wait_answer(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise self._did_not_start(f"exited with {self.proc.returncode}")
            if self.ping(0.2):
                return
            time.sleep(0.02)
        raise self._did_not_start(f"not ready after {timeout} s")

    def ping(self, timeout: float = 1.0) -> bool:
        """Whether nrmd answers a status request on its upstream socket."""
        import zmq

        from nrm import protocol

        path = paths.upstream_uri(self.rundir)[len("ipc://"):]
        if not os.path.exists(path):
            return False
        s = zmq.Context.instance().socket(zmq.DEALER)
        s.linger = 0
        try:
            s.connect("ipc://" + path)
            s.send(protocol.encode(protocol.Status(id=1)))
            return bool(s.poll(int(timeout * 1000)))
        finally:
            s.close()

    def _did_not_start(self, what: str) -> NrmdDidNotStart:
        """The error: its first line says why (the log's last line, nrmd's
        own error), the rest is the whole log."""
        text = self.log()
        last = text.strip().splitlines()[-1:] or ["(empty log)"]
        return NrmdDidNotStart(f"nrmd {what}: {last[0]}\n{text}")

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def cli(self, *args: str, input=None, timeout: float = 60,
            **kwargs) -> subprocess.CompletedProcess:
        """``nrm ARGS`` against this daemon, output captured."""
        env = dict(self.env, **kwargs.pop("env", {}))
        return subprocess.run(nrm_argv() + list(args), capture_output=True, input=input,
                              timeout=timeout, env=env, **kwargs)

    def popen_cli(self, *args: str, **kwargs) -> subprocess.Popen:
        env = dict(self.env, **kwargs.pop("env", {}))
        return subprocess.Popen(nrm_argv() + list(args), env=env, **kwargs)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then nrmd's exit status (SIGKILL after ``timeout``, and
        TimeoutExpired raised: a daemon that does not stop is a bug)."""
        if self._ready_pipe >= 0:
            os.close(self._ready_pipe)
            self._ready_pipe = -1
        if self.proc is None or self.proc.poll() is not None:
            if self._log is not None:
                self._log.close()
                self._log = None
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            _exited(self.proc, timeout)
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        finally:
            if self._log is not None:
                self._log.close()

    def __enter__(self) -> "LocalNrmd":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def _exited(proc: subprocess.Popen, timeout: float) -> None:
    """Sleep until ``proc`` exits or ``timeout`` passes, woken by its pidfd
    (``Popen.wait`` with a timeout polls, sleeping up to 50 ms at a time)."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):    # no pidfd here, or already reaped
        return
    try:
        select.select([fd], [], [], timeout)
    finally:
        os.close(fd)
