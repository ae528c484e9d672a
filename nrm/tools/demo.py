"""`make run`: a newcomer's first look at nrm, on an embedded default.

Starts a private nrmd (nrm/tools/localnrmd.py), runs example tasks in
slices through `nrm run` (each task's cpus, output and exit status), shows
`nrm status`, then compares power policies on an imbalanced MPI program
when MPICH and libnrm are available, and stops the daemon cleanly.

The comparison runs examples/imbalance.c with 2 MPI ranks, rank 0 doing
twice the work of rank 1, launched the way users launch MPI:

    nrm run --profile-json P power.yml mpiexec.mpich -n 2 -bind-to core ./imbalance ...

once per policy (NONE, DDCM, DVFS, COMBINED), and prints run time, energy
and the levels/frequencies chosen per cpu. On a node without RAPL the
daemon's emulated node does the actuation (cgroup CPU bandwidth) and the
energy accounting (its documented model); the table says which.
``--power --repeat N [--json F]`` runs only the comparison, N interleaved
rounds, for measurements (docs/performance.md).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

from nrm.hpc import mpi
from nrm.tools.localnrmd import LocalNrmd, nrm_argv

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = os.path.join(REPO, "examples")
POLICIES = ("NONE", "DDCM", "DVFS", "COMBINED")
IMBALANCE_ARGS = ["-n", "40", "-u", "30000000", "-b", "-0.5"]
"""~50 ms phases: several periods of the emulated node's 16 ms CPU-bandwidth window."""


def say(text: str = "") -> None:
    print(text, flush=True)


class Session:
    """A private nrmd and a shell-like transcript of the commands run on it."""

    def __init__(self):
        self.nrmd = LocalNrmd("--sensor-period", "0.05", prefix="nrm-demo-")
        self.rundir = self.nrmd.rundir
        self.env = self.nrmd.env

    def start(self) -> None:
        try:
            self.nrmd.start()
        except RuntimeError as exc:
            raise SystemExit(f"nrmd did not start: {exc}") from None
        say(f"$ nrmd --runtime-dir {self.rundir} &   # pid {self.nrmd.pid}")

    def nrm(self, *args: str, show: bool = True,
            cwd: str = EXAMPLES) -> subprocess.CompletedProcess:
        if show:
            say("$ nrm " + " ".join(shlex.quote(a) for a in args))
        r = self.nrmd.cli(*args, cwd=cwd, timeout=None)
        if show:
            out = r.stdout.decode(errors="replace")
            err = r.stderr.decode(errors="replace")
            if out:
                sys.stdout.write(out if out.endswith("\n") else out + "\n")
            if err:
                sys.stdout.write("".join("  " + line for line in err.splitlines(True)))
            say(f"  -> exit status {r.returncode}")
        return r

    def stop(self) -> None:
        if self.nrmd.proc is not None and self.nrmd.proc.poll() is None:
            rc = self.nrmd.stop()
            say(f"$ kill -TERM {self.nrmd.pid}   # nrmd exited with {rc}")
        shutil.rmtree(self.rundir, ignore_errors=True)


def slices_demo(s: Session) -> None:
    say("\n== Tasks in resource slices ==")
    s.nrm("run", "-v", "basic.yml", "sh", "-c",
          "grep -E 'Cpus_allowed_list|Mems_allowed_list' /proc/self/status")
    s.nrm("run", "-v", "basic.json", "sh", "-c", "echo seed-era ACI manifest; exit 3")
    s.nrm("run", "-v", "basic.yml", "sh", "-c", "kill -SEGV $$")
    say("\n# two tasks at once get disjoint cpus:")
    procs = [subprocess.Popen(
        nrm_argv() + ["run", "basic.yml", "sh", "-c",
                      "sleep 0.3; grep Cpus_allowed_list /proc/self/status"],
        env=s.env, cwd=EXAMPLES, stdout=subprocess.PIPE) for _ in range(2)]
    for i, p in enumerate(procs):
        out = p.communicate()[0].decode().strip()
        say(f"  task {i}: {out}  (exit {p.returncode})")
    say()
    s.nrm("status")


# -- the power-policy comparison ------------------------------------------------

def build_imbalance() -> Optional[str]:
    """Build examples/imbalance with MPICH's mpicc (the MPI of the
    interposer nrmd preloads by default); None (with a reason printed) when
    MPICH or libnrm are missing."""
    if mpi.find("mpich") is None:
        print("  (skipped: mpicc.mpich/mpiexec.mpich not found; `make setup` installs MPICH)")
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
            mpi.MPICH.mpiexec, "-n", "2", "-bind-to", "core", binary] + IMBALANCE_ARGS + ["-a"]
    start = time.monotonic()
    r = session.nrm(*argv, show=False, cwd=workdir)
    wall = time.monotonic() - start
    row: Dict[str, object] = {"policy": policy, "status": r.returncode, "wall_s": wall}
    if r.returncode != 0:
        row["error"] = (r.stderr.decode(errors="replace") or r.stdout.decode())[-500:]
        return row
    out = r.stdout.decode(errors="replace")
    for line in out.splitlines():
        if line.startswith("imbalance:"):
            fields = dict(kv.split("=", 1) for kv in line.split()[1:] if "=" in kv)
            row["app_time_s"] = float(fields.get("time", "nan").rstrip("s"))
    # The ranks print concurrently: lines may arrive glued together.
    row["rank_cpu"] = dict(re.findall(r"affinity rank=(\d+) cpus=(\d+(?:,\d+)*)", out))
    with open(profile_path) as f:
        profile = json.load(f)
    energy = profile.get("energy") or {}
    row["energy_j"] = energy.get("energy_j")
    row["power_w"] = energy.get("power_w")
    row["emulated"] = energy.get("emulated")
    pol = profile.get("policy") or {}
    row["decisions"] = pol.get("decisions", 0)
    row["settings"] = pol.get("final_settings", {})
    row["lowest_level"] = pol.get("lowest_level", {})
    row["lowest_frequency"] = pol.get("lowest_frequency", {})
    row["stats"] = pol.get("stats", {})
    return row


def _setting(s) -> str:
    level = s.get("level") if isinstance(s, dict) else s
    hz = s.get("frequency") if isinstance(s, dict) else None
    text = f"L{level:g}" if level is not None else "?"
    return text + (f"@{hz / 1e9:.1f}GHz" if hz else "")


def _levels(row) -> str:
    """Per rank: its cpu, the setting before the final restore, the lowest level it had."""
    settings = row.get("settings") or {}
    lowest = row.get("lowest_level") or {}
    lowest_hz = row.get("lowest_frequency") or {}
    owner = {cpu: rank for rank, cpu in (row.get("rank_cpu") or {}).items()}
    parts = []
    for cpu in sorted(settings, key=lambda c: int(c) if str(c).isdigit() else 0):
        who = f"r{owner[cpu]}/" if cpu in owner else ""
        text = f"{who}cpu{cpu}:{_setting(settings[cpu])}"
        mins = ([f"L{lowest[cpu]:g}"] if cpu in lowest else []) + (
            [f"{lowest_hz[cpu] / 1e9:.1f}GHz"] if cpu in lowest_hz else [])
        if mins:
            text += f" (min {' '.join(mins)})"
        parts.append(text)
    return " ".join(parts) or "-"


def _pct(value, base) -> str:
    return f"{(value / base - 1) * 100:+.1f}%" if value and base else "-"


def print_table(rows: List[Dict[str, object]]) -> None:
    base = next((r for r in rows if r["policy"] == "NONE" and "app_time_s" in r), None)
    bt = base.get("app_time_s") if base else None
    be = base.get("energy_j") if base else None
    print(f"  {'policy':9} {'time (s)':>9} {'vs NONE':>8} {'energy (J)':>11} {'vs NONE':>8} "
          f"{'decisions':>9} {'resets':>6}  rank/cpu: setting at the end (lowest reached)")
    for r in rows:
        if "error" in r:
            print(f"  {r['policy']:9} failed (exit {r['status']}): {r['error'].strip()}")
            continue
        t, e = r.get("app_time_s"), r.get("energy_j")
        resets = (r.get("stats") or {}).get("slowdown_resets", 0)
        print(f"  {r['policy']:9} {t or float('nan'):9.3f} {_pct(t, bt):>8} "
              f"{(e if e is not None else float('nan')):11.1f} {_pct(e, be):>8} "
              f"{r['decisions']:>9} {resets:>6}  {_levels(r)}")
    if rows and rows[0].get("emulated"):
        print("  (emulated node: actuation by cgroup CPU bandwidth, energy from the model in "
              "docs/hardware.md; resets: slowdown-guard resets)")


def median_rows(rounds: List[List[Dict[str, object]]]) -> List[Dict[str, object]]:
    """Per policy, the median over rounds of time, energy and their ratios to that
    round's NONE (each round runs the policies back to back, so a ratio compares runs
    that shared the machine's load)."""
    out = []
    policies = [r["policy"] for r in rounds[0]] if rounds else []
    for policy in policies:
        ok = []
        for rows in rounds:
            row = next((r for r in rows if r["policy"] == policy and "app_time_s" in r), None)
            base = next((r for r in rows if r["policy"] == "NONE" and "app_time_s" in r), None)
            if row and base and row.get("energy_j") and base.get("energy_j"):
                ok.append((row, row["app_time_s"] / base["app_time_s"],
                           row["energy_j"] / base["energy_j"]))
        if not ok:
            continue
        entry = {"policy": policy, "runs": len(ok),
                 "app_time_s": statistics.median(r["app_time_s"] for r, _, _ in ok),
                 "energy_j": statistics.median(r["energy_j"] for r, _, _ in ok),
                 "time_vs_none": statistics.median(t for _, t, _ in ok),
                 "energy_vs_none": statistics.median(e for _, _, e in ok),
                 "time_vs_none_all": [round(t, 4) for _, t, _ in ok],
                 "energy_vs_none_all": [round(e, 4) for _, _, e in ok]}
        out.append(entry)
    return out


def print_medians(medians: List[Dict[str, object]]) -> None:
    print(f"  {'policy':9} {'runs':>4} {'time (s)':>9} {'vs NONE':>8} {'energy (J)':>11} "
          f"{'vs NONE':>8}  per-round time / energy vs NONE")
    for m in medians:
        per = ", ".join(f"{(t - 1) * 100:+.1f}/{(e - 1) * 100:+.1f}"
                        for t, e in zip(m["time_vs_none_all"], m["energy_vs_none_all"]))
        print(f"  {m['policy']:9} {m['runs']:>4} {m['app_time_s']:9.3f} "
              f"{(m['time_vs_none'] - 1) * 100:+7.1f}% {m['energy_j']:11.1f} "
              f"{(m['energy_vs_none'] - 1) * 100:+7.1f}%  {per}")


def run_comparison(session, policies=POLICIES, repeat: int = 1) -> List[Dict[str, object]]:
    """Run every policy ``repeat`` times, interleaved; returns the rows of all rounds."""
    binary = build_imbalance()
    if binary is None:
        return []
    print(f"$ nrm run --profile-json P power.yml {mpi.MPICH.mpiexec} -n 2 -bind-to core "
          f"./imbalance {' '.join(IMBALANCE_ARGS)} -a   # once per policy"
          + (f", {repeat} rounds" if repeat > 1 else ""))
    workdir = tempfile.mkdtemp(prefix="nrm-powerdemo-")
    rounds = []
    try:
        for i in range(repeat):
            rows = [run_policy(session, binary, p, workdir) for p in policies]
            for row in rows:
                row["round"] = i + 1
            if repeat > 1:
                print(f"  round {i + 1}:")
            print_table(rows)
            rounds.append(rows)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if repeat > 1:
        print(f"  median of {repeat} rounds (the machine may be shared: compare ratios):")
        print_medians(median_rows(rounds))
    load = os.getloadavg()
    print(f"  load average {load[0]:.1f} / {load[1]:.1f} on {os.cpu_count()} cpus"
          + ("  (busy machine: the ranks compete for their cores, times are noisy)"
             if load[1] > (os.cpu_count() or 1) else ""))
    return [row for rows in rounds for row in rows]


def main(argv: Optional[List[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="nrm's first look (make run)")
    parser.add_argument("--power", action="store_true",
                        help="only the power-policy comparison")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of all policies")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--json", help="also write every row and the medians to this file")
    args = parser.parse_args(argv)
    policies = [p.strip().upper() for p in args.policies.split(",") if p.strip()]
    session = Session()
    try:
        session.start()
        if not args.power:
            slices_demo(session)
            say("\n== Power policies on an imbalanced MPI program ==")
        rows = run_comparison(session, policies, max(1, args.repeat))
    finally:
        session.stop()
    if args.json:
        rounds: Dict[object, List[Dict[str, object]]] = {}
        for row in rows:
            rounds.setdefault(row.get("round"), []).append(row)
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "medians": median_rows(list(rounds.values())),
                       "load_average": os.getloadavg()}, f, indent=1)
    return 0 if not args.power or (rows and all("error" not in r for r in rows)) else 1


if __name__ == "__main__":
    sys.exit(main())
