"""Batches: many keyed, detached launches in one request, whose tasks on
equal cpus run one at a time, in the order nrmd received them (the
``run_batch`` request, docs/protocol.md "Batches").

Each *slot* (a tuple of cpus) keeps its tasks in a deque, and lets at most
``WINDOW`` of them into the container manager at once: the one running and
the next, queued as a ``wait`` run, which the hand-over
(nrm/containers/handover.py) promises the running one's slice, so that a
spawner starts it the moment its predecessor exits, with no Python round
trip in between. The manager's own queue thus stays short however long a
batch is: its retry walks the whole queue at every container end.

A task not yet started can be withdrawn (``kill`` by its container name, a
``claim`` of its key): it is told ``not_started`` and never runs. Names of
batch tasks are reserved from their arrival to their end, so no ``run``
can join or shadow one.

``Batches`` is mixed into ``ContainerManager`` like ``HandOvers``: a slot's
steps are the manager's (queue a run, promise a slice, cancel a promise).
"""

from __future__ import annotations

from collections import deque
from typing import Deque, Dict, List, Optional, Tuple

from nrm.containers.model import Peer, Queued, RunError, Sink, Task
from nrm.manifest import Manifest

#: tasks of one slot inside the container manager at once: the running one
#: and the one promised its slice
WINDOW = 2


class BatchSink(Sink):
    """What a batch task's outcome is told to, beyond the manager's Sink
    calls: ``not_started`` when it was withdrawn before it ran."""

    def not_started(self, reason: str) -> None:
        pass


class Slot:
    """The tasks waiting for one set of cpus, in arrival order."""

    __slots__ = ("cpus", "queue", "inflight", "submitted", "window")

    def __init__(self, cpus: Tuple[int, ...], window: int):
        self.cpus = cpus
        self.queue: Deque["BatchItem"] = deque()
        #: items handed to the manager and not ended
        self.inflight = 0
        #: of those, the ones not started yet (waiting, promised or launching)
        self.submitted = 0
        self.window = window


class BatchItem(Sink):
    """One batch task from its arrival to its end: the Sink the manager
    reports to (forwarded to the request's ``sink``), and the slot's
    bookkeeping. ``state``: queued (in its slot), submitted (in the
    manager, not started), started, ended."""

    __slots__ = ("manager", "slot", "name", "sink", "manifest", "argv", "env", "cwd", "peer",
                 "oversubscribe", "state", "queued", "killed")

    def __init__(self, manager: "Batches", slot: Slot, name: str, sink: BatchSink,
                 manifest: Manifest, argv: List[str], env: Dict[str, str], cwd: str,
                 peer: Peer, oversubscribe: bool):
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
        self.state = "queued"
        self.queued: Optional[Queued] = None
        self.killed = False

    # -- the manager's calls ------------------------------------------------
    def started(self, task: Task) -> None:
        if self.state == "submitted":
            self.state = "started"
            self.slot.submitted -= 1
        self.sink.started(task)

    def exited(self, task: Task, profile: Optional[dict]) -> None:
        self._end()
        self.sink.exited(task, profile)

    def failed(self, code: str, message: str) -> None:
        self._end()
        self.sink.failed(code, message)

    def dropped(self) -> None:
        self.not_started("dropped before it started")

    # -- ours -----------------------------------------------------------------
    def not_started(self, reason: str) -> None:
        """Withdrawn (or dropped) before it ran."""
        if self.state == "ended":
            return
        self._end()
        self.sink.not_started(reason)

    def _end(self) -> None:
        state, self.state = self.state, "ended"
        if state == "ended":
            return
        m = self.manager
        if m.batch_names.get(self.name) is self:
            del m.batch_names[self.name]
        slot = self.slot
        if state == "submitted":
            slot.submitted -= 1
        if state != "queued":
            slot.inflight -= 1
            if slot.queue:
                m._pump(slot)
        if not slot.queue and not slot.inflight and m.slots.get(slot.cpus) is slot:
            del m.slots[slot.cpus]


class Batches:
    """Slots of batch tasks (see the module docstring). Uses
    ContainerManager's ``waiting``, ``promises``, ``containers``, ``closing``,
    ``_seq`` and steps ``_run``, ``_promise_slices``, ``_cancel``."""

    def _init_batches(self) -> None:
        self.slots: Dict[Tuple[int, ...], Slot] = {}
        #: every batch task not ended, by container name
        self.batch_names: Dict[str, BatchItem] = {}

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
        window = 1 if oversubscribe else WINDOW
        for manifest, argv, env, cwd, name, cpus, sink in tasks:
            slot = slots.get(cpus)
            if slot is None:
                slot = slots[cpus] = Slot(cpus, window)
            elif oversubscribe:
                slot.window = 1     # shared slices: no hand-over, one at a time
            item = BatchItem(self, slot, name, sink, manifest, argv, env, cwd, peer,
                             oversubscribe)
            self.batch_names[name] = item
            slot.queue.append(item)
            touched[cpus] = slot
        for slot in touched.values():
            self._pump(slot)

    def _pump(self, slot: Slot) -> None:
        """Hand the slot's next tasks to the manager, up to its window. A
        task queues behind an earlier one of its slot that has not started
        (no attempt at a slice that one is waiting for)."""
        queued_some = False
        while slot.queue and slot.inflight < slot.window and not self.closing:
            item = slot.queue.popleft()
            q = Queued(next(self._seq), item.peer, item.manifest, item.argv, item.env, item.cwd,
                       item, item.name, True, False, item.oversubscribe, list(slot.cpus),
                       batch=item)
            item.queued = q
            item.state = "submitted"
            slot.inflight += 1
            slot.submitted += 1
            if slot.submitted > 1:
                self.waiting.append(q)
                queued_some = True
                continue
            try:
                if self._run(q, wait=True) is None:
                    queued_some = True
            except RunError as exc:
                item.failed(exc.code, str(exc))
        if queued_some:
            self._promise_slices()

    # -- withdrawing ----------------------------------------------------------
    def batch_withdraw(self, name: str, reason: str, promised: bool = False) -> bool:
        """Take back a batch task that has not started: True when it is
        withdrawn (told ``not_started``) or, with ``promised``, will be once
        its spawner gives the held launch back (else it runs and is killed
        at once, as a kill of a launching task)."""
        item = self.batch_names.get(name)
        if item is None or item.state not in ("queued", "submitted"):
            return False
        if item.state == "queued":
            item.slot.queue.remove(item)
            item.not_started(reason)
            return True
        q = item.queued
        for i, w in enumerate(self.waiting):
            if w is q:
                del self.waiting[i]
                item.not_started(reason)
                return True
        if not promised:
            return False
        for promise in self.promises:
            if promise.queued is q:
                item.killed = True
                if promise.task is not None:
                    promise.task.doomed = True
                self._cancel(promise)
                return True
        return False

    def batch_shutdown(self) -> None:
        """nrmd stops: batch tasks not handed to a spawner never run."""
        for slot in list(self.slots.values()):
            while slot.queue:
                slot.queue.popleft().not_started("nrmd stopped before it started")
        for q in [q for q in self.waiting if q.batch is not None]:
            self.waiting.remove(q)
            q.batch.not_started("nrmd stopped before it started")
