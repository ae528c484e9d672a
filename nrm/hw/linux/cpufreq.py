"""Per-cpu DVFS through cpufreq.

The ``userspace`` governor with ``scaling_setspeed`` sets an exact
frequency; drivers without it (intel_pstate in active mode) only accept a
ceiling, so ``scaling_max_freq`` is used there. Either way the governor and
the value nrm touches are saved before the first write and put back.
Drivers that list no ``scaling_available_frequencies`` get a 100 MHz grid
between ``cpuinfo_min_freq`` and ``cpuinfo_max_freq``.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

from nrm.hw.linux.sysfs import read_int, read_text, try_read_text, write_text
from nrm.hw.registry import HardwareError

GRID_KHZ = 100_000


class CpuFreqCpu:
    def __init__(self, cpu: int, path: str):
        self.cpu = cpu
        self.path = path
        self.available = self._available()
        governors = (try_read_text(self._p("scaling_available_governors"), "") or "").split()
        self.userspace = ("userspace" in governors
                          and os.path.exists(self._p("scaling_setspeed")))

    def _p(self, name: str) -> str:
        return os.path.join(self.path, name)

    def _available(self) -> List[float]:
        text = try_read_text(self._p("scaling_available_frequencies"))
        khz: List[int] = []
        if text:
            khz = sorted({int(t) for t in text.split() if t.isdigit()})
        if not khz:
            lo = try_read_text(self._p("cpuinfo_min_freq"))
            hi = try_read_text(self._p("cpuinfo_max_freq"))
            if lo and hi and lo.isdigit() and hi.isdigit() and 0 < int(lo) <= int(hi):
                start = -(-int(lo) // GRID_KHZ) * GRID_KHZ
                khz = sorted({int(lo), int(hi), *range(start, int(hi), GRID_KHZ)})
        return [k * 1000.0 for k in khz]

    def read(self) -> float:
        return read_int(self._p("scaling_cur_freq")) * 1000.0

    def round_up(self, hz: float) -> int:
        """The smallest available frequency >= hz (the maximum above it), in kHz."""
        if hz <= 0:
            raise HardwareError(f"cpu{self.cpu}: frequency {hz!r} Hz must be positive")
        for f in self.available:
            if f >= hz - 1.0:
                return int(round(f / 1000.0))
        return int(round(self.available[-1] / 1000.0))

    def snapshot(self) -> Dict[str, Any]:
        orig: Dict[str, Any] = {"governor": read_text(self._p("scaling_governor")),
                                "max_khz": read_int(self._p("scaling_max_freq"))}
        if self.userspace:
            text = try_read_text(self._p("scaling_setspeed"))
            orig["setspeed_khz"] = int(text) if text and text.isdigit() else None
        return orig

    def write(self, hz: float) -> float:
        khz = self.round_up(hz)
        if self.userspace:
            if read_text(self._p("scaling_governor")) != "userspace":
                write_text(self._p("scaling_governor"), "userspace")
            write_text(self._p("scaling_setspeed"), str(khz))
        else:
            write_text(self._p("scaling_max_freq"), str(khz))
        return khz * 1000.0

    def put_back(self, original: Any) -> None:
        try:
            governor = str(original["governor"])
            max_khz = int(original["max_khz"])
            setspeed: Optional[int] = original.get("setspeed_khz")
        except (TypeError, KeyError, ValueError):
            raise HardwareError(f"bad saved cpufreq state {original!r} for cpu{self.cpu}") \
                from None
        write_text(self._p("scaling_max_freq"), str(max_khz))
        if read_text(self._p("scaling_governor")) != governor:
            write_text(self._p("scaling_governor"), governor)
        if governor == "userspace" and setspeed:
            write_text(self._p("scaling_setspeed"), str(int(setspeed)))


def discover(root: str, cpus: List[int]) -> Dict[int, CpuFreqCpu]:
    out: Dict[int, CpuFreqCpu] = {}
    for cpu in cpus:
        path = os.path.join(root, "sys/devices/system/cpu", f"cpu{cpu}", "cpufreq")
        if os.path.exists(os.path.join(path, "scaling_governor")):
            c = CpuFreqCpu(cpu, path)
            if c.available:
                out[cpu] = c
    return out
