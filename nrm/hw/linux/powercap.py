"""RAPL through the powercap sysfs tree (``intel-rapl`` and ``amd-rapl``).

Zones are matched by their ``name`` file, not their number: the top-level
zone number is not the package id (a ``psys`` zone can take a number) and
multi-die parts name zones ``package-0-die-1``. The energy of a package is
the sum of its package zones; its DRAM energy the sum of their ``dram``
sub-zones. Power limits are only driven through a zone named exactly
``package-N`` (per-die limits are not supported).
"""

from __future__ import annotations

import os
import re
from typing import Dict, List, Optional, Tuple

from nrm.hw.linux.energy import WrappingCounter
from nrm.hw.linux.sysfs import AttrFile, read_int, try_read_text, write_text
from nrm.hw.registry import HardwareError

ZONE_RE = re.compile(r"^(intel|amd)-rapl:(\d+)(?::(\d+))?$")
PACKAGE_RE = re.compile(r"^package-(\d+)(-die-\d+)?$")

# Lowest limit accepted when the zone does not publish one: a fraction of the
# maximum, because a limit near zero can make a node unresponsive.
MIN_LIMIT_FRACTION = 0.1
MIN_LIMIT_FALLBACK_W = 1.0


class Powercap:
    def __init__(self, root: str):
        self.base = os.path.join(root, "sys/class/powercap")
        self.package_zones: Dict[int, List[str]] = {}
        self.dram_zones: Dict[int, List[str]] = {}
        self.limit_zones: Dict[int, str] = {}
        self._scan()

    def _scan(self) -> None:
        try:
            names = sorted(os.listdir(self.base))
        except OSError:
            return
        top: Dict[Tuple[str, str], Optional[int]] = {}
        subs = []
        for entry in names:
            m = ZONE_RE.match(entry)
            if not m:
                continue
            path = os.path.join(self.base, entry)
            zname = try_read_text(os.path.join(path, "name"), "") or ""
            if m.group(3) is None:
                pm = PACKAGE_RE.match(zname)
                pkg = int(pm.group(1)) if pm else None
                top[(m.group(1), m.group(2))] = pkg
                if pkg is None:
                    continue
                self.package_zones.setdefault(pkg, []).append(path)
                if pm.group(2) is None and os.path.exists(
                        os.path.join(path, "constraint_0_power_limit_uw")):
                    self.limit_zones.setdefault(pkg, path)
            else:
                subs.append((m.group(1), m.group(2), zname, path))
        for vendor, parent, zname, path in subs:
            pkg = top.get((vendor, parent))
            if pkg is not None and zname == "dram":
                self.dram_zones.setdefault(pkg, []).append(path)

    @property
    def present(self) -> bool:
        return bool(self.package_zones)

    def counters(self, zones: Dict[int, List[str]],
                 files: List[AttrFile]) -> Dict[int, List[WrappingCounter]]:
        """Open every zone's energy_uj; raises HardwareError on the first unreadable one.

        Opened files are appended to ``files`` so the caller can close them.
        """
        out: Dict[int, List[WrappingCounter]] = {}
        for pkg, paths in sorted(zones.items()):
            for path in paths:
                modulus = read_int(os.path.join(path, "max_energy_range_uj")) + 1
                f = AttrFile(os.path.join(path, "energy_uj"))
                files.append(f)
                counter = WrappingCounter(f.read_int, modulus, 1e-6)
                counter.read()
                out.setdefault(pkg, []).append(counter)
        return out


class PowercapLimit:
    """PL1 (constraint 0) of one package zone, in watts."""

    def __init__(self, zone: str):
        self.zone = zone
        self.limit_path = os.path.join(zone, "constraint_0_power_limit_uw")
        self.enabled_path = os.path.join(zone, "enabled")

    def bounds(self) -> Tuple[Optional[float], Optional[float]]:
        hi = None
        lo = None
        text = try_read_text(os.path.join(self.zone, "constraint_0_max_power_uw"))
        if text and text.isdigit() and int(text) > 0:
            hi = int(text) / 1e6
        text = try_read_text(os.path.join(self.zone, "constraint_0_min_power_uw"))
        if text and text.isdigit() and int(text) > 0:
            lo = int(text) / 1e6
        if lo is None:
            lo = hi * MIN_LIMIT_FRACTION if hi else MIN_LIMIT_FALLBACK_W
        return lo, hi

    def read(self) -> float:
        return read_int(self.limit_path) / 1e6

    def snapshot(self) -> Dict[str, Optional[int]]:
        enabled = try_read_text(self.enabled_path)
        return {"uw": read_int(self.limit_path),
                "enabled": int(enabled) if enabled and enabled.isdigit() else None}

    def write(self, watts: float) -> float:
        lo, hi = self.bounds()
        w = max(watts, lo)
        if hi is not None:
            w = min(w, hi)
        uw = int(round(w * 1e6))
        write_text(self.limit_path, str(uw))
        enabled = try_read_text(self.enabled_path)
        if enabled == "0":
            write_text(self.enabled_path, "1")
        return uw / 1e6

    def put_back(self, original) -> None:
        try:
            uw = int(original["uw"])
            enabled = original.get("enabled")
        except (TypeError, KeyError, ValueError):
            raise HardwareError(f"bad saved power limit {original!r} for {self.zone}") from None
        write_text(self.limit_path, str(uw))
        if enabled is not None and os.path.exists(self.enabled_path):
            write_text(self.enabled_path, str(int(enabled)))
