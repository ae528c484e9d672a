"""Where a pilot task's wall time goes: timestamps along the chain.

``nrm pilot`` keeps one task in flight per core, so per core the chain
"nrmd reaps task N -> exit reply -> the pilot handles it -> launch N+1 ->
nrmd starts it" is serial. This runs ``nrm pilot`` (1000 tasks, a pool
of 2 cores, a running private nrmd) in this process's child with its
client's sends and exit replies timestamped (``time.monotonic``), each task
a tiny static C program that appends its own ``CLOCK_MONOTONIC`` start to
a file, and splits each core's cycle into:

* ``launch``: the pilot sends the run -> the task's process runs (nrmd's
  receive, decode, slice, spawner, exec);
* ``exit_notice``: the task runs (it exits at once) -> the pilot has the
  exit reply (nrmd's reap, container end, reply, both zmq I/O threads);
* ``reaction``: the pilot has an exit reply -> it sends the next launch.

With batched launches (``RunBatch``, chained iterations: docs/pilot.md)
each task of a batch counts as sent with it, so ``launch`` includes the
time a chained task waits in nrmd behind its predecessor, and
``reaction`` is the time from an exit to the next request, if any, sent
after it; ``cycle_per_core_ms`` means the same either way.

Also the cpu of each process over the steady part (first send to last exit,
per task): the pilot (its main thread apart), nrmd with its reaped tasks,
its spawners. Medians over ``--rounds`` runs. Prints JSON.

Usage: benchmarks/pilot_chain.py [--tasks N] [--rounds R]
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nrm.tools.localnrmd import LocalNrmd  # noqa: E402

STAMP_C = r"""
#include <fcntl.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>
int main(int argc, char **argv) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    char buf[96];
    int n = snprintf(buf, sizeof buf, "%s %ld.%09ld\n", argv[1], (long)ts.tv_sec, ts.tv_nsec);
    int fd = open(argv[2], O_WRONLY | O_APPEND | O_CREAT, 0600);
    return fd < 0 || write(fd, buf, n) != n;
}
"""

# Runs in the pilot's process: wraps the client's send and reply handling
# with timestamps, then runs the CLI; dumps what it saw on exit.
CHILD = r"""
import json, os, resource, sys, time
from nrm import client, protocol
from nrm.tools.localnrmd import spawner_pids
events, cpu = [], {}
nrmd = int(os.environ["CHAIN_NRMD_PID"])

def proc_cpu(path):
    f = open(path).read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in f[11:15]) / os.sysconf("SC_CLK_TCK")

def sample():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return {"pilot": r.ru_utime + r.ru_stime,
            "pilot_main_thread": proc_cpu(f"/proc/self/task/{os.getpid()}/stat"),
            "nrmd_and_tasks": proc_cpu(f"/proc/{nrmd}/stat"),
            "spawners": sum(proc_cpu(f"/proc/{p}/stat") for p in spawner_pids(nrmd))}

send, on_reply = client.AsyncClient._send, client.AsyncClient._on_reply

BATCH, EXITS = getattr(protocol, "RunBatch", ()), getattr(protocol, "Exits", ())

def timed_send(self, msg):
    if isinstance(msg, (protocol.Run, BATCH)) and "first" not in cpu:
        cpu["first"] = sample()
    if isinstance(msg, protocol.Run):
        events.append(("send", time.monotonic(), msg.id, msg.argv[-2]))
    elif isinstance(msg, BATCH):
        now = time.monotonic()
        events.extend(("send", now, t.key, t.argv[-2]) for t in msg.tasks)
    return send(self, msg)

def timed_reply(self, frames):
    reply = protocol.decode_reply(frames[0])
    if isinstance(reply, protocol.Exit):
        events.append(("exit", time.monotonic(), reply.id, None))
    elif isinstance(reply, EXITS):
        now = time.monotonic()
        events.extend(("exit", now, e.key, None) for e in reply.exits)
    return on_reply(self, frames)

client.AsyncClient._send, client.AsyncClient._on_reply = timed_send, timed_reply
from nrm.cli.main import main
try:
    rc = main(sys.argv[2:])
finally:
    last = sample()
    with open(sys.argv[1], "w") as f:
        json.dump({"events": events, "cpu": {k: last[k] - cpu["first"][k] for k in last}}, f)
sys.exit(rc)
"""


def one_round(env: dict, stamp: str, n: int) -> dict:
    wd = tempfile.mkdtemp(prefix="pilot-chain-")
    stamps, path, out = (os.path.join(wd, x) for x in ("stamps", "jobs.json", "seen.json"))
    with open(path, "w") as f:
        json.dump([{"request": "submit", "jobs": [{
            "name": "t", "execution": {"exec": stamp, "args": ["${it}", stamps]},
            "iteration": {"stop": n}}]},
            {"request": "control", "command": "finishAfterAllTasksDone"}], f)
    subprocess.run([sys.executable, "-c", CHILD, out, "pilot", "--file-path", path, "--wd", wd,
                    "--nodes", "2", "--progress", "none"], env=env, check=True)
    with open(out) as f:
        seen = json.load(f)
    started = {}
    with open(stamps) as f:
        for line in f:
            it, t = line.split()
            started[it] = float(t)
    sent, it_of, got = {}, {}, {}
    for kind, t, rid, it in seen["events"]:
        if kind == "send":
            sent[it], it_of[rid] = t, it
        elif rid in it_of:
            got[it_of[rid]] = t
    reaction, last_exit = [], None
    for kind, t, _, _ in sorted(seen["events"], key=lambda e: e[1]):
        if kind == "exit":
            last_exit = t
        elif last_exit is not None:
            reaction.append(t - last_exit)
            last_exit = None
    its = [i for i in sent if i in started and i in got]
    steady = max(got.values()) - min(sent.values())
    shutil.rmtree(wd, ignore_errors=True)
    ms = 1e3
    return {
        "cycle_per_core_ms": ms * 2 * steady / len(its),
        "launch_ms": ms * statistics.median(started[i] - sent[i] for i in its),
        "exit_notice_ms": ms * statistics.median(got[i] - started[i] for i in its),
        "reaction_ms": ms * statistics.median(reaction),
        **{f"cpu_per_task_ms_{k}": ms * v / len(its) for k, v in seen["cpu"].items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    build = tempfile.mkdtemp(prefix="pilot-chain-stamp-")
    src, stamp = os.path.join(build, "stamp.c"), os.path.join(build, "stamp")
    with open(src, "w") as f:
        f.write(STAMP_C)
    subprocess.run(["cc", "-O2", "-static", "-o", stamp, src], check=True)
    rounds = []
    with open("/proc/loadavg") as f:
        load_before = float(f.read().split()[0])
    with LocalNrmd(log_level="warning") as d:
        env = dict(d.env, CHAIN_NRMD_PID=str(d.pid))
        for _ in range(args.rounds):
            rounds.append(one_round(env, stamp, args.tasks))
    shutil.rmtree(build, ignore_errors=True)
    with open("/proc/loadavg") as f:
        load_after = float(f.read().split()[0])
    out = {"tasks": args.tasks, "rounds": args.rounds, "load_average_before": load_before}
    for key in rounds[0]:
        out[key] = round(statistics.median(r[key] for r in rounds), 4)
    out["load_average_after"] = load_after
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
