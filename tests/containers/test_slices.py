"""The slice allocation rule (nrm/containers/slices.py) on made-up
topologies: locality first, whole cores before split ones, confinement to
an allowed set, and the busy and no-fit errors."""

import pytest

from nrm.containers.slices import ResourceManager, SliceError
from nrm.hw.topology import Cpu, Topology


def two_nodes() -> Topology:
    """2 NUMA nodes of 2 cores x 2 threads; sibling ids are 4 apart, as
    Linux numbers them, and ids are not contiguous across the nodes."""
    cpus = []
    for node, base in ((0, 0), (1, 10)):
        for core in range(2):
            for thread in range(2):
                cpus.append(Cpu(id=base + core + 4 * thread, core=core, package=node, node=node))
    return Topology(cpus)


@pytest.mark.parametrize("held, ncpus, allowed, expected", [
    ([], 2, None, (0, 4)),                 # a whole core of the first node
    ([], 4, None, (0, 1, 4, 5)),           # a whole node
    ([(0,)], 1, None, (4,)),               # the sibling of a busy cpu: whole cores stay free
    ([(0,)], 3, None, (1, 4, 5)),          # fewest free cpus that fit: node 0
    ([(0,), (10,)], 2, None, (1, 5)),      # a whole core before two halves
    ([(0, 1, 4)], 2, None, (10, 14)),      # node 0 has one free cpu: node 1
    ([], 1, [11, 15], (11,)),              # confined to the allowed cpus
    ([(11,)], 1, [11, 15], (15,)),
    ([], 2, [5, 10, 99], (5, 10)),         # across nodes when no node holds both
])
def test_allocation_rule(held, ncpus, allowed, expected):
    rm = ResourceManager(two_nodes())
    for i, cpus in enumerate(held):
        s = rm.allocate(f"h{i}", len(cpus), 1, allowed=list(cpus))
        assert s.cpus == cpus
    s = rm.allocate("x", ncpus, 1, allowed=allowed)
    assert s.cpus == expected
    assert s.mems == (0 if expected[0] < 10 else 1,)     # one node asked: the first cpu's
    rm.release("x", s)
    assert "x" not in rm._owner.values()


def test_busy_and_no_fit_are_told_apart():
    rm = ResourceManager(two_nodes())
    rm.allocate("a", 1, 1, allowed=[15])
    with pytest.raises(SliceError) as busy:
        rm.allocate("b", 1, 1, allowed=[15])
    assert busy.value.busy and "0 of 1 cpus free" in str(busy.value)
    with pytest.raises(SliceError) as never:
        rm.allocate("c", 2, 1, allowed=[15, 99])
    assert not never.value.busy and "the allocation has 1 on this node" in str(never.value)
    with pytest.raises(SliceError) as too_big:
        rm.allocate("d", 9, 1)
    assert not too_big.value.busy
    assert rm.free_cpus == [0, 1, 4, 5, 10, 11, 14]
