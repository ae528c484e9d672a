"""Cores of a pool of nodes, handed to ready tasks first-fit, FIFO with backfill.

The pool is nodes x cores (QCG's ``--nodes``), not the machine: the runner
maps granted cores onto real cpus. Allocation is linear first-fit (node n0
before n1, low core ids first); a min/max range takes as many as are free.

Ready tasks wait in buckets, one per resource shape, each in arrival order.
A pass repeatedly takes, among the bucket heads whose minimum fits the free
cores, the oldest: that is FIFO with backfill (a large task at the head does
not stop a small one behind it), and costs the number of shapes per
placement, never a scan of the queue. When a head does not fit (the cores
are free but spread badly over nodes), tasks of the same shape behind it
would not fit either: the bucket is skipped for the rest of the pass.

:meth:`Scheduler.successor` answers the chaining question (the manager's
slots, docs/pilot.md "Chained iterations"): which task FIFO would hand a
busy allocation's cores to when they free, provided it is the next
iteration of the job holding them.
"""

from __future__ import annotations

from collections import deque
from typing import Deque, Dict, List, Optional, Tuple

from nrm.pilot.jobfile import Count
from nrm.pilot.model import QUEUED, Allocation, Task

#: (cores min, cores max, nodes min, nodes max); max None = as many as free.
#: nodes (0, 0): any number of nodes; cores (0, 0): whole nodes.
Shape = Tuple[int, Optional[int], int, Optional[int]]


class PoolError(ValueError):
    pass


def parse_nodes(text: str) -> List[Tuple[str, int]]:
    """``[NAME:]CORES[,...]``; unnamed nodes are n0, n1, ... by position."""
    nodes = []
    for i, part in enumerate(text.split(",")):
        name, _, cores = part.strip().rpartition(":")
        name = name or f"n{i}"
        if not cores.isdigit() or int(cores) < 1:
            raise PoolError(f"--nodes {text}: {part.strip()!r} is not [NAME:]CORES "
                            "with CORES at least 1")
        if any(name == n for n, _ in nodes):
            raise PoolError(f"--nodes {text}: node {name} is given twice")
        nodes.append((name, int(cores)))
    return nodes


#: one tuple per distinct shape, shared by every job of that shape
_SHAPES: Dict[Shape, Shape] = {}


def shape_of(cores: Optional[Count], nodes: Optional[Count]) -> Shape:
    if nodes is None:
        shape: Shape = (1, 1, 0, 0) if cores is None else (cores.lowest, cores.highest, 0, 0)
    elif cores is None:
        shape = (0, 0, nodes.lowest, nodes.highest)
    else:
        shape = (cores.lowest, cores.highest, nodes.lowest, nodes.highest)
    return _SHAPES.setdefault(shape, shape)


class Pool:
    def __init__(self, nodes: List[Tuple[str, int]], system_core: bool = False):
        if not nodes:
            raise PoolError("the pool has no nodes")
        self.names = [n for n, _ in nodes]
        self.sizes = [c for _, c in nodes]
        self.free: List[List[int]] = [list(range(c)) for c in self.sizes]
        if system_core:
            if self.sizes[0] < 2:
                raise PoolError(f"--system-core: node {self.names[0]} has one core, "
                                "none would be left for tasks")
            self.free[0].pop(0)
        self.capacity = [len(f) for f in self.free]
        self.free_total = sum(self.capacity)
        self.total = self.free_total

    @property
    def used(self) -> int:
        return self.total - self.free_total

    def fits_ever(self, shape: Shape) -> bool:
        """Whether the shape can be met by the whole pool, all free."""
        cmin, _, nmin, _ = shape
        if nmin == 0:
            return cmin <= self.total
        if cmin == 0:
            return nmin <= len(self.sizes)
        return sum(1 for c in self.capacity if c >= cmin) >= nmin

    def min_cores(self, shape: Shape) -> int:
        cmin, _, nmin, _ = shape
        return cmin if nmin == 0 else max(1, cmin) * nmin

    def allocate(self, shape: Shape) -> Optional[Allocation]:
        cmin, cmax, nmin, nmax = shape
        if self.free_total < self.min_cores(shape):
            return None
        if nmin == 0:
            want = self.free_total if cmax is None else min(cmax, self.free_total)
            parts = []
            for i, free in enumerate(self.free):
                if want == 0:
                    break
                if free:
                    take = free[:want]
                    del free[:len(take)]
                    want -= len(take)
                    parts.append((self.names[i], take))
            alloc = Allocation(parts)
        else:
            chosen = []
            for i, free in enumerate(self.free):
                if nmax is not None and len(chosen) == nmax:
                    break
                if cmin == 0:
                    if free and len(free) == self.capacity[i]:
                        chosen.append((i, len(free)))
                elif len(free) >= cmin:
                    chosen.append((i, len(free) if cmax is None else min(cmax, len(free))))
            if len(chosen) < nmin:
                return None
            parts = []
            for i, n in chosen:
                take = self.free[i][:n]
                del self.free[i][:n]
                parts.append((self.names[i], take))
            alloc = Allocation(parts)
        self.free_total -= alloc.ncores
        return alloc

    def claim(self, alloc: Allocation) -> None:
        """Hold cores granted before a restart (a task still running): the
        ones this pool has and are free."""
        for name, cores in alloc.parts:
            if name not in self.names:
                continue
            free = self.free[self.names.index(name)]
            for core in cores:
                if core in free:
                    free.remove(core)
                    self.free_total -= 1

    def release(self, alloc: Allocation) -> None:
        index = {n: i for i, n in enumerate(self.names)} if len(self.names) > 1 else None
        for name, cores in alloc.parts:
            free = self.free[index[name] if index else 0]
            free.extend(cores)
            free.sort()
            self.free_total += len(cores)


class Scheduler:
    """Ready tasks -> placements. Cancelled tasks are dropped lazily."""

    def __init__(self, pool: Pool):
        self.pool = pool
        self.buckets: Dict[Shape, Deque[Task]] = {}
        self.queued = 0

    def push(self, task: Task) -> None:
        shape = task.shape or shape_of(task.cores, task.nodes)
        bucket = self.buckets.get(shape)
        if bucket is None:
            bucket = self.buckets[shape] = deque()
        bucket.append(task)
        self.queued += 1

    def _head(self, bucket: Deque[Task]) -> Optional[Task]:
        while bucket and bucket[0].state != QUEUED:
            bucket.popleft()
            self.queued -= 1
        return bucket[0] if bucket else None

    def successor(self, job, shape: Shape, ncores: int) -> Optional[Task]:
        """Taken from the queue: the next queued task of ``job`` (of
        ``shape``, exactly ``ncores`` cores), if it is the task FIFO would
        give ``ncores`` cores that free up now: no task queued before it
        (older, of any shape) needs at most those cores plus the free ones.
        None otherwise (nothing is taken)."""
        bucket = self.buckets.get(shape)
        head = self._head(bucket) if bucket else None
        if head is None or head.job is not job:
            return None
        room = self.pool.free_total + ncores
        for other_shape, other in self.buckets.items():
            if other is bucket:
                continue
            first = self._head(other)
            if first is not None and first.seq < head.seq \
                    and self.pool.min_cores(other_shape) <= room:
                return None
        bucket.popleft()
        self.queued -= 1
        return head

    def schedule(self) -> List[Tuple[Task, Allocation]]:
        placed: List[Tuple[Task, Allocation]] = []
        blocked = set()
        pool = self.pool
        while pool.free_total > 0 and self.queued > 0:
            best: Optional[Tuple[Shape, Task]] = None
            for shape, bucket in self.buckets.items():
                while bucket and bucket[0].state != QUEUED:
                    bucket.popleft()
                    self.queued -= 1
                if not bucket or shape in blocked or pool.min_cores(shape) > pool.free_total:
                    continue
                if best is None or bucket[0].seq < best[1].seq:
                    best = (shape, bucket[0])
            if best is None:
                break
            shape, task = best
            alloc = pool.allocate(shape)
            if alloc is None:
                blocked.add(shape)
                continue
            self.buckets[shape].popleft()
            self.queued -= 1
            placed.append((task, alloc))
        for shape in [s for s, b in self.buckets.items() if not b]:
            del self.buckets[shape]
        return placed
