"""Hand-over: the slice of a container that ends with its task, promised
to a run waiting for one.

A run that waits for a slice may be *promised* the slice of a running
container that will end with its only task. A spawner then holds its
launch and starts it the moment that task exits, if its cgroup is empty,
without waiting for the daemon to notice the exit: on a busy node the
daemon's turn-around was the slice's idle time (docs/performance.md). The
daemon retires the predecessor (its exit, its container's end and every
listener's restore) before the heir is registered, so the managers see the
same order as without a hand-over. See ``Promise`` in
nrm/containers/model.py.

``HandOvers`` is the part of ``ContainerManager`` that makes, keeps and
breaks promises; it is mixed into the manager rather than held by it
because a promise is made of the manager's own state (its queue, its
containers, its launches) and its steps are the manager's (start a task,
finish an exit, enroll a container): a separate object would reach into
all of them, and add a call on the launch path.
"""

from __future__ import annotations

import logging
import os
from typing import List

from nrm.containers.model import Container, Promise, Queued, RunError, new_id, refuse
from nrm.containers.processes import alive
from nrm.containers.slices import Slice
from nrm.containers.spawner import SpawnError

log = logging.getLogger(__name__)

#: a promised run passed over this many times by younger runs is taken back
#: and promised again (to the next slice to free), so that a long-running
#: predecessor cannot starve it
PASSES_BEFORE_REPROMISE = 2
#: promises at once; a spawner holds at most 1024 (libnrm/src/spawner.c)
MAX_PROMISES = 512


class HandOvers:
    """Promises of slices to queued runs (see the module docstring). Uses
    ContainerManager's state (``waiting``, ``promises``, ``containers``,
    ``pool``, ``runtime``, ``resources``, ``clients``, ``counters``) and
    steps (``_start_task``, ``_exited``, ``_drain_and_finish``, ``_enroll``,
    ``_launch_failed``, ``_retry_waiting``)."""

    def _predecessors(self) -> List[Container]:
        """Containers whose slice can be promised, the oldest task first."""
        if self.pool is None or self.closing or not self.pool.alive():
            return []
        found = []
        for c in self.containers.values():
            if (c.anonymous and c.heir is None and c.slot is None and not c.ending
                    and not c.starting
                    and len(c.tasks) == 1 and not c.slice.shared
                    and "adopted" not in c.extra):
                (task,) = c.tasks.values()
                if task.pidfd >= 0 and self.runtime.process_list(c.handle):
                    found.append((task.started_at, c))
        found.sort(key=lambda pair: pair[0])
        return [c for _, c in found]

    def _fits(self, q: Queued, c: Container) -> bool:
        return ((q.name is None or q.batch is not None) and not q.oversubscribe and c.id != q.avoid
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
            if q.peer.pid and q.peer.pid not in self.clients.watched and not alive(q.peer.pid):
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
            refuse(q.sink, exc)
            return
        if q.peer.pid and not q.detach and not self.clients.watch(q.peer.pid, task):
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
            self.clients.unwatch(promise.task)
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
                if q.batch is not None and q.batch.killed:
                    q.batch.not_started("killed before it started", killed=True)
                    self._retry_waiting()
                    return
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
