"""Cost of one sensor sample and tick lateness at a 5 ms period.

Builds a fake tree the size of a large node (256 cpus, 4 packages, powercap
with DRAM zones, coretemp hwmon with per-core sensors), then measures in
the same run:

* baselines: one os.pread of an open energy_uj file, one open/read/close of
  it, and the lateness of a bare thread waking on absolute 5 ms deadlines;
* platform.sample() on the linux backend (and the emulated one for scale);
* SensorManager at a 5 ms period for a few seconds: per-tick lateness
  against the ideal grid, plus the manager's own stats.

Prints one JSON object. Usage: python benchmarks/sensor_tick.py [--seconds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nrm.hw import open_platform  # noqa: E402
from nrm.power.sensors import SensorManager  # noqa: E402
from tests.fakehw import FakeNode  # noqa: E402


def summary(values_s):
    v = sorted(values_s)
    return {"n": len(v), "median_us": round(statistics.median(v) * 1e6, 2),
            "p99_us": round(v[min(len(v) - 1, int(len(v) * 0.99))] * 1e6, 2),
            "max_us": round(v[-1] * 1e6, 2)}


def time_calls(fn, n):
    out = []
    clock = time.perf_counter
    for _ in range(n):
        t = clock()
        fn()
        out.append(clock() - t)
    return out


def bare_deadline_lateness(period, seconds):
    stop = threading.Event()
    late = []

    def run():
        deadline = time.monotonic()
        end = deadline + seconds
        while deadline < end:
            d = deadline - time.monotonic()
            if d > 0:
                stop.wait(d)
            late.append(max(0.0, time.monotonic() - deadline))
            deadline += period
    t = threading.Thread(target=run)
    t.start()
    t.join()
    return late


def manager_lateness(platform, period, seconds):
    """The manager's own per-tick lateness (against its absolute deadlines)."""
    sm = SensorManager(platform, period_s=period)
    sm.start()
    time.sleep(seconds)
    sm.stop()
    st = sm.stats()
    us = {k: round(v * 1e6, 2) for k, v in st.items() if k.endswith("_s") and k != "period_s"}
    return {"median_us": us["lateness_p50_s"], "p99_us": us["lateness_p99_s"],
            "max_us": us["max_lateness_s"], "mean_us": us["mean_lateness_s"],
            "ticks": st["ticks"], "missed_ticks": st["missed_ticks"],
            "late_ticks_over_half_period": st["late_ticks"], "errors": st["errors"],
            "tick_duration_median_us": us["duration_p50_s"],
            "tick_duration_p99_us": us["duration_p99_s"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--samples", type=int, default=5000)
    args = ap.parse_args()
    period = 0.005
    root = tempfile.mkdtemp(prefix="nrm-bench-")
    try:
        node = FakeNode(root, packages=4, cores=64)
        energy = node.path(f"{node.zone(0)}/energy_uj")
        fd = os.open(energy, os.O_RDONLY)

        def open_read_close():
            with open(energy, "rb") as f:
                f.read()
        pread = summary(time_calls(lambda: os.pread(fd, 64, 0), args.samples * 4))
        orc = summary(time_calls(open_read_close, args.samples))
        os.close(fd)
        bare = summary(bare_deadline_lateness(period, args.seconds))
        with open_platform("linux", root=root) as lp:
            lp.sample()
            linux_sample = summary(time_calls(lp.sample, args.samples))
            tick = manager_lateness(lp, period, args.seconds)
        with open_platform("emulated", root=root) as ep:
            ep.sample()
            emu_sample = summary(time_calls(ep.sample, args.samples))
        result = {
            "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
            "fake_node": {"cpus": node.ncpus, "packages": node.packages,
                          "files_read_per_sample": 12},
            "baseline": {"pread_energy_uj": pread, "open_read_close_energy_uj": orc,
                         "bare_thread_lateness_5ms": bare},
            "linux_sample": linux_sample,
            "emulated_sample": emu_sample,
            "sensor_manager_5ms": tick,
            "ratios": {
                "linux_sample_vs_pread_median": round(
                    linux_sample["median_us"] / pread["median_us"], 1),
                "tick_lateness_vs_bare_median": round(
                    tick["median_us"] / max(bare["median_us"], 1e-3), 2),
                "sample_budget_used_at_5ms_median": round(
                    linux_sample["median_us"] / (period * 1e6), 4),
            },
            "note": "percentiles of the manager cover its last 1024 ticks",
        }
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
