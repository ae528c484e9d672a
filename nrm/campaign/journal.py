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

import json
import os
import socket
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import msgspec

from nrm import jsonlines

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
        try:
            self.fd = jsonlines.hold(self.path,
                                     f"pid {os.getpid()} on host {socket.gethostname()}")
        except jsonlines.Locked as exc:
            raise Busy(f"campaign {os.path.dirname(self.path)} is run by "
                       f"{exc.holder or 'another process'}") from None
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
        self.fd = jsonlines.open_append(self.path, 0o644, readable=True)
        dropped = jsonlines.cut_torn_tail(self.fd)
        if dropped and warn:
            warn(f"{self.path}: dropped a torn last record ({dropped} bytes)")

    def append(self, record: Dict[str, Any]) -> None:
        line = json.dumps(record, sort_keys=True, separators=(",", ":"), default=str) + "\n"
        jsonlines.append(self.fd, line.encode(), durable=True)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


_decoder = msgspec.json.Decoder()


class Brief(msgspec.Struct):
    """The fields ``status`` needs; msgspec skips the rest (the rows)
    without building them, which keeps 100 000 runs well under a second."""
    e: str = ""
    id: Optional[str] = None
    attempt: int = 1
    outcome: Optional[str] = None


_brief = msgspec.json.Decoder(Brief)


def _body(directory: str) -> Tuple[str, bytes, List[str]]:
    path = os.path.join(directory, JOURNAL)
    try:
        data, torn = jsonlines.complete(jsonlines.read(path))
    except FileNotFoundError:
        return path, b"", []
    except OSError as exc:
        raise JournalError(f"{path}: {exc.strerror or exc}") from None
    warnings: List[str] = []
    if torn:
        warnings.append(f"{path}: skipped a torn last record ({torn} bytes: "
                        "the coordinator was killed while writing it)")
    return path, data, warnings


def _decode(path: str, body: bytes, decoder) -> list:
    """All lines at once; line by line only to name the bad one."""
    try:
        return decoder.decode_lines(body)
    except msgspec.DecodeError:
        pass
    for n, line in enumerate(body.splitlines(), 1):
        try:
            json.loads(line)
        except ValueError:
            raise JournalError(f"{path}:{n}: not a JSON record; the journal was edited "
                               "or damaged (fix or remove that line)") from None
    raise JournalError(f"{path}: records of an unexpected shape")


def read(directory: str) -> Tuple[List[dict], List[str]]:
    """(records, warnings): every record, whole."""
    path, body, warnings = _body(directory)
    return (_decode(path, body, _decoder) if body else []), warnings


def read_brief(directory: str) -> Tuple[List[Brief], List[str]]:
    """(records without their rows, warnings), for counting."""
    path, body, warnings = _body(directory)
    return (_decode(path, body, _brief) if body else []), warnings


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


def write_plan(directory: str, runs) -> None:
    """The current sweep, so ``status`` can count what is pending without
    the campaign file. Columnar: each parameter's distinct values once,
    then per run [id, repetition, value index per parameter]."""
    names: List[str] = []
    values: Dict[str, List[Any]] = {}
    index: Dict[str, Dict[bytes, int]] = {}
    rows = []
    for run in runs:
        row: List[Any] = [run.id, run.repetition]
        for name, value in run.params.items():
            if name not in values:
                names.append(name)
                values[name], index[name] = [], {}
            key = msgspec.json.encode(value, order="sorted")
            i = index[name].get(key)
            if i is None:
                i = index[name][key] = len(values[name])
                values[name].append(value)
            row.append(i)
        rows.append(row)
    plan = {"parameters": {n: values[n] for n in names}, "runs": rows}
    jsonlines.replace(os.path.join(directory, PLAN), msgspec.json.encode(plan), durable=True,
                      mode=0o644)


def read_plan(directory: str) -> Optional[dict]:
    """{"parameters": {name: [values]}, "runs": [[id, repetition, i...]]} or None."""
    try:
        with open(os.path.join(directory, PLAN), "rb") as f:
            plan = _decoder.decode(f.read())
    except FileNotFoundError:
        return None
    except (OSError, msgspec.DecodeError) as exc:
        raise JournalError(f"{os.path.join(directory, PLAN)}: unreadable ({exc})") from None
    if not isinstance(plan, dict) or "runs" not in plan:
        raise JournalError(f"{os.path.join(directory, PLAN)}: not a campaign plan")
    return plan


def plan_params(plan: dict, row: list) -> Dict[str, Any]:
    return {n: vals[i] for (n, vals), i in zip(plan["parameters"].items(), row[2:])}
