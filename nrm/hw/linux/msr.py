"""Model-specific registers: RAPL fallback, PL1, clock modulation, PERF_CTL.

Access goes through ``/dev/cpu/N/msr_safe`` when present (LLNL msr-safe,
which enforces its own allowlist) and ``/dev/cpu/N/msr`` otherwise, with
8-byte little-endian pread/pwrite at offset = register. The raw msr device
lets root write any bit of any register, so nrm keeps its own allowlist:
reads of the registers it uses, and writes only to 0x19A (bits 4:0),
0x199 (the target ratio, bits 15:8) and 0x610 (the PL1 fields, bits
23:0). A write that would change any other bit is refused and logged,
whatever the caller asks.

A regular file in place of the device (a fake tree in tests) holds one
8-byte slot per register, at offset 8 x register: with the device's byte
offsets, adjacent registers such as 0x610, 0x611 and 0x614 would overlap
in a plain file. A real msr device is a character device, so this can
never apply to hardware.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import pwd
import stat
import struct
from typing import Dict, List, Optional, Tuple

from nrm.hw.linux.energy import WrappingCounter
from nrm.hw.linux.sysfs import hw_error, reason, try_read_text
from nrm.hw.registry import HardwareError

log = logging.getLogger(__name__)

MSR_RAPL_POWER_UNIT = 0x606
MSR_PKG_POWER_LIMIT = 0x610
MSR_PKG_ENERGY_STATUS = 0x611
MSR_PKG_POWER_INFO = 0x614
MSR_DRAM_ENERGY_STATUS = 0x619
MSR_PP0_ENERGY_STATUS = 0x639
IA32_PERF_CTL = 0x199
IA32_CLOCK_MODULATION = 0x19A
IA32_PM_ENABLE = 0x770
IA32_THERM_STATUS = 0x19C
MSR_TEMPERATURE_TARGET = 0x1A2
IA32_PACKAGE_THERM_STATUS = 0x1B1

READABLE = frozenset({
    MSR_RAPL_POWER_UNIT, MSR_PKG_POWER_LIMIT, MSR_PKG_ENERGY_STATUS, MSR_PKG_POWER_INFO,
    MSR_DRAM_ENERGY_STATUS, MSR_PP0_ENERGY_STATUS, IA32_CLOCK_MODULATION, IA32_THERM_STATUS,
    MSR_TEMPERATURE_TARGET, IA32_PACKAGE_THERM_STATUS, IA32_PERF_CTL, IA32_PM_ENABLE,
})
WRITE_MASKS = {
    IA32_CLOCK_MODULATION: 0x1F,        # enable bit 4, level bits 3:0
    IA32_PERF_CTL: 0xFF00,              # target ratio bits 15:8
    MSR_PKG_POWER_LIMIT: 0x00FFFFFF,    # PL1: power 14:0, enable 15, clamp 16, window 23:17
}

PL1_POWER_MASK = 0x7FFF
PL1_ENABLE = 1 << 15
PL_LOCK = 1 << 63


class MsrAccess:
    """Per-cpu MSR files, opened on first use and kept open."""

    def __init__(self, root: str):
        self.root = root
        self._fds: Dict[int, Tuple[int, str, bool, int]] = {}

    def path(self, cpu: int) -> str:
        base = os.path.join(self.root, "dev/cpu", str(cpu))
        safe = os.path.join(base, "msr_safe")
        return safe if os.path.exists(safe) else os.path.join(base, "msr")

    def exists(self, cpu: int) -> bool:
        return os.path.exists(self.path(cpu))

    def _fd(self, cpu: int, write: bool = False) -> Tuple[int, str, int]:
        """(fd, path, offset stride) for cpu's MSR file, reopened read-write on demand."""
        entry = self._fds.get(cpu)
        if entry is not None and (entry[2] or not write):
            return entry[0], entry[1], entry[3]
        path = self.path(cpu)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            rw = True
        except OSError as e:
            if write or e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise hw_error(path, e, "open") from None
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e2:
                raise hw_error(path, e2, "open") from None
            rw = False
        if entry is not None:
            os.close(entry[0])
        stride = 8 if stat.S_ISREG(os.fstat(fd).st_mode) else 1
        self._fds[cpu] = (fd, path, rw, stride)
        return fd, path, stride

    def read(self, cpu: int, reg: int) -> int:
        if reg not in READABLE:
            raise HardwareError(f"MSR {reg:#x} is not in nrm's read allowlist")
        fd, path, stride = self._fd(cpu)
        try:
            data = os.pread(fd, 8, reg * stride)
        except OSError as e:
            raise HardwareError(f"cannot read MSR {reg:#x} from {path}: "
                                f"{reason(path, e.errno or 0)}") from None
        if len(data) != 8:
            raise HardwareError(f"cannot read MSR {reg:#x} from {path}: register not "
                                f"implemented by this cpu or not in the msr-safe allowlist")
        return struct.unpack("<Q", data)[0]

    def write(self, cpu: int, reg: int, value: int) -> None:
        mask = WRITE_MASKS.get(reg)
        if mask is None:
            log.error("refused write of %#x to MSR %#x on cpu %d: register not in the "
                      "write allowlist", value, reg, cpu)
            raise HardwareError(f"MSR {reg:#x} is not writable through nrm (allowlist: "
                                f"{', '.join(hex(r) for r in sorted(WRITE_MASKS))})")
        if not 0 <= value < (1 << 64):
            raise HardwareError(f"value {value!r} does not fit a 64-bit MSR")
        current = self.read(cpu, reg)
        if (current ^ value) & ~mask:
            log.error("refused write of %#x to MSR %#x on cpu %d: changes bits outside "
                      "the write mask %#x (current %#x)", value, reg, cpu, mask, current)
            raise HardwareError(f"write of {value:#x} to MSR {reg:#x} on cpu {cpu} refused: "
                                f"bits outside the write mask {mask:#x} would change")
        fd, path, stride = self._fd(cpu, write=True)
        try:
            n = os.pwrite(fd, struct.pack("<Q", value), reg * stride)
        except OSError as e:
            raise HardwareError(f"cannot write MSR {reg:#x} on {path}: "
                                f"{e.strerror or e}") from None
        if n != 8:
            raise HardwareError(f"short write of MSR {reg:#x} on {path}")

    def close(self) -> None:
        for fd, _, _, _ in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()


class MsrRapl:
    """RAPL energy and PL1 through MSRs, read on the first cpu of each package."""

    def __init__(self, msr: MsrAccess, package_cpus: Dict[int, int]):
        self.msr = msr
        self.package_cpus = package_cpus
        units = {p: msr.read(c, MSR_RAPL_POWER_UNIT) for p, c in package_cpus.items()}
        self.power_unit = {p: 1.0 / (1 << (u & 0xF)) for p, u in units.items()}
        self.energy_unit = {p: 1.0 / (1 << ((u >> 8) & 0x1F)) for p, u in units.items()}

    def counter(self, pkg: int, reg: int) -> WrappingCounter:
        cpu = self.package_cpus[pkg]
        msr = self.msr

        def raw() -> int:
            return msr.read(cpu, reg) & 0xFFFFFFFF
        c = WrappingCounter(raw, 1 << 32, self.energy_unit[pkg])
        c.read()
        return c

    def limit_bounds(self, pkg: int) -> Tuple[Optional[float], Optional[float]]:
        unit = self.power_unit[pkg]
        try:
            info = self.msr.read(self.package_cpus[pkg], MSR_PKG_POWER_INFO)
        except HardwareError:
            return None, None
        lo = ((info >> 16) & 0x7FFF) * unit or None
        hi = ((info >> 32) & 0x7FFF) * unit or None
        if hi is None:
            hi = (info & 0x7FFF) * unit or None   # thermal design power
        if lo is None and hi is not None:
            lo = hi * 0.1
        return lo, hi

    def read_limit(self, pkg: int) -> float:
        raw = self.msr.read(self.package_cpus[pkg], MSR_PKG_POWER_LIMIT)
        return (raw & PL1_POWER_MASK) * self.power_unit[pkg]

    def snapshot_limit(self, pkg: int) -> int:
        return self.msr.read(self.package_cpus[pkg], MSR_PKG_POWER_LIMIT)

    def write_limit(self, pkg: int, watts: float) -> float:
        cpu = self.package_cpus[pkg]
        cur = self.msr.read(cpu, MSR_PKG_POWER_LIMIT)
        if cur & PL_LOCK:
            raise HardwareError(f"package {pkg} power limit is locked by firmware "
                                f"(MSR 0x610 bit 63 set): cannot change PL1")
        lo, hi = self.limit_bounds(pkg)
        w = max(watts, lo or 0.0)
        if hi is not None:
            w = min(w, hi)
        unit = self.power_unit[pkg]
        raw = min(PL1_POWER_MASK, max(1, int(math.ceil(w / unit - 1e-9))))
        self.msr.write(cpu, MSR_PKG_POWER_LIMIT,
                       (cur & ~(PL1_POWER_MASK | PL1_ENABLE)) | raw | PL1_ENABLE)
        return raw * unit

    def put_back_limit(self, pkg: int, original: int) -> None:
        cpu = self.package_cpus[pkg]
        cur = self.msr.read(cpu, MSR_PKG_POWER_LIMIT)
        if cur & PL_LOCK:
            raise HardwareError(f"package {pkg} power limit is locked (MSR 0x610 bit 63)")
        self.msr.write(cpu, MSR_PKG_POWER_LIMIT,
                       (cur & ~WRITE_MASKS[MSR_PKG_POWER_LIMIT])
                       | (int(original) & WRITE_MASKS[MSR_PKG_POWER_LIMIT]))


def detect_extended_modulation(root: str) -> Tuple[Optional[bool], str]:
    """Whether IA32_CLOCK_MODULATION has 16 levels (CPUID.06H:EAX bit 5).

    Python cannot execute CPUID, but the ``cpuid`` kernel module exposes it
    as ``/dev/cpu/0/cpuid`` (16 bytes eax..edx at offset = leaf), which a
    fake tree can also provide. Linux has no /proc/cpuinfo flag for this
    bit; an ``ecmd`` flag there is honoured as a site/test override.
    Returns (None, why) when unknown.
    """
    path = os.path.join(root, "dev/cpu/0/cpuid")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            data = os.pread(fd, 16, 6)
        finally:
            os.close(fd)
        if len(data) == 16:
            eax = struct.unpack("<4I", data)[0]
            ext = bool(eax & (1 << 5))
            return ext, f"CPUID.06H:EAX bit 5 = {int(ext)} from {path}"
    except OSError:
        pass
    info = try_read_text(os.path.join(root, "proc/cpuinfo"), "") or ""
    for line in info.splitlines():
        if line.startswith("flags"):
            flags = line.split(":", 1)[-1].split()
            if "ecmd" in flags:
                return True, "ecmd flag in /proc/cpuinfo"
            break
    return None, (f"extended clock modulation unknown (no {path}: modprobe cpuid); "
                  f"using 8 levels, valid on all hardware")


class ClockModulation:
    """IA32_CLOCK_MODULATION as a level 1..16 (16 = unmodulated).

    With extended modulation bits 3:0 hold the level in 1/16 steps; without
    it bits 3:1 hold it in 1/8 steps, which is the same encoding with bit 0
    clear. So an 8-level write is valid on both kinds of hardware, while a
    16-level write on old hardware sets a reserved bit (a #GP, EIO). That is
    why unknown hardware is driven with 8 levels.
    """

    def __init__(self, msr: MsrAccess, extended: bool):
        self.msr = msr
        self.extended = extended
        self.levels = 16 if extended else 8

    def quantize(self, level: float) -> int:
        if not 1 <= level <= 16:
            raise HardwareError(f"duty-cycle level {level!r} out of range 1..16")
        lv = int(math.ceil(level - 1e-9))
        if not self.extended and lv % 2:
            lv += 1
        return min(16, lv)

    def read(self, cpu: int) -> int:
        raw = self.msr.read(cpu, IA32_CLOCK_MODULATION)
        if not raw & 0x10:
            return 16
        lv = raw & (0xF if self.extended else 0xE)
        return lv if lv else 16

    def snapshot(self, cpu: int) -> int:
        return self.msr.read(cpu, IA32_CLOCK_MODULATION)

    def write(self, cpu: int, level: float) -> int:
        lv = self.quantize(level)
        cur = self.msr.read(cpu, IA32_CLOCK_MODULATION)
        bits = 0 if lv == 16 else 0x10 | lv
        self.msr.write(cpu, IA32_CLOCK_MODULATION, (cur & ~0x1F) | bits)
        return lv

    def put_back(self, cpu: int, original: int) -> None:
        cur = self.msr.read(cpu, IA32_CLOCK_MODULATION)
        self.msr.write(cpu, IA32_CLOCK_MODULATION, (cur & ~0x1F) | (int(original) & 0x1F))


class PerfCtl:
    """IA32_PERF_CTL's target ratio (bits 15:8): the P-state a core asks
    for, in units of the bus clock (``BUS_HZ``).

    The ranks write it inside MPI waits (the frequency form of in-wait
    throttling); nrm writes it only to put an original back. The cpufreq
    driver writes it too (acpi-cpufreq, intel_pstate without HWP); with
    HWP on (IA32_PM_ENABLE bit 0) the core ignores it.
    """

    MASK = 0xFF00

    def __init__(self, msr: MsrAccess, lowest: int, highest: int, in_wait: Optional[int] = None):
        self.msr = msr
        self.lowest = lowest
        self.highest = highest
        #: the highest ratio a rank may write in a wait (the cpus' lowest
        #: ratios differ): a core at or below it may be one a rank left
        self.in_wait = lowest if in_wait is None else in_wait

    def read(self, cpu: int) -> int:
        return (self.msr.read(cpu, IA32_PERF_CTL) >> 8) & 0xFF

    def snapshot(self, cpu: int) -> int:
        return self.msr.read(cpu, IA32_PERF_CTL)

    def write(self, cpu: int, ratio: float) -> int:
        r = int(min(self.highest, max(self.lowest, math.ceil(ratio - 1e-9))))
        cur = self.msr.read(cpu, IA32_PERF_CTL)
        self.msr.write(cpu, IA32_PERF_CTL, (cur & ~self.MASK) | (r << 8))
        return r

    def put_back(self, cpu: int, original: int) -> None:
        """Undo what a rank may have left: a core above the in-wait ratio
        was set since by the cpufreq driver (it also writes this register,
        and skips a write when its own target has not changed), so its
        value stays; a core at or below it gets the original back."""
        cur = self.msr.read(cpu, IA32_PERF_CTL)
        if (cur >> 8) & 0xFF > self.in_wait:
            return
        self.msr.write(cpu, IA32_PERF_CTL, (cur & ~self.MASK) | (int(original) & self.MASK))


#: the ratio unit of IA32_PERF_CTL on Intel cores since Sandy Bridge
BUS_HZ = 100e6


def hwp_enabled(msr: MsrAccess, cpu: int) -> Optional[bool]:
    """IA32_PM_ENABLE bit 0 (hardware P-states on: IA32_PERF_CTL is
    ignored), or None when the register cannot be read."""
    try:
        return bool(msr.read(cpu, IA32_PM_ENABLE) & 1)
    except HardwareError:
        return None


def msr_safe_path(root: str, cpu: int) -> str:
    return os.path.join(root, "dev/cpu", str(cpu), "msr_safe")


def writable_by(path: str, uid: int) -> bool:
    """Whether a process of ``uid`` (with its passwd groups) may open ``path`` for writing.

    The ranks, not the daemon, write clock modulation in waits, so it is
    their permission that counts (msr-safe devices are usually group-owned
    by a site group).
    """
    try:
        st = os.stat(path)
    except OSError:
        return False
    if uid == 0:
        return True
    if st.st_uid == uid:
        return bool(st.st_mode & stat.S_IWUSR)
    try:
        pw = pwd.getpwuid(uid)
        groups: List[int] = os.getgrouplist(pw.pw_name, pw.pw_gid)
    except (KeyError, OSError):
        groups = []
    if st.st_gid in groups:
        return bool(st.st_mode & stat.S_IWGRP)
    return bool(st.st_mode & stat.S_IWOTH)


def allowlist_refuses_clock_modulation(root: str) -> Optional[str]:
    """Why msr-safe's allowlist would refuse writes of 0x19A bits 4:0, or None.

    None also when no allowlist can be read (it is often root-only): the
    interposer then tests a write of the value it read before relying on it.
    """
    return allowlist_refuses(root, IA32_CLOCK_MODULATION, 0x1F)


def allowlist_refuses(root: str, reg: int, bits: int) -> Optional[str]:
    """Why msr-safe's allowlist would refuse writes of ``bits`` of ``reg``,
    or None (also when no allowlist can be read)."""
    for name in ("msr_allowlist", "msr_whitelist"):
        path = os.path.join(root, "dev/cpu", name)
        text = try_read_text(path)
        if text is None:
            continue
        for line in text.splitlines():
            words = line.split("#", 1)[0].split()
            if len(words) < 2:
                continue
            try:
                mask = int(words[1], 16)
                int(words[0], 16)
            except ValueError:
                continue
            if int(words[0], 16) == reg:
                if mask & bits == bits:
                    return None
                return (f"{path} allows MSR {reg:#x} with write mask {mask:#x}, "
                        f"not {bits:#x}")
        return f"{path} does not list MSR {reg:#x} (add '{reg:#010x} {bits:#018x}')"
    return None
