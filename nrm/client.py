"""The upstream client library; the `nrm` CLI is a thin layer over it.

Blocking use::

    from nrm.client import Client
    from nrm.manifest import load
    with Client() as c:
        result = c.run(load("examples/basic.yml"), ["hostname"])
        print(result.status)

Asyncio use, many tasks at once over one connection::

    import asyncio
    from nrm.client import AsyncClient
    async def main():
        async with AsyncClient() as c:
            m = load("examples/basic.yml")
            results = await asyncio.gather(*(c.run(m, ["true"], output=False)
                                             for _ in range(100)))
            print([r.status for r in results])
    asyncio.run(main())

Requests carry an id echoed by every reply, so any number of requests can
share one DEALER socket. ``AsyncClient.run`` asks nrmd for a ``started``
reply only when ``on_started`` or ``detach`` (without ``follow``) needs
one: the exit reply fills the same fields of the result (pid, cpus, mems,
and ``started_at`` on this node's ``time.monotonic()`` clock), and a launch
storm saves one message per run.

A remote nrmd (``nrmd --tcp``) is reached with ``uri="tcp://HOST:PORT"`` (or
``$NRM_URI``) and CurveZMQ key files: ``server_key`` (nrmd's public key,
``$NRM_CURVE_SERVER_KEY``) and ``key`` (this user's keypair, ``$NRM_CURVE_KEY``).
Over TCP a running task's stream also carries empty output chunks, nrmd's
probe of the connection (docs/security.md): writing them is a no-op.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from dataclasses import dataclass, field
from collections import deque
from typing import (TYPE_CHECKING, Any, BinaryIO, Callable, Coroutine, Deque, Dict, List,
                    Optional)

import zmq

from nrm import paths, protocol

if TYPE_CHECKING:
    import asyncio

    from nrm.manifest import Manifest
    from nrm.transport import curve
    from nrm.transport.zmqloop import BatchReader

# A blocking client imports neither asyncio (AsyncClient does) nor the CURVE
# module (tcp:// only) nor the manifest parser: every `srun ... nrm run`
# step pays for what the CLI imports (benchmarks/cli_startup.py).

#: a remote nrmd's endpoint (nrm.transport.curve reads it too)
ENV_URI = "NRM_URI"

DEFAULT_TIMEOUT = 5.0
#: output flow control (docs/protocol.md): nrmd keeps at most this much of
#: a run's output sent and not yet credited; the client credits what it
#: consumed every quarter window, when nrmd asks, and after the exit. A run
#: that prints nothing sends no credit.
CREDIT_WINDOW = 1 << 20
CREDIT_EVERY = CREDIT_WINDOW // 4
#: ZMTP heartbeats on event subscriptions: a daemon silent this long is lost
HEARTBEAT_IVL_MS = 1000
HEARTBEAT_TIMEOUT_MS = 3000


class NrmError(Exception):
    """An error reply from nrmd (``code`` is machine-readable)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class DaemonUnavailable(NrmError):
    def __init__(self, message: str):
        super().__init__("unavailable", message)


class ConfigError(NrmError):
    """The client cannot even try: a bad URI or key file."""

    def __init__(self, message: str):
        super().__init__("config", message)


#: what the client's monitor reports: connected, refused, or lost
_MONITOR_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                   | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                   | zmq.EVENT_DISCONNECTED)


def _tcp_config(uri: Optional[str], server_key: Optional[str],
                key: Optional[str]) -> Optional[curve.ClientConfig]:
    """None for the local ipc daemon, else the TCP endpoint and its keys."""
    uri = uri or os.environ.get(ENV_URI)
    if not uri:
        return None
    from nrm.transport import curve
    if not uri.startswith("tcp://"):
        raise ConfigError(f"{uri}: expected tcp://HOST:PORT (a local nrmd needs no URI)")
    try:
        return curve.client_config(uri, server_key, key)
    except curve.CurveError as exc:
        raise ConfigError(str(exc)) from None


def _monitor_events(monitor) -> list:
    from zmq.utils.monitor import recv_monitor_message
    events = []
    while True:
        try:
            events.append(recv_monitor_message(monitor, zmq.NOBLOCK)["event"])
        except zmq.Again:
            return events


def _monitor_error(events: list, uri: str) -> Optional[NrmError]:
    """The most telling of the monitor's events as an error, if any."""
    if zmq.EVENT_HANDSHAKE_FAILED_AUTH in events:
        return NrmError("denied", f"nrmd at {uri} refused this client's key "
                                  "(not in its users file)")
    if set(events) & {zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                      zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL}:
        return NrmError("denied", f"CURVE handshake with {uri} failed "
                                  "(wrong server key, or not an nrmd --tcp endpoint?)")
    if zmq.EVENT_DISCONNECTED in events:
        return DaemonUnavailable("lost the connection to nrmd")
    return None


@dataclass
class RunResult:
    container: str = ""
    task: str = ""
    pid: int = 0
    cpus: List[int] = field(default_factory=list)
    mems: List[int] = field(default_factory=list)
    status: int = 0
    code: Optional[int] = None
    signal: Optional[int] = None
    profile: Optional[dict] = None
    #: when nrmd saw the task start, in this node's ``time.monotonic()``
    started_at: Optional[float] = None


_monitor_ids = itertools.count()


def _monitor(sock) -> zmq.Socket:
    """A monitor set up before the socket connects, never able to block.

    libzmq's I/O thread sends monitor events blocking: an event emitted
    before our PAIR has connected, or once its queue is full (nobody polls
    the Client), would stall every connection of the context. So the PAIR
    connects first, and with no receive limit."""
    addr = f"inproc://nrm.client.monitor.{os.getpid()}.{next(_monitor_ids)}"
    sock.monitor(addr, _MONITOR_EVENTS)
    mon = sock.context.socket(zmq.PAIR)
    mon.linger = 0
    mon.rcvhwm = 0
    mon.connect(addr)
    return mon


def _encode_request(msg) -> bytes:
    """nrmd drops the connection of a peer that sends more than its limit,
    which the client would only see as a lost connection: say it first."""
    data = protocol.encode(msg)
    if len(data) > protocol.MAX_REQUEST_BYTES:
        raise NrmError("too_large", f"request too large: {len(data) / 2**20:.1f} MiB (environment, "
                                    f"arguments and manifest); nrmd accepts at most "
                                    f"{protocol.MAX_REQUEST_BYTES // 2**20} MiB")
    return data


def _check_trusted(rundir: str, name: str) -> None:
    """Requests carry the caller's environment, argv and cwd: refuse a socket
    that someone other than root or the caller could have planted."""
    problem = paths.trust_problem(rundir, name)
    if problem:
        raise DaemonUnavailable(f"refusing to talk to nrmd: {problem}")


def _request_socket(ctx, rundir: str, tcp: Optional[curve.ClientConfig] = None,
                    monitor: bool = False):
    """(DEALER, its monitor or None), connected to the local or TCP nrmd."""
    if tcp is not None:
        uri = tcp.uri
    else:
        uri = paths.upstream_uri(rundir)
        path = uri[len("ipc://"):]
        _check_trusted(rundir, "upstream")
        if not os.path.exists(path):
            raise DaemonUnavailable(f"nrmd is not running (no socket at {path})")
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.sndhwm = 0
    sock.rcvhwm = 0
    if tcp is not None:
        from nrm.transport import curve
        curve.make_client(sock, tcp)
    mon = _monitor(sock) if monitor else None
    sock.connect(uri)
    return sock, mon


def _run_request(manifest: Manifest, argv, env, cwd, container, detach, output, wait,
                 oversubscribe, cpus_allowed=None, started=True, key=None) -> protocol.Run:
    return protocol.Run(
        manifest=manifest.to_dict(), argv=list(argv),
        env=dict(os.environ if env is None else env), cwd=cwd or os.getcwd(),
        container=container, detach=detach, output=output, wait=wait,
        oversubscribe=oversubscribe, cpus_allowed=cpus_allowed, started=started,
        window=CREDIT_WINDOW if output and not detach else 0, key=key)


class _Credits:
    """One run's consumed output and the credits that tell nrmd."""

    __slots__ = ("consumed", "credited")

    def __init__(self):
        self.consumed = 0
        self.credited = 0

    def output(self, reply: protocol.Output, payload) -> Optional[protocol.Credit]:
        """After the client has handled an output reply: the credit to send, if any."""
        self.consumed += len(payload or b"")
        if self.consumed - self.credited >= CREDIT_EVERY or (
                reply.credit and self.consumed > self.credited):
            return self.due(reply.id)
        return None

    def due(self, request_id: int) -> Optional[protocol.Credit]:
        """What is owed (after the exit: everything consumed), if anything."""
        if self.consumed <= self.credited:
            return None
        self.credited = self.consumed
        return protocol.Credit(id=request_id, consumed=self.consumed)


def _apply(result: RunResult, reply) -> None:
    if isinstance(reply, (protocol.Started, protocol.Exit)):
        result.container, result.task, result.pid = reply.container, reply.task, reply.pid
        result.cpus, result.mems = list(reply.cpus), list(reply.mems)
    if isinstance(reply, protocol.Exit):
        result.status, result.code, result.signal = reply.status, reply.code, reply.signal
        result.profile = reply.profile
        result.started_at = reply.started_at


class Run:
    """A run in progress, for callers that want to forward signals."""

    def __init__(self, client: "Client", request_id: int, stdout, stderr,
                 on_started: Optional[Callable[[RunResult], None]] = None):
        self.client = client
        self.id = request_id
        self.stdout = stdout
        self.stderr = stderr
        self.on_started = on_started
        self.result = RunResult()
        self.done = False
        self.credits = _Credits()

    def signal(self, signum: int) -> None:
        """Forward a signal to the task (no reply is awaited)."""
        if self.result.task:
            self.client._send(protocol.Signal(id=next(self.client._ids), task=self.result.task,
                                              signum=signum))

    def step(self, timeout: float) -> bool:
        """Process replies for up to ``timeout`` seconds; True when done."""
        for reply, payload in self.client._receive(self.id, timeout):
            if isinstance(reply, protocol.Error):
                self.done = True
                self.client._running.discard(self.id)
                raise NrmError(reply.code, reply.message)
            if isinstance(reply, protocol.Output):
                out = self.stdout if reply.stream == "stdout" else self.stderr
                if out is not None and payload:
                    out.write(payload)
                    out.flush()
                credit = self.credits.output(reply, payload)
                if credit is not None:
                    self.client._send(credit)
                continue
            _apply(self.result, reply)
            if isinstance(reply, protocol.Started) and self.on_started:
                self.on_started(self.result)
            if isinstance(reply, protocol.Exit) or (
                    isinstance(reply, protocol.Started) and self.client._detached(self.id)):
                self.done = True
                self.client._running.discard(self.id)
                credit = self.credits.due(self.id)
                if credit is not None:
                    self.client._send(credit)
        return self.done

    def wait(self) -> RunResult:
        """Until the exit. A TCP daemon that never completes a handshake
        (down, firewalled) fails after the client's timeout instead of
        leaving the caller hanging; a local one is known to be there."""
        deadline = time.monotonic() + self.client.timeout
        while not self.step(0.2):
            if self.client.tcp is not None and not self.client.connected \
                    and time.monotonic() >= deadline:
                raise DaemonUnavailable(f"{self.client.where} did not answer within "
                                        f"{self.client.timeout:g} s")
        return self.result


class _Endpoint:
    """Where the daemon is (ipc in a runtime dir, or tcp with CURVE keys);
    shared by the blocking and the asyncio client."""

    def __init__(self, runtime_dir: Optional[str] = None, timeout: float = DEFAULT_TIMEOUT,
                 uri: Optional[str] = None, server_key: Optional[str] = None,
                 key: Optional[str] = None):
        self.rundir = paths.runtime_dir(runtime_dir)
        self.timeout = timeout
        self.tcp = _tcp_config(uri, server_key, key)
        self.where = self.tcp.uri if self.tcp else "nrmd"


def _close_monitored(sock: zmq.Socket, monitor: zmq.Socket) -> None:
    """Monitor off, then its PAIR, then the socket: in any other order
    libzmq's I/O thread can block for ever sending the next event."""
    if sock.closed:
        return
    try:
        sock.disable_monitor()
    except zmq.ZMQError:
        pass
    monitor.close(linger=0)
    sock.close(linger=0)


class Client(_Endpoint):
    """A blocking connection to one nrmd: requests, runs with their output
    streamed, event subscriptions. Not thread-safe; one per thread."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ctx = zmq.Context.instance()
        self.sock, self.monitor = _request_socket(self.ctx, self.rundir, self.tcp, monitor=True)
        self.connected = False
        self._ids = itertools.count(1)
        self._pending: Dict[int, list] = {}
        self._detach: set = set()
        #: runs whose exit has not been read: nrmd may ask a finished one
        #: for credits it was already given, which is dropped
        self._running: set = set()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        _close_monitored(self.sock, self.monitor)

    def __del__(self):
        # a Client used as a temporary (Client().status()) closes in order too
        try:
            self.close()
        except Exception:
            pass

    # -- plumbing ---------------------------------------------------------
    def _send(self, msg) -> None:
        self.sock.send(_encode_request(msg))

    def _detached(self, request_id: int) -> bool:
        return request_id in self._detach

    def _receive(self, request_id: int, timeout: float):
        """Yield (reply, payload) for ``request_id``, buffering others."""
        queued = self._pending.pop(request_id, None)
        if queued:
            yield from queued
            return
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.monitor, zmq.POLLIN)
        events = dict(poller.poll(int(timeout * 1000)))
        if self.monitor in events:
            seen = _monitor_events(self.monitor)
            self.connected = self.connected or zmq.EVENT_HANDSHAKE_SUCCEEDED in seen
            error = _monitor_error(seen, self.where)
            if error is not None:
                raise error
        if self.sock not in events:
            return
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            reply = protocol.decode_reply(frames[0])
            payload = frames[1] if len(frames) > 1 else None
            if reply.id == request_id:
                yield reply, payload
            elif isinstance(reply, protocol.Output) and reply.id not in self._running:
                continue
            else:
                self._pending.setdefault(reply.id, []).append((reply, payload))

    def call(self, msg):
        """Send one request and return its single reply's data."""
        msg.id = next(self._ids)
        self._send(msg)
        deadline = time.monotonic() + self.timeout
        while (left := deadline - time.monotonic()) > 0:
            for reply, _ in self._receive(msg.id, min(left, 0.5)):
                if isinstance(reply, protocol.Error):
                    raise NrmError(reply.code, reply.message)
                return reply.data if isinstance(reply, protocol.Ack) else reply
        raise DaemonUnavailable(f"{self.where} did not answer within {self.timeout:g} s")

    # -- verbs ------------------------------------------------------------
    def status(self) -> dict:
        return self.call(protocol.Status())

    def list(self) -> List[dict]:
        return self.call(protocol.ListContainers())["containers"]

    def kill(self, container: str) -> dict:
        return self.call(protocol.Kill(container=container))

    def power(self) -> dict:
        return self.call(protocol.Power())

    def setpower(self, watts: Optional[float]) -> dict:
        return self.call(protocol.SetPower(watts=watts))

    def report(self, container: Optional[str] = None) -> List[dict]:
        return self.call(protocol.Report(container=container))["reports"]

    def claim(self, keys: List[str]) -> dict:
        """``{"epoch", "keys": {key: state}}``; unknown keys are fenced
        (docs/protocol.md, "Task keys")."""
        return self.call(protocol.Claim(keys=list(keys)))

    def forget(self, keys: List[str] = (), prefix: Optional[str] = None) -> int:
        return self.call(protocol.Forget(keys=list(keys), prefix=prefix))["forgotten"]

    def start(self, manifest: Manifest, argv: List[str], *, container: Optional[str] = None,
              detach: bool = False, env: Optional[Dict[str, str]] = None,
              cwd: Optional[str] = None, stdout: Optional[BinaryIO] = None,
              stderr: Optional[BinaryIO] = None, output: bool = True, wait: bool = False,
              oversubscribe: bool = False, cpus_allowed: Optional[List[int]] = None,
              on_started: Optional[Callable[[RunResult], None]] = None,
              key: Optional[str] = None) -> Run:
        msg = _run_request(manifest, argv, env, cwd, container, detach, output, wait,
                           oversubscribe, cpus_allowed, key=key)
        msg.id = next(self._ids)
        if detach:
            self._detach.add(msg.id)
        else:
            self._running.add(msg.id)
        self._send(msg)
        return Run(self, msg.id, stdout, stderr, on_started)

    def run(self, manifest: Manifest, argv: List[str], **kwargs) -> RunResult:
        """Run to completion; output goes to this process's stdout/stderr
        unless other binary files (or None, to discard) are given."""
        kwargs.setdefault("stdout", sys.stdout.buffer)
        kwargs.setdefault("stderr", sys.stderr.buffer)
        return self.start(manifest, argv, **kwargs).wait()

    def subscribe(self, topics=("",)) -> zmq.Socket:
        """A SUB socket on the daemon's events (``[topic, json]`` frames).
        It never says when nrmd goes away: ``events`` does."""
        return _event_socket(self.ctx, self.rundir, self.tcp, topics)[0]

    def events(self, topics=("",)) -> "Subscription":
        """The daemon's events on ``topics`` (prefixes), as a ``Subscription``
        that raises DaemonUnavailable when nrmd goes away instead of
        waiting for ever; NrmError("usage") for a topic that does not exist."""
        unknown = protocol.unknown_topics(topics)
        if unknown:
            raise NrmError("usage", f"unknown topic {unknown[0]!r} (topics: "
                                    f"{', '.join(protocol.TOPICS)}, or a prefix of them; "
                                    "\"\" for all)")
        return Subscription(self, topics)


def _event_socket(ctx, rundir: str, tcp: Optional[curve.ClientConfig], topics,
                  monitor: bool = False):
    """(SUB, its monitor or None), connected and subscribed, with ZMTP
    heartbeats on."""
    sock = ctx.socket(zmq.SUB)
    sock.linger = 0
    sock.heartbeat_ivl = HEARTBEAT_IVL_MS
    sock.heartbeat_timeout = HEARTBEAT_TIMEOUT_MS
    if tcp is not None:
        from nrm.transport import curve
        curve.make_client(sock, tcp)
        uri = tcp.events_uri
    else:
        _check_trusted(rundir, "events")
        uri = paths.events_uri(rundir)
    mon = _monitor(sock) if monitor else None
    sock.connect(uri)
    for t in topics:
        sock.setsockopt(zmq.SUBSCRIBE, t.encode())
    return sock, mon


class Subscription:
    """Events, and the news that nrmd is gone. Its loss is noticed two
    ways: its end of the connection closing (a crash or a stop: the
    monitor reports the disconnect at once), and, for a daemon or host that
    stops answering without closing anything (a frozen process, a lost
    network), ZMTP heartbeats: a PING every HEARTBEAT_IVL_MS that nrmd's
    libzmq answers from its I/O thread, and the connection dropped after
    HEARTBEAT_TIMEOUT_MS without one. nrmd publishes nothing for it. A
    subscription that never connects fails after the client's timeout."""

    def __init__(self, client: Client, topics):
        self.client = client
        self.sock, self.monitor = _event_socket(client.ctx, client.rundir, client.tcp, topics,
                                                monitor=True)
        self.connected = False
        self._deadline = time.monotonic() + client.timeout

    def recv(self) -> tuple:
        """The next event as (topic, body); DaemonUnavailable once nrmd is lost."""
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.monitor, zmq.POLLIN)
        while True:
            try:
                topic, body = self.sock.recv_multipart(zmq.NOBLOCK)
                return topic.decode(), json.loads(body)
            except zmq.Again:
                pass
            wait = None if self.connected else max(0.0, self._deadline - time.monotonic())
            ready = dict(poller.poll(None if wait is None else int(wait * 1000) + 1))
            if self.monitor in ready:
                seen = _monitor_events(self.monitor)
                self.connected = self.connected or zmq.EVENT_HANDSHAKE_SUCCEEDED in seen
                error = _monitor_error(seen, self.client.where)
                if error is not None:
                    raise error
            elif not ready and not self.connected:
                raise DaemonUnavailable(f"{self.client.where} did not answer within "
                                        f"{self.client.timeout:g} s")

    def close(self) -> None:
        _close_monitored(self.sock, self.monitor)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Replies:
    """One request's replies in arrival order, awaited by the request's own
    coroutine alone: asyncio.Queue's extra machinery (a getters' and a
    putters' deque, a task counter, an event) cost ~2 us per run."""

    __slots__ = ("items", "waiter")

    def __init__(self):
        self.items: Deque[tuple] = deque()
        self.waiter: Optional[asyncio.Future] = None

    def put(self, item: tuple) -> None:
        self.items.append(item)
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> tuple:
        import asyncio
        while not self.items:
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        return self.items.popleft()


class AsyncClient(_Endpoint):
    """asyncio flavour: one plain socket drained in batches from the loop,
    one reply queue per request. zmq.asyncio would cost a future and a
    poller round per message, which made the client, not nrmd, the largest
    consumer of cpu in a launch storm (benchmarks/launch.py)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ctx = zmq.Context.instance()
        self.sock, _ = _request_socket(self.ctx, self.rundir, self.tcp)
        self._ids = itertools.count(1)
        self._queues: Dict[int, _Replies] = {}
        self._reader: Optional[BatchReader] = None
        #: what nrmd adds to the protocol (``status``'s ``features``), once
        #: known; ``run_batch`` emulates "batch" without it (a test may set
        #: ``frozenset()`` to force the emulation)
        self.features: Optional[frozenset] = None
        self._batch_backlog: List[tuple] = []
        self._emulated_slots: Dict[tuple, Any] = {}

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        self.sock.close(linger=0)

    def _on_reply(self, frames) -> None:
        reply = protocol.decode_reply(frames[0])
        q = self._queues.get(reply.id)
        if q is not None:
            q.put((reply, frames[1] if len(frames) > 1 else None))

    def _open(self, msg) -> _Replies:
        msg.id = next(self._ids)
        q = _Replies()
        self._queues[msg.id] = q
        return q

    def _send(self, msg, data: Optional[bytes] = None) -> None:
        """Never blocks: the DEALER has no send limit and its pipe exists
        from connect() on. The send may consume the socket's edge-triggered
        readiness, hence the check. ``data``: ``msg`` encoded already."""
        if self._reader is None:
            import asyncio

            from nrm.transport.zmqloop import BatchReader, send_frames
            self._reader = BatchReader(asyncio.get_running_loop(), self.sock, self._on_reply,
                                       batch=256, copy=True)
            self._send_frames = send_frames
        # pyzmq's Python layer and its enum flags cost more than the send
        self._send_frames(self.sock, (data if data is not None else _encode_request(msg),))
        self._reader.sent()

    async def call(self, msg):
        import asyncio
        q = self._open(msg)
        try:
            self._send(msg)
            try:
                reply, _ = await asyncio.wait_for(q.get(), self.timeout)
            except asyncio.TimeoutError:
                raise DaemonUnavailable(
                    f"{self.where} did not answer within {self.timeout:g} s") from None
        finally:
            self._queues.pop(msg.id, None)
        if isinstance(reply, protocol.Error):
            raise NrmError(reply.code, reply.message)
        return reply.data if isinstance(reply, protocol.Ack) else reply

    async def status(self) -> dict:
        status = await self.call(protocol.Status())
        if self.features is None:
            self.features = frozenset(status.get("features") or ())
        return status

    async def kill(self, container: str) -> dict:
        return await self.call(protocol.Kill(container=container))

    async def claim(self, keys: List[str]) -> dict:
        return await self.call(protocol.Claim(keys=list(keys)))

    def run_batch(self, manifest: Manifest, env: Dict[str, str],
                  tasks: List[protocol.BatchTask],
                  on_exits: Callable[[List[protocol.BatchExit]], None], *,
                  oversubscribe: bool = False) -> "asyncio.Future[None]":
        """Sends the request now (in the caller's turn of the loop); on_exits is
        called with each coalesced list; the future is done when every task was
        reported, or fails with NrmError if nrmd refused the request.

        Each task is keyed, detached and followed (docs/protocol.md,
        "Batches"): tasks on equal ``cpus`` run one at a time in the order
        of the calls, others concurrently. A request over nrmd's size limit
        is sent as several, in order, all encoded before any is sent: a
        task too large alone is reported with error ``too_large: ...``, and
        a refused one of several reports its own tasks with its error (the
        others go on). Until ``features`` is known (from
        ``status``, asked for here the first time) the request waits for
        it; against an nrmd without "batch" each task is one ``start_run``
        (at most two per cpus in flight) and each exit its own list."""
        import asyncio
        fut = asyncio.get_running_loop().create_future()
        tasks = list(tasks)
        if not tasks:
            fut.set_result(None)
            return fut
        job = (manifest, env, tasks, on_exits, oversubscribe, fut)
        if self.features is None or self._batch_backlog:
            self._batch_backlog.append(job)
            if len(self._batch_backlog) == 1:
                from nrm.client_batch import quiet
                asyncio.ensure_future(self._learn_features()).add_done_callback(quiet)
            return fut
        self._start_batch(*job)
        return fut

    async def _learn_features(self) -> None:
        try:
            await self.status()
        except BaseException as exc:
            backlog, self._batch_backlog = self._batch_backlog, []
            for job in backlog:
                if not job[-1].done():
                    job[-1].set_exception(exc)
            raise
        backlog, self._batch_backlog = self._batch_backlog, []
        for job in backlog:
            self._start_batch(*job)

    def _start_batch(self, manifest, env, tasks, on_exits, oversubscribe, fut) -> None:
        from nrm.client_batch import BatchReplies, EmulatedBatch, plan_batch
        if "batch" not in self.features:
            EmulatedBatch(self, manifest, env, tasks, on_exits, oversubscribe, fut).start()
            return
        try:
            plan, alone = plan_batch(self._ids, manifest.to_dict(), dict(env), tasks,
                                     oversubscribe)
        except BaseException as exc:
            fut.set_exception(exc)
            return
        replies = BatchReplies(self._queues, len(tasks), on_exits, fut,
                               split=len(plan) + bool(alone) > 1)
        try:
            for msg, data in plan:      # every request encoded before any is sent
                self._queues[msg.id] = replies
                replies.ids.append(msg.id)
                replies.tasks[msg.id] = msg.tasks
                self._send(msg, data)
        except BaseException as exc:
            replies.fail(exc)
            return
        if alone:
            import asyncio
            asyncio.get_running_loop().call_soon(replies.put, (protocol.Exits(exits=alone), None))

    async def forget(self, keys: List[str] = (), prefix: Optional[str] = None) -> int:
        return (await self.call(protocol.Forget(keys=list(keys), prefix=prefix)))["forgotten"]

    async def run(self, manifest: Manifest, argv: List[str], *, container: Optional[str] = None,
                  detach: bool = False, env: Optional[Dict[str, str]] = None,
                  cwd: Optional[str] = None, output: bool = True,
                  on_output: Optional[Callable[[str, bytes], None]] = None,
                  on_started: Optional[Callable[[RunResult], None]] = None,
                  wait: bool = False, oversubscribe: bool = False,
                  cpus_allowed: Optional[List[int]] = None, follow: bool = False,
                  key: Optional[str] = None) -> RunResult:
        """Run to completion (or to the start, with ``detach``). nrmd sends
        a ``started`` reply only when ``on_started`` or ``detach`` without
        ``follow`` needs it:
        the result is complete either way, and a launch storm saves one
        message per run through both sides' zmq I/O threads.

        ``detach`` with ``follow``: the task outlives this client, yet the
        call waits for its exit, which nrmd reports while this client is
        connected (a pilot that can be killed and resumed needs both).
        ``key``: nrmd remembers the launch's outcome under it (``claim``)."""
        return await self.start_run(
            manifest, argv, container=container, detach=detach, env=env, cwd=cwd,
            output=output, on_output=on_output, on_started=on_started, wait=wait,
            oversubscribe=oversubscribe, cpus_allowed=cpus_allowed, follow=follow, key=key)

    def start_run(self, manifest: Manifest, argv: List[str], *, container: Optional[str] = None,
                  detach: bool = False, env: Optional[Dict[str, str]] = None,
                  cwd: Optional[str] = None, output: bool = True,
                  on_output: Optional[Callable[[str, bytes], None]] = None,
                  on_started: Optional[Callable[[RunResult], None]] = None,
                  wait: bool = False, oversubscribe: bool = False,
                  cpus_allowed: Optional[List[int]] = None, follow: bool = False,
                  key: Optional[str] = None) -> Coroutine[Any, Any, RunResult]:
        """:meth:`run`'s request, sent now, in the caller's turn of the event
        loop (a coroutine's body would wait for the next turn); returns the
        coroutine that follows it to its result, to be awaited once. A
        pilot sends its next launch before its bookkeeping of the last exit
        this way. Raises NrmError (too_large) before sending anything."""
        msg = _run_request(manifest, argv, env, cwd, container, detach, output, wait,
                           oversubscribe, cpus_allowed,
                           started=(detach and not follow) or on_started is not None, key=key)
        q = self._open(msg)
        try:
            self._send(msg)
        except BaseException:
            self._queues.pop(msg.id, None)
            raise
        return self._follow_run(msg, q, detach, follow, on_output, on_started)

    async def _follow_run(self, msg, q: _Replies, detach: bool, follow: bool,
                          on_output, on_started) -> RunResult:
        result = RunResult()
        credits = _Credits()
        try:
            while True:
                reply, payload = await q.get()
                if isinstance(reply, protocol.Error):
                    raise NrmError(reply.code, reply.message)
                if isinstance(reply, protocol.Output):
                    if on_output is not None and payload:
                        on_output(reply.stream, payload)
                    credit = credits.output(reply, payload)
                    if credit is not None:
                        self._send(credit)
                    continue
                _apply(result, reply)
                if on_started is not None and isinstance(reply, protocol.Started):
                    on_started(result)
                if isinstance(reply, protocol.Exit):
                    credit = credits.due(msg.id)
                    if credit is not None:
                        self._send(credit)
                    return result
                if detach and not follow and isinstance(reply, protocol.Started):
                    return result
        finally:
            self._queues.pop(msg.id, None)
