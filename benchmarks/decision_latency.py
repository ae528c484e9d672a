#!/usr/bin/env python3
"""Decision latency: phase-context message drained from the socket -> control written.

A real nrmd (``--hw emulated``: controls are real cgroup CPU-bandwidth
writes) runs a 2-cpu container with a DDCM policy. A sender process runs
*inside* the container as one of its tasks (so the daemon's sender-ownership
check accepts it), sending protocol-v1 phase contexts (10 ms phases) for
both ranks and cpus, in phase order, at a paced rate, then flat out. Rank 0
is always on the critical path; rank 1 alternates between 80 % and 100 % of
its phase computing, so that DDCM changes cpu 1's level at every gate firing
that is not a settling one (the daemon skips the firing after a change):
one control write per four messages, far more than a converged policy makes
(the worst case for the policy path). A second task, ``sleep``, keeps the
container alive until the daemon has handled every message.

The daemon records, per message, the time from the drain of its batch
(``Ingest.arrival``) to the last control written (``decision_latency``), or
to the end of its handling when it wrote nothing (``handled_latency``), in
cumulative histograms read from ``nrm status --json``; each step reports the
difference of two snapshots, and the platform's write call alone
(``write_only``, per control). Baseline, same run, same rates: the same
pipeline with policy NONE (arrival to handled).

Time spent queued in the socket before a drain is not included (no sender
clock in the message); at saturation it shows as an ingested rate below the
offered one.

``--hw fake-msr`` runs the same steps with the linux backend on a fake
sysfs/devfs tree (tests/fakehw.py): a clock-modulation write is then a
pwrite to a file, close to a real MSR's cost (~2 us), which separates the
daemon's own path from the emulated node's actuation (a cgroup quota write
plus a scan of the container's threads, ~200 us per write here).

usage: python benchmarks/decision_latency.py [--rates 1000,10000,50000,0] [--duration 3]
       [--hw emulated,fake-msr]     (rate 0 = flat out). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

PHASE_NS = 10_000_000


def _cycle(ids: dict, first_phase: int, phases: int):
    """Encoded messages for ``phases`` phases from ``first_phase`` on, rank 0 then rank 1.

    Rank 0 computes the whole phase (critical path); rank 1 alternates
    between 80 % and 100 %, which moves its DDCM level at every firing that
    is not a settling one: the worst case for the policy path.
    """
    from nrm import protocol
    from nrm.protocol import DPhaseContext

    out = []
    for phase in range(first_phase, first_phase + phases):
        for rank, work in ((0, 1.0), (1, 0.8 if phase % 2 else 1.0)):
            out.append(protocol.encode(DPhaseContext(
                rank=rank, cpu=rank, phase=phase, aggregation=1,
                computetime=int(PHASE_NS * work), totaltime=PHASE_NS, **ids)))
    return out


def sender(args) -> int:
    """Run as a task inside the container: send phase contexts, print what was sent.

    One process sends for both ranks in phase order, so that every pair of
    messages fires the policy's gate: with one process per rank, the gate
    fired mostly when a backlog had lined the two streams up, which biased
    the decision latency towards backlogged batches.
    """
    import zmq

    env = os.environ
    ids = dict(container=env["NRM_CONTAINER_ID"], task=env["NRM_TASK_ID"], app="bench")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, 1000)   # libnrm's: flat out blocks instead of queueing
    sock.connect(env["NRM_DOWNSTREAM_URI"])
    per_cycle = 2048
    messages = _cycle(ids, 1, per_cycle)   # pre-encoded: encoding must not limit the rate
    delay = args.start - time.time()
    if delay > 0:
        time.sleep(delay)
    t0 = time.perf_counter()
    end = t0 + args.duration
    interval = 1.0 / args.rate if args.rate > 0 else 0.0
    sent = 0
    n = len(messages)
    while True:
        now = time.perf_counter()
        if now >= end:
            break
        if interval:
            due = int((now - t0) / interval) + 1 - sent
            if due <= 0:
                time.sleep(min(interval, end - now))
                continue
        else:
            due = 256
        for _ in range(due):
            i = sent % n
            if i == 0 and sent:   # phase counts keep growing
                messages = _cycle(ids, sent // 2 + 1, per_cycle)
            sock.send(messages[i])
            sent += 1
    elapsed = time.perf_counter() - t0
    sock.close(linger=60000)
    ctx.term()
    print(json.dumps({"sent": sent, "elapsed_s": elapsed}), flush=True)
    return 0


def _manifest(policy: str, directory: str) -> str:
    path = os.path.join(directory, f"bench-{policy.lower()}.yml")
    with open(path, "w") as f:
        f.write(f"name: latency-{policy.lower()}\napp:\n  slice: {{cpus: 2, mems: 1}}\n"
                f"  power: {{policy: {policy}, damper: 1ms, slowdown: 1.1}}\n")
    return path


def _histograms(client):
    pol = client.status()["policy"]
    return ({k: pol[k]["histogram"]
             for k in ("decision_latency", "handled_latency", "write_latency")},
            pol.get("decisions", 0))


def _received(client) -> int:
    down = client.status()["downstream"]
    return down["downstream"]["received"]


def _stats(after, before):
    from nrm.power.latency import difference, percentile
    counts = difference(after, before)
    total = sum(counts)
    if not total:
        return {"count": 0}
    bounds = after["bounds_s"]
    return {"count": total, "p50_us": round(percentile(bounds, counts, 0.5) * 1e6, 1),
            "p99_us": round(percentile(bounds, counts, 0.99) * 1e6, 1),
            "max_us_since_start": round(after["max_s"] * 1e6, 1)}


def run_step(daemon, client, policy: str, rate: int, duration: float, workdir: str,
             hw: str) -> dict:
    from nrm.tools.localnrmd import nrm_argv

    name = f"lat-{policy.lower()}-{rate}"
    manifest = _manifest(policy, workdir)
    env = dict(daemon.env)
    keeper = subprocess.Popen(nrm_argv() + ["run", "--container", name, manifest,
                                            "sleep", "600"], env=env, cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while not any(c.get("name") == name or c.get("id") == name for c in client.list()):
        if time.monotonic() > deadline or keeper.poll() is not None:
            raise RuntimeError(f"container {name} did not start: {keeper.stderr.read()}")
        time.sleep(0.05)
    hist0, decisions0 = _histograms(client)
    received0 = _received(client)
    start = time.time() + 1.5
    procs = [subprocess.Popen(
        nrm_argv() + ["run", "--container", name, manifest, sys.executable,
                      os.path.abspath(__file__), "--sender", "--rate", str(rate),
                      "--duration", str(duration), "--start", repr(start)],
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)]
    sent = 0
    for p in procs:
        out, err = p.communicate(timeout=duration + 120)
        if p.returncode != 0:
            raise RuntimeError(f"sender failed ({p.returncode}): {err.decode()[-500:]}")
        sent += json.loads(out.decode().strip().splitlines()[-1])["sent"]
    # Wait until the daemon has drained everything the senders wrote.
    last, t_last = _received(client), time.time()
    while last - received0 < sent and time.time() - t_last < 5:
        time.sleep(0.05)
        now = _received(client)
        if now != last:
            last, t_last = now, time.time()
    received = last - received0
    hist1, decisions1 = _histograms(client)
    subprocess.run(nrm_argv() + ["kill", name], env=env, cwd=REPO, capture_output=True)
    keeper.wait(30)
    span = max(t_last, start + duration) - start
    return {"hw": hw, "policy": policy, "offered_msg_s": rate or "flat out", "sent": sent,
            "received": received, "ingested_msg_s": round(received / span),
            "decisions": decisions1 - decisions0,
            "decision_latency": _stats(hist1["decision_latency"], hist0["decision_latency"]),
            "handled_latency": _stats(hist1["handled_latency"], hist0["handled_latency"]),
            "write_only": _stats(hist1["write_latency"], hist0["write_latency"])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="1000,10000,50000,0",
                        help="total offered msg/s per step, comma-separated; 0 = flat out")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per step")
    parser.add_argument("--hw", default="emulated,fake-msr",
                        help="backends, comma-separated: emulated, fake-msr")
    parser.add_argument("--sender", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--start", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sender:
        return sender(args)

    from nrm.client import Client
    from nrm.tools.localnrmd import LocalNrmd

    rates = [int(r) for r in args.rates.split(",") if r.strip()]
    workdir = tempfile.mkdtemp(prefix="nrm-latbench-")
    steps, counters = [], {}
    for hw in [h.strip() for h in args.hw.split(",") if h.strip()]:
        if hw == "emulated":
            options = ["--hw", "emulated"]
        elif hw == "fake-msr":
            from tests.fakehw import FakeNode
            root = os.path.join(workdir, "fakehw")
            FakeNode(root, cores=os.cpu_count() or 2, msr=True)
            options = ["--hw", "linux", "--hw-root", root]
        else:
            parser.error(f"unknown --hw {hw!r}")
        daemon = LocalNrmd(*options).start()
        try:
            with Client(daemon.rundir) as client:
                for rate in rates:
                    for policy in ("NONE", "DDCM"):
                        steps.append(run_step(daemon, client, policy, rate, args.duration,
                                              workdir, hw))
                counters[hw] = {k: v for k, v in client.status()["policy"].items()
                                if not isinstance(v, dict)}
        finally:
            daemon.stop()
    result = {
        "benchmark": "decision_latency",
        "what": "phase context drained from the socket -> control written (DDCM, emulated "
                "node: cgroup CPU-bandwidth writes); baseline NONE: drained -> handled",
        "target": {"p50_us": 200, "p99_us": 1000},
        "duration_s_per_step": args.duration,
        "load_average": os.getloadavg(),
        "cpus": os.cpu_count(),
        "steps": steps,
        "policy_counters": counters,
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
