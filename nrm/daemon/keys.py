"""Task keys: what became of a keyed launch, kept for its owner after the
client that launched it is gone (docs/protocol.md, "Task keys").

Why: a client that can be killed and resumed (``nrm pilot``) must learn,
from its successor, whether a launch in flight ran and how it ended. nrmd
forgets a detached task's exit once it has told the connection that asked,
so without this a wrapper process per task had to record it (the pilot's
fence). Here a ``run`` may carry a client-chosen ``key``; nrmd keeps that
key's state per owner uid (pending, running with pid and container, exited
with its status, failed, lost) until the owner ``forget``s it. ``claim``
answers the states of keys and *fences* the ones never seen: since nrmd
handles one message at a time, a launch with a fenced key that arrives
later (from a dead client's connection) is refused and never runs, so a
claimed attempt either ran or never will.

Keys are namespaced by the kernel-verified uid of the requester: no other
user can read, fence or forget them (root included: its keys are its own).

Bounds: MAX_KEYS_PER_UID keys per user and MAX_KEYS in all, pending and
running ones included. Past a bound a keyed launch is refused with
``keys_full`` (never a silent eviction, which could make a finished task
look never run); the owner frees room with ``forget``. A claim may fence
CLAIM_RESERVE keys past the per-user bound (never past MAX_KEYS): a client
whose launches were refused ``keys_full`` and went another way (the pilot's
fence) must still be able to fence them when it is resumed, or it could
neither resume nor, without forgetting keys it still needs, free room.
An entry costs about 300 bytes, so the bound is ~20 MB.

Across restarts: the keys are written to ``keys.log`` in the runtime dir
(JSON lines, no fsync: the dir is a tmpfs that only has to outlive the
daemon), and a clean stop keeps the file. A keyed launch is on file before
it is handed to a spawner (one write(2) per launch), and an exit before its
reply is sent (one more): a key never reads ``lost`` for a task whose exit a
client may have heard. What else follows (running, failed, lost) goes out
once per loop turn. A restarted nrmd reloads the file:
keys that ended keep their state; a task that was running or launching is
either adopted (``--on-restart adopt``: it stays running, and once it ends
its state is ``exited`` with status null, since an adopted task's exit
status cannot be had) or it was killed (``lost``: it may have run, it was
interrupted, no exit code exists). A task killed by nrmd's own clean stop
is ``lost`` too; one that ended on its own before that kill is ``exited``.

``exact`` (in ``status``) says whether ``lost`` is certain after a crash:
with the default ``--on-restart kill`` and a cgroup runtime, the restart
kills every process of the predecessor it does not adopt, recorded or not
(a task started in the moment between its launch and the state log's
write included). With the affinity runtime such a task could outlive the
crash unseen, and with ``adopt`` a process that is not a recorded task is
adopted without an exit to watch: a client that must never run a task
twice (``nrm pilot``) relies on keys only when ``exact`` is true.

The file's ``epoch`` (random, made with the file) is in every ``claim``
reply: a different epoch means the memory is gone (the node rebooted and
the tmpfs with it), and a key that is ``unknown`` then may have ended
unheard.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from typing import Callable, Dict, List, Optional, Tuple

import msgspec

from nrm import jsonlines, protocol
from nrm.containers.model import RunError, Task
from nrm.daemon.upstream import ClientSink
from nrm.log import RateLimitedLog

log = logging.getLogger(__name__)
rl_log = RateLimitedLog(log, 10.0)

FILE = "keys.log"
#: plain names: they reach logs and the state file
KEY = re.compile(r"[A-Za-z0-9_@+:=,./-]{1,128}")
MAX_KEYS_PER_UID = 16384
MAX_KEYS = 65536
MAX_PER_REQUEST = protocol.MAX_KEYS_PER_REQUEST
#: keys a claim may fence past MAX_KEYS_PER_UID (module docstring)
CLAIM_RESERVE = MAX_PER_REQUEST
#: the file is rewritten from memory when it is this much larger than that
COMPACT_BYTES = 1 << 20

ENDED = ("exited", "failed", "lost", "fenced")

_encode = msgspec.json.Encoder().encode


class Entry:
    """One key's state."""

    __slots__ = ("state", "pid", "task", "container", "code", "signal", "status",
                 "message", "adopted", "created")

    def __init__(self, state: str):
        self.state = state
        self.pid = 0
        self.task = ""
        self.container = ""
        self.code: Optional[int] = None
        self.signal: Optional[int] = None
        self.status: Optional[int] = None
        self.message = ""
        self.adopted = False
        self.created = time.time()

    def answer(self) -> dict:
        if self.state == "running":
            return {"state": "running", "pid": self.pid, "container": self.container,
                    "task": self.task}
        if self.state == "exited":
            return {"state": "exited", "status": self.status, "code": self.code,
                    "signal": self.signal}
        if self.state == "failed":
            return {"state": "failed", "message": self.message}
        return {"state": self.state}

    def record(self, uid: int, key: str) -> dict:
        r: dict = {"k": key, "u": uid, "s": self.state}
        if self.state == "running":
            r.update(pid=self.pid, t=self.task, c=self.container)
        elif self.state == "exited":
            r.update(code=self.code, sig=self.signal, st=self.status)
        elif self.state == "failed":
            r["m"] = self.message
        return r


def check_key(key: str, where: str = "key") -> None:
    if not isinstance(key, str) or not KEY.fullmatch(key):
        raise RunError("invalid", f"{where}: {str(key)[:64]!r} is not a task key (1 to 128 "
                                  "letters, digits and . _ - : @ + = , /)")


class TaskKeys:
    """Owns every key of every uid, and their file. ``alive(task_id)`` says
    whether an adopted task still runs. A pending key leaves ``pending``
    when its sink hears what became of the run: started, failed, or
    dropped by the container manager (its client left while it waited)."""

    def __init__(self, path: str, defer: Optional[Callable[[Callable[[], None]], None]],
                 alive: Callable[[str], bool], exact: bool = True):
        self.path = path
        self.exact = exact
        self._alive = alive
        self.keys: Dict[Tuple[int, str], Entry] = {}
        self.per_uid: Dict[int, int] = {}
        self.epoch = ""
        self.counters = {"launched": 0, "fenced": 0, "refused": 0, "forgotten": 0,
                         "write_errors": 0}
        #: pending keys of batch tasks not started yet: how to withdraw each
        #: (True when it will never run), so that a claim can fence it
        self.withdraw: Dict[Tuple[int, str], Callable[[], bool]] = {}
        #: adopted tasks' ids by the name their key gives (a batch task's,
        #: which no container bears): ``kill`` by that name finds the task
        self.adopted_names: Dict[str, str] = {}
        self._file = jsonlines.TurnLog(
            path, self._snapshot, self._write_failed, defer,
            lambda size: size > COMPACT_BYTES and size > 400 * len(self.keys))
        self.flush = self._file.flush

    # -- the file ----------------------------------------------------------
    def load(self) -> int:
        """Replay the file a predecessor left; returns the keys found."""
        try:
            data = jsonlines.read(self.path)
        except FileNotFoundError:
            data = ""
        except OSError as exc:
            log.warning("cannot read task keys %s: %s", self.path, exc.strerror or exc)
            data = ""
        bad = 0
        for line in data.splitlines():
            try:
                self._apply(json.loads(line))
            except (ValueError, KeyError, TypeError, AttributeError):
                bad += 1
        if bad:
            log.warning("task keys %s: %d unreadable records skipped", self.path, bad)
        if not self.epoch:
            self.epoch = os.urandom(8).hex()
        return len(self.keys)

    def _apply(self, r: dict) -> None:
        if "epoch" in r:
            self.epoch = str(r["epoch"])
            return
        key, uid, state = str(r["k"]), int(r["u"]), str(r["s"])
        check_key(key)
        if state == "forget":
            self._drop(uid, key)
            return
        if state not in ENDED + ("pending", "running"):
            raise ValueError(state)
        entry = self.keys.get((uid, key))
        if entry is None:
            entry = self._add(uid, key, state)
        entry.state = state
        if state == "running":
            entry.pid, entry.task, entry.container = int(r["pid"]), str(r["t"]), str(r["c"])
        elif state == "exited":
            entry.code, entry.signal, entry.status = r.get("code"), r.get("sig"), r.get("st")
        elif state == "failed":
            entry.message = str(r.get("m", ""))

    def settle(self) -> Dict[str, int]:
        """After the restart's reconciliation: a task still known to the
        container manager was adopted; any other that was running is lost."""
        out = {"adopted": 0, "lost": 0}
        for (uid, key), entry in self.keys.items():
            if entry.state not in ("pending", "running"):
                continue
            if entry.state == "running" and self._alive(entry.task):
                entry.adopted = True
                self.adopted_names[entry.container] = entry.task
                out["adopted"] += 1
            else:
                entry.state = "lost"
                out["lost"] += 1
        return out

    def open(self) -> None:
        """A fresh file holding what is known now."""
        self._file.rewrite()

    def close(self) -> None:
        """Flush and keep the file: the keys outlive this nrmd."""
        self._file.close()

    def _write(self, uid: int, key: str, record: dict) -> None:
        # the same compact JSON as json.dumps, in a tenth of its time (three
        # records per launch)
        self._file.add(_encode(record).decode())

    def _snapshot(self) -> List[str]:
        lines = [json.dumps({"epoch": self.epoch})]
        lines.extend(json.dumps(e.record(uid, key), separators=(",", ":"))
                     for (uid, key), e in self.keys.items())
        return lines

    def _write_failed(self, exc: OSError) -> None:
        self.counters["write_errors"] += 1
        rl_log.warning("task keys %s: %s; after a restart, keyed tasks may be "
                       "reported unknown", self.path, exc.strerror or exc)

    # -- entries ------------------------------------------------------------
    def _add(self, uid: int, key: str, state: str) -> Entry:
        entry = self.keys[(uid, key)] = Entry(state)
        self.per_uid[uid] = self.per_uid.get(uid, 0) + 1
        return entry

    def _drop(self, uid: int, key: str) -> bool:
        if self.keys.pop((uid, key), None) is None:
            return False
        n = self.per_uid[uid] - 1
        if n:
            self.per_uid[uid] = n
        else:
            del self.per_uid[uid]
        return True

    def _room(self, uid: int, n: int, reserve: int = 0) -> None:
        held = self.per_uid.get(uid, 0)
        if held + n > MAX_KEYS_PER_UID + reserve or len(self.keys) + n > MAX_KEYS:
            self.counters["refused"] += 1
            raise RunError("keys_full", f"uid {uid} holds {held} task keys, nrmd "
                           f"{len(self.keys)} in all (at most {MAX_KEYS_PER_UID} per user, "
                           f"{MAX_KEYS} in all): forget the keys of clients that have "
                           "finished (never those of a pilot still to be resumed)")

    def _set(self, uid: int, key: str, entry: Entry, state: str) -> None:
        entry.state = state
        self._write(uid, key, entry.record(uid, key))

    # -- the launch side ----------------------------------------------------
    def launching(self, uid: int, key: str, flush: bool = True) -> None:
        """A keyed run arrives: refused when its key is fenced or taken.
        ``flush=False``: the caller flushes before any of its launches is
        handed on (a batch: one write for all its keys)."""
        check_key(key)
        entry = self.keys.get((uid, key))
        if entry is not None:
            self.counters["refused"] += 1
            if entry.state == "fenced":
                raise RunError("fenced", f"task key {key!r} was fenced by a claim: this "
                                         "launch does not run")
            raise RunError("duplicate", f"task key {key!r} is taken ({entry.state}): a "
                                        "key names one launch")
        self._room(uid, 1)
        entry = self._add(uid, key, "pending")
        self.counters["launched"] += 1
        # on file before the launch is handed on, not at the end of the turn:
        # after a crash in between, the key says the task may have started
        self._write(uid, key, entry.record(uid, key))
        if flush:
            self.flush()

    def started(self, uid: int, key: str, task: Task, name: Optional[str] = None) -> None:
        """``name``: what the client kills the task by, if not its container's
        (a batch task's)."""
        entry = self.keys.get((uid, key))
        if entry is None or entry.state != "pending":
            return
        entry.pid, entry.task, entry.container = task.pid, task.id, name or task.container.id
        self._set(uid, key, entry, "running")

    def exited(self, uid: int, key: str, task: Task, flush: bool = True) -> None:
        """``flush=False``: the caller flushes before the exit's reply goes
        out (a batch: once per reply)."""
        entry = self.keys.get((uid, key))
        if entry is None or entry.state not in ("pending", "running"):
            return
        if task.killed:
            self._set(uid, key, entry, "lost")      # killed with nrmd: interrupted
            return
        entry.code, entry.signal, entry.status = task.code, task.signal, task.status
        self._set(uid, key, entry, "exited")
        # on file before the exit's reply goes out (the caller sends it next):
        # a client that heard the exit and died must not find the key lost
        # after a crash of nrmd, and run the task again
        if flush:
            self.flush()

    def dropped(self, uid: int, key: str) -> None:
        """The container manager dropped the run unstarted (its client left
        while it waited for a slice): it never ran."""
        entry = self.keys.get((uid, key))
        if entry is not None and entry.state == "pending":
            self._set(uid, key, entry, "lost")

    def failed(self, uid: int, key: str, message: str) -> None:
        entry = self.keys.get((uid, key))
        if entry is not None and entry.state == "pending":
            entry.message = message
            self._set(uid, key, entry, "failed")

    # -- requests -------------------------------------------------------------
    def claim(self, uid: int, keys: List[str]) -> Dict[str, dict]:
        """Each key's state; unknown ones fenced (all or none: a claim that
        cannot fence them all is refused before any is). A key named twice
        is answered once, as it was before this claim."""
        _check_list(keys)
        keys = list(dict.fromkeys(keys))
        new = [k for k in keys if (uid, k) not in self.keys]
        if new:
            self._room(uid, len(new), CLAIM_RESERVE)
        out: Dict[str, dict] = {}
        for key in keys:
            entry = self.keys.get((uid, key))
            if entry is None:
                entry = self._add(uid, key, "fenced")
                self._write(uid, key, entry.record(uid, key))
                self.counters["fenced"] += 1
                out[key] = {"state": "unknown"}
                continue
            hook = self.withdraw.get((uid, key)) if entry.state == "pending" else None
            if hook is not None:
                entry.state = "fenced"      # before: its sink must not record an end
                if hook():
                    self.withdraw.pop((uid, key), None)
                    self._write(uid, key, entry.record(uid, key))
                    self.counters["fenced"] += 1
                    out[key] = {"state": "unknown"}
                    continue
                # in a spawner's hands now; it may come back to a queue (a
                # promise taken back), where a later claim withdraws it
                entry.state = "pending"
            self._refresh(uid, key, entry)
            out[key] = entry.answer()
        return out

    def _refresh(self, uid: int, key: str, entry: Entry) -> None:
        """An adopted task that is gone has ended, its status unknown (nrmd
        hears no exit of a task it did not start)."""
        if entry.state == "running" and entry.adopted and not self._alive(entry.task):
            self._set(uid, key, entry, "exited")

    def forget(self, uid: int, keys: List[str], prefix: Optional[str]) -> int:
        """Drop ended keys; returns how many."""
        _check_list(keys)
        if prefix is not None and prefix != "":
            check_key(prefix, "prefix")
        names = set(keys)
        if prefix is not None:
            names.update(k for u, k in self.keys if u == uid and k.startswith(prefix))
        n = 0
        for key in names:
            entry = self.keys.get((uid, key))
            if entry is None:
                continue
            self._refresh(uid, key, entry)
            if entry.state in ENDED and self._drop(uid, key):
                self._write(uid, key, {"k": key, "u": uid, "s": "forget"})
                n += 1
        self.counters["forgotten"] += n
        return n

    def describe(self) -> dict:
        return {"epoch": self.epoch, "exact": self.exact, "keys": len(self.keys),
                "users": len(self.per_uid), "max_per_user": MAX_KEYS_PER_UID,
                "claim_reserve": CLAIM_RESERVE, "max": MAX_KEYS, "path": self.path, **self.counters}


def _check_list(keys: List[str]) -> None:
    if len(keys) > MAX_PER_REQUEST:
        raise RunError("invalid", f"keys: {len(keys)} keys in one request, at most "
                                  f"{MAX_PER_REQUEST}")
    for i, key in enumerate(keys):
        check_key(key, f"keys[{i}]")


class KeyedSink(ClientSink):
    """A run's sink that also tells the key registry what became of it."""

    def __init__(self, registry: TaskKeys, key: str, requester, *args, **kwargs):
        super().__init__(requester, *args, **kwargs)
        self.registry = registry
        self.key = key
        self.uid = requester.peer.uid

    def started(self, task: Task) -> None:
        self.registry.started(self.uid, self.key, task)
        super().started(task)

    def exited(self, task: Task, profile: Optional[dict]) -> None:
        self.registry.exited(self.uid, self.key, task)
        super().exited(task, profile)

    def failed(self, code: str, message: str) -> None:
        self.registry.failed(self.uid, self.key, message)
        super().failed(code, message)

    def dropped(self) -> None:
        self.registry.dropped(self.uid, self.key)
        super().dropped()


def keyed(registry: TaskKeys, key: str, requester, *args, **kwargs) -> KeyedSink:
    """The sink of a keyed run, its key taken (raises RunError when the key
    is fenced, taken or malformed, or the bound is reached)."""
    registry.launching(requester.peer.uid, key)
    return KeyedSink(registry, key, requester, *args, **kwargs)
