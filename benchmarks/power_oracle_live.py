"""The live part of the power-oracle benchmark: the patterns on the emulated node.

Why: the deterministic part (power_oracle.py) says what the policies would
save on the documented plant; this part checks it on the real daemon, the
real interposer and the emulated node's actuation (cgroup CPU bandwidth),
with the oracle measured on the same machine in the same run.

A private nrmd (``--hw emulated``) runs ``examples/patterns -p PATTERN``
under ``nrm run --profile-json`` once per policy NONE, DDCM, DVFS, COMBINED,
COUNTDOWN and ORACLE, for ``--rounds`` rounds in ABBA order (the policy order reversed
every other round, so that a drift of the machine's load does not favour a
policy). ORACLE is the manifest policy FIXED with settings computed here
from the program's own work table (``patterns -W``): each rank pinned at
the cheapest (level, frequency) of the emulated model whose speed covers
its largest need over the run, ``max_i w[i][r] / max_r' w[i][r']``. That is
the best *static* per-rank setting (docs/policies.md says why a per-phase
oracle cannot be pinned live); for static and balanced patterns it equals
the per-phase oracle of the deterministic part, for the others the model's
figure for both is in the output (``oracle_model``).

Each policy's time and energy are divided by the same round's NONE for the
same pattern; the medians over rounds are reported, with the ORACLE's
saving and each policy's fraction of it (median of the per-round
fractions). Energy is the container's package energy from the profile;
time is the program's own (first to last barrier). The machine's load
average is recorded per round.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPO, "examples")
sys.path[:0] = [REPO, os.path.dirname(os.path.abspath(__file__))]

import power_oracle as model  # noqa: E402  (the deterministic part: the model's oracle)

LIVE_POLICIES = ("NONE", "DDCM", "DVFS", "COMBINED", "COUNTDOWN", "ORACLE")
CONTROL = "CONTROL"
"""NONE run a second time in each round, in a position of its own: the A/A
control. Its median against NONE is what the benchmark reads when nothing
differs, so a policy's median is only told apart from "costs nothing" where
it is outside the control's interval (asked for with ``--policies``)."""
MANIFEST_POLICY = {"ORACLE": "FIXED", CONTROL: "NONE"}
LIVE_PATTERNS = ("static", "shifting", "phase-varying", "noisy", "random-walk", "balanced")
FOUR_RANK = ("static4",)
UNIT = 60_000_000
"""Loop iterations in one work unit: ~100 ms on this machine's cores, >= 6 CFS periods."""


def ranks_for(pattern: str) -> int:
    return 4 if pattern in FOUR_RANK else 2


def unit_for(pattern: str, unit: int) -> int:
    """phase-varying's type B has 0.6 units on its critical rank: keep it >= one unit's time."""
    return int(unit / 0.6) if pattern == "phase-varying" else unit


def build() -> str:
    r = subprocess.run(["make", "-s", "-C", EXAMPLES, "patterns"], capture_output=True,
                       env=dict(os.environ, PREFIX=sys.prefix))
    path = os.path.join(EXAMPLES, "patterns")
    if r.returncode != 0 or not os.path.exists(path):
        raise SystemExit("power_oracle --live: cannot build examples/patterns:\n"
                         + r.stderr.decode(errors="replace")[-2000:])
    return path


def work_table(mpiexec: str, binary: str, pattern: str, args: Sequence[str]) -> List[List[float]]:
    """The program's own work table, [phase][rank] in units."""
    r = subprocess.run([mpiexec, "-n", str(ranks_for(pattern)), binary, "-p", pattern,
                        *args, "-W"], capture_output=True, timeout=60)
    if r.returncode != 0:
        raise SystemExit(f"patterns -W failed: {r.stderr.decode(errors='replace')}")
    rows: Dict[int, Dict[int, float]] = {}
    for m in re.finditer(r"work phase=(\d+) rank=(\d+) units=([\d.]+)", r.stdout.decode()):
        rows.setdefault(int(m[1]), {})[int(m[2])] = float(m[3])
    return [[rows[i][r] for r in sorted(rows[i])] for i in sorted(rows)]


def oracle_settings(work: List[List[float]]) -> Dict[int, dict]:
    """Per rank, the cheapest COMBINED setting covering its largest need of the run."""
    out = {}
    for r in range(len(work[0])):
        need = max(row[r] / max(row) for row in work)
        level, hz = model.cheapest("COMBINED", need)
        out[r] = {"level": level, "frequency": hz}
    return out


def oracle_model(work: List[List[float]], settings: Dict[int, dict]) -> dict:
    """What the model says the static (pinned) and the per-phase oracles save."""
    pins = [(settings[r]["level"], settings[r]["frequency"]) for r in sorted(settings)]
    base_t = sum(max(row) for row in work)
    base_e = base_t * model.power([(model.LEVELS, model.FMAX)] * len(pins))
    static_t = sum(max(w / model.speed(pins[r]) for r, w in enumerate(row)) for row in work)
    static_e = static_t * model.power(pins)
    return {"static_saving": round(1 - static_e / base_e, 4),
            "static_slowdown": round(static_t / base_t - 1, 4),
            "per_phase_saving": round(1 - model.oracle_energy("COMBINED", work) / base_e, 4)}


def manifest(policy: str, settings: Optional[Dict[int, dict]], directory: str) -> str:
    body = {"name": f"oracle-{policy.lower()}",
            "app": {"slice": {"cpus": 2, "mems": 1},
                    "power": {"policy": MANIFEST_POLICY.get(policy, policy),
                              "profile": True, "damper": "1ms", "slowdown": 1.1}}}
    if policy == "ORACLE":
        body["app"]["power"]["settings"] = {str(r): s for r, s in settings.items()}
    path = os.path.join(directory, f"{policy.lower()}.json")
    with open(path, "w") as f:
        json.dump(body, f)
    return path


def run_one(nrmd, mpiexec: str, binary: str, pattern: str, policy: str, args: Sequence[str],
            settings, workdir: str) -> dict:
    profile = os.path.join(workdir, "profile.json")
    if os.path.exists(profile):
        os.unlink(profile)
    ranks = ranks_for(pattern)
    path = manifest(policy, settings, workdir)
    with open(path) as f:
        doc = json.load(f)
    doc["app"]["slice"]["cpus"] = ranks
    with open(path, "w") as f:
        json.dump(doc, f)
    r = nrmd.cli("run", "--profile-json", profile, path, mpiexec, "-n", str(ranks),
                 "-bind-to", "core", binary, "-p", pattern, *args, timeout=600, cwd=workdir)
    row = {"pattern": pattern, "policy": policy, "status": r.returncode}
    m = re.search(r"patterns: .* time=([\d.]+)s", r.stdout.decode(errors="replace"))
    if r.returncode != 0 or m is None or not os.path.exists(profile):
        row["error"] = (r.stderr.decode(errors="replace") or r.stdout.decode())[-400:]
        return row
    with open(profile) as f:
        prof = json.load(f)
    row["time_s"] = float(m[1])
    row["energy_j"] = (prof.get("energy") or {}).get("energy_j")
    pol = prof.get("policy") or {}
    row["final_settings"] = pol.get("final_settings", {})
    row["decisions"] = pol.get("decisions", 0)
    return row


def _median(values):
    return statistics.median(values) if values else None


def median_ci(values: Sequence[float], level: float = 0.95) -> Optional[List[float]]:
    """A distribution-free confidence interval of the median: the order
    statistics [x_k, x_(n+1-k)] with the largest k such that
    P(Binomial(n, 1/2) < k) <= (1 - level) / 2.

    Why: under foreign load one run's time moves by several percent, so
    a median over rounds means little without the interval it is known
    to; the rounds' ratios are neither normal nor symmetric, hence order
    statistics rather than a standard error. None when there are too few
    values for the level (fewer than 6 at 95 %)."""
    xs = sorted(values)
    n = len(xs)
    tail = (1 - level) / 2
    k, below = 0, 0.0
    while k < n // 2 and below + math.comb(n, k) / 2 ** n <= tail:
        below += math.comb(n, k) / 2 ** n
        k += 1
    return [xs[k - 1], xs[n - k]] if k else None


def summarize(rows: List[dict], patterns: Sequence[str], policies: Sequence[str],
              unpinned: Sequence[str] = ()) -> List[dict]:
    """Medians over rounds per (pattern, policy). ``unpinned``: patterns whose
    ORACLE pins every rank at full speed (it is NONE): no fraction of it, since
    its saving there is only the rounds' noise."""
    out = []
    for pattern in patterns:
        rounds = sorted({r["round"] for r in rows if r["pattern"] == pattern})
        per: Dict[str, Dict[str, list]] = {p: {"t": [], "e": [], "frac": []} for p in policies}
        for k in rounds:
            here = {r["policy"]: r for r in rows if r["pattern"] == pattern and r["round"] == k
                    and r.get("energy_j")}
            base = here.get("NONE")
            if base is None:
                continue
            oracle = here.get("ORACLE")
            o_saving = 1 - oracle["energy_j"] / base["energy_j"] if oracle else None
            for p in policies:
                if p not in here:
                    continue
                t = here[p]["time_s"] / base["time_s"]
                e = here[p]["energy_j"] / base["energy_j"]
                per[p]["t"].append(t)
                per[p]["e"].append(e)
                if o_saving is not None and o_saving > 0.01 and pattern not in unpinned:
                    per[p]["frac"].append((1 - e) / o_saving)
        for p in policies:
            d = per[p]
            if not d["t"]:
                continue
            out.append({"pattern": pattern, "policy": p, "rounds": len(d["t"]),
                        "time_ratio": round(_median(d["t"]), 4),
                        "energy_ratio": round(_median(d["e"]), 4),
                        "saving": round(1 - _median(d["e"]), 4),
                        "slowdown": round(_median(d["t"]) - 1, 4),
                        "slowdown_ci95": _rounded_minus_one(median_ci(d["t"])),
                        "fraction_of_oracle": (round(_median(d["frac"]), 3)
                                               if d["frac"] else None),
                        "time_ratio_all": [round(x, 4) for x in d["t"]],
                        "energy_ratio_all": [round(x, 4) for x in d["e"]]})
    return out


def _rounded_minus_one(pair: Optional[List[float]]) -> Optional[List[float]]:
    return None if pair is None else [round(x - 1, 4) for x in pair]


def table(results: List[dict]) -> str:
    lines = [f"{'pattern':14} {'policy':9} {'saving':>7} {'time':>8} {'of ORACLE':>9}  "
             "per-round time / energy vs NONE (%)"]
    for r in results:
        frac = "-" if r["fraction_of_oracle"] is None else f"{r['fraction_of_oracle']:.2f}"
        per = ", ".join(f"{(t - 1) * 100:+.1f}/{(e - 1) * 100:+.1f}"
                        for t, e in zip(r["time_ratio_all"], r["energy_ratio_all"]))
        lines.append(f"{r['pattern']:14} {r['policy']:9} {100 * r['saving']:6.1f}% "
                     f"{100 * r['slowdown']:+7.2f}% {frac:>9}  {per}")
    return "\n".join(lines)


HOG = "import os\nos.nice(5)\nwhile True:\n    pass\n"
"""Foreign load: a busy loop outside any container, at nice 5 (a neighbour's batch job)."""


ORDERS = ("ABBA", "random")


def round_order(policies: Sequence[str], k: int, order: str, rng: random.Random) -> List[str]:
    """The policies of round ``k`` (from 0) in the run order.

    ABBA cancels a linear drift, but ties each policy to a position: NONE
    first and last, NONE twice in a row at every other round boundary. A
    seeded shuffle per round ties no policy to any position or neighbour,
    which matters where the position itself may cost something (a busy
    loop beside the program whose scheduling state carries over)."""
    if order == "random":
        return rng.sample(list(policies), len(policies))
    return list(policies) if k % 2 == 0 else list(reversed(policies))


def run(patterns: Sequence[str], policies: Sequence[str], rounds: int, phases: int,
        unit: int, shift: int, seed: int, log=sys.stderr, foreign_load: bool = False,
        order: str = "ABBA") -> dict:
    """``foreign_load``: one HOG per cpu for the whole run (benchmarks/foreign_load.py);
    ``order``: one of ORDERS (round_order)."""
    if order not in ORDERS:
        raise ValueError(f"order {order!r}: one of {', '.join(ORDERS)}")
    from nrm.hpc import mpi
    from nrm.tools.localnrmd import LocalNrmd
    flavor = mpi.find("mpich")
    if flavor is None:
        raise SystemExit("power_oracle --live: MPICH not found (make setup installs it)")
    binary = build()
    cpus = os.cpu_count() or 1
    skipped = [p for p in patterns if ranks_for(p) > cpus]
    patterns = [p for p in patterns if p not in skipped]
    args = {p: ["-n", str(phases), "-u", str(unit_for(p, unit)), "-s", str(shift),
                "-S", str(seed)] for p in patterns}
    tables = {p: work_table(flavor.mpiexec, binary, p, args[p]) for p in patterns}
    settings = {p: oracle_settings(tables[p]) for p in patterns}
    workdir = tempfile.mkdtemp(prefix="nrm-oracle-live-")
    nrmd = LocalNrmd("--hw", "emulated", "--sensor-period", "0.05", prefix="nrm-oracle-")
    rows, loads, hogs = [], [], []
    rng = random.Random(seed)
    started = time.monotonic()
    try:
        nrmd.start()
        if foreign_load:
            hogs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(cpus)]
        for k in range(rounds):
            for pattern in patterns:
                for policy in round_order(policies, k, order, rng):
                    row = run_one(nrmd, flavor.mpiexec, binary, pattern, policy,
                                  args[pattern], settings[pattern], workdir)
                    row["round"] = k + 1
                    rows.append(row)
                    print(f"round {k + 1} {pattern:14} {policy:9} "
                          f"{row.get('time_s', float('nan')):7.3f} s "
                          f"{row.get('energy_j') or float('nan'):8.1f} J"
                          + (f"  ERROR {row['error']}" if "error" in row else ""),
                          file=log, flush=True)
            loads.append(os.getloadavg())
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
        nrmd.stop()
        shutil.rmtree(nrmd.rundir, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)
    return {"live": True,
            "node": {"hw": "emulated", "cpus": cpus, "ranks": {p: ranks_for(p) for p in patterns},
                     "phases": phases, "unit": unit, "shift": shift, "seed": seed,
                     "rounds": rounds, "order": order, "skipped": skipped,
                     "foreign_load": len(hogs),
                     "load_average_per_round": [[round(x, 2) for x in la] for la in loads],
                     "duration_s": round(time.monotonic() - started, 1)},
            "oracle_settings": {p: {str(r): s for r, s in settings[p].items()}
                                for p in patterns},
            "oracle_model": {p: oracle_model(tables[p], settings[p]) for p in patterns},
            "results": summarize(rows, patterns, policies, [p for p in patterns if all(
                s == {"level": model.LEVELS, "frequency": model.FMAX}
                for s in settings[p].values())]),
            "runs": rows}


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse
    ap = argparse.ArgumentParser(description="power_oracle --live")
    ap.add_argument("--live", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--phases", type=int, default=24)
    ap.add_argument("--unit", type=int, default=UNIT, help="loop iterations per work unit")
    ap.add_argument("--shift", type=int, default=8, help="shifting: phases between moves")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--patterns", default=",".join(LIVE_PATTERNS + FOUR_RANK))
    ap.add_argument("--policies", default=",".join(LIVE_POLICIES))
    args = ap.parse_args(argv)
    patterns = [p for p in args.patterns.split(",") if p]
    policies = [p.upper() for p in args.policies.split(",") if p]
    known = LIVE_PATTERNS + FOUR_RANK
    accepted = LIVE_POLICIES + (CONTROL,)
    bad = [p for p in patterns if p not in known] + [p for p in policies if p not in accepted]
    if bad or "NONE" not in policies or args.rounds < 1 or args.phases < 2 or args.unit < 1:
        print(f"power_oracle --live: bad arguments {bad or vars(args)}; patterns: "
              f"{', '.join(known)}; policies: {', '.join(accepted)} (NONE needed)",
              file=sys.stderr)
        return 2
    out = run(patterns, policies, args.rounds, args.phases, args.unit, args.shift, args.seed)
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        print(table(out["results"]))
        print(f"load average per round: {out['node']['load_average_per_round']} "
              f"on {out['node']['cpus']} cpus; skipped (not enough cpus): "
              f"{out['node']['skipped'] or 'none'}")
    return 0
