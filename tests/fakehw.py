"""Builder of fake sysfs/devfs/procfs trees that the hardware layer reads.

Tests (ours and other engineers') run the real backends against these
trees instead of mocking them. Files have the kernel's formats. MSR
"devices" are sparse regular files with one 8-byte little-endian slot per
register at offset 8 x register (nrm.hw.linux.msr reads regular files that
way, because at the device's byte offsets adjacent registers would
overlap); a read past the end returns nothing, like an MSR the cpu does
not implement. The cpuid "device" keeps the real layout (16 bytes at
offset = leaf): only leaf 6 is ever read.

Cpu numbering is package-major: cpu = package * cpus_per_package +
thread * cores + core.
"""

from __future__ import annotations

import os
import struct
from typing import Dict, Iterable, List, Optional

MSR_FILE_SIZE = 0x2000 * 8
DEFAULT_RANGE_UJ = 262143328850


class FakeNode:
    def __init__(self, root: str, packages: int = 1, cores: int = 2, threads: int = 1, *,
                 powercap: bool = True, dram: bool = True, vendor: str = "intel",
                 max_energy_range_uj: int = DEFAULT_RANGE_UJ, power_limit_uw: int = 100_000_000,
                 max_power_uw: int = 150_000_000, msr: bool = False, msr_safe: bool = False,
                 energy_unit_exp: int = 14, power_unit_exp: int = 3,
                 ecmd: Optional[bool] = True, cpufreq: bool = True,
                 userspace_governor: bool = True, available_frequencies: bool = True,
                 frequencies_khz: Iterable[int] = (1200000, 1800000, 2400000),
                 hwmon: Optional[str] = "coretemp", proc_stat: bool = True):
        self.root = str(root)
        self.packages = packages
        self.cores = cores
        self.threads = threads
        self.per_package = cores * threads
        self.ncpus = packages * self.per_package
        self.vendor = vendor
        self.max_energy_range_uj = max_energy_range_uj
        self.msr_name = "msr_safe" if msr_safe else "msr"
        self.has_msr = msr or msr_safe
        self.energy_unit_exp = energy_unit_exp
        self.power_unit_exp = power_unit_exp
        self._topology()
        self._cpuinfo(ecmd)
        if powercap:
            self._powercap(dram, power_limit_uw, max_power_uw)
        if self.has_msr:
            self._msr(power_limit_uw)
        if ecmd is not None:
            self._cpuid(ecmd)
        if cpufreq:
            self._cpufreq(userspace_governor, available_frequencies, list(frequencies_khz))
        if hwmon:
            self._hwmon(hwmon)
        if proc_stat:
            self.set_proc_stat({c: (0, 0) for c in range(self.ncpus)})

    # ---------------------------------------------------------------- files

    def path(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def write(self, rel: str, text) -> str:
        p = self.path(rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "w") as f:
            f.write(f"{text}\n")
        return p

    def read(self, rel: str) -> str:
        with open(self.path(rel)) as f:
            return f.read().strip()

    def cpu_id(self, package: int, core: int, thread: int = 0) -> int:
        return package * self.per_package + thread * self.cores + core

    def cpus_of(self, package: int) -> List[int]:
        return list(range(package * self.per_package, (package + 1) * self.per_package))

    # ------------------------------------------------------------- topology

    def _topology(self) -> None:
        self.write("sys/devices/system/cpu/online", f"0-{self.ncpus - 1}")
        for p in range(self.packages):
            for t in range(self.threads):
                for c in range(self.cores):
                    cpu = self.cpu_id(p, c, t)
                    d = f"sys/devices/system/cpu/cpu{cpu}/topology"
                    self.write(f"{d}/physical_package_id", p)
                    self.write(f"{d}/core_id", c)
            self.write(f"sys/devices/system/node/node{p}/cpulist",
                       f"{p * self.per_package}-{(p + 1) * self.per_package - 1}")

    def _cpuinfo(self, ecmd: Optional[bool]) -> None:
        flags = "fpu msr ht dtherm arat pln pts" + (" ecmd" if ecmd else "")
        vendor = "GenuineIntel" if self.vendor == "intel" else "AuthenticAMD"
        blocks = [f"processor\t: {c}\nvendor_id\t: {vendor}\nflags\t\t: {flags}\n"
                  for c in range(self.ncpus)]
        self.write("proc/cpuinfo", "\n".join(blocks))

    # ------------------------------------------------------------- powercap

    def zone(self, package: int, dram: bool = False) -> str:
        prefix = "intel-rapl" if self.vendor == "intel" else "amd-rapl"
        name = f"{prefix}:{package}" + (":0" if dram else "")
        return f"sys/class/powercap/{name}"

    def _powercap(self, dram: bool, limit_uw: int, max_uw: int) -> None:
        for p in range(self.packages):
            z = self.zone(p)
            self.write(f"{z}/name", f"package-{p}")
            self.write(f"{z}/energy_uj", 0)
            self.write(f"{z}/max_energy_range_uj", self.max_energy_range_uj)
            self.write(f"{z}/enabled", 1)
            self.write(f"{z}/constraint_0_name", "long_term")
            self.write(f"{z}/constraint_0_power_limit_uw", limit_uw)
            self.write(f"{z}/constraint_0_max_power_uw", max_uw)
            self.write(f"{z}/constraint_0_time_window_us", 999424)
            self.write(f"{z}/constraint_1_name", "short_term")
            self.write(f"{z}/constraint_1_power_limit_uw", int(limit_uw * 1.2))
            if dram:
                d = self.zone(p, dram=True)
                self.write(f"{d}/name", "dram")
                self.write(f"{d}/energy_uj", 0)
                self.write(f"{d}/max_energy_range_uj", self.max_energy_range_uj)

    def energy_uj(self, package: int, dram: bool = False) -> int:
        return int(self.read(f"{self.zone(package, dram)}/energy_uj"))

    def set_energy_uj(self, package: int, uj: int, dram: bool = False) -> None:
        self.write(f"{self.zone(package, dram)}/energy_uj", uj)

    def advance_energy(self, package: int, joules: float, dram: bool = False) -> None:
        """Add energy to a powercap counter, wrapping like the kernel does."""
        uj = self.energy_uj(package, dram) + int(round(joules * 1e6))
        self.set_energy_uj(package, uj % (self.max_energy_range_uj + 1), dram)

    # ------------------------------------------------------------------ MSR

    def msr_path(self, cpu: int) -> str:
        return self.path(f"dev/cpu/{cpu}/{self.msr_name}")

    def _msr(self, limit_uw: int) -> None:
        for cpu in range(self.ncpus):
            p = self.msr_path(cpu)
            os.makedirs(os.path.dirname(p), exist_ok=True)
            with open(p, "wb") as f:
                f.truncate(MSR_FILE_SIZE)
        units = self.power_unit_exp | (self.energy_unit_exp << 8) | (10 << 16)
        pl1 = int(limit_uw / 1e6 * (1 << self.power_unit_exp))
        for cpu in range(self.ncpus):
            self.set_msr(cpu, 0x606, units)
            self.set_msr(cpu, 0x610, pl1 | (1 << 15) | (0x6E << 17))
            tdp = int(150 * (1 << self.power_unit_exp))
            self.set_msr(cpu, 0x614, tdp | ((tdp // 4) << 16) | ((tdp * 2) << 32))

    def set_msr(self, cpu: int, reg: int, value: int) -> None:
        with open(self.msr_path(cpu), "r+b") as f:
            f.seek(reg * 8)
            f.write(struct.pack("<Q", value))

    def get_msr(self, cpu: int, reg: int) -> int:
        with open(self.msr_path(cpu), "rb") as f:
            f.seek(reg * 8)
            return struct.unpack("<Q", f.read(8))[0]

    def advance_msr_energy(self, package: int, joules: float, dram: bool = False) -> None:
        """Add energy to the 32-bit MSR counter of a package (on all its cpus)."""
        reg = 0x619 if dram else 0x611
        cpu0 = self.cpus_of(package)[0]
        raw = self.get_msr(cpu0, reg) + int(round(joules * (1 << self.energy_unit_exp)))
        for cpu in self.cpus_of(package):
            self.set_msr(cpu, reg, raw & 0xFFFFFFFF)

    def _cpuid(self, ecmd: bool) -> None:
        p = self.path("dev/cpu/0/cpuid")
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.truncate(0x100)
            f.seek(6)
            eax = 0b101 | ((1 << 5) if ecmd else 0)
            f.write(struct.pack("<4I", eax, 0, 0, 0))

    # -------------------------------------------------------------- cpufreq

    def cpufreq_dir(self, cpu: int) -> str:
        return f"sys/devices/system/cpu/cpu{cpu}/cpufreq"

    def _cpufreq(self, userspace: bool, available: bool, khz: List[int]) -> None:
        for cpu in range(self.ncpus):
            d = self.cpufreq_dir(cpu)
            governors = "performance powersave" + (" userspace" if userspace else "")
            self.write(f"{d}/scaling_available_governors", governors)
            self.write(f"{d}/scaling_governor", "performance")
            if available:
                self.write(f"{d}/scaling_available_frequencies",
                           " ".join(str(k) for k in sorted(khz, reverse=True)))
            self.write(f"{d}/cpuinfo_min_freq", min(khz))
            self.write(f"{d}/cpuinfo_max_freq", max(khz))
            self.write(f"{d}/scaling_min_freq", min(khz))
            self.write(f"{d}/scaling_max_freq", max(khz))
            self.write(f"{d}/scaling_cur_freq", max(khz))
            if userspace:
                self.write(f"{d}/scaling_setspeed", "<unsupported>")

    # ---------------------------------------------------------------- hwmon

    def _hwmon(self, kind: str) -> None:
        for p in range(self.packages):
            d = f"sys/class/hwmon/hwmon{p}"
            self.write(f"{d}/name", kind)
            if kind == "coretemp":
                self.write(f"{d}/temp1_label", f"Package id {p}")
                self.write(f"{d}/temp1_input", 40000)
                for c in range(self.cores):
                    self.write(f"{d}/temp{c + 2}_label", f"Core {c}")
                    self.write(f"{d}/temp{c + 2}_input", 38000)
            else:
                self.write(f"{d}/temp1_label", "Tctl")
                self.write(f"{d}/temp1_input", 50000)

    def set_temperature(self, package: int, celsius: float, core: Optional[int] = None) -> None:
        d = f"sys/class/hwmon/hwmon{package}"
        k = 1 if core is None else core + 2
        self.write(f"{d}/temp{k}_input", int(round(celsius * 1000)))

    # ----------------------------------------------------------------- proc

    def set_proc_stat(self, ticks: Dict[int, tuple]) -> None:
        """Per-cpu (busy, idle) USER_HZ ticks, cumulative like /proc/stat."""
        lines = []
        tb = sum(b for b, _ in ticks.values())
        ti = sum(i for _, i in ticks.values())
        lines.append(f"cpu  {tb} 0 0 {ti} 0 0 0 0 0 0")
        for cpu in sorted(ticks):
            b, i = ticks[cpu]
            lines.append(f"cpu{cpu} {b} 0 0 {i} 0 0 0 0 0 0")
        lines.append("intr 0")
        self.write("proc/stat", "\n".join(lines))
