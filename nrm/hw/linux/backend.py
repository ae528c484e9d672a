"""The real node: powercap or MSR RAPL, MSR clock modulation and PERF_CTL,
cpufreq, hwmon.

Every path is taken under ``root`` so the whole backend runs unchanged
against a fake tree in tests. Each facility is optional: what is missing
or unreadable is left out of ``signals()``/``controls()`` and explained in
``describe()["reasons"]`` rather than failing the daemon.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Dict, Iterable, List, Optional, Tuple

from nrm.hw.linux import cpufreq
from nrm.hw.linux.energy import WrappingCounter
from nrm.hw.linux.hwmon import Hwmon
from nrm.hw.linux.msr import (BUS_HZ, IA32_CLOCK_MODULATION, IA32_PERF_CTL,
                              MSR_DRAM_ENERGY_STATUS, MSR_PKG_ENERGY_STATUS, ClockModulation,
                              MsrAccess, MsrRapl, PerfCtl, allowlist_refuses,
                              allowlist_refuses_clock_modulation, detect_extended_modulation,
                              hwp_enabled, msr_safe_path, writable_by)
from nrm.hw.linux.powercap import Powercap, PowercapLimit
from nrm.hw.linux.sysfs import AttrFile, try_read_text
from nrm.hw.registry import (ControlInfo, HardwareError, Platform, Sample, SignalInfo,
                             node_power, package_entry)
from nrm.hw.topology import read_topology
from nrm.log import RateLimitedLog

log = logging.getLogger(__name__)
rl_log = RateLimitedLog(log, 30.0)


def _topology(root: str):
    try:
        return read_topology(root)
    except OSError as e:
        raise HardwareError(f"cannot read the cpu topology under {root}: "
                            f"{e.strerror or e}") from None


def probe_rapl(root: str) -> Tuple[bool, str]:
    """Whether RAPL energy is readable under root, and if not, why."""
    files: List[AttrFile] = []
    pc = Powercap(root)
    if pc.present:
        try:
            pc.counters(pc.package_zones, files)
            return True, "powercap"
        except HardwareError as e:
            why_pc = str(e)
        finally:
            for f in files:
                f.close()
    else:
        why_pc = f"no intel-rapl/amd-rapl package zone in {pc.base}"
    msr = MsrAccess(root)
    try:
        cpu = _topology(root).cpus[0].id
        msr.read(cpu, MSR_PKG_ENERGY_STATUS)
        return True, "msr"
    except (HardwareError, IndexError) as e:
        why_msr = str(e) or "no cpus"
    finally:
        msr.close()
    return False, f"{why_pc}; {why_msr}"


class LinuxPlatform(Platform):
    """The real node: RAPL through powercap or MSRs, clock modulation
    through MSR 0x19A, cpufreq, hwmon temperatures, all under ``root``."""

    backend_name = "linux"
    emulated = False

    def __init__(self, root: str = "/", journal=None):
        super().__init__(_topology(root), journal)
        self.root = root
        self._sense_lock = threading.Lock()
        self._files: List[AttrFile] = []
        self._msr = MsrAccess(root)
        self._paths: Dict[str, Any] = {}
        self._prev: Dict[int, Tuple[float, Optional[float], Optional[float]]] = {}
        topo = self.topology
        pkg_cpu = {p: topo.cpus_of_package(p)[0] for p in topo.packages}
        self._setup_energy(pkg_cpu)
        self._setup_limits()
        self._setup_clock_modulation()
        self._cpufreq = cpufreq.discover(root, [c.id for c in topo.cpus])
        if self._cpufreq:
            self._paths["cpufreq"] = os.path.dirname(next(iter(self._cpufreq.values())).path)
        else:
            self._reasons.append("no cpufreq under sys/devices/system/cpu/cpuN/cpufreq: "
                                 "no DVFS")
        self._setup_perf_ctl()
        self._hwmon = Hwmon(root, topo)
        if not self._hwmon.package_paths and not self._hwmon.core_paths:
            self._reasons.append("no coretemp/k10temp hwmon device: no temperatures")
        self._paths["hwmon"] = sorted(set(self._hwmon.package_paths.values()))
        self._build_tables()

    # ------------------------------------------------------------------ setup

    def _setup_energy(self, pkg_cpu: Dict[int, int]) -> None:
        self._pkg_counters: Dict[int, List[WrappingCounter]] = {}
        self._dram_counters: Dict[int, List[WrappingCounter]] = {}
        self._rapl_msr: Optional[MsrRapl] = None
        self.energy_source: Optional[str] = None
        pc = Powercap(self.root)
        self._powercap = pc
        if pc.present:
            try:
                self._pkg_counters = pc.counters(pc.package_zones, self._files)
                self.energy_source = "powercap"
                self._paths["powercap"] = pc.base
            except HardwareError as e:
                self._reasons.append(f"powercap energy unreadable: {e}")
            if self._pkg_counters and pc.dram_zones:
                try:
                    self._dram_counters = pc.counters(pc.dram_zones, self._files)
                except HardwareError as e:
                    self._reasons.append(f"no DRAM energy: {e}")
        else:
            self._reasons.append(f"no powercap RAPL zones in {pc.base}")
        if self._pkg_counters:
            return
        try:
            self._rapl_msr = MsrRapl(self._msr, pkg_cpu)
            self._pkg_counters = {p: [self._rapl_msr.counter(p, MSR_PKG_ENERGY_STATUS)]
                                  for p in pkg_cpu}
            self.energy_source = "msr"
            self._paths["msr"] = self._msr.path(next(iter(pkg_cpu.values())))
        except HardwareError as e:
            self._rapl_msr = None
            self._reasons.append(f"no RAPL energy through MSRs either: {e}")
            return
        for p in pkg_cpu:
            try:
                self._dram_counters[p] = [self._rapl_msr.counter(p, MSR_DRAM_ENERGY_STATUS)]
            except HardwareError as e:
                self._reasons.append(f"no DRAM energy for package {p}: {e}")

    def _setup_limits(self) -> None:
        self._limit_pc: Dict[int, PowercapLimit] = {}
        self._limit_msr: List[int] = []
        self._limit_bounds: Tuple[Optional[float], Optional[float]] = (None, None)
        for p, zone in sorted(self._powercap.limit_zones.items()):
            lim = PowercapLimit(zone)
            try:
                lim.read()
            except HardwareError as e:
                self._reasons.append(f"package {p} power limit unreadable: {e}")
                continue
            self._limit_pc[p] = lim
        if self._limit_pc:
            bounds = [lim.bounds() for lim in self._limit_pc.values()]
        elif self._rapl_msr is not None:
            for p in self._rapl_msr.package_cpus:
                try:
                    self._rapl_msr.read_limit(p)
                    self._limit_msr.append(p)
                except HardwareError as e:
                    self._reasons.append(f"package {p} power limit unreadable: {e}")
            bounds = [self._rapl_msr.limit_bounds(p) for p in self._limit_msr]
        else:
            self._reasons.append("no power limit interface: no package.power_limit control")
            return
        los = [b[0] for b in bounds if b[0] is not None]
        his = [b[1] for b in bounds if b[1] is not None]
        self._limit_bounds = (max(los) if los else None, min(his) if his else None)

    def _setup_clock_modulation(self) -> None:
        self._clockmod: Optional[ClockModulation] = None
        self._clockmod_cpus: List[int] = []
        ext, why = detect_extended_modulation(self.root)
        self.extended_modulation = ext
        self.duty_cycle_levels = 16 if ext else 8
        if ext is None:
            self._reasons.append(why)
        cpus = [c.id for c in self.topology.cpus if self._msr.exists(c.id)]
        if not cpus:
            self._reasons.append(f"no MSR device under {os.path.join(self.root, 'dev/cpu')} "
                                 f"(modprobe msr or msr-safe): no clock modulation")
            return
        try:
            self._msr.read(cpus[0], IA32_CLOCK_MODULATION)
        except HardwareError as e:
            self._reasons.append(f"no clock modulation: {e}")
            return
        self._clockmod = ClockModulation(self._msr, bool(ext))
        self._clockmod_cpus = cpus
        self._paths.setdefault("msr", self._msr.path(cpus[0]))

    def _setup_perf_ctl(self) -> None:
        """IA32_PERF_CTL's target ratio, for the frequency form of in-wait
        throttling: Intel cores (ratio in 100 MHz units) with cpufreq (for
        the lowest ratio: ``cpuinfo_min_freq``) and hardware P-states off
        (with HWP on the core ignores IA32_PERF_CTL). When IA32_PM_ENABLE
        cannot be read, HWP is taken to be off."""
        self._perf: Optional[PerfCtl] = None
        self._perf_lowest: Dict[int, int] = {}
        self._perf_why: Optional[str] = None
        cpus = [c for c in sorted(self._cpufreq) if self._msr.exists(c)]
        info = try_read_text(os.path.join(self.root, "proc/cpuinfo"), "") or ""
        if not cpus:
            self._perf_why = "no cpu with both an MSR device and cpufreq"
        elif "GenuineIntel" not in info:
            self._perf_why = "IA32_PERF_CTL's ratio is an Intel register (vendor_id not " \
                             "GenuineIntel in proc/cpuinfo)"
        else:
            try:
                self._msr.read(cpus[0], IA32_PERF_CTL)
                if hwp_enabled(self._msr, cpus[0]):
                    self._perf_why = ("hardware P-states (HWP) on: IA32_PM_ENABLE (0x770) "
                                      "bit 0 set, so the core ignores IA32_PERF_CTL")
            except HardwareError as e:
                self._perf_why = f"IA32_PERF_CTL unreadable: {e}"
        if self._perf_why is None:
            highest = []
            for c in cpus:
                lo = try_read_text(os.path.join(self._cpufreq[c].path, "cpuinfo_min_freq"))
                hi = try_read_text(os.path.join(self._cpufreq[c].path, "cpuinfo_max_freq"))
                if not (lo and hi and lo.isdigit() and hi.isdigit() and 0 < int(lo) <= int(hi)):
                    continue
                # ratio units: the lowest rounded up, the highest down (a
                # max of base + 1 MHz is acpi-cpufreq's turbo marker)
                self._perf_lowest[c] = min(255, -(-int(lo) * 1000 // int(BUS_HZ)))
                highest.append(min(255, int(hi) * 1000 // int(BUS_HZ)))
            if not self._perf_lowest:
                self._perf_why = "no cpuinfo_min_freq/cpuinfo_max_freq under cpufreq"
            else:
                self._perf = PerfCtl(self._msr, min(self._perf_lowest.values()), max(highest),
                                     in_wait=max(self._perf_lowest.values()))
        if self._perf_why is not None:
            self._reasons.append(f"no IA32_PERF_CTL control (in-wait frequency): "
                                 f"{self._perf_why}")

    def _build_tables(self) -> None:
        pkgs = tuple(sorted(self._pkg_counters))
        S, C = SignalInfo, ControlInfo
        sig: List[SignalInfo] = []
        ctl: List[ControlInfo] = []
        if pkgs:
            sig.append(S("package.energy", "package", "J", "sum",
                         f"RAPL package energy via {self.energy_source}, wrap-corrected", pkgs))
        if self._dram_counters:
            sig.append(S("dram.energy", "package", "J", "sum", "RAPL DRAM energy per package",
                         tuple(sorted(self._dram_counters))))
        temp_pkgs = tuple(sorted(set(self._hwmon.package_paths) | {
            self.topology.cpu(c).package for c in self._hwmon.core_paths}))
        if temp_pkgs:
            sig.append(S("package.temperature", "package", "C", "max",
                         "package temperature from hwmon (max of cores when no package sensor)",
                         temp_pkgs))
        if self._hwmon.core_paths:
            sig.append(S("core.temperature", "core", "C", "max",
                         "core temperature from hwmon; index = first logical cpu of the core",
                         tuple(sorted(self._hwmon.core_paths))))
        cpus = tuple(self._clockmod_cpus)
        if self._clockmod is not None:
            desc = (f"clock modulation level 1..16 (16 = unmodulated), "
                    f"{self.duty_cycle_levels} hardware levels, MSR 0x19A")
            sig.append(S("cpu.duty_cycle", "cpu", "level", "average", desc, cpus))
            ctl.append(C("cpu.duty_cycle", "cpu", "level", "average",
                         desc + "; rounded up to a supported level", cpus, 1.0, 16.0))
        if self._perf is not None:
            pcpus = tuple(sorted(self._perf_lowest))
            desc = (f"IA32_PERF_CTL target ratio (bits 15:8, x {BUS_HZ / 1e6:.0f} MHz), MSR "
                    f"0x199; written by ranks in MPI waits (in-wait frequency)")
            sig.append(S("cpu.perf_ctl", "cpu", "ratio", "average", desc, pcpus))
            ctl.append(C("cpu.perf_ctl", "cpu", "ratio", "average", desc, pcpus,
                         float(self._perf.lowest), float(self._perf.highest)))
        if self._cpufreq:
            fcpus = tuple(sorted(self._cpufreq))
            allf = [f for c in self._cpufreq.values() for f in c.available]
            how = "userspace governor" if all(c.userspace for c in self._cpufreq.values()) \
                else "scaling_max_freq where no userspace governor"
            sig.append(S("cpu.frequency", "cpu", "Hz", "average", "scaling_cur_freq", fcpus))
            ctl.append(C("cpu.frequency", "cpu", "Hz", "average",
                         f"cpufreq ({how}); rounded up to an available frequency", fcpus,
                         min(allf), max(allf)))
        lim_pkgs = tuple(sorted(self._limit_pc)) or tuple(sorted(self._limit_msr))
        if lim_pkgs:
            via = "powercap constraint_0" if self._limit_pc else "MSR 0x610 PL1"
            sig.append(S("package.power_limit", "package", "W", "sum", f"PL1 via {via}",
                         lim_pkgs))
            ctl.append(C("package.power_limit", "package", "W", "sum",
                         f"long-term package power limit (PL1) via {via}", lim_pkgs,
                         self._limit_bounds[0], self._limit_bounds[1]))
        self._signals = {s.name: s for s in sig}
        self._controls = {c.name: c for c in ctl}

    # ----------------------------------------------------------------- hooks

    def _energy(self, counters: Dict[int, List[WrappingCounter]], pkg: int) -> Optional[float]:
        cs = counters.get(pkg)
        if not cs:
            return None
        return sum(c.read() for c in cs)

    def _package_temperature(self, pkg: int) -> float:
        if pkg in self._hwmon.package_paths:
            return self._hwmon.package(pkg)
        cores = [c for c in self._hwmon.core_paths if self.topology.cpu(c).package == pkg]
        if not cores:
            raise HardwareError(f"no temperature sensor for package {pkg}")
        return max(self._hwmon.core(c) for c in cores)

    def _read(self, name: str, index: int) -> float:
        if name == "package.energy":
            with self._sense_lock:
                return self._energy(self._pkg_counters, index) or 0.0
        if name == "dram.energy":
            with self._sense_lock:
                return self._energy(self._dram_counters, index) or 0.0
        if name == "package.temperature":
            return self._package_temperature(index)
        if name == "core.temperature":
            return self._hwmon.core(index)
        if name == "cpu.duty_cycle":
            return self._clockmod.read(index)
        if name == "cpu.frequency":
            return self._cpufreq[index].read()
        if name == "cpu.perf_ctl":
            return self._perf.read(index)
        if name == "package.power_limit":
            if self._limit_pc:
                return self._limit_pc[index].read()
            return self._rapl_msr.read_limit(index)
        raise HardwareError(f"unknown signal {name!r}")

    def _write(self, name: str, index: int, value: float) -> float:
        if name == "cpu.duty_cycle":
            return self._clockmod.write(index, value)
        if name == "cpu.frequency":
            return self._cpufreq[index].write(value)
        if name == "cpu.perf_ctl":
            return self._perf.write(index, value)
        if name == "package.power_limit":
            if value <= 0:
                raise HardwareError(f"package.power_limit[{index}]: {value} W must be positive")
            if self._limit_pc:
                return self._limit_pc[index].write(value)
            return self._rapl_msr.write_limit(index, value)
        raise HardwareError(f"unknown control {name!r}")

    def _snapshot(self, name: str, index: int) -> Any:
        if name == "cpu.duty_cycle":
            return self._clockmod.snapshot(index)
        if name == "cpu.frequency":
            return self._cpufreq[index].snapshot()
        if name == "cpu.perf_ctl":
            return self._perf.snapshot(index)
        if name == "package.power_limit":
            if self._limit_pc:
                return self._limit_pc[index].snapshot()
            return self._rapl_msr.snapshot_limit(index)
        raise HardwareError(f"unknown control {name!r}")

    def _claim_snapshot(self, name: str, index: int) -> Any:
        """Clock modulation is claimed for ranks that throttle in waits: a
        register found modulated may be an adopted rank's throttle (or one a
        killed rank left), never an original to put back, so the
        unmodulated value stands in for it. IA32_PERF_CTL has no such
        neutral value (the cpufreq driver's own choice may be any ratio,
        the lowest when idle), so it is claimed as found: before the ranks
        run, or from the journal of a previous nrmd (``claim``)."""
        raw = self._snapshot(name, index)
        if name == "cpu.duty_cycle" and int(raw) & 0x10:
            clean = int(raw) & ~0x1F
            log.warning("cpu %d: IA32_CLOCK_MODULATION is %#x (modulated) when claimed for "
                        "in-wait throttling; %#x (unmodulated) is the original restored",
                        index, int(raw), clean)
            return clean
        return raw

    def _put_back(self, name: str, index: int, original: Any) -> None:
        if name == "cpu.duty_cycle":
            self._clockmod.put_back(index, original)
        elif name == "cpu.frequency":
            self._cpufreq[index].put_back(original)
        elif name == "cpu.perf_ctl":
            self._perf.put_back(index, original)
        elif name == "package.power_limit":
            if self._limit_pc:
                self._limit_pc[index].put_back(original)
            else:
                self._rapl_msr.put_back_limit(index, original)
        else:
            raise HardwareError(f"unknown control {name!r}")

    def _sample(self) -> Sample:
        packages: Dict[int, Dict[str, Optional[float]]] = {}
        temp_ok = "package.temperature" in self._signals
        with self._sense_lock:
            now = time.monotonic()
            for pkg in self.topology.packages:
                e = self._energy(self._pkg_counters, pkg)
                d = self._energy(self._dram_counters, pkg)
                prev = self._prev.get(pkg)
                p_w = dp_w = None
                if prev is not None and now > prev[0]:
                    dt = now - prev[0]
                    if e is not None and prev[1] is not None:
                        p_w = (e - prev[1]) / dt
                    if d is not None and prev[2] is not None:
                        dp_w = (d - prev[2]) / dt
                self._prev[pkg] = (now, e, d)
                t = None
                if temp_ok:
                    try:
                        t = self._package_temperature(pkg)
                    except HardwareError as err:
                        rl_log.warning("%s", err, key=f"temp{pkg}")
                packages[pkg] = package_entry(e, p_w, d, dp_w, t)
        return Sample(time=now, packages=packages, node_power_w=node_power(packages),
                      emulated=False)

    def frequencies(self, cpu: int) -> List[float]:
        c = self._cpufreq.get(cpu)
        return list(c.available) if c else []

    def wait_throttle_target(self) -> Optional[Dict[str, Any]]:
        """msr-safe devices the ranks can write clock modulation (0x19A) and
        the target ratio (0x199) through, if any.

        ``bits``: level -> bits 4:0 of 0x19A ({} when the allowlist refuses
        them); ``perf_ctl``: ``{"lowest": {cpu: ratio}, "highest": ratio,
        "bus_hz": the ratio's unit}``
        when the ranks may drop the frequency in waits (0x199 bits 15:8 in
        the allowlist when it is readable, HWP off), else None and
        ``perf_ctl_why`` says why. The raw msr device is never handed out
        (it lets its user write any register); msr-safe enforces an
        allowlist. Whether a given user may write it is checked per
        container (``msr.writable_by``).
        """
        cpus = [c.id for c in self.topology.cpus
                if os.path.exists(msr_safe_path(self.root, c.id))]
        if not cpus:
            return None
        bits: Dict[int, int] = {}
        if self._clockmod is not None:
            why = allowlist_refuses_clock_modulation(self.root)
            if why:
                rl_log.warning("in-wait throttling of the duty cycle unavailable: %s", why)
            else:
                bits = {lv: 0x10 | q for lv in range(1, 16)
                        if (q := self._clockmod.quantize(lv)) < 16}
        perf, perf_why = None, self._perf_why
        if self._perf is not None:
            perf_why = allowlist_refuses(self.root, IA32_PERF_CTL, PerfCtl.MASK)
            if perf_why is None:
                perf = {"lowest": dict(self._perf_lowest), "highest": self._perf.highest,
                        "bus_hz": BUS_HZ}
        if not bits and perf is None:
            rl_log.warning("in-wait throttling unavailable: no duty cycle, and no "
                           "frequency: %s", perf_why)
            return None
        return {"kind": "msr", "dir": os.path.join(self.root, "dev/cpu"), "cpus": cpus,
                "levels": self.duty_cycle_levels, "bits": bits, "perf_ctl": perf,
                "perf_ctl_why": perf_why}

    def wait_throttle_denied(self, cpus: Iterable[int], uid: int) -> List[int]:
        """Cpus whose msr_safe device a process of ``uid`` (with its groups)
        may not open for writing: the ranks, not the daemon, write it."""
        return [c for c in sorted(cpus) if not writable_by(msr_safe_path(self.root, c), uid)]

    def _describe_backend(self) -> Dict[str, Any]:
        return {"energy_source": self.energy_source, "paths": dict(self._paths),
                "hwmon": list(self._hwmon.names),
                "extended_clock_modulation": self.extended_modulation}

    def _close_backend(self) -> None:
        for f in self._files:
            f.close()
        self._files.clear()
        self._hwmon.close()
        self._msr.close()
