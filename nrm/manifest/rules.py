"""The rules every field of every format is checked with, once: scalars,
scheduling, power, images, user metadata, unknown keys."""

from __future__ import annotations

import math
import os
import re
from decimal import Decimal
from typing import Any, Callable, List, Mapping, Optional, Tuple

from nrm import durations
from nrm.manifest.model import (FIFO_PRIORITIES, IMAGE_TYPES, POWER_POLICIES, SCHED_POLICIES,
                                Image, ManifestError, Scheduler, _NOVALUE, _bad, _key_text,
                                _missing, _show, _utf8)


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
