"""The pilot's durable journal: what a resumed pilot rebuilds its state from.

One JSON object per line, appended to ``journal.jsonl`` in the pilot's aux
dir: the requests as given (with the clock and the unique id their
variables used, so a replayed submit names the same jobs), and the events
that changed a task's state (placed, started, ended). Everything else
(job states, omissions, the dependency index) follows from replaying those
through the same manager.

Why written per turn and synced in groups: a pilot changes thousands of
states a second and an fsync costs far more than the change. Records are
buffered and written with one ``write(2)`` per event-loop turn, and a
launch writes what is buffered before asking nrmd to start a task
(:meth:`Journal.write`), so no task runs that the journal does not know
was placed. A written record survives the pilot's own death (``kill -9``:
the page cache outlives the process); ``fdatasync`` only adds the
machine's crash, so it runs in a thread, at most every :data:`SYNC_S`,
covering every write since the last one, and when an API request is
acknowledged (:meth:`durable`). A crash can tear only the last line: the
reader skips it (and the writer cuts it off before appending); a bad line
anywhere else is corruption, reported, never guessed around.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
from typing import Any, Dict, List, Optional, Tuple

import msgspec

log = logging.getLogger("nrm.pilot")

FILE = "journal.jsonl"
VERSION = 2     # 2: one attempt record per task attempt (runs/SEQ.ATTEMPT)
#: the group commit: at most this long between a write and its fdatasync
SYNC_S = 0.05

#: compact JSON, as ``json.dumps(separators=(",", ":"))`` but ~10x cheaper
#: (three records per task); non-ASCII text stays UTF-8 instead of \u escapes
_encode = msgspec.json.Encoder().encode


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
    """Appends records; :meth:`write` hands them to the kernel (at the end
    of each event-loop turn when a loop runs, or before a launch), and the
    group commit makes them durable."""

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
        self._buffer: List[bytes] = []
        self._scheduled = False
        self._unsynced = False
        self._sync_timer: Optional[asyncio.TimerHandle] = None
        self._syncing: Optional[asyncio.Future] = None
        self.writes = 0
        self.syncs = 0
        self.records = 0

    def append(self, record: Dict[str, Any]) -> None:
        self._buffer.append(_encode(record))
        self.records += 1
        if not self._scheduled:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._scheduled = True
            loop.call_soon(self.write)

    def write(self) -> None:
        """What is buffered, to the kernel now (one write), the fdatasync
        scheduled."""
        self._scheduled = False
        if not self._buffer:
            return
        self._buffer.append(b"")
        data = b"\n".join(self._buffer)
        self._buffer.clear()
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
        self.writes += 1
        self._unsynced = True
        if self._sync_timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._sync_timer = loop.call_later(SYNC_S, self._group_commit)

    def _group_commit(self) -> None:
        self._sync_timer = None
        if self._unsynced and self.fd >= 0:
            self._sync()

    def _sync(self) -> "asyncio.Future[None]":
        """An fdatasync in a thread covering every write so far."""
        self._unsynced = False
        self.syncs += 1
        self._syncing = asyncio.get_running_loop().run_in_executor(None, os.fdatasync, self.fd)
        self._syncing.add_done_callback(_sync_done)
        return self._syncing

    async def durable(self) -> None:
        """Until every record appended so far is on disk."""
        self.write()
        if self._unsynced:
            await self._sync()
        elif self._syncing is not None and not self._syncing.done():
            await asyncio.shield(self._syncing)     # the sync in flight covers them

    def close(self) -> None:
        if self.fd >= 0:
            self.write()
            if self._sync_timer is not None:
                self._sync_timer.cancel()
                self._sync_timer = None
            os.fdatasync(self.fd)
            os.close(self.fd)
            self.fd = -1


def _sync_done(fut: asyncio.Future) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("journal fdatasync failed: %s", fut.exception())
