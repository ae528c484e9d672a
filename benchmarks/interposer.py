#!/usr/bin/env python3
"""Overhead of the PMPI interposer (libnrm-pmpi.so).

1. Per intercepted call: MPI_Barrier on 1 rank (benchmarks/barrier_bench.c)
   without the interposer, with it in pass-through (NRM_TRANSMIT unset),
   and with it transmitting (NRM_TRANSMIT=1, default 10 ms rate limit, a
   PULL socket draining in this process).  Overhead = median difference
   with the baseline measured in the same run.  Target: < 100 ns.
2. A barrier-heavy 2-rank run (examples/imbalance with a tiny work unit):
   wall time with and without the interposer transmitting; slowdown ratio.

usage: python benchmarks/interposer.py [--repeat 5] [--calls 2000000] [--mpi openmpi]
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
                if k not in ("LD_PRELOAD", "NRM_TRANSMIT", "NRM_DOWNSTREAM_URI")}
    base_env.update(mpi.env())
    variants = {
        "none": base_env,
        "pass_through": dict(base_env, LD_PRELOAD=PMPI, NRM_DOWNSTREAM_URI=uri),
        "transmit": dict(base_env, LD_PRELOAD=PMPI, NRM_DOWNSTREAM_URI=uri, NRM_TRANSMIT="1"),
    }
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
        "target": {"overhead_ns_per_call": 100},
    }
    result["meets_target"] = result["overhead_ns_per_call"]["transmit"] < 100
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
