"""An emulated node: modelled sensors, real actuation through CPU bandwidth.

Machines without RAPL or MSR access (VMs, laptops, CI) still need the
policies to act on something real, or nothing about them can be tested. So
a duty-cycle level L and a frequency f of cpu N become a cgroup v1 CPU
bandwidth limit on the threads of nrm containers that last ran on cpu N:

    speed(N) = (L / 16) * (f / fmax) * k(package)
    quota    = max(1000 us, period * speed)   (unlimited when speed == 1)

in ``<cpu mount>/nrm.emu/cpuN``; threads on unthrottled cpus go back to
the cpu cgroup they came from. ``k`` is the emulated RAPL limit (see
below). The default period is 16 ms: the kernel refuses quotas under
1 ms, and 16 ms makes level 1 exactly representable while a 10 ms phase
still feels the limit.

Thread placement runs on a small background thread while any cpu is
slowed (and once more after the last one is released), immediately after
a control write that slows a cpu or releases one (a new quota on a cpu
already slowed moves nothing), then every 20 ms, backing off to every
200 ms while passes move nothing (``placement_wait``). It is not run from
``sample()`` so that the sensor tick costs the same whatever the number of
threads. The task provider is called from that thread and must return a
snapshot.

Energy model per package p (documented with its defaults in
docs/hardware.md), recomputed every ``model_period_s`` from the cpu time of
the containers' own threads (``/proc/PID/task/TID/schedstat`` of the task
provider's processes, charged to the cpu each last ran on), or from
/proc/stat per-cpu busy time when no task provider is set:

    P_p    = idle_w + sum over cpus of p: dynamic_w * u_eff * V(f) ** 2
    V(f)   = max(f / fmax, VOLTAGE_FLOOR)
    P_dram = dram_idle_w + dram_fraction * (P_p - idle_w)
    dT/dt  = (ambient_c + R * P_p - T) / thermal_tau_s,
             R = (full_load_c - ambient_c) / max power of p

When actuation works, the measured utilisation already shows the
throttling, so u_eff = util. When it does not (non-root, no cpu
controller), the throttle is applied in the model, u_eff = util * speed,
so closed loops still see a plant that responds.

The emulated ``package.power_limit`` behaves like firmware RAPL: at each
model step k(p) moves geometrically toward the value that brings modelled
power to the limit (k <- k * sqrt((limit - idle) / (P - idle)), within
[1/16, 1]), and the new speeds are applied to the cgroups.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import threading
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple

from nrm.hw.registry import (ControlInfo, HardwareError, Platform, Sample, SignalInfo,
                             node_power, package_entry)
from nrm.hw.waitcounters import ThreadLedger, read as read_wait_counters
from nrm.hw.topology import read_topology
from nrm.log import RateLimitedLog

log = logging.getLogger(__name__)
rl_log = RateLimitedLog(log, 30.0)

DEFAULTS: Dict[str, Any] = {
    "idle_w": 20.0,
    "dynamic_w": 10.0,
    "dram_idle_w": 2.0,
    "dram_fraction": 0.1,
    "ambient_c": 35.0,
    "full_load_c": 80.0,
    "thermal_tau_s": 5.0,
    "core_delta_c": 5.0,
    "frequencies_hz": [float((1000 + 200 * k) * 1_000_000) for k in range(8)],
    "period_us": 16000,
    "model_period_s": 0.1,
    "placement_period_s": 0.02,
    "placement_idle_period_s": 0.2,
    "cgroup_mount": None,
    "cgroup_name": "nrm.emu",
}
MIN_QUOTA_US = 1000
K_MIN = 1.0 / 16

VOLTAGE_FLOOR = 0.5
"""Below this fraction of fmax the voltage stops falling (1.2 GHz of the default 2.4 GHz).

Dynamic power goes as f * V^2, and V ~ f only down to the lowest voltage
the circuits work at: real voltage/frequency tables are flat over roughly
the bottom third to half of the frequency range. Below the floor, power
falls only linearly with f, so slowing down saves no dynamic energy per
unit of work (as with duty cycling) while static power keeps being paid;
without the floor the model would overstate DVFS's savings at the lowest
frequencies.
"""


def placement_wait(last: float, moved: bool, fast: float, idle: float) -> float:
    """The wait before the next placement pass: ``fast`` after a pass that
    moved a thread, else twice the last wait, up to ``idle``.

    Why back off: the pass runs on the node it emulates, and slice-bound
    ranks never migrate, so passes at the fast rate only take cpu from
    the ranks (measured on 2 cpus: +1-2 % run time for a program with a
    slowed rank); a thread that moves is followed at the fast rate again,
    and a control write that slows or releases a cpu places at once.
    """
    if moved or last <= 0:
        return fast
    return min(max(fast, idle), last * 2)


def cpu_speed(level: float, levels: int, hz: float, fmax: float, k: float = 1.0) -> float:
    """Fraction of full speed a cpu runs at: duty cycle x frequency x power-limit factor."""
    return (level / levels) * (hz / fmax) * k


def voltage_ratio(ratio: float, floor: float = VOLTAGE_FLOOR) -> float:
    """The voltage at ``f / fmax = ratio``, relative to fmax's: ``max(ratio, floor)``."""
    return max(ratio, floor)


def dynamic_power(dynamic_w: float, cpus: Iterable[Tuple[float, float]]) -> float:
    """Dynamic package power of ``(u_eff, f / fmax)`` pairs: ``dynamic_w * u * V(f)^2``.

    ``V(f) = voltage_ratio(f / fmax)``: proportional to f down to the
    voltage floor, flat below it. The one place the model's power law
    lives, so that the daemon's emulated node, the policies' cost
    (policy/crossrank.py) and the policy benchmark
    (benchmarks/power_oracle.py) cannot drift apart. ``u_eff`` is the busy
    fraction the cpu was charged for; a cpu that busy-polls under a
    bandwidth limit is charged its speed.
    """
    return sum(dynamic_w * u * voltage_ratio(ratio) ** 2 for u, ratio in cpus)


def inwait_rate(level: int, levels: int, hz: float, fmax: float, cpu_hz: float) -> float:
    """Cpu ns to bill per wall ns of a wait polled at ``level`` and ``hz``
    on a cpu billed at ``cpu_hz``.

    A cpu's busy time is billed at ``V(cpu_hz)^2`` (``dynamic_power``); a
    core polling at (level, hz) draws ``speed x V(hz)^2`` of a busy core at
    fmax, so this is that power expressed in busy time at the cpu's
    billing. The in-wait frequency never raises the cpu's: ``min(hz,
    cpu_hz)``.
    """
    hz = min(hz, cpu_hz)
    return (cpu_speed(level, levels, hz, fmax)
            * (voltage_ratio(hz / fmax) / voltage_ratio(cpu_hz / fmax)) ** 2)


def find_cpu_cgroup_mount(root: str) -> Optional[str]:
    """The cgroup v1 hierarchy that carries the ``cpu`` controller, if any."""
    try:
        with open(os.path.join(root, "proc/self/mountinfo")) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, rfields = left.split(), right.split()
        if len(fields) < 5 or len(rfields) < 3 or rfields[0] != "cgroup":
            continue
        if "cpu" in rfields[2].split(","):
            return fields[4]
    return None


def read_proc_stat(path: str) -> Dict[int, Tuple[int, int]]:
    """Per-cpu (busy, total) USER_HZ ticks."""
    out: Dict[int, Tuple[int, int]] = {}
    with open(path) as f:
        for line in f:
            if not line.startswith("cpu") or line.startswith("cpu "):
                continue
            parts = line.split()
            name = parts[0][3:]
            if not name.isdigit():
                continue
            vals = [int(v) for v in parts[1:9]]
            total = sum(vals)
            idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
            out[int(name)] = (total - idle, total)
    return out


def _read_proc(path: str) -> str:
    """A small /proc file's text, without a Python file object: 10 us
    against 26 for ``open().read()`` here, per thread at every model step."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 4096).decode("ascii", "replace")
    finally:
        os.close(fd)


def last_cpu(stat_text: str) -> Optional[int]:
    """Field 39 of /proc/TID/stat; the comm field may contain spaces and ')'."""
    rest = stat_text[stat_text.rfind(")") + 2:].split()
    try:
        return int(rest[36])
    except (IndexError, ValueError):
        return None


class EmulatedPlatform(Platform):
    """A node without RAPL or MSR access, emulated: the controls act through
    cgroup CPU bandwidth on the tasks' threads, and energy comes from the
    documented model (docs/hardware.md)."""

    backend_name = "emulated"
    emulated = True

    def __init__(self, root: str = "/", journal=None, options: Optional[Dict[str, Any]] = None):
        try:
            topology = read_topology(root)
        except OSError as e:
            raise HardwareError(f"cannot read the cpu topology under {root}: "
                                f"{e.strerror or e}") from None
        super().__init__(topology, journal)
        unknown = set(options or {}) - set(DEFAULTS)
        if unknown:
            raise HardwareError(f"unknown emulated option(s): {', '.join(sorted(unknown))}")
        self.options = dict(DEFAULTS)
        self.options.update(options or {})
        o = self.options
        self.root = root
        self.duty_cycle_levels = 16
        self._freqs = sorted(float(f) for f in o["frequencies_hz"])
        if not self._freqs or self._freqs[0] <= 0:
            raise HardwareError("emulated frequencies_hz must be a non-empty list of positive Hz")
        self._fmax = self._freqs[-1]
        self._period_us = int(o["period_us"])
        self._sense_lock = threading.Lock()
        self._bw_lock = threading.RLock()
        cpus = [c.id for c in topology.cpus]
        self._pkg_of = {c.id: c.package for c in topology.cpus}
        self._level: Dict[int, int] = {c: 16 for c in cpus}
        self._freq: Dict[int, float] = {c: self._fmax for c in cpus}
        pkgs = topology.packages
        self._max_w = {p: o["idle_w"] + o["dynamic_w"] * len(topology.cpus_of_package(p))
                       for p in pkgs}
        self._limit = dict(self._max_w)
        self._k = {p: 1.0 for p in pkgs}
        self._first_cpu: Dict[int, List[int]] = {}
        for c in topology.cpus:
            key = min(x.id for x in topology.cpus if x.package == c.package and x.core == c.core)
            self._first_cpu.setdefault(key, []).append(c.id)
        # model state
        now = time.monotonic()
        self._t_last = now
        self._t_model = -math.inf
        self._stat_prev: Optional[Dict[int, Tuple[int, int]]] = None
        self._run_prev: Dict[int, int] = {}
        self._cpu_prev: Dict[int, Optional[int]] = {}
        self._t_billed = 0.0
        self._util = {c: 0.0 for c in cpus}
        self._power = {p: float(o["idle_w"]) for p in pkgs}
        self._dram_power = {p: float(o["dram_idle_w"]) for p in pkgs}
        self._energy = {p: 0.0 for p in pkgs}
        self._dram_energy = {p: 0.0 for p in pkgs}
        self._temp = {p: self._steady_temp(p, self._power[p]) for p in pkgs}
        self._prev: Dict[int, Tuple[float, float, float]] = {}
        self._stat_path = os.path.join(root, "proc/stat")
        if not os.path.exists(self._stat_path):
            self._reasons.append(f"no {self._stat_path}: utilisation modelled as 0")
        # actuation state
        self._provider: Optional[Callable[[], Iterable[int]]] = None
        self._wait_counters: Optional[
            Callable[[], Iterable[Tuple[str, Iterable[int], int]]]] = None
        self._ledger = ThreadLedger()
        self._wait_discount_ns = 0
        self._quota: Dict[int, int] = {}
        self._slowed: Set[int] = set()
        self._groups: Set[int] = set()
        self._placed: Dict[int, int] = {}
        self._origin: Dict[int, str] = {}
        self._release_pending = False
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._mount: Optional[str] = None
        self._base: Optional[str] = None
        self._effective = False
        self._setup_cgroups()
        self._build_tables()

    # ------------------------------------------------------------------ setup

    def _steady_temp(self, pkg: int, power: float) -> float:
        o = self.options
        r = (o["full_load_c"] - o["ambient_c"]) / max(self._max_w[pkg], 1e-9)
        return o["ambient_c"] + r * power

    def _setup_cgroups(self) -> None:
        mount = self.options["cgroup_mount"] or find_cpu_cgroup_mount(self.root)
        if not mount:
            self._reasons.append("no cgroup v1 hierarchy with the cpu controller is mounted: "
                                 "controls are modelled, not enforced")
            return
        if not os.path.exists(os.path.join(mount, "cpu.cfs_quota_us")):
            self._reasons.append(f"{mount} has no cpu.cfs_quota_us (kernel without CFS "
                                 f"bandwidth control): controls are modelled, not enforced")
            return
        base = os.path.join(mount, self.options["cgroup_name"])
        self._mount = mount
        self._base = base
        if os.path.isdir(base):
            self._cleanup_groups(stale=True)
        try:
            os.makedirs(base, exist_ok=True)
        except OSError as e:
            self._reasons.append(f"cannot create {base}: {e.strerror or e} (needs root): "
                                 f"controls are modelled, not enforced")
            return
        self._effective = True
        self._thread = threading.Thread(target=self._placement_loop, name="nrm-emu-placement",
                                        daemon=True)
        self._thread.start()

    def _build_tables(self) -> None:
        S, C = SignalInfo, ControlInfo
        pkgs = tuple(self.topology.packages)
        cpus = tuple(c.id for c in self.topology.cpus)
        how = "cgroup CPU bandwidth" if self._effective else "model only"
        sig = [
            S("package.energy", "package", "J", "sum", "emulated package energy (model)", pkgs),
            S("dram.energy", "package", "J", "sum", "emulated DRAM energy (model)", pkgs),
            S("package.temperature", "package", "C", "max", "emulated first-order thermal "
              "model", pkgs),
            S("core.temperature", "core", "C", "max", "emulated; index = first logical cpu "
              "of the core", tuple(sorted(self._first_cpu))),
            S("cpu.duty_cycle", "cpu", "level", "average", "emulated duty-cycle level", cpus),
            S("cpu.frequency", "cpu", "Hz", "average", "emulated frequency", cpus),
            S("package.power_limit", "package", "W", "sum", "emulated RAPL limit", pkgs),
        ]
        ctl = [
            C("cpu.duty_cycle", "cpu", "level", "average",
              f"emulated clock modulation 1..16 via {how}", cpus, 1.0, 16.0),
            C("cpu.frequency", "cpu", "Hz", "average",
              f"emulated DVFS via {how}; rounded up to an available frequency", cpus,
              self._freqs[0], self._fmax),
            C("package.power_limit", "package", "W", "sum",
              f"emulated RAPL limit, caps the speed of the package's cpus via {how}", pkgs,
              float(self.options["idle_w"]), max(self._max_w.values())),
        ]
        self._signals = {s.name: s for s in sig}
        self._controls = {c.name: c for c in ctl}

    # ------------------------------------------------------------------ model

    def _advance(self, now: float) -> None:
        """Integrate energy and temperature up to ``now``; caller holds _sense_lock."""
        dt = now - self._t_last
        if dt > 0:
            o = self.options
            a = 1.0 - math.exp(-dt / o["thermal_tau_s"])
            for p in self._energy:
                self._energy[p] += self._power[p] * dt
                self._dram_energy[p] += self._dram_power[p] * dt
                self._temp[p] += (self._steady_temp(p, self._power[p]) - self._temp[p]) * a
            self._t_last = now
        if now - self._t_model >= self.options["model_period_s"]:
            self._t_model = now
            self._update_model()

    def _update_model(self) -> None:
        if self._provider is not None:
            self._bill_tasks()
        else:
            self._bill_cpus()
        self._update_power()

    def _bill_cpus(self) -> None:
        """Whole-cpu utilisation from /proc/stat: without a task provider there is
        nothing else to go by (fake trees, a platform used outside nrmd)."""
        try:
            stat = read_proc_stat(self._stat_path)
        except (OSError, ValueError):
            stat = None
        if stat is not None and self._stat_prev is not None:
            for cpu in self._util:
                cur, prev = stat.get(cpu), self._stat_prev.get(cpu)
                if cur and prev and cur[1] > prev[1]:
                    self._util[cpu] = min(1.0, max(0.0, (cur[0] - prev[0]) / (cur[1] - prev[1])))
        self._stat_prev = stat

    def _bill_tasks(self) -> None:
        """Utilisation from the cpu time of the containers' own threads only.

        Each thread's run time since the last step (``/proc/PID/task/TID/
        schedstat``, nanoseconds) is charged to the cpu it last ran on. Other
        load on the node is not billed, so a cpu hog beside a container
        neither raises its energy nor earns a DVFS discount on the hog's
        unslowed work. A thread seen for the first time only sets its
        baseline (its first model period, 0.1 s, is not billed).

        In-wait throttling: the part of a thread's run time its rank
        reported as spent throttled inside MPI waits is billed at the
        throttled setting's power (nrm.hw.waitcounters, ``inwait_rate``).
        """
        now = time.monotonic()
        try:
            pids = list(self._provider())
        except Exception as e:  # the provider belongs to the daemon: never die of it
            rl_log.warning("task provider failed: %r", e)
            return
        counter_files = self._wait_counter_files()
        busy = {cpu: 0 for cpu in self._util}
        seen: Dict[int, int] = {}
        cpus_seen: Dict[int, Optional[int]] = {}
        for pid in pids:
            taskdir = os.path.join(self.root, "proc", str(pid), "task")
            try:
                tids = [t for t in os.listdir(taskdir) if t.isdigit()]
            except OSError:
                continue
            path, level, wait_hz = counter_files.get(pid, (None, 16, None))
            counters = read_wait_counters(path) if path else None
            for tid in tids:
                prev = self._run_prev.get(int(tid))
                try:
                    run_ns = int(_read_proc(os.path.join(taskdir, tid, "schedstat")).split()[0])
                    ran = run_ns - prev if prev is not None and run_ns > prev else 0
                    # a thread that did not run is billed nothing wherever it
                    # sits: most of a rank's threads (its MPI and zmq helpers)
                    # sleep, and the stat read is half of a step's cost
                    cpu = (self._cpu_prev.get(int(tid)) if ran == 0 and prev is not None
                           else last_cpu(_read_proc(os.path.join(taskdir, tid, "stat"))))
                except (OSError, ValueError, IndexError):
                    continue
                seen[int(tid)] = run_ns
                cpus_seen[int(tid)] = cpu
                if counters is not None:
                    rate = None
                    if wait_hz is not None and cpu in self._freq:
                        rate = inwait_rate(level, 16, wait_hz, self._fmax, self._freq[cpu])
                    off = self._ledger.discount(int(tid), counters.get(int(tid)), ran, level,
                                                rate=rate)
                    ran -= off
                    self._wait_discount_ns += off
                if cpu in busy:
                    busy[cpu] += ran
        self._ledger.forget(seen)
        dt = now - self._t_billed
        if self._t_billed > 0 and dt > 0:
            for cpu in self._util:
                self._util[cpu] = min(1.0, busy[cpu] / (dt * 1e9))
        self._t_billed = now
        self._run_prev = seen
        self._cpu_prev = cpus_seen

    def _wait_counter_files(self) -> Dict[int, Tuple[str, int, Optional[float]]]:
        """pid -> its rank's counter file, its container's throttle level
        and in-wait frequency (None: unchanged; ``inwait.LOWEST`` resolves
        to this node's lowest), for the containers that throttle in waits."""
        fn = self._wait_counters
        if fn is None:
            return {}
        out: Dict[int, Tuple[str, int, Optional[float]]] = {}
        try:
            for entry in fn():
                directory, pids, level = entry[:3]
                frequency = entry[3] if len(entry) > 3 else None
                hz = None
                if frequency is not None:
                    hz = (self._freqs[0] if frequency == "lowest"
                          else min(max(float(frequency), self._freqs[0]), self._fmax))
                for pid in pids:
                    out[int(pid)] = (os.path.join(directory, str(int(pid))), int(level), hz)
        except Exception as e:  # the daemon's callable: never die of it
            rl_log.warning("wait counter provider failed: %r", e)
        return out

    def _update_power(self) -> None:
        o = self.options
        changed = []
        for p in self._power:
            dyn = dynamic_power(o["dynamic_w"], (
                (self._util[cpu] * (1.0 if self._effective else self._speed(cpu)),
                 self._freq[cpu] / self._fmax)
                for cpu in self.topology.cpus_of_package(p)))
            self._power[p] = o["idle_w"] + dyn
            self._dram_power[p] = o["dram_idle_w"] + o["dram_fraction"] * dyn
            k = self._k[p]
            if self._limit[p] >= self._max_w[p] - 1e-9:
                k_new = 1.0
            elif dyn <= 1e-9:
                k_new = min(1.0, k * 2.0)
            else:
                ratio = max(self._limit[p] - o["idle_w"], 0.0) / dyn
                k_new = min(1.0, max(K_MIN, k * math.sqrt(max(ratio, 0.25))))
            if abs(k_new - k) > 1e-3:
                self._k[p] = k_new
                changed.extend(self.topology.cpus_of_package(p))
        if changed:
            try:
                self._apply(changed)
            except HardwareError as e:
                rl_log.warning("emulated power limit: %s", e)

    # -------------------------------------------------------------- actuation

    def _speed(self, cpu: int) -> float:
        return cpu_speed(self._level[cpu], 16, self._freq[cpu], self._fmax,
                         self._k[self._pkg_of[cpu]])

    def _group(self, cpu: int) -> str:
        return os.path.join(self._base, f"cpu{cpu}")

    def _home(self, tid: int) -> str:
        """The cpu cgroup a thread came from (the hierarchy's root if that is gone).

        Why back there and not into one shared group for released threads:
        in cgroup v1 a group's weight is split across the cpus its threads
        run on, so two ranks of a container in one group on two cpus compete
        against any other task at half a task's weight each; a hog at nice 5
        beside each rank then took 50 % of each cpu instead of 25 %."""
        dest = os.path.normpath(os.path.join(self._mount, self._origin.get(tid, "/").lstrip("/")))
        inside_ours = os.path.commonpath([dest, self._base]) == self._base
        if inside_ours or not os.path.isdir(dest):
            return self._mount
        return dest

    def _apply(self, cpus: Iterable[int]) -> None:
        """Turn the speed of each cpu into its group's quota."""
        if not self._effective:
            return
        with self._bw_lock:
            before = set(self._slowed)
            for cpu in cpus:
                s = self._speed(cpu)
                quota = -1 if s >= 0.999 else max(MIN_QUOTA_US, int(round(self._period_us * s)))
                if quota == self._quota.get(cpu, -1):
                    continue
                group = self._group(cpu)
                if quota == -1:
                    self._slowed.discard(cpu)
                    self._release_pending = True
                    if cpu in self._groups:
                        self._cg_write(os.path.join(group, "cpu.cfs_quota_us"), "-1")
                else:
                    if cpu not in self._groups:
                        try:
                            os.makedirs(group, exist_ok=True)
                        except OSError as e:
                            raise HardwareError(f"cannot create {group}: "
                                                f"{e.strerror or e}") from None
                        self._groups.add(cpu)
                        self._cg_write(os.path.join(group, "cpu.cfs_period_us"),
                                       str(self._period_us))
                    self._cg_write(os.path.join(group, "cpu.cfs_quota_us"), str(quota))
                    self._slowed.add(cpu)
                self._quota[cpu] = quota
            # a new quota on a cpu already slowed applies to the threads
            # already in its group: only a cpu joining or leaving the slowed
            # set has threads to move (the periodic passes follow the rest)
            if self._slowed != before:
                self._wake.set()

    @staticmethod
    def _cg_write(path: str, text: str) -> None:
        try:
            with open(path, "w") as f:
                f.write(text)
        except OSError as e:
            raise HardwareError(f"cannot write {text!r} to {path}: {e.strerror or e}") from None

    def set_task_provider(self, fn: Optional[Callable[[], Iterable[int]]]) -> None:
        self._provider = fn

    def set_wait_counters(self, fn) -> None:
        self._wait_counters = fn

    def wait_throttle_target(self) -> Optional[Dict[str, Any]]:
        """Ranks count their throttled waits in files this platform bills."""
        return {"kind": "counters", "levels": self.duty_cycle_levels}

    def _thread_origin(self, proc: str, tid: int) -> str:
        try:
            with open(os.path.join(proc, str(tid), "cgroup")) as f:
                for line in f:
                    parts = line.rstrip("\n").split(":", 2)
                    if len(parts) == 3 and "cpu" in parts[1].split(","):
                        return parts[2]
        except OSError:
            pass
        return "/"

    def place_threads(self) -> int:
        """Move container threads to the group of the cpu they last ran on.

        Returns how many threads were moved. Threads never moved and not on
        a slowed cpu are left alone: they are already unthrottled.
        """
        provider = self._provider
        if not self._effective or provider is None:
            return 0
        try:
            pids = list(provider())
        except Exception as e:  # the provider belongs to the daemon: never die of it
            rl_log.warning("task provider failed: %r", e)
            return 0
        moved = 0
        with self._bw_lock:
            slowed = set(self._slowed)
            self._release_pending = False
            seen = set()
            for pid in pids:
                taskdir = os.path.join(self.root, "proc", str(pid), "task")
                try:
                    tids = [int(t) for t in os.listdir(taskdir) if t.isdigit()]
                except OSError:
                    continue
                for tid in tids:
                    try:
                        with open(os.path.join(taskdir, str(tid), "stat")) as f:
                            cpu = last_cpu(f.read())
                    except OSError:
                        continue
                    seen.add(tid)
                    target = cpu if cpu in slowed else None
                    if self._placed.get(tid) == target:
                        continue
                    if tid not in self._placed:
                        self._origin[tid] = self._thread_origin(taskdir, tid)
                    dest = self._home(tid) if target is None else self._group(target)
                    try:
                        with open(os.path.join(dest, "tasks"), "w") as f:
                            f.write(str(tid))
                    except OSError as e:
                        if e.errno != errno.ESRCH:
                            rl_log.warning("cannot move thread %d to %s: %s", tid, dest,
                                           e.strerror or e)
                        continue
                    if target is None:
                        del self._placed[tid]
                        self._origin.pop(tid, None)
                    else:
                        self._placed[tid] = target
                    moved += 1
            for tid in [t for t in self._placed if t not in seen]:
                del self._placed[tid]
                self._origin.pop(tid, None)
        return moved

    def _placement_loop(self) -> None:
        fast = float(self.options["placement_period_s"])
        idle = float(self.options["placement_idle_period_s"])
        wait = 0.0
        while not self._stop.is_set():
            if not self._slowed and not self._release_pending:
                self._wake.wait()
                self._wake.clear()
                wait = 0.0
                continue
            try:
                moved = self.place_threads() > 0
            except Exception as e:  # keep placing whatever happens
                rl_log.error("thread placement failed: %r", e)
                moved = True
            wait = placement_wait(wait, moved, fast, idle)
            if self._wake.wait(wait):      # a cpu slowed or released: place at once
                wait = 0.0
            self._wake.clear()

    def _cleanup_groups(self, stale: bool = False) -> None:
        """Move every task out of our groups (to its origin) and remove them."""
        base, mount = self._base, self._mount
        if not base or not os.path.isdir(base):
            return
        for name in sorted(os.listdir(base)):
            group = os.path.join(base, name)
            if not os.path.isdir(group):
                continue
            try:
                with open(os.path.join(group, "tasks")) as f:
                    tids = [int(t) for t in f.read().split()]
            except OSError:
                tids = []
            for tid in tids:
                for path in (self._home(tid), mount):
                    try:
                        with open(os.path.join(path, "tasks"), "w") as f:
                            f.write(str(tid))
                        break
                    except OSError:
                        continue
            try:
                self._cg_write(os.path.join(group, "cpu.cfs_quota_us"), "-1")
            except HardwareError:
                pass
            try:
                os.rmdir(group)
            except OSError as e:
                log.warning("cannot remove %s: %s", group, e.strerror or e)
        try:
            os.rmdir(base)
        except OSError as e:
            log.warning("cannot remove %s: %s", base, e.strerror or e)
        if stale:
            log.warning("removed cgroups left in %s by a previous nrmd", base)
        self._groups.clear()
        self._quota.clear()
        self._slowed.clear()
        self._placed.clear()

    # ----------------------------------------------------------------- hooks

    def _read(self, name: str, index: int) -> float:
        if name in ("package.energy", "dram.energy", "package.temperature",
                    "core.temperature"):
            with self._sense_lock:
                self._advance(time.monotonic())
                if name == "package.energy":
                    return self._energy[index]
                if name == "dram.energy":
                    return self._dram_energy[index]
                if name == "package.temperature":
                    return self._temp[index]
                cpus = self._first_cpu[index]
                u = sum(self._util[c] for c in cpus) / len(cpus)
                return self._temp[self._pkg_of[index]] + self.options["core_delta_c"] * u
        if name == "cpu.duty_cycle":
            return float(self._level[index])
        if name == "cpu.frequency":
            return self._freq[index]
        if name == "package.power_limit":
            return self._limit[index]
        raise HardwareError(f"unknown signal {name!r}")

    def _set(self, name: str, index: int, value: Any) -> float:
        if name == "cpu.duty_cycle":
            if not 1 <= value <= 16:
                raise HardwareError(f"duty-cycle level {value!r} out of range 1..16")
            self._level[index] = min(16, int(math.ceil(value - 1e-9)))
            applied, cpus = float(self._level[index]), [index]
        elif name == "cpu.frequency":
            if value <= 0:
                raise HardwareError(f"frequency {value!r} Hz must be positive")
            f = next((x for x in self._freqs if x >= value - 1.0), self._fmax)
            self._freq[index] = f
            applied, cpus = f, [index]
        elif name == "package.power_limit":
            lo = float(self.options["idle_w"])
            with self._sense_lock:
                self._limit[index] = min(max(float(value), lo), self._max_w[index])
                self._t_model = -math.inf     # react at the next sample
            applied, cpus = self._limit[index], []
        else:
            raise HardwareError(f"unknown control {name!r}")
        if cpus:
            # _apply wakes the placement thread, which moves the threads: a
            # /proc scan here would put it on the daemon's decision path
            self._apply(cpus)
        return applied

    def _write(self, name: str, index: int, value: float) -> float:
        return self._set(name, index, value)

    def _snapshot(self, name: str, index: int) -> Any:
        return self._read(name, index)

    def _put_back(self, name: str, index: int, original: Any) -> None:
        try:
            value = float(original)
        except (TypeError, ValueError):
            raise HardwareError(f"bad saved value {original!r} for {name}[{index}]") from None
        self._set(name, index, value)

    def _sample(self) -> Sample:
        packages = {}
        with self._sense_lock:
            now = time.monotonic()
            self._advance(now)
            for p in self.topology.packages:
                e, d = self._energy[p], self._dram_energy[p]
                prev = self._prev.get(p)
                pw = dpw = None
                if prev is not None and now > prev[0]:
                    pw = (e - prev[1]) / (now - prev[0])
                    dpw = (d - prev[2]) / (now - prev[0])
                self._prev[p] = (now, e, d)
                packages[p] = package_entry(e, pw, d, dpw, self._temp[p])
        return Sample(time=now, packages=packages, node_power_w=node_power(packages),
                      emulated=True)

    def frequencies(self, cpu: int) -> List[float]:
        return list(self._freqs) if cpu in self._level else []

    def _actuation_effective(self) -> bool:
        return self._effective

    def _describe_backend(self) -> Dict[str, Any]:
        with self._bw_lock:
            slowed = sorted(self._slowed)
            placed = len(self._placed)
        return {"cgroup": self._base, "slowed_cpus": slowed, "placed_threads": placed,
                "speed_factor": dict(self._k),
                "wait_throttled_unbilled_s": self._wait_discount_ns / 1e9,
                "model": {k: v for k, v in self.options.items()
                          if k not in ("cgroup_mount", "cgroup_name")}}

    def _close_backend(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        if self._effective:
            with self._bw_lock:
                self._cleanup_groups()
            self._effective = False
