"""Slice allocation: which cpus and NUMA memory nodes a container gets.

Cpus are exclusive: a container owns its cpus until it ends, unless its
request asks to oversubscribe. Memory nodes are chosen for locality (the
nodes of the chosen cpus first) and may be shared: a node's memory cannot be
split finer than the node, and making nodes exclusive would let a one-node
machine run a single container. This is documented in docs/manifest.md.

First fit with locality: a request that fits inside one NUMA node takes cpus
from the node with the fewest free cpus that still fits (keeping big holes
for big requests), and within a node whole cores before splitting one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

from nrm.hw.topology import Topology


class SliceError(ValueError):
    """The request can never fit, or does not fit now (``busy``)."""

    def __init__(self, message: str, busy: bool = False):
        super().__init__(message)
        self.busy = busy


@dataclass(frozen=True)
class Slice:
    cpus: tuple
    mems: tuple
    shared: bool = False

    def to_dict(self) -> dict:
        return {"cpus": list(self.cpus), "mems": list(self.mems), "shared": self.shared}


class ResourceManager:
    """Owns the node's cpus and NUMA nodes: which container holds which, and
    the allocation rule that hands them out."""

    def __init__(self, topology: Topology):
        self.topology = topology
        self._owner: Dict[int, str] = {}          # exclusive cpu -> container
        self._shared_load: Dict[int, int] = {c.id: 0 for c in topology.cpus}
        # the topology is read once: what every allocation asks of it is
        # derived here, not per launch (a scan of every cpu, several times,
        # for each 1-cpu slice of a 100-cpu node)
        self._cpu_ids = [c.id for c in topology.cpus]
        self._cpu_set = frozenset(self._cpu_ids)
        self._core_of = {c.id: (c.package, c.core) for c in topology.cpus}
        self._node_of = {c.id: c.node for c in topology.cpus}

    @property
    def free_cpus(self) -> List[int]:
        owner = self._owner
        return [c for c in self._cpu_ids if c not in owner]

    def allocate(self, owner: str, ncpus: int, nmems: int, oversubscribe: bool = False,
                 allowed: Optional[List[int]] = None) -> Slice:
        """``allowed`` confines the slice (a batch scheduler's allocation)."""
        total = len(self._cpu_ids)
        if allowed is not None:
            allowed_set = set(allowed) & self._cpu_set
            if ncpus > len(allowed_set):
                raise SliceError(f"slice asks for {ncpus} cpus; the allocation has "
                                 f"{len(allowed_set)} on this node")
        else:
            allowed_set = None
        if ncpus > total:
            raise SliceError(f"slice asks for {ncpus} cpus; this node has {total}")
        if nmems > len(self.topology.nodes):
            raise SliceError(f"slice asks for {nmems} memory nodes; this node has "
                             f"{len(self.topology.nodes)}")
        if oversubscribe:
            cpus = self._least_loaded(ncpus, allowed_set)
            for c in cpus:
                self._shared_load[c] += 1
            return Slice(tuple(cpus), self.mems_for(cpus, nmems), shared=True)
        cpus = self._first_fit(ncpus, allowed_set)
        if cpus is None:
            free = [c for c in self.free_cpus if allowed_set is None or c in allowed_set]
            scope = total if allowed_set is None else len(allowed_set)
            raise SliceError(
                f"slice of {ncpus} cpus does not fit now: {len(free)} of "
                f"{scope} cpus free", busy=True)
        for c in cpus:
            self._owner[c] = owner
        return Slice(tuple(cpus), self.mems_for(cpus, nmems))

    def release(self, owner: str, slice_: Slice) -> None:
        for c in slice_.cpus:
            if slice_.shared:
                self._shared_load[c] = max(0, self._shared_load[c] - 1)
            elif self._owner.get(c) == owner:
                del self._owner[c]

    def hand_over(self, owner: str, heir: str, slice_: Slice) -> None:
        """The cpus of ``owner``'s slice become ``heir``'s without ever
        being free (see Promise in nrm/containers/model.py)."""
        for c in slice_.cpus:
            if self._owner.get(c) == owner:
                self._owner[c] = heir

    def _first_fit(self, ncpus: int, allowed=None) -> Optional[List[int]]:
        owner = self._owner
        if allowed is not None:         # a subset of the node's cpus
            free = {c for c in allowed if c not in owner}
        else:
            free = set(self.free_cpus)
        if len(free) < ncpus:
            return None
        # each node's free cpus in ascending order, as cpus_of_node lists them
        by_node: Dict[int, List[int]] = {}
        node_of = self._node_of
        for c in sorted(free):
            by_node.setdefault(node_of[c], []).append(c)
        nodes = []
        for node in self.topology.nodes:
            node_free = by_node.get(node, [])
            if len(node_free) >= ncpus:
                nodes.append((len(node_free), node, node_free))
        if nodes:
            _, _, candidates = min(nodes)
            return self._by_core(candidates, ncpus)
        return self._by_core(sorted(free), ncpus)

    def _by_core(self, candidates: List[int], ncpus: int) -> List[int]:
        """Prefer filling whole free cores so siblings are not split."""
        by_core: Dict[tuple, List[int]] = {}
        core_of = self._core_of
        for c in candidates:
            by_core.setdefault(core_of[c], []).append(c)
        groups = sorted(by_core.values(), key=lambda g: (-len(g), g[0]))
        chosen: List[int] = []
        for group in groups:
            if len(chosen) + len(group) <= ncpus:
                chosen.extend(group)
        for group in groups:
            for c in group:
                if len(chosen) < ncpus and c not in chosen:
                    chosen.append(c)
        return sorted(chosen)

    def _least_loaded(self, ncpus: int, allowed=None) -> List[int]:
        def load(c):
            return (self._shared_load[c] + (1 if c in self._owner else 0), c)
        pool = [c for c in self._shared_load if allowed is None or c in allowed]
        return sorted(sorted(pool, key=load)[:ncpus])

    def mems_for(self, cpus: List[int], nmems: int) -> tuple:
        local = []
        node_of = self._node_of
        for c in cpus:
            node = node_of[c]
            if node not in local:
                local.append(node)
        mems = local[:max(nmems, 1)] if len(local) >= nmems else local
        for node in self.topology.nodes:
            if len(mems) >= nmems:
                break
            if node not in mems:
                mems.append(node)
        return tuple(sorted(mems))

    def describe(self) -> dict:
        return {"cpus": len(self.topology.cpus), "free_cpus": self.free_cpus,
                "nodes": self.topology.nodes}
