"""Upstream endpoints: ROUTER for requests, PUB for events, ZAP for identity.

Every ipc connection passes through our ZAP handler, which receives the
peer's kernel credentials (``localhost:<uid>:<gid>:<pid>``, SO_PEERCRED) and
stamps them as the connection's User-Id; each request is therefore
attributed to a kernel-verified user without passwords. Anything else
(tcp without keys) is refused at the handshake.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from typing import Callable, Deque, Dict, Optional

import zmq

from nrm import protocol
from nrm.containers import Peer, Sink, Task
from nrm.daemon.zmqloop import BatchReader
from nrm.log import RateLimitedLog

log = logging.getLogger(__name__)
rl_log = RateLimitedLog(log)

FLUSH_INTERVAL_S = 0.002


def parse_peer(user_id: Optional[str]) -> Optional[Peer]:
    """User-Id as stamped by our ZAP handler: "uid:gid:pid"."""
    if not user_id:
        return None
    try:
        uid, gid, pid = (int(x) for x in user_id.split(":"))
    except ValueError:
        return None
    return Peer(uid=uid, gid=gid, pid=pid)


class Requester:
    """One request's origin: where its replies go."""

    __slots__ = ("upstream", "identity", "peer", "request_id")

    def __init__(self, upstream: "Upstream", identity: bytes, peer: Peer, request_id: int):
        self.upstream = upstream
        self.identity = identity
        self.peer = peer
        self.request_id = request_id

    def reply(self, msg, payload: Optional[bytes] = None) -> str:
        msg.id = self.request_id
        return self.upstream.send(self.identity, msg, payload)


class ClientSink(Sink):
    """Streams one run's task events to its client, with backpressure.

    When the client is full the chunk is queued and the task's pipe stops
    being read, so the queue holds at most one chunk per stream and the exit.
    """

    def __init__(self, requester: Requester, resume: Callable[[Task], None],
                 gone: Callable[[Task], None]):
        self.req = requester
        self.queue: Deque[tuple] = deque()
        self.resume = resume
        self.gone = gone
        self.task: Optional[Task] = None
        self.dead = False

    def _send(self, msg, payload=None) -> bool:
        if self.dead:
            return True
        if self.queue:
            self.queue.append((msg, payload))
            return False
        result = self.req.reply(msg, payload)
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
        self.queue.clear()
        if self.task is not None:
            self.gone(self.task)

    def flush(self) -> bool:
        """Send what is queued; True when the queue is empty."""
        while self.queue and not self.dead:
            msg, payload = self.queue[0]
            result = self.req.reply(msg, payload)
            if result == "full":
                return False
            self.queue.popleft()
            if result != "ok":
                self._lost()
        if self.task is not None and not self.task.finished:
            self.resume(self.task)
        return True

    def started(self, task: Task) -> None:
        self.task = task
        self._send(protocol.Started(container=task.container.id, task=task.id, pid=task.pid,
                                    cpus=list(task.container.slice.cpus),
                                    mems=list(task.container.slice.mems)))

    def output(self, task: Task, stream: str, data: bytes) -> bool:
        return self._send(protocol.Output(task=task.id, stream=stream), data)

    def exited(self, task: Task, profile: Optional[dict]) -> None:
        self._send(protocol.Exit(task=task.id, container=task.container.id, code=task.code,
                                 signal=task.signal, status=task.status, profile=profile))

    def failed(self, code: str, message: str) -> None:
        self._send(protocol.Error(code=code, message=message))


class Upstream:
    def __init__(self, ctx: zmq.Context, loop, request_uri: str, events_uri: str,
                 dispatch: Callable[[Requester, object], None], socket_mode: int = 0o666):
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
        self.router.sndhwm = 10000
        self.router.rcvhwm = 10000
        self.router.maxmsgsize = protocol.MAX_REQUEST_BYTES + 4096
        self.router.linger = 200
        self.router.bind(request_uri)
        self.pub = ctx.socket(zmq.PUB)
        self.pub.sndhwm = 10000
        self.pub.linger = 0
        self.pub.bind(events_uri)
        for uri in (request_uri, events_uri):
            if uri.startswith("ipc://"):
                os.chmod(uri[len("ipc://"):], socket_mode)
        self._flushing: Deque[ClientSink] = deque()
        self._flush_timer = None
        self.zap_reader = BatchReader(loop, self.zap, self._on_zap, batch=64)
        self.reader = BatchReader(loop, self.router, self._on_request, batch=256)

    # -- identity ---------------------------------------------------------
    def _on_zap(self, frames) -> None:
        frames = [bytes(f) for f in frames]
        version, reqid, _domain, address, _identity, mechanism = frames[:6]
        addr = address.decode(errors="replace")
        if mechanism == b"NULL" and addr.startswith("localhost:"):
            user_id = addr[len("localhost:"):].encode()
            reply = [version, reqid, b"200", b"OK", user_id, b""]
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
                self.send(identity, protocol.Error(
                    code="malformed", message="a request is exactly one JSON frame"))
            return
        try:
            msg = protocol.decode_request(frames[1].bytes)
        except protocol.ProtocolError as exc:
            self.counters["request_errors"] += 1
            rl_log.info("bad request from uid %d: %s", peer.uid, exc)
            self.send(identity, protocol.Error(code=exc.code, message=str(exc)))
            return
        self.dispatch(Requester(self, identity, peer, msg.id), msg)

    def send(self, identity: bytes, msg, payload: Optional[bytes] = None) -> str:
        """"ok", "full" (peer at its high-water mark) or "gone"."""
        frames = [identity, protocol.encode(msg)]
        if payload is not None:
            frames.append(payload)
        try:
            self.router.send_multipart(frames, zmq.NOBLOCK, copy=len(payload or b"") < 65536)
            result = "ok"
        except zmq.Again:
            result = "full"
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                log.warning("send to client failed: %s", exc)
            result = "gone"
        if self.router.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            self.reader.kick()
        return result

    def schedule_flush(self, sink: ClientSink) -> None:
        if sink not in self._flushing:
            self._flushing.append(sink)
        if self._flush_timer is None:
            self._flush_timer = self.loop.call_later(FLUSH_INTERVAL_S, self._flush)

    def _flush(self) -> None:
        self._flush_timer = None
        still: Deque[ClientSink] = deque()
        while self._flushing:
            sink = self._flushing.popleft()
            if not sink.flush():
                still.append(sink)
        self._flushing = still
        if still:
            self._flush_timer = self.loop.call_later(FLUSH_INTERVAL_S, self._flush)

    # -- events -----------------------------------------------------------
    def publish(self, topic: str, body: dict) -> None:
        body.setdefault("time", time.time())
        try:
            self.pub.send_multipart(protocol.encode_event(topic, body), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def close(self) -> None:
        self.reader.close()
        self.zap_reader.close()
        if self._flush_timer is not None:
            self._flush_timer.cancel()
        for sink in list(self._flushing):
            sink.flush()
        self.router.close()
        self.pub.close()
        self.zap.close()
