"""Spawning tasks: one fork-exec, the spawner helper processes, and their pool.

Why helper processes: `fork_exec` of a task costs ~550 us of the daemon's
time and cannot run in parallel inside one Python process, so a lone daemon
launches no faster than `Popen` in a loop. nrmd therefore starts N small,
single-threaded *spawners* (one per cpu, at most 4, by default) and hands each
launch to the least loaded one over a socketpair. A spawner joins the
task's cgroups itself (being single-threaded, moving the whole process is
the same as moving the thread, which is also what cgroup v2 requires),
applies affinity, NUMA policy and scheduling class to itself, forks the
task - born inside its slice, no `preexec_fn`, no extra exec - and returns
home. It passes back the pid, a pidfd and the output pipes' read ends with
SCM_RIGHTS.

Who reaps: the spawner is the task's parent, so the spawner reaps it and
sends the wait status to the daemon. If a spawner dies, its requests in
flight fail with a `runtime` error, it is restarted, and its running tasks
(now children of init) are followed through the pidfds the daemon holds:
their exit is seen, their status is lost and reported as 255.

This module imports only the standard library: a spawner starts in ~20 ms
and carries no daemon state.
"""

from __future__ import annotations

import _posixsubprocess
import contextlib
import ctypes
import errno as errno_mod
import marshal
import os
import select
import signal
import socket
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

# -- one fork-exec -----------------------------------------------------------

_devnull = -1


def devnull() -> int:
    global _devnull
    if _devnull < 0:
        _devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    return _devnull


def _executables(argv0: bytes, env: Optional[List[bytes]]) -> Tuple[bytes, ...]:
    if os.path.dirname(argv0):
        return (argv0,)
    path = None
    for entry in env or ():
        if entry.startswith(b"PATH="):
            path = entry[5:]
    dirs = (path.split(b":") if path is not None
            else [os.fsencode(d) for d in os.get_exec_path()])
    return tuple(os.path.join(d, argv0) for d in dirs)


def env_list(env: Dict[str, str]) -> List[bytes]:
    out = []
    for k, v in env.items():
        k = os.fsencode(k)
        if b"=" in k:
            raise ValueError("illegal environment variable name")
        out.append(k + b"=" + os.fsencode(v))
    return out


def _fork_exec_tail(gid, groups, uid) -> tuple:
    """The private fork_exec's last arguments, as this Python's subprocess
    passes them: 3.11 added process_group and allow_vfork (3.11-3.13 agree)."""
    if sys.version_info >= (3, 11):
        return (-1, gid, groups, uid, -1, None, True)
    return (gid, groups, uid, -1, None)


def fork_exec(argv: Sequence, env: Optional[List[bytes]], cwd: Optional[str], capture: bool,
              uid: Optional[int] = None, gid: Optional[int] = None,
              groups: Optional[List[int]] = None) -> Tuple[int, int, int]:
    """Start argv in a new session with stdin on /dev/null; returns
    (pid, stdout read end, stderr read end), the ends -1 without capture.
    Raises OSError as subprocess does when the exec (or the chdir) fails,
    after reaping the failed child."""
    args = [os.fsencode(a) for a in argv]
    executables = _executables(args[0], env)
    out_r = err_r = -1
    if capture:
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
    else:
        out_w = err_w = devnull()
    errpipe_r, errpipe_w = os.pipe2(os.O_CLOEXEC)
    try:
        pid = _posixsubprocess.fork_exec(
            args, executables, True, (errpipe_w,), cwd, env,
            devnull(), -1, -1, out_w, -1, err_w, errpipe_r, errpipe_w,
            True, True, *_fork_exec_tail(gid, groups, uid))
    except BaseException:
        os.close(errpipe_r)
        if capture:
            for fd in (out_r, out_w, err_r, err_w):
                os.close(fd)
        raise
    finally:
        os.close(errpipe_w)
    if capture:
        os.close(out_w)
        os.close(err_w)
    data = b""
    try:
        while True:
            part = os.read(errpipe_r, 50000)
            data += part
            if not part or len(data) > 50000:
                break
    finally:
        os.close(errpipe_r)
    if not data:
        return pid, out_r, err_r
    for fd in (out_r, err_r):
        if fd >= 0:
            os.close(fd)
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass
    name, _, rest = data.partition(b":")
    hex_errno, _, msg = rest.partition(b":")
    num = int(hex_errno or b"0", 16)
    if name != b"OSError" or not num:
        raise OSError(errno_mod.EIO, f"child failed before exec: {data[:200]!r}")
    filename = cwd if msg == b"noexec" else os.fsdecode(args[0])
    raise OSError(num, os.strerror(num), filename)


# -- attributes the child inherits ---------------------------------------------

_MPOL_DEFAULT, _MPOL_BIND = 0, 2
_SYS_set_mempolicy = 238  # x86-64
_PR_SET_PDEATHSIG = 1
_libc = None


def _libc_():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def set_mempolicy(mode: int, nodes) -> bool:
    """Thread memory policy, inherited across fork; False when unavailable."""
    if os.uname().machine != "x86_64":
        return False
    mask = 0
    for n in nodes:
        mask |= 1 << n
    bits = ctypes.c_ulong(mask)
    ptr = ctypes.byref(bits) if mode != _MPOL_DEFAULT else None
    return _libc_().syscall(_SYS_set_mempolicy, mode, ptr, 64 if ptr else 0) == 0


@contextlib.contextmanager
def thread_attributes(cpus, mems, sched):
    """Apply affinity / memory policy / scheduling to this thread, then undo:
    a child forked inside inherits them with no preexec_fn."""
    saved_affinity = os.sched_getaffinity(0) if cpus else None
    saved_sched = None
    mempolicy_set = False
    try:
        if cpus:
            os.sched_setaffinity(0, cpus)
        if mems:
            mempolicy_set = set_mempolicy(_MPOL_BIND, mems)
        if sched is not None:
            policy, priority = sched
            saved_sched = (os.sched_getscheduler(0), os.sched_getparam(0))
            os.sched_setscheduler(0, policy, os.sched_param(priority))
        yield
    finally:
        if saved_sched is not None:
            os.sched_setscheduler(0, saved_sched[0], saved_sched[1])
        if mempolicy_set:
            set_mempolicy(_MPOL_DEFAULT, ())
        if saved_affinity is not None:
            os.sched_setaffinity(0, saved_affinity)


# -- the helper process ------------------------------------------------------

MAX_MSG = 1 << 16          # larger requests travel in a memfd
RECV_FDS = 3
REPLY_TEXT = 1024         # error texts are cut so that a reply always fits
REPLY_MAX = 8192
_MSG_TRUNC = int(socket.MSG_TRUNC)  # an int: `flags & socket.MSG_TRUNC` builds an enum per reply


class _Membership:
    """Open cgroup membership files by path: slots are pooled, so the same
    few paths recur, and an open fd makes a move one write(2)."""

    def __init__(self):
        self.fds: Dict[str, int] = {}

    def write(self, path: str, value: bytes) -> None:
        for attempt in (0, 1):
            fd = self.fds.get(path)
            if fd is None:
                fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
                if len(self.fds) > 512:
                    for old in self.fds.values():
                        os.close(old)
                    self.fds.clear()
                self.fds[path] = fd
            try:
                os.write(fd, value)
                return
            except OSError as exc:
                # a removed cgroup leaves a stale fd (ENODEV): reopen once
                del self.fds[path]
                os.close(fd)
                if attempt or exc.errno not in (errno_mod.ENODEV, errno_mod.ENOENT):
                    raise


def _stage_error(sock, rid, stage: str, exc: BaseException) -> None:
    num = getattr(exc, "errno", None) or 0
    text = (getattr(exc, "strerror", None) or str(exc))[:REPLY_TEXT]
    filename = getattr(exc, "filename", None)
    if isinstance(filename, (str, bytes)):
        filename = filename[:REPLY_TEXT]     # a user's argv[0] may be huge
    _send(sock, ("err", rid, stage, num, text, filename), [])


def _send(sock, msg, fds) -> None:
    data = marshal.dumps(msg)
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.send(data)


def _launch(sock, req: dict, member: _Membership):
    """Join, fork-exec, and the error reply when that fails; None then."""
    rid = req["id"]
    try:
        for path in req.get("join", ()):
            member.write(path, b"0")
        attrs = thread_attributes(req.get("cpus"), req.get("mems"), req.get("sched"))
        attrs.__enter__()
    except Exception as exc:
        _stage_error(sock, rid, "place", exc)
        return None
    try:
        return fork_exec(req["argv"], req["env"], req["cwd"], req["capture"],
                         req.get("uid"), req.get("gid"), req.get("groups"))
    except (OSError, ValueError, TypeError) as exc:
        _stage_error(sock, rid, "exec" if isinstance(exc, OSError) else "invalid", exc)
        return None
    finally:
        attrs.__exit__(None, None, None)


def _handle(sock, req: dict, member: _Membership, children: set) -> None:
    try:
        started = _launch(sock, req, member)
    finally:
        try:
            for path in req.get("home", ()):
                member.write(path, b"0")
        except OSError:
            # never linger inside a container's cgroup: die, the daemon restarts us
            os._exit(3)
    if started is None:
        return
    pid, out_r, err_r = started
    children.add(pid)
    pid_s = str(pid).encode()
    for path in req.get("after", ()):
        try:
            member.write(path, pid_s)
        except OSError:
            pass        # already gone: nothing left to account or freeze
    pidfd = os.pidfd_open(pid)
    fds = [pidfd] + ([out_r, err_r] if out_r >= 0 else [])
    try:
        _send(sock, ("ok", req["id"], pid), fds)
    finally:
        for fd in fds:
            os.close(fd)


def _reap(sock, children: set) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        if pid in children:
            children.discard(pid)
            _send(sock, ("exit", pid, status), [])


def _recv_request(sock) -> Optional[dict]:
    data, fds, _flags, _addr = socket.recv_fds(sock, MAX_MSG, 1)
    if not data and not fds:
        return None
    if fds:
        with os.fdopen(fds[0], "rb") as f:
            data = f.read()
    return marshal.loads(data)


def _noop(*_):
    pass


def serve(fd: int, parent: int) -> int:
    """The helper's loop: requests in, pids and exit statuses out, until
    the daemon closes its end (or dies: PR_SET_PDEATHSIG)."""
    _libc_().prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        return 0
    # handlers, not SIG_IGN: ignored signals would survive into the tasks
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):
        signal.signal(sig, _noop)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    sock = socket.socket(fileno=fd)
    member = _Membership()
    children: set = set()
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    while True:
        try:
            ready = poller.poll()
        except InterruptedError:
            ready = []
        for rfd, _ev in ready:
            if rfd == wake_r:
                try:
                    os.read(wake_r, 4096)
                except BlockingIOError:
                    pass
                continue
            try:
                req = _recv_request(sock)
            except OSError:
                return 0
            if req is None:
                return 0
            try:
                _handle(sock, req, member, children)
            except (BrokenPipeError, ConnectionError):
                return 0
        try:
            _reap(sock, children)
        except (BrokenPipeError, ConnectionError):
            return 0


def _main() -> None:
    sys.exit(serve(int(sys.argv[1]), int(sys.argv[2])))


# -- the daemon's side ---------------------------------------------------------

class SpawnError(Exception):
    """A launch failed; ``stage`` is place, exec or invalid, ``oserror`` the cause."""

    def __init__(self, stage: str, oserror: Optional[OSError], message: str):
        super().__init__(message)
        self.stage = stage
        self.oserror = oserror


class Started:
    __slots__ = ("pid", "pidfd", "stdout", "stderr")

    def __init__(self, pid: int, pidfd: int, stdout: int, stderr: int):
        self.pid, self.pidfd, self.stdout, self.stderr = pid, pidfd, stdout, stderr


class _Helper:
    def __init__(self, index: int, proc: subprocess.Popen, sock: socket.socket):
        self.index = index
        self.proc = proc
        self.sock = sock
        self.pending: Dict[int, Callable] = {}
        self.tasks: set = set()
        self.outq: List[Tuple[bytes, List[int]]] = []
        self.writing = False


RESTARTS_PER_MINUTE = 10


class SpawnerPool:
    """N spawner helpers driven from the daemon's event loop.

    ``on_exit(pid, status)`` receives each task's wait status;
    ``on_lost(pid)`` names a task whose spawner died (its status is lost).
    Requests go to the helper with the fewest in flight.
    """

    def __init__(self, count: int, loop, on_exit: Callable[[int, int], None],
                 on_lost: Callable[[int], None], log=None):
        self.count = count
        self.loop = loop
        self.on_exit = on_exit
        self.on_lost = on_lost
        self.log = log
        self.helpers: List[Optional[_Helper]] = [None] * count
        #: live helpers' pids, shared with the runtime (they pass through cgroups)
        self.helper_pids: set = set()
        self.next_id = 0
        self.closing = False
        self.restarts: List[float] = []
        self.counters = {"spawned": 0, "failed": 0, "helper_deaths": 0, "restarts": 0}

    def start(self) -> None:
        for i in range(self.count):
            self._start_helper(i)

    def alive(self) -> int:
        return sum(1 for h in self.helpers if h is not None)

    def _start_helper(self, index: int) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        code = (f"import sys; sys.path.insert(0, {root!r}); "
                "from nrm.spawner import _main; _main()")
        try:
            proc = subprocess.Popen([sys.executable, "-I", "-c", code, str(theirs.fileno()),
                                     str(os.getpid())], pass_fds=(theirs.fileno(),),
                                    stdin=subprocess.DEVNULL, cwd="/")
        finally:
            theirs.close()
        mine.setblocking(False)
        helper = _Helper(index, proc, mine)
        self.helpers[index] = helper
        self.helper_pids.add(proc.pid)
        self.loop.add_reader(mine.fileno(), self._on_readable, helper)

    # -- requests ----------------------------------------------------------
    def submit(self, request: dict, done: Callable[[object], None]) -> None:
        """Launch; ``done`` later receives a Started or a SpawnError."""
        live = [h for h in self.helpers if h is not None]
        if not live:
            done(SpawnError("place", None, "no spawner is running"))
            return
        helper = min(live, key=lambda h: len(h.pending))
        self.next_id += 1
        request["id"] = self.next_id
        data = marshal.dumps(request)
        fds: List[int] = []
        if len(data) > MAX_MSG:
            fd = os.memfd_create("nrm-spawn", os.MFD_CLOEXEC)
            os.write(fd, data)
            os.lseek(fd, 0, os.SEEK_SET)
            data, fds = b"\0", [fd]
        helper.pending[self.next_id] = done
        helper.outq.append((data, fds))
        self._flush(helper)

    def _flush(self, helper: _Helper) -> None:
        while helper.outq:
            data, fds = helper.outq[0]
            try:
                if fds:
                    socket.send_fds(helper.sock, [data], fds)
                else:
                    helper.sock.send(data)
            except BlockingIOError:
                if not helper.writing:
                    helper.writing = True
                    self.loop.add_writer(helper.sock.fileno(), self._flush, helper)
                return
            except OSError:
                self._died(helper)
                return
            helper.outq.pop(0)
            for fd in fds:
                os.close(fd)
        if helper.writing:
            helper.writing = False
            self.loop.remove_writer(helper.sock.fileno())

    def _on_readable(self, helper: _Helper) -> None:
        while self.helpers[helper.index] is helper:
            try:
                data, fds, flags, _addr = socket.recv_fds(helper.sock, REPLY_MAX, RECV_FDS)
            except BlockingIOError:
                return
            except OSError:
                data, fds, flags = b"", [], 0
            try:
                msg = marshal.loads(data) if data and not flags & _MSG_TRUNC else None
            except (EOFError, ValueError, TypeError):
                msg = None
            if msg is None:
                # gone, or a reply we cannot trust: treat the helper as dead
                for fd in fds:
                    os.close(fd)
                if data:
                    helper.proc.kill()
                self._died(helper)
                return
            self._dispatch(helper, msg, fds)

    def _dispatch(self, helper: _Helper, msg: tuple, fds: List[int]) -> None:
        kind = msg[0]
        if kind == "exit":
            helper.tasks.discard(msg[1])
            self.on_exit(msg[1], msg[2])
            return
        done = helper.pending.pop(msg[1], None)
        if kind == "ok":
            self.counters["spawned"] += 1
            pid = msg[2]
            helper.tasks.add(pid)
            out, err = (fds[1], fds[2]) if len(fds) == 3 else (-1, -1)
            result = Started(pid, fds[0], out, err)
        else:
            self.counters["failed"] += 1
            _, _, stage, num, text, filename = msg
            exc = OSError(num, text, filename) if num else None
            result = SpawnError(stage, exc, text)
        if done is not None:
            done(result)
        elif isinstance(result, Started):
            for fd in fds:
                os.close(fd)

    # -- failure and shutdown ------------------------------------------------
    def _died(self, helper: _Helper) -> None:
        if self.helpers[helper.index] is not helper:
            return
        self.helpers[helper.index] = None
        self.helper_pids.discard(helper.proc.pid)
        self._detach(helper)
        try:
            code = helper.proc.wait(timeout=1)
        except subprocess.TimeoutExpired:
            helper.proc.kill()
            code = helper.proc.wait()
        if not self.closing:
            self.counters["helper_deaths"] += 1
            if self.log is not None:
                self.log.warning("spawner %d (pid %d) died with %s; %d launches failed, "
                                 "%d tasks lose their exit status", helper.index,
                                 helper.proc.pid, code, len(helper.pending), len(helper.tasks))
        for done in helper.pending.values():
            done(SpawnError("place", None, "the spawner died during the launch"))
        helper.pending.clear()
        if self.closing:
            return      # the daemon already ended every container
        for pid in helper.tasks:
            self.on_lost(pid)
        helper.tasks.clear()
        now = time.monotonic()
        self.restarts = [t for t in self.restarts if now - t < 60] + [now]
        if len(self.restarts) > RESTARTS_PER_MINUTE:
            if self.log is not None:
                self.log.error("spawners die repeatedly: not restarting spawner %d",
                               helper.index)
            return
        self.counters["restarts"] += 1
        self._start_helper(helper.index)

    def _detach(self, helper: _Helper) -> None:
        self.loop.remove_reader(helper.sock.fileno())
        if helper.writing:
            self.loop.remove_writer(helper.sock.fileno())
        for _, fds in helper.outq:
            for fd in fds:
                os.close(fd)
        helper.outq.clear()
        helper.sock.close()

    def drain(self, timeout: float = 2.0) -> None:
        """Wait (blocking) for the launches in flight: at shutdown a task
        must not appear after its container was torn down."""
        deadline = time.monotonic() + timeout
        for helper in list(self.helpers):
            while (helper is not None and self.helpers[helper.index] is helper
                   and helper.pending and time.monotonic() < deadline):
                select.select([helper.sock], [], [], max(0.0, deadline - time.monotonic()))
                self._on_readable(helper)

    def close(self) -> None:
        """Stop every helper: closing our end makes it exit; it is waited for."""
        self.closing = True
        for helper in list(self.helpers):
            if helper is not None:
                self._died(helper)


if __name__ == "__main__":
    _main()
