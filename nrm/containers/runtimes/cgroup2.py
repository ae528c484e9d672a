"""One cgroup per container with cgroup v2 (the unified hierarchy).

v2 moves whole processes, never single threads, so the daemon (which has
several threads) cannot pass through a container's cgroup the way it does
with v1: a single-threaded spawner process (nrm/containers/spawner.py)
writes itself into the container's `cgroup.procs`, forks the task - born inside - and
writes itself back. This runtime therefore requires spawners.

Layout, under the cgroup nrmd was started in (HOME, e.g. the systemd
service's cgroup with Delegate=yes):

    HOME/                  subtree_control: +cpuset +memory
    HOME/PREFIX/           the daemon-owned subtree, same controllers
    HOME/PREFIX/supervisor leaf holding nrmd and its spawners
    HOME/PREFIX/c...       one per container: cpuset.cpus, cpuset.mems,
                           memory.oom.group=1 (an OOM kills the container)

v2 forbids processes in a cgroup that hands controllers to children, which
is why the daemon moves itself into the `supervisor` leaf first; if other
processes share HOME, enabling the controllers fails and the runtime says so.

Every path resolves under ``root`` (default "/"), so the file protocol is
tested against a fake tree. It has NOT been run on a real cgroup v2 kernel:
the machines we test on mount v1 with an empty unified hierarchy.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import time
from typing import Dict, List, Optional, Sequence

from nrm.hw.topology import format_cpulist
from nrm.containers.runtimes.base import Handle, Runtime, RuntimeError_
from nrm.containers.runtimes.cgroup import _read, _write

log = logging.getLogger(__name__)

REQUIRED = ("cpuset", "memory")
POOL_LIMIT = 64
SUPERVISOR = "supervisor"


def _rmdir(path: str) -> bool:
    """A just-emptied cgroup can stay busy for a few ms: retry briefly."""
    for _ in range(50):
        try:
            os.rmdir(path)
            return True
        except FileNotFoundError:
            return True
        except OSError as exc:
            if exc.errno == errno.ENOTEMPTY:
                # only a fake tree (tests) holds regular files that block
                # rmdir: cgroupfs interface files never do
                for name in os.listdir(path):
                    p = os.path.join(path, name)
                    if os.path.isfile(p):
                        os.unlink(p)
                continue
            if exc.errno != errno.EBUSY:
                log.warning("rmdir %s: %s", path, exc.strerror)
                return False
            time.sleep(0.005)
    log.warning("rmdir %s: still busy", path)
    return False


def unified_mount(root: str = "/") -> Optional[str]:
    """Mount point of the cgroup2 hierarchy (resolved under root), or None."""
    try:
        with open(os.path.join(root, "proc/self/mounts")) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[2] == "cgroup2":
                    return os.path.join(root, parts[1].lstrip("/"))
    except OSError:
        pass
    return None


def own_unified_path(root: str = "/") -> str:
    """This process's cgroup in the unified hierarchy ("0::/path")."""
    try:
        with open(os.path.join(root, "proc/self/cgroup")) as f:
            for line in f:
                hid, _, rest = line.rstrip("\n").partition(":")
                ctrls, _, path = rest.partition(":")
                if hid == "0" and ctrls == "":
                    return path
    except OSError:
        pass
    return "/"


def _procs(path: str) -> List[int]:
    try:
        return [int(p) for p in _read(os.path.join(path, "cgroup.procs")).split()]
    except (OSError, ValueError):
        return []


def cgroup2_usable(root: str = "/") -> Optional[str]:
    """None when the unified hierarchy can isolate cpus and memory for us,
    else the reason (which `nrm status` shows when v1 or affinity is used)."""
    if os.geteuid() != 0:
        return "not root"
    mount = unified_mount(root)
    if mount is None:
        return "no cgroup2 hierarchy mounted"
    home = os.path.join(mount, own_unified_path(root).lstrip("/"))
    try:
        available = _read(os.path.join(home, "cgroup.controllers")).split()
    except OSError as exc:
        return f"cannot read {home}/cgroup.controllers: {exc.strerror}"
    missing = [c for c in REQUIRED if c not in available]
    if missing:
        plural = "s" if len(missing) > 1 else ""
        return f"cgroup2 at {mount} lacks the {' and '.join(missing)} controller{plural}"
    if not os.access(home, os.W_OK):
        return f"{home} is not writable"
    return None


def _enable(path: str, controllers: Sequence[str]) -> None:
    try:
        have = _read(os.path.join(path, "cgroup.subtree_control")).split()
    except FileNotFoundError:
        have = []
    want = [c for c in controllers if c not in have]
    if want:
        _write(os.path.join(path, "cgroup.subtree_control"),
               " ".join("+" + c for c in want))


class Cgroup2Runtime(Runtime):
    """cgroup v2: one cgroup per container under the subtree nrmd owns
    (see the layout above), with the cpuset and memory controllers."""

    name = "cgroup"
    isolates_memory = True
    in_process = False

    def __init__(self, prefix: str = "nrm", root: str = "/"):
        reason = cgroup2_usable(root)
        if reason:
            raise RuntimeError_(f"cgroup v2: {reason}")
        self.mount = unified_mount(root)
        self.home = os.path.join(self.mount, own_unified_path(root).lstrip("/"))
        self.base = os.path.join(self.home, prefix)
        self.supervisor = os.path.join(self.base, SUPERVISOR)
        self.notes = ["cgroup v2 (cpuset, memory); untested on a real cgroup v2 kernel"]
        try:
            os.makedirs(self.supervisor, exist_ok=True)
            _write(os.path.join(self.supervisor, "cgroup.procs"), str(os.getpid()))
            _enable(self.home, REQUIRED)
            _enable(self.base, REQUIRED)
        except OSError as exc:
            hint = (" (other processes share nrmd's cgroup: start it in its own, e.g. "
                    "a systemd unit with Delegate=yes)" if exc.errno == errno.EBUSY else "")
            raise RuntimeError_(f"cannot set up {self.base}: {exc.strerror}{hint}") from None
        self.can_kill = os.path.exists(os.path.join(self.home, "cgroup.kill"))
        self._pool: List[str] = []
        self._busy: Dict[str, str] = {}
        self._counter = 0

    def stale_pids(self, record_cgroups: dict) -> List[int]:
        """Every process still in a predecessor's container cgroup."""
        d = record_cgroups.get("unified", "")
        if not d or os.path.dirname(os.path.realpath(d)) != os.path.realpath(self.base):
            return []       # never trust a path the log did not get from us
        return _procs(d)

    def take_over(self, handle: Handle, pids: Sequence[int]) -> None:
        for pid in pids:
            try:
                _write(os.path.join(handle.cgdir, "cgroup.procs"), str(pid))
            except ProcessLookupError:
                pass
            except OSError as exc:
                log.warning("adopting pid %d into %s: %s", pid, handle.cgdir, exc.strerror)

    def reap_stale(self) -> List[int]:
        """Kill what a crashed predecessor left in its container cgroups (not
        taken over by new ones) and remove them, as the v1 runtime does."""
        mine = set(self._pool) | set(self._busy.values())
        killed: List[int] = []
        for name in os.listdir(self.base):
            path = os.path.join(self.base, name)
            if name == SUPERVISOR or path in mine or not os.path.isdir(path):
                continue
            killed.extend(p for p in _procs(path) if p != os.getpid())
            self._kill_dir(path, signal.SIGKILL)
            _rmdir(path)
        return killed

    def _kill_dir(self, path: str, sig: int) -> int:
        """Signal every process of a cgroup; cgroup.kill when the kernel has
        it (atomic against forks), else rounds of signals (no v2 freezer
        dance: tasks that fork in between are caught by the next round)."""
        me = os.getpid()
        procs = _procs(path)
        victims = [p for p in procs if p != me]
        if not victims:
            return 0
        # cgroup.kill would also take this process, were it inside
        if sig == signal.SIGKILL and self.can_kill and len(victims) == len(procs):
            try:
                _write(os.path.join(path, "cgroup.kill"), "1")
                return len(victims)
            except OSError as exc:
                log.warning("cgroup.kill in %s: %s", path, exc.strerror)
        count = 0
        for _ in range(20 if sig == signal.SIGKILL else 1):
            for pid in victims:
                try:
                    os.kill(pid, sig)
                    count += 1
                except ProcessLookupError:
                    pass
            if sig != signal.SIGKILL:
                break
            time.sleep(0.005)
            victims = [p for p in _procs(path) if p != me]
            if not victims:
                break
        return count

    # -- containers ----------------------------------------------------------
    def create(self, cid: str, cpus: Sequence[int], mems: Sequence[int]) -> Handle:
        try:
            if self._pool:
                path = self._pool.pop()
            else:
                self._counter += 1
                path = os.path.join(self.base, f"c{os.getpid()}-{self._counter}")
                os.mkdir(path)
            _write(os.path.join(path, "cpuset.mems"), format_cpulist(mems))
            _write(os.path.join(path, "cpuset.cpus"), format_cpulist(cpus))
            _write(os.path.join(path, "memory.oom.group"), "1")
        except OSError as exc:
            raise RuntimeError_(f"cannot prepare cgroup for {cid}: {exc}") from None
        handle = Handle(cid, cpus, mems)
        handle.cgdir = path
        handle.usage_start = self._usage_us(path)
        self._busy[cid] = path
        return handle

    def placement(self, handle, bind_cpus):
        return {"join": [os.path.join(handle.cgdir, "cgroup.procs")],
                "cpus": list(bind_cpus or [])}

    def spawn(self, handle, argv, **kwargs):
        raise RuntimeError_("cgroup v2 launches need a spawner process")

    def cgroup_dirs(self, handle: Handle) -> Dict[str, str]:
        return {"unified": handle.cgdir}

    def process_list(self, handle: Handle) -> Optional[str]:
        return os.path.join(handle.cgdir, "cgroup.procs")

    def pids(self, handle: Handle) -> List[int]:
        me = os.getpid()
        return [p for p in _procs(handle.cgdir) if p != me]

    @staticmethod
    def _usage_us(path: str) -> int:
        try:
            for line in _read(os.path.join(path, "cpu.stat")).splitlines():
                key, _, value = line.partition(" ")
                if key == "usage_usec":
                    return int(value)
        except (OSError, ValueError):
            pass
        return 0

    def cpu_time(self, handle: Handle) -> Optional[float]:
        return (self._usage_us(handle.cgdir) - handle.usage_start) / 1e6

    def kill_all(self, handle: Handle, sig: int = signal.SIGKILL) -> None:
        self._kill_dir(handle.cgdir, sig)

    def remove(self, handle: Handle) -> None:
        path = self._busy.pop(handle.cid, None)
        if path is None:
            return
        if not handle.vacated:
            self._kill_dir(path, signal.SIGKILL)
        if len(self._pool) < POOL_LIMIT:
            self._pool.append(path)
        else:
            _rmdir(path)

    def close(self) -> None:
        for path in list(self._busy.values()) + self._pool:
            self._kill_dir(path, signal.SIGKILL)
            _rmdir(path)
        self._busy.clear()
        self._pool.clear()
        # nrmd itself stays in the supervisor leaf until it exits: v2 would
        # refuse it back in HOME, which now hands controllers down
