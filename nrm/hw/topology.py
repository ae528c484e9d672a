"""Node topology: packages, cores, logical cpus and NUMA nodes.

Read from sysfs under a configurable root so tests can describe any machine
with a fake tree. A cpu whose topology files are missing (some VMs) is put in
package 0, core = its own id, node 0: a usable answer beats a refusal.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List


@dataclass(frozen=True)
class Cpu:
    id: int
    core: int
    package: int
    node: int


@dataclass
class Topology:
    cpus: List[Cpu]
    nodes: List[int] = field(default_factory=list)

    def __post_init__(self):
        self.cpus.sort(key=lambda c: c.id)
        if not self.nodes:
            self.nodes = sorted({c.node for c in self.cpus})
        self._by_id = {c.id: c for c in self.cpus}

    @property
    def packages(self) -> List[int]:
        return sorted({c.package for c in self.cpus})

    def cpu(self, cpu_id: int) -> Cpu:
        return self._by_id[cpu_id]

    def cpus_of_package(self, package: int) -> List[int]:
        return [c.id for c in self.cpus if c.package == package]

    def cpus_of_node(self, node: int) -> List[int]:
        return [c.id for c in self.cpus if c.node == node]

    def to_dict(self) -> Dict[str, object]:
        return {"cpus": [c.__dict__ for c in self.cpus], "nodes": self.nodes,
                "packages": self.packages}


def parse_cpulist(text: str) -> List[int]:
    """Parse the kernel's list format ("0-3,8,10-11")."""
    cpus: List[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-", 1)
            cpus.extend(range(int(lo), int(hi) + 1))
        else:
            cpus.append(int(part))
    return cpus


def format_cpulist(cpus) -> str:
    """Inverse of parse_cpulist, with ranges compressed."""
    ids = sorted(set(cpus))
    parts = []
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        parts.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(parts)


def _read(path: str, default: str = "") -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return default


def read_topology(root: str = "/") -> Topology:
    cpu_dir = os.path.join(root, "sys/devices/system/cpu")
    online = _read(os.path.join(cpu_dir, "online"))
    if online:
        ids = parse_cpulist(online)
    else:
        ids = sorted(int(n[3:]) for n in os.listdir(cpu_dir)
                     if n.startswith("cpu") and n[3:].isdigit())
    node_of: Dict[int, int] = {}
    node_dir = os.path.join(root, "sys/devices/system/node")
    nodes: List[int] = []
    if os.path.isdir(node_dir):
        for name in sorted(os.listdir(node_dir)):
            if name.startswith("node") and name[4:].isdigit():
                node = int(name[4:])
                nodes.append(node)
                for c in parse_cpulist(_read(os.path.join(node_dir, name, "cpulist"))):
                    node_of[c] = node
    cpus = []
    for i in ids:
        topo = os.path.join(cpu_dir, f"cpu{i}", "topology")
        package = int(_read(os.path.join(topo, "physical_package_id"), "0") or 0)
        core = int(_read(os.path.join(topo, "core_id"), str(i)) or i)
        cpus.append(Cpu(id=i, core=core, package=max(package, 0), node=node_of.get(i, 0)))
    return Topology(cpus=cpus, nodes=sorted(nodes) or sorted({c.node for c in cpus}))
