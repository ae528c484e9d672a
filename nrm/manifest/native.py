"""The documented nrm format (``name``, ``version``, ``app.slice`` ...)."""

from __future__ import annotations

import math
import re
from decimal import Decimal
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from nrm import durations
from nrm.manifest.model import (FORMAT_VERSION, MAX_FIXED_SETTINGS, Manifest, ManifestError,
                                Monitoring, Power, Scheduler, Slice, _NOVALUE, _bad, _copy_extra,
                                _key_text, _missing)
from nrm.manifest.rules import (_NAME_EXPECTED, _Obj, _image, _name, _power_policy, _scheduler,
                                _seconds, _slowdown, _to_bool, _to_float, _to_int, _to_positive_int,
                                _unknown_key, parse_duration)


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
