"""The interface every runtime implements, and the spawn scope they share.

A runtime turns a slice into isolation. To avoid a `preexec_fn` or an extra
exec per task (each costs a third to a half of the launch rate), nrm sets the
attributes a child must be born with on the *spawning thread* itself -
cgroup membership, cpu affinity, NUMA memory policy, scheduling class - forks
the child, and puts the thread back. The child inherits them all at fork, so
it is inside its slice before it execs.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
from typing import Iterable, List, Optional, Sequence

log = logging.getLogger(__name__)


class RuntimeError_(RuntimeError):
    """A runtime cannot do what was asked; the message says why."""


class Handle:
    """A runtime's record of one container's isolation."""

    def __init__(self, cid: str, cpus: Sequence[int], mems: Sequence[int]):
        self.cid = cid
        self.cpus = list(cpus)
        self.mems = list(mems)
        self.pgids: set = set()


SCHED_POLICIES = {
    "SCHED_OTHER": getattr(os, "SCHED_OTHER", 0),
    "SCHED_FIFO": getattr(os, "SCHED_FIFO", 1),
    # A special kernel's class (Argo's); mainline kernels answer EINVAL.
    "SCHED_HPC": 7,
}

_MPOL_DEFAULT, _MPOL_BIND = 0, 2
_SYS_set_mempolicy = 238  # x86-64
_libc = None


def _set_mempolicy(mode: int, nodes: Iterable[int]) -> bool:
    """Thread memory policy, inherited across fork; False when unavailable."""
    global _libc
    if os.uname().machine != "x86_64":
        return False
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    mask = 0
    for n in nodes:
        mask |= 1 << n
    bits = ctypes.c_ulong(mask)
    ptr = ctypes.byref(bits) if mode != _MPOL_DEFAULT else None
    return _libc.syscall(_SYS_set_mempolicy, mode, ptr, 64 if ptr else 0) == 0


class Runtime:
    name = "base"
    isolates_memory = False
    #: extra text for `nrm status`
    notes: List[str] = []

    def create(self, cid: str, cpus: Sequence[int], mems: Sequence[int]) -> Handle:
        return Handle(cid, cpus, mems)

    @contextlib.contextmanager
    def _membership(self, handle: Handle):
        """Make the calling thread a member of the container (runtime-specific)."""
        yield

    def spawn(self, handle: Handle, argv: List[str], *, bind_cpus: Optional[Sequence[int]] = None,
              bind_mems: Optional[Sequence[int]] = None, sched: Optional[tuple] = None,
              **popen_kwargs) -> subprocess.Popen:
        """Start argv inside the container; raises OSError when exec fails."""
        with self._membership(handle), _thread_attributes(
                bind_cpus, bind_mems, sched):
            proc = subprocess.Popen(self.wrap(handle, argv), start_new_session=True,
                                    close_fds=True, **popen_kwargs)
        handle.pgids.add(proc.pid)
        return proc

    def wrap(self, handle: Handle, argv: List[str]) -> List[str]:
        return argv

    def pids(self, handle: Handle) -> List[int]:
        """Every process of the container that is still alive."""
        alive = []
        for pgid in list(handle.pgids):
            try:
                os.killpg(pgid, 0)
                alive.append(pgid)
            except ProcessLookupError:
                handle.pgids.discard(pgid)
            except PermissionError:
                alive.append(pgid)
        return alive

    def kill_all(self, handle: Handle, sig: int = signal.SIGKILL) -> None:
        for pgid in list(handle.pgids):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                handle.pgids.discard(pgid)

    def remove(self, handle: Handle) -> None:
        """Container end: what its tasks left behind in their process
        groups dies with it (a process that calls setsid() escapes; only
        the cgroup runtime catches those)."""
        self.kill_all(handle, signal.SIGKILL)

    def take_over(self, handle: Handle, pids: Sequence[int]) -> None:
        """Put a crashed predecessor's processes into this handle."""
        for pid in pids:
            try:
                os.sched_setaffinity(pid, handle.cpus)
            except OSError:
                pass
            try:
                handle.pgids.add(os.getpgid(pid))
            except ProcessLookupError:
                pass

    def cgroup_dirs(self, handle: Handle) -> dict:
        """controller -> directory of the container's cgroups (none here)."""
        return {}

    def stale_pids(self, record_cgroups: dict) -> List[int]:
        """Processes a predecessor left in a container's isolation, beyond
        its recorded tasks (none known without cgroups)."""
        return []

    def reap_stale(self) -> List[int]:
        """Kill and clean what a crashed predecessor left; called once the
        daemon has adopted what it wants. Returns the pids killed."""
        return []

    def close(self) -> None:
        pass

    def describe(self) -> dict:
        return {"name": self.name, "isolates_memory": self.isolates_memory,
                "notes": list(self.notes)}


@contextlib.contextmanager
def _thread_attributes(cpus, mems, sched):
    """Apply affinity / memory policy / scheduling to this thread, then undo."""
    saved_affinity = os.sched_getaffinity(0) if cpus else None
    saved_sched = None
    mempolicy_set = False
    try:
        if cpus:
            os.sched_setaffinity(0, cpus)
        if mems:
            mempolicy_set = _set_mempolicy(_MPOL_BIND, mems)
        if sched is not None:
            policy, priority = sched
            saved_sched = (os.sched_getscheduler(0), os.sched_getparam(0))
            os.sched_setscheduler(0, policy, os.sched_param(priority))
        yield
    finally:
        if saved_sched is not None:
            os.sched_setscheduler(0, saved_sched[0], saved_sched[1])
        if mempolicy_set:
            _set_mempolicy(_MPOL_DEFAULT, ())
        if saved_affinity is not None:
            os.sched_setaffinity(0, saved_affinity)
