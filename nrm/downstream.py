"""Report progress from a Python program to nrm, like libnrm does for C.

    from nrm.downstream import Client
    nrm = Client("my-app")
    ...
    nrm.progress(1)

Outside nrm (no ``NRM_DOWNSTREAM_URI`` in the environment) the client is
inactive and every call returns at once, so instrumented programs run
unchanged anywhere.  Inside, it follows libnrm's rules: a PUSH socket that
queues while connecting (no sleep), non-blocking sends that never stall
the program, progress rate-limited by ``NRM_RATELIMIT`` (default 10 ms)
with the calls in between accumulated, and a ``close()`` (also run at
interpreter exit) that flushes, says goodbye and waits for nrm to have
read it all (``nrm/transport/hangup.py``), within ``NRM_LINGER`` ms.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import weakref
from decimal import Decimal
from typing import Optional

from nrm import durations, protocol
from nrm.protocol import DExit, DPerformance, DPhaseContext, DProgress, DStart
from nrm.transport import hangup

DEFAULT_RATELIMIT_NS = 10_000_000
DEFAULT_LINGER_MS = 1000
SNDHWM = 1000


def parse_duration_ns(text: str) -> int:
    """``"10ms"``, ``"250us"``, ``"2s"``, ``"0.5ms"`` or bare nanoseconds
    (the grammar of nrm/durations.py)."""
    try:
        ns = durations.seconds(text, durations.bare_nanoseconds).scaleb(9)
    except ValueError:
        raise ValueError(f"not a duration: {text!r} ({durations.EXPECTED})") from None
    if ns > Decimal(10) ** 18:
        raise ValueError(f"duration out of range: {text!r}")
    return int(ns.to_integral_value())


def _rank_from_env(env) -> int:
    for name in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID"):
        value = env.get(name)
        if value:
            try:
                return int(value)
            except ValueError:
                pass
    return -1


class _Sender:
    """The socket side, separate from Client so that a finalizer can close
    it without keeping the Client alive."""

    def __init__(self, uri: str, linger_ms: int, ids: dict):
        import zmq  # only programs that run under nrm pay for the import

        self._zmq = zmq
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.SNDHWM, SNDHWM)
        self.sock.setsockopt(zmq.LINGER, linger_ms)
        self.sock.connect(uri)
        self.uri = uri
        self.linger_ms = linger_ms
        self.lock = threading.Lock()
        self.closed = False
        self.ids = ids
        self.acc = 0  # progress not yet sent

    def send(self, data: bytes, block: bool = False) -> bool:
        zmq = self._zmq
        try:
            self.sock.send(data, 0 if block else zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

    def close(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
            deadline = time.monotonic() + self.linger_ms / 1000
            self.sock.setsockopt(self._zmq.SNDTIMEO, self.linger_ms)
            if self.acc:
                self.send(protocol.encode(DProgress(payload=self.acc, **self.ids)), block=True)
                self.acc = 0
            self.send(protocol.encode(DExit(**self.ids)), block=True)
            held = hangup.hold_connections(self.uri)
            self.sock.close(linger=max(0, int((deadline - time.monotonic()) * 1000)))
            self.ctx.term()
            hangup.release_when_read(held, deadline)


class Client:
    """One reporting application.

    ``app`` names it (default: the script's name).  ``uri``, ``container``,
    ``task`` and ``ratelimit`` (ns or a duration string) default to the
    environment nrm gives the task (``NRM_DOWNSTREAM_URI``,
    ``NRM_CONTAINER_ID``, ``NRM_TASK_ID``, ``NRM_RATELIMIT``).  Methods are
    thread-safe and return True when the message was queued (or
    accumulated, or the client is inactive), False when it was dropped.
    """

    def __init__(self, app: Optional[str] = None, *, uri: Optional[str] = None,
                 container: Optional[str] = None, task: Optional[str] = None,
                 ratelimit=None, rank: Optional[int] = None, env=None):
        env = os.environ if env is None else env
        self.app = app or os.path.basename(sys.argv[0] or "python") or "python"
        self.uri = uri if uri is not None else env.get("NRM_DOWNSTREAM_URI", "")
        self.container = container if container is not None else env.get(
            "NRM_CONTAINER_ID", "")
        self.task = task if task is not None else env.get("NRM_TASK_ID", "")
        self.rank = rank if rank is not None else _rank_from_env(env)
        if ratelimit is None:
            ratelimit = env.get("NRM_RATELIMIT") or DEFAULT_RATELIMIT_NS
        self.ratelimit_ns = (parse_duration_ns(ratelimit) if isinstance(ratelimit, str)
                             else int(ratelimit))
        linger = env.get("NRM_LINGER")
        linger_ms = int(linger) if linger and linger.isdigit() else DEFAULT_LINGER_MS
        self._last_progress = None
        self._phases = 0
        self._sender: Optional[_Sender] = None
        if not self.uri:
            return
        self._ids = dict(container=self.container, task=self.task, app=self.app)
        self._sender = _Sender(self.uri, linger_ms, self._ids)
        # Interpreter exit closes a forgotten client; the finalizer holds
        # the sender, not the client, so garbage collection still works.
        self._finalizer = weakref.finalize(self, self._sender.close)
        self._sender.send(protocol.encode(DStart(pid=os.getpid(), **self._ids)))

    @property
    def active(self) -> bool:
        return self._sender is not None and not self._sender.closed

    @contextlib.contextmanager
    def _open(self):
        """The sender, locked, or None when inactive or closed (calls then
        succeed doing nothing: a program runs the same outside nrm)."""
        sender = self._sender
        if sender is None:
            yield None
            return
        with sender.lock:
            yield None if sender.closed else sender

    def progress(self, amount: int = 1) -> bool:
        """Add ``amount`` to the progress counter (sent at most once per period)."""
        with self._open() as sender:
            if sender is None:
                return True
            sender.acc += int(amount)
            now = time.monotonic_ns()
            if self._last_progress is not None and now - self._last_progress < self.ratelimit_ns:
                return True
            return self._send_progress(sender, now)

    def flush(self) -> bool:
        """Send accumulated progress now, regardless of the rate limit."""
        with self._open() as sender:
            if sender is None or not sender.acc:
                return True
            return self._send_progress(sender, time.monotonic_ns())

    def _send_progress(self, sender: "_Sender", now: int) -> bool:
        if not sender.send(protocol.encode(DProgress(payload=sender.acc, **self._ids))):
            return False  # kept in the accumulator for the next send
        sender.acc = 0
        self._last_progress = now
        return True

    def phase_context(self, cpu: int, computetime: int, totaltime: int,
                      aggregation: int = 1, site: int = 0) -> bool:
        """``aggregation`` phases on ``cpu`` took these totals (ns); ``site``: their type."""
        with self._open() as sender:
            if sender is None:
                return True
            self._phases += aggregation
            msg = DPhaseContext(rank=self.rank, cpu=cpu, phase=self._phases,
                                aggregation=aggregation, computetime=int(computetime),
                                totaltime=int(totaltime), site=int(site), **self._ids)
            return sender.send(protocol.encode(msg))

    def performance(self, event: str, payload: float, interval: float) -> bool:
        with self._open() as sender:
            if sender is None:
                return True
            msg = DPerformance(event=event, payload=float(payload), interval=float(interval),
                               **self._ids)
            return sender.send(protocol.encode(msg))

    def close(self) -> None:
        """Flush progress, send exit, release the socket (idempotent)."""
        if self._sender is not None:
            self._finalizer()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
