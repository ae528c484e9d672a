"""Task launch throughput and latency through nrmd, against a floor.

N tasks of /bin/true, each in its own 1-cpu slice (enforced by the daemon's
runtime: cgroups as root), submitted through nrm.client.AsyncClient with a
bounded number in flight; requests that find no free cpu wait in the
daemon's queue. The floor is the same N through plain subprocess.Popen, as
many at a time, in the same run. Also: request round trip (status) p50/p99.

The daemon is measured once per `--spawners` setting (0 = launches from
the daemon's own thread), each with its own floor runs interleaved, so
every ratio compares numbers taken minutes apart at most.

With ``--like-pilot`` each run is what ``nrm pilot`` sends for a task: the
client's whole environment plus QCG_PM_* variables, a working directory, a
named container, detached and followed (hence a started reply), a 1-cpu
slice confined to one cpu, one run in flight per cpu; the floor keeps as
many Popen in flight.

Prints one JSON object. Usage:
    benchmarks/launch.py [--tasks N] [--inflight K] [--repeat R] [--spawners 0,1,2]
                         [--started-replies] [--like-pilot]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from nrm.client import AsyncClient, Client  # noqa: E402
from nrm.manifest import parse  # noqa: E402
from nrm.tools.localnrmd import LocalNrmd, spawner_pids  # noqa: E402

MANIFEST = parse({"name": "bench", "app": {"slice": {"cpus": 1, "mems": 1}}})


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))]


def floor_popen(n: int, inflight: int) -> float:
    start = time.perf_counter()
    running = []
    for _ in range(n):
        if len(running) >= inflight:
            running.pop(0).wait()
        running.append(subprocess.Popen(["/bin/true"]))
    for p in running:
        p.wait()
    return n / (time.perf_counter() - start)


def pilot_kwargs(i: int, cpu: int, wd: str) -> dict:
    """AsyncClient.run's arguments for task ``i`` as nrm.pilot.runner sends them."""
    env = dict(os.environ)
    env.update({"QCG_PM_NNODES": "1", "QCG_PM_NODELIST": "n0", "QCG_PM_NPROCS": "1",
                "QCG_PM_NTASKS": "1", "QCG_PM_STEP_ID": str(i), "QCG_PM_TASKS_PER_NODE": "1",
                "QCG_PM_CPU_SET": str(cpu)})
    return {"env": env, "cwd": wd, "cpus_allowed": [cpu], "detach": True, "follow": True,
            "container": f"bench-{os.getpid()}-{i}", "on_started": lambda _result: None}


async def through_pilot_like(rundir: str, n: int, _inflight: int, _started: bool = False):
    """Like through_nrm, with the runs of ``nrm pilot`` (one per cpu in flight)."""
    to_start, to_exit = [], []
    cpus = sorted(os.sched_getaffinity(0))
    wd = tempfile.mkdtemp(prefix="launch-bench-")
    async with AsyncClient(rundir) as client:
        free: asyncio.Queue = asyncio.Queue()
        for cpu in cpus:
            free.put_nowait(cpu)

        async def one(i: int):
            cpu = await free.get()
            try:
                t0 = time.monotonic()
                result = await client.run(MANIFEST, ["/bin/true"], output=False, wait=True,
                                          **pilot_kwargs(i, cpu, wd))
                to_exit.append(time.monotonic() - t0)
                assert result.status == 0, result
                to_start.append(result.started_at - t0)
            finally:
                free.put_nowait(cpu)
        start = time.monotonic()
        await asyncio.gather(*(one(i) for i in range(n)))
        rate = n / (time.monotonic() - start)
    return rate, to_start, to_exit


async def through_nrm(rundir: str, n: int, inflight: int, started_replies: bool = False):
    """Returns tasks/s, submit-to-start and submit-to-exit latencies.

    Without started replies (what a client that waits for many tasks
    asks for) the start is the one nrmd records and returns in the exit
    reply, on the node's monotonic clock; with them, it is when the
    client received the ``started`` reply."""
    to_start, to_exit = [], []
    async with AsyncClient(rundir) as client:
        sem = asyncio.Semaphore(inflight)

        async def one():
            async with sem:
                t0 = time.monotonic()

                def seen_start(_result):
                    to_start.append(time.monotonic() - t0)
                result = await client.run(MANIFEST, ["/bin/true"], output=False, wait=True,
                                          env={}, on_started=seen_start if started_replies
                                          else None)
                to_exit.append(time.monotonic() - t0)
                assert result.status == 0, result
                if not started_replies:
                    to_start.append(result.started_at - t0)
        start = time.monotonic()
        await asyncio.gather(*(one() for _ in range(n)))
        rate = n / (time.monotonic() - start)
    return rate, to_start, to_exit


def round_trips(rundir: str, n: int):
    out = []
    with Client(rundir) as c:
        for _ in range(n):
            t0 = time.perf_counter()
            c.status()
            out.append(time.perf_counter() - t0)
    return out


def cpu_s(pid: int) -> float:
    """utime + stime of one process: robust to a shared machine, unlike rates."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(spawners: int, args) -> dict:
    d = LocalNrmd("--hw", "emulated", "--spawners", str(spawners),
                  log_level="warning").start()
    try:
        floors, rates, lat_all, starts = [], [], [], []
        daemon_cpu = helper_cpu = client_cpu = 0.0
        run = through_pilot_like if args.like_pilot else through_nrm
        inflight = len(os.sched_getaffinity(0)) if args.like_pilot else args.inflight
        for _ in range(args.repeat):
            floors.append(floor_popen(args.tasks, inflight))
            helpers = spawner_pids(d.proc.pid)
            before = cpu_s(d.proc.pid), sum(cpu_s(p) for p in helpers)
            own = resource.getrusage(resource.RUSAGE_SELF)
            rate, started, lat = asyncio.run(run(d.rundir, args.tasks, inflight,
                                                 args.started_replies))
            after = resource.getrusage(resource.RUSAGE_SELF)
            client_cpu += (after.ru_utime + after.ru_stime) - (own.ru_utime + own.ru_stime)
            daemon_cpu += cpu_s(d.proc.pid) - before[0]
            helper_cpu += sum(cpu_s(p) for p in helpers) - before[1]
            rates.append(rate)
            lat_all.extend(lat)
            starts.extend(started)
        rtts = round_trips(d.rundir, 2000)
        status = Client(d.rundir).status()
    finally:
        d.stop()
    floor, rate = statistics.median(floors), statistics.median(rates)
    return {
        "spawners": spawners,
        "started_replies": args.started_replies or args.like_pilot,
        "like_pilot": args.like_pilot,
        "runtime": status["runtime"]["name"],
        "runtime_notes": status["runtime"].get("notes", []),
        "nrm_tasks_per_s_median": round(rate, 1),
        "nrm_tasks_per_s_runs": [round(r, 1) for r in rates],
        "floor_popen_tasks_per_s_median": round(floor, 1),
        "floor_popen_tasks_per_s_runs": [round(f, 1) for f in floors],
        "ratio_to_floor": round(rate / floor, 3),
        "daemon_cpu_us_per_task": round(daemon_cpu / (args.tasks * args.repeat) * 1e6, 1),
        "spawners_cpu_us_per_task": round(helper_cpu / (args.tasks * args.repeat) * 1e6, 1),
        "client_cpu_us_per_task": round(client_cpu / (args.tasks * args.repeat) * 1e6, 1),
        "run_to_exit_ms_p50": round(pct(lat_all, 50) * 1e3, 3),
        "run_to_exit_ms_p99": round(pct(lat_all, 99) * 1e3, 3),
        "submit_to_start_ms_p50": round(pct(starts, 50) * 1e3, 3),
        "submit_to_start_ms_p99": round(pct(starts, 99) * 1e3, 3),
        "status_rtt_ms_p50": round(pct(rtts, 50) * 1e3, 3),
        "status_rtt_ms_p99": round(pct(rtts, 99) * 1e3, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=2000)
    ap.add_argument("--inflight", type=int, default=8,
                    help="runs in flight; with more than the slices, the rest wait in "
                         "the daemon's queue, where hand-over needs one per slice (default 8; "
                         "sessions 1-7 used 4)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--started-replies", action="store_true",
                    help="ask for a started reply per run (the client's view of the start)")
    ap.add_argument("--like-pilot", action="store_true",
                    help="runs as nrm pilot sends them (environment, wd, named, detached "
                         "and followed, a confined 1-cpu slice, one in flight per cpu)")
    ap.add_argument("--spawners", default="0,1,2",
                    help="comma-separated spawner counts to measure (default 0,1,2)")
    args = ap.parse_args()
    results = [measure(int(n), args) for n in args.spawners.split(",")]
    print(json.dumps({
        "benchmark": "launch",
        "tasks": args.tasks, "inflight": args.inflight, "repeat": args.repeat,
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
