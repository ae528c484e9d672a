"""Application manager: what instrumented programs report about themselves.

Fed with decoded downstream structs (:mod:`nrm.daemon.ingest`), it keeps per
container and per application (task id, app name) the progress total and
rate, the latest phase context per cpu (the input of the power policies),
and performance counters; it returns the events the daemon publishes.

Several processes may report under one (task, app): the ranks of an MPI job
launched as one task share both.  They are counted as instances (starts and
exits); the application is running while some instance has not exited.

Everything is bounded (containers, apps per container, cpus, counters per
app, rate buckets), because the senders are user programs: an overflow
evicts finished entries first and otherwise drops the message and counts it.
"""

from __future__ import annotations

import collections
import time
from typing import Callable, Deque, Dict, List, Optional, Tuple

from nrm.protocol import DExit, DPerformance, DPhaseContext, DProgress, DStart

Event = Tuple[str, dict]

MAX_CPUS = 4096
MAX_EVENTS_PER_APP = 32
MAX_PIDS_PER_APP = 1024


class _App:
    __slots__ = ("task", "app", "starts", "exits", "pids", "peers", "progress", "buckets",
                 "first_progress", "last_seen", "phases", "last_phase", "performance")

    def __init__(self, task: str, app: str, now: float):
        self.task = task
        self.app = app
        self.starts = 0
        self.exits = 0
        self.pids: List[int] = []
        self.peers: List[str] = []
        self.progress = 0
        self.buckets: Deque[List[float]] = collections.deque()
        self.first_progress: Optional[float] = None
        self.last_seen = now
        self.phases = 0
        self.last_phase: Optional[dict] = None
        self.performance: Dict[str, dict] = {}

    @property
    def finished(self) -> bool:
        return self.starts > 0 and self.exits >= self.starts


class _Container:
    __slots__ = ("apps", "cpus", "last_seen")

    def __init__(self, now: float):
        self.apps: Dict[Tuple[str, str], _App] = {}
        self.cpus: Dict[int, dict] = {}
        self.last_seen = now

    @property
    def finished(self) -> bool:
        return all(a.finished for a in self.apps.values())


class ApplicationManager:
    """Track applications per container; ``handle`` returns events to publish.

    ``window`` (s) is the sliding window of the progress rate, measured in
    ``bucket``-second buckets so that memory does not grow with the message
    rate.  ``clock`` is injectable for tests.
    """

    def __init__(self, *, window: float = 10.0, bucket: float = 0.5,
                 max_containers: int = 1024, max_apps_per_container: int = 64,
                 clock: Callable[[], float] = time.monotonic):
        if window <= 0 or bucket <= 0 or bucket > window:
            raise ValueError("need 0 < bucket <= window")
        self.window = float(window)
        self.bucket = float(bucket)
        self.max_containers = max_containers
        self.max_apps_per_container = max_apps_per_container
        self._clock = clock
        self._containers: Dict[str, _Container] = {}
        self.counters: Dict[str, int] = {
            "handled": 0, "dropped_containers": 0, "dropped_apps": 0, "dropped_invalid": 0}

    # ------------------------------------------------------------- intake

    def handle(self, msg, peer: Optional[str] = None) -> List[Event]:
        """Account one downstream message; return ``[(topic, body), ...]``."""
        now = self._clock()
        if isinstance(msg, DPhaseContext) and (
                msg.aggregation < 1 or msg.computetime < 0 or msg.totaltime < msg.computetime
                or not 0 <= msg.cpu < MAX_CPUS):
            self.counters["dropped_invalid"] += 1
            return []
        if isinstance(msg, DProgress) and msg.payload < 0:
            self.counters["dropped_invalid"] += 1
            return []
        app = self._app(msg.container, msg.task, msg.app, now)
        if app is None:
            return []
        self.counters["handled"] += 1
        app.last_seen = now
        if isinstance(msg, DProgress):
            return [("progress", self._progress(msg, app, now))]
        if isinstance(msg, DPhaseContext):
            return [("phase_context", self._phase(msg, app))]
        if isinstance(msg, DPerformance):
            return self._performance(msg, app)
        if isinstance(msg, DStart):
            app.starts += 1
            if len(app.pids) < MAX_PIDS_PER_APP and msg.pid:
                app.pids.append(msg.pid)
            if peer and len(app.peers) < MAX_PIDS_PER_APP:
                app.peers.append(peer)
        elif isinstance(msg, DExit):
            app.exits += 1
        return []

    def _app(self, cid: str, task: str, name: str, now: float) -> Optional[_App]:
        container = self._containers.get(cid)
        if container is None:
            if len(self._containers) >= self.max_containers and not self._evict(
                    self._containers):
                self.counters["dropped_containers"] += 1
                return None
            container = self._containers[cid] = _Container(now)
        container.last_seen = now
        key = (task, name)
        app = container.apps.get(key)
        if app is None:
            if len(container.apps) >= self.max_apps_per_container and not self._evict(
                    container.apps):
                self.counters["dropped_apps"] += 1
                return None
            app = container.apps[key] = _App(task, name, now)
        return app

    @staticmethod
    def _evict(table: dict) -> bool:
        """Remove the least recently seen finished entry, if there is one."""
        done = [(v.last_seen, k) for k, v in table.items() if v.finished]
        if not done:
            return False
        del table[min(done, key=lambda item: item[0])[1]]
        return True

    def _progress(self, msg: DProgress, app: _App, now: float) -> dict:
        app.progress += msg.payload
        if app.first_progress is None:
            app.first_progress = now
        index = int(now // self.bucket)
        if app.buckets and app.buckets[-1][0] == index:
            app.buckets[-1][1] += msg.payload
        else:
            app.buckets.append([index, msg.payload])
        return {"container": msg.container, "task": msg.task, "app": msg.app,
                "payload": msg.payload, "total": app.progress,
                "rate": self._rate(app, now)}

    def _rate(self, app: _App, now: float) -> float:
        """Progress per second over the last ``window`` seconds."""
        if app.first_progress is None:
            return 0.0
        oldest = int((now - self.window) // self.bucket) + 1
        while app.buckets and app.buckets[0][0] < oldest:
            app.buckets.popleft()
        span = min(self.window, now - app.first_progress)
        span = max(span, self.bucket)
        return sum(b[1] for b in app.buckets) / span

    def _phase(self, msg: DPhaseContext, app: _App) -> dict:
        body = {"container": msg.container, "task": msg.task, "app": msg.app,
                "rank": msg.rank, "cpu": msg.cpu, "phase": msg.phase,
                "aggregation": msg.aggregation, "computetime": msg.computetime,
                "totaltime": msg.totaltime, "site": msg.site}
        app.phases += msg.aggregation
        app.last_phase = body
        self._containers[msg.container].cpus[msg.cpu] = body
        return body

    def _performance(self, msg: DPerformance, app: _App) -> List[Event]:
        if msg.event not in app.performance and len(app.performance) >= MAX_EVENTS_PER_APP:
            self.counters["dropped_invalid"] += 1
            return []
        rate = msg.payload / msg.interval if msg.interval > 0 else None
        body = {"container": msg.container, "task": msg.task, "app": msg.app,
                "event": msg.event, "payload": msg.payload, "interval": msg.interval,
                "rate": rate}
        app.performance[msg.event] = body
        return [("performance", body)]

    # -------------------------------------------------------------- queries

    def forget_container(self, cid: str) -> None:
        """Drop everything about a container (it exited or was killed)."""
        self._containers.pop(cid, None)

    def containers(self) -> List[str]:
        return list(self._containers)

    def phase_contexts(self, cid: str) -> Dict[int, dict]:
        """Latest phase context per cpu of one container (a copy)."""
        container = self._containers.get(cid)
        return dict(container.cpus) if container else {}

    def progress_rate(self, cid: str, task: str, app: str) -> float:
        container = self._containers.get(cid)
        entry = container.apps.get((task, app)) if container else None
        return self._rate(entry, self._clock()) if entry else 0.0

    def snapshot(self, cid: Optional[str] = None) -> dict:
        """Plain data for ``nrm status`` and the state API.

        With ``cid``: that container's ``{"apps": [...], "cpus": {...}}``
        (empty lists when unknown); without: ``{"containers": {cid: ...},
        "counters": {...}}``.
        """
        now = self._clock()
        if cid is not None:
            container = self._containers.get(cid)
            return self._container_snapshot(container, now) if container else {
                "apps": [], "cpus": {}}
        return {"containers": {c: self._container_snapshot(v, now)
                               for c, v in self._containers.items()},
                "counters": dict(self.counters)}

    def _container_snapshot(self, container: _Container, now: float) -> dict:
        apps = []
        for app in container.apps.values():
            apps.append({
                "task": app.task, "app": app.app, "starts": app.starts, "exits": app.exits,
                "running": app.starts > app.exits, "pids": list(app.pids),
                "peers": list(app.peers), "progress": app.progress,
                "rate": self._rate(app, now), "phases": app.phases,
                "last_phase": dict(app.last_phase) if app.last_phase else None,
                "performance": {k: dict(v) for k, v in app.performance.items()},
                "idle": now - app.last_seen,
            })
        return {"apps": apps, "cpus": {c: dict(v) for c, v in sorted(container.cpus.items())}}


class ApplicationsListener:
    """A container listener: a container's last progress goes out before its
    exit event, and its applications are forgotten when it ends."""

    def __init__(self, apps: ApplicationManager, events):
        self.apps = apps
        self.events = events        # the EventCoalescer the daemon publishes through

    def container_ended(self, container) -> Optional[dict]:
        self.events.flush()
        self.apps.forget_container(container.id)
        return None
