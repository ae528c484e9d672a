"""nrmd's optional web side: Prometheus metrics, a JSON state API and a
live dashboard fed by server-sent events.

It runs on the daemon's own asyncio loop (tornado 6 is asyncio
underneath), so handlers read the managers' state directly (through
nrm/http/sources.py, never the daemon itself), with no locks
and no copies kept in sync: everything here is single-threaded with the
managers it reads. Nothing here writes to the daemon; the web side is
read-only by construction (GET only, no control endpoints), which is what
makes it acceptable to leave it on loopback without authentication.

Events are not forwarded one by one. The daemon publishes a power event
per sensor tick (possibly every few milliseconds) and decisions in bursts;
a browser needs a handful of frames per second. ``on_event`` only marks the
state dirty, and a timer (``FLUSH_INTERVAL_S``) builds one snapshot and
hands the same bytes to every client. Each client has a small bounded
queue; a client that does not keep up loses the oldest snapshots (each is
complete, so nothing is lost but intermediate frames), and a client that
disconnects is removed when its connection closes or the next write fails.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import json
import logging
import os
import time
from collections import deque
from typing import Any, Deque, Dict, List, Optional, Set, Tuple

import tornado.httpserver
import tornado.ioloop
import tornado.netutil
import tornado.web
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from tornado.iostream import StreamClosedError

from nrm import __version__
from nrm.http.metrics import make_registry
from nrm.http.sources import Sources

log = logging.getLogger(__name__)

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")

FLUSH_INTERVAL_S = 0.25      # at most 4 frames per second per client
KEEPALIVE_S = 15.0           # comment line when nothing changed, to detect dead peers
CLIENT_QUEUE = 8             # snapshots buffered per client before the oldest is dropped
MAX_EVENT_CLIENTS = 256      # a browser tab each; beyond this the stream answers 503
HISTORY_SECONDS = 300.0      # power history sent to a newly connected dashboard
HISTORY_POINTS = 600
RECENT_DECISIONS = 50        # in /api/v1/state
LIVE_DECISIONS = 20          # in each event-stream frame
CPU_READ_INTERVAL_S = 1.0    # per-cpu controls are re-read at most this often (MSRs on linux)


def parse_address(spec: str) -> Tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``:PORT`` (loopback) -> (host, port).

    A bare port binds 127.0.0.1: the dashboard shows who runs what on the
    node, so exposing it beyond the machine must be the admin's explicit
    choice of address. Unbracketed IPv6 is refused because its last colon
    is ambiguous.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("--http needs HOST:PORT, e.g. 127.0.0.1:9100 or :9100")
    spec = spec.strip()
    if spec.startswith("["):
        close = spec.find("]")
        if close < 0 or spec[close + 1:close + 2] != ":":
            raise ValueError(f"--http {spec!r}: IPv6 addresses are written [ADDR]:PORT")
        host, port_text = spec[1:close], spec[close + 2:]
        try:
            if ipaddress.ip_address(host).version != 6:
                raise ValueError
        except ValueError:
            raise ValueError(f"--http {spec!r}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = spec.rpartition(":")
        if not sep:
            raise ValueError(f"--http {spec!r}: expected HOST:PORT (or :PORT for loopback)")
        if ":" in host:
            raise ValueError(f"--http {spec!r}: write IPv6 addresses in brackets, "
                             f"e.g. [::1]:9100")
        host = host or "127.0.0.1"
        if not all(ch.isalnum() or ch in ".-_" for ch in host):
            raise ValueError(f"--http {spec!r}: {host!r} is not an address or host name")
    if not port_text.isdigit():
        raise ValueError(f"--http {spec!r}: port {port_text!r} is not a number")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError(f"--http {spec!r}: port {port} is out of range (0-65535)")
    return host, port


def _dumps(obj: Any) -> str:
    # default=str: status() carries a few non-JSON values (paths, enums) that
    # `nrm status --json` also renders as strings.
    return json.dumps(obj, default=str, separators=(",", ":"))


def _last(items, n: int) -> list:
    """The last ``n`` items of a deque without copying all of it."""
    return list(itertools.islice(reversed(items), n))[::-1]


def public_container(container) -> dict:
    """A container as the web side shows it: without task command lines.

    The web side has no notion of who is asking (unlike the upstream
    socket, which knows the peer's uid and shows users only their own
    containers), so what users typed, which may hold secrets, stays out.
    """
    body = container.to_dict()
    body["tasks"] = [{k: v for k, v in t.items() if k != "argv"} for t in body.get("tasks", [])]
    return body


class _Client:
    """One event-stream connection: a bounded queue and a wake-up."""

    __slots__ = ("queue", "wake", "closed", "handler")

    def __init__(self, handler):
        self.queue: Deque[bytes] = deque()
        self.wake = None
        self.closed = False
        self.handler = handler

    def push(self, data: bytes) -> bool:
        """Queue ``data``; return False when the oldest frame had to go."""
        dropped = len(self.queue) >= CLIENT_QUEUE
        if dropped:
            self.queue.popleft()
        self.queue.append(data)
        if self.wake is not None:
            self.wake.set()
        return not dropped

    def close(self) -> None:
        self.closed = True
        if self.wake is not None:
            self.wake.set()


class Telemetry:
    """Builds the documents served over HTTP and fans frames out to clients."""

    def __init__(self, sources: Sources):
        self.sources = sources
        self.clients: Set[_Client] = set()
        self.counters = {"event_messages": 0, "event_dropped": 0, "event_refused": 0,
                         "event_connections": 0}
        self._dirty = True
        self._last_point = 0.0
        self._last_push = time.monotonic()
        self._cpu_cache: Optional[dict] = None
        self._cpu_read_at = 0.0
        self._timer: Optional[tornado.ioloop.PeriodicCallback] = None

    # ---------------------------------------------------------------- events

    def on_event(self, topic: str, body: dict) -> None:
        """Called by the daemon for every published event: only mark dirty."""
        self._dirty = True
        if topic == "decision":
            self._cpu_cache = None     # a control moved: re-read at the next frame

    def start(self) -> None:
        self._timer = tornado.ioloop.PeriodicCallback(self._flush, FLUSH_INTERVAL_S * 1000)
        self._timer.start()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.stop()
            self._timer = None
        for client in list(self.clients):
            client.close()
            try:
                client.handler.request.connection.close()
            except Exception:
                pass
        self.clients.clear()

    def add_client(self, handler) -> Optional[_Client]:
        if len(self.clients) >= MAX_EVENT_CLIENTS:
            self.counters["event_refused"] += 1
            return None
        client = _Client(handler)
        self.clients.add(client)
        self.counters["event_connections"] += 1
        return client

    def remove_client(self, client: _Client) -> None:
        client.close()
        self.clients.discard(client)

    def stats(self) -> Dict[str, int]:
        return dict(self.counters, event_clients=len(self.clients))

    def _flush(self) -> None:
        now = time.monotonic()
        if not self.clients:
            # Nobody watching: still move the cursor so that the first frame
            # after a connection does not carry a backlog.
            self._dirty = False
            self._last_point = self._newest_point_time()
            return
        if self._dirty:
            self._dirty = False
            data = ("event: state\ndata: " + _dumps(self.live(history=False)) + "\n\n").encode()
        elif now - self._last_push >= KEEPALIVE_S:
            data = b": keepalive\n\n"
        else:
            return
        self._last_push = now
        for client in list(self.clients):
            self.counters["event_messages"] += 1
            if not client.push(data):
                self.counters["event_dropped"] += 1

    def first_frame(self) -> bytes:
        """What a new client gets at once: the state with recent history."""
        return ("retry: 2000\nevent: state\ndata: " + _dumps(self.live(history=True))
                + "\n\n").encode()

    # ------------------------------------------------------------- documents

    def _newest_point_time(self) -> float:
        history = self.sources.power_history
        return history[-1]["wall_time"] if history else self._last_point

    def _points(self, history: bool) -> List[list]:
        """[wall_time, node W] pairs: recent history, or new since the last frame."""
        samples = self.sources.power_history
        out: List[list] = []
        if history:
            newest = samples[-1]["wall_time"] if samples else 0.0
            since = newest - HISTORY_SECONDS
        else:
            since = self._last_point
        for s in reversed(samples):
            t = s.get("wall_time", 0.0)
            if t <= since:
                break
            out.append([t, s.get("node_power_w")])
        out.reverse()
        if not history:
            if out:
                self._last_point = out[-1][0]
            return out
        step = max(1, -(-len(out) // HISTORY_POINTS))
        return out[::-1][::step][::-1]     # keep the newest point, thin the rest

    def _cpu_strip(self) -> Optional[dict]:
        platform = self.sources.platform
        if platform is None:
            return None
        now = time.monotonic()
        if self._cpu_cache is not None and now - self._cpu_read_at < CPU_READ_INTERVAL_S:
            return self._cpu_cache
        signals = {s.name: s for s in platform.signals()}
        cpus = [c.id for c in platform.topology.cpus]
        out: Dict[str, Any] = {"ids": cpus, "levels": platform.duty_cycle_levels}
        for signal, key in (("cpu.duty_cycle", "duty"), ("cpu.frequency", "freq_hz")):
            if signal not in signals:
                out[key] = None
                continue
            values: List[Optional[float]] = []
            for cpu in cpus:
                try:
                    values.append(platform.read(signal, cpu))
                except Exception:
                    values.append(None)
            out[key] = values
        owner: Dict[int, str] = {}
        manager = self.sources.containers
        if manager is not None:
            for c in manager.containers.values():
                for cpu in c.slice.cpus:
                    owner.setdefault(cpu, c.id)
        out["owner"] = [owner.get(cpu) for cpu in cpus]
        self._cpu_cache, self._cpu_read_at = out, now
        return out

    def _containers(self) -> List[dict]:
        d = self.sources
        manager = d.containers
        if manager is None:
            return []
        apps = d.apps.snapshot() if d.apps is not None else {"containers": {}}
        policies = d.policies.snapshot() if d.policies is not None else {}
        out = []
        for c in list(manager.containers.values()):
            body = public_container(c)
            body["running_tasks"] = sum(1 for t in c.tasks.values() if not t.finished)
            body["apps"] = [{k: a.get(k) for k in ("task", "app", "progress", "rate",
                                                   "running", "phases")}
                            for a in apps["containers"].get(c.id, {}).get("apps", [])]
            body["policy"] = policies.get(c.id)
            out.append(body)
        return out

    def live(self, history: bool) -> dict:
        """One dashboard frame: small, complete, cheap to build at 4 Hz."""
        d = self.sources
        sample = d.latest_sample or {}
        manager = d.containers
        platform = d.platform
        return {
            "time": time.time(),
            "version": __version__,
            "uptime_s": time.time() - d.started,
            "backend": platform.backend_name if platform is not None else None,
            "emulated": bool(platform is not None and platform.emulated),
            "node_power_w": sample.get("node_power_w"),
            "sample_time": sample.get("wall_time"),
            "packages": sample.get("packages") or {},
            "cap_w": d.power_cap,
            "points": self._points(history),
            "history": history,
            "containers": self._containers(),
            "waiting": manager.waiting_count if manager is not None else 0,
            "tasks": dict(manager.counters) if manager is not None else {},
            "cpus": self._cpu_strip(),
            "decisions": _last(d.decision_history, LIVE_DECISIONS),
            "decisions_total": d.policies.counters.get("decisions", 0)
            if d.policies is not None else 0,
            "clients": len(self.clients),
        }

    def state(self) -> dict:
        """``/api/v1/state``: everything ``nrm status --json`` shows, plus more.

        The status keys are kept at the top level unchanged so that tools
        written against ``nrm status --json`` read this document as is.
        """
        d = self.sources
        out = dict(d.status())
        out["container_list"] = [public_container(c)
                                 for c in list(d.containers.containers.values())]
        out["latest_sample"] = d.latest_sample
        out["decisions"] = _last(d.decision_history, RECENT_DECISIONS)
        out["policies"] = ({"active": d.policies.snapshot(), "counters": dict(d.policies.counters),
                            "latency": d.policies.latency()}
                           if d.policies is not None else None)
        out["applications"] = d.apps.snapshot() if d.apps is not None else None
        out["http"] = self.stats()
        return out


# ------------------------------------------------------------------ handlers

class _Base(tornado.web.RequestHandler):
    def initialize(self, telemetry: Telemetry) -> None:
        self.telemetry = telemetry

    def set_default_headers(self) -> None:
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Cache-Control", "no-store")

    def log_exception(self, typ, value, tb) -> None:
        if isinstance(value, tornado.web.HTTPError):
            return super().log_exception(typ, value, tb)
        log.error("http %s %s failed", self.request.method, self.request.uri,
                  exc_info=(typ, value, tb))


class MetricsHandler(_Base):
    def initialize(self, telemetry: Telemetry) -> None:
        super().initialize(telemetry)
        self.registry = self.application.settings["nrm_registry"]

    def get(self) -> None:
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.write(generate_latest(self.registry))


class StateHandler(_Base):
    def get(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.write(_dumps(self.telemetry.state()))


class LiveHandler(_Base):
    """One dashboard frame with history, for pages and scripts that poll."""

    def get(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.write(_dumps(self.telemetry.live(history=True)))


class EventsHandler(_Base):
    client: Optional[_Client] = None

    async def get(self) -> None:
        client = self.telemetry.add_client(self)
        if client is None:
            raise tornado.web.HTTPError(503, reason="too many event-stream clients")
        client.wake = asyncio.Event()
        self.client = client
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("X-Accel-Buffering", "no")
        try:
            client.push(self.telemetry.first_frame())
            while not client.closed:
                await client.wake.wait()
                client.wake.clear()
                while client.queue and not client.closed:
                    self.write(client.queue.popleft())
                await self.flush()
        except StreamClosedError:
            pass
        finally:
            self.telemetry.remove_client(client)

    def on_connection_close(self) -> None:
        if self.client is not None:
            self.telemetry.remove_client(self.client)


class IndexHandler(_Base):
    def get(self) -> None:
        with open(os.path.join(STATIC_DIR, "index.html"), "rb") as f:
            self.set_header("Content-Type", "text/html; charset=UTF-8")
            self.write(f.read())


def _access_log(handler: tornado.web.RequestHandler) -> None:
    """Successful requests at debug level: a Prometheus server scraping every
    few seconds would otherwise fill the daemon's log."""
    status = handler.get_status()
    level = logging.DEBUG if status < 400 else logging.INFO if status < 500 else logging.WARNING
    log.log(level, "http %d %s %s (%s) %.1f ms", status, handler.request.method,
            handler.request.uri, handler.request.remote_ip,
            1000.0 * handler.request.request_time())


class HttpServer:
    """What ``start_http`` returns to the daemon: ``on_event`` and ``stop``."""

    def __init__(self, sources: Sources, host: str, port: int):
        self.telemetry = Telemetry(sources)
        registry = make_registry(sources, self.telemetry.stats)
        args = {"telemetry": self.telemetry}
        self.app = tornado.web.Application([
            (r"/", IndexHandler, args),
            (r"/metrics", MetricsHandler, args),
            (r"/api/v1/state", StateHandler, args),
            (r"/api/v1/live", LiveHandler, args),
            (r"/api/v1/events", EventsHandler, args),
            (r"/static/(.*)", tornado.web.StaticFileHandler, {"path": STATIC_DIR}),
        ], nrm_registry=registry, compress_response=False, log_function=_access_log)
        try:
            sockets = tornado.netutil.bind_sockets(port, address=host)
        except OSError as exc:
            raise ValueError(f"cannot listen on {host}:{port}: "
                             f"{exc.strerror or exc}") from None
        self.server = tornado.httpserver.HTTPServer(self.app, xheaders=False)
        self.server.add_sockets(sockets)
        self.addresses = [s.getsockname()[:2] for s in sockets]
        self.port = self.addresses[0][1] if self.addresses else port
        self.telemetry.start()
        for addr in self.addresses:
            shown = f"[{addr[0]}]" if ":" in addr[0] else addr[0]
            log.info("http: metrics, state and dashboard on http://%s:%d/", shown, addr[1])

    def on_event(self, topic: str, body: dict) -> None:
        self.telemetry.on_event(topic, body)

    def stop(self) -> None:
        self.server.stop()
        self.telemetry.stop()


def start_http(sources: Sources, spec: str) -> HttpServer:
    """Parse ``spec`` and serve on the running loop; ValueError says what is wrong."""
    host, port = parse_address(spec)
    return HttpServer(sources, host, port)
