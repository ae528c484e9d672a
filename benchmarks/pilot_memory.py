"""nrm pilot's manager holding 10 000 queued tasks with dependencies: RSS and cost.

Two measurements, each against a baseline taken in the same run:

* the pure manager (submit, place, end; no I/O) in a fresh interpreter per
  round: RSS after its imports (the baseline) and with the request's JSON
  text made, with the 10 000 jobs queued (parsed from that text, which is
  then dropped) and after all of them ran; microseconds per task for the parse,
  the submit and the run (scheduling = submit + run),
  at 1/10, 1 and 3 times the size (a cost per task that stays flat as the
  queue grows is what "no scan of the whole queue per event" looks like),
  in two shapes: chains of 10, and every job after one gate job (its end
  makes all the others ready at once);
* the real pilot process (``nrm pilot --api-socket``, started by the
  QCG-compatible ``LocalManager`` on a private nrmd): its RSS idle, with
  the jobs queued behind a running gate job, and after they all ran;
  baseline: a bare interpreter importing what that process imports.

``--ab TREE`` also runs the pure rounds against another checkout (e.g. the
commit before a memory cut), interleaved with this one's. Sizes:
``PILOT_MEM_N`` (default 10000), ``PILOT_MEM_ROUNDS`` (3), ``--no-real``
skips the real process (which runs the N tasks, ~3-5 ms each here).
Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import pilotsim

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = int(os.environ.get("PILOT_MEM_N", "10000"))
ROUNDS = int(os.environ.get("PILOT_MEM_ROUNDS", "3"))


def rss_mb(pid: str = "self") -> dict:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return out


def loadavg() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def jobs_json(n: int, shape: str) -> str:
    """A submit request as JSON text: chains of 10, or all after one gate."""
    jobs = [{"name": "gate", "execution": {"exec": "true"}}]
    for i in range(n - 1):
        if shape == "chains":
            after = [f"j{i - 1}"] if i % 10 else ["gate"]
        else:
            after = ["gate"]
        jobs.append({"name": f"j{i}", "execution": {"exec": "true"},
                     "dependencies": {"after": after}})
    return json.dumps([{"request": "submit", "jobs": jobs}])


# ----------------------------------------------------------- pure child ---
def child(n: int, shape: str, freeze: bool) -> dict:
    """Runs in a fresh interpreter whose nrm is the tree under test."""
    import gc
    from nrm.pilot import jobfile
    from nrm.pilot.manager import Manager
    from nrm.pilot.scheduler import Pool
    gc.collect()
    out = {"rss_imports_mb": rss_mb()["VmRSS"]}
    text = jobs_json(n, shape)            # what the pilot reads from its file or socket
    gc.collect()
    out["rss_with_request_text_mb"] = rss_mb()["VmRSS"]
    t0 = time.perf_counter()
    req = jobfile.parse_requests(json.loads(text)).requests[0]
    t1 = time.perf_counter()
    mgr = Manager(Pool([("n0", 2)]), "/wd")
    mgr.handle(req, 0.0)
    t2 = time.perf_counter()
    out["parse_us_per_task"] = 1e6 * (t1 - t0) / n
    out["submit_us_per_task"] = 1e6 * (t2 - t1) / n
    del text, req
    if freeze:
        gc.freeze()
    gc.collect()
    out["rss_queued_mb"] = rss_mb()["VmRSS"]
    t0 = time.perf_counter()
    pilotsim.drain(mgr)
    out["run_us_per_task"] = 1e6 * (time.perf_counter() - t0) / n
    out["scheduling_us_per_task"] = out["submit_us_per_task"] + out["run_us_per_task"]
    if mgr.outcome()["SUCCEED"] != n:
        sys.exit(f"pure manager: {mgr.outcome()}")
    gc.collect()
    out["rss_ran_mb"] = rss_mb()["VmRSS"]
    return out


def run_child(tree: str, n: int, shape: str, freeze: bool = False) -> dict:
    # an editable install redirects ``import nrm`` to its own tree: another
    # checkout is imported only without that finder (the pure manager needs
    # none of the compiled parts)
    code = (f"import sys; sys.path.insert(0, {tree!r}); "
            "sys.meta_path[:] = [f for f in sys.meta_path "
            "if 'ScikitBuild' not in type(f).__name__]; "
            f"sys.path.insert(0, {HERE + '/benchmarks'!r}); "
            "import json, nrm, pilot_memory as b; "
            f"out = b.child({n}, {shape!r}, {freeze}); "
            f"assert nrm.__file__.startswith({tree!r}), nrm.__file__; "
            "print(json.dumps(out))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd="/")
    if r.returncode != 0:
        sys.exit(f"pure manager child ({tree}) failed: {r.stderr.strip()}")
    return json.loads(r.stdout)


def pure(trees: dict) -> dict:
    """Medians over interleaved rounds, per tree, shape and size."""
    runs: dict = {}
    sizes = (max(100, N // 10), N, 3 * N)
    for _ in range(ROUNDS):
        for label, (tree, freeze) in trees.items():
            for shape in ("chains", "gate"):
                for n in sizes:
                    if n != N and label != "this":
                        continue
                    key = (label, shape, n)
                    runs.setdefault(key, []).append(run_child(tree, n, shape, freeze))
    out = {}
    for (label, shape, n), rs in runs.items():
        out[f"{label}/{shape}/{n}"] = {k: round(statistics.median(r[k] for r in rs), 2)
                                       for k in rs[0]}
    return out


# --------------------------------------------------------- real process ---
IMPORTS = ("import nrm.cli.main, nrm.cli.pilot, nrm.pilot.service, nrm.pilot.qcg, "
           "nrm.pilot.runner, nrm.client, asyncio, zmq")


def bare_interpreter_mb() -> float:
    code = (f"import sys; sys.path.insert(0, {HERE!r}); {IMPORTS}; import gc; gc.collect(); "
            "print(next(int(l.split()[1]) for l in open('/proc/self/status') "
            "if l.startswith('VmRSS:')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(r.stdout) / 1024


def real(n: int) -> dict:
    from nrm.pilot.qcg import Jobs, LocalManager
    from nrm.tools.localnrmd import LocalNrmd
    out = {"bare_interpreter_same_imports_mb": bare_interpreter_mb()}
    with LocalNrmd(log_level="warning") as d:
        saved = dict(os.environ)
        os.environ.update(d.env)
        try:
            wd = tempfile.mkdtemp(prefix="pilot-mem-")
            m = LocalManager(["--nodes", "2", "--wd", wd, "--progress", "none"])
        finally:
            os.environ.clear()
            os.environ.update(saved)
        pid = str(m.process.pid)
        try:
            m.resources()
            out["pilot_idle_mb"] = rss_mb(pid)["VmRSS"]
            jobs = Jobs().add(name="gate", exec="sleep", args=["2"])
            for i in range(n - 1):
                jobs.add(name=f"j{i}", exec="true", after=[f"j{i - 1}"] if i % 10 else ["gate"])
            t0 = time.perf_counter()
            m.submit(jobs)
            out["api_submit_s"] = time.perf_counter() - t0
            out["pilot_queued_mb"] = rss_mb(pid)["VmRSS"]
            t0 = time.perf_counter()
            m.wait4all()
            out["run_s"] = time.perf_counter() - t0
            mem = rss_mb(pid)
            out["pilot_ran_mb"], out["pilot_peak_mb"] = mem["VmRSS"], mem["VmHWM"]
        finally:
            m.finish()
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ab", metavar="TREE", help="also the pure manager of this checkout")
    p.add_argument("--no-real", action="store_true", help="skip the real pilot process")
    p.add_argument("--freeze", action="store_true",
                   help="also this tree with gc.freeze() after the submit")
    args = p.parse_args()
    trees = {"this": (HERE, False)}
    if args.freeze:
        trees["this+freeze"] = (HERE, True)
    if args.ab:
        trees["ab"] = (os.path.abspath(args.ab), False)
    out: dict = {"n": N, "rounds": ROUNDS, "load_average_before": loadavg()}
    out["pure"] = pure(trees)
    if not args.no_real:
        out["real"] = {k: round(v, 2) for k, v in real(N).items()}
    out["load_average_after"] = loadavg()
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
