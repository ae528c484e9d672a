"""A campaign directory's state: an append-only journal and a lock.

``DIR/journal.jsonl`` holds one JSON object per line, each written and
fsynced before the coordinator takes its next step:

* ``started``  {id, attempt, params, repetition, inputs, node, container, t}
  before the launch;
* ``finished`` {id, attempt, outcome, ... the row} once the run's files
  are on disk (``interrupted`` is an outcome too).

A kill -9 during a write leaves at most one torn last line: readers skip
it with a warning (it can only be the record being written, never an
earlier finished result); the next writer cuts it off before appending. A
bad line anywhere else is an error, not something to guess around. JSON,
not pickle: readable by anything, nothing executed on load.

One writer per directory: an ``flock`` on ``DIR/lock``, which dies with
its holder, so a kill -9 needs no cleanup. The file names the holder.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import msgspec

JOURNAL = "journal.jsonl"
LOCK = "lock"
PLAN = "plan.json"

#: a run with one of these as its last outcome is finished for good
DONE = "ok"
FAILED = ("nonzero", "signaled", "timeout", "launch_error", "lost")
INTERRUPTED = "interrupted"
OUTCOMES = (DONE,) + FAILED + (INTERRUPTED,)


class JournalError(Exception):
    """The state cannot be read or written; ``str`` is the line to show."""


class Busy(JournalError):
    """Another coordinator holds the directory."""


class DirLock:
    """An exclusive, non-blocking flock on ``DIR/lock`` naming its holder."""

    def __init__(self, directory: str):
        self.path = os.path.join(directory, LOCK)
        self.fd: Optional[int] = None

    def acquire(self) -> "DirLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise Busy(f"campaign {os.path.dirname(self.path)} is run by {holder}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "DirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class Journal:
    """The appending side; only the lock holder opens one."""

    def __init__(self, directory: str, warn=None):
        self.path = os.path.join(directory, JOURNAL)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        size = os.fstat(self.fd).st_size
        if size:
            tail = os.pread(self.fd, min(size, 1 << 16), max(0, size - (1 << 16)))
            if not tail.endswith(b"\n"):
                cut = tail.rfind(b"\n")
                keep = size - len(tail) + cut + 1 if cut >= 0 else 0
                os.ftruncate(self.fd, keep)
                os.fsync(self.fd)
                if warn:
                    warn(f"{self.path}: dropped a torn last record ({size - keep} bytes)")

    def append(self, record: Dict[str, Any]) -> None:
        line = json.dumps(record, sort_keys=True, separators=(",", ":"), default=str) + "\n"
        os.write(self.fd, line.encode())
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


_decoder = msgspec.json.Decoder()


def read(directory: str) -> Tuple[List[dict], List[str]]:
    """(records, warnings). One decode of the whole file when it is clean
    (``status`` on a 100 000-run campaign stays well under a second); line
    by line only to find what is wrong."""
    path = os.path.join(directory, JOURNAL)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return [], []
    except OSError as exc:
        raise JournalError(f"{path}: {exc.strerror or exc}") from None
    warnings: List[str] = []
    body = data
    if body and not body.endswith(b"\n"):
        cut = body.rfind(b"\n") + 1
        warnings.append(f"{path}: skipped a torn last record ({len(body) - cut} bytes: "
                        "the coordinator was killed while writing it)")
        body = body[:cut]
    if not body:
        return [], warnings
    try:
        return _decoder.decode(b"[" + body.rstrip(b"\n").replace(b"\n", b",") + b"]"), warnings
    except msgspec.DecodeError:
        pass
    records = []
    for n, line in enumerate(body.splitlines(), 1):
        try:
            records.append(json.loads(line))
        except ValueError:
            raise JournalError(f"{path}:{n}: not a JSON record; the journal was edited "
                               "or damaged (fix or remove that line)") from None
    return records, warnings


@dataclass
class RunState:
    """What the journal says about one run id."""
    id: str
    params: Dict[str, Any] = field(default_factory=dict)
    repetition: int = 0
    attempts: int = 0
    running: Optional[dict] = None        # a started record with no finish
    last: Optional[dict] = None           # the last finished record
    history: List[dict] = field(default_factory=list)

    @property
    def state(self) -> str:
        if self.running is not None:
            return "running"
        if self.last is None:
            return "pending"
        outcome = self.last.get("outcome")
        if outcome == DONE:
            return "done"
        if outcome == INTERRUPTED:
            return "pending"
        return "failed"


def fold(records: List[dict]) -> Dict[str, RunState]:
    runs: Dict[str, RunState] = {}
    for rec in records:
        apply(runs, rec)
    return runs


def apply(runs: Dict[str, RunState], rec: dict) -> None:
    """Fold one record into the per-run states."""
    kind = rec.get("e")
    rid = rec.get("id")
    if rid is None or kind not in ("started", "finished"):
        return
    st = runs.get(rid)
    if st is None:
        st = runs[rid] = RunState(rid)
    st.attempts = max(st.attempts, rec.get("attempt", 1))
    if "params" in rec:
        st.params = rec["params"]
        st.repetition = rec.get("repetition", st.repetition)
    if kind == "started":
        st.running = rec
    else:
        st.running = None
        st.last = rec
        st.history.append(rec)


def write_plan(directory: str, plan: List[dict]) -> None:
    """The current sweep ({id, params, repetition} per run), so ``status``
    can count what is pending without the campaign file."""
    path = os.path.join(directory, PLAN)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(msgspec.json.encode(plan))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_plan(directory: str) -> Optional[List[dict]]:
    try:
        with open(os.path.join(directory, PLAN), "rb") as f:
            return _decoder.decode(f.read())
    except FileNotFoundError:
        return None
    except (OSError, msgspec.DecodeError) as exc:
        raise JournalError(f"{os.path.join(directory, PLAN)}: unreadable ({exc})") from None
