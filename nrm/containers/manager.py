"""Container manager: containers, their tasks, and the tasks' output.

A container is a named slice with an owner (a Unix uid) holding one or more
tasks; it ends when its last task ends, and then everything left in it is
killed and its slice released. Tasks are watched with pidfds in one epoll
set on the event loop (nrm/containers/exits.py: no SIGCHLD handler, no thread per
task), their stdout and stderr are
read from pipes and handed to a *sink* (the client that asked for the run),
which may push back: when a client is slow its task's pipes stop being read,
so output is never dropped and daemon memory stays bounded.

Tasks are launched by spawner processes when the daemon has them (see
nrm/containers/spawner.py: a launch is asynchronous, and a container keeps its slice
while a launch is in flight), else by the daemon's own thread. Either way
each task is the daemon's child, reaped through its pidfd.

Hand-over: a run that waits for a slice may be *promised* the slice of a
running container that will end with its only task. A spawner then holds
its launch and starts it the moment that task exits, if its cgroup is
empty, without waiting for the daemon to notice the exit: on a busy node the
daemon's turn-around was the slice's idle time (docs/performance.md,
session 8). The daemon retires the predecessor (its exit, its container's
end and every listener's restore) before the heir is registered, so the
managers see the same order as without a hand-over. See ``Promise``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import pwd
import re
import signal
import stat
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, List, Optional

from nrm.containers.exits import ExitWatch
from nrm.manifest import Manifest
from nrm.containers.slices import ResourceManager, Slice, SliceError
from nrm.containers.runtimes import SCHED_POLICIES, Handle, Runtime
from nrm.containers.spawner import SpawnError, SpawnerPool, env_list

log = logging.getLogger(__name__)

#: watched clients beyond which one left with no task is no longer kept
IDLE_CLIENT_WATCHES = 256


_next_id = itertools.count(int.from_bytes(os.urandom(6), "big"))


def new_id() -> str:
    """12 hex digits, as the cut uuid4s they replace: a random 48-bit start
    per daemon (ids stay distinct across restarts, which the state log
    needs), then a counter. Two are drawn per launch; a uuid4 costs a
    syscall and ~3 us. Ids grant nothing: every request is authorized by uid."""
    return f"{next(_next_id) & 0xFFFFFFFFFFFF:012x}"


#: names end up in logs, events, metrics labels and Slurm scripts: keep them plain
CONTAINER_NAME = re.compile(r"[A-Za-z0-9_@+:][A-Za-z0-9._@+:-]{0,127}")
READ_CHUNK = 65536
EOF_GRACE_S = 0.2          # wait this long for pipes after the task exited
KILL_GRACE_S = 2.0         # SIGTERM, then SIGKILL after this long


class RunError(Exception):
    """A run request that cannot be honoured; ``code`` goes in the reply."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass
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

    def output(self, task: "Task", stream: str, data: bytes) -> bool:
        """Return False when the receiver is full: reading pauses until resume."""
        return True

    def exited(self, task: "Task", profile: Optional[dict]) -> None:
        pass


@dataclass
class Task:
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
    #: start time in clock ticks since boot, when the spawner saw it (else read from /proc)
    start_ticks: Optional[int] = None

    @property
    def status(self) -> int:
        if self.signal is not None:
            return 128 + self.signal
        return self.code if self.code is not None else 0

    def to_dict(self) -> dict:
        return {"id": self.id, "pid": self.pid, "argv": self.argv, "detached": self.detach,
                "state": "exited" if self.finished else "running", "adopted": self.adopted,
                "status": self.status if self.finished and not self.adopted else None}


@dataclass
class Queued:
    """A run request waiting for a slice; ``seq`` orders the queue."""
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


#: a promised run passed over this many times by younger runs is taken back
#: and promised again (to the next slice to free), so that a long-running
#: predecessor cannot starve it
PASSES_BEFORE_REPROMISE = 2
#: promises at once; a spawner holds at most 1024 (libnrm/src/spawner.c)
MAX_PROMISES = 512


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


class ContainerManager:
    def __init__(self, runtime: Runtime, resources: ResourceManager,
                 publish: Callable[[str, dict], None], task_env: Callable[..., Dict[str, str]],
                 loop: Optional[asyncio.AbstractEventLoop] = None, spawners: int = 0,
                 wants: Optional[Callable[[str], bool]] = None):
        self.runtime = runtime
        self.resources = resources
        self.publish = publish
        #: whether an event on a topic would reach anyone: a launch storm
        #: with no listener then builds none of its four events per task
        self.wants = wants or (lambda topic: True)
        self.task_env = task_env
        self.loop = loop or asyncio.get_event_loop()
        self.exits = ExitWatch(self.loop)
        #: tasks of other users run as those users (a daemon's euid is fixed)
        self.privileged = os.geteuid() == 0
        self.containers: Dict[str, Container] = {}
        self.tasks: Dict[str, Task] = {}
        self.listeners: List[ContainerListener] = []
        self.waiting: Deque[Queued] = deque()
        self.promises: List[Promise] = []
        self._seq = itertools.count()
        self.closing = False
        self.client_watch: Dict[int, tuple] = {}   # client pid -> (pidfd, set(task ids))
        self.counters = {"tasks_started": 0, "tasks_finished": 0, "containers_started": 0,
                         "containers_finished": 0, "spawn_failures": 0, "handovers": 0,
                         "handovers_occupied": 0, "handovers_cancelled": 0}
        self.finished_profiles: Deque[dict] = deque(maxlen=64)
        self.pool: Optional[SpawnerPool] = None
        if spawners > 0:
            self.pool = SpawnerPool(spawners, self.loop, log)
            try:
                self.pool.start()
            except OSError as exc:
                self.pool.close()
                self.pool = None
                if not runtime.in_process:
                    raise RuntimeError(f"cannot start spawner processes: {exc}") from None
                log.warning("cannot start spawner processes (%s): launching from the "
                            "daemon itself", exc)
                runtime.notes = list(runtime.notes) + [f"spawner processes unavailable: {exc}"]
        if self.pool is not None:
            runtime.notes = list(runtime.notes) + [f"{spawners} spawner processes"]
        elif not runtime.in_process:
            raise ValueError(f"runtime {runtime.name} needs spawner processes")

    # -- run --------------------------------------------------------------
    def run(self, peer: Peer, manifest: Manifest, argv: List[str], env: Dict[str, str],
            cwd: str, sink: Sink, container_name: Optional[str] = None, detach: bool = False,
            output: bool = True, wait: bool = False, oversubscribe: bool = False,
            cpus_allowed: Optional[List[int]] = None) -> Optional[Task]:
        """Start a task, or queue it when ``wait`` and the slice is busy.

        Returns the task, or None when queued; raises RunError.
        """
        if not argv:
            raise RunError("invalid", "no command given")
        if container_name is not None and not CONTAINER_NAME.fullmatch(container_name):
            raise RunError("invalid", f"container name {container_name[:64]!r}: use 1 to 128 "
                           "letters, digits and . _ - : @ +, not starting with . or -")
        q = Queued(next(self._seq), peer, manifest, list(argv), env, cwd, sink,
                   container_name, detach, output, oversubscribe, cpus_allowed)
        task = self._run(q, wait)
        if task is None:
            self._promise_slices()
        return task

    @property
    def waiting_count(self) -> int:
        """Runs waiting for a slice, promised one or not."""
        return len(self.waiting) + len(self.promises)

    def _run(self, q: Queued, wait: bool) -> Optional[Task]:
        if q.name is not None:
            existing = self.containers.get(q.name)
            if existing is not None:
                if not q.peer.may_touch(existing.uid):
                    raise RunError("denied", f"container {q.name} belongs to "
                                   f"uid {existing.uid}")
                if existing.ending:
                    raise RunError("busy", f"container {q.name} is shutting down")
                if existing.heir is not None:
                    raise RunError("busy", f"container {q.name} ends with its task: its "
                                   "slice is promised to a queued run")
                return self._start_task(existing, q.peer, q.argv, q.env, q.cwd, q.sink,
                                        q.detach, q.output)
        cid = q.name or new_id()
        try:
            slice_ = self.resources.allocate(cid, q.manifest.slice.cpus, q.manifest.slice.mems,
                                             q.oversubscribe, q.allowed)
        except SliceError as exc:
            if exc.busy and wait:
                self.waiting.append(q)
                return None
            raise RunError("busy" if exc.busy else "no_fit", str(exc)) from None
        if self.promises:
            self._passed(q.seq)
        try:
            handle = self.runtime.create(cid, slice_.cpus, slice_.mems)
        except Exception as exc:
            self.resources.release(cid, slice_)
            raise RunError("runtime", str(exc)) from None
        container = self._register(cid, q.peer.uid, q.manifest, slice_, handle, "start")
        container.anonymous = q.name is None
        try:
            return self._start_task(container, q.peer, q.argv, q.env, q.cwd, q.sink,
                                    q.detach, q.output)
        except RunError:
            if not container.tasks and not container.starting:
                self._end_container(container)
            raise

    def _register(self, cid: str, uid: int, manifest: Manifest, slice_: Slice, handle: Handle,
                  event: str) -> Container:
        """A new container with its slice and isolation: tell the managers."""
        handle.image = manifest.image
        container = Container(cid, uid, manifest, slice_, handle)
        self._enroll(container, event)
        return container

    def _enroll(self, container: Container, event: str) -> None:
        cid = container.id
        container.created, container.started_mono = time.time(), time.monotonic()
        self.containers[cid] = container
        self.counters["containers_started"] += 1
        self._tell("container_started", container)
        if self.wants("container"):
            self.publish("container", {"event": event, **container.to_dict()})

    def _tell(self, hook: str, arg) -> None:
        """Call a lifecycle hook on every listener that has it; a failing
        listener is logged, never fatal to the container."""
        for listener in self.listeners:
            fn = getattr(listener, hook, None)
            if fn is None:
                continue
            try:
                fn(arg)
            except Exception:
                log.exception("listener %s failed in %s", listener, hook)

    def _spawn_options(self, container: Container):
        m = container.manifest
        bind_cpus = bind_mems = None
        if m.hwbind:
            topo = self.resources.topology
            cores: Dict[tuple, List[int]] = {}
            for c in container.slice.cpus:
                cpu = topo.cpu(c)
                cores.setdefault((cpu.package, cpu.core), []).append(c)
            core_list = sorted(cores.values())
            chosen = core_list[container.bind_next % len(core_list)]
            container.bind_next += 1
            bind_cpus = chosen
            bind_mems = [topo.cpu(chosen[0]).node]
        sched = None
        if m.scheduler.policy != "SCHED_OTHER" or m.scheduler.priority:
            sched = (SCHED_POLICIES[m.scheduler.policy], m.scheduler.priority)
        return bind_cpus, bind_mems, sched

    def _start_task(self, container, peer, argv, env, cwd, sink, detach, output,
                    promise: Optional[Promise] = None) -> Task:
        """Start a task; with spawners it is returned still starting and the
        sink hears `started` (or `failed`) when the spawner answers. With
        ``promise``, the spawner holds the launch until the predecessor's
        task exits."""
        task = Task(id=new_id(), container=container, argv=list(argv), sink=sink,
                    client_pid=peer.pid, detach=detach)
        ids: Dict[str, object] = {}
        if self.privileged and peer.uid != 0:
            groups = _groups(peer.uid, peer.gid)
            _check_cwd_access(cwd, peer.uid, groups)
            ids = {"uid": peer.uid, "gid": peer.gid, "groups": groups}
        bind_cpus, bind_mems, sched = self._spawn_options(container)
        argv = self._wrap_perf(container, argv)
        try:
            envl = env_list(self.task_env(container, task, env))
        except (ValueError, TypeError) as exc:
            raise RunError("invalid", f"cannot execute {argv[0]!r}: {exc}") from None
        if self.pool is None or (not self.pool.alive() and self.runtime.in_process):
            try:
                pid, out, err = self.runtime.spawn(
                    container.handle, argv, bind_cpus=bind_cpus, bind_mems=bind_mems,
                    sched=sched, env=envl, cwd=cwd, capture=output, **ids)
            except Exception as exc:
                self.counters["spawn_failures"] += 1
                raise _spawn_error(argv, sched, exc) from None
            task.pidfd = os.pidfd_open(pid)
            self.exits.add(task.pidfd, self._on_pid_exit, task)
            self._started(task, peer, pid, out, err)
            return task
        try:
            request = {"argv": self.runtime.wrap(container.handle, argv), "env": envl,
                       "cwd": cwd, "capture": output, "mems": bind_mems, "sched": sched,
                       **ids, **self.runtime.placement(container.handle, bind_cpus)}
        except Exception as exc:
            self.counters["spawn_failures"] += 1
            raise RunError("runtime", f"cannot start task: {exc}") from None
        container.starting[task.id] = task
        near = next(iter(bind_cpus or container.slice.cpus), None)

        def launched(result):
            self._spawned(task, peer, argv, sched, result)

        if promise is None:
            self.pool.submit(request, launched, near=near)
            return task
        promise.task, promise.request, promise.launched = task, request, launched
        predecessor = promise.predecessor
        (only,) = predecessor.tasks.values()
        promise.rid = self.pool.submit(
            dict(request, after=self.runtime.process_list(predecessor.handle)),
            lambda result: self._promise_answered(promise, argv, sched, result),
            near=near, after=only.pidfd)
        return task

    # -- hand-over ------------------------------------------------------------
    def _predecessors(self) -> List[Container]:
        """Containers whose slice can be promised, the oldest task first."""
        if self.pool is None or self.closing or not self.pool.alive():
            return []
        found = []
        for c in self.containers.values():
            if (c.anonymous and c.heir is None and not c.ending and not c.starting
                    and len(c.tasks) == 1 and not c.slice.shared
                    and "adopted" not in c.extra):
                (task,) = c.tasks.values()
                if task.pidfd >= 0 and self.runtime.process_list(c.handle):
                    found.append((task.started_at, c))
        found.sort(key=lambda pair: pair[0])
        return [c for _, c in found]

    def _fits(self, q: Queued, c: Container) -> bool:
        return (q.name is None and not q.oversubscribe and c.id != q.avoid
                and q.manifest.slice.cpus == len(c.slice.cpus)
                and (q.allowed is None or set(c.slice.cpus) <= set(q.allowed)))

    def _promise_slices(self) -> None:
        """Promise queued runs, oldest first, the slices of running
        containers that will end with their task."""
        if not self.waiting or len(self.promises) >= MAX_PROMISES:
            return
        candidates = self._predecessors()
        room = MAX_PROMISES - len(self.promises)
        pairs = []
        for q in self.waiting:      # no copy: the queue may be long, matches are near its head
            if not candidates or len(pairs) >= room:
                break
            c = next((c for c in candidates if self._fits(q, c)), None)
            if c is None:
                continue
            if q.peer.pid and q.peer.pid not in self.client_watch and not _alive(q.peer.pid):
                continue    # _retry_waiting drops it
            candidates.remove(c)
            pairs.append((q, c))
        for q, c in pairs:
            self.waiting.remove(q)
            self._promise(q, c)

    def _promise(self, q: Queued, predecessor: Container) -> None:
        cid = new_id()
        cpus = predecessor.slice.cpus
        slice_ = Slice(cpus, self.resources.mems_for(cpus, q.manifest.slice.mems))
        try:
            handle = self.runtime.create(cid, slice_.cpus, slice_.mems)
        except Exception as exc:
            log.warning("cannot prepare a container to hand %s over: %s", predecessor.id, exc)
            self._requeue(q)
            return
        handle.image = q.manifest.image
        heir = Container(cid, q.peer.uid, q.manifest, slice_, handle, anonymous=True)
        promise = Promise(q, heir, predecessor)
        predecessor.heir = promise
        self.promises.append(promise)
        try:
            task = self._start_task(heir, q.peer, q.argv, q.env, q.cwd, q.sink, q.detach,
                                    q.output, promise)
        except RunError as exc:
            self._forget(promise)
            _refuse(q.sink, exc)
            return
        if q.peer.pid and not q.detach and not self._watch_client(q.peer.pid, task):
            self._cancel(promise)       # its client left already

    def _forget(self, promise: Promise) -> None:
        """The promise is off: its heir's slot and cpus go back."""
        if promise in self.promises:
            self.promises.remove(promise)
        if promise.predecessor.heir is promise:
            promise.predecessor.heir = None
        heir = promise.heir
        if promise.task is not None:
            heir.starting.pop(promise.task.id, None)
            self._unwatch_client(promise.task)
        if promise.owns_slice:
            self.resources.release(heir.id, heir.slice)
        try:
            self.runtime.remove(heir.handle)
        except Exception:
            log.exception("releasing the container prepared for %s", heir.id)

    def _requeue(self, q: Queued) -> None:
        """Back into the queue, in its place."""
        i = 0
        while i < len(self.waiting) and self.waiting[i].seq < q.seq:
            i += 1
        self.waiting.insert(i, q)

    def _passed(self, seq: int) -> None:
        """A run younger than some promised ones got a slice first."""
        for promise in self.promises:
            if promise.queued.seq < seq and not promise.cancelling and promise.rid is not None:
                promise.passes += 1
                if promise.passes >= PASSES_BEFORE_REPROMISE:
                    self._cancel(promise)

    def _cancel(self, promise: Promise) -> None:
        if not promise.cancelling and promise.rid is not None and self.pool is not None:
            promise.cancelling = True
            self.pool.cancel(promise.rid)

    def _promise_answered(self, promise: Promise, argv, sched, result) -> None:
        if promise not in self.promises:
            return
        q, heir = promise.queued, promise.heir
        if isinstance(result, SpawnError) and result.stage == "occupied":
            # the predecessor left processes behind: launch once they are killed
            self.counters["handovers_occupied"] += 1
            promise.occupied = True
            if promise.owns_slice:
                self._launch_heir(promise)
            return
        if isinstance(result, SpawnError):
            self._forget(promise)
            if result.stage == "cancelled":
                self.counters["handovers_cancelled"] += 1
                if promise.passes >= PASSES_BEFORE_REPROMISE:
                    q.avoid = promise.predecessor.id    # the next slice to come is its
                self._requeue(q)
                self._retry_waiting()
                return
            self._launch_failed(q.sink, argv, sched, result)
            self._retry_waiting()
            return
        # launched: its predecessor's task has exited, leaving nothing behind
        self.counters["handovers"] += 1
        promise.predecessor.handle.vacated = True
        self._retire(promise.predecessor)
        self.promises.remove(promise)
        if promise.predecessor.heir is promise:
            promise.predecessor.heir = None
        if not promise.owns_slice:
            self.resources.hand_over(promise.predecessor.id, heir.id, heir.slice)
        self._enroll(heir, "start")
        promise.launched(result)
        self._passed(q.seq)

    def _retire(self, container: Container) -> None:
        """A predecessor whose task has exited (its spawner saw it) but whose
        exit the loop has not handled yet: handle it now, with what its
        pipes hold (nothing else can write to them: its cgroup is empty)."""
        for task in list(container.tasks.values()):
            if task.pidfd >= 0:
                try:
                    pid, status = os.waitpid(task.pid, os.WNOHANG)
                except ChildProcessError:
                    pid, status = task.pid, None
                if pid == 0:
                    continue    # cannot be: its pidfd was readable
                self._exited(task, status)
            if not task.finished and task.pidfd < 0:
                if task.eof_timer is not None:
                    task.eof_timer.cancel()
                self._drain_and_finish(task)

    def _launch_heir(self, promise: Promise) -> None:
        """An occupied hand-over, once the predecessor has ended: an ordinary
        launch into the heir's slice."""
        self.promises.remove(promise)
        self._enroll(promise.heir, "start")
        self.pool.submit(promise.request, promise.launched, near=promise.heir.slice.cpus[0])

    def _launch_failed(self, sink: Sink, argv, sched, result: SpawnError) -> None:
        self.counters["spawn_failures"] += 1
        _refuse(sink, _spawn_error(argv, sched, result.oserror or RuntimeError(str(result)),
                                   result.stage))

    def _spawned(self, task: Task, peer: Peer, argv, sched, result) -> None:
        container = task.container
        container.starting.pop(task.id, None)
        if isinstance(result, SpawnError):
            self._launch_failed(task.sink, argv, sched, result)
            if not container.tasks and not container.starting:
                self._end_container(container)
            return
        if container.id not in self.containers:
            # torn down while launching (daemon shutdown): never leave it running
            _killpg(result.pid)
            _reap(result.pid)
            for fd in (result.pidfd, result.stdout, result.stderr):
                if fd >= 0:
                    os.close(fd)
            return
        self.runtime.adopt(container.handle, result.pid)
        task.pidfd = result.pidfd
        task.start_ticks = result.start
        self.exits.add(task.pidfd, self._on_pid_exit, task)
        self._started(task, peer, result.pid, result.stdout, result.stderr)
        if task.doomed:
            _killpg(task.pid)

    def _started(self, task: Task, peer: Peer, pid: int, out: int, err: int) -> None:
        container = task.container
        task.pid = pid
        task.started_at = time.monotonic()
        if out >= 0:
            for stream, fd in (("stdout", out), ("stderr", err)):
                os.set_blocking(fd, False)
                task.pipes[stream] = fd
                self.loop.add_reader(fd, self._on_readable, task, stream)
        container.tasks[task.id] = task
        container.tasks_started += 1
        self.tasks[task.id] = task
        self.counters["tasks_started"] += 1
        if not task.detach and peer.pid:
            self._watch_client(peer.pid, task)
        task.sink.started(task)
        if self.waiting:
            self._promise_slices()      # a new predecessor
        self._tell("task_started", task)
        if self.wants("task"):
            # no argv: every user may listen, and a command line can hold
            # secrets; its owner (and root) read it with `list`
            self.publish("task", {"event": "start", "container": container.id,
                                  "task": task.id, "pid": task.pid})

    def _wrap_perf(self, container, argv):
        if not container.manifest.perfwrapper:
            return argv
        return [sys.executable, "-m", "nrm.tools.perfwrapper", "--"] + list(argv)

    # -- output -----------------------------------------------------------
    def _on_readable(self, task: Task, stream: str) -> None:
        fd = task.pipes.get(stream)
        if fd is None:
            return
        try:
            data = os.read(fd, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close_pipe(task, stream)
            return
        if not task.sink.output(task, stream, data):
            self.loop.remove_reader(fd)
            task.paused[stream] = True

    def resume(self, task: Task) -> None:
        """The sink drained: read again."""
        for stream, paused in list(task.paused.items()):
            if paused and stream in task.pipes:
                task.paused[stream] = False
                self.loop.add_reader(task.pipes[stream], self._on_readable, task, stream)
        if task.pidfd < 0 and task.pipes and task.eof_timer is None and not task.finished:
            task.eof_timer = self.loop.call_later(EOF_GRACE_S, self._drain_and_finish, task)

    def _close_pipe(self, task: Task, stream: str) -> None:
        fd = task.pipes.pop(stream, None)
        if fd is None:
            return
        self.loop.remove_reader(fd)
        task.paused.pop(stream, None)
        os.close(fd)
        if not task.pipes and task.pidfd < 0:
            self._finish(task)

    # -- exit -------------------------------------------------------------
    def _on_pid_exit(self, task: Task) -> None:
        if task.pidfd < 0:
            return      # retired already (a hand-over saw its exit first)
        try:
            pid, status = os.waitpid(task.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = task.pid, None    # adopted: init reaped it, status unknown
        if pid == 0:
            return
        self._exited(task, status)

    def _exited(self, task: Task, status: Optional[int]) -> None:
        self.exits.remove(task.pidfd)
        os.close(task.pidfd)
        task.pidfd = -1
        if status is None:      # adopted from a crashed nrmd: not ours to wait for
            pass
        elif os.WIFSIGNALED(status):
            task.signal = os.WTERMSIG(status)
        else:
            task.code = os.WEXITSTATUS(status)
        if not task.pipes:
            self._finish(task)
        elif not any(task.paused.values()):
            task.eof_timer = self.loop.call_later(EOF_GRACE_S, self._drain_and_finish, task)

    def _drain_and_finish(self, task: Task) -> None:
        """Pipes still open after exit: a grandchild holds them. Keep what is
        buffered now and stop listening, so a daemonized child cannot hold
        the client forever."""
        task.eof_timer = None
        for stream in list(task.pipes):
            fd = task.pipes[stream]
            while True:
                try:
                    data = os.read(fd, READ_CHUNK)
                except OSError:
                    break
                if not data:
                    break
                task.sink.output(task, stream, data)
            self._close_pipe(task, stream)

    def _finish(self, task: Task) -> None:
        if task.finished:
            return
        task.finished = True
        if task.eof_timer is not None:
            task.eof_timer.cancel()
        container = task.container
        container.tasks.pop(task.id, None)
        self.tasks.pop(task.id, None)
        self._unwatch_client(task)
        self.counters["tasks_finished"] += 1
        self._tell("task_ended", task)
        if self.wants("task"):
            self.publish("task", {"event": "exit", "container": container.id, "task": task.id,
                                  "status": None if task.adopted else task.status,
                                  "code": task.code, "signal": task.signal})
        profile = None
        if not container.tasks and not container.starting:
            profile = self._end_container(container)
        task.sink.exited(task, profile)

    def _end_container(self, container: Container) -> Optional[dict]:
        if container.id not in self.containers:
            return None
        container.ending = True
        for t in list(container.tasks.values()):
            self._force_finish(t)
        try:
            self.runtime.remove(container.handle)     # kills what is left
        except Exception:
            log.exception("removing container %s", container.id)
        promise = container.heir
        if promise is not None:
            # promised: the cpus pass to the heir without ever being free
            self.resources.hand_over(container.id, promise.heir.id, container.slice)
            promise.owns_slice = True
        else:
            self.resources.release(container.id, container.slice)
        del self.containers[container.id]
        self.counters["containers_finished"] += 1
        profile: Dict[str, object] = {}
        for listener in self.listeners:
            try:
                fragment = listener.container_ended(container)
            except Exception:
                log.exception("listener %s failed at container end", listener)
                fragment = None
            if fragment:
                profile.update(fragment)
        profile_out = None
        if container.manifest.power.profile or profile:
            profile_out = {"container": container.id, "name": container.manifest.name,
                           "duration_s": time.monotonic() - container.started_mono,
                           "cpus": list(container.slice.cpus), **profile}
            self.finished_profiles.append(profile_out)
        if self.wants("container"):
            self.publish("container", {"event": "exit", "id": container.id,
                                       "name": container.manifest.name, "profile": profile_out})
        if promise is not None and promise.occupied:
            self._launch_heir(promise)
        self._retry_waiting()
        return profile_out if container.manifest.power.profile else None

    def _force_finish(self, task: Task) -> None:
        """Container teardown while a task is still known: kill and reap now."""
        if task.pidfd >= 0:
            _killpg(task.pid)
            _reap(task.pid)
            self.exits.remove(task.pidfd)
            os.close(task.pidfd)
            task.pidfd = -1
            task.signal = signal.SIGKILL
        for stream in list(task.pipes):
            fd = task.pipes.pop(stream)
            self.loop.remove_reader(fd)
            os.close(fd)
        task.finished = True
        task.container.tasks.pop(task.id, None)
        self.tasks.pop(task.id, None)
        self._unwatch_client(task)
        self.counters["tasks_finished"] += 1
        task.sink.exited(task, None)

    def _retry_waiting(self) -> None:
        if self.closing:
            return
        pending, self.waiting = self.waiting, deque()
        while pending:
            q = pending.popleft()
            if q.name not in self.containers and not self.resources.free_cpus:
                self.waiting.append(q)   # cannot fit: skip the failing attempt
                continue
            if q.peer.pid and q.peer.pid not in self.client_watch and not _alive(q.peer.pid):
                continue    # its client gave up waiting (Ctrl-C, killed): nobody to run for
            try:
                self._run(q, wait=True)
            except RunError as exc:
                _refuse(q.sink, exc)
        self._promise_slices()

    # -- signals, kill ----------------------------------------------------
    def signal_task(self, peer: Peer, task_id: str, signum: int) -> None:
        task = self.tasks.get(task_id)
        if task is None:
            raise RunError("not_found", f"no task {task_id}")
        if not peer.may_touch(task.container.uid):
            raise RunError("denied", f"task {task_id} belongs to uid {task.container.uid}")
        try:
            os.killpg(task.pid, signum)
        except ProcessLookupError:
            pass
        except ValueError:
            raise RunError("invalid", f"invalid signal {signum}") from None

    def kill(self, peer: Peer, name: str) -> int:
        container = self.containers.get(name)
        if container is None:
            raise RunError("not_found", f"no container {name}")
        if not peer.may_touch(container.uid):
            raise RunError("denied", f"container {name} belongs to uid {container.uid}")
        self.runtime.kill_all(container.handle, signal.SIGKILL)
        for task in container.starting.values():
            task.doomed = True
        return len(container.tasks) + len(container.starting)

    def client_gone(self, task: Task) -> None:
        """The client that streams this task vanished: kill the task."""
        if not task.detach and not task.finished and task.pid > 0:
            log.info("client of task %s is gone; killing it", task.id)
            try:
                os.killpg(task.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def _watch_client(self, pid: int, task: Task) -> bool:
        """False when the client is gone already."""
        entry = self.client_watch.get(pid)
        if entry is None:
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                # gone while the launch was in flight (a spawner answers
                # later): nothing else would ever kill this task
                self.client_gone(task)
                return False
            except OSError:
                return True
            entry = (fd, set())
            self.client_watch[pid] = entry
            self.loop.add_reader(fd, self._on_client_exit, pid)
        entry[1].add(task.id)
        return True

    def _unwatch_client(self, task: Task) -> None:
        """An idle client keeps its pidfd (a launch loop would otherwise
        open and register one per task) until it exits; past
        IDLE_CLIENT_WATCHES watches, a client going idle is dropped at once."""
        entry = self.client_watch.get(task.client_pid)
        if entry is None:
            return
        entry[1].discard(task.id)
        if not entry[1] and len(self.client_watch) > IDLE_CLIENT_WATCHES:
            self.loop.remove_reader(entry[0])
            os.close(entry[0])
            del self.client_watch[task.client_pid]

    def _on_client_exit(self, pid: int) -> None:
        fd, ids = self.client_watch.pop(pid)
        self.loop.remove_reader(fd)
        os.close(fd)
        for tid in ids:
            task = self.tasks.get(tid)
            if task is not None:
                self.client_gone(task)
        for promise in list(self.promises):
            if promise.queued.peer.pid == pid and not promise.queued.detach:
                self._cancel(promise)   # answered cancelled: then dropped

    # -- queries ----------------------------------------------------------
    def visible(self, peer: Peer) -> List[Container]:
        return [c for c in self.containers.values() if peer.may_touch(c.uid)]

    def pids(self) -> List[int]:
        """Every process in every container; called from the emulated
        backend's placement thread, hence the snapshot of the dict."""
        out: List[int] = []
        for c in list(self.containers.values()):
            out.extend(self.runtime.pids(c.handle))
        return out

    # -- adoption after a crash ------------------------------------------------
    def adopt(self, cid: str, uid: int, manifest: Manifest, cpus: List[int], mems: List[int],
              shared: bool, tasks: List[tuple], members: List[int]) -> Container:
        """Take over a crashed predecessor's container: the same cpus, a new
        runtime handle holding all of its processes (``members``), and its
        ``tasks`` ((id, pid, argv) of live ones) watched through pidfds.

        They are not our children, so their exit status is unknown. Their
        stdout and stderr are reopened through /proc when they are still
        pipes, so that they do not die of SIGPIPE; what they write is
        published as task output events, since the client that streamed
        them is gone. Raises RunError when the slice cannot be had again.
        """
        try:
            slice_ = self.resources.allocate(cid, len(cpus), len(mems), shared, list(cpus))
        except SliceError as exc:
            raise RunError("no_fit", str(exc)) from None
        if sorted(slice_.cpus) != sorted(cpus):
            self.resources.release(cid, slice_)
            raise RunError("no_fit", f"cpus {cpus} are not all available again")
        try:
            handle = self.runtime.create(cid, slice_.cpus, slice_.mems)
            self.runtime.take_over(handle, members)
        except Exception as exc:
            self.resources.release(cid, slice_)
            raise RunError("runtime", str(exc)) from None
        container = self._register(cid, uid, manifest, slice_, handle, "adopt")
        container.extra["adopted"] = True
        sink = _EventSink(self.publish)
        for tid, pid, argv in tasks:
            try:
                pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                continue
            task = Task(id=tid, container=container, argv=list(argv), sink=sink, detach=True,
                        pid=pid, pidfd=pidfd, adopted=True, started_at=time.monotonic())
            self.exits.add(pidfd, self._on_pid_exit, task)
            for stream, n in (("stdout", 1), ("stderr", 2)):
                fd = _reopen_pipe(pid, n)
                if fd >= 0:
                    task.pipes[stream] = fd
                    self.loop.add_reader(fd, self._on_readable, task, stream)
            container.tasks[tid] = task
            self.tasks[tid] = task
            self._tell("task_started", task)
            self.publish("task", {"event": "adopt", "container": cid, "task": tid,
                                  "pid": pid, "argv": task.argv})
        if not container.tasks:
            self._end_container(container)
        return container

    def shutdown(self) -> None:
        self.closing = True
        if self.pool is not None:
            self.pool.drain()
        for container in list(self.containers.values()):
            self._end_container(container)
        for fd, _ in self.client_watch.values():
            self.loop.remove_reader(fd)
            os.close(fd)
        self.client_watch.clear()
        self.exits.close()
        if self.pool is not None:
            self.pool.close()


def _refuse(sink: Sink, exc: RunError) -> None:
    """A run that will not start after all: tell its client, if it listens."""
    fail = getattr(sink, "failed", None)
    if fail:
        fail(exc.code, str(exc))


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _reap(pid: int) -> None:
    """Kill a task whose group was just killed (it may have left its group)
    and wait for it; an adopted task is not our child."""
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError, PermissionError):
        pass


def _spawn_error(argv, sched, exc: BaseException, stage: Optional[str] = None) -> RunError:
    """The reply for a failed launch, the same with or without spawners."""
    if stage is None:
        stage = ("exec" if isinstance(exc, OSError)
                 else "invalid" if isinstance(exc, (ValueError, TypeError)) else "runtime")
    msg = getattr(exc, "strerror", None) or str(exc)
    if stage == "invalid":
        return RunError("invalid", f"cannot execute {argv[0]!r}: {msg}")
    if isinstance(exc, PermissionError) and sched is not None:
        return RunError("sched", f"cannot execute {argv[0]!r}: {msg}")
    if stage == "exec" or (stage == "place" and isinstance(exc, OSError)):
        return RunError("exec", f"cannot execute {argv[0]!r}: {msg}")
    return RunError("runtime", f"cannot start task: {msg}")


_USER_CACHE_S = 30.0
_users: Dict[int, tuple] = {}


def _user(uid: int):
    """passwd lookups go through NSS (files, LDAP...): cache them briefly."""
    now = time.monotonic()
    hit = _users.get(uid)
    if hit is not None and now - hit[0] < _USER_CACHE_S:
        return hit[1]
    try:
        pw = pwd.getpwuid(uid)
    except KeyError:
        pw = None
    if len(_users) > 1024:
        _users.clear()
    _users[uid] = (now, pw)
    return pw


def user_name(uid: int) -> str:
    pw = _user(uid)
    return pw.pw_name if pw else str(uid)


def _groups(uid: int, gid: int) -> List[int]:
    pw = _user(uid)
    if pw is None:
        raise RunError("denied", f"uid {uid} has no passwd entry")
    return os.getgrouplist(pw.pw_name, gid)


class _EventSink(Sink):
    """Output of adopted tasks, whose client is gone: published as events."""

    def __init__(self, publish: Callable[[str, dict], None]):
        self.publish = publish

    def output(self, task: "Task", stream: str, data: bytes) -> bool:
        self.publish("task", {"event": "output", "container": task.container.id,
                              "task": task.id, "stream": stream,
                              "data": data.decode("utf-8", "replace")})
        return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _reopen_pipe(pid: int, fd: int) -> int:
    """A new read end of the pipe a process writes to, or -1."""
    path = f"/proc/{pid}/fd/{fd}"
    try:
        if not os.readlink(path).startswith("pipe:"):
            return -1
        return os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return -1


def _check_cwd_access(cwd: str, uid: int, gids: List[int]) -> None:
    """Refuse a cwd the user could not enter: the child chdirs before it
    drops root, so without this check a user could start in any directory."""
    path = "/"
    for part in [p for p in os.path.abspath(cwd).split("/") if p]:
        path = os.path.join(path, part)
        try:
            st = os.stat(path)
        except OSError as exc:
            raise RunError("cwd", f"working directory {cwd}: {exc.strerror}") from None
        if st.st_uid == uid:
            ok = st.st_mode & stat.S_IXUSR
        elif st.st_gid in gids:
            ok = st.st_mode & stat.S_IXGRP
        else:
            ok = st.st_mode & stat.S_IXOTH
        if not ok:
            raise RunError("cwd", f"working directory {cwd}: permission denied for uid {uid}")
