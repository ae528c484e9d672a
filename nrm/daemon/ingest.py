"""Downstream endpoints: where instrumented programs report to the daemon.

Two endpoints feed one callback with protocol structs
(:data:`nrm.protocol.Downstream`):

* the protocol-v1 PULL socket (programs PUSH to ``$NRM_DOWNSTREAM_URI``);
* optionally the seed-era SUB socket (programs of the seed era PUB to
  ``$ARGO_NRM_DOWNSTREAM_IN_URI``), whose messages (quoted numbers, ``uuid``
  instead of task/app, two ``phase_context`` variants) are converted here,
  so nothing downstream of this module knows the old format exists.

A program can send much faster than one ``await`` per message can receive
(FACTS 9: ~70 k/s that way, ~700 k/s when draining), so each endpoint is
drained straight from the event loop's reader callback on its ZMQ_FD, with
non-blocking receives until EAGAIN, up to ``batch`` messages before it
yields to the loop. No future or task stands between the wake-up and the
drain: a rank's phase report costs the daemon one loop iteration, which
matters on a node whose cpus the ranks fill (docs/policies.md).

Both sockets have a receive high-water mark, so a flood costs bounded
memory: beyond it libzmq drops (SUB) or pushes back on the senders (PULL),
which libnrm turns into dropped sends rather than a stalled application.
The mark is per
connected sender, not per socket, and a queued message costs ~250 bytes,
so the mark bounds what one flooding sender costs (benchmarks/load.py
measures it).  A PULL that sits at its mark when a sender exits can lose
the rest of that sender's stream with libzmq 4.3 (zeromq/libzmq#4660):
nrm's senders wait until their data is read before they hang up
(nrm/transport/hangup.py, nrm_fini), which is what lets the mark be low.

Peer identity: the daemon's ZAP handler sets each ipc connection's
``User-Id`` to the kernel-verified ``uid:gid:pid``.  Reading it needs the
zero-copy receive path, measured at ~1.1 us per message against ~0.3 us
for a plain ``bytes`` receive (2 vCPU VM); the drain stays well above
200 k msg/s with it, and the daemon drops any message it cannot attribute,
so there is no path without it.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import os
import stat
import time
from typing import Callable, Dict, Optional

import msgspec
import zmq

from nrm import protocol
from nrm.log import RateLimitedLog
from nrm.protocol import (DExit, DPhaseContext, DProgress, DStart, MAX_DOWNSTREAM_BYTES,
                          ProtocolError)

log = logging.getLogger(__name__)
rl_log = RateLimitedLog(log, 10.0)

OnMessage = Callable[[object, Optional[str]], None]

COUNTER_NAMES = ("received", "decoded", "dropped_malformed", "dropped_unknown",
                 "dropped_oversize", "callback_errors")

# Seed-era uuids whose container is remembered (progress messages of that
# era name only the uuid) and whose phases are counted; bounded so that a
# program inventing uuids cannot grow the daemon.
_SEED_MEMORY = 4096
# Messages queued per sender.  A queued message keeps ~1 kB of libzmq's
# receive buffers alive, so this bounds what a flooding sender costs; low
# is safe because senders hang up only once their data is read.
RCVHWM = 1000


def _classify(exc: ProtocolError) -> str:
    """Map a decode failure to the counter that records it."""
    if exc.code == "too_large":
        return "dropped_oversize"
    if exc.code == "version":
        return "dropped_unknown"
    text = str(exc)
    if exc.code == "invalid" and "`$.type`" in text and "Invalid value" in text:
        return "dropped_unknown"
    return "dropped_malformed"


class _BoundedMap(collections.OrderedDict):
    """An insertion-ordered dict that forgets its oldest keys past a bound."""

    def __init__(self, bound: int):
        super().__init__()
        self.bound = bound

    def put(self, key, value):
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.bound:
            self.popitem(last=False)


def _seed_int(obj: dict, key: str) -> int:
    """Seed-era numbers arrive quoted ("12"); later senders did not quote."""
    value = _seed_int_any(obj, key)
    if not -(1 << 63) <= value < (1 << 63):
        raise ProtocolError("invalid", f"seed field {key!r} does not fit 64 bits")
    return value


def _seed_int_any(obj: dict, key: str) -> int:
    value = obj.get(key)
    if isinstance(value, bool) or value is None:
        raise ProtocolError("invalid", f"seed field {key!r} missing or not a number")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value, 10)
        except ValueError:
            try:
                as_float = float(value)
            except ValueError:
                pass
            else:
                if as_float.is_integer():
                    return int(as_float)
    raise ProtocolError("invalid", f"seed field {key!r} is not an integer: {value!r}")


class SeedTranslator:
    """Turn seed-era JSON objects into protocol-v1 downstream structs.

    Stateful because the seed format is: a seed ``progress`` names only its
    ``uuid``, so the container comes from that uuid's ``start``; and seed
    phases carry no phase count, so one is kept per (uuid, cpu).
    """

    def __init__(self, bound: int = _SEED_MEMORY):
        self._containers = _BoundedMap(bound)
        self._phases = _BoundedMap(bound)

    def translate(self, data: bytes):
        if len(data) > MAX_DOWNSTREAM_BYTES:
            raise ProtocolError("too_large", f"seed message of {len(data)} bytes")
        try:
            obj = msgspec.json.decode(data)
        except msgspec.DecodeError as exc:
            raise ProtocolError("malformed", f"malformed seed message: {exc}") from None
        except UnicodeDecodeError as exc:  # msgspec checks UTF-8 lazily
            raise ProtocolError("malformed", f"malformed seed message: {exc}") from None
        except RecursionError:
            # "[" * 4000 fits the size limit; uncaught, it ended the drain
            # task and with it the seed endpoint (found by tests/fuzz).
            raise ProtocolError("malformed", "malformed seed message: nested too deeply") \
                from None
        if not isinstance(obj, dict):
            raise ProtocolError("malformed", "seed message is not a JSON object")
        if obj.get("type") != "application":
            raise ProtocolError("unknown", f"unknown seed message type {obj.get('type')!r}")
        event = obj.get("event")
        uuid = obj.get("uuid")
        if not isinstance(uuid, str):
            raise ProtocolError("invalid", "seed message without a string uuid")
        if event == "start":
            container = obj.get("container")
            if not isinstance(container, str):
                raise ProtocolError("invalid", "seed start without a string container")
            self._containers.put(uuid, container)
            return DStart(container=container, task=uuid, app=uuid)
        container = self._containers.get(uuid, "")
        if event == "progress":
            payload = _seed_int(obj, "payload")
            if payload < 0:
                raise ProtocolError("invalid", "negative seed progress")
            return DProgress(container=container, task=uuid, app=uuid, payload=payload)
        if event == "phase_context":
            cpu = _seed_int(obj, "cpu")
            if "computetime" in obj:
                aggregation = _seed_int(obj, "aggregation")
                compute = _seed_int(obj, "computetime")
                total = _seed_int(obj, "totaltime")
            else:
                start = _seed_int(obj, "startcompute")
                compute = _seed_int(obj, "endcompute") - start
                total = _seed_int(obj, "endbarrier") - start
                aggregation = 1
            if aggregation < 1 or compute < 0 or total < compute:
                raise ProtocolError("invalid", "inconsistent seed phase_context")
            key = (uuid, cpu)
            phase = self._phases.get(key, 0) + aggregation
            self._phases.put(key, phase)
            return DPhaseContext(container=container, task=uuid, app=uuid, cpu=cpu,
                                 phase=phase, aggregation=aggregation,
                                 computetime=compute, totaltime=total)
        if event == "exit":
            return DExit(container=container, task=uuid, app=uuid)
        # "threads" existed in the seed but no daemon ever used it.
        raise ProtocolError("unknown", f"unknown seed event {event!r}")


def _check_not_squatted(path: str) -> None:
    """libzmq unlinks whatever is at an ipc path before binding. Where others
    may write (the seed-era path is in /tmp), what is there must be our own
    stale socket: anything else was planted, and is refused."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid():
        kind = "socket" if stat.S_ISSOCK(st.st_mode) else "directory" \
            if stat.S_ISDIR(st.st_mode) else "file"
        raise OSError(errno.EEXIST, f"a {kind} of uid {st.st_uid} is in the way")


class _Endpoint:
    def __init__(self, name: str, uri: str, kind: int):
        self.name = name
        self.uri = uri
        self.kind = kind
        self.raw: Optional[zmq.Socket] = None
        self.fd: Optional[int] = None
        #: a drain is queued on the loop (a full batch, or the start)
        self.scheduled = False
        self.counters: Dict[str, int] = dict.fromkeys(COUNTER_NAMES, 0)


class Ingest:
    """Receive downstream messages and hand them to ``on_message(msg, peer)``.

    ``ctx`` may be a ``zmq.Context`` or a ``zmq.asyncio.Context``; it is
    shadowed, never closed. The sockets are plain ones, drained from the
    loop's reader callback on their ZMQ_FD: no Future per message.
    ``uri`` is the protocol-v1 PULL endpoint; ``seed_uri`` the seed-era
    SUB endpoint, or None for none.
    ``on_message`` runs synchronously inside the drain loop, so it should
    be quick; its exceptions are counted and logged, never fatal.

    ``counters`` maps endpoint name (``"downstream"``, ``"seed"``) to
    ``received``, ``decoded``, ``dropped_malformed``, ``dropped_unknown``,
    ``dropped_oversize`` and ``callback_errors``; counts are updated once
    per drained batch.
    """

    def __init__(self, ctx: zmq.Context, uri: str, seed_uri: Optional[str] = None,
                 on_message: Optional[OnMessage] = None, *, batch: int = 1024,
                 rcvhwm: int = RCVHWM,
                 zap_domain: Optional[str] = "nrm", log_interval: float = 1.0,
                 socket_mode: Optional[int] = None):
        self._ctx = zmq.Context.shadow(ctx.underlying)
        self.on_message: OnMessage = on_message or (lambda msg, peer: None)
        self.batch = max(1, int(batch))
        self.rcvhwm = int(rcvhwm)
        self.zap_domain = zap_domain
        self.log_interval = log_interval
        self.socket_mode = socket_mode
        self._endpoints = [_Endpoint("downstream", uri, zmq.PULL)]
        if seed_uri:
            self._endpoints.append(_Endpoint("seed", seed_uri, zmq.SUB))
        self.counters: Dict[str, Dict[str, int]] = {
            ep.name: ep.counters for ep in self._endpoints}
        #: optional endpoint name -> why it is not listening
        self.failures: Dict[str, str] = {}
        self._seed = SeedTranslator()
        self._last_log: Optional[float] = None
        self._unlogged: Dict[str, int] = {}
        self._last_problem = ""
        # perf_counter() when the batch being dispatched was drained: callbacks
        # read it to measure latency from arrival, queueing in the batch included.
        self.arrival: Optional[float] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Bind the endpoints and start draining them.

        The protocol-v1 endpoint is required: its failure raises, with
        nothing left open. An optional one (seed) that cannot be bound is
        logged in one line and listed in ``failures``; the others serve on."""
        for ep in list(self._endpoints):
            try:
                self._bind(ep)
            except (zmq.ZMQError, OSError) as exc:
                if ep.name == "downstream":
                    self._close_sockets()
                    raise
                reason = getattr(exc, "strerror", None) or str(exc)
                self._close(ep)
                self._endpoints.remove(ep)
                self.counters.pop(ep.name, None)
                self.failures[ep.name] = f"cannot bind {ep.uri}: {reason}"
                log.warning("downstream %s endpoint off: %s", ep.name, self.failures[ep.name])
        loop = asyncio.get_running_loop()
        self._loop = loop
        for ep in self._endpoints:
            ep.fd = ep.raw.getsockopt(zmq.FD)
            loop.add_reader(ep.fd, self._wake, ep)
            self._schedule(ep)   # what arrived before the reader was added

    def _bind(self, ep: _Endpoint) -> None:
        if ep.uri.startswith("ipc://"):
            _check_not_squatted(ep.uri[len("ipc://"):])
        sock = self._ctx.socket(ep.kind)
        ep.raw = sock
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, self.rcvhwm)
        if self.zap_domain:
            sock.setsockopt(zmq.ZAP_DOMAIN, self.zap_domain.encode())
        if ep.kind == zmq.SUB:
            sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.bind(ep.uri)
        if self.socket_mode is not None and ep.uri.startswith("ipc://"):
            # every user's tasks must be able to connect; what they
            # send is attributed by the ZAP handler, not trusted
            os.chmod(ep.uri[len("ipc://"):], self.socket_mode)

    async def stop(self) -> None:
        """Stop draining and close the sockets; safe to call twice."""
        for ep in self._endpoints:
            if ep.fd is not None and self._loop is not None:
                try:
                    self._loop.remove_reader(ep.fd)
                except (ValueError, OSError):
                    pass
            ep.fd = None
        self._close_sockets()
        self._flush_log(force=True)

    close = stop

    def _close_sockets(self) -> None:
        for ep in self._endpoints:
            self._close(ep)

    @staticmethod
    def _close(ep: _Endpoint) -> None:
        if ep.raw is not None:
            ep.raw.close(linger=0)
        ep.raw = None

    @property
    def endpoints(self) -> Dict[str, str]:
        return {ep.name: ep.uri for ep in self._endpoints}

    # ---------------------------------------------------------------- drain

    def _schedule(self, ep: _Endpoint) -> None:
        if not ep.scheduled:
            ep.scheduled = True
            self._loop.call_soon(self._wake, ep)

    def _wake(self, ep: _Endpoint) -> None:
        """The socket's ZMQ_FD signalled, or a drain was queued: drain a
        batch. ZMQ_FD is edge-triggered, so the drain goes on until EAGAIN;
        a full batch queues the rest behind the loop's other callbacks."""
        ep.scheduled = False
        if ep.raw is None:
            return      # stopped while queued
        try:
            n = self._drain_seed(ep) if ep.kind == zmq.SUB else self._drain_v1(ep)
        except Exception:   # never stop draining: log, count, go on
            ep.counters["callback_errors"] += 1
            rl_log.error("downstream %s drain failed", ep.name, exc_info=True)
            n = self.batch if self._pending(ep) else 0
        if n >= self.batch:
            self._schedule(ep)

    @staticmethod
    def _pending(ep: _Endpoint) -> bool:
        try:
            return bool(ep.raw.getsockopt(zmq.EVENTS) & zmq.POLLIN)
        except zmq.ZMQError:
            return False    # closed: nothing more to read

    def _drain(self, ep: _Endpoint, decode) -> int:
        """Receive and dispatch up to one batch; return how many arrived.
        Locals hoisted out of the loop: it runs for every message."""
        raw = ep.raw
        callback = self.on_message
        noblock = zmq.NOBLOCK
        again = zmq.Again
        zmq_error = zmq.ZMQError
        received = decoded = 0
        self.arrival = time.perf_counter()
        for _ in range(self.batch):
            try:
                frame = raw.recv(noblock, copy=False)
            except again:
                break
            received += 1
            try:
                msg = decode(frame.bytes)
            except ProtocolError as exc:
                self._reject(ep, exc)
                continue
            except Exception as exc:    # a decoder bug must not end the endpoint
                self._drop(ep, "dropped_malformed", exc)
                continue
            decoded += 1
            try:
                peer = frame.get("User-Id") or None
            except zmq_error:  # no ZAP handler answered for this peer
                peer = None
            try:
                callback(msg, peer)
            except Exception as exc:
                self._drop(ep, "callback_errors", exc)
        ep.counters["received"] += received
        ep.counters["decoded"] += decoded
        return received

    def _drain_v1(self, ep: _Endpoint) -> int:
        return self._drain(ep, protocol.decode_downstream)

    def _drain_seed(self, ep: _Endpoint) -> int:
        return self._drain(ep, self._seed.translate)

    def _reject(self, ep: _Endpoint, exc: ProtocolError) -> None:
        kind = "dropped_unknown" if exc.code == "unknown" else _classify(exc)
        self._drop(ep, kind, exc)

    # -------------------------------------------------------------- logging

    def _drop(self, ep: _Endpoint, kind: str, exc: Exception) -> None:
        ep.counters[kind] += 1
        key = f"{ep.name}.{kind}"
        self._unlogged[key] = self._unlogged.get(key, 0) + 1
        self._last_problem = f"{ep.name}: {exc}"
        self._flush_log()

    def _flush_log(self, force: bool = False) -> None:
        """At most one line per ``log_interval``, summing what it skipped."""
        if not self._unlogged:
            return
        now = time.monotonic()
        if (not force and self._last_log is not None
                and now - self._last_log < self.log_interval):
            return
        self._last_log = now
        counts = ", ".join(f"{k}={v}" for k, v in sorted(self._unlogged.items()))
        self._unlogged = {}
        log.warning("downstream messages dropped (%s); last: %.200s", counts,
                    self._last_problem)
