"""One cgroup per container with cgroup v1: cpuset, memory, cpuacct, freezer.

A v1 cgroup can be joined by one thread: the spawning thread (a spawner
process's only thread, or the daemon's own without spawners) joins the
container's cgroups, forks the task (born inside) and returns home, about
30 us each way. cgroup v2 is in nrm/containers/runtimes/cgroup2.py.

Creating a cgroup in five hierarchies costs about 1 ms here, so emptied
container cgroups are kept in a pool, keyed by their cpuset, and reused.
The `cpu` hierarchy is left to the emulated hardware backend.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import threading
import time
from typing import Dict, List, Optional, Sequence

from nrm.hw.topology import format_cpulist
from nrm.containers.runtimes.base import Handle, Runtime, RuntimeError_

log = logging.getLogger(__name__)

V1_CONTROLLERS = ("cpuset", "memory", "cpuacct", "freezer")
POOL_LIMIT = 64


def _read(path: str) -> str:
    """A cgroup file, freshly opened each time (v1 caches the pid list of an
    open cgroup.procs for a second, so a kept fd would read a stale list),
    with raw os calls: pids() runs once per container end."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                return b"".join(chunks).decode().strip()
            chunks.append(chunk)
    finally:
        os.close(fd)


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _rmdir(path: str) -> None:
    """A just-emptied cgroup can stay busy for a few ms while its last
    tasks are released: retry briefly, then leave it with a warning."""
    for _ in range(50):
        try:
            os.rmdir(path)
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                log.warning("rmdir %s: %s", path, exc.strerror)
                return
            time.sleep(0.005)
    log.warning("rmdir %s: still busy", path)


def v1_mounts(root: str = "/") -> Dict[str, str]:
    """controller -> mount point of the v1 hierarchy holding it."""
    mounts: Dict[str, str] = {}
    try:
        with open(os.path.join(root, "proc/self/mounts")) as f:
            for line in f:
                parts = line.split()
                if len(parts) < 4 or parts[2] != "cgroup":
                    continue
                opts = parts[3].split(",")
                for c in V1_CONTROLLERS + ("cpu",):
                    if c in opts:
                        mounts.setdefault(c, parts[1])
    except OSError:
        pass
    return mounts


def own_v1_paths() -> Dict[str, str]:
    """controller -> this thread's cgroup path within that hierarchy."""
    paths: Dict[str, str] = {}
    with open("/proc/thread-self/cgroup") as f:
        for line in f:
            _, ctrls, path = line.rstrip("\n").split(":", 2)
            for c in ctrls.split(","):
                paths[c] = path
    return paths


ISOLATING = ("cpuset", "memory")


class Slot:
    """A container cgroup directory in every hierarchy, with open fds.

    A spawner's child writes itself into every hierarchy before it execs.
    Without spawners, the daemon's launching thread joins the isolating
    hierarchies (cpuset, memory) before it forks and the accounting ones
    (cpuacct, freezer) receive the new pid right after, which halves the
    migrations of that thread.
    """

    def __init__(self, name: str, dirs: Dict[str, str]):
        self.name = name
        self.dirs = dirs
        #: the spawner's membership files, and the list of the slot's processes
        self.join = [os.path.join(d, "tasks") for d in dirs.values()]
        self.procs = os.path.join(dirs["cpuset"], "cgroup.procs")
        self.key: Optional[tuple] = None
        self.thread_fds: List[int] = []
        self.pid_fds: List[int] = []
        self.usage_fd = -1
        self.usage_start = 0

    def open(self):
        for c, d in self.dirs.items():
            fd = os.open(os.path.join(d, "tasks"), os.O_WRONLY | os.O_CLOEXEC)
            (self.thread_fds if c in ISOLATING else self.pid_fds).append(fd)
        if "cpuacct" in self.dirs:
            self.usage_fd = os.open(os.path.join(self.dirs["cpuacct"], "cpuacct.usage"),
                                    os.O_RDONLY | os.O_CLOEXEC)

    def usage_ns(self) -> int:
        if self.usage_fd < 0:
            return 0
        return int(os.pread(self.usage_fd, 64, 0))

    def close(self):
        for fd in self.thread_fds + self.pid_fds + ([self.usage_fd] if self.usage_fd >= 0 else []):
            os.close(fd)
        self.thread_fds, self.pid_fds, self.usage_fd = [], [], -1


class CgroupRuntime(Runtime):
    """cgroup v1: one pooled cgroup per container in each of the cpuset,
    memory, cpuacct and freezer hierarchies."""

    name = "cgroup"
    isolates_memory = True

    def __init__(self, prefix: str = "nrm"):
        self.prefix = prefix
        mounts = v1_mounts()
        missing = [c for c in V1_CONTROLLERS if c not in mounts]
        if "cpuset" in missing:
            raise RuntimeError_("cgroup v1 cpuset controller is not mounted")
        self.controllers = [c for c in V1_CONTROLLERS if c in mounts]
        self.notes = [f"cgroup v1 ({', '.join(self.controllers)})"]
        if missing:
            self.notes.append(f"missing controllers: {', '.join(missing)}")
        own = own_v1_paths()
        self.base: Dict[str, str] = {}
        self.home_fds: List[int] = []
        for c in self.controllers:
            home = os.path.join(mounts[c], own.get(c, "/").lstrip("/"))
            base = os.path.join(home, prefix)
            try:
                os.makedirs(base, exist_ok=True)
            except OSError as exc:
                raise RuntimeError_(f"cannot create {base}: {exc.strerror}") from None
            self.base[c] = base
            if c in ISOLATING:
                self.home_fds.append(os.open(os.path.join(home, "tasks"),
                                             os.O_WRONLY | os.O_CLOEXEC))
        cs = self.base["cpuset"]
        parent = os.path.dirname(cs)
        for f in ("cpuset.cpus", "cpuset.mems"):
            if not _read(os.path.join(cs, f)):
                _write(os.path.join(cs, f), _read(os.path.join(parent, f)))
        self._pool: List[Slot] = []
        self._busy: Dict[str, Slot] = {}
        self._counter = 0
        self._lock = threading.Lock()

    def stale_pids(self, record_cgroups: dict) -> List[int]:
        """Every process still in a predecessor's container cgroups."""
        pids: set = set()
        for d in record_cgroups.values():
            if os.path.dirname(os.path.realpath(d)) not in self.base.values():
                continue     # never trust a path the log did not get from us
            try:
                pids.update(int(p) for p in _read(os.path.join(d, "cgroup.procs")).split())
            except (OSError, ValueError):
                pass
        return sorted(pids)

    def take_over(self, handle: Handle, pids: Sequence[int]) -> None:
        """Move whole processes (v1 cgroup.procs) into the new slot; the old
        cgroups are emptied and removed by reap_stale()."""
        for c, d in handle.slot.dirs.items():
            for pid in pids:
                try:
                    _write(os.path.join(d, "cgroup.procs"), str(pid))
                except ProcessLookupError:
                    pass
                except OSError as exc:
                    log.warning("adopting pid %d into %s: %s", pid, d, exc.strerror)

    def reap_stale(self) -> List[int]:
        """Kill what a crashed predecessor left in its container cgroups (not
        adopted into new ones) and remove them. Tasks are never started
        twice. Returns the pids killed."""
        killed: set = set()
        mine = {os.path.basename(d) for s in list(self._busy.values()) + self._pool
                for d in s.dirs.values()}
        cs_base = self.base["cpuset"]
        for name in os.listdir(cs_base):
            procs = os.path.join(cs_base, name, "cgroup.procs")
            if name in mine or not os.path.isfile(procs):
                continue
            for _ in range(20):
                try:
                    pids = [int(p) for p in _read(procs).split()]
                except (OSError, ValueError):
                    break
                if not pids:
                    break
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                        killed.add(pid)
                    except ProcessLookupError:
                        pass
                time.sleep(0.01)
        for base in self.base.values():
            for name in os.listdir(base):
                path = os.path.join(base, name)
                if os.path.isdir(path) and name not in mine:
                    _rmdir(path)
        return sorted(killed)

    # -- slots -------------------------------------------------------------
    def _new_slot(self) -> Slot:
        self._counter += 1
        name = f"s{os.getpid()}-{self._counter}"
        dirs = {c: os.path.join(base, name) for c, base in self.base.items()}
        for d in dirs.values():
            os.mkdir(d)
        slot = Slot(name, dirs)
        return slot

    def create(self, cid: str, cpus: Sequence[int], mems: Sequence[int]) -> Handle:
        key = (tuple(cpus), tuple(mems))
        slot = None
        for i, s in enumerate(self._pool):
            if s.key == key:
                slot = self._pool.pop(i)
                break
        if slot is None and self._pool:
            slot = self._pool.pop()
        try:
            if slot is None:
                slot = self._new_slot()
            if slot.key != key:
                cs = slot.dirs["cpuset"]
                _write(os.path.join(cs, "cpuset.mems"), format_cpulist(mems))
                _write(os.path.join(cs, "cpuset.cpus"), format_cpulist(cpus))
                slot.key = key
            if not slot.thread_fds:
                slot.open()
            slot.usage_start = slot.usage_ns()
        except OSError as exc:
            raise RuntimeError_(f"cannot prepare cgroup for {cid}: {exc}") from None
        handle = Handle(cid, cpus, mems)
        handle.slot = slot
        self._busy[cid] = slot
        return handle

    @contextlib.contextmanager
    def _membership(self, handle):
        """The calling thread in the container's cgroups while a child forks.

        The child inherits the thread's affinity, and nrmd may keep its
        threads on one cpu (nrm/daemon/affinity.py): joining a cpuset only
        narrows a mask set with sched_setaffinity to the cpuset (kernels
        from 6.2) or resets it (older ones), so the thread takes the
        container's cpus for the fork, and its own mask back once home."""
        tid = str(threading.get_native_id()).encode()
        mask = os.sched_getaffinity(0)
        with self._lock:
            try:
                for fd in handle.slot.thread_fds:
                    os.write(fd, tid)
                with contextlib.suppress(OSError):     # a cpu offline: the cpuset's mask
                    os.sched_setaffinity(0, handle.cpus)
                yield
            finally:
                for fd in self.home_fds:
                    os.write(fd, tid)
                with contextlib.suppress(OSError):     # a cpu went offline: keep the reset
                    os.sched_setaffinity(0, mask)

    def spawn(self, handle, argv, **kwargs):
        started = super().spawn(handle, argv, **kwargs)
        pid = str(started[0]).encode()
        for fd in handle.slot.pid_fds:
            try:
                os.write(fd, pid)
            except ProcessLookupError:
                pass    # already exited: nothing left to account or freeze
        return started

    def placement(self, handle, bind_cpus):
        return {"join": handle.slot.join, "cpus": list(bind_cpus or [])}

    def cgroup_dirs(self, handle: Handle) -> Dict[str, str]:
        return dict(handle.slot.dirs)

    def process_list(self, handle: Handle) -> Optional[str]:
        return handle.slot.procs

    def pids(self, handle: Handle) -> List[int]:
        """Processes in the container, never this daemon (whose launching
        thread passes through container cgroups without spawners)."""
        me = os.getpid()
        try:
            data = _read(handle.slot.procs)
            return [p for p in (int(x) for x in data.split())
                    if p != me]
        except (OSError, ValueError):
            return []

    def cpu_time(self, handle: Handle) -> Optional[float]:
        if handle.slot.usage_fd < 0:
            return None
        try:
            return (handle.slot.usage_ns() - handle.slot.usage_start) / 1e9
        except (OSError, ValueError):
            return None

    def kill_all(self, handle: Handle, sig: int = signal.SIGKILL) -> None:
        """Freeze, signal, thaw: nothing can fork its way out in between."""
        if not self.pids(handle):
            return
        freezer = handle.slot.dirs.get("freezer")
        frozen = False
        if freezer and sig == signal.SIGKILL:
            try:
                _write(os.path.join(freezer, "freezer.state"), "FROZEN")
                frozen = True
                deadline = time.monotonic() + 0.2
                while (_read(os.path.join(freezer, "freezer.state")) != "FROZEN"
                       and time.monotonic() < deadline):
                    time.sleep(0.001)
            except OSError as exc:
                log.warning("freezer for %s: %s", handle.cid, exc)
        try:
            for pid in self.pids(handle):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        finally:
            if frozen:
                try:
                    _write(os.path.join(freezer, "freezer.state"), "THAWED")
                except OSError as exc:
                    log.warning("thaw %s: %s", handle.cid, exc)

    def remove(self, handle: Handle) -> None:
        slot = self._busy.pop(handle.cid, None)
        if slot is None:
            return
        if not handle.vacated:
            self.kill_all(handle)
        if len(self._pool) < POOL_LIMIT:
            self._pool.append(slot)
        else:
            self._destroy(slot)

    def _destroy(self, slot: Slot) -> None:
        slot.close()
        for d in slot.dirs.values():
            _rmdir(d)

    def close(self) -> None:
        for cid, slot in list(self._busy.items()):
            h = Handle(cid, [], [])
            h.slot = slot
            self.kill_all(h)
            self._pool.append(slot)
        self._busy.clear()
        for slot in self._pool:
            self._destroy(slot)
        self._pool.clear()
        for base in self.base.values():
            try:
                os.rmdir(base)
            except OSError:
                pass
        for fd in self.home_fds:
            os.close(fd)
        self.home_fds = []


def cgroup_usable() -> Optional[str]:
    """None when this process can manage v1 cgroups, else the reason."""
    if os.geteuid() != 0:
        return "not root"
    mounts = v1_mounts()
    if "cpuset" not in mounts:
        return "no cgroup v1 cpuset hierarchy mounted"
    if not os.access(mounts["cpuset"], os.W_OK):
        return f"{mounts['cpuset']} is not writable"
    return None
