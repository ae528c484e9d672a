"""nrmd's CPU per task: batched launches (``run_batch``) against the
pilot's per-run launches, in the same run.

Both send what ``nrm pilot`` sends for a task of ``/bin/true``: the
client's whole environment plus ``QCG_PM_*`` variables, a working
directory, a named container, a task key, detached and followed, no
``started`` reply, a 1-cpu slice confined to one cpu. The per-run path
keeps one run in flight per cpu (the pilot's way); the batch path sends
the N tasks, spread over the cpus, in one ``run_batch``. Rounds
alternate between the two on one private nrmd (``--hw emulated``, default
spawners); nrmd's CPU is read from /proc/PID/task/*/schedstat (every
thread, ns) around each round, the spawners' and this client's too.
Medians over the rounds. Prints one JSON object.

Usage: benchmarks/launch_batch.py [--tasks N] [--rounds R]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from nrm import protocol  # noqa: E402
from nrm.client import AsyncClient  # noqa: E402
from nrm.manifest import parse  # noqa: E402
from nrm.tools.localnrmd import LocalNrmd, spawner_pids  # noqa: E402

MANIFEST = parse({"name": "bench", "app": {"slice": {"cpus": 1, "mems": 1}}})


def schedstat_s(pid: int) -> float:
    """CPU time of every thread of ``pid``, in seconds (ns resolution)."""
    total = 0
    base = f"/proc/{pid}/task"
    for tid in os.listdir(base):
        try:
            with open(f"{base}/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total / 1e9


def qcg_env(i: int, cpu: int) -> dict:
    return {"QCG_PM_NNODES": "1", "QCG_PM_NODELIST": "n0", "QCG_PM_NPROCS": "1",
            "QCG_PM_NTASKS": "1", "QCG_PM_STEP_ID": str(i), "QCG_PM_TASKS_PER_NODE": "1",
            "QCG_PM_CPU_SET": str(cpu)}


async def per_run(client: AsyncClient, n: int, tag: str, wd: str) -> None:
    """The pilot's way: one keyed run in flight per cpu."""
    cpus = sorted(os.sched_getaffinity(0))
    free: asyncio.Queue = asyncio.Queue()
    for cpu in cpus:
        free.put_nowait(cpu)
    base = dict(os.environ)

    async def one(i: int) -> None:
        cpu = await free.get()
        try:
            result = await client.run(
                MANIFEST, ["/bin/true"], env=dict(base, **qcg_env(i, cpu)), cwd=wd,
                output=False, wait=True, cpus_allowed=[cpu], detach=True, follow=True,
                container=f"{tag}-{i}", key=f"{tag}.{i}")
            assert result.status == 0, result
        finally:
            free.put_nowait(cpu)
    await asyncio.gather(*(one(i) for i in range(n)))


async def batched(client: AsyncClient, n: int, tag: str, wd: str) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    tasks = []
    for i in range(n):
        cpu = cpus[i % len(cpus)]
        tasks.append(protocol.BatchTask(key=f"{tag}.{i}", container=f"{tag}-{i}",
                                        argv=["/bin/true"], cpus=[cpu], cwd=wd,
                                        env=qcg_env(i, cpu)))
    bad = []

    def on_exits(exits):
        bad.extend(e for e in exits if e.status != 0)
    await client.run_batch(MANIFEST, dict(os.environ), tasks, on_exits)
    assert not bad, bad[:3]


async def one_round(rundir: str, kind: str, n: int, tag: str, wd: str) -> float:
    async with AsyncClient(rundir) as client:
        await client.status()
        start = time.monotonic()
        await (batched if kind == "batch" else per_run)(client, n, tag, wd)
        wall = time.monotonic() - start
        await client.forget(prefix=tag + ".")
    return wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=5, help="rounds of each kind, interleaved")
    args = ap.parse_args()
    wd = tempfile.mkdtemp(prefix="launch-batch-")
    d = LocalNrmd("--hw", "emulated", log_level="warning").start()
    results = {"per_run": [], "batch": []}
    try:
        helpers = spawner_pids(d.proc.pid)
        asyncio.run(one_round(d.rundir, "batch", 50, "warm-b", wd))     # warm both paths
        asyncio.run(one_round(d.rundir, "per_run", 50, "warm-r", wd))
        for r in range(args.rounds):
            for kind in (("per_run", "batch") if r % 2 == 0 else ("batch", "per_run")):
                before = (schedstat_s(d.proc.pid), sum(schedstat_s(p) for p in helpers),
                          resource.getrusage(resource.RUSAGE_SELF))
                wall = asyncio.run(one_round(d.rundir, kind, args.tasks, f"{kind}{r}", wd))
                own = resource.getrusage(resource.RUSAGE_SELF)
                n = args.tasks
                results[kind].append({
                    "nrmd_cpu_us_per_task": (schedstat_s(d.proc.pid) - before[0]) / n * 1e6,
                    "spawners_cpu_us_per_task":
                        (sum(schedstat_s(p) for p in helpers) - before[1]) / n * 1e6,
                    "client_cpu_us_per_task":
                        ((own.ru_utime + own.ru_stime)
                         - (before[2].ru_utime + before[2].ru_stime)) / n * 1e6,
                    "wall_us_per_task": wall / n * 1e6,
                })
    finally:
        d.stop()

    def med(kind, field):
        return round(statistics.median(x[field] for x in results[kind]), 1)
    fields = ("nrmd_cpu_us_per_task", "spawners_cpu_us_per_task", "client_cpu_us_per_task",
              "wall_us_per_task")
    out = {"benchmark": "launch_batch", "tasks": args.tasks, "rounds": args.rounds,
           "cpus": len(os.sched_getaffinity(0)),
           "load_avg_1m": round(os.getloadavg()[0], 2)}
    for kind in ("per_run", "batch"):
        out[kind] = {f: med(kind, f) for f in fields}
        out[kind]["nrmd_cpu_us_per_task_rounds"] = [
            round(x["nrmd_cpu_us_per_task"], 1) for x in results[kind]]
    out["nrmd_cpu_batch_over_per_run"] = round(
        out["batch"]["nrmd_cpu_us_per_task"] / out["per_run"]["nrmd_cpu_us_per_task"], 3)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
