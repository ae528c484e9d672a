"""Package and core temperatures from hwmon (coretemp, k10temp, zenpower).

coretemp registers one hwmon device per package, labelled ``Package id N``
and ``Core K`` (K is the package-local core_id). AMD drivers expose one
``Tctl``/``Tdie`` per package with no package number, so their devices are
assigned to packages in hwmon order; ``Tdie`` is preferred because ``Tctl``
may carry a fan-control offset. Core temperatures are indexed by the first
(lowest) logical cpu of the core, a node-unique id the policies already use.
"""

from __future__ import annotations

import os
import re
from typing import Dict, List, Optional, Tuple

from nrm.hw.linux.sysfs import AttrFile, try_read_text
from nrm.hw.registry import HardwareError
from nrm.hw.topology import Topology

INTEL = ("coretemp",)
AMD = ("k10temp", "zenpower")
PKG_LABEL = re.compile(r"^Package id (\d+)$")
CORE_LABEL = re.compile(r"^Core (\d+)$")


def _inputs(path: str) -> List[Tuple[str, str]]:
    """(label, input path) of every tempK_input, unlabelled ones as ''."""
    out = []
    try:
        names = os.listdir(path)
    except OSError:
        return out
    ids = sorted(int(n[4:-6]) for n in names
                 if n.startswith("temp") and n.endswith("_input") and n[4:-6].isdigit())
    for k in ids:
        label = try_read_text(os.path.join(path, f"temp{k}_label"), "") or ""
        out.append((label, os.path.join(path, f"temp{k}_input")))
    return out


class Hwmon:
    def __init__(self, root: str, topology: Topology):
        self.package_paths: Dict[int, str] = {}
        self.core_paths: Dict[int, str] = {}
        self.names: List[str] = []
        self._files: Dict[str, AttrFile] = {}
        base = os.path.join(root, "sys/class/hwmon")
        try:
            devs = sorted((n for n in os.listdir(base) if n.startswith("hwmon")
                           and n[5:].isdigit()), key=lambda n: int(n[5:]))
        except OSError:
            devs = []
        first_cpu: Dict[Tuple[int, int], int] = {}
        for c in topology.cpus:
            first_cpu.setdefault((c.package, c.core), c.id)
        packages = topology.packages
        amd_next = 0
        for dev in devs:
            path = os.path.join(base, dev)
            name = try_read_text(os.path.join(path, "name"), "") or ""
            if name in INTEL:
                inputs = _inputs(path)
                pkg: Optional[int] = None
                for label, inp in inputs:
                    m = PKG_LABEL.match(label)
                    if m:
                        pkg = int(m.group(1))
                        self.package_paths.setdefault(pkg, inp)
                if pkg is None:
                    continue
                for label, inp in inputs:
                    m = CORE_LABEL.match(label)
                    if m and (pkg, int(m.group(1))) in first_cpu:
                        self.core_paths[first_cpu[(pkg, int(m.group(1)))]] = inp
                self.names.append(name)
            elif name in AMD:
                if amd_next >= len(packages):
                    continue
                labels = dict(_inputs(path))
                inp = (labels.get("Tdie") or labels.get("Tctl")
                       or next(iter(labels.values()), None))
                if inp:
                    self.package_paths.setdefault(packages[amd_next], inp)
                    amd_next += 1
                    self.names.append(name)

    def _read(self, path: str) -> float:
        f = self._files.get(path)
        if f is None:
            f = self._files[path] = AttrFile(path)
        return f.read_int() / 1000.0

    def package(self, pkg: int) -> float:
        path = self.package_paths.get(pkg)
        if path is None:
            raise HardwareError(f"no temperature sensor for package {pkg}")
        return self._read(path)

    def core(self, cpu: int) -> float:
        return self._read(self.core_paths[cpu])

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
