#!/usr/bin/env python3
"""Load: 1000 tasks in flight, 10 listeners and a downstream flood at once.

Issue #7 asks whether nrmd stays responsive and bounded when everything
happens together, so one scenario runs all of it against a real nrmd
(emulated hardware, cgroup runtime as root):

* ``--tasks`` gate tasks, each in its own oversubscribed 1-cpu container,
  all submitted at once over one ``AsyncClient``.  Each blocks reading one
  line from a FIFO, so all of them are alive together for certain (a sleep
  would only make it likely); once every task has started and ``--hold``
  seconds have passed the FIFO is fed one line per task and they exit 0.
* ``--listeners`` processes subscribed to every event through nrm.client.
* ``--senders`` flood processes, tasks of one shared container, sending
  progress and phase_context messages through nrm.downstream with no rate
  limit until the gate tasks are done; each prints what it had accepted, so
  the daemon's downstream counters can be checked exactly.
* a probe process timing ``status`` and ``list`` round trips throughout,
  and a sampler reading the daemon's VmRSS, VmHWM and open fds.

The same probe on the idle daemon, before the load, is the baseline.  The
daemon starts with a soft RLIMIT_NOFILE of ``--nofile`` (the usual 1024),
as under a default service manager.  Prints one JSON object;
``tests/daemon/test_load.py`` runs the same scenario and asserts on it.

usage: benchmarks/load.py [--tasks 1000] [--listeners 10] [--senders 3] [--hold 5]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import multiprocessing
import os
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from nrm.client import AsyncClient, Client, NrmError  # noqa: E402
from nrm.manifest import parse  # noqa: E402
from nrm.tools.localnrmd import LocalNrmd  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MANIFEST = parse({"name": "load", "app": {"slice": {"cpus": 1, "mems": 1}}})
FLOOD_MANIFEST = parse({"name": "flood", "app": {"slice": {"cpus": 1, "mems": 1},
                                                 "monitoring": {"ratelimit": 0}}})
TASK_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C",
            # a flood sender's final messages may wait behind a full queue
            # for long; they must not be given up on, or counts are inexact
            "NRM_LINGER": "60000"}
SPAWN = multiprocessing.get_context("spawn")


# -- processes that the scenario runs -----------------------------------------

def flood_sender(stop_path: str) -> None:
    """A task in the flood container: every 8th message a phase_context,
    the others progress, as fast as the socket takes them; no rate limit."""
    from nrm.downstream import Client as Downstream
    nrm = Downstream("flood", ratelimit=0)
    calls = progress_ok = phase_ok = 0
    while True:
        for _ in range(1024):
            calls += 1
            if calls % 8 == 0:
                phase_ok += nrm.phase_context(0, 1000, 2000)
            else:
                progress_ok += nrm.progress(1)
        if os.path.exists(stop_path):
            break
    flushes = 0
    while nrm._sender.acc:          # leftover progress (no public view of it): send it
        if nrm.flush():
            flushes += 1
        else:
            time.sleep(0.001)
    nrm.close()                     # blocking exit message (NRM_LINGER)
    print(json.dumps({"calls": calls, "progress_ok": progress_ok + flushes,
                      "phase_ok": phase_ok, "progress_calls": calls - calls // 8,
                      "task": os.environ.get("NRM_TASK_ID")}), flush=True)


def listener(rundir: str, ready, stop, out) -> None:
    """Count every event; keep the task ids of task start/exit events."""
    import zmq
    c = Client(rundir)
    sock = c.subscribe(("",))
    sock.rcvhwm = 0
    counts: Dict[str, int] = collections.Counter()
    starts: List[str] = []
    exits: List[str] = []
    container_exits = 0
    progress_totals: Dict[str, int] = {}
    signalled = False
    deadline = None
    while deadline is None or time.monotonic() < deadline:
        if deadline is None and stop.is_set():
            deadline = time.monotonic() + 1.0   # what is in flight arrives by then
        if not sock.poll(100):
            continue
        while True:
            try:
                topic, body = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            topic = topic.decode()
            counts[topic] += 1
            if topic == "task":
                event = json.loads(body)
                (exits if event["event"] == "exit" else starts).append(event["task"])
            elif topic == "container" and b'"exit"' in body:
                container_exits += 1
            elif topic == "progress":
                event = json.loads(body)
                task = event["task"]
                progress_totals[task] = max(progress_totals.get(task, 0), event["total"])
        if not signalled:
            ready.set()
            signalled = True
    sock.close()
    c.close()
    out.put({"counts": dict(counts), "task_starts": starts, "task_exits": exits,
             "container_exits": container_exits, "progress_totals": progress_totals})


def probe(rundir: str, stop, out, count: int = 0, pause: float = 0.002) -> None:
    """Closed-loop status and list round trips: until ``stop`` is set, or
    ``count`` of them.  Unanswered requests are counted, not timed."""
    rtts: Dict[str, List[float]] = {"status": [], "list": []}
    failed = collections.Counter()
    largest_list = 0
    with Client(rundir, timeout=10.0) as c:
        i = 0
        while not (stop is not None and stop.is_set()) and not (count and i >= count):
            kind = "status" if i % 2 == 0 else "list"
            i += 1
            t0 = time.perf_counter()
            try:
                answer = c.status() if kind == "status" else c.list()
            except NrmError as exc:
                failed[f"{kind}:{exc.code}"] += 1
                continue
            rtts[kind].append(time.perf_counter() - t0)
            if kind == "list":
                largest_list = max(largest_list, len(answer))
            time.sleep(pause)
    out.put({"rtts": rtts, "failed": dict(failed), "largest_list": largest_list})


# -- the daemon's footprint ---------------------------------------------------

def proc_status(pid: int) -> Dict[str, int]:
    """VmRSS and VmHWM (kB) and the number of open fds of ``pid``."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "Threads"):
                out[key] = int(value.split()[0])
    out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return out


class Sampler(threading.Thread):
    """Samples the daemon every ``period`` seconds until stopped."""

    def __init__(self, pid: int, period: float = 0.05):
        super().__init__(daemon=True)
        self.pid, self.period = pid, period
        self.samples: List[dict] = []
        self.done = threading.Event()

    def run(self) -> None:
        t0 = time.monotonic()
        while not self.done.is_set():
            try:
                s = proc_status(self.pid)
            except OSError:
                break
            s["t"] = round(time.monotonic() - t0, 3)
            self.samples.append(s)
            self.done.wait(self.period)

    def stop(self) -> List[dict]:
        self.done.set()
        self.join()
        return self.samples


# -- the scenario ---------------------------------------------------------------

def start_daemon(nofile: int, *extra: str) -> LocalNrmd:
    """nrmd with a low soft fd limit, the way a service manager starts it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(nofile, hard), hard))
    try:
        return LocalNrmd("--hw", "emulated", "--sensor-period", "0.1", *extra).start()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def pct(values: List[float], p: float) -> Optional[float]:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))]


def rtt_summary(rtts: Dict[str, List[float]]) -> dict:
    out = {}
    for kind, values in rtts.items():
        out[kind] = {"n": len(values),
                     "p50_ms": _ms(pct(values, 50)), "p99_ms": _ms(pct(values, 99)),
                     "max_ms": _ms(max(values) if values else None)}
    return out


def _ms(seconds: Optional[float]) -> Optional[float]:
    return None if seconds is None else round(seconds * 1e3, 3)


async def _wait_drained(client: AsyncClient, quiet: float = 1.0,
                        timeout: float = 120.0) -> float:
    """Seconds until the daemon's downstream count stops moving."""
    t0 = time.monotonic()
    last, since = -1, t0
    while time.monotonic() - t0 < timeout:
        received = (await client.status())["downstream"]["downstream"]["received"]
        now = time.monotonic()
        if received != last:
            last, since = received, now
        elif now - since >= quiet:
            return round(since - t0, 3)
        await asyncio.sleep(0.05)
    raise RuntimeError("downstream still moving after the senders exited")


async def _drive(rundir: str, tasks: int, senders: int, hold: float, fifo: str,
                 keep_fifo: str, stop_path: str) -> dict:
    """Submit everything at once; release the gate once all tasks are alive."""
    started: List[str] = []
    flood_out: Dict[int, bytearray] = collections.defaultdict(bytearray)
    alive_peak = 0
    async with AsyncClient(rundir, timeout=60.0) as client:
        def on_flood_output(i):
            return lambda stream, data: flood_out[i].extend(data) if stream == "stdout" else None

        # The keeper holds the flood container open until the daemon has
        # drained every message (those read after a container ended are
        # refused as for an unknown container, which is right but not the
        # point here).
        keeper = asyncio.ensure_future(client.run(
            FLOOD_MANIFEST, ["/bin/sh", "-c", 'read line < "$0"', keep_fifo],
            container="flood", oversubscribe=True, env=TASK_ENV, cwd="/"))
        while not (await client.status())["containers"]:
            await asyncio.sleep(0.01)
        flood = [asyncio.ensure_future(client.run(
            FLOOD_MANIFEST, [sys.executable, os.path.abspath(__file__), "--flood-sender",
                             stop_path],
            container="flood", oversubscribe=True, env=TASK_ENV, cwd=REPO,
            on_output=on_flood_output(i))) for i in range(senders)]
        t0 = time.monotonic()
        gate = [asyncio.ensure_future(client.run(
            MANIFEST, ["/bin/sh", "-c", 'read line < "$0"', fifo], oversubscribe=True,
            env=TASK_ENV, cwd="/", on_started=lambda r: started.append(r.task)))
            for _ in range(tasks)]
        while len(started) < tasks:
            failed = [g for g in gate if g.done() and g.exception() is not None]
            if failed:
                raise failed[0].exception()
            await asyncio.sleep(0.01)
        launch_s = time.monotonic() - t0
        status = await client.status()
        alive_peak = status["tasks"]["tasks_started"] - status["tasks"]["tasks_finished"]
        await asyncio.sleep(hold)
        # Readers are blocked in open(), so a non-blocking open for writing
        # succeeds; it stays open until every task is done, so a reader that
        # opens late still finds its line, never an EOF.
        wfd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
        try:
            os.write(wfd, b"\n" * tasks)
            results = await asyncio.gather(*gate, return_exceptions=True)
        finally:
            os.close(wfd)
        all_done_s = time.monotonic() - t0
        with open(stop_path, "w"):
            pass
        flood_results = await asyncio.gather(*flood, return_exceptions=True)
        drained_s = await _wait_drained(client)
        wfd = os.open(keep_fifo, os.O_WRONLY | os.O_NONBLOCK)
        try:
            os.write(wfd, b"\n")
            keeper_result = await keeper
        finally:
            os.close(wfd)
    return {"keeper_status": keeper_result.status, "drain_after_senders_s": drained_s,
            "started": started, "results": results, "launch_s": launch_s,
            "all_done_s": all_done_s, "alive_peak": alive_peak,
            "flood_results": flood_results,
            "flood_reports": [bytes(flood_out[i]) for i in range(senders)]}


def run_scenario(tasks: int = 1000, listeners: int = 10, senders: int = 3,
                 hold: float = 5.0, idle_probes: int = 2000, nofile: int = 1024) -> dict:
    """Run the whole scenario once; returns raw results (see summarize)."""
    work = tempfile.mkdtemp(prefix="nrm-load-")
    fifo, stop_path = os.path.join(work, "gate"), os.path.join(work, "stop")
    keep_fifo = os.path.join(work, "keep")
    os.mkfifo(fifo, 0o600)
    os.mkfifo(keep_fifo, 0o600)
    d = start_daemon(nofile)
    raw: dict = {"daemon_pid": d.proc.pid, "tasks": tasks, "listeners": listeners,
                 "senders": senders, "hold_s": hold}
    procs = []
    try:
        raw["daemon_nofile"] = _nofile_of(d.proc.pid)
        q = SPAWN.Queue()
        p = SPAWN.Process(target=probe, args=(d.rundir, None, q, idle_probes))
        p.start()
        raw["idle"] = q.get(timeout=300)
        p.join()
        raw["idle_footprint"] = proc_status(d.proc.pid)

        stop_listeners, stop_probe = SPAWN.Event(), SPAWN.Event()
        lq, pq = SPAWN.Queue(), SPAWN.Queue()
        readies = []
        for _ in range(listeners):
            ready = SPAWN.Event()
            lp = SPAWN.Process(target=listener, args=(d.rundir, ready, stop_listeners, lq))
            lp.start()
            procs.append(lp)
            readies.append(ready)
        for ready in readies:       # each has seen an event: subscribed
            if not ready.wait(60):
                raise RuntimeError("a listener got no event in 60 s")
        sampler = Sampler(d.proc.pid)
        sampler.start()
        pp = SPAWN.Process(target=probe, args=(d.rundir, stop_probe, pq))
        pp.start()
        procs.append(pp)
        t0 = time.monotonic()
        raw.update(asyncio.run(
            _drive(d.rundir, tasks, senders, hold, fifo, keep_fifo, stop_path)))
        raw["load_s"] = time.monotonic() - t0
        stop_probe.set()
        raw["loaded"] = pq.get(timeout=120)
        raw["status"] = Client(d.rundir).status()
        raw["samples"] = sampler.stop()
        stop_listeners.set()
        raw["listeners_out"] = [lq.get(timeout=120) for _ in range(listeners)]
        for proc in procs:
            proc.join(30)
        raw["final_footprint"] = proc_status(d.proc.pid)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
        raw["daemon_rc"] = d.stop(30)
        raw["daemon_log"] = d.log()
        shutil.rmtree(d.rundir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    return raw


def _nofile_of(pid: int) -> List[int]:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return [int(soft), int(hard)]
    return []


def summarize(raw: dict) -> dict:
    """The JSON the benchmark prints: figures, not lists."""
    results = raw["results"]
    statuses = collections.Counter(
        r.status if not isinstance(r, BaseException) else type(r).__name__ for r in results)
    floods = [json.loads(b) for b in raw["flood_reports"] if b.strip()]
    down = raw["status"]["downstream"]
    accepted = sum(f["progress_ok"] + f["phase_ok"] + 2 for f in floods)   # + start, exit
    samples = raw["samples"]
    rss = [s["VmRSS"] for s in samples]
    listeners = raw["listeners_out"]
    gate_ids = set(raw["started"])
    exit_events = [sum(1 for t in lo["task_exits"] if t in gate_ids) for lo in listeners]
    return {
        "benchmark": "load",
        "tasks": raw["tasks"], "listeners": raw["listeners"], "senders": raw["senders"],
        "hold_s": raw["hold_s"],
        "daemon_nofile_soft_hard": raw["daemon_nofile"],
        "tasks_started": len(raw["started"]),
        "tasks_started_unique": len(gate_ids),
        "tasks_alive_together_max": raw["alive_peak"],
        "task_statuses": {str(k): v for k, v in statuses.items()},
        "launch_all_s": round(raw["launch_s"], 3),
        "load_phase_s": round(raw["load_s"], 3),
        "request_rtt_idle": rtt_summary(raw["idle"]["rtts"]),
        "request_rtt_loaded": rtt_summary(raw["loaded"]["rtts"]),
        "requests_unanswered_loaded": raw["loaded"]["failed"],
        "largest_list_containers": raw["loaded"]["largest_list"],
        "rss_kb": {"idle": raw["idle_footprint"]["VmRSS"],
                   "median_loaded": int(statistics.median(rss)) if rss else None,
                   "max_sampled": max(rss) if rss else None,
                   "peak_vmhwm": max([s["VmHWM"] for s in samples]
                                     + [raw["final_footprint"]["VmHWM"]]),
                   "after": raw["final_footprint"]["VmRSS"]},
        "fds": {"idle": raw["idle_footprint"]["fds"],
                "max": max(s["fds"] for s in samples) if samples else None,
                "after": raw["final_footprint"]["fds"]},
        "listener_events_each": [sum(lo["counts"].values()) for lo in listeners],
        "listener_events_by_topic_min": _min_topics(listeners),
        "listener_gate_exit_events_each": exit_events,
        "downstream": {
            "sender_accepted": accepted,
            "received": down["downstream"]["received"],
            "decoded": down["downstream"]["decoded"],
            "dropped": {k: v for k, v in down["downstream"].items()
                        if k.startswith("dropped") or k == "callback_errors"},
            "rejected": down["rejected"],
            "events": down.get("events"),
            "rate_msgs_per_s": round(down["downstream"]["decoded"] / raw["all_done_s"]),
        },
        "flood_keeper_status": raw["keeper_status"],
        "downstream_drain_after_senders_s": raw["drain_after_senders_s"],
        "daemon_rc": raw["daemon_rc"],
        "machine": {"cpus": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2)},
    }


def _min_topics(listeners: List[dict]) -> Dict[str, int]:
    topics = set().union(*(lo["counts"] for lo in listeners)) if listeners else set()
    return {t: min(lo["counts"].get(t, 0) for lo in listeners) for t in sorted(topics)}


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--flood-sender":
        flood_sender(sys.argv[2])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=1000)
    ap.add_argument("--listeners", type=int, default=10)
    ap.add_argument("--senders", type=int, default=3)
    ap.add_argument("--hold", type=float, default=5.0, help="seconds all tasks stay alive")
    ap.add_argument("--idle-probes", type=int, default=2000)
    ap.add_argument("--nofile", type=int, default=1024, help="daemon's soft fd limit at start")
    args = ap.parse_args()
    raw = run_scenario(args.tasks, args.listeners, args.senders, args.hold, args.idle_probes,
                       args.nofile)
    print(json.dumps(summarize(raw), indent=2))


if __name__ == "__main__":
    main()
