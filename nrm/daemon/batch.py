"""The reply side of a ``run_batch``: each task's outcome recorded under its
key and coalesced into one ``exits`` reply per loop turn.

Why coalesced: the point of a batch is nrmd's CPU per task, and a reply
per exit was much of it (a zmq send through the I/O thread, ~65 us, an
encode, a key-file flush). The first exit after a quiet ``INTERVAL_S``
goes out at the end of its loop turn; the ones that follow within the
interval go out together when it ends (a 1 ms task per cpu then costs one
message per few exits, not one each). Each message follows one flush of
the key file, so that no exit is heard before it is on file.
"""

from __future__ import annotations

from typing import List, Optional

from nrm import protocol
from nrm.containers.batches import BatchSink
from nrm.containers.model import Task


#: at most one ``exits`` message per request this often
INTERVAL_S = 0.002


class BatchReply:
    """One request's stream of ``exits``: what is owed, what is pending."""

    __slots__ = ("req", "keys", "loop", "pending", "scheduled", "last")

    def __init__(self, req, keys, loop):
        self.req = req
        self.keys = keys
        self.loop = loop
        self.pending: List[protocol.BatchExit] = []
        self.scheduled = False
        self.last = -INTERVAL_S

    def add(self, exit_: protocol.BatchExit) -> None:
        self.pending.append(exit_)
        if not self.scheduled:
            self.scheduled = True
            due = self.last + INTERVAL_S
            if self.loop.time() >= due:
                self.loop.call_soon(self.flush)
            else:
                self.loop.call_at(due, self.flush)

    def flush(self) -> None:
        self.scheduled = False
        self.last = self.loop.time()
        if not self.pending:
            return
        exits, self.pending = self.pending, []
        self.keys.flush()       # on file before it is heard
        self.req.reply(protocol.Exits(exits=exits))


class BatchTaskSink(BatchSink):
    """One task's outcome: to its key, then to the request's reply."""

    __slots__ = ("reply", "key", "name", "uid")

    def __init__(self, reply: BatchReply, key: str, name: str, uid: int):
        self.reply = reply
        self.key = key
        self.name = name
        self.uid = uid

    def started(self, task: Task) -> None:
        keys = self.reply.keys
        keys.withdraw.pop((self.uid, self.key), None)
        keys.started(self.uid, self.key, task, self.name)

    def exited(self, task: Task, profile: Optional[dict]) -> None:
        keys = self.reply.keys
        keys.withdraw.pop((self.uid, self.key), None)
        keys.exited(self.uid, self.key, task, flush=False)
        if task.signal is not None:
            status: Optional[int] = -task.signal
        else:
            status = task.code
        error = None
        if task.killed:
            error = "killed with nrmd"
        elif task.adopted:
            status, error = None, "adopted: its status is unknown"
        self.reply.add(protocol.BatchExit(
            key=self.key, container=self.name, pid=task.pid, status=status,
            started_at=task.started_at or None, error=error))

    def failed(self, code: str, message: str) -> None:
        self._unstarted(f"{code}: {message}", True)

    def not_started(self, reason: str, killed: bool = False) -> None:
        # only its owner's kill makes it ``failed``; else (nrmd stopped, it
        # was dropped) its key is ``lost``: it never ran, a resumed client
        # may run it (a claim's withdrawal has fenced the key already)
        self._unstarted(reason, killed)

    def _unstarted(self, message: str, final: bool) -> None:
        keys = self.reply.keys
        keys.withdraw.pop((self.uid, self.key), None)
        if final:
            keys.failed(self.uid, self.key, message)
        else:
            keys.dropped(self.uid, self.key)
        self.reply.add(protocol.BatchExit(key=self.key, container=self.name, error=message))
