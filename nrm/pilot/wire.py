"""The channel between the pilot's manager and its node agents.

CurveZMQ over TCP: the manager is the CURVE server with a keypair made for
this pilot alone, and its ZAP handler accepts exactly one client key, the
agents' (also made for this pilot). Both keypairs are written 0600 in the
pilot's directory, which the agents read over the shared filesystem; a
process that cannot read them cannot talk to the manager, and nothing
listens unauthenticated. Messages are one JSON object per ZMQ message
(the ROUTER side adds the agent's identity frame, its node name).

Agent -> manager: ``hello`` (node, cpus), ``events`` (``[["s", id, pid]``
started, ``["x", id, code, message]`` ended, ...), ``hb`` (alive),
``lost`` (its nrmd stopped answering). Manager -> agent: ``welcome``
(the environment tasks inherit), ``launch`` (a batch of tasks), ``kill``
(ids), ``stop``.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Callable, Optional, Tuple

import zmq
import zmq.auth.thread

from nrm.transport import curve
from nrm.transport.zmqloop import BatchReader, send_frames

ZAP_DOMAIN = "nrm-pilot"


def make_keys(directory: str) -> Tuple[str, str]:
    """This pilot's two keypair files under ``directory`` (made 0700):
    ``manager.key`` and ``agent.key``, each with its ``.pub``."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    os.chmod(directory, 0o700)
    paths = (os.path.join(directory, "manager.key"), os.path.join(directory, "agent.key"))
    for path in paths:
        curve.write_keypair(path, force=True)
    return paths


class _OneKey:
    """ZAP credentials check: the agents' public key, nothing else."""

    def __init__(self, public: bytes):
        self.public = public             # Z85, as the authenticator hands keys over

    def callback(self, domain: str, key: bytes) -> bool:
        return key == self.public


class ManagerEndpoint:
    """The manager's ROUTER: bound on ``host``, CURVE, one accepted key."""

    def __init__(self, host: str, manager_key: str, agent_key: str,
                 handle: Callable[[str, dict], None]):
        self.ctx = zmq.Context.instance()
        keys = curve.load_keypair(manager_key)
        self.auth = zmq.auth.thread.ThreadAuthenticator(self.ctx)
        self.auth.start()
        self.auth.configure_curve_callback(
            ZAP_DOMAIN, credentials_provider=_OneKey(curve.load_public_key(agent_key + ".pub")))
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.router_mandatory = True
        self.sock.linger = 0
        curve.make_server(self.sock, keys, ZAP_DOMAIN.encode())
        if ":" in host:
            self.sock.ipv6 = True
        port = self.sock.bind_to_random_port(f"tcp://{_bracket(host)}")
        self.uri = curve.tcp_uri(host, port)
        self.handle = handle
        self.reader: Optional[BatchReader] = None

    def start(self) -> None:
        self.reader = BatchReader(asyncio.get_running_loop(), self.sock, self._on, batch=256,
                                  copy=True)

    def _on(self, frames) -> None:
        if len(frames) != 2:
            return
        try:
            msg = json.loads(frames[1])
        except ValueError:
            return
        if isinstance(msg, dict):
            self.handle(frames[0].decode(errors="replace"), msg)

    def send(self, node: str, msg: dict) -> bool:
        try:
            send_frames(self.sock, [node.encode(), json.dumps(msg).encode()])
        except zmq.ZMQError:           # the agent is gone (router_mandatory)
            return False
        if self.reader is not None:
            self.reader.sent()
        return True

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
        self.sock.close(linger=0)
        self.auth.stop()


class AgentEndpoint:
    """An agent's DEALER to the manager, identity = its node name."""

    def __init__(self, uri: str, node: str, manager_pub: str, agent_key: str,
                 handle: Callable[[dict], None]):
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.identity = node.encode()
        self.sock.linger = 1000
        curve.make_client(self.sock, curve.ClientConfig(
            uri=uri, server_public=curve.load_public_key(manager_pub),
            keys=curve.load_keypair(agent_key)))
        self.sock.connect(uri)
        self.handle = handle
        self.reader: Optional[BatchReader] = None

    def start(self) -> None:
        self.reader = BatchReader(asyncio.get_running_loop(), self.sock, self._on, batch=256,
                                  multipart=False, copy=True)

    def _on(self, frame) -> None:
        try:
            msg = json.loads(frame)
        except ValueError:
            return
        if isinstance(msg, dict):
            self.handle(msg)

    def send(self, msg: dict) -> None:
        self.sock.send(json.dumps(msg).encode(), zmq.NOBLOCK)
        if self.reader is not None:
            self.reader.sent()

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
        self.sock.close()


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
