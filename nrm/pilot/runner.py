"""The pilot on asyncio: every task runs through nrmd in a slice of its cores.

:class:`Runner` is the native API that ``nrm pilot`` (and later the
QCG-compatible Python API) sits on: feed it requests, await
:meth:`Runner.wait_done`. Each placement becomes one ``AsyncClient.run``
whose slice is confined (``cpus_allowed``) to the real cpus the granted
pool cores map onto, so a task's Cpus_allowed_list is its grant.

With exact task keys, tasks of jobs that need no manifest or power policy
of their own go to nrmd in batches (``AsyncClient.run_batch``: one request
per loop turn, exits coalesced), and a job's following iterations are
committed behind its running ones on the same cores (the manager's slots,
docs/pilot.md "Chained iterations"), so nrmd starts each as its
predecessor ends, with no round trip through the pilot in between.

The pool is QCG's ``--nodes`` view. Core ``k`` of the pool (counted over
all nodes in order) maps onto real cpu ``k mod N`` of the cpus this process
may use; a pool larger than those N runs oversubscribed (shared slices),
which is how QCG local-mode files that grant cores the machine lacks still
run unchanged.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shlex
import time
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Tuple

from nrm import protocol
from nrm.client import AsyncClient, NrmError
from nrm.manifest import Manifest, Slice, load as load_manifest
from nrm.pilot import models
from nrm.pilot.attempts import Attempts, batches
from nrm.pilot.journal import Journal
from nrm.pilot.jobfile import Request
from nrm.pilot.manager import Manager
from nrm.pilot.model import Allocation, Task
from nrm.pilot.scheduler import Pool

log = logging.getLogger("nrm.pilot")

#: ended keyed attempts per ``forget`` request: nrmd keeps 16384 keys per
#: user, a pilot holds its in-flight ones plus at most this many
FORGET_BATCH = 1024
#: how often a cancelled task's container is asked for again while nrmd
#: has not made it yet (its launch queued behind another client's slice)
KILL_RETRY_S = 0.05
#: tasks a slot holds committed (running + waiting in nrmd behind it); it
#: is topped up when down to half: about one request per this many tasks
CHAIN_DEPTH = 32
#: tasks per batch request at most (nrmd takes requests up to 1 MiB)
BATCH_MAX = 256
#: the environment variable that changes CHAIN_DEPTH; 0: one launch per task, as
#: without keys (docs/pilot.md, "Chained iterations")
CHAIN_ENV = "NRM_PILOT_CHAIN"


def chain_depth() -> int:
    text = os.environ.get(CHAIN_ENV, "")
    if not text:
        return CHAIN_DEPTH
    if not text.isdigit():
        log.warning("%s=%r is not a number of tasks: using %d", CHAIN_ENV, text, CHAIN_DEPTH)
        return CHAIN_DEPTH
    return int(text)


def tasks_per_node_slurm(counts: List[int]) -> str:
    """Slurm's run-length form: ``2(x3),1``."""
    out: List[str] = []
    i = 0
    while i < len(counts):
        j = i
        while j < len(counts) and counts[j] == counts[i]:
            j += 1
        out.append(str(counts[i]) if j - i == 1 else f"{counts[i]}(x{j - i})")
        i = j
    return ",".join(out)


class Runner:
    def __init__(self, pool: Pool, wd: str, client: AsyncClient, *,
                 cpus: Optional[List[int]] = None, envschema: str = "auto",
                 on_final: Optional[Callable[[Any], None]] = None,
                 journal: Optional[Journal] = None, attempts: Optional[Attempts] = None):
        self.wd = os.path.abspath(wd)
        #: called with each final task and job; may be replaced before the run
        self.on_final: Callable[[Any], None] = on_final or (lambda item: None)
        self._finals: List[Any] = []
        self.manager = Manager(pool, self.wd, self._final)
        #: with both, the pilot can be resumed: states are journaled, tasks run
        #: detached from this connection, with task keys nrmd keeps or under a
        #: wrapper that records them (nrm/pilot/attempts.py)
        self.journal = journal
        self.attempts = attempts
        if journal is not None:
            self.manager.record = journal.append
        self.client = client
        self.cpus = sorted(cpus if cpus is not None else os.sched_getaffinity(0))
        self.oversubscribed = pool.total > len(self.cpus)
        self.slurm_env = envschema == "slurm" or (envschema == "auto"
                                                  and "SLURM_JOB_ID" in os.environ)
        self.offsets: Dict[str, int] = {}
        offset = 0
        for name, size in zip(pool.names, pool.sizes):
            self.offsets[name] = offset
            offset += size
        self.base_env = dict(os.environ)
        self._manifests: Dict[Any, Manifest] = {}
        self._inflight: set = set()
        self._wd_made = False
        self._done = asyncio.Event()
        self.rejected = 0
        #: keyed attempts that have ended, for nrmd to forget in batches
        self._ended_keys: List[str] = []
        self._forgetting: Optional[asyncio.Future] = None
        #: tasks sent in a batch and not yet reported, by key
        self._batched: Dict[str, Tuple[Task, protocol.BatchTask]] = {}
        self._batch_manifest = Manifest(name="nrm-pilot", slice=Slice(cpus=1, mems=1))
        self.manager.chain_depth = chain_depth()
        self.manager.chainable = self.batchable

    # ------------------------------------------------------------ input ---
    def handle(self, req: Request) -> Dict[str, Any]:
        """One request, answered now; placements start in the background."""
        response = self.manager.handle(req, time.time())
        if response["code"] != 0:
            self.rejected += 1
        if req.kind == "finish":
            self.cancel_all()
        elif req.kind == "cancelJob" and response["code"] == 0:
            for name in req.names:
                for task in self.manager.cancel(self.manager.jobs[name], time.time()):
                    self._kill(task)
        self.pump(answer_first=True)
        return response

    def cancel_all(self) -> None:
        now = time.time()
        for job in list(self.manager.jobs.values()):
            for task in self.manager.cancel(job, now):
                self._kill(task)

    def _kill(self, task: Task) -> None:
        if task.handle:
            fut = asyncio.ensure_future(self._kill_container(task, task.handle))
            fut.add_done_callback(_quiet)

    async def _kill_container(self, task: Task, name: str) -> None:
        """Kill the task's container. One nrmd does not have yet (the
        launch waits in nrmd's queue for a slice another client holds) is
        asked for again until it exists or the task has ended."""
        while True:
            try:
                await self.client.call(protocol.Kill(container=name))
                return
            except NrmError as exc:
                if exc.code != "not_found":
                    raise
            await asyncio.sleep(KILL_RETRY_S)
            if task.handle != name:          # ended meanwhile (or another attempt)
                return

    # --------------------------------------------------------- progress ---
    def pump(self, answer_first: bool = False) -> None:
        """Launch what the scheduler places now: each launch is sent from
        here, in this turn of the loop, before the bookkeeping of the exit
        that freed its cores (report lines are written after: _final).
        ``answer_first`` (a request placed them): the launches leave in the
        next turn, after the caller's answer (the API's acknowledgement
        starts its fdatasync first) and a file's further requests."""
        now = time.time()
        placed = self.manager.placements(now)
        if self.manager.slots:
            placed += self.manager.commits(now)
        if placed and answer_first:
            asyncio.get_running_loop().call_soon(self._launch_all, placed)
        elif placed:
            self._launch_all(placed, now)
        if self.manager.done:
            self._done.set()

    def _launch_all(self, placed: List[Tuple[Task, Allocation]],
                    now: Optional[float] = None) -> None:
        now = time.time() if now is None else now
        batch = []
        for task, alloc in placed:
            if self.batchable(task.job):
                batch.append((task, alloc))
            else:
                self._launch(task, alloc, now)
        if batch:
            self._send_batch(batch, now)

    def batchable(self, job) -> bool:
        """The job's tasks go in batches: keyed (a batch's tasks are),
        without a manifest or power policy of their own (a batch has one
        manifest; per-task profiles need their own run), an execution
        model whose launcher needs no environment of its own, and no
        oversubscribed pool (a batch runs tasks on equal cpus one at a
        time, an oversubscribed pool shares them)."""
        attempts = self.attempts
        if attempts is None or not attempts.keyed or self.oversubscribed \
                or not self.manager.chain_depth:
            return False
        spec = job.spec
        return not (spec.nrm.manifest or spec.nrm.power
                    or spec.execution.model in models.PARALLEL)

    async def wait_done(self) -> None:
        """Until every registered job is final (and reported)."""
        if not self.manager.done:
            self._done.clear()
            await self._done.wait()
        self.flush_finals()

    # ------------------------------------------------------------ finals ---
    def _final(self, item: Any) -> None:
        """A task or job is final: reported (``on_final``) at the end of
        this turn of the loop, after the launches its end made room for."""
        if not self._finals:
            try:
                asyncio.get_running_loop().call_soon(self.flush_finals)
            except RuntimeError:            # no loop: at once
                self.on_final(item)
                return
        self._finals.append(item)

    def flush_finals(self) -> None:
        items, self._finals = self._finals, []
        for item in items:
            try:
                self.on_final(item)
            except Exception:           # a report that cannot be written stops no task
                log.exception("reporting %s failed", item.name)

    # ----------------------------------------------------------- launch ---
    def task_wd(self, task: Task) -> str:
        """The task's working directory, made if need be. The pilot's own
        (most tasks') is made once: a mkdir per launch is two system calls,
        and on a cluster's shared file system a round trip to its server."""
        wd_opt = task.job.spec.execution.wd
        if wd_opt:
            wd = os.path.join(self.wd, task.expand(wd_opt))
            os.makedirs(wd, exist_ok=True)
        else:
            wd = self.wd
            if not self._wd_made:
                os.makedirs(wd, exist_ok=True)
                self._wd_made = True
        task.wd = wd
        return wd

    def real_cpus(self, alloc: Allocation) -> List[int]:
        n = len(self.cpus)
        out = {self.cpus[(self.offsets[node] + core) % n] for node, cores in alloc.parts
               for core in cores}
        return sorted(out)

    def manifest_for(self, task: Task, ncpus: int) -> Manifest:
        """The job's manifest with the task's cpu count (and power policy):
        made once per shape, not per launch (manifests are not mutated)."""
        opts = task.job.spec.nrm
        shape = (opts.manifest or "", ncpus, opts.power)
        m = self._manifests.get(shape)
        if m is None:
            base = self._manifests.get(shape[0])
            if base is None:
                base = (load_manifest(opts.manifest) if opts.manifest
                        else Manifest(name="nrm-pilot", slice=Slice(cpus=1, mems=1)))
                self._manifests[shape[0]] = base
            m = dataclasses.replace(base, slice=dataclasses.replace(base.slice, cpus=ncpus))
            if opts.power:
                m = dataclasses.replace(m, power=dataclasses.replace(m.power, policy=opts.power))
            self._manifests[shape] = m
        return m

    def task_env(self, task: Task, alloc: Allocation, cpus: List[int], wd: str,
                 base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
        """The task's environment: ``base`` (the pilot's own by default)
        with the task's variables over it."""
        env = dict(self.base_env if base is None else base)
        nodes = alloc.nodes
        per_node = [len(c) for _, c in alloc.parts]
        ncores = alloc.ncores
        env.update({
            "QCG_PM_NNODES": str(len(nodes)), "QCG_PM_NODELIST": ",".join(nodes),
            "QCG_PM_NPROCS": str(ncores), "QCG_PM_NTASKS": str(ncores),
            "QCG_PM_STEP_ID": task.uniq,
            "QCG_PM_TASKS_PER_NODE": ",".join(map(str, per_node)),
            "QCG_PM_CPU_SET": ",".join(map(str, cpus)),
        })
        if self.slurm_env:
            tpn = tasks_per_node_slurm(per_node)
            hostfile = os.path.join(wd, f".{task.name}.hostfile")
            with open(hostfile, "w") as f:
                for node, cores in alloc.parts:
                    f.write(f"{node}\n" * len(cores))
            env.update({
                "SLURM_NNODES": str(len(nodes)), "SLURM_NODELIST": ",".join(nodes),
                "SLURM_NPROCS": str(ncores), "SLURM_NTASKS": str(ncores),
                "SLURM_JOB_NODELIST": ",".join(nodes), "SLURM_JOB_NUM_NODES": str(len(nodes)),
                "SLURM_STEP_NODELIST": ",".join(nodes), "SLURM_STEP_NUM_NODES": str(len(nodes)),
                "SLURM_STEP_NUM_TASKS": str(ncores), "SLURM_NTASKS_PER_NODE": tpn,
                "SLURM_STEP_TASKS_PER_NODE": tpn, "SLURM_TASKS_PER_NODE": tpn,
                "SLURM_JOB_CPUS_PER_NODE": tpn, "SLURM_OVERLAP": "1",
                "SLURM_HOSTFILE": hostfile,
            })
        if task.job.spec.execution.model == "threads":
            env["OMP_NUM_THREADS"] = str(ncores)
        for key, value in task.job.spec.execution.env.items():
            env[key] = task.expand(value)
        return env

    def argv_for(self, task: Task) -> List[str]:
        """The command, wrapped in a shell only when the job needs one (a
        script, modules, a venv, redirections)."""
        ex = task.job.spec.execution
        sub = task.expand
        prefix: List[str] = []
        if ex.modules:
            prefix.append("source /etc/profile && module load "
                          + " ".join(shlex.quote(sub(m)) for m in ex.modules))
        if ex.venv:
            prefix.append(f"source {shlex.quote(os.path.join(sub(ex.venv), 'bin/activate'))}")
        redirect = ""
        for fd, path in (("<", ex.stdin), (">", ex.stdout), ("2>", ex.stderr)):
            if path:
                redirect += f" {fd}{shlex.quote(sub(path))}"
        if ex.script is not None:
            if not prefix and not redirect:
                return ["bash", "-l", "-c", sub(ex.script)]
            body = "exec" + redirect + " bash -l -c " + shlex.quote(sub(ex.script))
            return ["bash", "-c", " && ".join(prefix + [body])]
        command = [sub(ex.exec)] + [sub(a) for a in ex.args]
        if not prefix and not redirect:
            return command
        body = "exec" + redirect + ' "$@"'
        return ["bash", "-c", " && ".join(prefix + [body]), "bash"] + command

    def _launch(self, task: Task, alloc: Allocation, now: float) -> None:
        """Send the task's launch now (the journal written first); a
        coroutine follows it to its end."""
        try:
            wd = self.task_wd(task)
            cpus = self.real_cpus(alloc)
            manifest = self.manifest_for(task, len(cpus))
            env = self.task_env(task, alloc, cpus, wd)
            argv = models.wrap(task, alloc, self.argv_for(task), env)
            plain = argv
            if self.attempts is not None and not self.attempts.keyed:
                argv = self.attempts.wrap(task.seq, task.attempt, argv, env.get("PATH"), wd)
        except Exception as exc:              # a bad wd, manifest: the task fails
            asyncio.get_running_loop().call_soon(self._not_launched, task, now, str(exc), False)
            return

        def started(result):
            task.handle = result.container
            task.pid = result.pid
            if task.message == "canceled":         # cancelled while it was starting
                self._kill(task)

        if task.message == "canceled":             # cancelled before it was launched
            asyncio.get_running_loop().call_soon(self._not_launched, task, now, "canceled",
                                                 True)
            return

        self.manager.started(task, now)
        container = key = None
        on_started = started
        if self.attempts is not None:
            container = self.attempts.container(task.seq, task.attempt)
            if self.attempts.keyed:
                key = self.attempts.key(task.seq, task.attempt)
            # named by the pilot: cancellable from now on (_kill), so no
            # ``started`` reply is asked for (one message less per task
            # through both sides' zmq threads; the exit repeats the pid)
            task.handle = container
            on_started = None
        run = dict(output=False, on_started=on_started, wait=True,
                   oversubscribe=self.oversubscribed, cpus_allowed=cpus,
                   container=container, detach=container is not None, follow=True)
        follow = error = None
        try:
            if self.journal is not None:
                self.journal.write()              # no launch the journal does not know
            follow = self.client.start_run(manifest, argv, env=env, cwd=wd, key=key, **run)
        except Exception as exc:                  # reported by _follow, as its own
            error = exc
        fut = asyncio.ensure_future(self._follow(task, follow, error, key, manifest, plain,
                                                 env, wd, run))
        self._inflight.add(fut)
        fut.add_done_callback(self._inflight.discard)

    # ------------------------------------------------------------ batch ---
    def _send_batch(self, placed: List[Tuple[Task, Allocation]], now: float) -> None:
        """One ``run_batch`` for every batchable task placed or committed in
        this turn, the journal written first (no launch it does not know)."""
        attempts = self.attempts
        loop = asyncio.get_running_loop()
        tasks: List[protocol.BatchTask] = []
        for task, alloc in placed:
            if task.message == "canceled":         # cancelled before it was sent
                loop.call_soon(self._not_launched, task, now, "canceled", True)
                continue
            try:
                wd = self.task_wd(task)
                cpus = self.real_cpus(alloc)
                env = self.task_env(task, alloc, cpus, wd, base={})
                argv = self.argv_for(task)
            except Exception as exc:              # a bad wd: the task fails
                loop.call_soon(self._not_launched, task, now, str(exc), False)
                continue
            if not task.chained:                  # it starts now; a chained one later
                self.manager.started(task, now)
            key = attempts.key(task.seq, task.attempt)
            container = attempts.container(task.seq, task.attempt)
            task.handle = container               # cancellable from now on (_kill)
            bt = protocol.BatchTask(key, container, argv, cpus, wd, env)
            self._batched[key] = (task, bt)
            tasks.append(bt)
        if not tasks:
            return
        journaled: Optional[Exception] = None
        try:
            if self.journal is not None:
                self.journal.write()              # no launch the journal does not know
        except Exception as exc:                  # then none is sent: they fail
            journaled = exc
        for i in range(0, len(tasks), BATCH_MAX):
            chunk = tasks[i:i + BATCH_MAX]
            try:
                if journaled is not None:
                    raise journaled
                fut = self.client.run_batch(self._batch_manifest, self.base_env, chunk,
                                            self._on_exits, oversubscribe=False)
            except Exception as exc:              # refused before sending: as by nrmd
                fut = loop.create_future()
                fut.set_exception(exc)
            fut.add_done_callback(partial(self._batch_done, chunk))
            self._inflight.add(fut)
            fut.add_done_callback(self._inflight.discard)

    def _on_exits(self, exits: List[protocol.BatchExit]) -> None:
        """A coalesced list of batched tasks' ends, handled in one pass;
        what they made room for is placed and sent after it (one batch)."""
        now = time.time()
        offset = now - time.monotonic()        # nrmd's monotonic clock, this node's
        batched = self._batched
        ended = self.manager.ended
        fenced = 0
        for ex in exits:
            entry = batched.pop(ex.key, None)
            if entry is None:
                continue
            task, bt = entry
            if ex.pid:
                task.pid = ex.pid
            canceled = task.message == "canceled"
            if not ex.pid and not canceled and (ex.error or "").startswith("keys_full"):
                # nrmd holds as many of this user's keys as it keeps (other
                # pilots' not forgotten): this one goes under the fence
                self._launch_fenced(task, bt)
                fenced += 1
                continue
            message = task.message if canceled else ex.error
            if message is None and ex.status is None:
                message = "nrmd has no exit status for it"
            status = ex.status
            if status is not None and status < 0:     # minus the signal: shell-style, as Exit's
                status = 128 - status
            ended(task, status, now, message=message, canceled=canceled,
                  real_start=None if ex.started_at is None else ex.started_at + offset)
            self.ended_key(ex.key)
        if fenced:
            log.warning("nrmd keeps no more task keys: %d tasks launched with the fence", fenced)
        self.pump()

    def _batch_done(self, sent: List[protocol.BatchTask], fut: asyncio.Future) -> None:
        """A batch's stream is over. Refused whole (nrmd said why, or it
        could not be sent): its tasks not reported did not run, and fail
        (nrmd refuses keys per task, in the exits: ``_on_exits``)."""
        if fut.cancelled() or fut.exception() is None:
            return
        exc = fut.exception()
        left = [self._batched.pop(bt.key)[0] for bt in sent if bt.key in self._batched]
        if not left:
            return
        log.warning("a batch of %d tasks was refused: %s", len(left), exc)
        now = time.time()
        for task in left:
            canceled = task.message == "canceled"
            self.manager.ended(task, None, now, message=task.message if canceled else str(exc),
                               canceled=canceled)
        self.pump()

    def _launch_fenced(self, task: Task, bt: protocol.BatchTask) -> None:
        """A batched task nrmd refused for want of key room: launched alone,
        under the fence, waiting for its cpus (behind whatever nrmd already
        queued there)."""
        env = dict(self.base_env, **bt.env)
        manifest = self.manifest_for(task, len(bt.cpus))
        run = dict(output=False, on_started=None, wait=True, oversubscribe=False,
                   cpus_allowed=list(bt.cpus), container=bt.container, detach=True,
                   follow=True)
        follow = error = None
        try:
            argv = self.attempts.wrap(task.seq, task.attempt, bt.argv, env.get("PATH"), bt.cwd)
            follow = self.client.start_run(manifest, argv, env=env, cwd=bt.cwd, **run)
        except Exception as exc:
            error = exc
        fut = asyncio.ensure_future(self._follow(task, follow, error, None, manifest, bt.argv,
                                                 env, bt.cwd, run))
        self._inflight.add(fut)
        fut.add_done_callback(self._inflight.discard)

    def _not_launched(self, task: Task, now: float, message: str, canceled: bool) -> None:
        self.manager.ended(task, None, now, message=message, canceled=canceled)
        self.pump()

    async def _follow(self, task: Task, follow, error: Optional[Exception], key: Optional[str],
                      manifest: Manifest, plain: List[str], env: Dict[str, str], wd: str,
                      run: Dict[str, Any]) -> None:
        """Until the launch sent by _launch has ended: its end, journaled."""
        code: Optional[int] = None
        message = None
        real_start = None
        try:
            if error is not None:
                raise error
            try:
                result = await follow
            except NrmError as exc:
                if exc.code != "keys_full":
                    raise
                # nrmd holds as many keys of this user as it keeps (other
                # pilots' not forgotten): this launch goes under the fence
                log.warning("%s: %s; launching it with the fence", task.name, exc)
                key = None
                argv = self.attempts.wrap(task.seq, task.attempt, plain, env.get("PATH"), wd)
                result = await self.client.run(manifest, argv, env=env, cwd=wd,
                                               **dict(run, detach=True))
            code = result.status
            task.pid = result.pid
            if result.started_at is not None:    # nrmd's monotonic clock, this node's
                real_start = time.time() - (time.monotonic() - result.started_at)
        except NrmError as exc:
            message = str(exc)
            log.warning("%s: %s", task.name, message)
        except Exception as exc:             # never leave the pilot hanging on one task
            message = f"{type(exc).__name__}: {exc}"
            log.exception("%s: launch failed", task.name)
        self.manager.ended(task, code, time.time(), message=message or task.message,
                           canceled=task.message == "canceled", real_start=real_start)
        if key is not None:
            self.ended_key(key)
        self.pump()

    # ------------------------------------------------------------- keys ---
    def ended_key(self, key: str) -> None:
        """A keyed attempt has ended in the journal: nrmd may forget its key
        once that record is durable (a successor reads the journal then)."""
        self._ended_keys.append(key)
        if len(self._ended_keys) >= FORGET_BATCH and self._forgetting is None:
            self._forgetting = asyncio.ensure_future(self._forget())

    async def _forget(self) -> None:
        try:
            while len(self._ended_keys) >= FORGET_BATCH:
                keys, self._ended_keys = self._ended_keys, []
                await self.journal.durable()
                for batch in batches(keys):
                    await self.client.forget(batch)
        except Exception as exc:        # nrmd keeps them: forgotten by prefix at the end
            log.warning("could not make nrmd forget ended task keys: %s", exc)
        finally:
            self._forgetting = None

    async def forget_keys(self) -> None:
        """The pilot is over: every key of its attempts goes (its journal
        records every end, durably)."""
        if self.attempts is None or not self.attempts.keyed:
            return
        if self._forgetting is not None:
            await asyncio.gather(self._forgetting, return_exceptions=True)
        try:
            await self.journal.durable()
            await self.client.forget(prefix=self.attempts.key_prefix)
            self._ended_keys.clear()
        except Exception as exc:
            log.warning("could not make nrmd forget this pilot's task keys: %s", exc)


def _quiet(fut: asyncio.Future) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.warning("kill failed: %s", fut.exception())
