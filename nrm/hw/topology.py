"""Node topology: packages, cores, logical cpus and NUMA nodes.

Two readers fill one model. sysfs, under a configurable root so tests can
describe any machine with a fake tree; a cpu whose topology files are
missing (some VMs) is put in package 0, core = its own id, node 0: a usable
answer beats a refusal. And hwloc's XML, from a file the admin gives (a
machine sysfs describes badly, or a description shared by a whole cluster)
or from `lstopo` when hwloc is installed, since hwloc knows quirks of
firmware and kernels that a plain sysfs reader does not.

Every backend calls ``read_topology(root)``; which reader answers is chosen
once by nrmd (``configure``). Library callers get sysfs, as before.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

log = logging.getLogger(__name__)

#: A 1000-core machine's XML without I/O objects is a few MB; anything much
#: larger is not a topology, and ElementTree holds all of it in memory.
MAX_XML_BYTES = 32 << 20
#: lstopo takes ~40 ms on a small VM; a hung one must not hold nrmd's start.
LSTOPO_TIMEOUT = 30.0
LSTOPO_NAMES = ("lstopo-no-graphics", "lstopo", "hwloc-ls")
SOURCES = ("auto", "sysfs", "hwloc")


class TopologyError(OSError):
    """The topology cannot be read. An OSError so that the backends, which
    turn an unreadable sysfs into a clear start-up error, do the same here."""


@dataclass(frozen=True)
class Cpu:
    id: int
    core: int
    package: int
    node: int


@dataclass
class Topology:
    """Packages, cores, logical cpus and NUMA nodes of one node, as read once."""

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


def read_sysfs_topology(root: str = "/") -> Topology:
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


# -- hwloc XML ---------------------------------------------------------------

def parse_hwloc_bitmap(text: str) -> List[int]:
    """hwloc's bitmap format: 32-bit hex words, most significant first,
    comma separated ("0x00000001,0xffff0000"). An infinite set starts with
    "0xf...f"; its infinite part is no cpu of this machine and is dropped."""
    value = 0
    for word in text.strip().split(","):
        word = word.strip().lower()
        if word in ("0xf...f", "f...f"):
            continue
        value = (value << 32) | int(word, 16)
    return [i for i in range(value.bit_length()) if value >> i & 1]


def _os_index(obj, what: str, source: str) -> int:
    raw = obj.get("os_index")
    try:
        index = int(raw)
    except (TypeError, ValueError):
        raise TopologyError(f"topology XML {source}: {what} without a valid os_index "
                            f"({raw!r})") from None
    if index < 0:
        raise TopologyError(f"topology XML {source}: {what} with os_index {index}")
    return index


def _bitmap(obj, what: str, source: str) -> List[int]:
    try:
        return parse_hwloc_bitmap(obj.get("cpuset", "0x0"))
    except ValueError:
        raise TopologyError(f"topology XML {source}: {what} has a bad cpuset "
                            f"{obj.get('cpuset')!r}") from None


def parse_hwloc_xml(data: bytes, source: str = "<xml>") -> Topology:
    """Map hwloc's Package, Core, PU and NUMANode objects onto the model.

    PU os_index is the Linux cpu number, Core os_index the sysfs core_id and
    Package os_index the physical_package_id, so both readers agree on the
    same machine. NUMA nodes are read from their cpusets, which works with
    hwloc 2 (nodes are memory children beside the cores) and hwloc 1 (nodes
    are parents of the cores) alike.
    """
    if len(data) > MAX_XML_BYTES:
        raise TopologyError(f"topology XML {source}: {len(data)} bytes, more than the "
                            f"{MAX_XML_BYTES} a topology can need")
    try:
        root = ET.fromstring(data)
    except ET.ParseError as e:
        line, col = e.position
        why = str(e).split(":")[0]
        if b"</topology>" not in data[-4096:]:
            why = f"truncated (no closing </topology>; {why})"
        raise TopologyError(f"topology XML {source}: {why} at line {line}, column {col}"
                            ) from None
    if root.tag != "topology":
        raise TopologyError(f"topology XML {source}: the root element is <{root.tag}>, "
                            "not hwloc's <topology>")
    found: Dict[int, Cpu] = {}
    node_of: Dict[int, int] = {}
    nodes: List[int] = []
    packages_seen = 0

    # Depth first, without recursion: a file nested deeper than Python's
    # stack must give an answer or a TopologyError, not a RecursionError.
    stack = [(top, None, None) for top in reversed(root.findall("object"))]
    while stack:
        obj, package, core = stack.pop()
        kind = obj.get("type")
        # hwloc omits os_index where the OS gives none (some ARM firmware):
        # number such packages in order, and name such a core by its first cpu.
        if kind == "Package":
            package = (_os_index(obj, "Package", source) if "os_index" in obj.attrib
                       else packages_seen)
            packages_seen += 1
        elif kind == "Core":
            core = (_os_index(obj, "Core", source) if "os_index" in obj.attrib
                    else min(_bitmap(obj, "Core", source) or [-1]))
        elif kind == "NUMANode":
            node = _os_index(obj, "NUMANode", source)
            nodes.append(node)
            for c in _bitmap(obj, f"NUMANode {node}", source):
                node_of.setdefault(c, node)
        elif kind == "PU":
            cpu = _os_index(obj, "PU", source)
            if cpu in found:
                raise TopologyError(f"topology XML {source}: PU {cpu} appears twice")
            found[cpu] = Cpu(id=cpu, core=cpu if core is None else core,
                             package=0 if package is None else package, node=-1)
        stack.extend((child, package, core) for child in reversed(obj.findall("object")))
    if not found:
        raise TopologyError(f"topology XML {source}: no PU (logical cpu) objects")
    cpus = [Cpu(id=c.id, core=c.core, package=c.package, node=node_of.get(c.id, 0))
            for c in found.values()]
    return Topology(cpus=cpus, nodes=sorted(set(nodes)) or sorted({c.node for c in cpus}))


def read_hwloc_xml(path: str) -> Topology:
    """An admin's XML file (`lstopo --of xml FILE` run once, or edited)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_XML_BYTES + 1)
    except OSError as e:
        raise TopologyError(f"topology XML {path}: {e.strerror or e}") from None
    return parse_hwloc_xml(data, path)


def find_lstopo() -> Optional[str]:
    for name in LSTOPO_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def run_lstopo(lstopo: str) -> Topology:
    """This machine as hwloc sees it. --disallowed keeps the cpus a cgroup
    hides from nrmd itself, as sysfs' online list does; --no-io skips the
    PCI scan, which is most of lstopo's time and all of its output's bulk."""
    argv = [lstopo, "--of", "xml", "--no-io", "--disallowed", "-"]
    try:
        r = subprocess.run(argv, capture_output=True, timeout=LSTOPO_TIMEOUT,
                           stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise TopologyError(f"{lstopo}: {e}") from None
    if r.returncode != 0:
        err = r.stderr.decode(errors="replace").strip().splitlines()
        raise TopologyError(f"{lstopo} exited with {r.returncode}: "
                            f"{err[-1] if err else 'no message'}")
    return parse_hwloc_xml(r.stdout, lstopo)


# -- which reader answers ----------------------------------------------------

_lock = threading.Lock()
_config: Dict[str, Optional[str]] = {"source": "sysfs", "xml": None}
_cache: Dict[Tuple[str, str], List[Cpu]] = {}
_cache_nodes: Dict[Tuple[str, str], List[int]] = {}
_logged: set = set()


def configure(source: str = "auto", xml_path: Optional[str] = None) -> None:
    """nrmd's choice, made once before the hardware is opened.

    ``xml_path`` wins when given. Otherwise ``auto`` asks hwloc when it is
    installed and the root is the real machine's (a fake tree under
    --hw-root is the machine being described, and lstopo cannot see it),
    and sysfs otherwise; ``hwloc`` insists and fails without it.
    """
    if source not in SOURCES:
        raise ValueError(f"topology source {source!r} is not one of {', '.join(SOURCES)}")
    with _lock:
        _config.update(source=source, xml=xml_path)
        _cache.clear()
        _cache_nodes.clear()
        _logged.clear()


def _once(key: str, level: int, fmt: str, *args) -> None:
    if key not in _logged:
        _logged.add(key)
        log.log(level, fmt, *args)


def _cached(key: Tuple[str, str], read) -> Topology:
    """The same machine read several times during start-up (probe, then
    backend) costs one lstopo run; each caller gets its own model."""
    if key not in _cache:
        topo = read()
        _cache[key] = list(topo.cpus)
        _cache_nodes[key] = list(topo.nodes)
        _once("from:" + key[0], logging.INFO,
              "topology from %s: %d packages, %d cores, %d cpus, %d NUMA nodes", key[1],
              len(topo.packages), len({(c.package, c.core) for c in topo.cpus}),
              len(topo.cpus), len(topo.nodes))
    return Topology(cpus=list(_cache[key]), nodes=list(_cache_nodes[key]))


def _check_online(topo: Topology, root: str, xml_path: str) -> None:
    """An XML file may describe another machine: say so once, since every
    slice on a cpu this one lacks would fail later, far from the cause."""
    online = _read(os.path.join(root, "sys/devices/system/cpu/online"))
    if not online:
        return
    have = set(parse_cpulist(online))
    described = {c.id for c in topo.cpus}
    if described != have:
        _once("mismatch", logging.WARNING,
              "topology XML %s describes cpus %s; this machine has %s online",
              xml_path, format_cpulist(described), format_cpulist(have))


def read_topology(root: str = "/") -> Topology:
    """The node's topology from the configured source (sysfs by default)."""
    with _lock:
        source, xml_path = _config["source"], _config["xml"]
        if xml_path:
            topo = _cached(("xml", xml_path), lambda: read_hwloc_xml(xml_path))
            _check_online(topo, root, xml_path)
            return topo
        real_root = os.path.realpath(root) == "/"
        if source == "sysfs" or (source == "auto" and not real_root):
            return read_sysfs_topology(root)
        if not real_root:
            raise TopologyError(f"--topology hwloc describes this machine; it cannot read "
                                f"the tree under {root} (use sysfs or --topology-xml)")
        lstopo = find_lstopo()
        if lstopo is None:
            if source == "hwloc":
                raise TopologyError("--topology hwloc: hwloc is not installed (no "
                                    + ", ".join(LSTOPO_NAMES) + " in PATH)")
            _once("missing", logging.INFO,
                  "hwloc not installed (no lstopo): topology from sysfs")
            return read_sysfs_topology(root)
        try:
            return _cached(("hwloc", lstopo), lambda: run_lstopo(lstopo))
        except TopologyError as e:
            if source == "hwloc":
                raise
            _once("failed", logging.WARNING, "hwloc failed (%s): topology from sysfs", e)
            return read_sysfs_topology(root)
