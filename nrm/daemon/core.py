"""The daemon: wiring between sockets and managers, and nothing else.

Data flows one way: sockets -> protocol decode -> a manager's method ->
hardware controls or events out. Managers do not reach into each other;
this class creates them, connects them with explicit calls, and hands each
the collaborators it needs (never itself). It also owns the runtime dir
(lock, sockets) and the order of start and stop: hardware first, so that a
crashed predecessor's controls are restored before anything runs; the
power cap lifted and every control restored last.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, List, Optional

import zmq

from nrm import __version__, jsonlines, paths, protocol
from nrm.containers.identity import in_group
from nrm.containers.manager import ContainerManager
from nrm.containers.model import Peer, RunError
from nrm.containers.runtimes import make_runtime
from nrm.containers.slices import ResourceManager
from nrm.daemon.commands import COMMANDS
from nrm.daemon.reconcile import reconcile
from nrm.daemon.senders import SenderCheck
from nrm.daemon.statelog import StateLog, StateLogListener
from nrm.daemon.taskenv import TaskEnvironment
from nrm.daemon.upstream import Requester, Upstream

log = logging.getLogger(__name__)

#: launches are bound by the daemon's own ~0.5 ms per task, not by spawners:
#: more than a few only cost memory (a Python interpreter each)
MAX_DEFAULT_SPAWNERS = 4


#: as root, every user submits work and every user's tasks report: identity
#: comes from the ZAP handler, not from the file mode
_SOCKET_MODE = 0o666 if os.geteuid() == 0 else 0o600


#: the admin's node power cap while one is set, for the nrmd after a crash
POWER_CAP_FILE = "power_cap.json"


class StartupError(Exception):
    """nrmd cannot start; the message is shown to the admin as is."""


@dataclass
class Config:
    runtime_dir: str = ""
    runtime: str = "auto"
    hw: str = "auto"
    hw_root: str = "/"
    sensor_period: float = 1.0
    pmpi_lib: Optional[str] = None
    seed_downstream: Optional[str] = paths.SEED_DOWNSTREAM_URI
    http: Optional[str] = None
    power_group: Optional[str] = None
    emulated: Dict[str, object] = field(default_factory=dict)
    #: spawner helper processes; None: one per usable cpu, at most MAX_DEFAULT_SPAWNERS;
    #: 0: spawn in-process
    spawners: Optional[int] = None
    #: TCP endpoints with CurveZMQ (nrm.transport.curve.ServerConfig); None: ipc only
    tcp: Optional[object] = None
    #: what to do with tasks a crashed predecessor left running
    on_restart: str = "kill"
    #: a pipe's write end: one byte is written to it, and it is closed, once
    #: nrmd serves (a starter waits for that instead of polling the socket)
    ready_fd: Optional[int] = None
    #: where nrmd's threads run (nrm/daemon/affinity.py): None follows the
    #: ranks' slack, the empty set leaves them alone, a set pins them there
    daemon_cpus: Optional[FrozenSet[int]] = None


class Daemon:
    """Owns the managers and the sockets of one nrmd; the commands
    (nrm/daemon/commands/) call its few public methods."""

    def __init__(self, config: Config):
        self.config = config
        self.rundir = paths.runtime_dir(config.runtime_dir or None)
        self.started = time.time()
        self.ctx = zmq.Context()
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.stopping: Optional[asyncio.Event] = None
        self._lock_fd = -1
        self._ready = False         # started: a stop from now on is a clean one
        self.platform = None
        self.power = None           # NodePower: samples, cap, history
        self.ingest = None
        self.apps = None
        self.app_events = None      # EventCoalescer: one event per app per 10 ms at most
        self.policies = None
        self.affinity = None        # DaemonAffinity: where nrmd's own threads run
        self.http = None
        self.statelog = None
        self.keys = None
        self.reconciled: Dict[str, int] = {}
        self.request_counts: Dict[str, int] = {}
        #: downstream messages refused after decoding (unknown container, foreign sender)
        self.downstream_rejects: Dict[str, int] = {"unknown_container": 0, "foreign_sender": 0}

    # -- start ------------------------------------------------------------
    def _prepare_rundir(self) -> None:
        mode = 0o755 if os.geteuid() == 0 else 0o700
        try:
            os.makedirs(self.rundir, mode=mode, exist_ok=True)
        except OSError as exc:
            raise StartupError(f"cannot use runtime dir {self.rundir}: {exc.strerror}") from None
        problem = paths.own_dir_problem(self.rundir)
        if problem:
            raise StartupError(f"refusing {problem}")
        try:
            os.chmod(self.rundir, mode)
        except OSError as exc:
            raise StartupError(f"cannot use runtime dir {self.rundir}: {exc.strerror}") from None
        for name in ("upstream", "events", "downstream"):
            if len("ipc://" + os.path.join(self.rundir, name)) > 100:
                raise StartupError(f"runtime dir path {self.rundir} is too long for a socket")
        lock_path = os.path.join(self.rundir, "nrmd.pid")
        try:
            self._lock_fd = jsonlines.hold(lock_path, str(os.getpid()))
        except jsonlines.Locked as exc:
            raise StartupError(f"another nrmd (pid {exc.holder or '?'}) is running on "
                               f"{self.rundir}") from None
        except OSError as exc:
            raise StartupError(f"cannot open {lock_path}: {exc.strerror}") from None
        for name in ("upstream", "events", "downstream"):
            try:
                os.unlink(os.path.join(self.rundir, name))
            except FileNotFoundError:
                pass

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.stopping = asyncio.Event()
        self._prepare_rundir()
        self._start_hardware()
        self.statelog = StateLog(os.path.join(self.rundir, "state.log"), self.loop.call_soon)
        previous = self.statelog.load()
        prefix = "nrm." + _rundir_key(self.rundir)
        try:
            spawners = self.config.spawners
            if spawners is None:
                spawners = min(len(os.sched_getaffinity(0)), MAX_DEFAULT_SPAWNERS)
            self.runtime = make_runtime(self.config.runtime, prefix, spawners=spawners)
        except Exception as exc:
            raise StartupError(str(exc)) from None
        topology = self.platform.topology if self.platform else _topology(self.config.hw_root)
        self.resources = ResourceManager(topology)
        from nrm.power.waitthrottle import WaitThrottleActuation
        runtime = self.runtime
        self.wait_throttle = WaitThrottleActuation(self.platform, self.rundir,
                                                   lambda c: runtime.pids(c.handle))
        try:
            task_env = TaskEnvironment(self.rundir, self.config.seed_downstream,
                                       self.config.pmpi_lib, self.wait_throttle.environment)
            self.containers = ContainerManager(self.runtime, self.resources, self.publish,
                                               task_env, self.loop, spawners=spawners,
                                               wants=self.wants)
        except (RuntimeError, ValueError) as exc:
            raise StartupError(str(exc)) from None
        try:
            self.upstream = Upstream(self.ctx, self.loop, paths.upstream_uri(self.rundir),
                                     paths.events_uri(self.rundir), self._dispatch,
                                     socket_mode=_SOCKET_MODE,
                                     tcp=self.config.tcp)
        except zmq.ZMQError as exc:
            raise StartupError(f"cannot open the upstream endpoints: {exc}") from None
        self._start_downstream()
        self._start_policies()
        self._start_affinity()
        self._reconcile(previous)
        self._start_keys()
        if self.power is not None:
            self.power.restore_cap(protocol.MAX_POWER_CAP_W)
        self._start_http()
        if self.platform is not None:
            self.platform.set_task_provider(self.containers.pids)
        if self.power is not None:
            self.power.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self.stopping.set)
        self._ready = True
        self._tell_ready()
        log.info("nrmd %s ready on %s (runtime %s, hardware %s)", __version__, self.rundir,
                 self.runtime.name, self.platform.backend_name if self.platform else "none")

    def _tell_ready(self) -> None:
        fd = self.config.ready_fd
        if fd is None:
            return
        self.config.ready_fd = None
        try:
            os.write(fd, b"R")
        except OSError as exc:      # the starter is gone: nothing to tell
            log.debug("--ready-fd %d: %s", fd, exc)
        finally:
            try:
                os.close(fd)
            except OSError:
                pass

    def _start_hardware(self) -> None:
        """Platform first: a crashed predecessor's controls are restored
        before anything else happens."""
        from nrm.hw import open_platform
        emulated = {"cgroup_name": "nrm.emu." + _rundir_key(self.rundir)}
        emulated.update(self.config.emulated)
        try:
            self.platform = open_platform(self.config.hw, root=self.config.hw_root,
                                          journal_path=paths.journal_path(self.rundir),
                                          emulated_options=emulated)
        except Exception as exc:
            raise StartupError(f"hardware: {exc}") from None
        log.info("hardware backend: %s%s", self.platform.backend_name,
                 " (emulated)" if self.platform.emulated else "")
        from nrm.power.node import NodePower
        self.power = NodePower(self.platform, self.config.sensor_period, self.publish, self.loop,
                               cap_path=os.path.join(self.rundir, POWER_CAP_FILE))

    def _reconcile(self, previous) -> None:
        """Controls are already restored; now the predecessor's tasks."""
        self.containers.listeners.append(StateLogListener(self.statelog,
                                                          self.runtime.cgroup_dirs))
        self.reconciled = reconcile(self.config.on_restart, previous, self.runtime,
                                    self.containers)
        self.statelog.open()

    def _start_keys(self) -> None:
        """Task keys (nrm/daemon/keys.py), after the reconciliation: which
        keyed tasks it adopted or killed decides their keys' state."""
        from nrm.daemon.keys import FILE, TaskKeys
        cm = self.containers
        self.keys = TaskKeys(os.path.join(self.rundir, FILE), self.loop.call_soon,
                             alive=lambda tid: tid in cm.tasks,
                             # the cgroup runtimes (the ones isolating memory) kill
                             # every process a crashed predecessor left unadopted
                             exact=self.config.on_restart == "kill"
                             and self.runtime.isolates_memory)
        if self.keys.load():
            settled = self.keys.settle()
            log.info("task keys: %d reloaded (%d running tasks adopted, %d lost)",
                     len(self.keys.keys), settled["adopted"], settled["lost"])
        self.keys.open()

    def _start_downstream(self) -> None:
        from nrm.daemon.applications import ApplicationManager
        from nrm.daemon.coalesce import EventCoalescer
        self.app_events = EventCoalescer(self.loop, self.publish)
        from nrm.daemon.ingest import Ingest
        self.apps = ApplicationManager()
        self.senders = SenderCheck(self.runtime.pids)
        seed = self.config.seed_downstream
        self.ingest = Ingest(self.ctx, paths.downstream_uri(self.rundir), seed,
                             self._on_downstream, socket_mode=_SOCKET_MODE)
        self.loop.create_task(self.ingest.start())

    def _start_policies(self) -> None:
        from nrm.daemon.applications import ApplicationsListener
        from nrm.power.policies import PowerPolicyManager
        from nrm.power.profiles import ProfileListener
        self.policies = PowerPolicyManager(self.platform, self.publish)
        # in-wait throttling first: at a container's end the ranks' registers
        # are put back before the policies restore cpufreq, whose driver
        # then writes its own value over them
        self.containers.listeners.append(self.wait_throttle)
        self.containers.listeners.append(self.policies)
        self.containers.listeners.append(
            ProfileListener(self.power, getattr(self.runtime, "cpu_time", None)))
        self.containers.listeners.append(ApplicationsListener(self.apps, self.app_events))

    def _start_affinity(self) -> None:
        """After the containers: their spawner pool takes nrmd's whole mask
        at start for its helpers and tasks, before nrmd moves anything."""
        from nrm.daemon.affinity import DaemonAffinity
        self.affinity = DaemonAffinity(self.loop, self.config.daemon_cpus)
        self.containers.listeners.append(self.affinity)

    def _start_http(self) -> None:
        if not self.config.http:
            return
        from nrm.http.server import start_http
        from nrm.http.sources import Sources
        sources = Sources(
            started=self.started, status=self.status, containers=self.containers,
            runtime=self.runtime, request_counts=self.request_counts, upstream=self.upstream,
            platform=self.platform, power=self.power, policies=self.policies, apps=self.apps,
            ingest=self.ingest, downstream_rejects=self.downstream_rejects)
        try:
            self.http = start_http(sources, self.config.http)
        except Exception as exc:
            raise StartupError(f"http: {exc}") from None

    # -- requests ---------------------------------------------------------
    def _dispatch(self, req: Requester, msg) -> None:
        name = msg.__struct_config__.tag
        self.request_counts[name] = self.request_counts.get(name, 0) + 1
        command = COMMANDS.get(name)
        try:
            command.execute(self, req, msg)
        except RunError as exc:
            req.reply(protocol.Error(code=exc.code, message=str(exc)))
        except Exception as exc:
            log.exception("request %s failed", name)
            req.reply(protocol.Error(code="internal", message=f"internal error: {exc}"))

    def wants(self, topic: str) -> bool:
        """Whether an event on ``topic`` would reach anyone (a subscriber,
        the dashboard, the decision history)."""
        upstream = getattr(self, "upstream", None)
        return (self.http is not None or topic == "decision"
                or (upstream is not None and upstream.wanted(topic)))

    def publish(self, topic: str, body: dict) -> None:
        self.upstream.publish(topic, body)
        if topic == "decision" and self.power is not None:
            self.power.history.decisions.append(body)
        if self.http is not None:
            self.http.on_event(topic, body)

    # -- downstream -------------------------------------------------------
    def _on_downstream(self, msg, peer: Optional[str]) -> None:
        container = self.containers.containers.get(msg.container)
        if container is None:
            self.ingest_counter("unknown_container")
            return
        if peer is None or not self.senders.owns(peer, container):
            # no kernel-verified identity is treated like a foreign one
            self.ingest_counter("foreign_sender")
            return
        for topic, event in self.apps.handle(msg):
            self.app_events.offer(topic, event)
        if isinstance(msg, protocol.DPhaseContext):
            if self.affinity is not None and msg.phase > msg.aggregation:
                # a sender's first report holds its start-up (MPI_Init to the first
                # collective): a wait that says nothing about its slack
                self.affinity.on_phase(msg.cpu, msg.computetime, msg.totaltime)
            if self.policies is not None:
                self.policies.on_phase_context(
                    container, msg, self.ingest.arrival if self.ingest is not None else None)

    def ingest_counter(self, name: str) -> None:
        self.downstream_rejects[name] = self.downstream_rejects.get(name, 0) + 1

    # -- power ------------------------------------------------------------
    def power_state(self) -> dict:
        if self.power is None:
            return {"sample": None, "cap_w": None, "backend": None, "emulated": False}
        return self.power.state()

    def may_set_power(self, peer: Peer) -> bool:
        if peer.is_root:
            return True
        group = self.config.power_group
        return bool(group) and in_group(peer.uid, peer.gid, group)

    def set_power_cap(self, watts: Optional[float]) -> dict:
        from nrm.power.node import PowerUnavailable
        if self.power is None:
            raise RunError("unavailable", "no hardware backend")
        try:
            return self.power.set_cap(watts)
        except PowerUnavailable as exc:
            raise RunError("hardware", str(exc)) from None

    # -- queries ----------------------------------------------------------
    def status(self) -> dict:
        return {
            "version": __version__, "protocol": protocol.PROTOCOL_VERSION, "pid": os.getpid(),
            "features": list(protocol.FEATURES), "keys": self.keys.describe(),
            "uptime_s": time.time() - self.started, "runtime_dir": self.rundir,
            "runtime": self.runtime.describe(),
            "hardware": self.platform.describe() if self.platform else None,
            "resources": self.resources.describe(),
            "requests": dict(self.upstream.counters, by_type=dict(self.request_counts)),
            "endpoints": list(self.upstream.endpoints),
            "subscriptions": self.upstream.subscriptions,
            "output": self.upstream.budget.status(),
            "tasks": {k: v for k, v in self.containers.counters.items()},
            "containers": len(self.containers.containers),
            "waiting": self.containers.waiting_count,
            "downstream": dict(self.ingest.counters, rejected=dict(self.downstream_rejects),
                               events=dict(self.app_events.counters))
            if self.ingest else None,
            "downstream_failures": dict(self.ingest.failures) if self.ingest else {},
            "policy": self.policies.status() if self.policies else None,
            "daemon_cpus": self.affinity.state() if self.affinity else None,
            "sensors": self.power.sensors.stats() if self.power else None,
            "power_cap_w": self.power.cap_w if self.power else None,
            "c_parts": paths.c_parts(),
            "restart": {"on_restart": self.config.on_restart, **self.reconciled,
                        "power_cap_restored_w": self.power.cap_restored_w if self.power else None,
                        "state_log": self.statelog.describe() if self.statelog else None},
            # controls written and not yet restored (empty when the node is unthrottled)
            "saved_controls": {name: {str(i): v for i, v in entries.items()}
                               for name, entries in self.platform.saved().items()}
            if self.platform else {},
        }

    def reports(self, peer: Peer, container: Optional[str]) -> List[dict]:
        out = []
        for p in self.containers.finished_profiles:
            if container and p.get("container") != container:
                continue
            if peer.is_root or p.get("uid") == peer.uid:
                out.append(p)
        return out

    # -- stop -------------------------------------------------------------
    async def run_until_stopped(self) -> None:
        await self.stopping.wait()

    async def stop(self) -> None:
        log.info("nrmd stopping")
        if getattr(self, "containers", None) is not None:
            self.containers.shutdown()
        if self.keys is not None:
            self.keys.close()
        if self.affinity is not None:
            self.affinity.close()
        if self.statelog is not None:
            self.statelog.close(clean=True)
        if getattr(self, "upstream", None) is not None:
            self.upstream._flush()
        if self.power is not None:
            self.power.stop(forget_cap=self._ready)
        if self.ingest is not None:
            await self.ingest.stop()
        if self.http is not None:
            self.http.stop()
        if self.platform is not None:
            self.platform.close()
        if getattr(self, "runtime", None) is not None:
            self.runtime.close()
        if getattr(self, "upstream", None) is not None:
            self.upstream.close()
        self.ctx.destroy(linger=200)
        if self._lock_fd < 0:
            return      # never owned this runtime dir: leave its files alone
        for name in ("upstream", "events", "downstream", "nrmd.pid"):
            try:
                os.unlink(os.path.join(self.rundir, name))
            except FileNotFoundError:
                pass
        os.close(self._lock_fd)
        log.info("nrmd stopped")


def _rundir_key(rundir: str) -> str:
    """Daemons on one host (fake Slurm nodes, tests) keep apart in cgroups."""
    return hashlib.sha1(rundir.encode()).hexdigest()[:8]


def _topology(root: str):
    from nrm.hw.topology import read_topology
    return read_topology(root)
