"""Manifests: what a user asks of the slice a command runs in.

Two spellings reach this module and leave it as one :class:`Manifest`:

* the seed-era ACI image manifest (``acKind: ImageManifest`` with ``argo/*``
  isolators whose values are strings), which existing users still have on
  disk and must keep working;
* the documented nrm format (``name``, ``version``, ``app.slice`` ...), in
  YAML or JSON.

The client parses and validates the file (so errors show up before anything
is sent), then ships :meth:`Manifest.to_dict`; the daemon, which runs as
root, trusts nothing and rebuilds the model with :meth:`Manifest.from_dict`.
That is why every rule lives here once, and why errors carry the dotted path
of the offending field: the same message is meaningful on both sides.

``docs/manifest.md`` is the user-facing description of every field.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
import reprlib
import select
import stat
import time
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union


from nrm import durations

__all__ = [
    "MAX_MANIFEST_BYTES", "FORMAT_VERSION", "SCHED_POLICIES", "POWER_POLICIES",
    "IMAGE_TYPES", "ManifestError", "Slice", "Scheduler", "Power", "Monitoring",
    "Image", "Manifest", "parse", "load", "parse_duration",
]

# The daemon parses what any local user sends it; a bound on the text keeps a
# YAML alias bomb or a runaway file from costing it anything.
MAX_MANIFEST_BYTES = 64 * 1024
FORMAT_VERSION = 1

SCHED_POLICIES = ("SCHED_OTHER", "SCHED_FIFO", "SCHED_HPC")
POWER_POLICIES = ("NONE", "DDCM", "DVFS", "COMBINED", "FIXED")
MAX_FIXED_SETTINGS = 4096
"""Entries of ``app.power.settings``: one per rank, far more than a node's cpus."""
IMAGE_TYPES = ("sif", "docker")
FIFO_PRIORITIES = (1, 99)

# User metadata (``annotations``, ``x-*``) is kept verbatim, so it is also
# copied under a budget: aliases in YAML share structure, and expanding a
# shared structure when serialising it is where an alias bomb would bite.
_EXTRA_MAX_NODES = 4096
_EXTRA_MAX_DEPTH = 32

_NOVALUE = object()

_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxstring = 60
_REPR.maxother = 60
_REPR.maxlist = 6
_REPR.maxdict = 6
_REPR.maxtuple = 6
_REPR.maxset = 6


def _show(value: Any) -> str:
    """Bounded repr: a hostile value must not make the error message huge."""
    try:
        return _REPR.repr(value)
    except Exception:  # e.g. ints beyond Python's str conversion limit
        return "<%s>" % type(value).__name__


class ManifestError(ValueError):
    """A manifest that cannot be used, with the field to fix.

    ``field`` is a dotted path (``app.slice.cpus``,
    ``app.isolators[argo/container].cpus``) or None for whole-file problems
    (unreadable, bad syntax, too large); ``value`` is the offending value;
    ``source`` names the file or ``<manifest>`` so a caller can prefix it.
    """

    def __init__(self, message: str, field: Optional[str] = None,
                 value: Any = _NOVALUE, source: Optional[str] = None):
        self.message = message
        self.field = field
        self.value = None if value is _NOVALUE else value
        self.source = source
        super().__init__(message)

    def __str__(self) -> str:
        if self.field:
            return "%s: %s" % (self.field, self.message)
        return self.message


def _bad(path: str, expected: str, value: Any) -> ManifestError:
    return ManifestError("expected %s, got %s" % (expected, _show(value)), path, value)


def _missing(path: str, expected: str) -> ManifestError:
    return ManifestError("missing (expected %s)" % expected, path)


# ------------------------------------------------------------------ model ---

@dataclass(frozen=True)
class Slice:
    """Counts, not ids: the daemon picks which cpus and NUMA nodes."""
    cpus: int
    mems: int


@dataclass(frozen=True)
class Scheduler:
    policy: str = "SCHED_OTHER"
    priority: int = 0


@dataclass(frozen=True)
class Power:
    """Per-container power policy; durations are seconds."""
    policy: str = "NONE"
    profile: bool = False
    damper: float = 0.001
    slowdown: float = 1.1
    settings: Dict[int, Dict[str, Optional[float]]] = field(default_factory=dict)
    """FIXED only: per MPI rank (the cpu for senders without one), the
    ``level`` (1..16) and ``frequency`` (Hz or None) to pin."""


@dataclass(frozen=True)
class Monitoring:
    enabled: bool = True
    ratelimit: float = 0.01


@dataclass(frozen=True)
class Image:
    path: str
    type: str = "sif"
    binds: List[str] = field(default_factory=list)


@dataclass(frozen=True)
class Manifest:
    """One validated manifest, whatever format it was written in.

    ``extra`` holds the user's top-level ``annotations`` mapping and ``x-*``
    keys, carried along untouched so tools can tag their runs.
    """
    name: str
    slice: Slice
    scheduler: Scheduler = field(default_factory=Scheduler)
    hwbind: bool = False
    perfwrapper: bool = False
    power: Power = field(default_factory=Power)
    monitoring: Monitoring = field(default_factory=Monitoring)
    image: Optional[Image] = None
    source_format: str = "nrm"
    warnings: List[str] = field(default_factory=list)
    extra: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        """The canonical nrm-format dict: JSON-able, durations in seconds.

        This is what travels to the daemon, so it spells out every default:
        the daemon then never depends on the client's idea of a default.
        """
        app: Dict[str, Any] = {
            "slice": {"cpus": self.slice.cpus, "mems": self.slice.mems},
            "scheduler": {"policy": self.scheduler.policy,
                          "priority": self.scheduler.priority},
            "hwbind": self.hwbind,
            "perfwrapper": self.perfwrapper,
            "power": {"policy": self.power.policy, "profile": self.power.profile,
                      "damper": self.power.damper, "slowdown": self.power.slowdown},
            "monitoring": {"enabled": self.monitoring.enabled,
                           "ratelimit": self.monitoring.ratelimit},
        }
        if self.power.settings:
            app["power"]["settings"] = {str(k): dict(v) for k, v in self.power.settings.items()}
        if self.image is not None:
            app["image"] = {"path": self.image.path, "type": self.image.type,
                            "binds": list(self.image.binds)}
        out: Dict[str, Any] = {"name": self.name, "version": FORMAT_VERSION, "app": app}
        for key, value in self.extra.items():
            out[key] = _copy_extra(value, key, [0])
        return out

    @classmethod
    def from_dict(cls, d: Any) -> "Manifest":
        """Rebuild from the canonical dict, validating everything again.

        Only the nrm format is accepted here: the daemon receives what
        :meth:`to_dict` produced, never the legacy spelling.
        """
        return _parse_nrm(d, base_dir=None)


# ----------------------------------------------------------- scalar rules ---

_TRUE = ("1", "true")
_FALSE = ("0", "false")
_INT_RE = re.compile(r"[+-]?\d+")
_NUM_RE = durations.NUMBER

_BOOL_EXPECTED = "a boolean (true/false, 1/0)"


def _to_bool(value: Any, path: str) -> bool:
    """Lenient on purpose: the seed wrote "0"/"1"/"True"/"False" as strings."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        low = value.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
    raise _bad(path, _BOOL_EXPECTED, value)


def _to_int(value: Any, path: str, expected: str = "an integer") -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and _INT_RE.fullmatch(value.strip()):
        return int(value.strip())
    raise _bad(path, expected, value)


def _to_positive_int(value: Any, path: str) -> int:
    expected = "a positive integer"
    n = _to_int(value, path, expected)
    if n < 1:
        raise _bad(path, expected, value)
    return n


def _to_float(value: Any, path: str, expected: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        f = float(value)
    elif isinstance(value, str) and re.fullmatch(_NUM_RE, value.strip()):
        f = float(value.strip())
    else:
        raise _bad(path, expected, value)
    if not math.isfinite(f):
        raise _bad(path, expected, value)
    return f


def _to_str(value: Any, path: str, expected: str = "a non-empty string") -> str:
    if not isinstance(value, str) or not value.strip():
        raise _bad(path, expected, value)
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise _bad(path, expected + " without control characters", value)
    if not _utf8(value):
        raise _bad(path, expected + " in UTF-8", value)
    return value


def _utf8(text: str) -> bool:
    """JSON and YAML escapes can spell lone surrogates ("\\ud800"), which
    parse but cannot be sent: the client died encoding them (tests/fuzz)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_NAME_EXPECTED = "a non-empty string of at most %d characters" % 255


def _name(value: Any) -> str:
    """The name ends up in task environments (AC_APP_NAME) and listings."""
    name = _to_str(value, "name", _NAME_EXPECTED)
    if len(name) > 255:
        raise _bad("name", _NAME_EXPECTED, value)
    return name


_seconds = durations.bare_seconds
_nanoseconds = durations.bare_nanoseconds


def _aci_damper(dec: Decimal) -> Decimal:
    """The seed divided the damper by 1e9, yet an example wrote 0.1 meaning
    seconds: no sane damper is 1000 s long, so the magnitude decides."""
    return dec.scaleb(-9) if dec >= 1000 else dec


def parse_duration(value: Any, path: str = "duration",
                   bare: Callable[[Decimal], Decimal] = _seconds) -> float:
    """Seconds as a float from a number or a string with a unit
    (nrm/durations.py). ``bare`` says what a number without a unit means;
    the ACI format needs a different rule than the nrm format (see
    docs/manifest.md)."""
    try:
        return float(durations.seconds(value, bare))
    except ValueError:
        raise _bad(path, durations.EXPECTED, value) from None


# ----------------------------------------------------------- shared rules ---

def _scheduler(policy: Any, priority: Any, ppath: str, qpath: str,
               warnings: List[str]) -> Scheduler:
    """chrt's rules, checked before launch rather than failing at exec."""
    if policy is _NOVALUE:
        name = "SCHED_OTHER"
    else:
        if not isinstance(policy, str) or policy.strip().upper() not in SCHED_POLICIES:
            raise _bad(ppath, "one of " + ", ".join(SCHED_POLICIES), policy)
        name = policy.strip().upper()
    prio = None if priority is _NOVALUE else _to_int(priority, qpath)
    if name == "SCHED_FIFO":
        lo, hi = FIFO_PRIORITIES
        expected = "an integer in %d..%d for SCHED_FIFO" % (lo, hi)
        if prio is None:
            raise _missing(qpath, expected)
        if not lo <= prio <= hi:
            raise _bad(qpath, expected, priority)
        return Scheduler(name, prio)
    if name == "SCHED_HPC":
        if prio:
            warnings.append("%s: SCHED_HPC takes no priority; %s replaced by 0"
                            % (qpath, _show(priority)))
        return Scheduler(name, 0)
    if prio:
        raise _bad(qpath, "0 for SCHED_OTHER", priority)
    return Scheduler(name, 0)


def _power_policy(value: Any, path: str) -> str:
    if not isinstance(value, str) or value.strip().upper() not in POWER_POLICIES:
        raise _bad(path, "one of " + ", ".join(POWER_POLICIES), value)
    return value.strip().upper()


def _slowdown(value: Any, path: str) -> float:
    expected = "a number >= 1.0"
    f = _to_float(value, path, expected)
    if f < 1.0:
        raise _bad(path, expected, value)
    return f


def _image(value: Any, path: str, base_dir: Optional[str]) -> Image:
    obj = _Obj(value, path, ("path", "type", "binds"))
    kind = obj.get("type", "sif")
    if kind not in IMAGE_TYPES:
        raise _bad(obj.sub("type"), "one of " + ", ".join(IMAGE_TYPES), kind)
    where = obj.require("path", "a non-empty string")
    where = _to_str(where, obj.sub("path"))
    # The daemon's working directory means nothing to the user, so a relative
    # image file is anchored to the manifest that names it.
    if kind == "sif" and base_dir and "://" not in where and not os.path.isabs(where):
        where = os.path.normpath(os.path.join(base_dir, where))
    binds = obj.get("binds", [])
    if not isinstance(binds, list):
        raise _bad(obj.sub("binds"), "a list of \"src[:dst[:opts]]\" strings", binds)
    for i, b in enumerate(binds):
        bpath = "%s[%d]" % (obj.sub("binds"), i)
        # singularity splits --bind on commas: one entry must stay one bind.
        _to_str(b, bpath, "a non-empty \"src[:dst[:opts]]\" string")
        if "," in b:
            raise _bad(bpath, "one bind per entry (no commas)", b)
    return Image(where, kind, list(binds))


def _copy_extra(value: Any, path: str, budget: List[int], depth: int = 0,
                root: Optional[str] = None) -> Any:
    """Deep copy of user metadata into plain JSON data, within a budget."""
    root = root or path
    budget[0] += 1
    if budget[0] > _EXTRA_MAX_NODES or depth > _EXTRA_MAX_DEPTH:
        raise ManifestError("too large or too deeply nested (at most %d values, depth %d)"
                            % (_EXTRA_MAX_NODES, _EXTRA_MAX_DEPTH), root)
    if isinstance(value, str) and not _utf8(value):
        raise _bad(path, "text in UTF-8", value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _bad(path, "a finite number", value)
        return value
    if isinstance(value, (datetime.date, datetime.datetime)):
        return value.isoformat()
    if isinstance(value, (list, tuple)):
        return [_copy_extra(v, "%s[%d]" % (path, i), budget, depth + 1, root)
                for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str) or not _utf8(k):
                raise _bad(path, "string keys in UTF-8", k)
            out[k] = _copy_extra(v, path + "." + k, budget, depth + 1, root)
        return out
    raise _bad(path, "JSON-compatible data (string, number, boolean, null, list, mapping)",
               value)


def _key_text(key: Any) -> str:
    """A key as it appears in a field path; a blank key would name nothing
    (found by tests/fuzz: ``{"": 1}`` gave an error without a field)."""
    return key if isinstance(key, str) and key.strip() else _show(key)


class _Obj:
    """A mapping under validation: knows its path and its allowed keys."""

    def __init__(self, value: Any, path: str, allowed: Optional[Tuple[str, ...]]):
        if not isinstance(value, Mapping):
            raise _bad(path or "manifest", "a mapping", value)
        self.value = value
        self.path = path
        if allowed is not None:
            for key in value:
                if key not in allowed:
                    raise _unknown_key(self.sub(key), key, allowed)

    def sub(self, key: Any) -> str:
        key = _key_text(key)
        return "%s.%s" % (self.path, key) if self.path else key

    def get(self, key: str, default: Any = _NOVALUE) -> Any:
        return self.value.get(key, default)

    def require(self, key: str, expected: str) -> Any:
        if key not in self.value:
            raise _missing(self.sub(key), expected)
        return self.value[key]


def _unknown_key(path: str, key: Any, allowed: Tuple[str, ...]) -> ManifestError:
    msg = "unknown key"
    if isinstance(key, str):
        import difflib
        close = difflib.get_close_matches(key, allowed, n=1)
        if close:
            msg += " (did you mean %r?)" % close[0]
    msg += "; allowed: " + ", ".join(sorted(allowed))
    return ManifestError(msg, path, key)


# ------------------------------------------------------------- nrm format ---

_TOP_KEYS = ("name", "version", "app", "hwbind", "image", "annotations")
_APP_KEYS = ("slice", "scheduler", "hwbind", "perfwrapper", "power", "monitoring", "image")


def _is_extra(key: Any) -> bool:
    return isinstance(key, str) and key.startswith("x-")


def _parse_nrm(d: Any, base_dir: Optional[str]) -> Manifest:
    if not isinstance(d, Mapping):
        raise _bad("manifest", "a mapping at the top level", d)
    for key in d:
        if key not in _TOP_KEYS and not _is_extra(key):
            raise _unknown_key(_key_text(key), key,
                               _TOP_KEYS + ("x-*",))
    top = _Obj(d, "", None)
    warnings: List[str] = []

    version = top.get("version", FORMAT_VERSION)
    if _to_int(version, "version", "manifest format version %d" % FORMAT_VERSION) \
            != FORMAT_VERSION:
        raise _bad("version", "manifest format version %d" % FORMAT_VERSION, version)
    name = _name(top.require("name", _NAME_EXPECTED))

    app = _Obj(top.require("app", "a mapping with at least 'slice'"), "app", _APP_KEYS)
    sl = _Obj(app.require("slice", "a mapping {cpus, mems}"), "app.slice", ("cpus", "mems"))
    slice_ = Slice(_to_positive_int(sl.require("cpus", "a positive integer"), "app.slice.cpus"),
                   _to_positive_int(sl.require("mems", "a positive integer"), "app.slice.mems"))

    sched = Scheduler()
    if "scheduler" in app.value:
        so = _Obj(app.value["scheduler"], "app.scheduler", ("policy", "priority"))
        sched = _scheduler(so.get("policy"), so.get("priority"),
                           "app.scheduler.policy", "app.scheduler.priority", warnings)

    # One historical variant put hwbind and image at the top level.
    hwbind = _either(top, app, "hwbind")
    hwbind_v = False if hwbind is None else _to_bool(hwbind[1], hwbind[0])
    perf = app.get("perfwrapper")
    perf_v = False if perf is _NOVALUE else _to_bool(perf, "app.perfwrapper")

    power = Power()
    if "power" in app.value:
        po = _Obj(app.value["power"], "app.power",
                  ("policy", "profile", "damper", "slowdown", "settings"))
        power = _power_from(po, parse_duration_bare=_seconds)

    mon = Monitoring()
    if "monitoring" in app.value:
        mo = _Obj(app.value["monitoring"], "app.monitoring", ("enabled", "ratelimit"))
        mon = _monitoring_from(mo, _seconds)

    img = _either(top, app, "image")
    image = None if img is None else _image(img[1], img[0], base_dir)

    extra = {}
    budget = [0]
    for key, value in d.items():
        if key == "annotations":
            if not isinstance(value, Mapping):
                raise _bad("annotations", "a mapping", value)
        if key == "annotations" or _is_extra(key):
            extra[key] = _copy_extra(value, key, budget)

    return _finish(Manifest(name, slice_, sched, hwbind_v, perf_v, power, mon, image,
                            "nrm", warnings, extra))


def _either(top: _Obj, app: _Obj, key: str) -> Optional[Tuple[str, Any]]:
    """(path, value) of a key allowed at top level or under app, not both."""
    if key in top.value and key in app.value:
        raise ManifestError("given both here and at the top level; keep one",
                            app.sub(key), app.value[key])
    if key in app.value:
        return app.sub(key), app.value[key]
    if key in top.value:
        return key, top.value[key]
    return None


def _opt(obj: _Obj, key: str, default: Any, parse: Callable[[Any, str], Any]) -> Any:
    """``obj[key]`` parsed (errors name ``obj``'s path + key), or the default."""
    return parse(obj.value[key], obj.sub(key)) if key in obj.value else default


def _power_from(po: _Obj, parse_duration_bare: Callable[[Decimal], Decimal]) -> Power:
    d = Power()
    return Power(_opt(po, "policy", d.policy, _power_policy),
                 _opt(po, "profile", d.profile, _to_bool),
                 _opt(po, "damper", d.damper,
                      lambda v, path: parse_duration(v, path, parse_duration_bare)),
                 _opt(po, "slowdown", d.slowdown, _slowdown),
                 _opt(po, "settings", {}, _fixed_settings))


_FREQ_RE = re.compile(r"(%s)\s*(Hz|kHz|MHz|GHz)" % durations.NUMBER, re.IGNORECASE)
_FREQ_UNITS = {"hz": 1.0, "khz": 1e3, "mhz": 1e6, "ghz": 1e9}
_FREQ_EXPECTED = "a frequency > 0 (Hz, or a string such as \"1.2GHz\")"
_SETTINGS_EXPECTED = ("a mapping {RANK: {level: 1..16, frequency: HZ}} of at most %d ranks"
                      % MAX_FIXED_SETTINGS)


def _frequency(value: Any, path: str) -> float:
    if isinstance(value, str) and _FREQ_RE.fullmatch(value.strip()):
        m = _FREQ_RE.fullmatch(value.strip())
        hz = float(m.group(1)) * _FREQ_UNITS[m.group(2).lower()]
    else:
        hz = _to_float(value, path, _FREQ_EXPECTED)
    if not (math.isfinite(hz) and hz > 0):
        raise _bad(path, _FREQ_EXPECTED, value)
    return hz


def _fixed_settings(value: Any, path: str) -> Dict[int, Dict[str, Optional[float]]]:
    """``{rank: {level, frequency}}``: what the FIXED policy pins (docs/manifest.md)."""
    if not isinstance(value, Mapping) or len(value) > MAX_FIXED_SETTINGS:
        raise _bad(path, _SETTINGS_EXPECTED, value)
    out: Dict[int, Dict[str, Optional[float]]] = {}
    for key, entry in value.items():
        kpath = "%s.%s" % (path, _key_text(key))
        rank = _to_int(key, kpath, "a rank (an integer >= 0) as the key")
        if rank < 0 or rank in out:
            raise _bad(kpath, "a rank (an integer >= 0) given once", key)
        obj = _Obj(entry, kpath, ("level", "frequency"))
        if not obj.value:
            raise _missing(obj.sub("level"), "a level 1..16 or a frequency, or both")
        level = _opt(obj, "level", 16, _to_int)
        if not 1 <= level <= 16:
            raise _bad(obj.sub("level"), "an integer 1..16", obj.get("level"))
        hz = obj.get("frequency", None)
        out[rank] = {"level": level,
                     "frequency": None if hz is None else _frequency(hz, obj.sub("frequency"))}
    return out


def _monitoring_from(mo: _Obj, bare: Callable[[Decimal], Decimal]) -> Monitoring:
    d = Monitoring()
    return Monitoring(_opt(mo, "enabled", d.enabled, _to_bool),
                      _opt(mo, "ratelimit", d.ratelimit,
                           lambda v, path: parse_duration(v, path, bare)))


def _finish(m: Manifest) -> Manifest:
    """Cross-field checks that apply to both formats."""
    if m.power.policy == "FIXED" and not m.power.settings:
        raise _missing("app.power.settings",
                       "the settings policy FIXED pins: {RANK: {level, frequency}}")
    if m.power.policy != "FIXED" and m.power.settings:
        m.warnings.append("app.power.settings: ignored: policy %s chooses its own settings "
                          "(they are pinned by FIXED only)" % m.power.policy)
    if m.power.policy != "NONE" and not m.monitoring.enabled:
        m.warnings.append("app.power.policy: %s acts on the phase reports of the "
                          "application, but monitoring is disabled" % m.power.policy)
    return m


# ------------------------------------------------------------- ACI format ---

_ACI_TOP_QUIET = ("acKind", "acVersion", "name", "app", "annotations")
_ACI_ISOLATOR_KEYS = {
    "argo/container": ("cpus", "mems", "enabled"),
    "argo/scheduler": ("policy", "priority", "enabled"),
    "argo/perfwrapper": ("enabled",),
    "argo/power": ("enabled", "policy", "profile", "damper", "slowdown"),
    "argo/powerpolicy": ("enabled", "policy", "profile", "damper", "slowdown"),
    "argo/hwbind": ("enabled",),
    "argo/monitoring": ("enabled", "ratelimit"),
}


def _looks_aci(d: Mapping) -> bool:
    if "acKind" in d:
        return True
    app = d.get("app")
    return isinstance(app, Mapping) and "isolators" in app


def _parse_aci(d: Mapping) -> Manifest:
    warnings: List[str] = []
    kind = d.get("acKind")
    if kind is None:
        warnings.append("acKind: missing; read as an ACI ImageManifest because of "
                        "app.isolators")
    elif kind != "ImageManifest":
        raise _bad("acKind", "'ImageManifest'", kind)
    for key in d:
        if key not in _ACI_TOP_QUIET:
            warnings.append("%s: ignored by nrm" % _key_text(key))
    if "name" not in d:
        raise _missing("name", _NAME_EXPECTED)
    name = _name(d["name"])

    app = _Obj(d.get("app"), "app", None)
    for key in app.value:
        if key != "isolators":
            warnings.append("%s: ignored by nrm" % app.sub(key))
    isolators = app.value.get("isolators")
    if not isinstance(isolators, list):
        raise _bad("app.isolators", "a list of {name, value}", isolators)

    found: Dict[str, _Obj] = {}
    for i, iso in enumerate(isolators):
        ipath = "app.isolators[%d]" % i
        if not isinstance(iso, Mapping):
            raise _bad(ipath, "a mapping {name, value}", iso)
        iname = iso.get("name")
        if not isinstance(iname, str) or not iname:
            raise _bad(ipath + ".name", "an isolator name", iname)
        path = "app.isolators[%s]" % iname
        if iname not in _ACI_ISOLATOR_KEYS:
            warnings.append("%s: unknown isolator ignored" % path)
            continue
        family = "argo/power" if iname == "argo/powerpolicy" else iname
        if family in found:
            raise ManifestError("given twice (as %s and %s)"
                                % (found[family].path, path), path, iso)
        value = iso.get("value", {})
        obj = _Obj(value if value is not None else {}, path, None)
        for key in obj.value:
            if key not in _ACI_ISOLATOR_KEYS[iname]:
                warnings.append("%s: unknown key ignored" % obj.sub(key))
        found[family] = obj

    def on(family: str) -> Optional[_Obj]:
        obj = found.get(family)
        if obj is None:
            return None
        # A present isolator without "enabled" is on: that is how the seed read it.
        if "enabled" in obj.value and not _to_bool(obj.value["enabled"], obj.sub("enabled")):
            return None
        return obj

    cont = found.get("argo/container")
    if cont is None:
        raise _missing("app.isolators[argo/container]", "an isolator with cpus and mems")
    if on("argo/container") is None:
        raise ManifestError("cannot be disabled: it defines the slice",
                            cont.sub("enabled"), cont.value.get("enabled"))
    slice_ = Slice(
        _to_positive_int(cont.require("cpus", "a positive integer"), cont.sub("cpus")),
        _to_positive_int(cont.require("mems", "a positive integer"), cont.sub("mems")))

    sched = Scheduler()
    so = on("argo/scheduler")
    if so is not None:
        sched = _scheduler(so.get("policy"), so.get("priority"),
                           so.sub("policy"), so.sub("priority"), warnings)

    power = Power()
    po = on("argo/power")
    if po is not None:
        power = _power_from(po, _aci_damper)

    mon = Monitoring()
    mo = found.get("argo/monitoring")
    if mo is not None:
        mon = _monitoring_from(mo, _nanoseconds)

    return _finish(Manifest(name, slice_, sched, on("argo/hwbind") is not None,
                            on("argo/perfwrapper") is not None, power, mon, None,
                            "aci", warnings, _aci_annotations(d.get("annotations"), warnings)))


def _aci_annotations(value: Any, warnings: List[str]) -> Dict[str, Any]:
    """ACI annotations are a list of {name, value}; keep them as a mapping."""
    if value is None:
        return {}
    if isinstance(value, list) and all(
            isinstance(a, Mapping) and isinstance(a.get("name"), str)
            and isinstance(a.get("value"), str) for a in value):
        ann = {a["name"]: a["value"] for a in value}
        return {"annotations": _copy_extra(ann, "annotations", [0])}
    warnings.append("annotations: not a list of {name, value} strings; ignored")
    return {}


# ------------------------------------------------------------ entry points ---

def _decode(data: Union[str, bytes], source: str) -> str:
    size = len(data.encode("utf-8", "surrogatepass")) if isinstance(data, str) else len(data)
    if size > MAX_MANIFEST_BYTES:
        raise ManifestError("%s: manifest is %d bytes, larger than the %d KiB limit"
                            % (source, size, MAX_MANIFEST_BYTES // 1024), source=source)
    if isinstance(data, bytes):
        try:
            return data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise ManifestError("%s: not UTF-8 text (byte %d)" % (source, e.start),
                                source=source)
    return data


class _DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _json_pairs(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    """json.loads keeps the last of repeated keys; a repeat is a mistake."""
    out: Dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _load_text(text: str, source: str) -> Any:
    stripped = text.lstrip()
    if not stripped:
        raise ManifestError("%s: empty manifest" % source, source=source)
    if stripped[0] in "{[":
        # JSON first: its error messages point at the real mistake, where
        # YAML's flow-style parser would complain about something vaguer.
        try:
            return json.loads(text, object_pairs_hook=_json_pairs)
        except _DuplicateKey as e:
            raise ManifestError("%s: invalid JSON: duplicate key %s" % (source, _show(e.key)),
                                source=source) from None
        except json.JSONDecodeError as e:
            json_error = "%s: invalid JSON at line %d, column %d: %s" % (
                source, e.lineno, e.colno, e.msg)
        except RecursionError:
            json_error = "%s: invalid JSON: nested too deeply" % source
        except ValueError as e:
            json_error = "%s: invalid JSON: %s" % (source, e)
        try:
            # Flow-style YAML ({name: x, ...}) also starts with a brace.
            return _yaml(text, source)
        except _YamlDuplicate:
            raise
        except ManifestError:
            raise ManifestError(json_error, source=source) from None
    return _yaml(text, source)


def _yaml(text: str, source: str) -> Any:
    # imported here: a JSON manifest, and every verb but run, never pays for PyYAML
    import yaml
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e)
        where = " at line %d, column %d" % (mark.line + 1, mark.column + 1) if mark else ""
        raise ManifestError("%s: invalid YAML%s: %s" % (source, where, problem),
                            source=source) from None
    except RecursionError:
        raise ManifestError("%s: invalid YAML: nested too deeply" % source,
                            source=source) from None
    except ValueError as e:
        raise ManifestError("%s: invalid YAML: %s" % (source, e), source=source) from None
    # The text parsed once already, so composing it again cannot fail.
    _yaml_duplicates(text, source)
    return data


class _YamlDuplicate(ManifestError):
    """Raised as is: the text is valid YAML, so no JSON message applies."""


def _yaml_duplicates(text: str, source: str) -> None:
    """Refuse repeated keys, which PyYAML resolves silently (last one wins).

    A second ``app:`` block is a typo the user must hear about. Composing
    builds only the node graph, no Python objects; shared (aliased) nodes
    are visited once.
    """
    import yaml
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    seen = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            keys = set()
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode) and k.tag != "tag:yaml.org,2002:merge":
                    if (k.tag, k.value) in keys:
                        raise _YamlDuplicate(
                            "%s: invalid YAML at line %d, column %d: duplicate key %s"
                            % (source, k.start_mark.line + 1, k.start_mark.column + 1,
                               _show(k.value)), source=source)
                    keys.add((k.tag, k.value))
                stack.append(k)
                stack.append(v)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)


def parse(text_or_dict: Union[str, bytes, Mapping[str, Any]], source: str = "<manifest>",
          base_dir: Optional[str] = None) -> Manifest:
    """Parse and validate a manifest in either format.

    The format is decided by content (``acKind`` or ``app.isolators`` means
    ACI), never by file extension. ``base_dir`` anchors a relative image path;
    :func:`load` passes the manifest's directory.
    """
    if isinstance(text_or_dict, Mapping):
        d: Any = text_or_dict
    elif isinstance(text_or_dict, (str, bytes)):
        d = _load_text(_decode(text_or_dict, source), source)
    else:
        raise ManifestError("%s: expected manifest text or a mapping, got %s"
                            % (source, type(text_or_dict).__name__), source=source)
    if not isinstance(d, Mapping):
        raise ManifestError("%s: the top level must be a mapping, got %s"
                            % (source, _show(d)), source=source)
    try:
        m = _parse_aci(d) if _looks_aci(d) else _parse_nrm(d, base_dir)
    except ManifestError as e:
        e.source = source
        raise
    except RecursionError:
        raise ManifestError("%s: nested too deeply" % source, source=source) from None
    return m


#: how long a manifest given as a pipe (`<(...)`) may take to arrive
PIPE_MANIFEST_TIMEOUT_S = 5.0


def _read_pipe(fd: int, source: str) -> bytes:
    """A pipe or FIFO, up to one byte past the limit: bounded in time too,
    since a FIFO with no writer (or a stuck one) never ends."""
    data = b""
    deadline = time.monotonic() + PIPE_MANIFEST_TIMEOUT_S
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while len(data) <= MAX_MANIFEST_BYTES:
        try:
            part = os.read(fd, MAX_MANIFEST_BYTES + 1 - len(data))
        except BlockingIOError:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                raise ManifestError("%s: no manifest arrived through this pipe in %.0f s"
                                    % (source, PIPE_MANIFEST_TIMEOUT_S), source=source) from None
            continue
        if not part:
            if data or time.monotonic() > deadline:
                break
            time.sleep(0.05)    # a FIFO whose writer has not opened it yet
            continue
        data += part
    if not data:
        raise ManifestError("%s: nothing was written to this FIFO in %.0f s"
                            % (source, PIPE_MANIFEST_TIMEOUT_S), source=source)
    return data


def load(path: Union[str, "os.PathLike[str]"], cwd: Optional[str] = None) -> Manifest:
    """Read and parse a manifest file.

    A relative ``path`` is resolved against ``cwd``, the directory the user
    typed the command in (the client's, not the daemon's), or the process's
    own working directory when none is given.
    """
    p = os.fspath(path)
    if not os.path.isabs(p):
        p = os.path.join(os.path.abspath(cwd) if cwd else os.getcwd(), p)
    p = os.path.normpath(p)
    try:
        # Non-blocking open: a FIFO nobody writes would block open() forever.
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with open(fd, "rb", buffering=0) as f:
            if stat.S_ISFIFO(os.fstat(fd).st_mode):
                data = _read_pipe(fd, p)
            else:
                os.set_blocking(fd, True)
                # Read one byte past the limit: enough to refuse, and never
                # swallow an endless file such as /dev/zero.
                data = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as e:
        reason = e.strerror or str(e)
        raise ManifestError("%s: cannot read manifest: %s" % (p, reason), source=p) from None
    return parse(data, source=p, base_dir=os.path.dirname(p))
