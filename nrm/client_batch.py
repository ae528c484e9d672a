"""``AsyncClient.run_batch``'s two ways (nrm/client.py): following the
``exits`` replies of an nrmd with feature "batch", and emulating a batch
with one keyed ``start_run`` per task against an nrmd without it.

Kept apart from nrm/client.py, which imports it on a batch's first use:
the blocking client and the CLI never pay for it.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any, Deque, Dict, List, Tuple

from nrm import protocol
from nrm.client import NrmError, _encode_request

if TYPE_CHECKING:
    from nrm.client import AsyncClient


def plan_batch(ids, manifest: dict, env: Dict[str, str], tasks: List[protocol.BatchTask],
               oversubscribe: bool) -> Tuple[List[tuple], List[protocol.BatchExit]]:
    """The requests of one batch, each (msg, its encoding), halved until
    each is within nrmd's limit; and the exits of tasks too large alone.
    Nothing is sent here: a size refusal is never half-sent. Raises
    NrmError (too_large) when the manifest and env alone are too large."""
    _encode_request(protocol.RunBatch(manifest=manifest, env=env, oversubscribe=oversubscribe))
    plan: List[tuple] = []
    alone: List[protocol.BatchExit] = []
    todo = [tasks]
    while todo:
        part = todo.pop()
        msg = protocol.RunBatch(manifest=manifest, env=env, oversubscribe=oversubscribe,
                                tasks=part)
        msg.id = next(ids)
        try:
            plan.append((msg, _encode_request(msg)))
        except NrmError as exc:
            if exc.code != "too_large":
                raise
            if len(part) == 1:
                alone.append(protocol.BatchExit(key=part[0].key, container=part[0].container,
                                                error=f"{exc.code}: {exc}"))
            else:
                half = len(part) // 2
                todo += [part[half:], part[:half]]      # the first half next: in order
    return plan, alone


class BatchReplies:
    """The replies of one ``run_batch`` (possibly sent as several requests,
    ``split``): counts the exits, calls back, ends the future. An error
    reply to one of several reports that request's tasks with it."""

    __slots__ = ("queues", "ids", "tasks", "split", "left", "on_exits", "future")

    def __init__(self, queues: dict, n: int, on_exits, future, split: bool = False):
        self.queues = queues
        self.ids: List[int] = []
        #: each request's tasks, by its id
        self.tasks: Dict[int, List[protocol.BatchTask]] = {}
        self.split = split
        self.left = n
        self.on_exits = on_exits
        self.future = future

    def put(self, item: tuple) -> None:
        reply = item[0]
        if self.future.done():
            return
        if isinstance(reply, protocol.Error):
            tasks = self.tasks.pop(reply.id, None)
            if not self.split or tasks is None:
                self.fail(NrmError(reply.code, reply.message))
                return
            self.queues.pop(reply.id, None)
            error = f"{reply.code}: {reply.message}"
            reply = protocol.Exits(exits=[protocol.BatchExit(key=t.key, container=t.container,
                                                             error=error) for t in tasks])
        if not isinstance(reply, protocol.Exits):
            return
        self.left -= len(reply.exits)
        try:
            if reply.exits:
                self.on_exits(reply.exits)
        except BaseException as exc:
            self.fail(exc)
            return
        if self.left <= 0:
            self._close()
            self.future.set_result(None)

    def fail(self, exc: BaseException) -> None:
        self._close()
        if not self.future.done():
            self.future.set_exception(exc)

    def _close(self) -> None:
        for i in self.ids:
            self.queues.pop(i, None)


class EmulatedSlot:
    """One cpus set's emulated batch tasks, in call order."""

    __slots__ = ("queue", "inflight")

    def __init__(self):
        self.queue: Deque[tuple] = deque()
        self.inflight = 0


class EmulatedBatch:
    """``run_batch`` against an nrmd without "batch": one ``start_run`` per
    task, at most two per cpus set in flight (the second waits in nrmd's
    queue), each exit reported alone."""

    def __init__(self, client: "AsyncClient", manifest, env, tasks, on_exits, oversubscribe,
                 fut):
        self.client = client
        self.manifest = manifest
        self.manifests: Dict[int, Any] = {}
        self.env = env
        self.tasks = tasks
        self.on_exits = on_exits
        self.oversubscribe = oversubscribe
        self.fut = fut
        self.left = len(tasks)

    def start(self) -> None:
        slots = self.client._emulated_slots
        touched = {}
        for task in self.tasks:
            cpus = tuple(task.cpus)
            slot = slots.get(cpus)
            if slot is None:
                slot = slots[cpus] = EmulatedSlot()
            slot.queue.append((self, task))
            touched[cpus] = slot
        for cpus, slot in touched.items():
            emulated_pump(self.client, cpus, slot)

    def launch(self, task: protocol.BatchTask, cpus: tuple, slot: EmulatedSlot) -> None:
        import asyncio
        import dataclasses
        n = len(task.cpus)
        m = self.manifests.get(n)
        if m is None:
            m = self.manifests[n] = dataclasses.replace(
                self.manifest, slice=dataclasses.replace(self.manifest.slice, cpus=n))
        env = dict(self.env, **task.env) if task.env else self.env
        try:
            follow = self.client.start_run(
                m, task.argv, env=env, cwd=task.cwd, key=task.key, container=task.container,
                detach=True, follow=True, wait=True, output=False, cpus_allowed=list(task.cpus),
                oversubscribe=self.oversubscribe)
        except Exception as exc:        # reported as the task's error, whatever it is
            follow = exc
        asyncio.ensure_future(self._follow(task, follow, cpus, slot)).add_done_callback(quiet)

    async def _follow(self, task, follow, cpus, slot) -> None:
        try:
            if isinstance(follow, BaseException):
                raise follow
            r = await follow
            exit_ = protocol.BatchExit(key=task.key, container=task.container, pid=r.pid,
                                       status=-r.signal if r.signal is not None else r.code,
                                       started_at=r.started_at)
        except NrmError as exc:
            exit_ = protocol.BatchExit(key=task.key, container=task.container,
                                       error=f"{exc.code}: {exc}")
        except Exception as exc:
            # never a task unreported (and the batch's future never done)
            exit_ = protocol.BatchExit(key=task.key, container=task.container,
                                       error=f"client: {type(exc).__name__}: {exc}")
        finally:
            slot.inflight -= 1
            emulated_pump(self.client, cpus, slot)
        if self.fut.done():
            return
        self.left -= 1
        try:
            self.on_exits([exit_])
        except BaseException as exc:
            self.fut.set_exception(exc)
            return
        if not self.left:
            self.fut.set_result(None)


def emulated_pump(client: "AsyncClient", cpus: tuple, slot: EmulatedSlot) -> None:
    window = 2
    while slot.queue and slot.inflight < window:
        batch, task = slot.queue.popleft()
        if batch.oversubscribe:
            window = 1      # shared slices: two would overlap
            if slot.inflight:
                slot.queue.appendleft((batch, task))
                break
        slot.inflight += 1
        batch.launch(task, cpus, slot)
    if not slot.queue and not slot.inflight:
        client._emulated_slots.pop(cpus, None)


def quiet(fut) -> None:
    """Retrieve a background task's exception (reported elsewhere)."""
    if not fut.cancelled():
        fut.exception()
