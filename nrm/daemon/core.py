"""The daemon: wiring between sockets and managers, and nothing else.

Data flows one way: sockets -> protocol decode -> a manager's method ->
hardware controls or events out. Managers do not reach into each other;
this class connects them with explicit calls.
"""

from __future__ import annotations

import asyncio
import fcntl
import grp
import hashlib
import logging
import os
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Deque, Dict, List, Optional

import zmq

from nrm import __version__, paths, protocol

from nrm.hpc import mpi
from nrm.containers.manager import Container, ContainerManager, Peer, RunError
from nrm.daemon.commands import COMMANDS
from nrm.daemon.reconcile import reconcile
from nrm.daemon.statelog import ContainerRecord, StateLog, TaskRecord, pid_start_time
from nrm.daemon.upstream import Requester, Upstream
from nrm.containers.slices import ResourceManager
from nrm.containers.runtimes import make_runtime

log = logging.getLogger(__name__)

#: launches are bound by the daemon's own ~0.5 ms per task, not by spawners:
#: more than a few only cost memory (a Python interpreter each)
MAX_DEFAULT_SPAWNERS = 4
HISTORY_SAMPLES = 20000
HISTORY_DECISIONS = 5000
PROFILE_SERIES_POINTS = 2000


#: as root, every user submits work and every user's tasks report: identity
#: comes from the ZAP handler, not from the file mode
_SOCKET_MODE = 0o666 if os.geteuid() == 0 else 0o600


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


class Daemon:
    def __init__(self, config: Config):
        self.config = config
        self.rundir = paths.runtime_dir(config.runtime_dir or None)
        self._downstream_uri: Optional[str] = None     # every task's environment has it
        self.started = time.time()
        self.ctx = zmq.Context()
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.stopping: Optional[asyncio.Event] = None
        self._lock_fd = -1
        self.platform = None
        self.sensors = None
        self.controller = None
        self.ingest = None
        self.apps = None
        self.app_events = None      # EventCoalescer: one event per app per 10 ms at most
        self.policies = None
        self.http = None
        self.statelog = None
        self.reconciled: Dict[str, int] = {}
        self.latest_sample: Optional[dict] = None
        self.power_cap: Optional[float] = None
        self.request_counts: Dict[str, int] = {}
        #: downstream messages refused after decoding (unknown container, foreign sender)
        self.downstream_rejects: Dict[str, int] = {"unknown_container": 0, "foreign_sender": 0}
        #: recent samples and decisions, for reports, /api and the dashboard
        self.power_history: Deque[dict] = deque(maxlen=HISTORY_SAMPLES)
        self.decision_history: Deque[dict] = deque(maxlen=HISTORY_DECISIONS)

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
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            raise StartupError(f"cannot open {lock_path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StartupError(f"another nrmd (pid {other}) is running on {self.rundir}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd
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
        try:
            self.containers = ContainerManager(self.runtime, self.resources, self.publish,
                                               self._task_env, self.loop, spawners=spawners,
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
        self._reconcile(previous)
        self._start_http()
        if self.platform is not None:
            self.platform.set_task_provider(self.containers.pids)
        if self.sensors is not None:
            self.sensors.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self.stopping.set)
        log.info("nrmd %s ready on %s (runtime %s, hardware %s)", __version__, self.rundir,
                 self.runtime.name, self.platform.backend_name if self.platform else "none")

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
        from nrm.power.cap import PowerCapController
        from nrm.power.sensors import SensorManager
        self.controller = PowerCapController(self.platform)
        self.sensors = SensorManager(self.platform, self.config.sensor_period,
                                     on_sample=self._sample_from_thread)

    def _reconcile(self, previous) -> None:
        """Controls are already restored; now the predecessor's tasks."""
        self.containers.listeners.append(_StateListener(self))
        self.reconciled = reconcile(self.config.on_restart, previous, self.runtime,
                                    self.containers)
        self.statelog.open()

    def _start_downstream(self) -> None:
        from nrm.daemon.applications import ApplicationManager
        from nrm.daemon.coalesce import EventCoalescer
        self.app_events = EventCoalescer(self.loop, self.publish)
        from nrm.daemon.ingest import Ingest
        self.apps = ApplicationManager()
        seed = self.config.seed_downstream
        self.ingest = Ingest(self.ctx, paths.downstream_uri(self.rundir), seed,
                             self._on_downstream, socket_mode=_SOCKET_MODE)
        self.loop.create_task(self.ingest.start())

    def _start_policies(self) -> None:
        from nrm.power.policies import PowerPolicyManager
        self.policies = PowerPolicyManager(self.platform, self.publish)
        self.containers.listeners.append(self.policies)
        self.containers.listeners.append(_ProfileListener(self))
        self.containers.listeners.append(_AppsListener(self))

    def _start_http(self) -> None:
        if not self.config.http:
            return
        from nrm.http.server import start_http
        try:
            self.http = start_http(self, self.config.http)
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
        if topic == "decision":
            self.decision_history.append(body)
        if self.http is not None:
            self.http.on_event(topic, body)

    def _task_env(self, container: Container, task, env: Dict[str, str]) -> Dict[str, str]:
        out = dict(env)
        down = self._downstream_uri
        if down is None:
            down = self._downstream_uri = paths.downstream_uri(self.rundir)
        out.update({
            "NRM_RUNTIME_DIR": self.rundir,
            "NRM_CONTAINER_ID": container.id,
            "NRM_TASK_ID": task.id,
            "NRM_DOWNSTREAM_URI": down,
            "ARGO_CONTAINER_UUID": container.id,
            "AC_APP_NAME": container.manifest.name,
            "NRM_RATELIMIT": f"{container.manifest.monitoring.ratelimit:.9f}s",
        })
        if self.config.seed_downstream:
            out["ARGO_NRM_DOWNSTREAM_IN_URI"] = self.config.seed_downstream
        power = container.manifest.power
        if power.policy != "NONE":
            lib = self.config.pmpi_lib
            if not lib:
                # the interposer must match the MPI the launcher belongs to
                flavor = mpi.launched_by(task.argv, out.get("PATH")) or mpi.MPICH
                lib = paths.find_pmpi_lib(None, flavor.pmpi)
            if lib:
                pre = out.get("LD_PRELOAD")
                out["LD_PRELOAD"] = f"{lib} {pre}" if pre else lib
            out["NRM_TRANSMIT"] = "1"
            out["NRM_DAMPER"] = f"{power.damper:.9f}"
        return out

    # -- downstream -------------------------------------------------------
    def _on_downstream(self, msg, peer: Optional[str]) -> None:
        container = self.containers.containers.get(msg.container)
        if container is None:
            self.ingest_counter("unknown_container")
            return
        if peer is None or not self._sender_owns(peer, container):
            # no kernel-verified identity is treated like a foreign one
            self.ingest_counter("foreign_sender")
            return
        for topic, event in self.apps.handle(msg):
            self.app_events.offer(topic, event)
        if isinstance(msg, protocol.DPhaseContext) and self.policies is not None:
            self.policies.on_phase_context(
                container, msg, self.ingest.arrival if self.ingest is not None else None)

    def ingest_counter(self, name: str) -> None:
        self.downstream_rejects[name] = self.downstream_rejects.get(name, 0) + 1

    def _sender_owns(self, peer: str, container: Container) -> bool:
        """A downstream sender may only speak for its own container.

        Cached per peer string ("uid:gid:pid", fixed per connection): this
        runs for every downstream message, and parsing it each time cost
        ~8 % of the ingest path at high rates (py-spy, issue #5).
        """
        cache = container.extra.setdefault("senders", {})
        known = cache.get(peer)
        now = time.monotonic()
        if known is True or (known is not None and now < known):
            return known is True
        try:
            uid, _gid, pid = (int(x) for x in peer.split(":"))
        except ValueError:
            return False
        if uid != 0 and uid != container.uid:
            ok = False
        else:
            ok = pid in self.runtime.pids(container.handle) or _descends_from(
                pid, [t.pid for t in container.tasks.values()])
        if len(cache) < 4096:
            # a yes is final; a no holds for a second only: a task's first
            # message can beat the spawner's answer that makes its pid known
            cache[peer] = True if ok else now + 1.0
        return ok

    # -- sensors ----------------------------------------------------------
    def _sample_from_thread(self, sample) -> None:
        self.loop.call_soon_threadsafe(self._on_sample, sample)

    def _on_sample(self, sample) -> None:
        body = sample.to_dict()
        body["wall_time"] = time.time()
        self.latest_sample = body
        self.power_history.append(body)
        if self.controller is not None:
            try:
                self.controller.on_sample(sample)
            except Exception:
                log.exception("power controller failed")
        self.publish("power", dict(body))

    def power_state(self) -> dict:
        return {"sample": self.latest_sample, "cap_w": self.power_cap,
                "backend": self.platform.backend_name if self.platform else None,
                "emulated": bool(self.platform and self.platform.emulated)}

    def may_set_power(self, peer: Peer) -> bool:
        if peer.is_root:
            return True
        group = self.config.power_group
        if not group:
            return False
        try:
            gr = grp.getgrnam(group)
        except KeyError:
            return False
        return peer.gid == gr.gr_gid or gr.gr_gid in _groups_of(peer.uid)

    def set_power_cap(self, watts: Optional[float]) -> dict:
        if self.controller is None:
            raise RunError("unavailable", "no hardware backend")
        try:
            self.controller.set_cap(watts)
        except Exception as exc:
            raise RunError("hardware", str(exc)) from None
        self.power_cap = watts
        self.publish("power", {"event": "cap", "cap_w": watts})
        return {"cap_w": watts}

    # -- queries ----------------------------------------------------------
    def status(self) -> dict:
        return {
            "version": __version__, "protocol": protocol.PROTOCOL_VERSION, "pid": os.getpid(),
            "uptime_s": time.time() - self.started, "runtime_dir": self.rundir,
            "runtime": self.runtime.describe(),
            "hardware": self.platform.describe() if self.platform else None,
            "resources": self.resources.describe(),
            "requests": dict(self.upstream.counters, by_type=dict(self.request_counts)),
            "endpoints": list(self.upstream.endpoints),
            "tasks": {k: v for k, v in self.containers.counters.items()},
            "containers": len(self.containers.containers),
            "waiting": self.containers.waiting_count,
            "downstream": dict(self.ingest.counters, rejected=dict(self.downstream_rejects),
                               events=dict(self.app_events.counters))
            if self.ingest else None,
            "downstream_failures": dict(self.ingest.failures) if self.ingest else {},
            "policy": self.policies.status() if self.policies else None,
            "sensors": self.sensors.stats() if self.sensors else None,
            "power_cap_w": self.power_cap,
            "restart": {"on_restart": self.config.on_restart, **self.reconciled,
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
        if self.statelog is not None:
            self.statelog.close(clean=True)
        if getattr(self, "upstream", None) is not None:
            self.upstream._flush()
        if self.sensors is not None:
            self.sensors.stop()
        if self.ingest is not None:
            await self.ingest.stop()
        if self.http is not None:
            self.http.stop()
        if self.controller is not None:
            try:
                self.controller.clear()
            except Exception:
                log.exception("clearing power cap")
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


class _StateListener:
    """Keeps the state log in step with the container manager's containers and tasks."""

    def __init__(self, daemon: Daemon):
        self.daemon = daemon

    def container_started(self, container: Container) -> None:
        statelog = self.daemon.statelog
        statelog.container_started(ContainerRecord(
            id=container.id, uid=container.uid,
            manifest=statelog.manifest_dict(container.manifest),
            cpus=list(container.slice.cpus), mems=list(container.slice.mems),
            shared=container.slice.shared,
            cgroups=self.daemon.runtime.cgroup_dirs(container.handle)), container.manifest)

    def container_ended(self, container: Container) -> Optional[dict]:
        self.daemon.statelog.container_ended(container.id)
        return None

    def task_started(self, task) -> None:
        self.daemon.statelog.task_started(TaskRecord(
            id=task.id, container=task.container.id, pid=task.pid,
            start=task.start_ticks if task.start_ticks is not None else pid_start_time(task.pid),
            argv=task.argv, detach=task.detach))

    def task_ended(self, task) -> None:
        self.daemon.statelog.task_ended(task.container.id, task.id)


class _ProfileListener:
    """Energy profile over a container's life (manifest power.profile)."""

    def __init__(self, daemon: Daemon):
        self.daemon = daemon

    def container_started(self, container: Container) -> None:
        if container.manifest.power.profile and self.daemon.sensors is not None:
            try:
                self.daemon.sensors.begin_profile(container.id)
            except Exception:
                log.exception("profile start for %s", container.id)

    def container_ended(self, container: Container) -> Optional[dict]:
        out: Dict[str, object] = {"uid": container.uid}
        if container.manifest.power.profile and self.daemon.sensors is not None:
            try:
                out["energy"] = self.daemon.sensors.end_profile(container.id)
            except Exception as exc:
                log.exception("profile end for %s", container.id)
                out["energy_error"] = str(exc)
        cpu_time = getattr(self.daemon.runtime, "cpu_time", None)
        if cpu_time is not None:
            out["cpu_time_s"] = cpu_time(container.handle)
        t0 = container.created
        series = [[s["wall_time"], s.get("node_power_w")]
                  for s in _since(self.daemon.power_history, "wall_time", t0)]
        step = max(1, len(series) // PROFILE_SERIES_POINTS)
        out["power_series"] = series[::step]
        out["decisions"] = [d for d in _since(self.daemon.decision_history, "time", t0)
                            if d.get("container") == container.id][-PROFILE_SERIES_POINTS:]
        return out


def _since(history, key: str, t0: float) -> List[dict]:
    """Entries of a time-ordered history from ``t0`` on, reading from the end
    only as far back as needed: a short task costs nothing, whatever the
    history's length."""
    out = []
    for entry in reversed(history):
        if entry.get(key, 0) < t0:
            break
        out.append(entry)
    out.reverse()
    return out


class _AppsListener:
    def __init__(self, daemon: Daemon):
        self.daemon = daemon

    def container_started(self, container: Container) -> None:
        pass

    def container_ended(self, container: Container) -> Optional[dict]:
        if self.daemon.app_events is not None:
            self.daemon.app_events.flush()      # its last progress before its exit
        if self.daemon.apps is not None:
            self.daemon.apps.forget_container(container.id)
        return None


def _rundir_key(rundir: str) -> str:
    """Daemons on one host (fake Slurm nodes, tests) keep apart in cgroups."""
    return hashlib.sha1(rundir.encode()).hexdigest()[:8]


def _topology(root: str):
    from nrm.hw.topology import read_topology
    return read_topology(root)


def _groups_of(uid: int) -> List[int]:
    import pwd
    try:
        pw = pwd.getpwuid(uid)
    except KeyError:
        return []
    return os.getgrouplist(pw.pw_name, pw.pw_gid)


def _descends_from(pid: int, ancestors: List[int]) -> bool:
    seen = 0
    while pid > 1 and seen < 64:
        if pid in ancestors:
            return True
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
        seen += 1
    return False
