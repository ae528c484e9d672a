"""The pilot's state machine: requests in, placements and responses out.

No I/O and no clock of its own (every call takes ``now``): the runner
launches what :meth:`Manager.placements` returns and reports exits back
with :meth:`Manager.ended`. Responses follow QCG's envelope
``{"code": 0|1, "message": str, "data": {...}}``.

Every request that changes something, and every placement, start and end,
is handed to ``record`` (the resume journal, nrm/pilot/journal.py) as it
happens; :meth:`Manager.replay` feeds such records back in the same order
and so rebuilds the same jobs, states and histories.
"""

from __future__ import annotations

import heapq
import itertools
import os
import uuid
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

from nrm.pilot import model
from nrm.pilot.graph import DependencyGraph
from nrm.pilot.jobfile import Request, parse_request
from nrm.pilot.model import (CANCELED, EXECUTING, FAILED, FINAL, OMITTED, QUEUED, SCHEDULED,
                             SUCCEED, Allocation, Job, Task)
from nrm.pilot.scheduler import Pool, Scheduler, shape_of


def ok(message: str = "", **data) -> Dict[str, Any]:
    return {"code": 0, "message": message, "data": data}


def error(message: str) -> Dict[str, Any]:
    return {"code": 1, "message": message, "data": {}}


#: tasks committed in all slots at most: each holds a task key in nrmd,
#: which keeps 16384 per user (docs/protocol.md, "Task keys")
CHAIN_BUDGET = 4096


class Slot:
    """An allocation held by a chain of one job's iterations: the first is
    running, the others wait in nrmd behind it, in order (each starts when
    the one before it ends). The cores go back to the pool with the last."""

    __slots__ = ("alloc", "job", "shape", "tasks", "order", "live")

    def __init__(self, task: Task, order: int, live: bool = True):
        self.alloc = task.allocation
        self.job = task.job
        self.shape = task.shape
        self.tasks: Deque[Task] = deque((task,))
        self.order = order
        #: False: a chain a killed pilot left (replay), whose tasks are
        #: settled one by one (nrm/pilot/resume.py); it only holds the cores
        self.live = live


def chain_shape(task: Task) -> bool:
    """Iterations that can be chained: an exact core count, any nodes."""
    cmin, cmax, nmin, nmax = task.shape
    return cmin >= 1 and cmin == cmax and nmin == 0 and task.job.iterative


class Manager:
    def __init__(self, pool: Pool, root_wd: str,
                 on_final: Optional[Callable[[Any], None]] = None):
        self.pool = pool
        self.root_wd = root_wd
        self.scheduler = Scheduler(pool)
        self.jobs: Dict[str, Job] = {}
        self.graph = DependencyGraph(self._state_of)
        self.on_final = on_final or (lambda item: None)
        self._rcnt = itertools.count(1)
        self._seq = itertools.count()
        self.unfinished = 0            # jobs not yet final
        self.final_tasks = 0           # tasks final (progress)
        self.running: Dict[str, Task] = {}
        self.finish_requested = False
        self.wait_requested = False
        #: every task by its sequence number (stable across a replay)
        self.by_seq: Dict[int, Task] = {}
        self.record: Callable[[Dict[str, Any]], None] = lambda r: None
        self.replaying = False
        self._uniq: Optional[str] = None
        #: how many tasks a slot may hold committed (0: no chains), and
        #: which jobs may be chained (the runner's: the batch path)
        self.chain_depth = 0
        self.chainable: Callable[[Job], bool] = lambda job: False
        self.slots: Dict[int, Slot] = {}
        self._slot_ids = itertools.count()

    def _state_of(self, name: str) -> Optional[str]:
        job = self.jobs.get(name)
        return None if job is None else job.state

    # --------------------------------------------------------- requests ---
    def handle(self, req: Request, now: float, uniq: Optional[str] = None) -> Dict[str, Any]:
        if req.kind in JOURNALED:
            self._uniq = uniq or uuid.uuid4().hex[:12]
            if not self.replaying:
                self.record({"t": "req", "raw": req.raw, "i": req.index, "dir": req.base_dir,
                             "now": now, "uniq": self._uniq})
        return getattr(self, "_req_" + req.kind)(req, now)

    def _req_submit(self, req: Request, now: float) -> Dict[str, Any]:
        rcnt = next(self._rcnt)
        base = model.request_variables(rcnt, self._uniq or uuid.uuid4().hex[:12], now)
        staged: List[Job] = []
        names = set()
        for spec in req.jobs:
            name = model.substitute(spec.name, dict(base, jname=spec.name))
            if "${" in name or set(name) & model.NAME_BAD_CHARS:
                return error(f"Job identifier '{name}' contains invalid characters "
                             "or unknown variables")
            if name in self.jobs or name in names:
                return error(f"Job {name} already exist")
            cores, nodes = model.task_counts(spec, self.pool.total, len(self.pool.names))
            shape = shape_of(cores, nodes)
            if not self.pool.fits_ever(shape):
                return error(f"Not enough resources for job {name}")
            job = Job(spec, name, req.index, next(self._seq), base, self.root_wd)
            it = spec.iteration
            for index in (it.indexes() if it is not None else (None,)):
                task = Task(job, index, cores, nodes, next(self._seq))
                task.shape = shape
                job.tasks.append(task)
                self.by_seq[task.seq] = task
            staged.append(job)
            names.add(name)
        for job in staged:                      # all valid: the request is atomic
            self.jobs[job.name] = job
            job.set_state(QUEUED, now)
            for task in job.tasks:
                task.set_state(QUEUED, now)
            self.unfinished += 1
        for job in staged:                      # after registration: forward references
            verdict = self.graph.add(job)
            if verdict == "ready":
                self._enqueue(job)
            elif verdict == OMITTED:
                self._omit([job], now)
        return ok(f"{len(staged)} jobs submitted", submitted=len(staged),
                  jobs=[j.name for j in staged])

    def _req_listJobs(self, req, now):
        jobs = {}
        for name, job in self.jobs.items():
            entry: Dict[str, Any] = {"status": job.state}
            if job.messages:
                entry["messages"] = "; ".join(job.messages)
            jobs[name] = entry
        return ok(length=len(jobs), jobs=jobs)

    def _per_job(self, req, fn) -> Dict[str, Any]:
        out = {}
        for name in req.names:
            job = self.jobs.get(name)
            if job is None:
                out[name] = {"status": 1, "message": f"Job {name} doesn't exist"}
            else:
                out[name] = {"status": 0, "data": fn(job)}
        return ok(jobs=out)

    def _req_jobStatus(self, req, now):
        return self._per_job(req, lambda j: {"jobName": j.name, "status": j.state})

    def _req_jobInfo(self, req, now):
        return self._per_job(req, lambda j: self.job_info(j, req.with_childs))

    def _req_cancelJob(self, req, now):
        missing = [n for n in req.names if n not in self.jobs]
        if missing:
            return error(f"Job {missing[0]} doesn't exist")
        for name in req.names:
            self.cancel(self.jobs[name], now)
        return ok(f"{len(req.names)} jobs canceled")

    def _req_removeJob(self, req, now):
        removed = 0
        for name in req.names:
            job = self.jobs.get(name)
            if job is not None and job.final:
                del self.jobs[name]
                removed += 1
        if removed < len(req.names):
            return error(f"{len(req.names) - removed} of the jobs are unknown or not "
                         f"finished; {removed} removed")
        return ok(removed=removed)

    def _req_resourcesInfo(self, req, now):
        return ok(total_nodes=len(self.pool.names), total_cores=self.pool.total,
                  used_cores=self.pool.used, free_cores=self.pool.free_total)

    def _req_control(self, req, now):
        self.wait_requested = True
        return ok("finishAfterAllTasksDone command accepted")

    def _req_finish(self, req, now):
        self.finish_requested = True
        return ok("finish command accepted")

    def _req_status(self, req, now):
        return ok(**self.final_status())

    # ------------------------------------------------------- scheduling ---
    def _enqueue(self, job: Job) -> None:
        for task in job.tasks:
            if task.state == QUEUED:
                self.scheduler.push(task)

    def placements(self, now: float) -> List[Tuple[Task, Allocation]]:
        """Tasks to start now, each with its cores (state SCHEDULED); with
        chains, the chainable ones open a slot (:meth:`commits`)."""
        placed = self.scheduler.schedule()
        chains = self.chain_depth > 0
        for task, alloc in placed:
            task.chained = False
            self._place(task, alloc, task.attempt + 1, now)
            if chains and chain_shape(task) and self.chainable(task.job):
                slot = Slot(task, next(self._slot_ids))
                self.slots[slot.order] = slot
                task.chain = slot
        return placed

    def commits(self, now: float) -> List[Tuple[Task, Allocation]]:
        """Tasks committed behind the running ones of their slots (state
        SCHEDULED, holding those cores), in the order each slot runs them.

        Only when a slot is down to half its depth, and then every slot is
        topped up to the depth: one batch per refill. Iterations go to the
        slot with the fewest committed first (the one likely to free
        first), so a job's iterations alternate over its slots as with
        first-free placement."""
        slots = self.slots
        depth = self.chain_depth
        if not slots or all(len(s.tasks) > depth // 2 for s in slots.values()):
            return []
        heap = [(len(s.tasks), s.order, s) for s in slots.values() if len(s.tasks) < depth]
        heapq.heapify(heap)
        room = CHAIN_BUDGET - sum(len(s.tasks) for s in slots.values())
        done_jobs = set()
        out: List[Tuple[Task, Allocation]] = []
        while heap and len(out) < room:
            n, order, slot = heapq.heappop(heap)
            if slot.job in done_jobs:
                continue
            task = self.scheduler.successor(slot.job, slot.shape, slot.alloc.ncores)
            if task is None:                # the job's next is not FIFO's next here
                done_jobs.add(slot.job)
                continue
            task.chain = slot
            task.chained = True
            slot.tasks.append(task)
            self._place(task, slot.alloc, task.attempt + 1, now)
            out.append((task, slot.alloc))
            if n + 1 < depth:
                heapq.heappush(heap, (n + 1, order, slot))
        return out

    def _place(self, task: Task, alloc: Allocation, attempt: int, now: float) -> None:
        task.allocation = alloc
        task.attempt = attempt
        if not self.replaying:
            record = {"t": "p", "n": task.seq, "a": attempt, "al": alloc.parts, "now": now}
            if task.chained:
                record["ch"] = 1
            self.record(record)
        self._set(task, SCHEDULED, now)
        self.running[task.name] = task

    def committed(self) -> int:
        """Tasks placed that wait in nrmd behind another (not running)."""
        return sum(len(s.tasks) - 1 for s in self.slots.values())

    def _leave_slot(self, task: Task, now: float) -> bool:
        """An ended task out of its slot; the next one there runs from now
        (nrmd started it as this one ended). True if the cores stay held."""
        slot = task.chain
        task.chain = None
        tasks = slot.tasks
        if tasks and tasks[0] is task:
            tasks.popleft()
            nxt = tasks[0] if tasks else None
            if nxt is not None and slot.live and nxt.state == SCHEDULED \
                    and nxt.message != "canceled":      # else nrmd drops it: it never runs
                self.started(nxt, now)
        else:
            tasks.remove(task)
        if tasks:
            return True
        self.slots.pop(slot.order, None)
        return False

    def started(self, task: Task, now: float) -> None:
        if not self.replaying:
            self.record({"t": "x", "n": task.seq, "now": now})
        task.started = now
        self._set(task, EXECUTING, now)

    def requeue(self, task: Task, now: float, message: str) -> None:
        """A placed task whose attempt was lost (its pilot was killed before
        it ran, or it died unrecorded): back to the queue for the next attempt."""
        if not self.replaying:
            self.record({"t": "q", "n": task.seq, "now": now, "m": message})
        self.running.pop(task.name, None)
        held = task.chain is not None and self._leave_slot(task, now)
        if task.allocation is not None and not self.replaying and not held:
            self.pool.release(task.allocation)
        task.allocation = None
        task.chained = False
        task.started = None
        task.handle = None
        task.message = message
        task.set_state(QUEUED, now)
        if not self.replaying:
            self.scheduler.push(task)

    def ended(self, task: Task, exit_code: Optional[int], now: float,
              message: Optional[str] = None, canceled: bool = False,
              real_start: Optional[float] = None) -> None:
        """A launched task is over (``exit_code`` None: it never started).
        ``real_start``: when nrmd saw its process start (for reports of the
        launch overhead: ``nrm pilot report``)."""
        if task.final:
            return
        if task.chained and task.started is None and real_start is not None \
                and exit_code is not None:
            # it ran, and its exit outran its predecessor's (another reply
            # of nrmd's): EXECUTING from when nrmd started it
            log = task._log
            self.started(task, min(max(real_start, log[-1] if log else real_start), now))
        if not self.replaying:
            record = {"t": "e", "n": task.seq, "c": exit_code, "now": now, "m": message,
                      "k": canceled, "pid": task.pid, "wd": task.wd}
            if real_start is not None:
                record["st"] = real_start
            self.record(record)
        self.running.pop(task.name, None)
        held = task.chain is not None and self._leave_slot(task, now)
        if task.allocation is not None and not self.replaying and not held:
            self.pool.release(task.allocation)
        task.ended = now
        task.handle = None                  # nothing left to cancel
        if task.started is None:
            task.started = now
        elif task.chained and real_start is not None:
            self._started_at(task, real_start, now)
        task.exit_code = -1 if exit_code is None else exit_code
        task.message = message
        state = CANCELED if canceled else SUCCEED if exit_code == 0 else FAILED
        self._set(task, state, now)

    @staticmethod
    def _started_at(task: Task, real_start: float, now: float) -> None:
        """A chained task's start is when nrmd started it, which the pilot
        learns only with its end: its EXECUTING stamp and rtime take it
        (kept between its placement and its end)."""
        log = task._log
        for i in range(len(log) - 2, -1, -2):
            if log[i] == EXECUTING:
                start = min(max(real_start, log[i - 1] if i else real_start), now)
                log[i + 1] = task.started = start
                return

    def _set(self, task: Task, state: str, now: float) -> None:
        if state in FINAL:
            self.final_tasks += 1
        task.set_state(state, now)
        job = task.job
        if state in FINAL and job.iterative:
            self.on_final(task)
        if job.task_state_changed(task, now):
            self.unfinished -= 1
            self.on_final(job)
            ready, omitted = self.graph.finished(job.name, job.state)
            for j in ready:
                self._enqueue(j)
            self._omit(omitted, now)
            if job.state == OMITTED:
                _, more = self.graph.finished(job.name, OMITTED)
                self._omit(more, now)

    def _omit(self, jobs: List[Job], now: float) -> None:
        """Jobs whose dependency will never succeed: OMITTED, with their
        own dependants (the graph gives the transitive closure)."""
        cascade: List[Job] = []
        for job in jobs:
            if job.final:
                continue
            job.messages += ("a dependency did not succeed",)
            for task in job.tasks:
                if not task.final:
                    self.final_tasks += 1
                task.set_state(OMITTED, now)
                if job.iterative:
                    self.on_final(task)
            job.finished_tasks = len(job.tasks)
            job.set_state(OMITTED, now)
            self.unfinished -= 1
            self.on_final(job)
            cascade.extend(self.graph.finished(job.name, OMITTED)[1])
        if cascade:
            self._omit(cascade, now)

    def cancel(self, job: Job, now: float) -> List[Task]:
        """Queued tasks end CANCELED now; running ones are returned for the
        runner to kill (their exit then reports them CANCELED)."""
        running = []
        if job.final:
            return running
        self.graph.remove(job)
        for task in job.tasks:
            if task.state == QUEUED:
                self._set(task, CANCELED, now)
            elif not task.final:
                task.message = "canceled"
                running.append(task)
        return running

    @property
    def done(self) -> bool:
        return self.unfinished == 0

    # ----------------------------------------------------------- replay ---
    def replay(self, records) -> List[Task]:
        """Rebuild the state a journal describes; the tasks it saw placed
        and not ended are returned (their cores are held in the pool): the
        caller finds out what became of them."""
        self.replaying = True
        try:
            for r in records:
                kind = r["t"]
                if kind == "req":
                    req = parse_request(r["i"], r["raw"], r["dir"])
                    self.handle(req, r["now"], r["uniq"])
                    continue
                task = self.by_seq.get(r.get("n"))
                if task is None:
                    continue
                if kind == "p":
                    alloc = Allocation([(n, list(c)) for n, c in r["al"]])
                    task.chained = bool(r.get("ch"))
                    self._place(task, alloc, r["a"], r["now"])
                elif kind == "x":
                    self.started(task, r["now"])
                elif kind == "e":
                    task.pid, task.wd = r.get("pid"), r.get("wd")
                    self.ended(task, r["c"], r["now"], message=r.get("m"),
                               canceled=bool(r.get("k")), real_start=r.get("st"))
                elif kind == "q":
                    self.requeue(task, r["now"], r.get("m") or "")
        finally:
            self.replaying = False
        # placements replayed without the scheduler: queue what is ready afresh
        self.scheduler = Scheduler(self.pool)
        for task in sorted(self.by_seq.values(), key=lambda t: t.seq):
            if task.state == QUEUED and task.job.name in self.jobs \
                    and task.job not in self.graph.unmet:
                self.scheduler.push(task)
        interrupted = list(self.running.values())
        chains: Dict[Any, Slot] = {}
        for task in interrupted:             # in the order they were placed
            self.pool.claim(task.allocation)
            parts = repr(task.allocation.parts)
            slot = chains.get(parts)
            if slot is None:                 # the first of its cores
                chains[parts] = task.chain = Slot(task, -1, live=False)
            else:                            # behind it (a chain): the cores stay held
                task.allocation = slot.alloc
                task.chain = slot
                slot.tasks.append(task)
        return interrupted

    # ---------------------------------------------------------- reports ---
    def runtime(self, task: Task) -> Dict[str, Any]:
        if task.allocation is None:
            return {}
        out = {"allocation": str(task.allocation), "wd": task.wd or self.root_wd,
               "rtime": model.format_rtime(task.rtime or 0.0),
               "exit_code": task.exit_code}
        if task.pid:
            out["pid"] = task.pid
        return out

    def history_text(self, history) -> str:
        return "".join(f"\n{model.format_stamp(ts)}: {state}" for state, ts in history)

    def job_info(self, job: Job, with_childs: bool) -> Dict[str, Any]:
        data: Dict[str, Any] = {"jobName": job.name, "status": job.state,
                                "history": self.history_text(job.history)}
        if job.messages:
            data["messages"] = "; ".join(job.messages)
        if job.iterative:
            it = job.spec.iteration
            data["iterations"] = {"start": 0 if it.values is not None else it.start,
                                  "stop": it.count if it.values is not None else it.stop,
                                  "total": len(job.tasks), "finished": job.finished_tasks,
                                  "failed": job.failed_tasks}
            if with_childs:
                data["childs"] = [{"iteration": t.index, "state": t.state,
                                   "runtime": self.runtime(t), "messages": t.message}
                                  for t in job.tasks]
        else:
            data["runtime"] = self.runtime(job.tasks[0])
        return data

    def report_entry(self, item: Any) -> Dict[str, Any]:
        """One jobs.report line: a finished iteration, or a finished job."""
        entry: Dict[str, Any] = {
            "name": item.name, "state": item.state,
            "history": [{"state": s, "date": model.format_stamp(ts)} for s, ts in item.history],
        }
        if isinstance(item, Task):
            entry["runtime"] = self.runtime(item)
            if item.message:
                entry["messages"] = item.message
            return entry
        raw = item.spec.raw
        if not item.iterative:
            entry["runtime"] = self.runtime(item.tasks[0])
            if item.tasks[0].message:
                entry["messages"] = item.tasks[0].message
        entry["execution"] = raw.get("execution")
        entry["resources"] = raw.get("resources") or {"numCores": {"exact": 1}}
        if item.after:
            entry["dependencies"] = {"after": list(item.after)}
        if item.messages:
            entry["messages"] = "; ".join(item.messages)
        return entry

    def final_status(self) -> Dict[str, Any]:
        jobs = list(self.jobs.values())
        tasks = [t for j in jobs if j.iterative for t in j.tasks]

        def count(items, state):
            return sum(1 for i in items if i.state == state)

        def stats(items):
            return {"TotalJobs" if items is jobs else "TotalIterations": len(items),
                    "InScheduleJobs" if items is jobs else "InScheduleIterations":
                        count(items, QUEUED) + count(items, SCHEDULED),
                    "FailedJobs" if items is jobs else "FailedIterations": count(items, FAILED),
                    "FinishedJobs" if items is jobs else "FinishedIterations":
                        sum(1 for i in items if i.state in FINAL),
                    "ExecutingJobs" if items is jobs else "ExecutingIterations":
                        count(items, EXECUTING)}
        return {
            "System": {"Uptime": None, "Zmqaddress": None, "Ifaces": [],
                       "Host": os.uname().nodename, "Account": _account(), "Wd": self.root_wd,
                       "PythonVersion": None},
            "Resources": {"Nodes": len(self.pool.names), "TotalCores": self.pool.total,
                          "UsedCores": self.pool.used, "FreeCores": self.pool.free_total},
            "JobStats": stats(jobs),
            "IterationStats": stats(tasks),
        }

    def outcome(self) -> Dict[str, int]:
        out = {s: 0 for s in (SUCCEED, FAILED, CANCELED, OMITTED)}
        for job in self.jobs.values():
            if job.state in out:
                out[job.state] += 1
        return out


#: the requests a resumed pilot must see again (the others only read)
JOURNALED = frozenset(("submit", "cancelJob", "removeJob", "control", "finish"))


def _account() -> str:
    import pwd
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())
