"""Batches: many keyed, detached launches in one request, whose tasks on
equal cpus run one at a time, in the order nrmd received them (the
``run_batch`` request, docs/protocol.md "Batches").

Each *slot* (a tuple of cpus) keeps its tasks in a deque and runs them, one
after another, as tasks of one container: the first one to start takes a
slice like any ``wait`` run (queued while the cpus are busy), and each next
one is handed to a spawner as soon as its predecessor has started, *held*
there until that predecessor exits (the spawner's FLAG_AFTER, as the
hand-over of nrm/containers/handover.py), then launched into the same
container if its cgroup is empty. So no Python turn lies between two tasks
of a slot, and a task costs no container of its own: no cgroup to prepare
and empty, no slice to allocate and hand over, no container events for the
listeners (state log, policies, profiles) — the measured bulk of nrmd's
work per launch after the request itself (docs/performance.md). The
container ends, like any, when its last task has ended and none is held.
A predecessor that leaves processes behind is answered ``occupied``: they
are killed, as a container's end would, and the next task launches.

A task joins its slot's container only when it has the uid, gid, manifest
and oversubscription of the task that made it (a container is its
owner's: ``kill``, ``list`` and its cgroup are), and only while no run
older than it waits in the manager's queue for some of the slot's cpus
(chaining would pass that run over for ever). Else the container ends
with its task and the next task queues for a slice of its own, in the
slot's order. Nor is a task ever launched into a container it is not held
behind (nothing would have emptied it): that container ends first, which
kills what is left in it.

Pumping a slot is not reentrant: a launch that fails at once ends its
item, whose end pumps the slot again; that nested pump returns at once
and the outer loop goes on, so a long run of failures costs no stack. An
item's outcome reaches its sink before the slot's next task is handed on.

A batch task's name is its own (``kill`` and keys use it), not its
container's. A task not yet started can be withdrawn (``kill`` by that
name, a ``claim`` of its key): it is told ``not_started`` and never runs.
Names are reserved from a task's arrival to its end, so no ``run`` can
join or shadow one.

``Batches`` is mixed into ``ContainerManager`` like ``HandOvers``: a slot's
steps are the manager's (queue a run, start a task, retire an exit).
"""

from __future__ import annotations

import logging
import os
from collections import deque
from typing import Deque, Dict, List, Optional, Tuple

from nrm.containers.model import Container, Peer, Queued, RunError, Sink, Task, refuse
from nrm.containers.processes import kill_group
from nrm.containers.spawner import SpawnError
from nrm.log import RateLimitedLog
from nrm.manifest import Manifest

log = logging.getLogger(__name__)
rl_log = RateLimitedLog(log, 10.0)


class BatchSink(Sink):
    """What a batch task's outcome is told to, beyond the manager's Sink
    calls: ``not_started`` when it was withdrawn before it ran; ``killed``
    when by its owner's ``kill`` (else it may run again: nrmd stopped, or
    it was claimed or dropped)."""

    def not_started(self, reason: str, killed: bool = False) -> None:
        pass


class Slot:
    """The tasks of one set of cpus: those waiting, in arrival order, the
    container they run in, its running task and the one next (``held``:
    handed to the manager or a spawner, not started). ``owner``: the uid,
    gid, manifest and oversubscription of the task that made the
    container, which a task must share to join it."""

    __slots__ = ("cpus", "cpuset", "queue", "container", "owner", "running", "held",
                 "inflight", "pumping")

    def __init__(self, cpus: Tuple[int, ...]):
        self.cpus = cpus
        self.cpuset = frozenset(cpus)
        self.queue: Deque["BatchItem"] = deque()
        self.container: Optional[Container] = None
        self.owner: Optional[tuple] = None
        self.running: Optional[Task] = None
        self.held: Optional["BatchItem"] = None
        #: items handed to the manager and not ended
        self.inflight = 0
        #: in ``_pump`` (a nested call returns: the outer loop goes on)
        self.pumping = False


class BatchItem(Sink):
    """One batch task from its arrival to its end: the Sink the manager
    reports to (forwarded to the request's ``sink``), and the slot's
    bookkeeping. ``state``: queued (in its slot), submitted (in the
    manager, not started), started, ended."""

    __slots__ = ("manager", "slot", "name", "sink", "manifest", "argv", "env", "cwd", "peer",
                 "oversubscribe", "seq", "state", "queued", "task", "killed")

    def __init__(self, manager: "Batches", slot: Slot, name: str, sink: BatchSink,
                 manifest: Manifest, argv: List[str], env, cwd: str,
                 peer: Peer, oversubscribe: bool, seq: int):
        self.manager = manager
        self.slot = slot
        self.name = name
        self.sink = sink
        self.manifest = manifest
        self.argv = argv
        self.env = env
        self.cwd = cwd
        self.peer = peer
        self.oversubscribe = oversubscribe
        #: its arrival among the manager's runs: older waiting runs go first
        self.seq = seq
        self.state = "queued"
        #: its run while it waits in the manager's queue (its slot's first)
        self.queued: Optional[Queued] = None
        self.task: Optional[Task] = None
        self.killed = False

    def owner(self) -> tuple:
        return (self.peer.uid, self.peer.gid, self.manifest, self.oversubscribe)

    # -- the manager's calls ------------------------------------------------
    def started(self, task: Task) -> None:
        slot = self.slot
        self.task = task
        if self.state == "submitted":
            self.state = "started"
            if slot.held is self:
                slot.held = None
        slot.running = task
        container = task.container
        if container.slot is None:
            container.slot = slot       # its first task: later ones follow in it
            slot.owner = self.owner()
        slot.container = container
        self.sink.started(task)
        if slot.queue:
            self.manager._pump(slot)

    def exited(self, task: Task, profile: Optional[dict]) -> None:
        if self._end():
            self.sink.exited(task, profile)
            self._settle()

    def failed(self, code: str, message: str) -> None:
        if self._end():
            self.sink.failed(code, message)
            self._settle()

    def dropped(self) -> None:
        self.not_started("dropped before it started")

    # -- ours -----------------------------------------------------------------
    def not_started(self, reason: str, killed: bool = False) -> None:
        """Withdrawn (or dropped) before it ran; ``killed``: by its owner."""
        if self._end():
            self.sink.not_started(reason, killed)
            self._settle()

    def _end(self) -> bool:
        """The slot's bookkeeping of its end; False when it had ended."""
        state, self.state = self.state, "ended"
        if state == "ended":
            return False
        m = self.manager
        if m.batch_names.get(self.name) is self:
            del m.batch_names[self.name]
        slot = self.slot
        if slot.held is self:
            slot.held = None
        if self.task is not None and slot.running is self.task:
            slot.running = None
        if state != "queued":
            slot.inflight -= 1
        return True

    def _settle(self) -> None:
        """Once its sink heard: the slot's next task, or the slot's end."""
        m, slot = self.manager, self.slot
        if slot.queue:
            m._pump(slot)
        if not slot.queue and not slot.inflight and m.slots.get(slot.cpus) is slot:
            del m.slots[slot.cpus]


class Batches:
    """Slots of batch tasks (see the module docstring). Uses
    ContainerManager's ``waiting``, ``promises``, ``containers``, ``pool``,
    ``runtime``, ``closing``, ``_seq`` and steps ``_run``, ``_start_task``,
    ``_promise_slices``, ``_cancel``, ``_exited``, ``_end_container``."""

    def _init_batches(self) -> None:
        self.slots: Dict[Tuple[int, ...], Slot] = {}
        #: every batch task not ended, by its name
        self.batch_names: Dict[str, BatchItem] = {}
        self.counters["batch_chained"] = 0
        #: held launches whose predecessor left processes behind (killed)
        self.counters["batch_occupied"] = 0

    def batch_name_taken(self, name: str) -> bool:
        return name in self.batch_names or name in self.containers

    def run_batch(self, peer: Peer, tasks: List[tuple], oversubscribe: bool = False) -> None:
        """Queue ``tasks``, each (manifest, argv, env, cwd, name, cpus, sink),
        in order; names must be free (``batch_name_taken``). Every task's
        outcome goes to its sink once: started then exited, failed, or
        not_started."""
        # no client to watch: batch tasks outlive theirs, queued ones included
        peer = Peer(peer.uid, peer.gid, 0)
        touched: Dict[Tuple[int, ...], Slot] = {}
        slots = self.slots
        for manifest, argv, env, cwd, name, cpus, sink in tasks:
            slot = slots.get(cpus)
            if slot is None:
                slot = slots[cpus] = Slot(cpus)
            item = BatchItem(self, slot, name, sink, manifest, argv, env, cwd, peer,
                             oversubscribe, next(self._seq))
            self.batch_names[name] = item
            slot.queue.append(item)
            touched[cpus] = slot
        for slot in touched.values():
            self._pump(slot)

    def _chainable(self, slot: Slot) -> Optional[Container]:
        """The slot's container, while it lives."""
        c = slot.container
        if c is None or self.containers.get(c.id) is not c or c.ending:
            slot.container = None
            return None
        return c

    def _may_join(self, slot: Slot, item: BatchItem) -> bool:
        """Whether ``item`` may run in the slot's container (module docstring)."""
        o = slot.owner
        if (o is None or o[0] != item.peer.uid or o[1] != item.peer.gid
                or o[3] != item.oversubscribe
                or not (o[2] is item.manifest or o[2] == item.manifest)):
            return False
        cpus, seq = slot.cpuset, item.seq
        for q in self.waiting:      # empty unless the node is contended
            if q.seq < seq and (q.allowed is None or not cpus.isdisjoint(q.allowed)):
                return False
        return True

    def _pump(self, slot: Slot) -> None:
        """Hand the slot's next task on: held by a spawner behind the
        running one, else queued for a slice (a container of its own). One
        at a time: the next waits until this one has started (it is held
        behind its pid). Not reentrant (module docstring)."""
        if slot.pumping:
            return
        slot.pumping = True
        try:
            self._pump_loop(slot)
        finally:
            slot.pumping = False

    def _pump_loop(self, slot: Slot) -> None:
        while slot.queue and slot.held is None and not self.closing:
            c = self._chainable(slot)
            prev = slot.running
            if prev is not None and (prev.finished or prev.pidfd < 0 or prev.container is not c):
                prev = None
            if c is not None:
                if not c.tasks and not c.starting:
                    # nothing to hold behind and nothing emptied it: it ends
                    # (killing what is left), the task gets a container of its own
                    self._end_container(c)
                    slot.container = None
                    continue
                if prev is None or not self._may_join(slot, slot.queue[0]) or not (
                        self.pool is not None and self.pool.alive()
                        and self.runtime.process_list(c.handle)):
                    return      # pumped again when the container's task ends
            item = slot.queue.popleft()
            item.state = "submitted"
            slot.held = item
            slot.inflight += 1
            try:
                if c is not None:
                    self.counters["batch_chained"] += 1
                    item.task = self._start_task(c, item.peer, item.argv, item.env, item.cwd,
                                                 item, True, False, after=prev)
                    continue
                q = item.queued = Queued(item.seq, item.peer, item.manifest, item.argv,
                                         item.env, item.cwd, item, None, True, False,
                                         item.oversubscribe, list(slot.cpus), batch=item)
                item.task = self._run(q, wait=True)
                if item.task is None:
                    self._promise_slices()
                continue
            except RunError as exc:
                code, message = exc.code, str(exc)
            except Exception as exc:
                rl_log.error("batch task %s: launch failed", item.name, exc_info=True)
                code, message = "runtime", f"cannot start task: {exc}"
            item.failed(code, message)      # its end pumps the slot: a nested no-op

    def _chained(self, task: Task, prev: Task, launch, result) -> None:
        """The spawner's answer to a launch held behind ``prev``."""
        container = task.container
        stage = result.stage if isinstance(result, SpawnError) else None
        if stage == "cancelled":
            self._retire_task(prev)
            container.starting.pop(task.id, None)
            item = task.sink
            if item.killed:
                item.not_started("killed before it started", killed=True)
            else:       # the pool drains: nrmd stops
                item.not_started("nrmd stopped before it started")
            if not container.tasks and not container.starting:
                self._end_container(container)
            return
        self._retire_task(prev)     # its exit first, as without a hold
        if stage == "occupied":
            # what prev left behind dies, as at a container's end; then the launch
            self.counters["batch_occupied"] += 1
            if self.containers.get(container.id) is container and not container.ending:
                try:
                    self.runtime.kill_all(container.handle)
                except Exception as exc:
                    # never a launch into what may still hold them
                    container.starting.pop(task.id, None)
                    refuse(task.sink, RunError(
                        "runtime", f"cannot kill what the task before it left: {exc}"))
                    if not container.tasks and not container.starting:
                        self._end_container(container)
                    return
                task.rid = self.pool.submit(launch[0], launch[1], near=container.slice.cpus[0])
                return
        launch[1](result)

    def _retire_task(self, task: Task) -> None:
        """A task a launch was held behind, when the spawner answers: its
        exit handled now if the spawner saw it (its pidfd left the loop's
        watch at the hold), else watched again (the hold was cancelled, or
        its spawner died)."""
        if task.pidfd < 0:
            return
        try:
            pid, status = os.waitpid(task.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = task.pid, None
        if pid:
            self._exited(task, status)
        elif task.pidfd not in self.exits:
            self.exits.add(task.pidfd, self._on_pid_exit, task)

    # -- withdrawing ----------------------------------------------------------
    def batch_kill(self, name: str) -> bool:
        """``kill`` of a batch task by its name: a running one is killed, one
        not started never runs (or, held by a spawner that launches it first,
        is killed at its start). False when no such task lives."""
        item = self.batch_names.get(name)
        if item is None:
            return False
        if item.state == "started":
            kill_group(item.task.pid)
            return True
        if self.batch_withdraw(name, "killed before it started", killed=True):
            return True
        task = item.task
        if task is not None:
            item.killed = True
            task.doomed = True      # launched after all: killed at its start
            if task.rid is not None and self.pool is not None:
                self.pool.cancel(task.rid)
            return True
        q = item.queued
        for promise in self.promises:
            if promise.queued is q:
                item.killed = True
                if promise.task is not None:
                    promise.task.doomed = True
                self._cancel(promise)
                return True
        return False

    def batch_withdraw(self, name: str, reason: str, killed: bool = False) -> bool:
        """Take back a batch task that is not in a spawner's hands yet (in
        its slot, or in the manager's queue): True when it never runs.
        ``killed``: by its owner (else it may run again, as after a claim)."""
        item = self.batch_names.get(name)
        if item is None or item.state not in ("queued", "submitted"):
            return False
        if item.state == "queued":
            item.slot.queue.remove(item)
            item.not_started(reason, killed)
            return True
        q = item.queued
        if q is None or item.task is not None:
            return False
        for i, w in enumerate(self.waiting):
            if w is q:
                del self.waiting[i]
                item.not_started(reason, killed)
                return True
        return False

    def batch_shutdown(self) -> None:
        """nrmd stops: batch tasks not handed to a spawner never run (their
        keys ``lost``: a resumed client may run them again). Called again
        once the spawners have drained, for the launches they gave back."""
        for slot in list(self.slots.values()):
            while slot.queue:
                slot.queue.popleft().not_started("nrmd stopped before it started")
        for q in [q for q in self.waiting if q.batch is not None]:
            self.waiting.remove(q)
            q.batch.not_started("nrmd stopped before it started")
