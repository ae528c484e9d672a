"""CurveZMQ keys for nrm's TCP endpoints: files, their checks, socket settings.

TCP has no kernel-verified peer credentials, so a remote request is only
attributable through a key the admin has mapped to a local Unix user. This
module is the one place that reads and writes those key files, so the daemon
and every client apply the same rules: a file that is ill-formed, a secret
key that others could read, a public key that does not match its secret, or
a users file naming an unknown account is refused before any socket opens.

File formats (``#`` starts a comment line; Z85 keys are 40 characters and
may themselves contain ``#`` or ``=``, so there are no trailing comments):

* keypair file (``nrm keygen FILE``; mode 0600)::

      public-key = <Z85>
      secret-key = <Z85>

* public key file (``FILE.pub``; what is handed to the other side): the
  same with only the ``public-key`` line;
* users file (``nrmd --curve-users``): one ``USER PUBLIC-KEY`` per line,
  USER being a local account name; a user may have several keys, a key
  belongs to one user.
"""

from __future__ import annotations

import os
import pwd
import stat
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import zmq

Z85_ALPHABET = frozenset(
    "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#")
KEY_LEN = 40
#: ZMTP heartbeats on TCP connections: a peer host that vanished without a
#: FIN (crash, partition) is dropped after the timeout, on both sides.
HEARTBEAT_IVL_MS = 5000
HEARTBEAT_TIMEOUT_MS = 15000
DEFAULT_HOST = "127.0.0.1"

ENV_URI = "NRM_URI"
ENV_SERVER_KEY = "NRM_CURVE_SERVER_KEY"
ENV_KEY = "NRM_CURVE_KEY"


class CurveError(Exception):
    """A key file or TCP setting nrm refuses; the message is one line."""


@dataclass(frozen=True)
class Keypair:
    public: bytes     # Z85, 40 bytes
    secret: bytes


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int


@dataclass
class ServerConfig:
    """What nrmd needs to open its TCP endpoints."""
    host: str
    port: int
    keys: Keypair
    users: Dict[bytes, User] = field(default_factory=dict)

    @property
    def request_uri(self) -> str:
        return tcp_uri(self.host, self.port)

    @property
    def events_uri(self) -> str:
        return tcp_uri(self.host, self.port + 1)


@dataclass(frozen=True)
class ClientConfig:
    """What a client needs to reach nrmd over TCP."""
    uri: str
    server_public: bytes
    keys: Keypair

    @property
    def events_uri(self) -> str:
        return events_uri_for(self.uri)


# -- keys -----------------------------------------------------------------
def valid_key(text: str) -> bool:
    return len(text) == KEY_LEN and all(c in Z85_ALPHABET for c in text)


def _config_lines(path: str, what: str, limit: int) -> Tuple[List[Tuple[int, str]], int]:
    """The numbered lines of a small ASCII file, blanks and comments left
    out, and its permission bits. The checks are made on the open fd, so
    a path swapped after them is not read, and a FIFO (which would hang
    nrmd's start) is refused."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise CurveError(f"{path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CurveError(f"{path}: not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            raw = f.read(limit)
    finally:
        os.close(fd)
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise CurveError(f"{path}: not a {what} (non-ASCII content)") from None
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)]
    return [(n, line) for n, line in lines if line and not line.startswith("#")], \
        stat.S_IMODE(st.st_mode)


def _read_fields(path: str) -> Tuple[Dict[str, str], int]:
    """The file's key lines, and its permission bits."""
    lines, mode = _config_lines(path, "key file", 65536)
    out: Dict[str, str] = {}
    for n, line in lines:
        name, sep, value = line.partition("=")
        name, value = name.strip(), value.strip().strip('"')
        if not sep or name not in ("public-key", "secret-key"):
            raise CurveError(f"{path}:{n}: expected 'public-key = KEY' or 'secret-key = KEY'")
        if not valid_key(value):
            raise CurveError(f"{path}:{n}: {name} is not a 40-character Z85 key")
        out[name] = value
    return out, mode


def load_keypair(path: str) -> Keypair:
    """A keypair file: both keys, matching, readable by its owner only."""
    fields, mode = _read_fields(path)
    if "secret-key" not in fields:
        raise CurveError(f"{path}: no secret-key line (is this a public key file?)")
    if mode & 0o077:
        raise CurveError(f"{path}: holds a secret key but has mode {mode:04o}; "
                         f"run chmod 600 {path}")
    secret = fields["secret-key"].encode()
    try:
        public = zmq.curve_public(secret)
    except zmq.ZMQError as exc:
        raise CurveError(f"{path}: unusable secret key: {exc}") from None
    if "public-key" in fields and fields["public-key"].encode() != public:
        raise CurveError(f"{path}: public-key does not match secret-key")
    return Keypair(public=public, secret=secret)


def load_public_key(path: str) -> bytes:
    fields, _ = _read_fields(path)
    if "public-key" not in fields:
        raise CurveError(f"{path}: no public-key line")
    return fields["public-key"].encode()


def write_keypair(path: str, force: bool = False) -> Keypair:
    """A new keypair in ``path`` (0600, created so, never chmod-ed after)
    and its public half in ``path.pub`` (0644)."""
    public, secret = zmq.curve_keypair()
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_EXCL
    if force:
        try:
            os.unlink(path)     # a pre-existing file may have looser permissions
        except FileNotFoundError:
            pass
    body = ("# nrm CurveZMQ keypair, written by `nrm keygen`: keep it secret (mode 0600)\n"
            f"public-key = {public.decode()}\nsecret-key = {secret.decode()}\n")
    _write(path, flags, 0o600, body)
    _write(path + ".pub", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644,
           "# nrm CurveZMQ public key, written by `nrm keygen`\n"
           f"public-key = {public.decode()}\n")
    return Keypair(public=public, secret=secret)


def _write(path: str, flags: int, mode: int, body: str) -> None:
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError:
        raise CurveError(f"{path}: already exists (--force replaces it)") from None
    except OSError as exc:
        raise CurveError(f"{path}: {exc.strerror}") from None
    with os.fdopen(fd, "w") as f:
        f.write(body)


# -- users ----------------------------------------------------------------
def load_users(path: str) -> Dict[bytes, User]:
    """Authorized client keys -> local users, resolved once, at start.

    The file decides who may act as whom, so it must not be writable by
    anyone but its owner."""
    lines, mode = _config_lines(path, "users file", 1 << 20)
    if mode & 0o022:
        raise CurveError(f"{path}: writable by group or others (mode {mode:04o}); "
                         f"run chmod go-w {path}")
    users: Dict[bytes, User] = {}
    for n, line in lines:
        parts = line.split()
        if len(parts) != 2:
            raise CurveError(f"{path}:{n}: expected 'USER PUBLIC-KEY'")
        name, key = parts
        if not valid_key(key):
            raise CurveError(f"{path}:{n}: {key!r} is not a 40-character Z85 public key")
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            raise CurveError(f"{path}:{n}: no local user {name!r}") from None
        if key.encode() in users:
            raise CurveError(f"{path}:{n}: key already given to user "
                             f"{users[key.encode()].name!r}")
        users[key.encode()] = User(name=name, uid=pw.pw_uid, gid=pw.pw_gid)
    if not users:
        raise CurveError(f"{path}: no authorized keys")
    return users


# -- endpoints ------------------------------------------------------------
def tcp_uri(host: str, port: int) -> str:
    return f"tcp://{host}:{port}"


def parse_listen(spec: str) -> Tuple[str, int]:
    """``[HOST:]PORT`` -> (host, port); the events endpoint takes PORT+1."""
    host, sep, port_s = spec.rpartition(":")
    if not sep:
        host = DEFAULT_HOST
    if not host:
        raise CurveError(f"--tcp {spec!r}: empty host")
    try:
        port = int(port_s)
    except ValueError:
        raise CurveError(f"--tcp {spec!r}: expected [HOST:]PORT") from None
    if not 1 <= port <= 65534:
        raise CurveError(f"--tcp {spec!r}: PORT must be 1-65534 (events use PORT+1)")
    return host, port


def events_uri_for(uri: str) -> str:
    host, _, port = uri[len("tcp://"):].rpartition(":")
    return tcp_uri(host, int(port) + 1)


def server_config(listen: str, secret_key: Optional[str], users: Optional[str]) -> ServerConfig:
    host, port = parse_listen(listen)
    if not secret_key:
        raise CurveError("--tcp needs --curve-secret-key FILE (create one with nrm keygen)")
    if not users:
        raise CurveError("--tcp needs --curve-users FILE (USER PUBLIC-KEY per line)")
    config = ServerConfig(host=host, port=port, keys=load_keypair(secret_key),
                          users=load_users(users))
    if os.geteuid() != 0:
        own = os.geteuid()
        others = sorted({u.name for u in config.users.values() if u.uid != own})
        if others:
            raise CurveError(f"{users}: a non-root nrmd runs every task as itself, so it "
                             f"may only map keys to its own user (not {', '.join(others)})")
    return config


def client_config(uri: str, server_key: Optional[str], key: Optional[str]) -> ClientConfig:
    """The client side of ``tcp://HOST:PORT``, from options or environment."""
    try:
        events_uri_for(uri)
    except ValueError:
        raise CurveError(f"{uri}: expected tcp://HOST:PORT") from None
    server_key = server_key or os.environ.get(ENV_SERVER_KEY)
    key = key or os.environ.get(ENV_KEY)
    if not server_key:
        raise CurveError(f"{uri} needs nrmd's public key file "
                         f"(--server-key FILE or {ENV_SERVER_KEY})")
    if not key:
        raise CurveError(f"{uri} needs your keypair file (--key FILE or {ENV_KEY}; "
                         "create one with nrm keygen)")
    return ClientConfig(uri=uri, server_public=load_public_key(server_key),
                        keys=load_keypair(key))


def make_server(sock: zmq.Socket, keys: Keypair, domain: bytes) -> None:
    """Endpoints bound after this call are CURVE servers checked by ZAP;
    those bound before keep their own mechanism (libzmq copies a socket's
    options into each listener at bind time)."""
    sock.zap_domain = domain
    sock.curve_server = True
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    _heartbeat(sock)


def make_client(sock: zmq.Socket, config: ClientConfig) -> None:
    if config.uri.startswith("tcp://["):
        sock.ipv6 = True
    sock.curve_serverkey = config.server_public
    sock.curve_publickey = config.keys.public
    sock.curve_secretkey = config.keys.secret
    _heartbeat(sock)


def _heartbeat(sock: zmq.Socket) -> None:
    sock.heartbeat_ivl = HEARTBEAT_IVL_MS
    sock.heartbeat_timeout = HEARTBEAT_TIMEOUT_MS


def describe(users: Dict[bytes, User]) -> List[str]:
    return sorted({u.name for u in users.values()})
