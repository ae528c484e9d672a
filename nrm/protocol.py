"""Every message nrm exchanges, declared once.

Three channels, one version number (``PROTOCOL_VERSION``):

* upstream requests and replies: a client DEALER talks to the daemon's
  ROUTER; each message is a JSON object, optionally followed by one raw
  payload frame (task output, byte-exact);
* events: the daemon's PUB socket sends ``[topic, json]`` pairs;
* downstream: instrumented programs PUSH JSON objects to the daemon's PULL
  socket. The seed-era SUB endpoint speaks the older format parsed in
  :mod:`nrm.daemon.ingest`.

``docs/protocol.md`` documents these types; ``tests/test_protocol_doc.py``
checks that every tag declared here is documented there.
"""

from __future__ import annotations

import inspect
from typing import Annotated, Dict, List, Optional, Union

import msgspec

#: downstream integers: anything wider than 64 bits is malformed, not a bigint
#: that later arithmetic chokes on
I64 = Annotated[int, msgspec.Meta(ge=-(2 ** 63), le=2 ** 63 - 1)]

PROTOCOL_VERSION = 1

#: what this nrm's daemon adds to protocol 1 without a new version (older
#: clients never send the new fields or requests); ``status`` lists them and
#: a client checks before it relies on one. ``keys``: ``run.key``, ``claim``,
#: ``forget`` (docs/protocol.md, "Task keys").
FEATURES = ("keys",)

# Sizes that bound what the daemon accepts, so no peer can grow its memory.
MAX_REQUEST_BYTES = 1 << 20
#: the largest node power cap accepted, in watts: far above any node, low
#: enough that a typo (or 1e308) is refused rather than taken as "no cap"
MAX_POWER_CAP_W = 1e6
MAX_DOWNSTREAM_BYTES = 4096
#: task keys named in one ``claim`` or ``forget``
MAX_KEYS_PER_REQUEST = 4096


class ProtocolError(ValueError):
    """A message that cannot be understood; carries a reply code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class _Msg(msgspec.Struct, tag_field="type", forbid_unknown_fields=False):
    v: int = PROTOCOL_VERSION


# --------------------------------------------------------------- requests ---

class Run(_Msg, tag="run"):
    """Launch ``argv`` in a container described by ``manifest``.

    ``manifest`` is the canonical form produced by
    :func:`nrm.manifest.Manifest.to_dict`; the daemon validates it again.
    """
    id: int = 0
    manifest: Dict[str, object] = {}
    argv: List[str] = []
    env: Dict[str, str] = {}
    cwd: str = "/"
    container: Optional[str] = None
    detach: bool = False
    output: bool = True
    wait: bool = False
    oversubscribe: bool = False
    #: cpus the client may use (e.g. its Slurm allocation); the slice is
    #: taken inside them. None: any cpu of the node.
    cpus_allowed: Optional[List[int]] = None
    #: send a ``started`` reply once the task runs (always with ``detach``).
    #: A client that only waits for the exit says false and saves a message
    #: per run: ``exit`` carries the same facts.
    started: bool = True
    #: output flow control: the client sends ``credit`` requests for this
    #: run's output (docs/protocol.md, "Output flow control") and nrmd keeps
    #: at most this many bytes (raised to 256 KiB, lowered to 1 MiB) sent
    #: and not yet credited. 0: no credits, the connection's send limit
    #: alone paces the run (older clients).
    window: int = 0
    #: a name of the client's choosing under which nrmd remembers this
    #: launch's outcome, even after the client is gone (``claim`` reads
    #: it; docs/protocol.md, "Task keys"). None: no memory.
    key: Optional[str] = None


class Signal(_Msg, tag="signal"):
    """Deliver a signal to one task (the client forwarding Ctrl-C)."""
    id: int = 0
    task: str = ""
    signum: int = 15


class Credit(_Msg, tag="credit"):
    """Bytes of run ``id``'s output the client has consumed so far (a
    running total over both streams); no reply."""
    id: int = 0
    consumed: I64 = 0


class Kill(_Msg, tag="kill"):
    id: int = 0
    container: str = ""


class ListContainers(_Msg, tag="list"):
    id: int = 0


class Status(_Msg, tag="status"):
    id: int = 0


class Power(_Msg, tag="power"):
    id: int = 0


class SetPower(_Msg, tag="setpower"):
    """Set (``watts`` > 0) or clear (``watts`` null) the node power cap."""
    id: int = 0
    watts: Optional[float] = None


class Report(_Msg, tag="report"):
    id: int = 0
    container: Optional[str] = None


class Claim(_Msg, tag="claim"):
    """The state of each of ``keys`` (the requester's own): ``unknown``
    keys are fenced by the claim, so a launch with one arriving later is
    refused and never runs."""
    id: int = 0
    keys: List[str] = []


class Forget(_Msg, tag="forget"):
    """Drop the requester's ended keys: those in ``keys`` and, with
    ``prefix``, every one that starts with it (running ones are kept)."""
    id: int = 0
    keys: List[str] = []
    prefix: Optional[str] = None


class BatchTask(msgspec.Struct, forbid_unknown_fields=True):
    """One task of a batched launch (docs/protocol.md): keyed, detached,
    followed, its slice exactly ``cpus``; ``env`` goes over the batch's."""
    key: str
    container: str
    argv: List[str]
    cpus: List[int]
    cwd: str = "/"
    env: Dict[str, str] = {}


class BatchExit(msgspec.Struct):
    """One batched task's end. ``pid`` 0: it never started (``error`` says
    why); ``status`` None: no status (never started, lost)."""
    key: str
    container: str
    pid: int = 0
    status: Optional[int] = None
    started_at: Optional[float] = None
    error: Optional[str] = None


Request = Union[Run, Credit, Signal, Kill, ListContainers, Status, Power, SetPower, Report,
                Claim, Forget]

# ---------------------------------------------------------------- replies ---


class Error(_Msg, tag="error"):
    id: int = 0
    code: str = "error"
    message: str = ""


class Ack(_Msg, tag="ack"):
    id: int = 0
    data: Dict[str, object] = {}


class Started(_Msg, tag="started"):
    id: int = 0
    container: str = ""
    task: str = ""
    pid: int = 0
    cpus: List[int] = []
    mems: List[int] = []


class Output(_Msg, tag="output"):
    """Followed by exactly one raw frame holding the bytes. ``credit``:
    nrmd asks a run with a ``window`` for a ``credit`` now (it stopped
    reading the task's output until it gets one)."""
    id: int = 0
    task: str = ""
    stream: str = "stdout"
    credit: bool = False


class Exit(_Msg, tag="exit"):
    """``status`` is the shell-style status: code, or 128+signal.
    ``started_at`` is when nrmd knew the task had started, in seconds of
    the node's CLOCK_MONOTONIC (comparable with a local client's own);
    ``pid``, ``cpus`` and ``mems`` repeat ``started``'s for the clients
    that asked for no ``started`` reply."""
    id: int = 0
    task: str = ""
    container: str = ""
    code: Optional[int] = None
    signal: Optional[int] = None
    status: int = 0
    profile: Optional[Dict[str, object]] = None
    pid: int = 0
    cpus: List[int] = []
    mems: List[int] = []
    started_at: Optional[float] = None


Reply = Union[Error, Ack, Started, Output, Exit]

# ------------------------------------------------------------- downstream ---


class DStart(_Msg, tag="start"):
    container: str = ""
    task: str = ""
    app: str = ""
    pid: I64 = 0


class DProgress(_Msg, tag="progress"):
    container: str = ""
    task: str = ""
    app: str = ""
    payload: I64 = 0


class DPhaseContext(_Msg, tag="phase_context"):
    """``aggregation`` phases ended on ``cpu``; times are totals in ns.

    ``phase`` is the sender's cumulative phase count after this message, so
    the policy gate can line up ranks that aggregated differently.
    ``site`` names the phase type: a hash of the call site of the
    collective that ended the phases (0: unknown, or phases of several
    types aggregated); the cross-rank policy predicts per type with it.
    """
    container: str = ""
    task: str = ""
    app: str = ""
    rank: I64 = -1
    cpu: I64 = 0
    phase: I64 = 0
    aggregation: I64 = 1
    computetime: I64 = 0
    totaltime: I64 = 0
    site: I64 = 0


class DPerformance(_Msg, tag="performance"):
    container: str = ""
    task: str = ""
    app: str = ""
    event: str = "instructions"
    payload: float = 0.0
    interval: float = 0.0


class DExit(_Msg, tag="exit"):
    container: str = ""
    task: str = ""
    app: str = ""


Downstream = Union[DStart, DProgress, DPhaseContext, DPerformance, DExit]

# ----------------------------------------------------------------- events ---

#: PUB topics; a subscriber filters by prefix.
TOPICS = ("container", "task", "power", "progress", "phase_context",
          "performance", "decision", "daemon")


def unknown_topics(prefixes) -> list:
    """The subscription prefixes no topic starts with: a listener on one of
    them would wait for ever ("" is every topic, "p" several)."""
    return [p for p in prefixes if not any(t.startswith(p) for t in TOPICS)]


# ---------------------------------------------------------------- codecs ---

_encoder = msgspec.json.Encoder()
_request_decoder = msgspec.json.Decoder(Request)
_reply_decoder = msgspec.json.Decoder(Reply)
_downstream_decoder = msgspec.json.Decoder(Downstream)


def encode(msg) -> bytes:
    return _encoder.encode(msg)


def _decode(decoder, data: bytes, limit: int):
    if len(data) > limit:
        raise ProtocolError("too_large", f"message of {len(data)} bytes exceeds {limit}")
    try:
        msg = decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise ProtocolError("invalid", f"invalid message: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ProtocolError("malformed", f"malformed message: {exc}") from None
    except UnicodeDecodeError as exc:
        # msgspec checks UTF-8 only when it builds a str; found by tests/fuzz.
        raise ProtocolError("malformed", f"malformed message: {exc}") from None
    except RecursionError:
        # A few kilobytes of brackets reach the interpreter's limit (found
        # by tests/fuzz); without this the request went unanswered.
        raise ProtocolError("malformed", "malformed message: nested too deeply") from None
    if msg.v != PROTOCOL_VERSION:
        raise ProtocolError(
            "version", f"protocol version {msg.v} not supported (this is {PROTOCOL_VERSION})")
    return msg


def decode_request(data: bytes) -> Request:
    return _decode(_request_decoder, data, MAX_REQUEST_BYTES)


def decode_reply(data: bytes) -> Reply:
    return _decode(_reply_decoder, data, MAX_REQUEST_BYTES)


def decode_downstream(data: bytes) -> Downstream:
    return _decode(_downstream_decoder, data, MAX_DOWNSTREAM_BYTES)


def encode_event(topic: str, body: dict) -> List[bytes]:
    return [topic.encode(), _encoder.encode(body)]


def request_tags() -> List[str]:
    return [t.__struct_config__.tag for t in Request.__args__]


def reply_tags() -> List[str]:
    return [t.__struct_config__.tag for t in Reply.__args__]


def downstream_tags() -> List[str]:
    return [t.__struct_config__.tag for t in Downstream.__args__]


# ------------------------------------------------------------ reference ---

def _type_name(tp) -> str:
    if tp == I64 or tp == "I64":
        return "int64"
    name = getattr(tp, "__name__", None) or str(tp)
    return str(tp).replace("typing.", "") if "[" in str(tp) else name


def markdown_reference() -> str:
    """The field tables of docs/protocol.md, generated from the types above
    (``python -m nrm.protocol`` prints them; a test keeps the doc in step)."""
    groups = (("Requests (client -> nrmd)", Request), ("Replies (nrmd -> client)", Reply),
              ("Downstream (application -> nrmd)", Downstream))
    out = []
    for title, union in groups:
        out.append(f"### {title}\n")
        for cls in union.__args__:
            info = msgspec.structs.fields(cls)
            out.append(f"#### `{cls.__struct_config__.tag}`\n")
            doc = " ".join(inspect.cleandoc(cls.__doc__ or "").split("\n\n")[0].split())
            if doc:
                out.append(doc + "\n")
            out.append("| field | type | default |\n|---|---|---|")
            for f in info:
                if f.default is not msgspec.NODEFAULT:
                    default = repr(f.default)
                elif f.default_factory is not msgspec.NODEFAULT:
                    default = repr(f.default_factory())
                else:
                    default = "required"
                out.append(f"| `{f.name}` | `{_type_name(f.type)}` | `{default}` |")
            out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(markdown_reference())
