"""Manifests: both formats, every field, the duration rules, the limits."""

from __future__ import annotations

import copy
import dataclasses
import glob
import json
import os

import pytest
import yaml

from nrm import manifest as mf
from nrm.manifest import ManifestError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")

BASE = {"name": "t", "app": {"slice": {"cpus": 1, "mems": 1}}}


def nrm_with(path, value):
    """BASE with one dotted path set (path components created as needed)."""
    d = copy.deepcopy(BASE)
    keys = path.split(".")
    cur = d
    for k in keys[:-1]:
        cur = cur.setdefault(k, {})
    cur[keys[-1]] = value
    return d


def aci(*isolators, **top):
    """An ACI manifest; the container isolator is added unless given."""
    isos = list(isolators)
    if not any(isinstance(i, dict) and i.get("name") == "argo/container" for i in isos):
        isos.append({"name": "argo/container", "value": {"cpus": "1", "mems": "1"}})
    d = {"acKind": "ImageManifest", "acVersion": "0.6.0", "name": "t",
         "app": {"isolators": isos}}
    d.update(top)
    return d


def iso(name, **value):
    return {"name": name, "value": value}


def errmsg(d):
    with pytest.raises(ManifestError) as ei:
        mf.parse(d)
    return ei.value


# ------------------------------------------------------------- nrm format ---

GOOD_NRM = [
    # (path, value, attribute getter, expected)
    ("app.slice.cpus", 4, lambda m: m.slice.cpus, 4),
    ("app.slice.cpus", "4", lambda m: m.slice.cpus, 4),
    ("app.slice.mems", 2, lambda m: m.slice.mems, 2),
    ("app.scheduler", {"policy": "SCHED_FIFO", "priority": 99}, lambda m: m.scheduler,
     mf.Scheduler("SCHED_FIFO", 99)),
    ("app.scheduler", {"policy": "sched_fifo", "priority": 1}, lambda m: m.scheduler,
     mf.Scheduler("SCHED_FIFO", 1)),
    ("app.scheduler", {"policy": "SCHED_OTHER", "priority": 0}, lambda m: m.scheduler,
     mf.Scheduler("SCHED_OTHER", 0)),
    ("app.scheduler", {"policy": "SCHED_HPC"}, lambda m: m.scheduler,
     mf.Scheduler("SCHED_HPC", 0)),
    ("app.scheduler", {}, lambda m: m.scheduler, mf.Scheduler()),
    ("app.hwbind", True, lambda m: m.hwbind, True),
    ("hwbind", True, lambda m: m.hwbind, True),
    ("app.perfwrapper", "1", lambda m: m.perfwrapper, True),
    ("app.power.policy", "ddcm", lambda m: m.power.policy, "DDCM"),
    ("app.power.policy", "Combined", lambda m: m.power.policy, "COMBINED"),
    ("app.power.policy", "DVFS", lambda m: m.power.policy, "DVFS"),
    ("app.power.policy", "NONE", lambda m: m.power.policy, "NONE"),
    ("app.power.profile", True, lambda m: m.power.profile, True),
    ("app.power.damper", "1ms", lambda m: m.power.damper, 0.001),
    ("app.power.damper", 0, lambda m: m.power.damper, 0.0),
    ("app.power.slowdown", 1.0, lambda m: m.power.slowdown, 1.0),
    ("app.power.slowdown", "1.25", lambda m: m.power.slowdown, 1.25),
    ("app.power", {"policy": "fixed", "settings": {0: {"level": 16}, "1": {"level": 8}}},
     lambda m: (m.power.policy, m.power.settings),
     ("FIXED", {0: {"level": 16, "frequency": None}, 1: {"level": 8, "frequency": None}})),
    ("app.power", {"policy": "FIXED", "settings": {1: {"frequency": "1.2GHz"}}},
     lambda m: m.power.settings, {1: {"level": 16, "frequency": 1.2e9}}),
    ("app.power", {"policy": "FIXED", "settings": {1: {"level": "4", "frequency": 1.4e9}}},
     lambda m: m.power.settings, {1: {"level": 4, "frequency": 1.4e9}}),
    ("app.power", {"policy": "FIXED", "settings": {1: {"frequency": "1400 MHz"}}},
     lambda m: m.power.settings, {1: {"level": 16, "frequency": 1.4e9}}),
    ("app.monitoring.enabled", False, lambda m: m.monitoring.enabled, False),
    ("app.monitoring.ratelimit", "0.5 s", lambda m: m.monitoring.ratelimit, 0.5),
    ("app.monitoring.ratelimit", 0, lambda m: m.monitoring.ratelimit, 0.0),
    ("app.image", {"path": "/i.sif"}, lambda m: m.image, mf.Image("/i.sif", "sif", [])),
    ("image", {"path": "/i.sif", "type": "sif", "binds": ["/a:/b", "/c"]},
     lambda m: m.image, mf.Image("/i.sif", "sif", ["/a:/b", "/c"])),
    ("app.image", {"path": "docker://ubuntu:22.04", "type": "docker"},
     lambda m: m.image, mf.Image("docker://ubuntu:22.04", "docker", [])),
    ("version", 1, lambda m: m.name, "t"),
    ("version", "1", lambda m: m.name, "t"),
    ("name", "example.com/app-1", lambda m: m.name, "example.com/app-1"),
    ("annotations", {"who": "me", "n": [1, 2]}, lambda m: m.extra["annotations"],
     {"who": "me", "n": [1, 2]}),
    ("x-site", {"queue": "debug"}, lambda m: m.extra["x-site"], {"queue": "debug"}),
]


@pytest.mark.parametrize("path,value,get,expected", GOOD_NRM)
def test_nrm_good_values(path, value, get, expected):
    m = mf.parse(nrm_with(path, value))
    assert get(m) == expected
    assert m.source_format == "nrm"


BAD_NRM = [
    # (path set, bad value, field named in the error, text in the message)
    ("app.slice.cpus", "x", "app.slice.cpus", "expected a positive integer, got 'x'"),
    ("app.slice.cpus", 0, "app.slice.cpus", "got 0"),
    ("app.slice.cpus", -2, "app.slice.cpus", "got -2"),
    ("app.slice.cpus", 1.5, "app.slice.cpus", "got 1.5"),
    ("app.slice.cpus", True, "app.slice.cpus", "got True"),
    ("app.slice.mems", None, "app.slice.mems", "got None"),
    ("app.slice", [1, 1], "app.slice", "expected a mapping"),
    ("app.scheduler.policy", "SCHED_RR", "app.scheduler.policy",
     "SCHED_OTHER, SCHED_FIFO, SCHED_HPC, got 'SCHED_RR'"),
    ("app.scheduler", {"policy": "SCHED_FIFO", "priority": 0}, "app.scheduler.priority",
     "1..99 for SCHED_FIFO, got 0"),
    ("app.scheduler", {"policy": "SCHED_FIFO", "priority": 100}, "app.scheduler.priority",
     "got 100"),
    ("app.scheduler", {"policy": "SCHED_FIFO"}, "app.scheduler.priority", "missing"),
    ("app.scheduler", {"policy": "SCHED_OTHER", "priority": 5}, "app.scheduler.priority",
     "0 for SCHED_OTHER, got 5"),
    ("app.scheduler.priority", "high", "app.scheduler.priority", "got 'high'"),
    ("app.hwbind", "maybe", "app.hwbind", "got 'maybe'"),
    ("hwbind", 2, "hwbind", "got 2"),
    ("app.perfwrapper", "yes please", "app.perfwrapper", "got 'yes please'"),
    ("app.power.policy", "TURBO", "app.power.policy",
     "one of NONE, DDCM, DVFS, COMBINED, FIXED, COUNTDOWN, got 'TURBO'"),
    ("app.power.profile", "sometimes", "app.power.profile", "got 'sometimes'"),
    ("app.power.damper", "-1ms", "app.power.damper", "got '-1ms'"),
    ("app.power.damper", "1 h", "app.power.damper", "got '1 h'"),
    ("app.power.damper", -0.5, "app.power.damper", "got -0.5"),
    ("app.power.slowdown", 0.9, "app.power.slowdown", "a number >= 1.0, got 0.9"),
    ("app.power", {"policy": "FIXED"}, "app.power.settings", "missing"),
    ("app.power", {"policy": "FIXED", "settings": [1]}, "app.power.settings",
     "expected a mapping {RANK: {level: 1..16, frequency: HZ}}"),
    ("app.power", {"policy": "FIXED", "settings": {"x": {"level": 3}}},
     "app.power.settings.x", "a rank (an integer >= 0) as the key, got 'x'"),
    ("app.power", {"policy": "FIXED", "settings": {-1: {"level": 3}}},
     "app.power.settings.-1", "given once, got -1"),
    ("app.power", {"policy": "FIXED", "settings": {0: {"level": 3}, "0": {"level": 4}}},
     "app.power.settings.0", "given once"),
    ("app.power", {"policy": "FIXED", "settings": {0: {"level": 17}}},
     "app.power.settings.0.level", "an integer 1..16, got 17"),
    ("app.power", {"policy": "FIXED", "settings": {0: {}}},
     "app.power.settings.0.level", "missing (expected a level 1..16 or a frequency"),
    ("app.power", {"policy": "FIXED", "settings": {0: {"frequency": "fast"}}},
     "app.power.settings.0.frequency", "a frequency > 0"),
    ("app.power", {"policy": "FIXED", "settings": {0: {"frequency": 0}}},
     "app.power.settings.0.frequency", "got 0"),
    ("app.power", {"policy": "FIXED", "settings": {0: {"lvl": 3}}},
     "app.power.settings.0.lvl", "did you mean 'level'?"),
    ("app.power.slowdown", "nan", "app.power.slowdown", "got 'nan'"),
    ("app.power.slowdown", float("inf"), "app.power.slowdown", "got inf"),
    ("app.monitoring.enabled", "on-ish", "app.monitoring.enabled", "got 'on-ish'"),
    ("app.monitoring.ratelimit", "fast", "app.monitoring.ratelimit", "got 'fast'"),
    ("app.image", {"type": "sif"}, "app.image.path", "missing"),
    ("app.image", {"path": ""}, "app.image.path", "got ''"),
    ("app.image", {"path": "/i", "type": "qcow2"}, "app.image.type",
     "one of sif, docker, got 'qcow2'"),
    ("app.image", {"path": "/i", "binds": "/a:/b"}, "app.image.binds", "got '/a:/b'"),
    ("app.image", {"path": "/i", "binds": ["/a:/b,/etc:/x"]}, "app.image.binds[0]",
     "no commas"),
    ("app.image", {"path": "/i", "binds": [3]}, "app.image.binds[0]", "got 3"),
    ("app.image", {"path": "/i", "bind": []}, "app.image.bind", "did you mean 'binds'"),
    ("version", 2, "version", "manifest format version 1, got 2"),
    ("version", "one", "version", "got 'one'"),
    ("name", "", "name", "got ''"),
    ("name", 42, "name", "got 42"),
    ("name", "a\nb", "name", "control characters"),
    ("name", "n" * 256, "name", "at most 255"),
    ("annotations", ["a"], "annotations", "expected a mapping"),
    ("annotations", {"k": {1, 2}}, "annotations.k", "JSON-compatible"),
    ("x-site", {"v": float("nan")}, "x-site.v", "a finite number"),
]


@pytest.mark.parametrize("path,value,field,text", BAD_NRM)
def test_nrm_bad_values(path, value, field, text):
    e = errmsg(nrm_with(path, value))
    assert e.field == field
    assert text in str(e)
    assert str(e).startswith(field + ": ")


def test_error_message_shape():
    e = errmsg(nrm_with("app.slice.cpus", "x"))
    assert str(e) == "app.slice.cpus: expected a positive integer, got 'x'"
    assert e.value == "x"
    assert isinstance(e, ValueError)


UNKNOWN_KEYS = [
    ("nmae", "nmae", "did you mean 'name'"),
    ("app.slyce", "app.slyce", "did you mean 'slice'"),
    ("app.slice.gpus", "app.slice.gpus", "allowed: cpus, mems"),
    ("app.scheduler.prio", "app.scheduler.prio", "did you mean 'priority'"),
    ("app.power.enabled", "app.power.enabled", "unknown key"),
    ("app.monitoring.rate", "app.monitoring.rate", "unknown key"),
    ("y-thing", "y-thing", "x-*"),
]


@pytest.mark.parametrize("path,field,text", UNKNOWN_KEYS)
def test_unknown_keys_are_errors(path, field, text):
    e = errmsg(nrm_with(path, 1))
    assert e.field == field
    assert "unknown key" in str(e) and text in str(e)


MISSING = [
    ("name", "name"),
    ("app", "app"),
    ("app.slice", "app.slice"),
    ("app.slice.cpus", "app.slice.cpus"),
    ("app.slice.mems", "app.slice.mems"),
]


@pytest.mark.parametrize("path,field", MISSING)
def test_required_fields(path, field):
    d = copy.deepcopy(BASE)
    keys = path.split(".")
    cur = d
    for k in keys[:-1]:
        cur = cur[k]
    del cur[keys[-1]]
    e = errmsg(d)
    assert e.field == field and "missing" in str(e)


def test_defaults():
    m = mf.parse(BASE)
    assert m == mf.Manifest("t", mf.Slice(1, 1))
    assert (m.scheduler, m.hwbind, m.perfwrapper, m.image) == (
        mf.Scheduler("SCHED_OTHER", 0), False, False, None)
    assert m.power == mf.Power("NONE", False, 0.001, 1.1)
    assert m.monitoring == mf.Monitoring(True, 0.01)
    assert m.warnings == [] and m.extra == {}


@pytest.mark.parametrize("key", ["hwbind", "image"])
def test_top_level_and_app_both_given_is_an_error(key):
    value = True if key == "hwbind" else {"path": "/i.sif"}
    d = nrm_with("app." + key, value)
    d[key] = value
    assert errmsg(d).field == "app." + key


def test_sched_hpc_priority_forced_with_warning():
    m = mf.parse(nrm_with("app.scheduler", {"policy": "SCHED_HPC", "priority": 7}))
    assert m.scheduler == mf.Scheduler("SCHED_HPC", 0)
    assert any("app.scheduler.priority" in w and "7" in w for w in m.warnings)


def test_fixed_settings_with_another_policy_are_ignored_with_a_warning():
    m = mf.parse(nrm_with("app.power", {"policy": "DDCM", "settings": {0: {"level": 3}}}))
    assert m.power.policy == "DDCM"
    assert any("app.power.settings: ignored: policy DDCM" in w for w in m.warnings)


def test_power_policy_without_monitoring_warns():
    d = nrm_with("app.power.policy", "DDCM")
    d["app"]["monitoring"] = {"enabled": False}
    assert any("monitoring" in w for w in mf.parse(d).warnings)
    assert mf.parse(nrm_with("app.power.policy", "DDCM")).warnings == []


# ------------------------------------------------------------- durations ---

DURATIONS_NRM = [
    (1, 1.0), (0.25, 0.25), ("2", 2.0), ("1e-3", 0.001),
    ("500ns", 5e-7), ("10us", 1e-5), ("3\u00b5s", 3e-6), ("1ms", 0.001),
    ("0.1ms", 0.0001), ("0.5 s", 0.5), (" 2s ", 2.0), ("1.5ms", 0.0015),
]


@pytest.mark.parametrize("value,seconds", DURATIONS_NRM)
def test_durations_nrm_format(value, seconds):
    m = mf.parse(nrm_with("app.power.damper", value))
    assert m.power.damper == seconds
    m = mf.parse(nrm_with("app.monitoring.ratelimit", value))
    assert m.monitoring.ratelimit == seconds


DURATIONS_ACI_DAMPER = [
    ("0.1", 0.1),            # the seed example: below 1000 means seconds
    ("999", 999.0),
    ("1000", 1e-6),          # 1000 and above is nanoseconds (the seed daemon's reading)
    ("100000000", 0.1),
    (0.1, 0.1),
    (100000000, 0.1),
    ("5ms", 0.005),          # units win over the magnitude rule
    ("2000s", 2000.0),
]


@pytest.mark.parametrize("value,seconds", DURATIONS_ACI_DAMPER)
def test_aci_damper_rule(value, seconds):
    m = mf.parse(aci(iso("argo/power", policy="DDCM", damper=value)))
    assert m.power.damper == seconds


DURATIONS_ACI_RATELIMIT = [
    ("10000000", 0.01),      # the seed example: 10 ms in nanoseconds
    ("1", 1e-9),
    (0, 0.0),
    ("20ms", 0.02),
    ("1 s", 1.0),
]


@pytest.mark.parametrize("value,seconds", DURATIONS_ACI_RATELIMIT)
def test_aci_ratelimit_is_nanoseconds(value, seconds):
    m = mf.parse(aci(iso("argo/monitoring", enabled="1", ratelimit=value)))
    assert m.monitoring.ratelimit == seconds


@pytest.mark.parametrize("value", ["", "ms", "1 ms s", "1m", "-1", "1e", True, None, [1],
                                   float("nan"), "inf"])
def test_parse_duration_rejects(value):
    with pytest.raises(ManifestError) as ei:
        mf.parse_duration(value, "d")
    assert ei.value.field == "d"


# ------------------------------------------------------------- ACI format ---

SEED = {"acKind": "ImageManifest", "acVersion": "0.6.0", "name": "test",
        "app": {"isolators": [
            {"name": "argo/scheduler", "value": {"policy": "SCHED_OTHER", "priority": "0"}},
            {"name": "argo/container", "value": {"cpus": "4", "mems": "1"}},
            {"name": "argo/perfwrapper", "value": {"enabled": "1"}},
            {"name": "argo/power", "value": {"enabled": "1", "profile": "1", "policy": "DDCM",
                                             "damper": "0.1", "slowdown": "1.1"}},
            {"name": "argo/hwbind", "value": {"enabled": "1"}},
            {"name": "argo/monitoring", "value": {"enabled": "1", "ratelimit": "10000000"}}]}}


def test_seed_manifest():
    m = mf.parse(json.dumps(SEED))
    assert m == mf.Manifest(
        "test", mf.Slice(4, 1), mf.Scheduler("SCHED_OTHER", 0), True, True,
        mf.Power("DDCM", True, 0.1, 1.1), mf.Monitoring(True, 0.01), None, "aci", [])


ENABLED_FORMS = [
    ("1", True), ("0", False), ("True", True), ("False", False), ("true", True),
    ("FALSE", False), (True, True), (False, False), (1, True), (0, False), (1.0, True),
    (None, True),   # no "enabled" at all: a present isolator is on
]


@pytest.mark.parametrize("value,on", ENABLED_FORMS)
@pytest.mark.parametrize("name,get", [
    ("argo/hwbind", lambda m: m.hwbind),
    ("argo/perfwrapper", lambda m: m.perfwrapper),
    ("argo/monitoring", lambda m: m.monitoring.enabled),
    ("argo/power", lambda m: m.power.policy == "DDCM"),
    ("argo/powerpolicy", lambda m: m.power.policy == "DDCM"),
    ("argo/scheduler", lambda m: m.scheduler.policy == "SCHED_HPC"),
])
def test_enabled_forms(name, get, value, on):
    extra = {"argo/power": {"policy": "DDCM"}, "argo/powerpolicy": {"policy": "DDCM"},
             "argo/scheduler": {"policy": "SCHED_HPC"}}.get(name, {})
    v = dict(extra)
    if value is not None:
        v["enabled"] = value
    assert get(mf.parse(aci(iso(name, **v)))) is on


@pytest.mark.parametrize("value", ["2", "yes?", "", 2, [1]])
def test_enabled_bad(value):
    e = errmsg(aci(iso("argo/hwbind", enabled=value)))
    assert e.field == "app.isolators[argo/hwbind].enabled"


def test_absent_isolators_are_off():
    m = mf.parse(aci())
    assert (m.hwbind, m.perfwrapper, m.power, m.scheduler) == (
        False, False, mf.Power(), mf.Scheduler())
    assert m.monitoring == mf.Monitoring()


def test_powerpolicy_legacy_name():
    m = mf.parse(aci(iso("argo/powerpolicy", enabled="1", policy="dvfs")))
    assert m.power == mf.Power("DVFS", False, 0.001, 1.1)


def test_power_and_powerpolicy_together_is_an_error():
    e = errmsg(aci(iso("argo/power", policy="DDCM"), iso("argo/powerpolicy", policy="DDCM")))
    assert e.field == "app.isolators[argo/powerpolicy]" and "twice" in str(e)


BAD_ACI = [
    (iso("argo/container", cpus="x", mems="1"), "app.isolators[argo/container].cpus",
     "expected a positive integer, got 'x'"),
    (iso("argo/container", cpus="0", mems="1"), "app.isolators[argo/container].cpus",
     "got '0'"),
    (iso("argo/container", cpus="2", mems="-1"), "app.isolators[argo/container].mems",
     "got '-1'"),
    (iso("argo/container", cpus="2"), "app.isolators[argo/container].mems", "missing"),
    (iso("argo/container", cpus="2", mems="1", enabled="0"),
     "app.isolators[argo/container].enabled", "cannot be disabled"),
    (iso("argo/scheduler", policy="SCHED_BATCH"), "app.isolators[argo/scheduler].policy",
     "got 'SCHED_BATCH'"),
    (iso("argo/scheduler", policy="SCHED_FIFO", priority="0"),
     "app.isolators[argo/scheduler].priority", "got '0'"),
    (iso("argo/power", policy="FAST"), "app.isolators[argo/power].policy", "got 'FAST'"),
    (iso("argo/power", policy="DDCM", slowdown="0.5"), "app.isolators[argo/power].slowdown",
     "got '0.5'"),
    (iso("argo/power", policy="DDCM", damper="soon"), "app.isolators[argo/power].damper",
     "got 'soon'"),
    (iso("argo/power", profile="2"), "app.isolators[argo/power].profile", "got '2'"),
    (iso("argo/powerpolicy", policy="X"), "app.isolators[argo/powerpolicy].policy",
     "got 'X'"),
    (iso("argo/monitoring", ratelimit="-5"), "app.isolators[argo/monitoring].ratelimit",
     "got '-5'"),
    ({"name": "argo/hwbind", "value": "1"}, "app.isolators[argo/hwbind]",
     "expected a mapping"),
    ({"value": {}}, "app.isolators[0].name", "got None"),
    ("argo/hwbind", "app.isolators[0]", "expected a mapping"),
]


@pytest.mark.parametrize("isolator,field,text", BAD_ACI)
def test_aci_bad_values(isolator, field, text):
    e = errmsg(aci(isolator))
    assert e.field == field
    assert text in str(e)


BAD_ACI_SHAPE = [
    ({"acKind": "PodManifest", "name": "t", "app": {"isolators": []}}, "acKind"),
    ({"acKind": "ImageManifest", "app": {"isolators": []}}, "name"),
    ({"acKind": "ImageManifest", "name": "t", "app": {"isolators": {}}}, "app.isolators"),
    ({"acKind": "ImageManifest", "name": "t"}, "app"),
    ({"acKind": "ImageManifest", "name": "t", "app": {"isolators": []}},
     "app.isolators[argo/container]"),
]


@pytest.mark.parametrize("d,field", BAD_ACI_SHAPE)
def test_aci_bad_shape(d, field):
    assert errmsg(d).field == field


def test_aci_unknowns_are_warnings():
    d = aci(iso("argo/network", mode="host"), iso("argo/hwbind", enabled="1", cores="all"),
            labels=[{"name": "os", "value": "linux"}])
    d["app"]["exec"] = ["/bin/true"]
    m = mf.parse(d)
    assert m.hwbind is True
    joined = "\n".join(m.warnings)
    for text in ("app.isolators[argo/network]: unknown isolator ignored",
                 "app.isolators[argo/hwbind].cores", "app.exec", "labels"):
        assert text in joined


def test_aci_detected_without_ackind():
    d = aci()
    del d["acKind"]
    m = mf.parse(d)
    assert m.source_format == "aci" and any("acKind" in w for w in m.warnings)


def test_aci_annotations_kept():
    m = mf.parse(aci(annotations=[{"name": "who", "value": "me"}]))
    assert m.extra == {"annotations": {"who": "me"}}
    assert mf.Manifest.from_dict(m.to_dict()).extra == m.extra


def test_aci_duplicate_isolator():
    e = errmsg(aci(iso("argo/hwbind"), iso("argo/hwbind")))
    assert e.field == "app.isolators[argo/hwbind]"


# ---------------------------------------------------------- text and files ---

def test_format_decided_by_content_not_extension(tmp_path):
    (tmp_path / "seed.yml").write_text(json.dumps(SEED))
    (tmp_path / "new.json").write_text(yaml.safe_dump(BASE))
    assert mf.load(str(tmp_path / "seed.yml")).source_format == "aci"
    assert mf.load(str(tmp_path / "new.json")).source_format == "nrm"


JSON_ERRORS = [
    ('{"name": "t" "app": {}}', "line 1, column 14"),
    ('{\n  "name": "t",\n  "app": {"slice": {"cpus": 1 "mems": 1}}\n}', "line 3"),
    ('{"name": "t", "app": ', "invalid JSON"),
    ('{"name": "t", "name": "u", "app": {}}', "duplicate key 'name'"),
    ('[1, 2', "invalid JSON"),
]


@pytest.mark.parametrize("text,where", JSON_ERRORS)
def test_json_syntax_errors(text, where):
    e = errmsg(text)
    assert e.field is None
    assert str(e).startswith("<manifest>: invalid JSON")
    assert where in str(e)


def test_flow_yaml_starting_with_brace_is_accepted():
    assert mf.parse("{name: t, app: {slice: {cpus: 2, mems: 1}}}").slice == mf.Slice(2, 1)


YAML_ERRORS = [
    ("name: t\napp: [\n", "invalid YAML at line"),
    ("name: t\n  bad indent: 1\n", "invalid YAML at line"),
    ("name: t\nname: u\napp: {}\n", "line 2, column 1: duplicate key 'name'"),
    ("name: t\napp:\n  slice: {cpus: 1, mems: 1}\n  slice: {cpus: 2, mems: 1}\n",
     "duplicate key 'slice'"),
    ("name: !!python/object/apply:os.system [true]\n", "could not determine a constructor"),
]


@pytest.mark.parametrize("text,where", YAML_ERRORS)
def test_yaml_errors(text, where):
    e = errmsg(text)
    assert e.field is None and where in str(e)


TOP_LEVEL = [
    ("", "empty manifest"), ("   \n", "empty manifest"), ("- a\n- b\n", "must be a mapping"),
    ("just a string", "must be a mapping"), ("42", "must be a mapping"),
    ("[1]", "must be a mapping"), ("~", "must be a mapping"),
]


@pytest.mark.parametrize("text,msg", TOP_LEVEL)
def test_top_level_must_be_a_mapping(text, msg):
    assert msg in str(errmsg(text))


def test_size_limit():
    pad = "# " + "p" * 100 + "\n"
    small = yaml.safe_dump(BASE)
    ok = small + pad * ((mf.MAX_MANIFEST_BYTES - len(small)) // len(pad))
    assert len(ok) <= mf.MAX_MANIFEST_BYTES
    mf.parse(ok)
    big = small + pad * (mf.MAX_MANIFEST_BYTES // len(pad) + 1)
    e = errmsg(big)
    assert "64 KiB" in str(e) and str(len(big)) in str(e)
    assert "64 KiB" in str(errmsg(big.encode()))


def test_alias_bomb_in_user_metadata_is_bounded():
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        lines.append("a%d: &a%d [%s]" % (i, i, ", ".join(["*a%d" % (i - 1)] * 9)))
    text = "name: t\napp: {slice: {cpus: 1, mems: 1}}\nx-bomb:\n" + "".join(
        "  %s\n" % ln for ln in lines)
    assert len(text) < 1024
    e = errmsg(text)
    assert e.field == "x-bomb" and "too large" in str(e)


def test_recursive_alias_is_rejected():
    e = errmsg("name: t\napp: {slice: {cpus: 1, mems: 1}}\nx-loop: &l [*l]\n")
    assert e.field == "x-loop"
    e = errmsg("name: t\napp: {slice: {cpus: &c [*c], mems: 1}}\n")
    assert e.field == "app.slice.cpus"


def test_deep_nesting_is_a_manifest_error():
    for text in ("[" * 20000 + "]" * 20000, "a: " + "[" * 20000 + "]" * 20000):
        assert "nested too deeply" in str(errmsg(text))


def test_non_utf8():
    assert "UTF-8" in str(errmsg(b"name: \xff\n"))


def test_load_relative_to_given_cwd(tmp_path, monkeypatch):
    sub = tmp_path / "job"
    sub.mkdir()
    (sub / "m.yml").write_text(yaml.safe_dump(
        dict(BASE, app={"slice": {"cpus": 1, "mems": 1}, "image": {"path": "img.sif"}})))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    m = mf.load("m.yml", cwd=str(sub))
    assert m.image.path == str(sub / "img.sif")   # anchored to the manifest's directory
    assert mf.load("job/m.yml", cwd=str(tmp_path)) == m
    with pytest.raises(ManifestError) as ei:
        mf.load("m.yml")            # the process cwd, where no such file exists
    assert str(elsewhere / "m.yml") in str(ei.value)
    monkeypatch.chdir(sub)
    assert mf.load("m.yml") == m


LOAD_ERRORS = [
    ("missing.yml", "No such file"),
    (".", "Is a directory"),
]


@pytest.mark.parametrize("name,reason", LOAD_ERRORS)
def test_load_errors_name_the_path(tmp_path, name, reason):
    with pytest.raises(ManifestError) as ei:
        mf.load(name, cwd=str(tmp_path))
    full = os.path.normpath(os.path.join(str(tmp_path), name))
    assert str(ei.value).startswith(full + ": cannot read manifest")
    assert reason in str(ei.value)
    assert ei.value.source == full


def test_load_does_not_read_endless_files():
    if not os.path.exists("/dev/zero"):
        pytest.skip("no /dev/zero")
    assert "64 KiB" in str(pytest.raises(ManifestError, mf.load, "/dev/zero").value)


def test_load_sets_source_on_validation_errors(tmp_path):
    p = tmp_path / "bad.yml"
    p.write_text("name: t\napp: {slice: {cpus: x, mems: 1}}\n")
    with pytest.raises(ManifestError) as ei:
        mf.load(str(p))
    assert ei.value.source == str(p)
    assert str(ei.value) == "app.slice.cpus: expected a positive integer, got 'x'"


def test_image_path_kept_when_absolute_or_a_reference(tmp_path):
    for image in ({"path": "/abs/i.sif"}, {"path": "docker://x/y", "type": "docker"},
                  {"path": "library://x/y"}):
        p = tmp_path / "m.yml"
        p.write_text(yaml.safe_dump(dict(BASE, image=image)))
        assert mf.load(str(p)).image.path == image["path"]


# ------------------------------------------------------ round trip, examples ---

ROUND_TRIP = [
    BASE,
    SEED,
    nrm_with("app.scheduler", {"policy": "SCHED_FIFO", "priority": 42}),
    nrm_with("app.power", {"policy": "combined", "profile": True, "damper": "0.1ms",
                           "slowdown": 1.5}),
    nrm_with("app.image", {"path": "/i.sif", "binds": ["/a:/b:ro"]}),
    nrm_with("app.power", {"policy": "FIXED", "settings": {0: {"level": 8},
                                                           1: {"frequency": "1.2GHz"}}}),
    nrm_with("x-tool", {"nested": [1, "two", None, True, 2.5]}),
    nrm_with("annotations", {"date": "2024-01-01"}),
]


@pytest.mark.parametrize("d", ROUND_TRIP)
def test_round_trip(d):
    m = mf.parse(d)
    out = m.to_dict()
    assert json.loads(json.dumps(out)) == out           # JSON-able, nothing lost
    back = mf.Manifest.from_dict(json.loads(json.dumps(out)))
    assert dataclasses.replace(back, source_format=m.source_format, warnings=m.warnings) == m
    assert back.to_dict() == out
    assert out["version"] == 1


def test_from_dict_rejects_legacy_and_garbage():
    assert errmsg_from_dict(SEED).field == "acKind"
    assert errmsg_from_dict([1]).field == "manifest"
    assert errmsg_from_dict(nrm_with("app.slice.cpus", 0)).field == "app.slice.cpus"


def errmsg_from_dict(d):
    with pytest.raises(ManifestError) as ei:
        mf.Manifest.from_dict(d)
    return ei.value


def test_yaml_dates_in_annotations_become_strings():
    m = mf.parse("name: t\napp: {slice: {cpus: 1, mems: 1}}\nannotations: {when: 2024-01-02}\n")
    assert m.extra["annotations"] == {"when": "2024-01-02"}


def test_models_are_frozen():
    m = mf.parse(BASE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.slice.cpus = 2


SHIPPED = sorted(p for p in glob.glob(os.path.join(EXAMPLES, "*.json"))
                 + glob.glob(os.path.join(EXAMPLES, "*.yml"))
                 + glob.glob(os.path.join(EXAMPLES, "*.yaml"))
                 if not p.endswith((".campaign.yml", ".pilot.yml")))   # not manifests


def test_examples_exist():
    names = {os.path.basename(p) for p in SHIPPED}
    assert {"basic.json", "basic.yml", "mpi.yml", "ddcm.json", "fifo.yml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=os.path.basename)
def test_shipped_examples_parse_cleanly(path):
    m = mf.load(path)
    assert m.warnings == []
    assert mf.Manifest.from_dict(m.to_dict()).to_dict() == m.to_dict()


def same_but_identity(a, b):
    strip = dict(name="", source_format="", warnings=[])
    return dataclasses.replace(a, **strip) == dataclasses.replace(b, **strip)


PAIRS = [("basic.json", "basic.yml"), ("ddcm.json", "ddcm.yml")]


@pytest.mark.parametrize("aci_name,nrm_name", PAIRS)
def test_example_pairs_are_equivalent(aci_name, nrm_name):
    a = mf.load(os.path.join(EXAMPLES, aci_name))
    b = mf.load(os.path.join(EXAMPLES, nrm_name))
    assert (a.source_format, b.source_format) == ("aci", "nrm")
    assert same_but_identity(a, b)
    assert not same_but_identity(a, dataclasses.replace(b, hwbind=not b.hwbind))
