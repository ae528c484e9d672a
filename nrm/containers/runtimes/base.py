"""The interface every runtime implements, and the spawn scope they share.

A runtime turns a slice into isolation. To avoid a `preexec_fn` or an extra
exec per task (each costs a third to a half of the launch rate), nrm sets the
attributes a child must be born with on the *spawning thread* itself -
cgroup membership, cpu affinity, NUMA memory policy, scheduling class - forks
the child, and puts the thread back. The child inherits them all at fork, so
it is inside its slice before it execs.

That is the daemon's own thread when it has no spawners (`spawn`). A
spawner (nrm/containers/spawner.py) applies the runtime's `placement` in its vfork
child instead, between clone and exec: the same result, and the spawner
itself never moves.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from typing import List, Optional, Sequence, Tuple

from nrm.containers.spawner import fork_exec, thread_attributes

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
        #: a spawner found the process list empty when it handed the slice
        #: over, and nothing can join since: removal need not look again
        self.vacated = False


SCHED_POLICIES = {
    "SCHED_OTHER": getattr(os, "SCHED_OTHER", 0),
    "SCHED_FIFO": getattr(os, "SCHED_FIFO", 1),
    # A special kernel's class (Argo's); mainline kernels answer EINVAL.
    "SCHED_HPC": 7,
}


class Runtime:
    """How containers are isolated and tasks placed on this node: a runtime
    creates a container's slice (cgroups, or nothing for affinity), tells
    how a task joins it, lists and kills what runs in it, and removes it."""

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

    #: False when only a spawner process can place a task (cgroup v2 moves
    #: whole processes; the daemon is multi-threaded)
    in_process = True

    def spawn(self, handle: Handle, argv: List[str], *, bind_cpus: Optional[Sequence[int]] = None,
              bind_mems: Optional[Sequence[int]] = None, sched: Optional[tuple] = None,
              env=None, cwd=None, capture=False, uid=None, gid=None,
              groups=None) -> Tuple[int, int, int]:
        """Start argv inside the container from this thread (the path
        without spawners); (pid, stdout fd, stderr fd). Raises OSError when
        exec fails."""
        with self._membership(handle), thread_attributes(bind_cpus, bind_mems, sched):
            started = fork_exec(self.wrap(handle, argv), env, cwd, capture, uid, gid, groups)
        self.adopt(handle, started[0])
        return started

    def placement(self, handle: Handle, bind_cpus: Optional[Sequence[int]]) -> dict:
        """Where a spawner's child places itself before it execs a task of
        this container: the cgroup membership files it writes "0" into
        (join), and the affinity it takes (cpus)."""
        return {"join": [], "cpus": list(bind_cpus or [])}

    def adopt(self, handle: Handle, pid: int) -> None:
        """A task of this container started (it leads its own session)."""
        handle.pgids.add(pid)

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

    def process_list(self, handle: Handle) -> Optional[str]:
        """A file listing every process of the container, empty once none
        is left, which a spawner may read; None when there is no such file
        (then a slice cannot be handed over before the daemon empties it)."""
        return None

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
