"""The pilot's API over TCP (``nrm pilot --net``): CurveZMQ, authorized keys only.

QCG-PilotJob's ``--net`` serves its API on a plain ZeroMQ TCP socket: anyone
who reaches the port runs commands as the pilot's user. Here the same
requests (:mod:`nrm.pilot.service`, QCG's envelope, ``nrmWait``) travel over
CurveZMQ: the pilot makes a keypair for itself and one client keypair for
its owner in ``AUX/net/`` (0700, secrets 0600), and its ZAP handler accepts
only that client key and the keys the owner listed (``--net-keys``, nrmd's
users-file format, the owner's own account only). A connection with any
other key fails its handshake before a request is read; nothing listens
unauthenticated.

Framing: one request per message, the last frame; every frame before it is
echoed back unchanged with the answer. So a QCG-style REQ socket works, and
:class:`NetClient` (a DEALER) adds a sequence frame to discard the answer of
a request it gave up on.

Files: ``AUX/address`` (0600, QCG's name) holds ``tcp://HOST:PORT``;
``AUX/net/server.key.pub`` is what a client checks the pilot with;
``AUX/net/client.key`` is the owner's key. A client finds them through
``cfg={"nrm_keys": DIR}``, ``$NRM_PILOT_KEYS`` (the aux dir or its ``net``),
or ``cfg={"server_key": FILE, "client_key": FILE}`` (docs/pilot.md).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from typing import Any, Awaitable, Callable, Dict, Iterable, Optional, Set, Tuple

import zmq
import zmq.auth.thread
from zmq.utils.monitor import recv_monitor_message

from nrm.log import RateLimitedLog
from nrm.transport import curve
from nrm.transport.zmqloop import BatchReader, send_frames

log = logging.getLogger("nrm.pilot")
rl_log = RateLimitedLog(log, 10.0)          # a client retrying a bad key must not flood

ZAP_DOMAIN = "nrm-pilot-api"
KEYS_DIR = "net"
ADDRESS_FILE = "address"
SERVER_KEY = "server.key"
CLIENT_KEY = "client.key"
ENV_KEYS = "NRM_PILOT_KEYS"
#: QCG's range for a port chosen at random (--net-port-min/--net-port-max)
PORT_MIN, PORT_MAX = 2222, 9999
MAX_MESSAGE = 64 << 20                      # as the Unix socket's longest line
CONNECT_TIMEOUT = 10.0


class NetError(Exception):
    """The TCP API cannot be set up or reached; the message is one line."""


# ------------------------------------------------------------------ server ---

class _Authorized:
    """ZAP credentials check: the keys the owner authorized, nothing else."""

    def __init__(self, keys: Set[bytes]):
        self.keys = keys                    # Z85, as the authenticator hands them over

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.keys:
            return True
        rl_log.warning("API (tcp): refused a client key not authorized (%s...)",
                       key[:8].decode(errors="replace"))
        return False


def make_keys(aux: str) -> str:
    """The pilot's server and owner-client keypairs in ``AUX/net`` (0700)."""
    directory = os.path.join(aux, KEYS_DIR)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    os.chmod(directory, 0o700)
    for name in (SERVER_KEY, CLIENT_KEY):
        curve.write_keypair(os.path.join(directory, name), force=True)
    return directory


def port_range(port: Optional[int], port_min: Optional[int],
               port_max: Optional[int]) -> Tuple[int, int]:
    """QCG's port options -> (first, last) port to try; raises NetError."""
    lo = PORT_MIN if port_min is None else port_min
    hi = PORT_MAX if port_max is None else port_max
    if port is not None:
        lo = hi = port
    for name, value in (("--net-port", lo), ("--net-port-max", hi)):
        if not 1 <= value <= 65535:
            raise NetError(f"{name} {value}: a port is 1-65535")
    if lo > hi:
        raise NetError(f"--net-port-min {lo} is above --net-port-max {hi}")
    return lo, hi


class NetServer:
    """The API's ROUTER on TCP: CURVE server, its own ZAP authenticator (own
    context: one authenticator per context), answers from ``answer``."""

    def __init__(self, answer: Callable[[bytes], Awaitable[Dict[str, Any]]], aux: str,
                 host: str = "*", ports: Tuple[int, int] = (PORT_MIN, PORT_MAX),
                 extra_keys: Iterable[bytes] = ()):
        self.answer = answer
        self.aux = aux
        self.host = host
        self.ports = ports
        self.keys_dir = make_keys(aux)
        self.extra_keys = set(extra_keys)
        self.address_file = os.path.join(aux, ADDRESS_FILE)
        self.uri = ""
        self.ctx: Optional[zmq.Context] = None
        self.auth = None
        self.sock: Optional[zmq.Socket] = None
        self.reader: Optional[BatchReader] = None
        self._tasks: Set[asyncio.Future] = set()

    def start(self) -> str:
        keys = curve.load_keypair(os.path.join(self.keys_dir, SERVER_KEY))
        client = curve.load_public_key(os.path.join(self.keys_dir, CLIENT_KEY + ".pub"))
        self.ctx = zmq.Context()
        self.auth = zmq.auth.thread.ThreadAuthenticator(self.ctx)
        self.auth.start()
        self.auth.configure_curve_callback(
            ZAP_DOMAIN, credentials_provider=_Authorized({client} | self.extra_keys))
        sock = self.ctx.socket(zmq.ROUTER)
        sock.router_mandatory = True
        sock.linger = 0
        sock.maxmsgsize = MAX_MESSAGE
        curve.make_server(sock, keys, ZAP_DOMAIN.encode())
        if ":" in self.host:
            sock.ipv6 = True
        self.sock = sock
        bind = f"tcp://{_bracket(self.host)}"
        lo, hi = self.ports
        try:
            if lo == hi:
                sock.bind(f"{bind}:{lo}")
                port = lo
            else:
                port = sock.bind_to_random_port(bind, lo, hi + 1, max_tries=4 * (hi - lo + 1))
        except zmq.ZMQBindError:
            self.close()
            raise NetError(f"no free port in {lo}-{hi} on {self.host}") from None
        except zmq.ZMQError as exc:
            self.close()
            raise NetError(f"cannot listen on {self.host}:{lo}: {exc}") from None
        shown = socket.gethostname() if self.host in ("*", "0.0.0.0", "::") else self.host
        self.uri = curve.tcp_uri(_bracket(shown), port)
        _write_private(self.address_file, self.uri + "\n")
        self.reader = BatchReader(asyncio.get_running_loop(), sock, self._on, batch=64,
                                  copy=True)
        log.info("API (tcp): serving on %s, keys in %s", self.uri, self.keys_dir)
        return self.uri

    def _on(self, frames) -> None:
        if len(frames) < 2:                 # no envelope: no one to answer
            rl_log.warning("API (tcp): dropped a message of %d frame(s)", len(frames))
            return
        task = asyncio.ensure_future(self._serve(frames[:-1], frames[-1]))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, envelope: list, payload: bytes) -> None:
        try:
            response = await self.answer(payload)
        except asyncio.CancelledError:
            return
        except Exception as exc:            # never the pilot's end: the client gets a line
            rl_log.error("API (tcp): request failed", exc_info=True)
            response = {"code": 1, "message": f"internal error: {type(exc).__name__}",
                        "data": {}}
        if self.sock is None:
            return
        try:
            send_frames(self.sock, envelope + [json.dumps(response).encode()])
        except zmq.ZMQError:                # the client left before its answer
            return
        self.reader.sent()

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        if self.sock is not None:
            self.sock.close(linger=1000)    # the last answer (finish's) still leaves
            self.sock = None
        if self.auth is not None:
            self.auth.stop()
            self.auth = None
        if self.ctx is not None:
            self.ctx.term()
            self.ctx = None
        try:
            os.unlink(self.address_file)    # a finished pilot has no address
        except OSError:
            pass


def _write_private(path: str, body: str) -> None:
    """``path`` readable by its owner only, replaced atomically (a client
    that sees the file finds a whole address that accepts)."""
    tmp = path + ".new"
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(body)
    os.rename(tmp, path)


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


# ------------------------------------------------------------------ client ---

def find_keys(cfg: Dict[str, Any], near: Optional[str] = None) -> curve.ClientConfig:
    """The client's keys: ``cfg["server_key"]`` + ``cfg["client_key"]`` files,
    else a key directory from ``cfg["nrm_keys"]``, ``$NRM_PILOT_KEYS`` or
    ``near`` (an aux dir, or its ``net``). Raises NetError."""
    try:
        if cfg.get("server_key") or cfg.get("client_key"):
            if not (cfg.get("server_key") and cfg.get("client_key")):
                raise NetError("cfg: give both server_key (the pilot's server.key.pub) "
                               "and client_key (a keypair file it authorized)")
            return curve.ClientConfig(uri="", server_public=curve.load_public_key(
                cfg["server_key"]), keys=curve.load_keypair(cfg["client_key"]))
        directory = cfg.get("nrm_keys") or os.environ.get(ENV_KEYS) or near
        if not directory:
            raise NetError(f"a tcp address needs the pilot's keys: cfg {{'nrm_keys': "
                           f"AUXDIR}} or ${ENV_KEYS} (docs/pilot.md)")
        if os.path.isdir(os.path.join(directory, KEYS_DIR)):
            directory = os.path.join(directory, KEYS_DIR)
        return curve.ClientConfig(uri="", server_public=curve.load_public_key(
            os.path.join(directory, SERVER_KEY + ".pub")),
            keys=curve.load_keypair(os.path.join(directory, CLIENT_KEY)))
    except curve.CurveError as exc:
        raise NetError(str(exc)) from None


def read_address(aux: str) -> str:
    path = os.path.join(aux, ADDRESS_FILE)
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError as exc:
        raise NetError(f"{path}: {exc.strerror} (is the pilot running with --net?)") from None


_HANDSHAKE = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "refused our key (not authorized by the pilot's owner)",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "failed the CURVE handshake (wrong server key?)",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "failed the CURVE handshake (wrong server key?)",
}


class NetClient:
    """One blocking connection to a ``--net`` pilot (what nrm.pilot.qcg's
    Manager uses for tcp addresses). A lost connection or a refused key is
    a NetError, never a wait without end."""

    def __init__(self, uri: str, config: curve.ClientConfig,
                 connect_timeout: float = CONNECT_TIMEOUT):
        self.uri = uri
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self._seq = 0
        curve.make_client(self.sock, curve.ClientConfig(
            uri=uri, server_public=config.server_public, keys=config.keys))
        self.monitor = self.sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
            | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        try:
            self.sock.connect(uri)
            self._handshake(connect_timeout)
        except zmq.ZMQError as exc:
            self.close()
            raise NetError(f"pilot at {uri}: {exc}") from None
        except NetError:
            self.close()
            raise

    def _handshake(self, timeout: float) -> None:
        if not self.monitor.poll(timeout * 1000):
            raise NetError(f"pilot at {self.uri}: no CURVE handshake in {timeout:g} s "
                           "(not listening there, or unreachable)")
        event = recv_monitor_message(self.monitor)["event"]
        if event in _HANDSHAKE:
            raise NetError(f"pilot at {self.uri} {_HANDSHAKE[event]}")
        if event != zmq.EVENT_HANDSHAKE_SUCCEEDED:
            raise NetError(f"pilot at {self.uri}: connection lost during the handshake")

    def request(self, payload: bytes) -> bytes:
        """Sends one request, returns its answer; NetError when the
        connection is lost meanwhile (the request may have been served)."""
        self._seq += 1
        seq = str(self._seq).encode()
        self.sock.send_multipart([b"", seq, payload])
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.monitor, zmq.POLLIN)
        while True:
            ready = dict(poller.poll())
            if self.sock in ready:
                frames = self.sock.recv_multipart()
                if len(frames) == 3 and frames[1] == seq:
                    return frames[2]
                continue                        # the answer to an abandoned request
            event = recv_monitor_message(self.monitor)["event"]
            if event == zmq.EVENT_DISCONNECTED or event in _HANDSHAKE:
                raise NetError(f"pilot at {self.uri}: connection lost")

    def close(self) -> None:
        try:
            self.sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self.monitor.close(linger=0)
        self.sock.close(linger=0)
