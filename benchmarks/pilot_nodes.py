"""One nrm pilot manager driving 1, 4, 16 and 64 simulated nodes on this machine.

The manager is the Slurm mode's (``ClusterRunner``: the CURVE channel of
nrm/pilot/wire.py, one agent per node), in a fresh interpreter per node
count; the agents are ``python -m nrm.pilot.agent --stand-in`` processes,
one per simulated node, each ending every task it is sent at once (no nrmd,
no process): what is measured is the manager's dispatch and the channel,
not process creation. Each run submits one iterative job of
``PILOT_NODES_TASKS`` tasks (default 50 000) over nodes of
``PILOT_NODES_CORES`` cores (16); the steady state is the window between
20 % and 80 % of the tasks final: tasks per second there, the manager's
CPU (process time / wall: 1.0 is one core busy), the agents' CPU summed
and the whole machine's (other work included, in cpus busy: 2.0 is all of
this machine), and the manager's RSS with its agents connected (before the submit) and
at the end.

Baseline, same run: the pure manager (submit, place, end; no channel) over
the same pool and job, in this process (median of 3): the rate its own
logic allows.

``--nodes 1,4,16,64`` picks the counts; ``--nrmd`` also runs up to 4 nodes
with a real nrmd per agent and ``/bin/true`` (the machine's 2 cores then
bound everything). Prints JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pilotsim  # noqa: E402

TASKS = int(os.environ.get("PILOT_NODES_TASKS", "50000"))
CORES = int(os.environ.get("PILOT_NODES_CORES", "16"))
TICKS = os.sysconf("SC_CLK_TCK")


def loadavg() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def rss_mb(pid="self") -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def cpu_s(pid: int) -> float:
    """utime + stime of a live process, seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS
    except (OSError, IndexError, ValueError):
        return 0.0


def machine_busy() -> tuple:
    """(busy, total) jiffies of all cpus since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]
    total = sum(values[:8])
    return total - idle, total


def request(tasks: int):
    from nrm.pilot import jobfile
    return jobfile.parse_request(1, {"request": "submit", "jobs": [{
        "name": "t", "execution": {"exec": "/bin/true"}, "iteration": {"stop": tasks}}]}, "/")


# -------------------------------------------------------------- baseline ---
def pure_rate(nodes: int, tasks: int) -> float:
    """Tasks per second of the manager's logic alone over the same pool."""
    from nrm.pilot.manager import Manager
    from nrm.pilot.scheduler import Pool
    mgr = Manager(Pool([(f"n{i}", CORES) for i in range(nodes)]), "/wd")
    t0 = time.perf_counter()
    mgr.handle(request(tasks), 0.0)
    pilotsim.drain(mgr, batch_ends=True)
    return tasks / (time.perf_counter() - t0)


# --------------------------------------------------------------- manager ---
class Window:
    """Marks the 20 % and 80 % points of the tasks' ends."""

    def __init__(self, tasks: int, agents: list):
        self.marks = {int(0.2 * tasks): "lo", int(0.8 * tasks): "hi"}
        self.done = 0
        self.agents = agents
        self.at: dict = {}

    def __call__(self, item) -> None:
        if getattr(item, "index", None) is None:
            return                                  # the job itself
        self.done += 1
        mark = self.marks.get(self.done)
        if mark:
            self.at[mark] = (time.perf_counter(), time.process_time(),
                             sum(cpu_s(p.pid) for p in self.agents), machine_busy())


async def manage(nodes: int, tasks: int, nrmd: bool) -> dict:
    from nrm.pilot.allocation import ClusterRunner, NodePool
    from nrm.pilot.wire import make_keys
    from nrm.tools.localnrmd import LocalNrmd
    work = tempfile.mkdtemp(prefix="pilot-nodes-")
    keys_dir = os.path.join(work, "keys")
    keys = make_keys(keys_dir)
    names = [f"n{i}" for i in range(nodes)]
    agents: list = []
    window = Window(tasks, agents)
    runner = ClusterRunner(NodePool([(n, CORES) for n in names]), work, host="127.0.0.1",
                           keys=keys, on_final=window, agent_timeout=120.0)
    runner.endpoint.start()
    daemons = []
    out: dict = {"nodes": nodes, "cores_per_node": CORES, "tasks": tasks}
    try:
        t0 = time.perf_counter()
        for name in names:
            argv = [sys.executable, "-m", "nrm.pilot.agent", "--manager", runner.endpoint.uri,
                    "--keys", keys_dir, "--node", name]
            if nrmd:
                d = LocalNrmd(log_level="warning").start()
                daemons.append(d)
                argv += ["--runtime-dir", d.rundir]
            else:
                argv.append("--stand-in")
            agents.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                           stdout=subprocess.DEVNULL))
        await asyncio.wait_for(runner.all_hello.wait(), 300)
        out["agents_up_s"] = time.perf_counter() - t0
        await asyncio.sleep(0.5)
        out["manager_rss_connected_mb"] = rss_mb()
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        runner.handle(request(tasks))
        await runner.wait_done()
        wall = time.perf_counter() - t0
        out["total_s"] = wall
        out["manager_cpu_total_s"] = time.process_time() - cpu0
        outcome = runner.manager.outcome()
        if outcome["SUCCEED"] != 1:
            raise SystemExit(f"{nodes} nodes: {outcome}")
        (w0, c0, a0, m0), (w1, c1, a1, m1) = window.at["lo"], window.at["hi"]
        steady = 0.6 * tasks
        out["steady_tasks_per_s"] = steady / (w1 - w0)
        out["steady_manager_cpu"] = (c1 - c0) / (w1 - w0)
        out["steady_agents_cpu"] = (a1 - a0) / (w1 - w0)
        out["manager_cpu_us_per_task"] = 1e6 * (c1 - c0) / steady
        # every process on the machine (other work included), in cpus busy
        out["steady_machine_busy_cpus"] = os.cpu_count() * (m1[0] - m0[0]) / (m1[1] - m0[1])
        out["manager_rss_end_mb"] = rss_mb()
    finally:
        runner.stop_agents()
        deadline = time.monotonic() + 30
        for p in agents:
            while p.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if p.poll() is None:
                p.kill()
                p.wait()
        runner.endpoint.close()
        for d in daemons:
            d.stop()
        shutil.rmtree(work, ignore_errors=True)
    return out


def run_child(nodes: int, tasks: int, nrmd: bool) -> dict:
    argv = [sys.executable, os.path.abspath(__file__), "--child", str(nodes),
            "--tasks", str(tasks)] + (["--nrmd"] if nrmd else [])
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"manager for {nodes} nodes failed: {r.stderr.strip()[-2000:]}")
    return json.loads(r.stdout)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--nodes", default="1,4,16,64")
    p.add_argument("--tasks", type=int, default=TASKS)
    p.add_argument("--nrmd", action="store_true",
                   help="also up to 4 nodes with a real nrmd each (tasks: /bin/true)")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        out = asyncio.run(manage(args.child, args.tasks, args.nrmd))
        print(json.dumps(out))
        return
    counts = [int(n) for n in args.nodes.split(",")]
    out: dict = {"load_average_before": loadavg(), "stand_in": []}
    for n in counts:
        base = statistics.median(pure_rate(n, args.tasks) for _ in range(3))
        res = run_child(n, args.tasks, False)
        res["pure_manager_tasks_per_s"] = base
        res["ratio_to_pure_manager"] = res["steady_tasks_per_s"] / base
        out["stand_in"].append({k: round(v, 3) if isinstance(v, float) else v
                                for k, v in res.items()})
    if args.nrmd:
        out["nrmd"] = []
        for n in [c for c in counts if c <= 4]:
            res = run_child(n, min(args.tasks, 2000), True)
            out["nrmd"].append({k: round(v, 3) if isinstance(v, float) else v
                                for k, v in res.items()})
    out["load_average_after"] = loadavg()
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
