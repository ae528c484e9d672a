"""How long the `nrm` CLI takes to get its request out, against Python's own start-up.

Every `srun ... nrm run` step pays the CLI's start-up before its task
starts. Measured here: from spawning `nrm VERB ...` to its request reaching
a ROUTER socket that this script binds where nrmd's would be (a private
runtime dir), so the daemon's work is not in the figure; the client is
killed once its request has arrived. Baselines, in the same run and
interleaved with the rest: `python -c pass` and `python -c 'import zmq'`
(spawn to exit; the CLI cannot start faster than Python and libzmq).
Also, from `python -X importtime` on the same commands: the total import
time, and which heavy modules each verb loads.

Prints one JSON object (medians in ms). Usage:
    benchmarks/cli_startup.py [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import zmq

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPO, "examples")
#: modules a verb that only sends a request should not need
HEAVY = ("asyncio", "yaml", "msgspec", "hashlib", "nrm.manifest", "nrm.transport.curve",
         "nrm.pilot", "nrm.campaign", "nrm.hpc.slurm")

COMMANDS = {
    "status": ["status", "--json"],
    "run_json": ["run", os.path.join(EXAMPLES, "basic.json"), "true"],
    "run_yaml": ["run", os.path.join(EXAMPLES, "basic.yml"), "true"],
    "list": ["list", "--json"],
}


def _env(rundir: str) -> dict:
    env = dict(os.environ, NRM_RUNTIME_DIR=rundir, PYTHONPATH=REPO)
    for name in ("SLURM_JOB_ID", "SLURM_STEP_ID", "NRM_URI"):
        env.pop(name, None)
    return env


def time_to_request(router: zmq.Socket, argv, env, importtime: bool = False):
    """(seconds from spawn to the request's arrival, stderr if importtime)."""
    cmd = [sys.executable] + (["-X", "importtime"] if importtime else []) \
        + ["-m", "nrm.cli.main"] + argv
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        if not router.poll(30_000):
            raise RuntimeError(f"no request from {' '.join(argv)}: "
                               f"{proc.stderr.read().decode(errors='replace')[-400:]}")
        elapsed = time.perf_counter() - t0
        router.recv_multipart()
    finally:
        proc.kill()
        _, err = proc.communicate()
    return elapsed, err.decode(errors="replace")


def time_python(code: str, env) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    return time.perf_counter() - t0


def import_profile(stderr: str) -> dict:
    """Total import time (the top-level entries' cumulative) and the heavy
    modules loaded, from -X importtime's output."""
    total_us, loaded = 0, set()
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _self, cumulative, name = line[len("import time:"):].split("|")
        name = name[1:]                         # the separator's space
        module = name.strip()
        loaded.add(module)
        if not name.startswith("  "):           # top level: its cumulative counts once
            total_us += int(cumulative)
    heavy = sorted(h for h in HEAVY if any(m == h or m.startswith(h + ".") for m in loaded))
    return {"imports_ms": round(total_us / 1000, 1), "heavy_modules": heavy}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args()
    rundir = tempfile.mkdtemp(prefix="nrm-clibench-")
    os.chmod(rundir, 0o700)
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.linger = 0
    router.bind(f"ipc://{rundir}/upstream")
    env = _env(rundir)
    samples = {name: [] for name in ["python_pass", "python_import_zmq", *COMMANDS]}
    try:
        for name, argv in COMMANDS.items():          # warm the page cache and .pyc files
            time_to_request(router, argv, env)
        for _ in range(args.repeat):                 # interleaved: load hits all alike
            samples["python_pass"].append(time_python("pass", env))
            samples["python_import_zmq"].append(time_python("import zmq", env))
            for name, argv in COMMANDS.items():
                samples[name].append(time_to_request(router, argv, env)[0])
        profiles = {name: import_profile(time_to_request(router, argv, env, True)[1])
                    for name, argv in COMMANDS.items()}
    finally:
        router.close()
        ctx.term()
        shutil.rmtree(rundir, ignore_errors=True)
    med = {name: statistics.median(v) * 1000 for name, v in samples.items()}
    out = {
        "repeat": args.repeat, "python": sys.version.split()[0], "cpus": os.cpu_count(),
        "median_ms": {k: round(v, 1) for k, v in med.items()},
        "over_import_zmq_ms": {k: round(med[k] - med["python_import_zmq"], 1)
                               for k in COMMANDS},
        "ratio_to_python_pass": {k: round(med[k] / med["python_pass"], 2) for k in COMMANDS},
        "imports": profiles,
    }
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
