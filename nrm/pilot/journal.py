"""The pilot's durable journal: what a resumed pilot rebuilds its state from.

One JSON object per line, appended to ``journal.jsonl`` in the pilot's aux
dir: the requests as given (with the clock and the unique id their
variables used, so a replayed submit names the same jobs), and the events
that changed a task's state (placed, started, ended). Everything else
(job states, omissions, the dependency index) follows from replaying those
through the same manager.

Why batched: a pilot changes thousands of states a second and an fsync
costs far more than the change. Records are buffered and written with ONE
``fdatasync`` per event-loop turn; a launch waits for :meth:`durable`
before asking nrmd to start a task, so no task runs that the journal does
not know was placed. A crash can tear only the last line: the reader skips
it (and the writer cuts it off before appending); a bad line anywhere else
is corruption, reported, never guessed around.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
from typing import Any, Dict, List, Optional, Tuple

FILE = "journal.jsonl"
VERSION = 1


class JournalError(Exception):
    """The journal cannot be used (missing, unreadable, corrupt)."""


def read(path: str) -> Tuple[List[Dict[str, Any]], int]:
    """The records, and the byte length of the intact part (a torn last
    line is left out of both)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise JournalError(f"{path}: cannot read: {exc.strerror or exc}") from None
    records: List[Dict[str, Any]] = []
    good = 0
    lines = data.split(b"\n")[:-1]          # what follows the last newline is torn
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "t" not in record:
                raise ValueError("not a record")
        except ValueError:
            if number == len(lines):
                break                        # the last write, torn by a crash: skipped
            raise JournalError(f"{path}: line {number} is not a journal record "
                               "(the journal is corrupt)") from None
        records.append(record)
        good += len(line) + 1
    if not records or records[0].get("t") != "head":
        raise JournalError(f"{path}: no journal header (not a pilot journal)")
    if records[0].get("v") != VERSION:
        raise JournalError(f"{path}: journal version {records[0].get('v')!r}, "
                           f"this nrm reads {VERSION}")
    return records, good


class Journal:
    """Appends records; :meth:`flush` makes them durable (scheduled once per
    event-loop turn when a loop runs, explicit otherwise)."""

    def __init__(self, path: str, truncate_to: Optional[int] = None):
        self.path = path
        fresh = not os.path.exists(path)
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:                # one pilot per journal: a resume while it still runs is refused
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise JournalError(f"{path}: another pilot is using this journal") from None
        if truncate_to is not None:
            os.ftruncate(self.fd, truncate_to)     # the torn last line, if any
        if fresh:                           # the file's name must survive a crash too
            dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        self._buffer: List[str] = []
        self._waiters: List[asyncio.Future] = []
        self._scheduled = False
        self.flushes = 0
        self.records = 0

    def append(self, record: Dict[str, Any]) -> None:
        self._buffer.append(json.dumps(record, separators=(",", ":")))
        self.records += 1
        if not self._scheduled:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._scheduled = True
            loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if self._buffer:
            data = ("\n".join(self._buffer) + "\n").encode()
            self._buffer.clear()
            view = memoryview(data)
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
            os.fdatasync(self.fd)
            self.flushes += 1
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def durable(self) -> None:
        """Until every record appended so far is on disk."""
        if not self._buffer:
            return
        loop = asyncio.get_running_loop()
        if not self._scheduled:             # appended before the loop ran
            self._scheduled = True
            loop.call_soon(self.flush)
        fut = loop.create_future()
        self._waiters.append(fut)
        await fut

    def close(self) -> None:
        if self.fd >= 0:
            self.flush()
            os.close(self.fd)
            self.fd = -1
