"""What is running, kept on disk so that the next nrmd can reconcile.

After a SIGKILL the daemon's memory is gone, but its tasks may still run.
The next start must find every one of them, to kill it or adopt it, and
must never mistake an unrelated process that reused a pid for one of ours:
each task is recorded with its pid *and* the kernel's start time of that
pid (field 22 of /proc/<pid>/stat; nrm-spawner reports it with the launch,
else it is read from /proc), and both must match.

The log is append-only JSON lines in the runtime dir, without fsync (the
runtime dir is a tmpfs under /run and only has to outlive the daemon, not
the machine). Records made during one turn of the event loop go out in one
write(2) at its end (``defer``): a launch burst costs one system call, and
a crash can lose only the records of the turn it interrupts. All of it
costs about 10 us per task in isolation, and 25-40 us of daemon cpu per
task in a launch storm (A/B with the log disabled; a launch costs about
1.2 ms of cpu in all: docs/performance.md). The log is rewritten from
memory when it grows past COMPACT_BYTES.
A write that fails (a full disk) is logged at a bounded rate and counted;
the daemon keeps running and `nrm status` says that reconciliation after a
crash would be incomplete.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import msgspec

from nrm import jsonlines
from nrm.log import RateLimitedLog

log = logging.getLogger(__name__)


rl_log = RateLimitedLog(log, 10.0)


COMPACT_BYTES = 1 << 20
MAX_LINE = 256 * 1024     # a manifest is at most 64 KiB; anything longer is not ours


def pid_start_time(pid: int) -> Optional[int]:
    """The pid's start time in clock ticks since boot, None when gone."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
        try:
            data = os.read(fd, 4096)
        finally:
            os.close(fd)
        return int(data.rsplit(b")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class TaskRecord:
    id: str
    container: str
    pid: int
    start: Optional[int]
    argv: List[str]
    detach: bool

    def alive(self) -> bool:
        """Still the same process: same pid and same start time."""
        return self.start is not None and pid_start_time(self.pid) == self.start


@dataclass
class ContainerRecord:
    id: str
    uid: int
    manifest: dict
    cpus: List[int]
    mems: List[int]
    shared: bool
    cgroups: Dict[str, str]
    tasks: Dict[str, TaskRecord] = field(default_factory=dict)


class StateLog:
    """``defer(fn)`` runs fn at the end of the current loop turn (the
    daemon passes loop.call_soon); without it every record is written at
    once."""

    def __init__(self, path: str, defer: Optional[Callable[[Callable[[], None]], None]] = None):
        self.path = path
        self.live: Dict[str, ContainerRecord] = {}
        self.write_errors = 0
        self._file = jsonlines.TurnLog(path, self._snapshot, self._write_failed, defer,
                                       lambda size: size > COMPACT_BYTES)
        self._append_text = self._file.add
        self.flush = self._file.flush
        self._manifest_json: Dict[int, tuple] = {}

    # -- reading (at start, before anything runs) --------------------------
    def load(self) -> Dict[str, ContainerRecord]:
        """Replay a predecessor's log; unreadable lines are skipped, since a
        crash may have cut the last one."""
        found: Dict[str, ContainerRecord] = {}
        try:
            data = jsonlines.read(self.path)
        except FileNotFoundError:
            return found
        except OSError as exc:
            log.warning("cannot read state log %s: %s", self.path, exc.strerror or exc)
            return found
        bad = 0
        for line in data.splitlines():
            if len(line) > MAX_LINE:
                bad += 1
                continue
            try:
                _apply(found, json.loads(line))
            except (ValueError, KeyError, TypeError):
                bad += 1
        if bad:
            log.warning("state log %s: %d unreadable records skipped", self.path, bad)
        return found

    # -- writing ------------------------------------------------------------
    def open(self) -> None:
        """Start a fresh log holding what is live now (adopted containers)."""
        self._file.rewrite()

    def container_started(self, rec: ContainerRecord, manifest_key: object = None) -> None:
        """``manifest_key``: the object rec.manifest was made from, when
        rec.manifest came from ``manifest_dict``."""
        self.live[rec.id] = rec
        self._append_text(_container_line(rec, self._manifest_text(rec, manifest_key)))

    def manifest_dict(self, manifest) -> dict:
        """``manifest.to_dict()``, shared by every record made from the same
        manifest object: the daemon reuses them (a launch storm repeats one),
        and never mutates either."""
        return self._manifest_entry(manifest)[1]

    def task_started(self, rec: TaskRecord) -> None:
        container = self.live.get(rec.container)
        if container is not None:
            container.tasks[rec.id] = rec
        self._append_text(_text(_task_line(rec)))

    def task_ended(self, cid: str, tid: str) -> None:
        container = self.live.get(cid)
        if container is not None:
            container.tasks.pop(tid, None)
        self._append_text(f'{{"op":"task_end","id":{_text(tid)},'
                          f'"container":{_text(cid)}}}')

    def container_ended(self, cid: str) -> None:
        self.live.pop(cid, None)
        self._append_text(f'{{"op":"container_end","id":{_text(cid)}}}')

    def close(self, clean: bool) -> None:
        """A clean stop leaves nothing to reconcile: remove the log."""
        self._file.close()
        if clean:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def describe(self) -> dict:
        return {"path": self.path, "write_errors": self.write_errors,
                "complete": self.write_errors == 0}

    def _manifest_text(self, rec: ContainerRecord, key: object) -> str:
        if key is None:
            return _text(rec.manifest)
        entry = self._manifest_entry(key)
        return entry[2] if entry[1] is rec.manifest else _text(rec.manifest)

    def _manifest_entry(self, manifest) -> tuple:
        """(manifest, its dict, that dict's JSON), by the manifest's identity."""
        hit = self._manifest_json.get(id(manifest))
        if hit is not None and hit[0] is manifest:
            return hit
        as_dict = manifest.to_dict()
        if len(self._manifest_json) >= 256:
            self._manifest_json.clear()
        entry = (manifest, as_dict, _text(as_dict))     # holding it keeps its id unique
        self._manifest_json[id(manifest)] = entry
        return entry

    def _snapshot(self) -> List[str]:
        lines = []
        for c in self.live.values():
            lines.append(_container_line(c, _text(c.manifest)))
            lines.extend(_text(_task_line(t)) for t in c.tasks.values())
        return lines

    def _write_failed(self, exc: OSError) -> None:
        self.write_errors += 1
        rl_log.warning("state log %s: %s; after a crash, running tasks may not be "
                       "found", self.path, exc.strerror or exc)


_encode = msgspec.json.Encoder().encode


def _text(value) -> str:
    return _encode(value).decode()


def _container_line(c: ContainerRecord, manifest_text: str) -> str:
    head = _text({"op": "container", "id": c.id, "uid": c.uid, "cpus": c.cpus,
                  "mems": c.mems, "shared": c.shared, "cgroups": c.cgroups})
    return head[:-1] + ',"manifest":' + manifest_text + "}"


def _task_line(t: TaskRecord) -> dict:
    return {"op": "task", "id": t.id, "container": t.container, "pid": t.pid,
            "start": t.start, "argv": t.argv, "detach": t.detach}


def _apply(found: Dict[str, ContainerRecord], r: dict) -> None:
    op = r["op"]
    if op == "container":
        found[r["id"]] = ContainerRecord(
            id=str(r["id"]), uid=int(r["uid"]), manifest=dict(r["manifest"]),
            cpus=[int(c) for c in r["cpus"]], mems=[int(m) for m in r["mems"]],
            shared=bool(r["shared"]), cgroups={str(k): str(v) for k, v in r["cgroups"].items()})
    elif op == "task":
        c = found.get(r["container"])
        if c is not None:
            start = r["start"]
            c.tasks[r["id"]] = TaskRecord(
                id=str(r["id"]), container=c.id, pid=int(r["pid"]),
                start=None if start is None else int(start),
                argv=[str(a) for a in r["argv"]], detach=bool(r["detach"]))
    elif op == "task_end":
        c = found.get(r["container"])
        if c is not None:
            c.tasks.pop(r["id"], None)
    elif op == "container_end":
        found.pop(r["id"], None)


class StateLogListener:
    """A container listener that keeps the state log in step with the
    container manager's containers and tasks."""

    def __init__(self, statelog: StateLog, cgroup_dirs: Callable[[object], Dict[str, str]]):
        self.statelog = statelog
        self.cgroup_dirs = cgroup_dirs

    def container_started(self, container) -> None:
        statelog = self.statelog
        statelog.container_started(ContainerRecord(
            id=container.id, uid=container.uid,
            manifest=statelog.manifest_dict(container.manifest),
            cpus=list(container.slice.cpus), mems=list(container.slice.mems),
            shared=container.slice.shared,
            cgroups=self.cgroup_dirs(container.handle)), container.manifest)

    def container_ended(self, container) -> Optional[dict]:
        self.statelog.container_ended(container.id)
        return None

    def task_started(self, task) -> None:
        self.statelog.task_started(TaskRecord(
            id=task.id, container=task.container.id, pid=task.pid,
            start=task.start_ticks if task.start_ticks is not None else pid_start_time(task.pid),
            argv=task.argv, detach=task.detach))

    def task_ended(self, task) -> None:
        self.statelog.task_ended(task.container.id, task.id)
