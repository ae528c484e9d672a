"""A node agent of ``nrm pilot`` across a Slurm allocation.

One agent per node, all started by one ``srun --ntasks-per-node=1`` step.
It connects to the manager over the pilot's CURVE channel
(:mod:`nrm.pilot.wire`) and to its own node's nrmd over ipc (so nrmd
identifies the submitting user from the kernel), runs each task it is sent
through ``AsyncClient.run`` and streams back started/exit in batches.

Its nrmd is asked for its status every ``--health-period`` seconds. When it
stops answering the agent reports each of its tasks ended with a message,
kills what it knows of them (a task of a dead nrmd has no one left to
account for it), says ``lost`` and exits 3: the manager takes the node out
of its pool. ``--stand-in`` replaces nrmd by an executor that ends each task
at once (exit 0, no process): the benchmark's way of measuring the
manager's dispatch alone with many agents on one machine.

    python -m nrm.pilot.agent --manager URI --keys DIR [--node NAME]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import signal
import socket
import sys
from typing import Any, Dict, List, Optional

from nrm import protocol
from nrm.client import AsyncClient, NrmError
from nrm.manifest import Manifest, Slice, load as load_manifest
from nrm.pilot.wire import AgentEndpoint
from nrm.transport.curve import CurveError

HEARTBEAT = 1.0
EXIT_LOST = 3


class ManifestCache:
    """A task's manifest: its file (read once) or the pilot's default,
    sized to the task's cpus and given its power policy."""

    def __init__(self):
        self.files: Dict[str, Manifest] = {}

    def get(self, path: Optional[str], ncpus: int, power: Optional[str]) -> Manifest:
        key = path or ""
        base = self.files.get(key)
        if base is None:
            base = (load_manifest(path) if path
                    else Manifest(name="nrm-pilot", slice=Slice(cpus=1, mems=1)))
            self.files[key] = base
        m = dataclasses.replace(base, slice=dataclasses.replace(base.slice, cpus=ncpus))
        if power:
            m = dataclasses.replace(m, power=dataclasses.replace(m.power, policy=power))
        return m


class Agent:
    def __init__(self, node: str, link_args: tuple, client: Optional[AsyncClient],
                 health_period: float = 1.0):
        self.node = node
        self.link = AgentEndpoint(*link_args, handle=self.on_message)
        self.client = client
        self.health_period = health_period
        self.base_env: Dict[str, str] = {}
        self.manifests = ManifestCache()
        self.running: Dict[int, asyncio.Task] = {}
        self.pids: Dict[int, int] = {}
        self.handles: Dict[int, str] = {}
        self.events: List[list] = []
        self.stopped = asyncio.Event()
        self.exit_status = 0

    # ---------------------------------------------------------- channel ---
    def emit(self, event: list) -> None:
        if not self.events:
            asyncio.get_running_loop().call_soon(self.flush)
        self.events.append(event)

    def flush(self) -> None:
        if self.events:
            events, self.events = self.events, []
            self.link.send({"t": "events", "ev": events})

    def on_message(self, msg: dict) -> None:
        kind = msg.get("t")
        if kind == "welcome":
            self.base_env = msg.get("env") or {}
        elif kind == "launch":
            for spec in msg.get("tasks", ()):
                if self.client is None:                  # the benchmark's stand-in
                    self.emit(["x", spec["id"], 0, None])
                    continue
                self.running[spec["id"]] = asyncio.ensure_future(self.run(spec))
        elif kind == "kill":
            for tid in msg.get("ids", ()):
                self.kill(tid)
        elif kind == "stop":
            self.stopped.set()

    # ------------------------------------------------------------ tasks ---
    async def run(self, spec: Dict[str, Any]) -> None:
        tid = spec["id"]
        code: Optional[int] = None
        message = None

        def started(result):
            self.pids[tid] = result.pid
            self.handles[tid] = result.container
            self.emit(["s", tid, result.pid])

        try:
            manifest = self.manifests.get(spec.get("manifest"), spec["ncpus"],
                                          spec.get("power"))
            env = dict(self.base_env)
            env.update(spec.get("env") or {})
            result = await self.client.run(
                manifest, spec["argv"], env=env, cwd=spec.get("cwd"), output=False,
                on_started=started, wait=True, oversubscribe=spec.get("oversubscribe", False),
                cpus_allowed=spec.get("cpus"))
            code = result.status
        except asyncio.CancelledError:
            return
        except NrmError as exc:
            message = str(exc)
        except Exception as exc:             # report it: never leave the manager waiting
            message = f"{type(exc).__name__}: {exc}"
        finally:
            self.running.pop(tid, None)
            self.pids.pop(tid, None)
            self.handles.pop(tid, None)
        self.emit(["x", tid, code, message])

    def kill(self, tid: int) -> None:
        container = self.handles.get(tid)
        if container and self.client is not None:
            fut = asyncio.ensure_future(self.client.call(protocol.Kill(container=container)))
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())

    # ----------------------------------------------------------- health ---
    async def heartbeat(self) -> None:
        while not self.stopped.is_set():
            self.link.send({"t": "hb"})
            await asyncio.sleep(HEARTBEAT)

    async def watch_nrmd(self) -> None:
        if self.client is None:
            return
        while not self.stopped.is_set():
            await asyncio.sleep(self.health_period)
            try:
                await self.client.status()
            except NrmError as exc:
                self.nrmd_lost(str(exc))
                return

    def nrmd_lost(self, why: str) -> None:
        message = f"nrmd on node {self.node} stopped answering ({why})"
        for tid, fut in list(self.running.items()):
            fut.cancel()
            pid = self.pids.get(tid)
            if pid:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except OSError:
                    pass
            self.emit(["x", tid, None, message])
        self.running.clear()
        self.flush()
        self.link.send({"t": "lost", "message": message})
        self.exit_status = EXIT_LOST
        self.stopped.set()

    async def main(self) -> int:
        self.link.start()
        self.link.send({"t": "hello", "node": self.node, "pid": os.getpid(),
                        "cpus": sorted(os.sched_getaffinity(0))})
        beats = asyncio.ensure_future(self.heartbeat())
        watch = asyncio.ensure_future(self.watch_nrmd())
        await self.stopped.wait()
        for fut in (beats, watch, *self.running.values()):
            fut.cancel()
        self.flush()
        await asyncio.sleep(0.05)                    # let the last events leave
        self.link.close()
        if self.client is not None:
            await self.client.close()
        return self.exit_status


def node_name() -> str:
    """The Slurm node this agent is on (SLURMD_NODENAME: several fake nodes
    may share a host), else the short host name."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname().split(".")[0]


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="nrm.pilot.agent")
    p.add_argument("--manager", required=True, help="the manager's tcp:// address")
    p.add_argument("--keys", required=True, help="the pilot's key directory")
    p.add_argument("--node", default=None, help="this node's name (default: Slurm's)")
    p.add_argument("--runtime-dir", default=None, help="this node's nrmd (default: as nrm)")
    p.add_argument("--health-period", type=float, default=1.0)
    p.add_argument("--stand-in", action="store_true",
                   help="no nrmd: end every task at once (benchmarks only)")
    args = p.parse_args(argv)
    node = args.node or node_name()

    async def run() -> int:
        client = None if args.stand_in else AsyncClient(args.runtime_dir, timeout=5.0)
        link = (args.manager, node, os.path.join(args.keys, "manager.key.pub"),
                os.path.join(args.keys, "agent.key"))
        agent = Agent(node, link, client, args.health_period)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, agent.stopped.set)
        return await agent.main()

    try:
        return asyncio.run(run())
    except (NrmError, CurveError, OSError, ValueError) as exc:
        print(f"nrm pilot agent on {node}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
