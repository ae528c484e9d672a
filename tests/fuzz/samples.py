"""Valid messages of every kind, the seeds the mutators start from."""

from __future__ import annotations

import json

import msgspec

from nrm import protocol

_MANIFEST = {"name": "fuzz", "version": 1, "app": {"slice": {"cpus": 1, "mems": 1}}}


def _plain(msg) -> dict:
    return json.loads(protocol.encode(msg))


REQUESTS = [_plain(m) for m in (
    protocol.Run(id=1, manifest=_MANIFEST, argv=["/bin/true"], env={"A": "b"}, cwd="/",
                 container="c1", cpus_allowed=[0], window=1 << 20, key="p.1.1"),
    protocol.Credit(id=1, consumed=65536),
    protocol.Signal(id=2, task="t1", signum=2),
    protocol.Kill(id=3, container="c1"),
    protocol.ListContainers(id=4),
    protocol.Status(id=5),
    protocol.Power(id=6),
    protocol.SetPower(id=7, watts=100.0),
    protocol.Report(id=8, container="c1"),
    protocol.Claim(id=9, keys=["p.1.1", "p.2.1"]),
    protocol.Forget(id=10, keys=["p.1.1"], prefix="p."),
    protocol.RunBatch(id=11, manifest=_MANIFEST, env={"A": "b"}, tasks=[
        protocol.BatchTask(key="p.3.1", container="c3", argv=["/bin/true"], cpus=[0])]),
)]
REQUEST_KEYS = sorted({f.name for t in protocol.Request.__args__
                       for f in msgspec.structs.fields(t)})
assert sorted(protocol.request_tags()) == sorted(r["type"] for r in REQUESTS)

DOWNSTREAM = [_plain(m) for m in (
    protocol.DStart(container="c1", task="t1", app="a", pid=42),
    protocol.DProgress(container="c1", task="t1", app="a", payload=7),
    protocol.DPhaseContext(container="c1", task="t1", app="a", rank=0, cpu=1, phase=4,
                           aggregation=4, computetime=1000, totaltime=2000),
    protocol.DPerformance(container="c1", task="t1", app="a", payload=1.5, interval=0.1),
    protocol.DExit(container="c1", task="t1", app="a"),
)]
DOWNSTREAM_KEYS = sorted({f.name for t in protocol.Downstream.__args__
                          for f in msgspec.structs.fields(t)})
assert sorted(protocol.downstream_tags()) == sorted(d["type"] for d in DOWNSTREAM)

# FACTS section 2: every seed-era event, both phase_context variants.
SEED = [
    {"type": "application", "event": "start", "container": "c1", "uuid": "app",
     "progress": True, "threads": None},
    {"type": "application", "event": "progress", "payload": "12", "uuid": "app"},
    {"type": "application", "event": "phase_context", "cpu": "1", "startcompute": "100",
     "endcompute": "250", "startbarrier": "250", "endbarrier": "400", "uuid": "app"},
    {"type": "application", "event": "phase_context", "cpu": "1", "aggregation": "4",
     "computetime": "1000", "totaltime": "2000", "uuid": "app"},
    {"type": "application", "event": "exit", "uuid": "app"},
]
SEED_KEYS = sorted({k for m in SEED for k in m})
