"""nrm pilot vs a Popen loop (and QCG-PilotJob): 1000 iterations of /bin/true.

All in the same run: ``nrm pilot`` from process start to exit (one job
file, one iterative job, a pool of 2 cores, against a private nrmd started
here beforehand, and once more with the pilot starting its own), a
baseline Popen loop keeping 2 processes in flight, and QCG-PilotJob 0.14.2's
``qcg-pm-service`` on the same file when it installs into a venv of its own
(``build/qcg-venv``, or ``NRM_QCG_VENV``; ``PILOT_BENCH_QCG=0`` skips it);
interleaved rounds (``PILOT_BENCH_ROUNDS``, default 3), medians, the load
average before and after. Prints JSON.
"""

from __future__ import annotations

import glob
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pilotsim  # noqa: E402
from nrm.tools.localnrmd import LocalNrmd, nrm_argv  # noqa: E402

N = int(os.environ.get("PILOT_BENCH_N", "1000"))
ROUNDS = int(os.environ.get("PILOT_BENCH_ROUNDS", "3"))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QCG_VERSION = "0.14.2"
QCG_VENV = os.environ.get("NRM_QCG_VENV") or os.path.join(REPO, "build", "qcg-venv")


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def popen_loop(n: int, inflight: int = 2) -> float:
    t0 = time.perf_counter()
    running = []
    started = 0
    while started < n or running:
        while started < n and len(running) < inflight:
            running.append(subprocess.Popen(["/bin/true"]))
            started += 1
        running.pop(0).wait()
    return time.perf_counter() - t0


def job_file(wd: str) -> str:
    path = os.path.join(wd, "jobs.json")
    with open(path, "w") as f:
        json.dump([{"request": "submit", "jobs": [{
            "name": "t", "execution": {"exec": "/bin/true"}, "iteration": {"stop": N}}]},
            {"request": "control", "command": "finishAfterAllTasksDone"}], f)
    return path


def qcg_service() -> Tuple[Optional[str], Optional[str]]:
    """(qcg-pm-service, None), installed in its venv if need be, or
    (None, why there is none)."""
    if os.environ.get("PILOT_BENCH_QCG") == "0":
        return None, "PILOT_BENCH_QCG=0"
    exe = os.path.join(QCG_VENV, "bin", "qcg-pm-service")
    if os.access(exe, os.X_OK):
        return exe, None
    for argv in ([sys.executable, "-m", "venv", QCG_VENV],
                 [os.path.join(QCG_VENV, "bin", "pip"), "install", "-q",
                  f"qcg-pilotjob=={QCG_VERSION}"]):
        try:
            r = subprocess.run(argv, capture_output=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return None, f"{' '.join(argv[:3])}: {exc}"
        if r.returncode != 0:
            last = (r.stderr.decode(errors="replace").strip().splitlines() or ["?"])[-1]
            return None, f"{' '.join(argv[:3])}: {last}"
    return (exe, None) if os.access(exe, os.X_OK) else (None, f"no {exe} after install")


def qcg(exe: str, wd: str) -> float:
    """QCG-PilotJob on the same file, process start to exit; its report
    must hold every iteration."""
    path = job_file(wd)
    t0 = time.perf_counter()
    r = subprocess.run([exe, "--file-path", path, "--wd", wd, "--nodes", "2"],
                       capture_output=True)
    elapsed = time.perf_counter() - t0
    reports = glob.glob(os.path.join(wd, ".qcgpjm-service-*", "jobs.report"))
    lines = sum(1 for _ in open(reports[0])) if reports else 0
    if r.returncode != 0 or lines != N + 1:
        sys.exit(f"qcg-pm-service failed ({r.returncode}, {lines} report lines): "
                 f"{r.stderr.decode(errors='replace')[-500:]}")
    return elapsed


def pilot(env, wd: str) -> float:
    path = job_file(wd)
    t0 = time.perf_counter()
    r = subprocess.run(nrm_argv() + ["pilot", "--file-path", path, "--wd", wd, "--nodes", "2"],
                       env=env, capture_output=True)
    elapsed = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"nrm pilot failed: {r.stderr.decode()}")
    return elapsed


def scheduling_us_per_task(n: int = 10_000) -> float:
    """The pure manager: n jobs in chains of 10, submitted, placed, ended."""
    from nrm.pilot import jobfile
    from nrm.pilot.manager import Manager
    from nrm.pilot.scheduler import Pool
    jobs = [{"name": f"j{i}", "execution": {"exec": "true"},
             "dependencies": {"after": [f"j{i - 1}"] if i % 10 else []}} for i in range(n)]
    req = jobfile.parse_requests([{"request": "submit", "jobs": jobs}]).requests[0]
    t0 = time.perf_counter()
    mgr = Manager(Pool([("n0", 2)]), "/wd")
    mgr.handle(req, 0.0)
    pilotsim.drain(mgr)
    assert mgr.outcome()["SUCCEED"] == n
    return 1e6 * (time.perf_counter() - t0) / n


def loadavg() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def main() -> None:
    runs = sorted(scheduling_us_per_task() for _ in range(3))
    out = {"iterations": N, "scheduling_us_per_task_10k_chained_median_of_3": runs[1],
           "load_average_before": loadavg()}
    # interleaved rounds, so that a change of load hits every variant alike
    times: dict = {"popen_2_inflight_s": [], "pilot_with_nrmd_s": [], "pilot_private_nrmd_s": [],
                   "popen_cpu_s": [], "pilot_private_nrmd_cpu_s": []}
    qcg_exe, why = qcg_service()
    if qcg_exe is not None:
        times["qcg_pilotjob_s"] = []
    else:
        out["qcg_pilotjob_skipped"] = why
    with LocalNrmd(log_level="warning") as d:
        for _ in range(ROUNDS):
            if qcg_exe is not None:
                times["qcg_pilotjob_s"].append(qcg(qcg_exe, tempfile.mkdtemp(prefix="qcg-bench-")))
            cpu = children_cpu()
            times["popen_2_inflight_s"].append(popen_loop(N))
            times["popen_cpu_s"].append(children_cpu() - cpu)
            times["pilot_with_nrmd_s"].append(
                pilot(d.env, tempfile.mkdtemp(prefix="pilot-bench-")))
            empty = tempfile.mkdtemp(prefix="pilot-bench-none-")
            cpu = children_cpu()
            times["pilot_private_nrmd_s"].append(
                pilot(dict(os.environ, NRM_RUNTIME_DIR=empty),
                      tempfile.mkdtemp(prefix="pilot-bench-")))
            times["pilot_private_nrmd_cpu_s"].append(children_cpu() - cpu)
    for key, values in times.items():
        out[key] = statistics.median(values)
    ratios = [p / b for p, b in zip(times["pilot_private_nrmd_s"], times["popen_2_inflight_s"])]
    out["ratio_pilot_private_nrmd_vs_popen_median"] = statistics.median(ratios)
    ratios = [p / b for p, b in zip(times["pilot_with_nrmd_s"], times["popen_2_inflight_s"])]
    out["ratio_pilot_with_nrmd_vs_popen_median"] = statistics.median(ratios)
    if qcg_exe is not None:
        ratios = [q / b for q, b in zip(times["qcg_pilotjob_s"], times["popen_2_inflight_s"])]
        out["ratio_qcg_pilotjob_vs_popen_median"] = statistics.median(ratios)
    out["cpu_per_task_ms_pilot_private_nrmd"] = 1000 * out["pilot_private_nrmd_cpu_s"] / N
    out["cpu_per_task_ms_popen"] = 1000 * out["popen_cpu_s"] / N
    out["pilot_per_task_ms"] = 1000 * out["pilot_with_nrmd_s"] / N
    out["popen_per_task_ms"] = 1000 * out["popen_2_inflight_s"] / N
    out["load_average_after"] = loadavg()
    json.dump({k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()},
              sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
