"""`make run`: a newcomer's first look at nrm, on an embedded default.

Starts a private nrmd (nrm/tools/localnrmd.py), runs example tasks in
slices through `nrm run` (each task's cpus, output and exit status), shows
`nrm status`, then runs the campaign examples/policies.campaign.yml on that
nrmd when MPICH and libnrm are available, and stops the daemon cleanly.

The campaign runs examples/imbalance.c with 2 MPI ranks, rank 0 doing
twice the work of rank 1, launched the way users launch MPI
(`mpiexec.mpich -n 2 -bind-to core ./imbalance ...`), once per policy
(NONE, DDCM, DVFS, COMBINED). The demo goes through the CLI, as a user
would (`nrm campaign run`, `table`, `summary`), then prints per run the
time, energy and the levels/frequencies each cpu was left at, read from
the campaign's table and each run's profile. On a node without RAPL the
daemon's emulated node does the actuation (cgroup CPU bandwidth) and the
energy accounting (its documented model); the table says which.
``--power --repeat N [--json F]`` runs only the campaign, with N
repetitions (interleaved rounds), for measurements (docs/performance.md).
"""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional

import yaml

from nrm.hpc import mpi
from nrm.tools.localnrmd import LocalNrmd, nrm_argv

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = os.path.join(REPO, "examples")
CAMPAIGN = os.path.join(EXAMPLES, "policies.campaign.yml")
POLICIES = ("NONE", "DDCM", "DVFS", "COMBINED", "FIXED")
#: the pinned settings of examples/policies.yml: the oracle the others are read against
ORACLE = "FIXED"
MIN_ORACLE_SAVING = 0.03


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
        print("  MPICH is missing (no mpicc.mpich/mpiexec.mpich): the power-policy campaign is "
              "skipped.\n  `make setup` installs MPICH (apt-get install mpich libmpich-dev).")
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


def campaign_file(workdir: str, policies, repeat: int) -> str:
    """examples/policies.campaign.yml itself, or (other policies or
    repetitions) a copy that says so, with its paths made absolute."""
    if list(policies) == list(POLICIES) and repeat == 1:
        return CAMPAIGN
    with open(CAMPAIGN) as f:
        spec = yaml.safe_load(f)
    spec["parameters"]["policy"] = list(policies)
    spec["repetitions"] = repeat
    spec["manifest"] = os.path.join(EXAMPLES, spec["manifest"])
    spec["cwd"] = EXAMPLES
    path = os.path.join(workdir, "policies.campaign.yml")
    with open(path, "w") as f:
        yaml.safe_dump(spec, f, sort_keys=False)
    return path


def read_rows(directory: str, table: str) -> List[Dict[str, object]]:
    """The campaign's table, each row with what its run's profile and
    output say about the policy (levels per cpu, decisions)."""
    out = []
    with open(table, newline="") as f:
        for rec in csv.DictReader(f):
            row: Dict[str, object] = {"policy": rec["policy"],
                                      "round": int(rec["repetition"]) + 1,
                                      "outcome": rec["outcome"]}
            if rec["outcome"] != "ok":
                row["error"] = rec["error"] or f"exit {rec['exit_code'] or rec['signal']}"
                out.append(row)
                continue
            rdir = os.path.join(directory, "runs", rec["run_id"], f"a{rec['attempt']}")
            with open(os.path.join(rdir, "profile.json")) as pf:
                profile = json.load(pf)
            with open(os.path.join(rdir, "stdout"), errors="replace") as of:
                stdout = of.read()
            # the program's own time; nrmd's run time if it printed none
            row["app_time_s"] = float(rec.get("app_time_s") or rec["duration_s"])
            row["energy_j"] = float(rec["energy_j"]) if rec["energy_j"] else None
            row["emulated"] = rec["energy_source"] == "emulated"
            # The ranks print concurrently: lines may arrive glued together.
            row["rank_cpu"] = dict(re.findall(r"affinity rank=(\d+) cpus=(\d+(?:,\d+)*)",
                                              stdout))
            pol = profile.get("policy") or {}
            row["decisions"] = pol.get("decisions", 0)
            row["settings"] = pol.get("final_settings", {})
            row["lowest_level"] = pol.get("lowest_level", {})
            row["lowest_frequency"] = pol.get("lowest_frequency", {})
            row["stats"] = pol.get("stats", {})
            out.append(row)
    return out


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
    oracle = next((r for r in rows if r["policy"] == ORACLE and r.get("energy_j")), None)
    saved = (1 - oracle["energy_j"] / be) if oracle and be else None
    print(f"  {'policy':9} {'time (s)':>9} {'vs NONE':>8} {'energy (J)':>11} {'vs NONE':>8} "
          f"{'of oracle':>9} {'decisions':>9} {'resets':>6}  "
          "rank/cpu: setting at the end (lowest reached)")
    for r in rows:
        if "error" in r:
            print(f"  {r['policy']:9} {r['outcome']}: {str(r['error']).strip()}")
            continue
        t, e = r.get("app_time_s"), r.get("energy_j")
        resets = (r.get("stats") or {}).get("slowdown_resets", 0)
        # a fraction of a saving lost in the noise means nothing: shown only
        # when the oracle saved more than MIN_ORACLE_SAVING in this run
        share = (f"{(1 - e / be) / saved:.2f}" if e and be and saved
                 and saved > MIN_ORACLE_SAVING and r["policy"] != "NONE" else "-")
        print(f"  {r['policy']:9} {t or float('nan'):9.3f} {_pct(t, bt):>8} "
              f"{(e if e is not None else float('nan')):11.1f} {_pct(e, be):>8} "
              f"{share:>9} {r['decisions']:>9} {resets:>6}  {_levels(r)}")
    if rows and rows[0].get("emulated"):
        print("  (emulated node: actuation by cgroup CPU bandwidth, energy from the model in "
              "docs/hardware.md; resets: slowdown-guard resets)")
    if saved is not None:
        print(f"  of oracle: the energy a policy saved as a fraction of what {ORACLE} (the "
              f"oracle's pinned settings) saved in the same run ({saved:+.1%}; shown when "
              f"over {MIN_ORACLE_SAVING:.0%})")


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
    """The campaign examples/policies.campaign.yml (every policy ``repeat``
    times, interleaved) on the session's nrmd; returns its rows."""
    binary = build_imbalance()
    if binary is None:
        return []
    workdir = tempfile.mkdtemp(prefix="nrm-powerdemo-")
    try:
        path = campaign_file(workdir, policies, repeat)
        shown = os.path.relpath(path, REPO) if path == CAMPAIGN else path
        directory = os.path.join(workdir, "policies")
        where = ["--nodes", "local"] if os.environ.get("SLURM_JOB_NODELIST") else []
        say(f"$ nrm campaign run {shown} --dir {directory}" + " ".join([""] + where))
        # live: one line per run, a progress bar on a terminal
        subprocess.run(nrm_argv() + ["campaign", "run", path, "--dir", directory] + where,
                       env=session.env, cwd=REPO)
        table = os.path.join(workdir, "policies.csv")
        session.nrm("campaign", "table", directory, "-o", table)
        rows = read_rows(directory, table)
        rounds: Dict[object, List[Dict[str, object]]] = {}
        for row in rows:
            rounds.setdefault(row["round"], []).append(row)
        for i, round_rows in sorted(rounds.items()):
            if repeat > 1:
                print(f"  round {i}:")
            print_table(round_rows)
        session.nrm("campaign", "summary", directory)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if repeat > 1:
        print(f"  median of {repeat} rounds (the machine may be shared: compare ratios):")
        print_medians(median_rows(list(rounds.values())))
    load = os.getloadavg()
    print(f"  load average {load[0]:.1f} / {load[1]:.1f} on {os.cpu_count()} cpus"
          + ("  (busy machine: the ranks compete for their cores, times are noisy)"
             if load[1] > (os.cpu_count() or 1) else ""))
    return rows


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
