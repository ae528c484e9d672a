#!/usr/bin/env python3
"""Overhead of the PMPI interposer (libnrm-pmpi.so).

1. Per intercepted call: MPI_Barrier on 1 rank (benchmarks/barrier_bench.c)
   without the interposer, with it in pass-through (NRM_TRANSMIT unset),
   and with it transmitting (NRM_TRANSMIT=1, default 10 ms rate limit, a
   PULL socket draining in this process).  Overhead = median difference
   with the baseline measured in the same run.  Target: < 100 ns.
   In-wait throttling (NRM_INWAIT_DELAY, emulated counter backend): with
   the default 0.5 ms delay a 1-rank barrier never waits that long, so no
   timer is armed and the variant measures the prediction (two clock reads,
   site lookup, history update). The cost of the armed path itself
   (timer arm and disarm, firing, a throttled wait's exit) is measured by
   benchmarks/inwait_bench.c, without MPI ("inwait_steps_ns").
   With --baseline-lib, the pass-through, transmitting and in-wait
   variants also run with that (older) interposer build: before/after in
   the same run (an old build without in-wait throttling runs those two
   as pass-through and transmitting).
2. A barrier-heavy 2-rank run (examples/imbalance with a tiny work unit):
   wall time with and without the interposer transmitting; slowdown ratio.

usage: python benchmarks/interposer.py [--repeat 5] [--calls 2000000] [--mpi openmpi]
                                       [--baseline-lib OLD/libnrm-pmpi.so]
Needs make and the chosen MPI (default MPICH: mpicc.mpich, mpiexec.mpich;
openmpi: mpicc.openmpi, mpirun.openmpi and libnrm-pmpi-openmpi.so); prints
one JSON object.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading

import zmq

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from nrm.hpc import mpi as mpis  # noqa: E402


class Drain:
    """A PULL socket that swallows everything, like a daemon would."""

    def __init__(self, uri):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PULL)
        self.sock.bind(uri)
        self.count = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stop.is_set():
            if self.sock.poll(50):
                while True:
                    try:
                        self.sock.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self.count += 1

    def close(self):
        self.stop.set()
        self.thread.join()
        self.sock.close(linger=0)
        self.ctx.term()


def inwait_steps(tmp, repeat):
    """benchmarks/inwait_bench.c: medians of its per-step costs over ``repeat`` runs."""
    exe = os.path.join(tmp, "inwait_bench")
    build = os.path.join(REPO, "libnrm", "build")
    subprocess.run(["cc", "-O2", "-std=gnu11", f"-I{REPO}/libnrm/src", f"-I{REPO}/libnrm/include",
                    "-o", exe, os.path.join(REPO, "benchmarks", "inwait_bench.c"), f"-L{build}",
                    f"-Wl,-rpath,{build}", "-lnrm", "-lrt", "-pthread"], check=True)
    counters = os.path.join(tmp, "inwait-steps")
    os.mkdir(counters)
    got = {}
    for _ in range(repeat):
        out = subprocess.run([exe, counters, "20000"], capture_output=True, text=True,
                             check=True).stdout
        for k, v in re.findall(r"(\w+)_ns=([\d.]+)", out):
            got.setdefault(k, []).append(float(v))
    return {k: round(statistics.median(v), 1) for k, v in got.items()}


def run(argv, env):
    out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True,
                         timeout=600).stdout
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--calls", type=int, default=2000000)
    ap.add_argument("--iterations", type=int, default=20000,
                    help="barriers in the 2-rank run")
    ap.add_argument("--mpi", choices=("mpich", "openmpi"), default="mpich")
    ap.add_argument("--baseline-lib", help="an older interposer build to compare with")
    args = ap.parse_args()
    mpi = mpis.find(args.mpi)
    if mpi is None:
        print(json.dumps({"benchmark": "interposer", "mpi": args.mpi,
                          "skipped": f"{args.mpi} is not installed"}))
        return 0
    subprocess.run(["make", "-s", "-C", os.path.join(REPO, "libnrm"), "all",
                    f"MPICC={mpi.mpicc}"], check=True, stdout=subprocess.DEVNULL)
    PMPI = os.path.join(REPO, "libnrm", "build", mpi.pmpi)
    launch = mpi.launcher()
    tmp = tempfile.mkdtemp(prefix="nrm-bench-pmpi-")
    bench = os.path.join(tmp, "barrier_bench")
    imb = os.path.join(tmp, "imbalance")
    subprocess.run([mpi.mpicc, "-O2", "-o", bench,
                    os.path.join(REPO, "benchmarks", "barrier_bench.c")], check=True)
    subprocess.run([mpi.mpicc, "-O2", "-o", imb, os.path.join(REPO, "examples", "imbalance.c")],
                   check=True)
    uri = f"ipc://{tmp}/down"
    drain = Drain(uri)
    base_env = {k: v for k, v in os.environ.items()
                if k not in ("LD_PRELOAD", "NRM_TRANSMIT", "NRM_DOWNSTREAM_URI")
                and not k.startswith("NRM_INWAIT_")}
    base_env.update(mpi.env())
    counters = os.path.join(tmp, "inwait")
    os.mkdir(counters)
    inwait = {"NRM_INWAIT_DELAY": "500us", "NRM_INWAIT_COUNTERS": counters}
    variants = {
        "none": base_env,
        "pass_through": dict(base_env, LD_PRELOAD=PMPI, NRM_DOWNSTREAM_URI=uri),
        "transmit": dict(base_env, LD_PRELOAD=PMPI, NRM_DOWNSTREAM_URI=uri, NRM_TRANSMIT="1"),
        "inwait_predict": dict(base_env, LD_PRELOAD=PMPI, **inwait),
        "transmit_inwait_predict": dict(base_env, LD_PRELOAD=PMPI, NRM_DOWNSTREAM_URI=uri,
                                        NRM_TRANSMIT="1", **inwait),
    }
    if args.baseline_lib:
        old = os.path.abspath(args.baseline_lib)
        variants["pass_through_before"] = dict(base_env, LD_PRELOAD=old, NRM_DOWNSTREAM_URI=uri)
        variants["transmit_before"] = dict(base_env, LD_PRELOAD=old, NRM_DOWNSTREAM_URI=uri,
                                           NRM_TRANSMIT="1")
        variants["inwait_predict_before"] = dict(base_env, LD_PRELOAD=old, **inwait)
        variants["transmit_inwait_predict_before"] = dict(
            base_env, LD_PRELOAD=old, NRM_DOWNSTREAM_URI=uri, NRM_TRANSMIT="1", **inwait)
    per_call = {k: [] for k in variants}
    wall = {"none": [], "transmit": []}
    for _ in range(args.repeat):
        for name, env in variants.items():
            out = run(launch + ["-n", "1", bench, str(args.calls)], env)
            per_call[name].append(float(re.search(r"ns_per_call=([\d.]+)", out).group(1)))
        for name in wall:
            out = run(launch + ["-n", "2", "-bind-to", "core", imb, "-n",
                                str(args.iterations), "-u", "2000", "-b", "0"], variants[name])
            wall[name].append(float(re.search(r"time=([\d.]+)s", out).group(1)))
    drain.close()
    steps = inwait_steps(tmp, args.repeat)
    med = statistics.median
    base = med(per_call["none"])
    result = {
        "benchmark": "interposer", "mpi": mpi.name,
        "repeat": args.repeat, "calls": args.calls,
        "barrier_ns_per_call": {k: round(med(v), 2) for k, v in per_call.items()},
        "overhead_ns_per_call": {k: round(med(v) - base, 2) for k, v in per_call.items()
                                 if k != "none"},
        "two_rank_run": {
            "iterations": args.iterations,
            "wall_s_median": {k: round(med(v), 4) for k, v in wall.items()},
            "slowdown": round(med(wall["transmit"]) / med(wall["none"]), 4),
        },
        "messages_received": drain.count,
        "inwait_steps_ns": steps,
        "target": {"overhead_ns_per_call": 100},
    }
    result["meets_target"] = result["overhead_ns_per_call"]["transmit"] < 100 and \
        result["overhead_ns_per_call"]["transmit_inwait_predict"] < 100
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
