"""nrm campaign's own cost: per-run overhead and `status` on a large journal.

1. Overhead: a campaign of N runs of `true` (settle 0s) on a private nrmd
   (emulated hardware). Overhead per run = (coordinator wall time - sum of
   the runs' durations) / N. Baseline in the same run: N back-to-back
   ``Client.run`` of the same manifest and command on the same daemon (what
   a hand-written loop pays), reported as its own per-run time.
   Target: overhead <= 50 ms per run.
2. status: a journal of 100 000 finished runs (synthetic records in the
   coordinator's format, with a plan), ``status.collect`` timed (median of
   5). Target: < 1 s. Baseline: one ``json.load`` of the plan alone.

Prints one JSON object.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nrm.campaign import journal, spec, status  # noqa: E402
from nrm.campaign.runner import Coordinator  # noqa: E402
from nrm.client import Client  # noqa: E402
from nrm.tools.localnrmd import LocalNrmd  # noqa: E402

RUNS = int(os.environ.get("CAMPAIGN_BENCH_RUNS", "60"))
STATUS_RUNS = 100_000


class _Quiet:
    def write(self, _text):
        pass

    def flush(self):
        pass


def overhead(work: str) -> dict:
    with open(os.path.join(work, "m.yml"), "w") as f:
        f.write("name: bench\napp:\n  slice: {cpus: 1, mems: 1}\n")
    path = os.path.join(work, "c.yml")
    with open(path, "w") as f:
        f.write("name: bench\nmanifest: m.yml\ncommand: [\"true\"]\n"
                f"parameters: {{i: {list(range(RUNS))}}}\nsettle: 0s\n")
    camp = spec.load(path)
    with LocalNrmd("--hw", "emulated", prefix="nrm-bench-") as nrmd:
        client = Client(nrmd.rundir)
        manifest = camp.manifest_for(camp.runs()[0])
        t0 = time.monotonic()
        for _ in range(RUNS):
            client.run(manifest, ["true"], stdout=None, stderr=None)
        baseline = (time.monotonic() - t0) / RUNS
        d = os.path.join(work, "d")
        t0 = time.monotonic()
        rc = Coordinator(camp, d, client=client, out=_Quiet()).run()
        wall = time.monotonic() - t0
        client.close()
    rows = [r["row"] for r in journal.read(d)[0] if r.get("e") == "finished"]
    busy = sum(r["duration_s"] or 0.0 for r in rows)
    return {"runs": RUNS, "exit_status": rc, "wall_s": round(wall, 4),
            "sum_of_durations_s": round(busy, 4),
            "overhead_per_run_ms": round((wall - busy) / RUNS * 1000, 2),
            "baseline_client_run_ms": round(baseline * 1000, 2),
            "target_ms": 50}


def status_time(work: str) -> dict:
    d = os.path.join(work, "big")
    os.makedirs(d)
    plan = []
    with open(os.path.join(d, journal.JOURNAL), "w") as f:
        for i in range(STATUS_RUNS):
            params = {"policy": ("NONE", "DDCM", "DVFS", "COMBINED")[i % 4],
                      "cap_w": ("off", 150, 120)[i % 3], "size": i // 12}
            rid = spec.run_id(params, 0)
            plan.append(spec.Run(rid, params, 0))
            row = dict(params, repetition=0, run_id=rid, attempt=1, node="vm",
                       container=f"campaign-big-{rid}-a1", start_utc="2026-01-01T00:00:00Z",
                       duration_s=1.234, outcome="ok", exit_code=0, signal=None, error=None,
                       energy_j=123.4, energy_source="rapl", avg_power_w=100.0,
                       cap_applied_w=None, policy=params["policy"], nrm_version="0.1.0",
                       nrmd_version="0.1.0", gflops=12.5)
            f.write(json.dumps({"e": "started", "id": rid, "attempt": 1, "params": params,
                                "repetition": 0, "inputs": "0" * 16, "node": "vm",
                                "container": row["container"], "t": 0.0}) + "\n")
            f.write(json.dumps({"e": "finished", "id": rid, "attempt": 1,
                                "repetition": 0, "inputs": "0" * 16, "outcome": "ok",
                                "t": 0.0, "row": row}) + "\n")
    journal.write_plan(d, plan)
    size = os.path.getsize(os.path.join(d, journal.JOURNAL))
    times, base = [], []
    for _ in range(5):
        t0 = time.perf_counter()
        data = status.collect(d)
        status.render(data)
        times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with open(os.path.join(d, journal.PLAN)) as f:
            json.load(f)
        base.append(time.perf_counter() - t0)
    assert data["states"] == {"done": STATUS_RUNS}, data["states"]
    return {"finished_runs": STATUS_RUNS, "journal_mb": round(size / 1e6, 1),
            "status_median_s": round(statistics.median(times), 3),
            "baseline_plan_json_load_s": round(statistics.median(base), 3), "target_s": 1.0}


def main() -> int:
    work = tempfile.mkdtemp(prefix="nrm-campaign-bench-")
    try:
        out = {"overhead": overhead(work), "status": status_time(work),
               "cpus": os.cpu_count(), "load_average": os.getloadavg()}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    json.dump(out, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
