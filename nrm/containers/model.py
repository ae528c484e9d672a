"""The container wing's data model: what a container, a task, a queued run
and a hand-over promise are, and the interfaces the rest of the daemon
implements (``Sink`` for a task's events, ``ContainerListener`` for
lifecycles).

Plain data, kept apart from the manager that drives it: the daemon's
wiring, the upstream side and the state log read these types without
importing the manager's machinery. The rules for moving between states
(launch, exit, hand-over, teardown) live in nrm/containers/manager.py.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

from nrm.containers.identity import user_name
from nrm.containers.runtimes import Handle
from nrm.containers.slices import Slice
from nrm.manifest import Manifest

_next_id = itertools.count(int.from_bytes(os.urandom(6), "big"))


def new_id() -> str:
    """12 hex digits, as the cut uuid4s they replace: a random 48-bit start
    per daemon (ids stay distinct across restarts, which the state log
    needs), then a counter. Two are drawn per launch; a uuid4 costs a
    syscall and ~3 us. Ids grant nothing: every request is authorized by uid."""
    return f"{next(_next_id) & 0xFFFFFFFFFFFF:012x}"


#: names end up in logs, events, metrics labels and Slurm scripts: keep them plain
CONTAINER_NAME = re.compile(r"[A-Za-z0-9_@+:][A-Za-z0-9._@+:-]{0,127}")


class RunError(Exception):
    """A run request that cannot be honoured; ``code`` goes in the reply."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Peer:
    """A verified requester: kernel credentials over ipc, a CURVE key mapped to
    a user over tcp (then pid is 0: nothing to watch)."""
    uid: int
    gid: int
    pid: int = 0

    @property
    def is_root(self) -> bool:
        return self.uid == 0

    def may_touch(self, owner_uid: int) -> bool:
        return self.uid == 0 or self.uid == owner_uid


class Sink:
    """Where a task's events go. The upstream side implements it."""

    def started(self, task: "Task") -> None:
        pass

    def room(self, task: "Task") -> int:
        """Bytes the receiver takes now; 0 pauses reading until it resumes
        the task."""
        return 1 << 16

    def output(self, task: "Task", stream: str, data: bytes) -> bool:
        """Return False when the receiver is full: reading pauses until resume."""
        return True

    def exited(self, task: "Task", profile: Optional[dict]) -> None:
        pass

    def dropped(self) -> None:
        """The run was dropped before it started, without an answer: its
        client left while it waited for a slice. It never runs."""


def check_no_nul(argv, env, cwd, where: str = "") -> None:
    """Refuse a NUL byte in a command line, environment or cwd: exec cannot
    carry one, and the checks before it (os.stat of the cwd) would raise
    ValueError rather than RunError in the middle of a launch."""
    if cwd and "\0" in cwd:
        raise RunError("invalid", f"{where}cwd: contains a NUL byte")
    for i, arg in enumerate(argv):
        if "\0" in arg:
            raise RunError("invalid", f"{where}argv[{i}]: contains a NUL byte")
    for k, v in (env or {}).items():
        if "\0" in k or "\0" in v:
            raise RunError("invalid", f"{where}env[{k[:64]!r}]: contains a NUL byte")


def refuse(sink: Sink, exc: RunError) -> None:
    """A run that will not start after all: tell its client, if it listens."""
    fail = getattr(sink, "failed", None)
    if fail:
        fail(exc.code, str(exc))


@dataclass
class Task:
    """One process the daemon launched (or adopted) in a container: it owns
    the process's pidfd, its output pipes and their paused state, and, once
    it has exited, its status."""
    id: str
    container: "Container"
    argv: List[str]
    sink: Sink
    client_pid: int = 0
    detach: bool = False
    pid: int = 0
    pidfd: int = -1
    doomed: bool = False        # killed while its launch was in flight
    pipes: Dict[str, int] = field(default_factory=dict)   # stream name -> fd
    paused: Dict[str, bool] = field(default_factory=dict)
    code: Optional[int] = None
    signal: Optional[int] = None
    started_at: float = 0.0
    eof_timer: Optional[asyncio.TimerHandle] = None
    finished: bool = False
    #: taken over from a crashed nrmd: not our child, so its exit status is unknown
    adopted: bool = False
    #: ended by nrmd's own kill at teardown (its stop), not on its own
    killed: bool = False
    #: start time in clock ticks since boot, when the spawner saw it (else read from /proc)
    start_ticks: Optional[int] = None
    #: the cpus it was bound to (hwbind), None when it may run on all its container's
    cpus: Optional[List[int]] = None
    #: a launch a spawner holds behind another task's exit: its request id (to cancel)
    rid: Optional[int] = None

    @property
    def status(self) -> int:
        if self.signal is not None:
            return 128 + self.signal
        return self.code if self.code is not None else 0

    def to_dict(self) -> dict:
        return {"id": self.id, "pid": self.pid, "argv": self.argv, "detached": self.detach,
                "state": "exited" if self.finished else "running", "adopted": self.adopted,
                "status": self.status if self.finished and not self.adopted else None}


@dataclass(eq=False)
class Queued:
    """A run request waiting for a slice; ``seq`` orders the queue. Compared
    by identity: the queue removes the one it holds, never an equal one."""
    seq: int
    peer: Peer
    manifest: Manifest
    argv: List[str]
    env: Dict[str, str]
    cwd: str
    sink: Sink
    name: Optional[str]
    detach: bool
    output: bool
    oversubscribe: bool
    allowed: Optional[List[int]]
    #: a container whose slice was promised to it and taken back (passed over)
    avoid: Optional[str] = None
    #: a batch task (nrm/containers/batches.py BatchItem, also its sink)
    batch: Optional[Sink] = None


@dataclass
class Promise:
    """A queued run promised the slice of ``predecessor``, an unnamed
    container whose only task is running: a spawner holds the launch (in
    ``heir``, a container not yet registered) until that task exits.

    Outcomes: the launch fires (the predecessor is retired first, then the
    heir registered with the slice); the predecessor's cgroup still holds a
    process (``occupied``: the heir launches once the daemon has ended the
    predecessor and killed what it left); or the promise is cancelled (the
    client left, the daemon stops, or it was passed over) and the run
    queues again in its place."""
    queued: Queued
    heir: "Container"
    predecessor: "Container"
    task: Optional["Task"] = None
    request: Optional[dict] = None
    #: what an ordinary launch of the task calls with the spawner's answer
    launched: Optional[Callable[[object], None]] = None
    rid: Optional[int] = None
    passes: int = 0
    cancelling: bool = False
    occupied: bool = False
    #: the predecessor ended: its cpus are the heir's already
    owns_slice: bool = False


@dataclass
class Container:
    """A named slice with an owner (a Unix uid): it owns the slice, the
    runtime handle that isolates it, its running tasks and the launches in
    flight (``starting``), and, when promised, the run its slice goes to
    (``heir``). It ends when its last task ends."""
    id: str
    uid: int
    manifest: Manifest
    slice: Slice
    handle: Handle
    tasks: Dict[str, Task] = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    started_mono: float = field(default_factory=time.monotonic)
    bind_next: int = 0
    tasks_started: int = 0
    ending: bool = False
    starting: Dict[str, Task] = field(default_factory=dict)    # launches in flight
    extra: Dict[str, object] = field(default_factory=dict)
    #: created without a name: no run can join it by name on purpose
    anonymous: bool = False
    #: the run promised this container's slice when it ends
    heir: Optional[Promise] = None
    #: the batch slot whose tasks run in it one after another (nrm/containers/batches.py)
    slot: Optional[object] = None

    def to_dict(self) -> dict:
        return {"id": self.id, "uid": self.uid, "user": user_name(self.uid),
                "name": self.manifest.name,
                "cpus": list(self.slice.cpus), "mems": list(self.slice.mems),
                "shared": self.slice.shared, "created": self.created,
                "power": self.manifest.power.policy,
                "tasks": [t.to_dict() for t in self.tasks.values()]}


class ContainerListener:
    """Managers that follow container lifecycles (sensors, policies, apps)."""

    def container_started(self, container: Container) -> None:
        pass

    def container_ended(self, container: Container) -> Optional[dict]:
        """May return a fragment merged into the container's exit profile."""
        return None

    def task_started(self, task: Task) -> None:
        """A task runs (launched, or adopted after a restart)."""

    def task_ended(self, task: Task) -> None:
        """A task's exit was seen (not called for tasks killed with their
        container: container_ended covers them)."""
