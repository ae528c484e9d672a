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
running container that will end with its only task
(nrm/containers/handover.py).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import sys
import time
from collections import deque
from typing import Callable, Deque, Dict, List, Optional

from nrm.containers.batches import Batches
from nrm.containers.clients import ClientWatch, client_gone
from nrm.containers.exits import ExitWatch
from nrm.containers.handover import HandOvers
from nrm.containers.identity import AccessDenied, check_cwd_access, groups_of
from nrm.containers.model import (CONTAINER_NAME, Container, ContainerListener, Peer, Promise,
                                  Queued, RunError, Sink, Task, check_no_nul, new_id, refuse)
from nrm.containers.processes import alive, kill_group, reap, reopen_pipe
from nrm.manifest import Manifest
from nrm.containers.slices import ResourceManager, Slice, SliceError
from nrm.containers.runtimes import SCHED_POLICIES, Handle, Runtime
from nrm.containers.spawner import SpawnError, SpawnerPool, SplitEnv, env_list

log = logging.getLogger(__name__)

READ_CHUNK = 65536
EOF_GRACE_S = 0.2          # wait this long for pipes after the task exited


class ContainerManager(HandOvers, Batches):
    """Owns every container and task of the daemon: launches, output, exits,
    teardown, the queue of runs waiting for a slice, the promises made
    to them (``HandOvers``) and the slots of batch tasks (``Batches``)."""

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
        self._hooks: Dict[str, list] = {}
        self._hooks_for: List[ContainerListener] = []
        self.waiting: Deque[Queued] = deque()
        self.promises: List[Promise] = []
        self._seq = itertools.count()
        self.closing = False
        self.clients = ClientWatch(self.loop, self._client_exited)
        self.counters = {"tasks_started": 0, "tasks_finished": 0, "containers_started": 0,
                         "containers_finished": 0, "spawn_failures": 0, "handovers": 0,
                         "handovers_occupied": 0, "handovers_cancelled": 0}
        self._init_batches()
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
        if container_name is not None and container_name in self.batch_names:
            raise RunError("busy", f"container {container_name} is a batch task's")
        check_no_nul(argv, env, cwd)
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
        container.anonymous = q.name is None or q.batch is not None
        try:
            return self._start_task(container, q.peer, q.argv, q.env, q.cwd, q.sink,
                                    q.detach, q.output)
        except Exception as exc:
            # whatever failed, the container made for it ends and its slice goes back
            if not container.tasks and not container.starting:
                self._end_container(container)
            if isinstance(exc, RunError):
                raise
            log.error("launch into %s failed", cid, exc_info=True)
            raise RunError("runtime", f"cannot start task: {exc}") from None

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
        listener is logged, never fatal to the container. The bound hooks
        are looked up once per hook while the listeners stay the same
        (three calls per task, five listeners)."""
        fns = self._hooks.get(hook)
        if fns is None or self._hooks_for != self.listeners:
            if self._hooks_for != self.listeners:
                self._hooks, self._hooks_for = {}, list(self.listeners)
            fns = self._hooks[hook] = [(listener, fn) for listener in self.listeners
                                       for fn in (getattr(listener, hook, None),) if fn]
        for listener, fn in fns:
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
                    promise: Optional[Promise] = None, after: Optional[Task] = None) -> Task:
        """Start a task; with spawners it is returned still starting and the
        sink hears `started` (or `failed`) when the spawner answers. With
        ``promise``, the spawner holds the launch until the predecessor's
        task exits; with ``after`` (a running task of the same container, a
        batch slot's), until that task exits (nrm/containers/batches.py)."""
        task = Task(id=new_id(), container=container, argv=list(argv), sink=sink,
                    client_pid=peer.pid, detach=detach)
        ids: Dict[str, object] = {}
        if self.privileged and peer.uid != 0:
            try:
                groups = groups_of(peer.uid, peer.gid)
                check_cwd_access(cwd, peer.uid, groups)
            except AccessDenied as exc:
                raise RunError(exc.code, str(exc)) from None
            ids = {"uid": peer.uid, "gid": peer.gid, "groups": groups}
        bind_cpus, bind_mems, sched = self._spawn_options(container)
        task.cpus = list(bind_cpus) if bind_cpus else None
        argv = self._wrap_perf(container, argv)
        try:
            if type(env) is SplitEnv:
                if container.manifest.power.policy == "NONE":
                    # what nrmd sets never reads the base (no interposer to find)
                    extra = self.task_env(container, task, env.extra)
                    envl = env.base.entries(frozenset(extra)) + env_list(extra)
                else:
                    envl = env_list(self.task_env(container, task, env.merged()))
            else:
                envl = env_list(self.task_env(container, task, env))
        except (ValueError, TypeError) as exc:
            raise RunError("invalid", f"cannot execute {argv[0]!r}: {exc}") from None
        if self.pool is None or (self.runtime.in_process and not self.pool.alive()):
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

        if after is not None:
            launch = (request, launched)
            task.rid = self.pool.submit(
                dict(request, after=self.runtime.process_list(container.handle)),
                lambda result: self._chained(task, after, launch, result),
                near=near, after=after.pidfd)
            if task.rid is not None:
                # the spawner's answer tells its exit (it waits for it): no
                # wake-up of the loop of its own (batches.py)
                self.exits.remove(after.pidfd)
            return task
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

    def _launch_failed(self, sink: Sink, argv, sched, result: SpawnError) -> None:
        self.counters["spawn_failures"] += 1
        refuse(sink, _spawn_error(argv, sched, result.oserror or RuntimeError(str(result)),
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
            kill_group(result.pid)
            reap(result.pid)
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
            kill_group(task.pid)

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
            self.clients.watch(peer.pid, task)
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
        n = task.sink.room(task)
        if n <= 0:
            self.loop.remove_reader(fd)
            task.paused[stream] = True
            return
        try:
            data = os.read(fd, n)
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
        self.clients.unwatch(task)
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
            # a task that ended on its own, its exit not handled yet, keeps
            # its status: only a task nrmd kills is ``killed`` (interrupted)
            status = _ended_status(task.pid)
            kill_group(task.pid)
            if status is None:
                reap(task.pid)
                task.signal = signal.SIGKILL
                task.killed = True
            elif os.WIFSIGNALED(status):
                task.signal = os.WTERMSIG(status)
            else:
                task.code = os.WEXITSTATUS(status)
            self.exits.remove(task.pidfd)
            os.close(task.pidfd)
            task.pidfd = -1
        for stream in list(task.pipes):
            fd = task.pipes.pop(stream)
            self.loop.remove_reader(fd)
            os.close(fd)
        task.finished = True
        task.container.tasks.pop(task.id, None)
        self.tasks.pop(task.id, None)
        self.clients.unwatch(task)
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
            if q.peer.pid and q.peer.pid not in self.clients.watched and not alive(q.peer.pid):
                q.sink.dropped()    # its client gave up waiting (Ctrl-C, killed)
                continue
            try:
                self._run(q, wait=True)
            except RunError as exc:
                refuse(q.sink, exc)
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
            item = self.batch_names.get(name)
            if item is not None and not peer.may_touch(item.peer.uid):
                raise RunError("denied", f"container {name} belongs to uid {item.peer.uid}")
            if item is not None and self.batch_kill(name):
                return 1
            raise RunError("not_found", f"no container {name}")
        if not peer.may_touch(container.uid):
            raise RunError("denied", f"container {name} belongs to uid {container.uid}")
        self.runtime.kill_all(container.handle, signal.SIGKILL)
        for task in container.starting.values():
            task.doomed = True
        return len(container.tasks) + len(container.starting)

    def kill_task(self, peer: Peer, task_id: str, name: str) -> int:
        """``kill`` of a task by an id found for ``name`` elsewhere (an
        adopted batch task: its name was nrmd's memory, its key remembers
        it); RunError not_found when it has ended."""
        task = self.tasks.get(task_id)
        if task is None or task.finished or task.pid <= 0:
            raise RunError("not_found", f"no container {name}")
        if not peer.may_touch(task.container.uid):
            raise RunError("denied", f"container {name} belongs to uid {task.container.uid}")
        kill_group(task.pid)
        return 1

    def _client_exited(self, pid: int, task_ids) -> None:
        """A client that streamed tasks is gone: so are they, and its
        promised runs."""
        for tid in task_ids:
            task = self.tasks.get(tid)
            if task is not None:
                client_gone(task)
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
                fd = reopen_pipe(pid, n)
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
        self.batch_shutdown()
        if self.pool is not None:
            self.pool.drain()
            self.batch_shutdown()       # promised launches the drain took back
        for container in list(self.containers.values()):
            self._end_container(container)
        self.clients.close()
        self.exits.close()
        if self.pool is not None:
            self.pool.close()


def _ended_status(pid: int) -> Optional[int]:
    """The wait status of a child that has exited, reaped; None while it
    runs, or when it is not our child (adopted: init reaps it)."""
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None
    return status if done else None


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


class _EventSink(Sink):
    """Output of adopted tasks, whose client is gone: published as events."""

    def __init__(self, publish: Callable[[str, dict], None]):
        self.publish = publish

    def output(self, task: "Task", stream: str, data: bytes) -> bool:
        self.publish("task", {"event": "output", "container": task.container.id,
                              "task": task.id, "stream": stream,
                              "data": data.decode("utf-8", "replace")})
        return True
