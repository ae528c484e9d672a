"""nrm pilot's Python APIs: submit -> the task's process started, on an idle pilot.

The task is a tiny C program (compiled here) that writes its
CLOCK_MONOTONIC (what Python's ``time.monotonic`` reads) to a file as soon
as it runs; the latency is that stamp minus ``time.monotonic()`` just
before the submit call. Each submit waits for its task to end before the
next (an idle pilot), and the variants take turns in rounds on one private
nrmd, so a change of load hits them alike:

* ``qcg``: ``nrm.pilot.qcg.LocalManager`` (the pilot a subprocess, over its
  Unix socket; journal, fdatasync before the acknowledgement, the task
  launched with a task key, or under ``nrm-pilot-fence`` where nrmd's keys
  are not exact), ``submit`` then ``wait4``;
* ``native``: the asyncio API the CLI sits on (``Runner.handle`` in this
  process, no journal, no wrapper), then ``wait_done``;
* ``native_journaled``: the same with the journal and the attempts (task
  keys or the fence, as the CLI chooses: ``attempts_keyed`` in the output);
* ``client`` (the baseline): ``nrm.client.AsyncClient.run`` of the same
  command and manifest straight on the same nrmd.

For the in-process variants nrmd's own start time (``started_at``, its
monotonic clock) is also given: the launch without the program's exec.
p50 and p99 in milliseconds, plus the QCG submit round trip (the call's
return). ``PILOT_API_N`` submits per variant (default 240), in
``PILOT_API_ROUNDS`` rounds (4). Prints JSON.
"""

from __future__ import annotations

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

from nrm.client import AsyncClient  # noqa: E402
from nrm.manifest import Manifest, Slice  # noqa: E402
from nrm.pilot.attempts import Attempts  # noqa: E402
from nrm.pilot.jobfile import parse_request  # noqa: E402
from nrm.pilot.journal import Journal  # noqa: E402
from nrm.pilot.qcg import Jobs, LocalManager  # noqa: E402
from nrm.pilot.runner import Runner  # noqa: E402
from nrm.pilot.scheduler import Pool  # noqa: E402
from nrm.tools.localnrmd import LocalNrmd  # noqa: E402

N = int(os.environ.get("PILOT_API_N", "240"))
ROUNDS = int(os.environ.get("PILOT_API_ROUNDS", "4"))

STAMP_C = r"""
#include <stdio.h>
#include <time.h>
int main(int argc, char **argv) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    FILE *f = fopen(argv[1], "w");
    if (!f) return 1;
    fprintf(f, "%ld.%09ld\n", (long)ts.tv_sec, ts.tv_nsec);
    return fclose(f) != 0;
}
"""


def build_stamp(directory: str) -> str:
    src = os.path.join(directory, "stamp.c")
    exe = os.path.join(directory, "stamp")
    with open(src, "w") as f:
        f.write(STAMP_C)
    cc = os.environ.get("CC", "cc")
    for flags in (["-O2", "-static"], ["-O2"]):      # static: no dynamic loader at exec
        if subprocess.run([cc, *flags, "-o", exe, src], capture_output=True).returncode == 0:
            return exe
    sys.exit(f"cannot compile {src} with {cc}")


def read_stamp(path: str) -> float:
    with open(path) as f:
        value = float(f.read())
    os.unlink(path)
    return value


def loadavg() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


MANIFEST = Manifest(name="nrm-pilot", slice=Slice(cpus=1, mems=1))


class Variants:
    def __init__(self, nrmd: LocalNrmd, stamp: str, work: str):
        self.stamp = stamp
        self.work = work
        self.count = 0
        self.lat: dict = {}
        self.nrmd_lat: dict = {}
        self.submit_rtt: list = []
        self.keyed = None
        saved = dict(os.environ)
        os.environ.update(nrmd.env)
        try:
            self.qcg = LocalManager(["--nodes", "2", "--wd", os.path.join(work, "qcg"),
                                     "--progress", "none"])
        finally:
            os.environ.clear()
            os.environ.update(saved)
        self.qcg.resources()
        self.rundir = nrmd.rundir

    def _out(self) -> str:
        self.count += 1
        return os.path.join(self.work, f"t{self.count}")

    def _add(self, key: str, t0: float, path: str, started_at=None) -> None:
        self.lat.setdefault(key, []).append(read_stamp(path) - t0)
        if started_at is not None:
            self.nrmd_lat.setdefault(key, []).append(started_at - t0)

    # ------------------------------------------------------------- qcg ---
    def qcg_round(self, n: int) -> None:
        for _ in range(n):
            path = self._out()
            name = f"q{self.count}"
            jobs = Jobs().add(name=name, exec=self.stamp, args=[path])
            t0 = time.monotonic()
            self.qcg.submit(jobs)
            self.submit_rtt.append(time.monotonic() - t0)
            if self.qcg.wait4(name)[name] != "SUCCEED":
                sys.exit(f"qcg: {name} did not succeed")
            self._add("qcg", t0, path)

    # ---------------------------------------------------------- native ---
    async def native_round(self, n: int, journaled: bool) -> None:
        key = "native_journaled" if journaled else "native"
        wd = os.path.join(self.work, key)
        os.makedirs(wd, exist_ok=True)
        journal = attempts = None
        starts: dict = {}
        async with AsyncClient(self.rundir) as client:
            if journaled:
                aux = tempfile.mkdtemp(prefix="aux-", dir=wd)
                journal = Journal(os.path.join(aux, "journal.jsonl"))
                attempts = Attempts(aux, os.path.basename(aux))
                self.keyed = attempts.use_keys(await client.status())
            runner = Runner(Pool([("n0", 2)]), wd, client, journal=journal, attempts=attempts,
                            on_final=lambda item: None)
            sink = runner.manager.record

            def record(r):                    # the end record carries nrmd's start
                if r.get("t") == "e" and "st" in r:
                    starts[r["n"]] = r["st"]
                sink(r)
            runner.manager.record = record
            for i in range(n):
                path = self._out()
                name = f"n{self.count}"
                raw = {"request": "submit", "jobs": [{"name": name, "execution": {
                    "exec": self.stamp, "args": [path]}}]}
                t0 = time.monotonic()
                wall0 = time.time()
                runner.handle(parse_request(i + 1, raw, wd))
                await runner.wait_done()
                if runner.manager.jobs[name].state != "SUCCEED":
                    sys.exit(f"{key}: {name}: {runner.manager.jobs[name].tasks[0].message}")
                real = starts.get(runner.manager.jobs[name].tasks[0].seq)   # wall clock
                self._add(key, t0, path, None if real is None else real - wall0 + t0)
            if runner._inflight:
                await asyncio.gather(*list(runner._inflight), return_exceptions=True)
            if journaled:
                await runner.forget_keys()
        if journal is not None:
            journal.close()

    # ---------------------------------------------------------- client ---
    async def client_round(self, n: int) -> None:
        async with AsyncClient(self.rundir) as client:
            for _ in range(n):
                path = self._out()
                t0 = time.monotonic()
                result = await client.run(MANIFEST, [self.stamp, path], output=False,
                                          wait=True)
                if result.status != 0:
                    sys.exit(f"client: exit {result.status}")
                self._add("client", t0, path, result.started_at)

    def close(self) -> None:
        self.qcg.finish()


def quantiles(values: list) -> dict:
    ms = sorted(1000 * v for v in values)
    return {"p50_ms": round(statistics.median(ms), 3),
            "p99_ms": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 3),
            "n": len(ms)}


def main() -> None:
    work = tempfile.mkdtemp(prefix="pilot-api-bench-")
    stamp = build_stamp(work)
    per_round = max(1, N // ROUNDS)
    out: dict = {"submits_per_variant": per_round * ROUNDS, "rounds": ROUNDS,
                 "load_average_before": loadavg()}
    with LocalNrmd(log_level="warning") as d:
        v = Variants(d, stamp, work)
        try:
            for r in range(ROUNDS):
                # the order rotates, so no variant always follows the same one
                steps = [lambda: v.qcg_round(per_round),
                         lambda: asyncio.run(v.native_round(per_round, False)),
                         lambda: asyncio.run(v.native_round(per_round, True)),
                         lambda: asyncio.run(v.client_round(per_round))]
                for step in steps[r % 4:] + steps[:r % 4]:
                    step()
        finally:
            v.close()
    out["submit_to_task_started"] = {k: quantiles(x) for k, x in v.lat.items()}
    out["submit_to_nrmd_started"] = {k: quantiles(x) for k, x in v.nrmd_lat.items()}
    out["qcg_submit_round_trip"] = quantiles(v.submit_rtt)
    out["attempts_keyed"] = v.keyed
    base = out["submit_to_task_started"]["client"]["p50_ms"]
    out["p50_ratio_vs_client"] = {k: round(q["p50_ms"] / base, 2)
                                  for k, q in out["submit_to_task_started"].items()}
    out["load_average_after"] = loadavg()
    shutil.rmtree(work, ignore_errors=True)
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
