"""Upstream endpoints: ROUTER for requests, PUB for events, ZAP for identity.

Every ipc connection passes through our ZAP handler, which receives the
peer's kernel credentials (``localhost:<uid>:<gid>:<pid>``, SO_PEERCRED) and
stamps them as the connection's User-Id; each request is therefore
attributed to a kernel-verified user without passwords. TCP endpoints exist
only when the admin configures them, and are CURVE servers: the handler
maps the client's public key to the local user the admin named for it
(User-Id ``uid:gid:0``; pid 0 marks a remote peer). Anything else (unknown
keys, NULL or PLAIN on tcp) is refused at the handshake.
"""

from __future__ import annotations

import ctypes
import logging
import os
import time
from collections import deque
from typing import Callable, Deque, Dict, Optional

import zmq
import zmq.utils.z85
from zmq.utils.monitor import parse_monitor_message

from nrm import protocol
from nrm.containers.manager import READ_CHUNK
from nrm.containers.model import Peer, Sink, Task
from nrm.daemon.credits import OutputBudget, lingering
from nrm.log import RateLimitedLog
from nrm.transport import curve
from nrm.transport.zmqloop import BatchReader, send_frames

log = logging.getLogger(__name__)
rl_log = RateLimitedLog(log)

FLUSH_INTERVAL_S = 0.002
#: bytes libzmq may hold for one client connection. The ROUTER's send mark
#: counts messages, and an output chunk is up to READ_CHUNK bytes, so the
#: mark is this budget in chunks: past it a send says "full", the sink
#: queues one chunk and the task's pipe stops being read (the task blocks).
CLIENT_QUEUE_BYTES = 4 << 20
CLIENT_SNDHWM = max(CLIENT_QUEUE_BYTES // READ_CHUNK, 16)
#: after a client that held a full queue goes or drains, freed buffers are
#: handed back to the system (malloc keeps them otherwise)
TRIM_DELAY_S = 0.5
#: how often a remote (TCP) client streaming a task is checked for life: it
#: has no pid to watch, so an empty output chunk is sent, which every
#: client ignores and which fails once the connection is gone.
REMOTE_PROBE_S = 2.0
HANDSHAKE_FAILURES = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                      | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


#: Peers by User-Id: one client sends every request of a launch loop with the
#: same string, and a Peer is frozen, so one may serve every request (~2 us each)
_peers: Dict[str, Peer] = {}
PEER_CACHE = 1024


def parse_peer(user_id: Optional[str]) -> Optional[Peer]:
    """User-Id as stamped by our ZAP handler: "uid:gid:pid"."""
    if not user_id:
        return None
    peer = _peers.get(user_id)
    if peer is not None:
        return peer
    try:
        uid, gid, pid = (int(x) for x in user_id.split(":"))
    except ValueError:
        return None
    if len(_peers) >= PEER_CACHE:
        _peers.clear()
    peer = _peers[user_id] = Peer(uid=uid, gid=gid, pid=pid)
    return peer


class Requester:
    """One request's origin: where its replies go."""

    __slots__ = ("upstream", "identity", "peer", "request_id")

    def __init__(self, upstream: "Upstream", identity: bytes, peer: Peer, request_id: int):
        self.upstream = upstream
        self.identity = identity
        self.peer = peer
        self.request_id = request_id

    def reply(self, msg, payload: Optional[bytes] = None) -> str:
        """A reply the client must get even if it is momentarily full (it may
        send many requests before it reads): kept in a bounded backlog."""
        msg.id = self.request_id
        return self.upstream.reply(self.identity, msg, payload)

    def stream(self, msg, payload: Optional[bytes] = None) -> str:
        """A run's event: "full" is the caller's cue to pause the task."""
        msg.id = self.request_id
        return self.upstream.send(self.identity, msg, payload)


def _libc_malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):     # not glibc
        return None


_malloc_trim = _libc_malloc_trim()


class _Backlog:
    """Replies waiting for one full client, in order, bounded in bytes."""

    __slots__ = ("items", "size")

    def __init__(self):
        self.items: Deque[tuple] = deque()
        self.size = 0

    def add(self, body: bytes, payload: Optional[bytes]) -> bool:
        n = len(body) + len(payload or b"")
        if self.items and self.size + n > CLIENT_QUEUE_BYTES:
            return False
        self.items.append((body, payload))
        self.size += n
        return True

    def flush(self, send: Callable[[bytes, Optional[bytes]], str]) -> bool:
        """Send what the client takes; True when nothing is left (sent, or
        the client is gone)."""
        while self.items:
            body, payload = self.items[0]
            result = send(body, payload)
            if result == "full":
                return False
            self.items.popleft()
            self.size -= len(body) + len(payload or b"")
            if result == "gone":
                self.items.clear()
        return True


class ClientSink(Sink):
    """Streams one run's task events to its client, with backpressure.

    Output is read only while the run's account in the output budget has
    room (nrm/daemon/credits.py); past it the task's pipe stops being read
    until credits or other runs' ends free some. When the client's
    connection is full the chunk is queued and the pipe stops being read
    too, so the queue holds at most one chunk per stream and the exit.
    """

    def __init__(self, requester: Requester, resume: Callable[[Task], None],
                 gone: Callable[[Task], None], send_started: bool = True, window: int = 0):
        self.req = requester
        self.send_started = send_started
        self.queue: Deque[tuple] = deque()
        self.resume = resume
        self.gone = gone
        self.task: Optional[Task] = None
        self.dead = False
        self.budget = requester.upstream.budget
        self.account = self.budget.open(requester.peer.uid, window, self)

    def _send(self, msg, payload=None) -> bool:
        if self.dead:
            return True
        if self.queue:
            self.queue.append((msg, payload))
            return False
        result = self.req.stream(msg, payload)
        if result == "ok":
            return True
        if result == "full":
            self.queue.append((msg, payload))
            self.req.upstream.schedule_flush(self)
            return False
        self._lost()
        return True

    def _lost(self):
        self.dead = True
        if self.queue or self.account.charge:
            self.req.upstream.schedule_trim()
        self.queue.clear()
        self._close_account()
        if self.task is not None:
            self.gone(self.task)

    def _close_account(self) -> None:
        self.budget.close(self.account)
        if self.account.window:
            self.req.upstream.forget_run(self.req)

    # -- flow control (nrm/daemon/credits.py) -------------------------------
    def room(self, task: Task) -> int:
        if self.dead:
            return READ_CHUNK       # the task is being killed: drain, drop
        if self.queue:
            return 0                # flush() resumes the task
        return self.budget.room(self.account)

    def wake(self) -> None:
        task = self.task
        if task is not None and not task.finished and not self.dead and not self.queue:
            self.resume(task)

    def ask(self) -> None:
        task = self.task
        if task is not None and not self.dead:
            self._send(protocol.Output(task=task.id, stream="stdout", credit=True), b"")

    def credited(self, consumed: int) -> None:
        self.budget.credit(self.account, consumed)
        if self.account.finished and not self.account.charge:
            self._close_account()

    def flush(self) -> bool:
        """Send what is queued; True when the queue is empty."""
        while self.queue and not self.dead:
            msg, payload = self.queue[0]
            result = self.req.stream(msg, payload)
            if result == "full":
                return False
            self.queue.popleft()
            if result != "ok":
                self._lost()
        if self.task is not None and not self.task.finished:
            self.resume(self.task)
        return True

    def probe(self) -> bool:
        """Check a remote client is still connected; False once the sink
        no longer needs probing (client gone or task over)."""
        task = self.task
        if self.dead or task is None:
            return False
        if task.finished:
            if not lingering(self.account):
                return False
            if not self.queue:  # the client has not credited all: there still?
                self._send(protocol.Output(task=task.id, stream="stdout", credit=True), b"")
            return not self.dead
        if not self.queue:      # a queued chunk already tests the connection
            self._send(protocol.Output(task=task.id, stream="stdout"), b"")
        return not self.dead

    def started(self, task: Task) -> None:
        self.task = task
        if self.req.peer.pid == 0 and not task.detach:
            self.req.upstream.watch_remote(self)
        if self.account.window and not task.detach:
            self.req.upstream.register_run(self.req, self)
        if self.send_started:
            self._send(protocol.Started(container=task.container.id, task=task.id, pid=task.pid,
                                        cpus=list(task.container.slice.cpus),
                                        mems=list(task.container.slice.mems)))

    def output(self, task: Task, stream: str, data: bytes) -> bool:
        if self.dead:
            return True
        ask = self.budget.sent(self.account, len(data))
        return self._send(protocol.Output(task=task.id, stream=stream, credit=ask), data)

    def exited(self, task: Task, profile: Optional[dict]) -> None:
        s = task.container.slice
        self._send(protocol.Exit(task=task.id, container=task.container.id, code=task.code,
                                 signal=task.signal, status=task.status, profile=profile,
                                 pid=task.pid, cpus=list(s.cpus), mems=list(s.mems),
                                 started_at=task.started_at or None))
        if self.dead:
            return
        if self.budget.finish(self.account):
            # its client still owes credits: watched until they come or it goes
            self.req.upstream.watch_remote(self)
        elif self.account.window:
            self.req.upstream.forget_run(self.req)

    def failed(self, code: str, message: str) -> None:
        self._send(protocol.Error(code=code, message=message))
        self._close_account()


class Upstream:
    """Owns the client-facing sockets: the ROUTER for requests, the XPUB
    for events, the ZAP handler that gives each connection its verified
    user, and the per-peer bookkeeping (counters, live runs' sinks)."""

    def __init__(self, ctx: zmq.Context, loop, request_uri: str, events_uri: str,
                 dispatch: Callable[[Requester, object], None], socket_mode: int = 0o666,
                 tcp: Optional[curve.ServerConfig] = None):
        self.loop = loop
        self.dispatch = dispatch
        self.counters: Dict[str, int] = {"requests": 0, "request_errors": 0,
                                         "unauthenticated": 0}
        self.zap = ctx.socket(zmq.REP)
        self.zap.linger = 0
        self.zap.bind("inproc://zeromq.zap.01")
        self.router = ctx.socket(zmq.ROUTER)
        self.router.zap_domain = b"nrm"
        self.router.router_mandatory = 1
        self.router.sndhwm = CLIENT_SNDHWM
        self.router.rcvhwm = 10000
        self.router.maxmsgsize = protocol.MAX_REQUEST_BYTES + 4096
        self.router.linger = 200
        self.router.bind(request_uri)
        # XPUB, not PUB: it tells us which topics someone listens to, so an
        # event nobody wants is never encoded nor sent (4 per task)
        self.pub = ctx.socket(zmq.XPUB)
        self.pub.sndhwm = 10000
        self.pub.linger = 0
        self.pub.bind(events_uri)
        self._subscriptions: set = set()
        for uri in (request_uri, events_uri):
            if uri.startswith("ipc://"):
                os.chmod(uri[len("ipc://"):], socket_mode)
        self.endpoints = [request_uri, events_uri]
        self.tcp_users: Dict[bytes, curve.User] = {}
        self._monitors: list = []
        self._remote: Dict[ClientSink, None] = {}
        self._probe_timer = None
        if tcp is not None:
            self._bind_tcp(tcp)
        self._flushing: Deque[ClientSink] = deque()
        self._backlogs: Dict[bytes, _Backlog] = {}
        self.budget = OutputBudget(legacy_cap=CLIENT_QUEUE_BYTES)
        #: runs with a window, by (connection, request id): where credits go
        self._runs: Dict[tuple, ClientSink] = {}
        self._flush_timer = None
        self._trim_timer = None
        self.zap_reader = BatchReader(loop, self.zap, self._on_zap, batch=64)
        self.reader = BatchReader(loop, self.router, self._on_request, batch=256)
        self.sub_reader = BatchReader(loop, self.pub, self._on_subscription, batch=64,
                                      multipart=False, copy=True)

    # -- tcp ----------------------------------------------------------------
    def _bind_tcp(self, tcp: curve.ServerConfig) -> None:
        """Both sockets get a CURVE endpoint after their ipc one; a monitor
        on each reports handshakes that never reach ZAP (NULL or PLAIN
        clients fail on the mechanism mismatch)."""
        self.tcp_users = tcp.users
        for sock, uri, domain in ((self.router, tcp.request_uri, b"nrm"),
                                  (self.pub, tcp.events_uri, b"nrm-events")):
            curve.make_server(sock, tcp.keys, domain)
            if tcp.host.startswith("["):
                sock.ipv6 = True
            sock.bind(uri)
            self.endpoints.append(sock.getsockopt_string(zmq.LAST_ENDPOINT))
            mon = sock.get_monitor_socket(HANDSHAKE_FAILURES)
            self._monitors.append((mon, BatchReader(self.loop, mon, self._on_monitor, batch=64)))
        log.info("tcp endpoints %s (CURVE; keys for %s)", " ".join(self.endpoints[2:]),
                 ", ".join(curve.describe(tcp.users)))

    def _on_monitor(self, frames) -> None:
        try:
            event = parse_monitor_message([bytes(f) for f in frames])
        except Exception:
            return
        if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            return      # refused by _on_zap, which has already logged it
        self.counters["unauthenticated"] += 1
        endpoint = event["endpoint"].decode(errors="replace")
        if event["value"] == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            rl_log.warning("refused a connection on %s: handshake failed (wrong mechanism: "
                           "a client without CURVE keys?)", endpoint)
        elif event["event"] == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
            # the peer hung up first: a NULL client that saw the mismatch before
            # we did, or a real client exiting at once; not worth a warning
            rl_log.info("handshake not completed on %s (%s): the client hung up", endpoint,
                        zmq.strerror(event["value"]))
        else:
            rl_log.warning("refused a connection on %s: handshake failed (protocol error "
                           "%#x: a client with a wrong server key?)", endpoint, event["value"])

    def register_run(self, req: Requester, sink: ClientSink) -> None:
        self._runs[(req.identity, req.request_id)] = sink

    def forget_run(self, req: Requester) -> None:
        self._runs.pop((req.identity, req.request_id), None)

    def _credit(self, identity: bytes, msg: protocol.Credit) -> None:
        """Only the connection that started a run can credit it: the key
        is its ZeroMQ identity, which no other peer can take."""
        sink = self._runs.get((identity, msg.id))
        if sink is not None:
            sink.credited(msg.consumed)
        else:
            self.counters["stray_credits"] = self.counters.get("stray_credits", 0) + 1

    def watch_remote(self, sink: ClientSink) -> None:
        """Probe ``sink``'s connection every REMOTE_PROBE_S while it
        says so (a remote client's running task, a run owing credits)."""
        if sink in self._remote:
            return
        self._remote[sink] = None
        if self._probe_timer is None:
            self._probe_timer = self.loop.call_later(REMOTE_PROBE_S, self._probe_remote)

    def _probe_remote(self) -> None:
        self._probe_timer = None
        self._remote = {s: None for s in list(self._remote) if s.probe()}
        if self._remote:
            self._probe_timer = self.loop.call_later(REMOTE_PROBE_S, self._probe_remote)

    # -- identity ---------------------------------------------------------
    def _on_zap(self, frames) -> None:
        frames = [bytes(f) for f in frames]
        version, reqid, _domain, address, _identity, mechanism = frames[:6]
        addr = address.decode(errors="replace")
        user = None
        curve_key = frames[6] if mechanism == b"CURVE" and len(frames) > 6 else b""
        if len(curve_key) == 32:
            user = self.tcp_users.get(zmq.utils.z85.encode(curve_key))
        if mechanism == b"NULL" and addr.startswith("localhost:"):
            user_id = addr[len("localhost:"):].encode()
            reply = [version, reqid, b"200", b"OK", user_id, b""]
        elif user is not None:
            reply = [version, reqid, b"200", b"OK", f"{user.uid}:{user.gid}:0".encode(), b""]
            rl_log.info("tcp client %s authenticated as %s", addr, user.name)
        elif len(curve_key) == 32:
            self.counters["unauthenticated"] += 1
            rl_log.warning("refused CURVE client %s: key %s is not in the users file", addr,
                           zmq.utils.z85.encode(curve_key).decode())
            reply = [version, reqid, b"400", b"unknown key", b"", b""]
        else:
            self.counters["unauthenticated"] += 1
            rl_log.warning("refused connection from %s (%s): no verifiable identity",
                           addr, mechanism.decode(errors="replace"))
            reply = [version, reqid, b"400", b"no verifiable identity", b"", b""]
        self.zap.send_multipart(reply)

    # -- requests ---------------------------------------------------------
    def _on_request(self, frames) -> None:
        identity = frames[0].bytes
        self.counters["requests"] += 1
        peer = parse_peer(frames[1].get("User-Id")) if len(frames) > 1 else None
        if peer is None or len(frames) != 2:
            self.counters["request_errors"] += 1
            if peer is not None:
                self.reply(identity, protocol.Error(
                    code="malformed", message="a request is exactly one JSON frame"))
            return
        try:
            msg = protocol.decode_request(frames[1].bytes)
        except protocol.ProtocolError as exc:
            self.counters["request_errors"] += 1
            rl_log.info("bad request from uid %d: %s", peer.uid, exc)
            self.reply(identity, protocol.Error(code=exc.code, message=str(exc)))
            return
        if isinstance(msg, protocol.Credit):
            self._credit(identity, msg)
            return
        self.dispatch(Requester(self, identity, peer, msg.id), msg)

    def send(self, identity: bytes, msg, payload: Optional[bytes] = None) -> str:
        """"ok", "full" (peer at its high-water mark) or "gone"."""
        return self._send(identity, protocol.encode(msg), payload)

    def reply(self, identity: bytes, msg, payload: Optional[bytes] = None) -> str:
        """Like ``send``, but a reply to a full client waits in its backlog
        (``CLIENT_QUEUE_BYTES`` at most; a client that asks for more without
        reading loses the excess, counted) and goes out as it reads."""
        body = protocol.encode(msg)
        backlog = self._backlogs.get(identity)
        if backlog is None:
            result = self._send(identity, body, payload)
            if result != "full":
                return result
            backlog = self._backlogs[identity] = _Backlog()
        if not backlog.add(body, payload):
            self.counters["replies_dropped"] = self.counters.get("replies_dropped", 0) + 1
            rl_log.warning("a client asked for more than %d bytes of replies without reading: "
                           "reply dropped", CLIENT_QUEUE_BYTES)
            return "gone"
        if self._flush_timer is None:
            self._flush_timer = self.loop.call_later(FLUSH_INTERVAL_S, self._flush)
        return "queued"

    def _send(self, identity: bytes, body: bytes, payload: Optional[bytes]) -> str:
        frames = [identity, body]
        if payload is not None:
            frames.append(payload)
        try:
            send_frames(self.router, frames, copy=len(payload or b"") < 65536)
            result = "ok"
        except zmq.Again:
            result = "full"
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                log.warning("send to client failed: %s", exc)
            result = "gone"
        self.reader.sent()      # the send may have consumed the input edge
        return result

    def schedule_flush(self, sink: ClientSink) -> None:
        if sink not in self._flushing:
            self._flushing.append(sink)
        if self._flush_timer is None:
            self._flush_timer = self.loop.call_later(FLUSH_INTERVAL_S, self._flush)

    def _flush(self) -> None:
        self._flush_timer = None
        for identity in list(self._backlogs):
            backlog = self._backlogs[identity]
            if backlog.flush(lambda body, payload: self._send(identity, body, payload)):
                del self._backlogs[identity]
        still: Deque[ClientSink] = deque()
        while self._flushing:
            sink = self._flushing.popleft()
            if not sink.flush():
                still.append(sink)
        self._flushing = still
        if still or self._backlogs:
            self._flush_timer = self.loop.call_later(FLUSH_INTERVAL_S, self._flush)
        else:
            self.schedule_trim()

    def schedule_trim(self) -> None:
        """Give back memory once a backed-up client drained or went: glibc
        keeps freed chunks in its arenas (libzmq's included) otherwise."""
        if self._trim_timer is None:
            self._trim_timer = self.loop.call_later(TRIM_DELAY_S, self._trim)

    def _trim(self) -> None:
        self._trim_timer = None
        if _malloc_trim is not None:
            _malloc_trim(0)

    # -- events -----------------------------------------------------------
    def _on_subscription(self, frame: bytes) -> None:
        """XPUB hands over a topic's first subscription and its last
        unsubscription (a listener that disconnects unsubscribes)."""
        if not frame or frame[0] not in (0, 1):
            return
        topic = frame[1:]
        if frame[0]:
            self._subscriptions.add(topic)
        else:
            self._subscriptions.discard(topic)

    @property
    def subscriptions(self) -> list:
        """Topic prefixes someone listens to ("" for everything)."""
        return sorted(t.decode(errors="replace") for t in self._subscriptions)

    def wanted(self, topic: str) -> bool:
        """Whether any listener subscribed to a prefix of ``topic``."""
        if not self._subscriptions:
            return False
        t = topic.encode()
        return any(t.startswith(p) for p in self._subscriptions)

    def publish(self, topic: str, body: dict) -> None:
        if not self.wanted(topic):
            return
        body.setdefault("time", time.time())
        try:
            send_frames(self.pub, protocol.encode_event(topic, body))
        except zmq.ZMQError:
            pass
        self.sub_reader.sent()      # the send may have consumed the input edge

    def close(self) -> None:
        self.reader.close()
        self.zap_reader.close()
        self.sub_reader.close()
        if self._flush_timer is not None:
            self._flush_timer.cancel()
        if self._trim_timer is not None:
            self._trim_timer.cancel()
        if self._probe_timer is not None:
            self._probe_timer.cancel()
        for sock, (mon, reader) in zip((self.router, self.pub), self._monitors):
            reader.close()
            sock.disable_monitor()
            mon.close(linger=0)
        for sink in list(self._flushing):
            sink.flush()
        self.router.close()
        self.pub.close()
        self.zap.close()
