"""The seed-era ACI image manifest (``acKind: ImageManifest`` with ``argo/*``
isolators), which existing users still have on disk."""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional

from nrm.manifest.model import (Manifest, ManifestError, Monitoring, Power, Scheduler, Slice, _bad,
                                _copy_extra, _key_text, _missing)
from nrm.manifest.native import _finish, _monitoring_from, _power_from
from nrm.manifest.rules import (_NAME_EXPECTED, _Obj, _aci_damper, _name, _nanoseconds, _scheduler,
                                _to_bool, _to_positive_int)


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
