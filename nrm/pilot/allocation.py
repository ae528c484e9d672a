"""``nrm pilot`` across a whole Slurm allocation: one manager, one agent per node.

The manager (this process, wherever the allocation's shell runs) makes the
pilot's two CURVE keypairs under its directory, binds its authenticated
endpoint (:mod:`nrm.pilot.wire`) and starts every agent with a single
``srun --overlap --ntasks-per-node=1`` step. Each agent says hello with
the cpus it sees; once all have, tasks are scheduled over the whole pool as
on one node, and each placement is sent to the agent of its allocation's
first node, batched per node per scheduling pass. The agent runs it through
its node's nrmd and streams back started/exit.

A node is lost when its agent says its nrmd stopped answering, when it has
been silent for ``agent_timeout`` seconds, or when the agents' step ends:
its tasks end FAILED with a message, tasks spanning it are killed, queued
tasks that can no longer fit end FAILED, the node leaves the pool and the
rest go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Set, Tuple

from nrm.pilot import models
from nrm.pilot.model import QUEUED, Allocation, Task
from nrm.pilot.runner import Runner
from nrm.pilot.scheduler import Pool
from nrm.pilot.wire import ManagerEndpoint, make_keys

log = logging.getLogger("nrm.pilot")

ENV_LISTEN = "NRM_PILOT_LISTEN"
ENV_AGENT_TIMEOUT = "NRM_PILOT_AGENT_TIMEOUT"
RANK_MANIFEST = ("name: nrm-pilot-rank\nversion: 1\napp:\n  slice:\n    cpus: 1\n"
                 "    mems: 1\n")


class AllocationError(Exception):
    """The agents could not be started; one line."""


class NodePool(Pool):
    """A pool whose nodes can be lost: a lost node's cores are neither
    free nor counted, and cores released on it are dropped."""

    def __init__(self, nodes, system_core: bool = False):
        super().__init__(nodes, system_core)
        self.index = {n: i for i, n in enumerate(self.names)}
        self.lost: Set[str] = set()

    def remove_node(self, name: str) -> None:
        i = self.index[name]
        if name in self.lost:
            return
        self.lost.add(name)
        self.free_total -= len(self.free[i])
        self.total -= self.capacity[i]
        self.free[i] = []
        self.capacity[i] = 0

    def fits_ever(self, shape) -> bool:
        cmin, _, nmin, _ = shape
        if nmin and cmin == 0:
            return nmin <= len(self.names) - len(self.lost)
        return super().fits_ever(shape)

    def release(self, alloc: Allocation) -> None:
        if self.lost:
            alloc = Allocation([p for p in alloc.parts if p[0] not in self.lost])
        super().release(alloc)


class AgentState:
    __slots__ = ("node", "cpus", "last_seen", "pending", "tasks")

    def __init__(self, node: str, cpus: List[int], now: float):
        self.node, self.cpus, self.last_seen = node, cpus, now
        self.pending: List[dict] = []
        self.tasks: Set[int] = set()


class ClusterRunner(Runner):
    """The pilot's Runner with tasks sent to node agents instead of one nrmd."""

    def __init__(self, pool: NodePool, wd: str, *, envschema: str = "auto",
                 on_final=None, host: str, keys: Tuple[str, str],
                 agent_timeout: float = 10.0):
        super().__init__(pool, wd, None, cpus=list(range(max(pool.sizes))),
                         envschema=envschema, on_final=on_final)
        self.oversubscribed = False
        self.service_env = self.base_env
        self.base_env = {}                        # task_env gives only what differs
        self.endpoint = ManagerEndpoint(host, keys[0], keys[1], self.on_message)
        self.agents: Dict[str, AgentState] = {}
        self.expected = set(pool.names)
        self.launched: Dict[int, Tuple[Task, str]] = {}
        self.lost_reason: Dict[int, str] = {}
        self._ids = itertools.count(1)
        self._flush_scheduled = False
        self.agent_timeout = agent_timeout
        self.all_hello = asyncio.Event()
        self.rank_manifest = os.path.join(wd, ".nrm-pilot-rank.yml")
        with open(self.rank_manifest, "w") as f:
            f.write(RANK_MANIFEST)

    # ------------------------------------------------------------ agents ---
    def on_message(self, node: str, msg: dict) -> None:
        now = time.time()
        agent = self.agents.get(node)
        kind = msg.get("t")
        if kind == "hello":
            if node not in self.expected or node in self.manager.pool.lost:
                return
            self.agents[node] = AgentState(node, list(msg.get("cpus") or [0]), now)
            self.endpoint.send(node, {"t": "welcome", "env": self.service_env})
            log.info("agent on %s: pid %s, cpus %s", node, msg.get("pid"), msg.get("cpus"))
            if set(self.agents) >= self.expected:
                self.all_hello.set()
            return
        if agent is None:
            return
        agent.last_seen = now
        if kind == "events":
            for ev in msg.get("ev") or ():
                self._event(agent, ev, now)
            self.pump()
        elif kind == "lost":
            self.node_lost(node, str(msg.get("message") or f"the agent on {node} is lost"))

    def _event(self, agent: AgentState, ev: list, now: float) -> None:
        entry = self.launched.get(ev[1]) if len(ev) >= 3 else None
        if entry is None:
            return
        task = entry[0]
        if ev[0] == "s":
            task.pid = ev[2]
            if task.message == "canceled":
                self._kill(task)
        elif ev[0] == "x":
            del self.launched[ev[1]]
            agent.tasks.discard(ev[1])
            lost = self.lost_reason.pop(ev[1], None)
            canceled = task.message == "canceled" and lost is None
            message = lost or (ev[3] if len(ev) > 3 else None) or (
                "canceled" if canceled else None)
            self.manager.ended(task, None if lost else ev[2], now, message=message,
                               canceled=canceled)

    def node_lost(self, node: str, message: str) -> None:
        if node in self.manager.pool.lost:
            return
        log.warning("node %s lost: %s", node, message)
        now = time.time()
        self.manager.pool.remove_node(node)
        agent = self.agents.pop(node, None)
        for tid, (task, where) in list(self.launched.items()):
            if where == node:
                del self.launched[tid]
                self.manager.ended(task, None, now, message=message)
            elif node in task.allocation.nodes:
                self.lost_reason[tid] = f"{message}; the task spanned {node}"
                self._kill(task)
        if agent is not None:
            agent.tasks.clear()
        for shape, bucket in list(self.manager.scheduler.buckets.items()):
            if self.manager.pool.fits_ever(shape):
                continue
            for task in list(bucket):
                if task.state == QUEUED:
                    self.manager.ended(task, None, now,
                                       message=f"not enough resources left: {message}")
        self.pump()

    async def watch(self, step: Optional[subprocess.Popen]) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = time.time()
            for node, agent in list(self.agents.items()):
                if now - agent.last_seen > self.agent_timeout:
                    self.node_lost(node, f"the agent on {node} has been silent for "
                                         f"{self.agent_timeout:g} s")
            if step is not None and step.poll() is not None:
                for node in list(self.agents):
                    self.node_lost(node, f"the agents' srun step ended (status "
                                         f"{step.returncode})")
                step = None

    # ----------------------------------------------------------- launch ---
    def real_cpus(self, alloc: Allocation) -> List[int]:
        node, cores = alloc.parts[0]
        agent = self.agents.get(node)
        cpus = agent.cpus if agent else [0]
        return sorted({cpus[c % len(cpus)] for c in cores})

    def pump(self, answer_first: bool = False) -> None:
        """Placements go to their agents at the end of this turn (_flush),
        after any answer: ``answer_first`` changes nothing here."""
        now = time.time()
        for task, alloc in self.manager.placements(now):
            self._send(task, alloc, now)
        if self.manager.done:
            self._done.set()

    def _send(self, task: Task, alloc: Allocation, now: float) -> None:
        node = alloc.parts[0][0]
        agent = self.agents.get(node)
        try:
            if agent is None:
                raise RuntimeError(f"node {node} has no agent")
            wd = self.task_wd(task)
            cpus = self.real_cpus(alloc)
            env = self.task_env(task, alloc, cpus, wd)
            argv = models.wrap(task, alloc, self.argv_for(task), env, self.rank_manifest)
        except Exception as exc:
            self.manager.ended(task, None, now, message=str(exc))
            return
        if task.message == "canceled":
            self.manager.ended(task, None, now, message="canceled", canceled=True)
            return
        tid = next(self._ids)
        self.launched[tid] = (task, node)
        agent.tasks.add(tid)
        task.handle = (node, tid)
        opts = task.job.spec.nrm
        agent.pending.append({"id": tid, "argv": argv, "env": env, "cwd": wd, "cpus": cpus,
                              "ncpus": len(cpus), "manifest": opts.manifest,
                              "power": opts.power})
        self.manager.started(task, now)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        for node, agent in list(self.agents.items()):
            if agent.pending:
                batch, agent.pending = agent.pending, []
                if not self.endpoint.send(node, {"t": "launch", "tasks": batch}):
                    self.node_lost(node, f"the agent on {node} cannot be reached")

    def _kill(self, task: Task) -> None:
        if task.handle:
            node, tid = task.handle
            self.endpoint.send(node, {"t": "kill", "ids": [tid]})

    def stop_agents(self) -> None:
        for node in list(self.agents):
            self.endpoint.send(node, {"t": "stop"})


def agents_command(uri: str, keys_dir: str, nodes: List[str], aux: str) -> List[str]:
    return ["srun", "--overlap", "--ntasks-per-node=1", "-N", str(len(nodes)),
            "--nodelist", ",".join(nodes), "--cpu-bind=none", "--kill-on-bad-exit=0",
            "--output", os.path.join(aux, "agent-%t.log"),
            sys.executable, "-m", "nrm.pilot.agent", "--manager", uri, "--keys", keys_dir]


@contextlib.asynccontextmanager
async def open_allocation(pool: NodePool, wd: str, aux: str, *, envschema: str,
                          on_final: Any, init_timeout: float):
    """A :class:`ClusterRunner` whose agents all said hello; they are
    stopped (and the step waited for) on the way out."""
    keys_dir = os.path.join(aux, "keys")
    keys = make_keys(keys_dir)
    host = os.environ.get(ENV_LISTEN) or _default_host()
    runner = ClusterRunner(pool, wd, envschema=envschema, on_final=on_final, host=host,
                           keys=keys,
                           agent_timeout=float(os.environ.get(ENV_AGENT_TIMEOUT) or 10.0))
    runner.endpoint.start()
    argv = agents_command(runner.endpoint.uri, keys_dir, pool.names, aux)
    log.info("starting agents: %s", " ".join(argv))
    try:
        step = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=open(os.path.join(aux, "agents.err"), "wb"),
                                start_new_session=True)
    except OSError as exc:
        runner.endpoint.close()
        raise AllocationError(f"cannot start the agents with srun: {exc.strerror or exc}")
    watcher = None
    try:
        try:
            await asyncio.wait_for(runner.all_hello.wait(), init_timeout)
        except asyncio.TimeoutError:
            missing = sorted(set(pool.names) - set(runner.agents))
            raise AllocationError(
                f"no agent answered from {', '.join(missing)} within {init_timeout:g} s "
                f"(see {aux}/agents.err and agent-RANK.log)") from None
        watcher = asyncio.ensure_future(runner.watch(step))
        yield runner
    finally:
        if watcher is not None:
            watcher.cancel()
        runner.stop_agents()
        await _reap(step)
        runner.endpoint.close()


async def _reap(step: subprocess.Popen, grace: float = 10.0) -> None:
    deadline = time.monotonic() + grace
    while step.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if step.poll() is None:
        step.terminate()
        try:
            step.wait(5)
        except subprocess.TimeoutExpired:
            step.kill()
            step.wait()


def _default_host() -> str:
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"
