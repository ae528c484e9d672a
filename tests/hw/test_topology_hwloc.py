"""Topology from hwloc's XML, checked against sysfs and against topologies
that real hwloc synthesizes (`lstopo --input "pack:2 numa:2 core:4 pu:2"`),
so the parser is tested on what hwloc really writes, not on hand-made XML."""

import json
import logging
import os
import shutil
import subprocess

import pytest

from nrm.hw import topology
from nrm.hw.topology import (TopologyError, parse_hwloc_bitmap, parse_hwloc_xml,
                             read_hwloc_xml, read_sysfs_topology, read_topology)
from nrm.containers.slices import ResourceManager
from tests.nrmd import DaemonProcess

LSTOPO = topology.find_lstopo()
needs_hwloc = pytest.mark.skipif(LSTOPO is None, reason="hwloc not installed (no lstopo)")


@pytest.fixture(autouse=True)
def library_default():
    """Each test starts from, and leaves, the library default (sysfs)."""
    topology.configure("sysfs")
    yield
    topology.configure("sysfs")


def synthetic(description: str) -> bytes:
    return subprocess.run([LSTOPO, "--input", description, "--of", "xml", "-"],
                          capture_output=True, check=True, timeout=60).stdout


@needs_hwloc
def test_this_machine_from_hwloc_equals_sysfs():
    hw = topology.run_lstopo(LSTOPO)
    assert hw.to_dict() == read_sysfs_topology("/").to_dict()
    assert hw.cpus                   # not two empty answers


@needs_hwloc
def test_nrmd_default_asks_hwloc_on_the_real_machine(caplog):
    topology.configure("auto")
    with caplog.at_level(logging.INFO, logger="nrm.hw.topology"):
        first = read_topology("/")
        second = read_topology("/")
    assert first.to_dict() == second.to_dict() == read_sysfs_topology("/").to_dict()
    assert first is not second and first.cpus is not second.cpus
    lines = [r.getMessage() for r in caplog.records]
    # read twice, hwloc run and reported once
    assert len(lines) == 1 and lines[0].startswith(f"topology from {LSTOPO}:"), lines


@pytest.mark.parametrize("description, packages, nodes, cores, pus", [
    # description, then what hwloc builds: packages, NUMA nodes in all,
    # cores per package, logical cpus per core
    ("pack:2 numa:2 core:4 pu:2", 2, 4, 8, 2),
    ("pack:1 core:2 pu:1", 1, 1, 2, 1),
    ("pack:4 core:3 pu:4", 4, 1, 3, 4),       # hwloc adds one machine-wide node
    ("numa:2 pack:1 core:3 pu:2", 2, 2, 3, 2),  # nodes above the packages
])
@needs_hwloc
def test_synthetic_topologies(description, packages, nodes, cores, pus):
    topo = parse_hwloc_xml(synthetic(description), description)
    total = packages * cores * pus
    per_node = total // nodes
    assert len(topo.cpus) == total and [c.id for c in topo.cpus] == list(range(total))
    assert topo.packages == list(range(packages))
    assert topo.nodes == list(range(nodes))
    assert len({(c.package, c.core) for c in topo.cpus}) == packages * cores
    for c in topo.cpus:
        assert c.core == c.id // pus, c                 # cpu -> core
        assert c.package == c.id // (cores * pus), c    # core -> package
        assert c.node == c.id // per_node, c            # -> NUMA node
    for node in topo.nodes:
        assert len(topo.cpus_of_node(node)) == per_node


@needs_hwloc
def test_slices_on_a_synthetic_machine_respect_locality():
    topo = parse_hwloc_xml(synthetic("pack:2 numa:2 core:4 pu:2"))
    rm = ResourceManager(topo)

    def node_of(slice_):
        return {topo.cpu(c).node for c in slice_.cpus}

    def whole_cores(slice_):
        cores = {}
        for c in slice_.cpus:
            cpu = topo.cpu(c)
            cores.setdefault((cpu.package, cpu.core), set()).add(c)
        return all(len(v) == 2 for v in cores.values())

    a = rm.allocate("a", 8, 1)               # a whole NUMA node
    assert len(node_of(a)) == 1 and a.mems == tuple(node_of(a)) and whole_cores(a)
    b = rm.allocate("b", 4, 1)               # inside one node, two whole cores
    assert len(node_of(b)) == 1 and node_of(b) != node_of(a) and whole_cores(b)
    assert b.mems == tuple(node_of(b))
    c = rm.allocate("c", 4, 1)               # fills the hole b left, not a fresh node
    assert node_of(c) == node_of(b) and whole_cores(c)
    d = rm.allocate("d", 3, 2)               # 2 memory nodes: its own node first
    assert len(node_of(d)) == 1 and node_of(d) <= set(d.mems) and len(d.mems) == 2
    rm.release("a", a)
    e = rm.allocate("e", 8, 1)
    assert node_of(e) == node_of(a)


@needs_hwloc
def test_truncated_xml_is_a_clear_error(tmp_path):
    data = synthetic("pack:2 numa:2 core:4 pu:2")
    path = tmp_path / "cut.xml"
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(TopologyError) as err:
        read_hwloc_xml(str(path))
    message = str(err.value)
    assert message.startswith(f"topology XML {path}: truncated") and "line" in message


def test_other_bad_files_are_clear_errors(tmp_path):
    cases = {
        b"<topology></topology>": "no PU",
        b"<html><object type='PU' os_index='0'/></html>": "not hwloc's <topology>",
        b"<topology><object type='PU' os_index='x'/></topology>": "PU without a valid os_index",
        b"<topology><object type='PU' os_index='0'/><object type='PU' os_index='0'/>"
        b"</topology>": "PU 0 appears twice",
        b"<topology><object type='NUMANode' os_index='0' cpuset='zz'/>"
        b"<object type='PU' os_index='0'/></topology>": "bad cpuset",
        b"<topology><object type='PU' os_index='0'></topology>": "mismatched tag",
    }
    for data, expected in cases.items():
        with pytest.raises(TopologyError, match="topology XML t.xml: .*" + expected):
            parse_hwloc_xml(data, "t.xml")
    with pytest.raises(TopologyError, match="No such file"):
        read_hwloc_xml(str(tmp_path / "absent.xml"))
    big = tmp_path / "big.xml"
    with open(big, "wb") as f:
        f.truncate(topology.MAX_XML_BYTES + 10)
    with pytest.raises(TopologyError, match="more than"):
        read_hwloc_xml(str(big))


def test_bitmaps():
    assert parse_hwloc_bitmap("0x00000003") == [0, 1]
    assert parse_hwloc_bitmap("0x00000001,0x80000000") == [31, 32]
    assert parse_hwloc_bitmap("0xf...f,0x00000004") == [2]
    assert parse_hwloc_bitmap("0x0") == []


def test_missing_hwloc_falls_back_to_sysfs_with_one_line(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("PATH", str(tmp_path))          # no lstopo anywhere
    topology.configure("auto")
    with caplog.at_level(logging.INFO, logger="nrm.hw.topology"):
        topos = [read_topology("/") for _ in range(3)]
    assert all(t.to_dict() == read_sysfs_topology("/").to_dict() for t in topos)
    assert [r.getMessage() for r in caplog.records] == [
        "hwloc not installed (no lstopo): topology from sysfs"]
    topology.configure("hwloc")
    with pytest.raises(TopologyError, match="hwloc is not installed"):
        read_topology("/")


@needs_hwloc
def test_fake_root_is_read_from_its_sysfs_not_from_hwloc(tmp_path):
    from tests.fakehw import FakeNode
    FakeNode(str(tmp_path), packages=2, cores=3, threads=1)
    topology.configure("auto")
    topo = read_topology(str(tmp_path))
    assert len(topo.cpus) == 6 and topo.packages == [0, 1]
    topology.configure("hwloc")
    with pytest.raises(TopologyError, match="cannot read the tree under"):
        read_topology(str(tmp_path))


@needs_hwloc
def test_nrmd_takes_its_topology_from_an_xml_file(tmp_path):
    xml = tmp_path / "node.xml"
    xml.write_bytes(synthetic("pack:2 numa:2 core:4 pu:2"))
    d = DaemonProcess("--hw", "emulated", "--topology-xml", str(xml)).start()
    try:
        status = json.loads(d.cli("status", "--json").stdout)
        assert status["resources"]["cpus"] == 32
        assert status["resources"]["nodes"] == [0, 1, 2, 3]
        assert d.stop() == 0, d.log()
        assert "describes cpus 0-31; this machine has" in d.log()
    finally:
        d.stop()
        shutil.rmtree(d.rundir, ignore_errors=True)


def test_nrmd_refuses_a_truncated_xml_file_clearly(tmp_path):
    xml = tmp_path / "cut.xml"
    xml.write_text('<?xml version="1.0"?>\n<topology version="2.0">\n  <object type="Machine"')
    d = DaemonProcess("--hw", "emulated", "--topology-xml", str(xml))
    with pytest.raises(RuntimeError, match="nrmd exited with 1"):
        d.start()
    log = d.log()
    assert f"topology XML {xml}: truncated" in log and "Traceback" not in log, log
    shutil.rmtree(d.rundir, ignore_errors=True)
    assert not os.path.exists(d.rundir)
