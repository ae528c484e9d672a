"""The manifest model, its limits and its error: what every format parses into."""

from __future__ import annotations

import datetime
import math
import reprlib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

# The daemon parses what any local user sends it; a bound on the text keeps a
# YAML alias bomb or a runaway file from costing it anything.
MAX_MANIFEST_BYTES = 64 * 1024
FORMAT_VERSION = 1

SCHED_POLICIES = ("SCHED_OTHER", "SCHED_FIFO", "SCHED_HPC")
POWER_POLICIES = ("NONE", "DDCM", "DVFS", "COMBINED", "FIXED", "COUNTDOWN")
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
        from nrm.manifest.native import _parse_nrm     # it builds this class
        return _parse_nrm(d, base_dir=None)


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


def _utf8(text: str) -> bool:
    """JSON and YAML escapes can spell lone surrogates ("\\ud800"), which
    parse but cannot be sent: the client died encoding them (tests/fuzz)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
