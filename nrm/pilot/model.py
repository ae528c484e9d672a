"""Jobs, their tasks (iterations), states with history, ``${...}`` variables.

A job with ``iteration`` has one task per index, named ``NAME:IDX``; a job
without has one task named ``NAME``. Tasks are what the scheduler places
and nrmd runs; a job's state follows its tasks'. Pure: the caller passes
the clock.
"""

from __future__ import annotations

import math
import re
import time
from datetime import datetime
from typing import Any, Dict, List, Optional, Tuple

from nrm.pilot.jobfile import Count, JobSpec

QUEUED, SCHEDULED, EXECUTING = "QUEUED", "SCHEDULED", "EXECUTING"
SUCCEED, FAILED, CANCELED, OMITTED = "SUCCEED", "FAILED", "CANCELED", "OMITTED"
STATES = (QUEUED, SCHEDULED, EXECUTING, SUCCEED, FAILED, CANCELED, OMITTED)
FINAL = frozenset((SUCCEED, FAILED, CANCELED, OMITTED))
#: QCG's numbering of the states (JobState), for the API layer
STATE_CODES = {s: i for i, s in enumerate(STATES, start=1)}

#: what a job name may not contain once its variables are substituted
NAME_BAD_CHARS = frozenset("${}()'\" \t\n")
SITE_NAME = "local"

_VAR = re.compile(r"\$\{(\w+)\}")


def substitute(text: str, variables: Dict[str, Any]) -> str:
    """``${name}`` replaced by its value; unknown names are left as they are
    (a later stage may know them: root_wd is known only at launch)."""
    if "${" not in text:
        return text
    return _VAR.sub(lambda m: str(variables[m.group(1)]) if m.group(1) in variables
                    else m.group(0), text)


def request_variables(rcnt: int, uniq: str, now: float) -> Dict[str, Any]:
    """The variables known when a request is validated."""
    t = datetime.fromtimestamp(now)
    return {"rcnt": rcnt, "uniq": uniq, "sname": SITE_NAME,
            "date": t.strftime("%d.%m.%Y"), "time": t.strftime("%H_%M_%S"),
            "dateTime": t.strftime("%d.%m.%Y_%H_%M_%S")}


def format_stamp(ts: float) -> str:
    """``datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S.%f")``, the
    seconds' text made once per second (a report line has four stamps)."""
    secs = math.floor(ts)
    micros = round((ts - secs) * 1e6)      # half to even, as datetime rounds
    if micros >= 1000000:
        secs, micros = secs + 1, micros - 1000000
    global _stamp_secs, _stamp_text
    if secs != _stamp_secs:
        _stamp_text = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(secs))
        _stamp_secs = secs
    return f"{_stamp_text}.{micros:06d}"


_stamp_secs: Optional[int] = None
_stamp_text = ""


def format_rtime(seconds: float) -> str:
    """H:MM:SS.ffffff, as Python's str(timedelta) spells it."""
    micros = int(round(max(0.0, seconds) * 1e6))
    h, rest = divmod(micros, 3600 * 10 ** 6)
    m, rest = divmod(rest, 60 * 10 ** 6)
    s, us = divmod(rest, 10 ** 6)
    return f"{h}:{m:02d}:{s:02d}.{us:06d}"


class Allocation:
    """Cores granted on nodes: ``[(node_name, [core, ...]), ...]``."""

    __slots__ = ("parts", "ncores")

    def __init__(self, parts: List[Tuple[str, List[int]]]):
        self.parts = parts
        self.ncores = sum(len(c) for _, c in parts)

    @property
    def nodes(self) -> List[str]:
        return [n for n, _ in self.parts]

    def __str__(self) -> str:
        return ",".join(f"{n}[{':'.join(map(str, c))}]" for n, c in self.parts)


class _History:
    """A task's or job's states with their times, kept flat in ``_log``
    (state, time, state, time, ...): one list per object, no tuple per
    change."""

    __slots__ = ()

    @property
    def history(self) -> List[Tuple[str, float]]:
        return list(zip(self._log[::2], self._log[1::2]))


class Task(_History):
    """One schedulable unit: a whole job, or one iteration of it.

    Slotted, with its ``${...}`` variables built when asked for (from its
    job's request-wide ones, its index and its allocation) and its history
    kept flat: a pilot holds 10 000s of tasks, and a dict of 13-17 variables
    and a tuple per state change were most of each one's memory."""

    __slots__ = ("job", "index", "name", "state", "_log", "cores",
                 "nodes", "allocation", "wd", "exit_code", "started", "ended", "attempt",
                 "seq", "message", "pid", "handle", "shape", "chain", "chained")

    def __init__(self, job: "Job", index: Optional[int],
                 cores: Optional[Count], nodes: Optional[Count], seq: int):
        self.job = job
        self.index = index
        self.name = job.name if index is None else f"{job.name}:{index}"
        self.state = QUEUED
        self._log: List[Any] = []         # state, time, state, time, ...
        self.cores, self.nodes = cores, nodes
        self.allocation: Optional[Allocation] = None
        self.wd: Optional[str] = None
        self.exit_code: Optional[int] = None
        self.started: Optional[float] = None
        self.ended: Optional[float] = None
        self.attempt = 0
        self.seq = seq
        self.message: Optional[str] = None
        self.pid: Optional[int] = None
        self.handle: Any = None           # the runner's: what cancels a running task
        self.shape: Any = None            # the scheduler's key, computed once per job
        self.chain: Any = None            # the manager's Slot while it holds one
        self.chained = False              # placed behind another task on its cores

    def set_state(self, state: str, now: float) -> None:
        self.state = state
        self._log += (state, now)

    @property
    def uniq(self) -> str:
        return f"{self.job.variables['uniq']}.{self.index or 0}"

    @property
    def variables(self) -> Dict[str, Any]:
        """Its request's variables, its own (jname, uniq, it, itval) and,
        once placed, its allocation's (root_wd, ncores, nnodes, nlist)."""
        job, index = self.job, self.index
        base = job.variables
        it = job.spec.iteration
        v = dict(base, jname=job.name, uniq=self.uniq,
                 it=index if index is not None else "",
                 itval=it.value(index) if it is not None else "")
        alloc = self.allocation
        if alloc is not None:
            v.update(root_wd=job.root_wd, ncores=alloc.ncores, nnodes=len(alloc.parts),
                     nlist=",".join(alloc.nodes))
        return v

    def expand(self, text: str) -> str:
        """``text`` with this task's variables substituted; they are built
        only for a text that names one (most launches have none)."""
        return substitute(text, self.variables) if "${" in text else text

    @property
    def final(self) -> bool:
        return self.state in FINAL

    @property
    def rtime(self) -> Optional[float]:
        if self.started is None:
            return None
        return (self.ended if self.ended is not None else self.started) - self.started


class Job(_History):
    """A registered job: its description, its tasks, its own state, and
    the variables its request defined (shared by the request's jobs)."""

    __slots__ = ("spec", "name", "request", "seq", "state", "_log", "tasks", "after",
                 "finished_tasks", "failed_tasks", "messages", "reported", "variables",
                 "root_wd")

    def __init__(self, spec: JobSpec, name: str, request: int, seq: int,
                 variables: Optional[Dict[str, Any]] = None, root_wd: str = ""):
        self.spec = spec
        self.name = name
        self.request = request
        self.seq = seq
        self.state = QUEUED
        self._log: List[Any] = []         # state, time, state, time, ...
        self.tasks: List[Task] = []
        self.after: Tuple[str, ...] = spec.after
        self.finished_tasks = 0
        self.failed_tasks = 0
        self.messages: Tuple[str, ...] = ()
        self.reported = False
        self.variables: Dict[str, Any] = variables if variables is not None else {"uniq": ""}
        self.root_wd = root_wd

    @property
    def iterative(self) -> bool:
        return self.spec.iteration is not None

    @property
    def final(self) -> bool:
        return self.state in FINAL

    def set_state(self, state: str, now: float) -> None:
        if self.state == state and self._log:
            return
        self.state = state
        self._log += (state, now)

    def task_state_changed(self, task: Task, now: float) -> bool:
        """Follow a task's new state; True when the job became final."""
        if task.state in (SCHEDULED, EXECUTING):
            if self.state == QUEUED or (task.state == EXECUTING and self.state == SCHEDULED):
                self.set_state(task.state, now)
            return False
        if task.state not in FINAL:
            return False
        self.finished_tasks += 1
        if task.state != SUCCEED:
            self.failed_tasks += 1
        if self.finished_tasks < len(self.tasks):
            return False
        states = {t.state for t in self.tasks}
        for state in (FAILED, CANCELED, OMITTED):
            if state in states:
                self.set_state(state, now)
                break
        else:
            self.set_state(SUCCEED, now)
        return True


def task_counts(spec: JobSpec, total_cores: int, total_nodes: int
                ) -> Tuple[Optional[Count], Optional[Count]]:
    """What each task of ``spec`` asks for, after the iteration schedulers.

    maximum-iters: as many iterations at once as the pool allows, the
    cores left spread over them; split-into: the pool split into ``parts``
    (default: the number of iterations). Both are computed over the whole
    pool when the job is submitted, and become an exact count.
    """
    out = []
    n_iter = spec.iteration.count if spec.iteration is not None else 1
    for count, total in ((spec.cores, total_cores), (spec.nodes, total_nodes)):
        if count is None or count.scheduler is None:
            out.append(count)
            continue
        lo = count.min or 1
        if count.scheduler.name == "split-into":
            parts = int(count.scheduler.params.get("parts") or n_iter)
            each = max(lo, total // max(1, parts))
        else:
            each = max(lo, total // max(1, n_iter))
        if count.max is not None:
            each = min(each, count.max)
        out.append(Count(exact=max(lo, min(each, total)) if each >= lo else lo))
    return out[0], out[1]
