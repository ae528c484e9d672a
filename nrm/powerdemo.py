"""The power-policy comparison that `make run` shows (and benchmarks reuse).

Runs examples/imbalance.c with 2 MPI ranks, rank 0 doing twice the work of
rank 1, launched the way users launch MPI:

    nrm run --profile-json P power.yml mpiexec -n 2 -bind-to core ./imbalance ...

once per policy (NONE, DDCM, DVFS, COMBINED), and prints run time, energy
and the levels/frequencies chosen per cpu. On a node without RAPL the
daemon's emulated node does the actuation (cgroup CPU bandwidth) and the
energy accounting (its documented model); the table says which.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
EXAMPLES = os.path.join(REPO, "examples")
POLICIES = ("NONE", "DDCM", "DVFS", "COMBINED")
IMBALANCE_ARGS = ["-n", "40", "-u", "30000000", "-b", "-0.5"]
"""~50 ms phases: several periods of the emulated node's 16 ms CPU-bandwidth window."""


def build_imbalance() -> Optional[str]:
    """Build examples/imbalance with mpicc; None (with a reason printed)
    when MPI or libnrm are missing."""
    if not shutil.which("mpicc") or not shutil.which("mpiexec"):
        print("  (skipped: mpicc/mpiexec not found; `make setup` installs MPICH)")
        return None
    r = subprocess.run(["make", "-s", "-C", EXAMPLES, "imbalance"], capture_output=True,
                       env=dict(os.environ, PREFIX=sys.prefix))
    path = os.path.join(EXAMPLES, "bin", "imbalance")
    if not os.path.exists(path):
        path = os.path.join(EXAMPLES, "imbalance")
    if r.returncode != 0 or not os.path.exists(path):
        print("  (skipped: building examples/imbalance failed)\n" + r.stderr.decode()[-2000:])
        return None
    return path


def manifest_for(policy: str, directory: str) -> str:
    path = os.path.join(directory, f"power-{policy.lower()}.yml")
    with open(path, "w") as f:
        f.write(f"name: imbalance-{policy.lower()}\n"
                "app:\n"
                "  slice: {cpus: 2, mems: 1}\n"
                f"  power: {{policy: {policy}, profile: true, damper: 1ms, slowdown: 1.1}}\n")
    return path


def run_policy(session, binary: str, policy: str, workdir: str) -> Dict[str, object]:
    manifest = manifest_for(policy, workdir)
    profile_path = os.path.join(workdir, f"profile-{policy.lower()}.json")
    argv = ["run", "--profile-json", profile_path, manifest,
            "mpiexec", "-n", "2", "-bind-to", "core", binary] + IMBALANCE_ARGS
    start = time.monotonic()
    r = session.nrm(*argv, show=False, cwd=workdir)
    wall = time.monotonic() - start
    row: Dict[str, object] = {"policy": policy, "status": r.returncode, "wall_s": wall}
    if r.returncode != 0:
        row["error"] = (r.stderr.decode(errors="replace") or r.stdout.decode())[-500:]
        return row
    for line in r.stdout.decode().splitlines():
        if line.startswith("imbalance:"):
            fields = dict(kv.split("=", 1) for kv in line.split()[1:] if "=" in kv)
            row["app_time_s"] = float(fields.get("time", "nan").rstrip("s"))
    with open(profile_path) as f:
        profile = json.load(f)
    energy = profile.get("energy") or {}
    row["energy_j"] = energy.get("energy_j")
    row["average_power_w"] = energy.get("average_power_w")
    row["emulated"] = energy.get("emulated")
    pol = profile.get("policy") or {}
    row["decisions"] = pol.get("decisions", 0)
    row["settings"] = pol.get("final_settings", {})
    row["lowest_level"] = pol.get("lowest_level", {})
    row["stats"] = pol.get("stats", {})
    return row


def _levels(row) -> str:
    parts = []
    for cpu, s in sorted((row.get("settings") or {}).items()):
        level = s.get("level") if isinstance(s, dict) else s
        hz = s.get("frequency") if isinstance(s, dict) else None
        text = f"cpu{cpu}:L{level:g}" if level is not None else f"cpu{cpu}"
        if hz:
            text += f"@{hz / 1e9:.1f}GHz"
        parts.append(text)
    return " ".join(parts) or "-"


def print_table(rows: List[Dict[str, object]]) -> None:
    base = next((r for r in rows if r["policy"] == "NONE" and "app_time_s" in r), None)
    print(f"  {'policy':9} {'time (s)':>9} {'vs NONE':>8} {'energy (J)':>11} {'vs NONE':>8} "
          f"{'decisions':>9}  levels at the end (per cpu)")
    for r in rows:
        if "error" in r:
            print(f"  {r['policy']:9} failed (exit {r['status']}): {r['error'].strip()}")
            continue
        t, e = r.get("app_time_s"), r.get("energy_j")
        dt = f"{(t / base['app_time_s'] - 1) * 100:+.1f}%" if base and t else "-"
        de = (f"{(e / base['energy_j'] - 1) * 100:+.1f}%"
              if base and e and base.get("energy_j") else "-")
        print(f"  {r['policy']:9} {t or float('nan'):9.3f} {dt:>8} "
              f"{(e if e is not None else float('nan')):11.1f} {de:>8} {r['decisions']:>9}  "
              f"{_levels(r)}")
    if rows and rows[0].get("emulated"):
        print("  (emulated node: actuation by cgroup CPU bandwidth, energy from the model in "
              "docs/hardware.md)")


def run_comparison(session, policies=POLICIES) -> List[Dict[str, object]]:
    binary = build_imbalance()
    if binary is None:
        return []
    print("$ nrm run --profile-json P power.yml mpiexec -n 2 -bind-to core ./imbalance "
          + " ".join(IMBALANCE_ARGS) + "   # once per policy")
    workdir = tempfile.mkdtemp(prefix="nrm-powerdemo-")
    try:
        rows = [run_policy(session, binary, p, workdir) for p in policies]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print_table(rows)
    return rows
