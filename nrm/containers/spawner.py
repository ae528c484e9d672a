"""Spawning tasks: one fork-exec, the spawner helper processes, and their pool.

Why helper processes: `fork_exec` of a task costs ~550 us of the daemon's
time and cannot run in parallel inside one Python process, so a lone daemon
launches no faster than `Popen` in a loop. nrmd therefore starts N small,
single-threaded *spawners* (one per cpu, at most 4, by default) and hands each
launch to the least loaded one over a socketpair.

A spawner is `nrm-spawner` (libnrm/src/spawner.c), built and installed with
libnrm. Its vfork child places itself - cgroup membership files, affinity,
NUMA policy, scheduling class, then credentials - and execs: the task is
born inside its slice, with no `preexec_fn` and no extra exec, and the
spawner itself never leaves its own cgroups. It passes back the pid, a pidfd
and the output pipes' read ends with SCM_RIGHTS. The wire format is below.

Where spawners run: each has a *home*, a contiguous share of the daemon's
cpus, and a launch goes to the spawner whose home holds the slice's first
cpu unless that one is busier than another. Its child is then born on a cpu
of its slice, so joining the cpuset (or taking the affinity) moves nothing:
no stop-machine migration per task, and the launch work for a slot runs on
the cpu that slot's previous task has just freed instead of piling onto the
cpu that runs nrmd. The child never keeps the home: a request without cpus
gets the daemon's whole set (measured in docs/performance.md).

Who reaps: the daemon. The spawner's child is made with CLONE_PARENT, so
every task is the daemon's own child, reaped through the pidfd the spawner
passes back: a task's exit wakes the daemon directly, and a spawner that
dies costs its running tasks nothing. Its requests in flight fail with a
`runtime` error and it is restarted.

`fork_exec` and `thread_attributes` are the in-process launch path
(`nrmd --spawners 0`).
"""

from __future__ import annotations

import _posixsubprocess
import contextlib
import ctypes
import errno as errno_mod
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from nrm.paths import find_spawner

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


_FS_ENCODING, _FS_ERRORS = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()


def env_list(env: Dict[str, str]) -> List[bytes]:
    """``KEY=value`` entries as exec wants them, encoded as os.fsencode
    does. Every launch pays this for its whole environment (a pilot task
    sends its client's, some 50 entries): the entries are joined, encoded
    and split in three C calls (~3x faster than an encode per entry), and
    anything unusual (a NUL inside, a key with '=', a value that is no
    str) takes the entry-by-entry path, which raises ValueError for a key
    holding '=' and TypeError for a value that is no str."""
    if not env:
        return []
    try:
        text = "\0".join(map("=".join, env.items()))
        if "=" not in "".join(env) and text.count("\0") == len(env) - 1:
            return text.encode(_FS_ENCODING, _FS_ERRORS).split(b"\0")
    except TypeError:
        pass
    out = []
    for k, v in env.items():
        if "=" in k:
            raise ValueError("illegal environment variable name")
        out.append((k + "=" + v).encode(_FS_ENCODING, _FS_ERRORS))
    return out


class BaseEnv:
    """An environment shared by many launches (a batch's base): encoded
    once per set of names the launches set over it, not once per launch
    (a pilot's is some 50 variables: merging, filtering and encoding it
    was ~20 us per task). ``NRM_INWAIT_*`` are dropped here: only nrmd
    sets them (nrm/daemon/taskenv.py)."""

    __slots__ = ("env", "_lists")

    def __init__(self, env: Dict[str, str]):
        self.env = {k: v for k, v in env.items() if not k.startswith("NRM_INWAIT_")}
        self._lists: Dict[frozenset, List[bytes]] = {}

    def entries(self, without: frozenset) -> List[bytes]:
        """The encoded entries but those named in ``without`` (ValueError,
        TypeError as ``env_list``)."""
        out = self._lists.get(without)
        if out is None:
            if len(self._lists) >= 16:
                self._lists.clear()
            out = env_list({k: v for k, v in self.env.items() if k not in without})
            self._lists[without] = out
        return out


class SplitEnv:
    """One launch's environment: ``extra`` over a shared ``base``."""

    __slots__ = ("base", "extra")

    def __init__(self, base: BaseEnv, extra: Dict[str, str]):
        self.base = base
        self.extra = extra

    def merged(self) -> Dict[str, str]:
        return {**self.base.env, **self.extra}


def fs_encoded(strings: Sequence) -> List[bytes]:
    """``[os.fsencode(s) for s in strings]``, in three C calls when every
    item is a str without a NUL (argv, per launch), else item by item."""
    try:
        text = "\0".join(strings)
    except TypeError:
        return [os.fsencode(s) for s in strings]
    if not strings or text.count("\0") != len(strings) - 1:
        return [os.fsencode(s) for s in strings]
    return text.encode(_FS_ENCODING, _FS_ERRORS).split(b"\0")


def _fork_exec_tail(gid, groups, uid) -> tuple:
    """The private fork_exec's last arguments, as this Python's subprocess
    passes them: 3.11 added process_group and allow_vfork (3.11-3.13 agree)."""
    if sys.version_info >= (3, 11):
        return (-1, gid, groups, uid, -1, None, True)
    return (gid, groups, uid, -1, None)


_CATCHABLE = tuple(sorted(set(signal.valid_signals()) - {signal.SIGKILL, signal.SIGSTOP}))


def _ignored_signals() -> Tuple[int, ...]:
    """Signals this process ignores: SIG_IGN survives exec, and nrmd started
    from a script (`nrmd &`) or under nohup ignores SIGINT, SIGQUIT or
    SIGHUP, which would leave its tasks deaf to the client's Ctrl-C."""
    return tuple(s for s in _CATCHABLE if signal.getsignal(s) == signal.SIG_IGN)


def _default_dispositions(signals: Tuple[int, ...]):
    """A preexec_fn (costs the vfork fast path: only used when needed) that
    puts ``signals`` back to their default in the child, through libc, as
    the child may be forked from any thread."""
    libc_signal = ctypes.CDLL(None, use_errno=True).signal
    libc_signal.restype = ctypes.c_void_p
    libc_signal.argtypes = (ctypes.c_int, ctypes.c_void_p)

    def reset():
        for sig in signals:
            libc_signal(sig, 0)       # SIG_DFL
    return reset


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
        tail = _fork_exec_tail(gid, groups, uid)
        ignored = _ignored_signals()
        if ignored:     # preexec_fn is the tail's last item but, from 3.11, one
            at = len(tail) - (2 if sys.version_info >= (3, 11) else 1)
            tail = tail[:at] + (_default_dispositions(ignored),) + tail[at + 1:]
        pid = _posixsubprocess.fork_exec(
            args, executables, True, (errpipe_w,), cwd, env,
            devnull(), -1, -1, out_w, -1, err_w, errpipe_r, errpipe_w,
            True, True, *tail)
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
#
# The helper is libnrm/src/spawner.c (`nrm-spawner FD PARENT_PID`). Wire format,
# little-endian host order, one SOCK_SEQPACKET message each way:
#
#   request  header (64 bytes): magic "NRMS" (u32 0x4e524d53), flags (u32, 1 =
#            capture output, 2 = after a predecessor), id (u64), uid, gid,
#            sched policy, sched priority (i32, -1 = unchanged), then u32
#            counts: groups, cpus, mems, argv, executables, env, membership
#            files, and "after" strings (1 with flag 2, else 0); then the i32
#            groups, cpus and mems; then NUL-terminated strings: cwd (empty =
#            unchanged), argv, the executables to try in order, env, the
#            cgroup membership files the child writes "0" into before it
#            execs, and with flag 2 the predecessor's cgroup process list.
#            Flag 2 requests carry the predecessor's pidfd (SCM_RIGHTS) and
#            are held until it is readable, then launched only if that
#            process list is empty (else answered stage 4, occupied).
#            Larger than MAX_MSG: a one-byte message carries a memfd holding
#            it, after the pidfd if there is one.
#   cancel   16 bytes: magic "NRMC" (u32 0x4e524d43), u32 0, the id (u64) of a
#            held request; answered stage 5 (cancelled), or not at all when
#            the request was launched already (its answer came first).
#   reply    40 bytes: kind (u32: 0 hello, 1 ok, 2 error, 3 reap), pid (i32),
#            id (u64; the protocol version in hello), stage (1 place, 2 exec,
#            3 invalid, 4 occupied, 5 cancelled), errno, what a failure names (1 the program, 2 the
#            cwd), reserved - all i32; then the task's start time (u64, clock
#            ticks since boot as in /proc/<pid>/stat, 0 when unknown: the
#            spawner brackets clone with CLOCK_BOOTTIME reads and reports the
#            tick only when both agree). At most 64 membership files, and the
#            first reply is a hello. An ok reply carries the task's
#            pidfd and, with capture, the stdout and stderr read ends
#            (SCM_RIGHTS). A reap reply carries the pidfd of a child that
#            failed before exec: the daemon's zombie, for it to reap.

PROTOCOL = 4
#: nrm-spawner ships with nrm, whether installed by pip or built in a checkout
REINSTALL_HINT = ("%s: reinstall nrm (pip install --force-reinstall nrm, "
                  "or make setup in a checkout)")
MAGIC = 0x4E524D53
CANCEL_MAGIC = 0x4E524D43
MAX_MSG = 1 << 16          # larger requests travel in a memfd
RECV_FDS = 3
_FLAG_CAPTURE, _FLAG_AFTER = 1, 2
_CANCEL = struct.Struct("=IIQ")
_HEADER = struct.Struct("=IIQiiiiIIIIIIII")
_REPLY = struct.Struct("=IiQiiiiQ")
_HELLO, _OK, _ERR, _REAP = 0, 1, 2, 3
_STAGES = {1: "place", 2: "exec", 3: "invalid", 4: "occupied", 5: "cancelled"}
_FDS_ALLOWED = {_HELLO: (0,), _OK: (1, 3), _ERR: (0,), _REAP: (1,)}   # fds each reply carries
_MSG_TRUNC = int(socket.MSG_TRUNC)  # an int: `flags & socket.MSG_TRUNC` builds an enum per reply


def encode_request(rid: int, req: dict,
                   default_cpus: Sequence[int] = ()) -> Tuple[bytes, bytes, Optional[bytes]]:
    """(message, argv[0], cwd) for a launch request; ValueError when it
    cannot travel (a NUL inside a string, as exec itself would refuse).
    ``default_cpus`` is the affinity of a request that names none."""
    argv = fs_encoded(req["argv"])
    env = req["env"]
    if env is None:
        env = [k + b"=" + v for k, v in os.environb.items()]
    cwd = os.fsencode(req["cwd"]) if req.get("cwd") else b""
    files = fs_encoded(req.get("join", ()))
    after = [os.fsencode(req["after"])] if req.get("after") else []
    executables = _executables(argv[0], env)
    strings = [cwd, *argv, *executables, *env, *files, *after]
    body = b"\0".join(strings) + b"\0"
    if body.count(b"\0") != len(strings):
        raise ValueError("embedded null byte")
    uid, gid = req.get("uid"), req.get("gid")
    groups = list(req.get("groups") or ()) if gid is not None else []
    cpus, mems = list(req.get("cpus") or default_cpus), list(req.get("mems") or ())
    policy, priority = req.get("sched") or (-1, 0)
    ints = groups + cpus + mems
    flags = (_FLAG_CAPTURE if req["capture"] else 0) | (_FLAG_AFTER if after else 0)
    header = _HEADER.pack(MAGIC, flags, rid,
                          -1 if uid is None else uid, -1 if gid is None else gid,
                          policy, priority, len(groups), len(cpus), len(mems), len(argv),
                          len(executables), len(env), len(files), len(after))
    return (header + struct.pack(f"={len(ints)}i", *ints) + body,
            argv[0], cwd or None)


# -- the daemon's side ---------------------------------------------------------

class SpawnError(Exception):
    """A launch failed; ``stage`` is place, exec or invalid, ``oserror`` the cause."""

    def __init__(self, stage: str, oserror: Optional[OSError], message: str):
        super().__init__(message)
        self.stage = stage
        self.oserror = oserror


class Started:
    """``start``: the task's start time in clock ticks since boot (its
    identity, with the pid, in the state log), None when unknown."""
    __slots__ = ("pid", "pidfd", "stdout", "stderr", "start")

    def __init__(self, pid: int, pidfd: int, stdout: int, stderr: int,
                 start: Optional[int] = None):
        self.pid, self.pidfd, self.stdout, self.stderr = pid, pidfd, stdout, stderr
        self.start = start


class _Helper:
    def __init__(self, index: int, proc: subprocess.Popen, sock: socket.socket):
        self.index = index
        self.proc = proc
        self.sock = sock
        self.greeted = False
        #: request id -> (done, argv[0], cwd): replies carry no strings
        self.pending: Dict[int, Tuple[Callable, bytes, Optional[bytes]]] = {}
        self.outq: List[Tuple[bytes, List[int]]] = []
        self.writing = False
        #: ids of requests held until a predecessor exits (not load: they wait)
        self.held: set = set()


def home_cpus(cpus: Sequence[int], count: int) -> List[List[int]]:
    """Each spawner's home: near-equal shares of ``cpus``, contiguous in
    cpu number; with more spawners than cpus, homes of one cpu each,
    repeated."""
    cpus = sorted(cpus)
    n = len(cpus)
    if not n:
        return [[] for _ in range(count)]
    if count >= n:
        return [[cpus[i % n]] for i in range(count)]
    return [cpus[i * n // count:(i + 1) * n // count] for i in range(count)]


def choose_helper(loads: Sequence[Optional[int]], homes: Sequence[Sequence[int]],
                  near: Optional[int]) -> Optional[int]:
    """The spawner for a launch onto cpu ``near``: the least loaded
    (launches in flight), a spawner at home on ``near`` counting one
    launch less and winning ties. ``None`` loads are dead spawners."""
    best, best_key = None, None
    for i, load in enumerate(loads):
        if load is None:
            continue
        home = near is not None and near in homes[i]
        key = (load - (1 if home else 0), 0 if home else 1)
        if best_key is None or key < best_key:
            best, best_key = i, key
    return best


RESTARTS_PER_MINUTE = 10
HELLO_TIMEOUT_S = 5.0


class SpawnerPool:
    """N spawner helpers driven from the daemon's event loop.

    Requests go to the helper with the fewest in flight. A Started task is
    the caller's child: the caller reaps it (its pidfd becomes readable).
    """

    def __init__(self, count: int, loop, log=None):
        self.count = count
        self.loop = loop
        self.log = log
        self.cpus = sorted(os.sched_getaffinity(0))
        self.homes = home_cpus(self.cpus, count)
        self.helpers: List[Optional[_Helper]] = [None] * count
        self.next_id = 0
        self.closing = False
        self.restarts: List[float] = []
        self.counters = {"spawned": 0, "failed": 0, "helper_deaths": 0, "restarts": 0}

    def start(self) -> None:
        """Start every helper and wait for each to say hello: a missing or
        stale nrm-spawner is an error here, at startup, not at first launch."""
        for i in range(self.count):
            self._start_helper(i)
        deadline = time.monotonic() + HELLO_TIMEOUT_S
        for helper in self.helpers:
            while helper is not None and not helper.greeted:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([helper.sock], [], [], left)[0]:
                    raise OSError(errno_mod.ETIMEDOUT, "nrm-spawner did not answer")
                self._on_readable(helper)
                if self.helpers[helper.index] is not helper:
                    raise OSError(errno_mod.EPROTO, "nrm-spawner exited at startup "
                                  f"(protocol {PROTOCOL} expected)")

    def alive(self) -> int:
        return sum(1 for h in self.helpers if h is not None)

    def _start_helper(self, index: int) -> None:
        program = find_spawner()
        if program is None:
            raise OSError(errno_mod.ENOENT, REINSTALL_HINT % "nrm-spawner not found")
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            proc = subprocess.Popen([program, str(theirs.fileno()), str(os.getpid())],
                                    pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                                    cwd="/", env={})
        finally:
            theirs.close()
        try:
            os.sched_setaffinity(proc.pid, self.homes[index])
        except OSError as exc:      # a home cpu went offline: it runs anywhere
            if self.log is not None:
                self.log.warning("spawner %d stays unpinned: %s", index, exc)
            with contextlib.suppress(OSError):  # not on the cpus nrmd's threads keep to
                os.sched_setaffinity(proc.pid, self.cpus)
        mine.setblocking(False)
        helper = _Helper(index, proc, mine)
        self.helpers[index] = helper
        self.loop.add_reader(mine.fileno(), self._on_readable, helper)

    # -- requests ----------------------------------------------------------
    def submit(self, request: dict, done: Callable[[object], None],
               near: Optional[int] = None, after: Optional[int] = None) -> Optional[int]:
        """Launch; ``done`` later receives a Started or a SpawnError.
        ``near`` is a cpu of the task's slice, to launch from there.

        With ``after`` (a pidfd) and ``request["after"]`` (that process's
        cgroup process list), the launch is held by the spawner until the
        process exits, and happens then only if the list is empty: else
        ``done`` gets a SpawnError of stage ``occupied``. Returns the id to
        ``cancel`` it with (None when it failed at once)."""
        index = choose_helper([None if h is None else len(h.pending) - len(h.held)
                               for h in self.helpers], self.homes, near)
        if index is None:
            done(SpawnError("place", None, "no spawner is running"))
            return None
        helper = self.helpers[index]
        self.next_id += 1
        try:
            data, argv0, cwd = encode_request(self.next_id, request, self.cpus)
        except (ValueError, TypeError) as exc:
            self.loop.call_soon(done, SpawnError("invalid", None, str(exc)))
            return None
        fds: List[int] = []     # ours, closed once sent
        if len(data) > MAX_MSG:
            fd = os.memfd_create("nrm-spawn", os.MFD_CLOEXEC)
            os.write(fd, data)
            data = b"\0"
            fds.append(fd)
        helper.pending[self.next_id] = (done, argv0, cwd)
        if after is not None:
            helper.held.add(self.next_id)
            if not helper.outq and self._send_borrowing(helper, data, after, fds):
                return self.next_id
            fds.insert(0, os.dup(after))    # queued: the caller's pidfd may close first
        helper.outq.append((data, fds))
        self._flush(helper)
        return self.next_id

    def _send_borrowing(self, helper: _Helper, data: bytes, pidfd: int,
                        fds: List[int]) -> bool:
        """Send now with the caller's pidfd itself, open until we return (a
        dup and a close per promised launch saved); False when the socket
        is full and the request must be queued."""
        try:
            socket.send_fds(helper.sock, [data], [pidfd] + fds)
        except BlockingIOError:
            return False
        except OSError:
            for fd in fds:
                os.close(fd)
            self._died(helper)
            return True
        for fd in fds:
            os.close(fd)
        return True

    def cancel(self, rid: int) -> None:
        """Take back a held launch: its ``done`` gets a SpawnError of stage
        ``cancelled``, or its outcome if the spawner launched it first."""
        for helper in self.helpers:
            if helper is not None and rid in helper.held:
                helper.outq.append((_CANCEL.pack(CANCEL_MAGIC, 0, rid), []))
                self._flush(helper)
                return

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
                data, fds, flags, _addr = socket.recv_fds(helper.sock, _REPLY.size + 1,
                                                          RECV_FDS)
            except BlockingIOError:
                return
            except OSError:
                data, fds, flags = b"", [], 0
            msg = self._trusted(helper, data, flags, fds)
            if msg is None:
                # gone, or a reply we cannot trust: treat the helper as dead
                for fd in fds:
                    os.close(fd)
                if data:
                    helper.proc.kill()
                self._died(helper)
                return
            self._dispatch(helper, msg, fds)

    def _trusted(self, helper: _Helper, data: bytes, flags: int, fds: List[int]):
        """The reply, or None: a hello first and only first, in our
        protocol; an ok with 1 or 3 fds, a reap with 1, an error with none."""
        if len(data) != _REPLY.size or flags & _MSG_TRUNC:
            return None
        msg = _REPLY.unpack(data)
        kind = msg[0]
        if (kind == _HELLO) == helper.greeted:
            return None
        if kind == _HELLO and msg[2] != PROTOCOL:
            if self.log is not None:
                self.log.error(REINSTALL_HINT, f"nrm-spawner speaks protocol {msg[2]}, "
                               f"nrmd {PROTOCOL}")
            return None
        return msg if len(fds) in _FDS_ALLOWED.get(kind, ()) else None

    def _dispatch(self, helper: _Helper, msg: tuple, fds: List[int]) -> None:
        kind, pid, rid, stage, num, what, _reserved, start = msg
        if kind == _HELLO:
            helper.greeted = True
            return
        if kind == _REAP:
            self._reap_failed(pid, fds[0])
            return
        done, argv0, cwd = helper.pending.pop(rid, (None, b"", None))
        helper.held.discard(rid)
        if kind == _OK:
            self.counters["spawned"] += 1
            out, err = (fds[1], fds[2]) if len(fds) == 3 else (-1, -1)
            result = Started(pid, fds[0], out, err, start or None)
        else:
            self.counters["failed"] += 1
            filename = (os.fsdecode(argv0) if what == 1 else
                        os.fsdecode(cwd) if what == 2 and cwd else None)
            text = os.strerror(num) if num else "failed"
            exc = OSError(num, text, filename) if num else None
            result = SpawnError(_STAGES.get(stage, "invalid"), exc, text)
        if done is not None:
            done(result)
        elif isinstance(result, Started):
            for fd in fds:
                os.close(fd)

    def _reap_failed(self, pid: int, pidfd: int) -> None:
        """A child that never exec'd: reap it once it is a zombie."""
        def reap():
            self.loop.remove_reader(pidfd)
            os.close(pidfd)
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        try:
            gone = os.waitpid(pid, os.WNOHANG)[0] != 0
        except ChildProcessError:
            gone = True
        if gone:
            os.close(pidfd)
        else:
            self.loop.add_reader(pidfd, reap)

    # -- failure and shutdown ------------------------------------------------
    def _died(self, helper: _Helper) -> None:
        if self.helpers[helper.index] is not helper:
            return
        self.helpers[helper.index] = None
        self._detach(helper)
        try:
            code = helper.proc.wait(timeout=1)
        except subprocess.TimeoutExpired:
            helper.proc.kill()
            code = helper.proc.wait()
        if not self.closing:
            self.counters["helper_deaths"] += 1
            if self.log is not None:
                self.log.warning("spawner %d (pid %d) died with %s; %d launches failed",
                                 helper.index, helper.proc.pid, code, len(helper.pending))
        for done, _argv0, _cwd in helper.pending.values():
            done(SpawnError("place", None, "the spawner died during the launch"))
        helper.pending.clear()
        helper.held.clear()
        if self.closing:
            return      # the daemon already ended every container
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
        must not appear after its container was torn down. Held launches
        are cancelled first: their predecessors are about to be killed."""
        deadline = time.monotonic() + timeout
        for helper in list(self.helpers):
            for rid in list(helper.held) if helper is not None else ():
                self.cancel(rid)
        for helper in list(self.helpers):
            while (helper is not None and self.helpers[helper.index] is helper
                   and helper.pending and time.monotonic() < deadline):
                self._flush(helper)
                select.select([helper.sock], [], [], max(0.0, deadline - time.monotonic()))
                self._on_readable(helper)

    def close(self) -> None:
        """Stop every helper: closing our end makes it exit; it is waited for."""
        self.closing = True
        for helper in list(self.helpers):
            if helper is not None:
                self._died(helper)
