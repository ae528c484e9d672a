"""The emulated node's in-wait throttling actuator: the ranks' counter files.

On real hardware the PMPI interposer throttles a waiting rank's core itself
(MSR 0x19A through msr-safe, libnrm/src/inwait.h). The emulated node has no
actuator that fine (its CPU bandwidth period is 16 ms), so instead the
interposer counts, per thread, the cpu time and the wall time it spent
throttled, in a file ``<dir>/<pid>`` that the emulated platform reads at
every model step and bills at the power of the container's in-wait setting
(its level, and its frequency when the setting drops it): the thread only
polls then, so its speed does not matter, only the power it draws.

File format (written by inwait.h, little-endian): 16 bytes of header
(``NRMIW001`` and the slot size, 48), then one slot per thread of six
64-bit words: tid, level, throttled cpu ns, throttled wall ns, throttled
waits, and a check word (the xor of the others and a constant) that lets a
read drop a slot torn by a concurrent write.

What a thread is billed for its throttled part is ``min(cpu, wall * L /
16)``: at level L a polling core runs L/16 of the wall time, and a thread
that blocked or was preempted ran less than that. The rest of the cpu time
(``discount``) is not billed. The files are written by the ranks
themselves, so the platform trusts them only as far as it can check: only
files of the container's own processes (the daemon names the directory
and the pids), only tids that are threads of that process, and never more
than the thread's own measured cpu time in the period.
"""

from __future__ import annotations

import os
import stat
import struct
from typing import Dict, NamedTuple, Optional

MAGIC = b"NRMIW001"
HEADER = 16
SLOT = 48
MAX_SLOTS = 1024
CHECK = 0x6E726D2D69770A01
_SLOT = struct.Struct("<6Q")


class Counters(NamedTuple):
    """One thread's cumulative throttled time, as its rank reported it."""

    level: int
    cpu_ns: int
    wall_ns: int
    waits: int


def parse(data: bytes) -> Dict[int, Counters]:
    """The slots of a counter file's bytes, by tid; torn or foreign slots are left out."""
    if len(data) < HEADER or data[:8] != MAGIC or struct.unpack("<Q", data[8:16])[0] != SLOT:
        return {}
    out: Dict[int, Counters] = {}
    end = min(len(data), HEADER + MAX_SLOTS * SLOT)
    for off in range(HEADER, end - SLOT + 1, SLOT):
        tid, level, cpu_ns, wall_ns, waits, check = _SLOT.unpack_from(data, off)
        if tid == 0 or check != tid ^ level ^ cpu_ns ^ wall_ns ^ waits ^ CHECK:
            continue
        if not 1 <= level <= 16:
            continue
        out[tid] = Counters(level, cpu_ns, wall_ns, waits)
    return out


def read(path: str) -> Dict[int, Counters]:
    """A counter file's slots; {} when it is missing, not a regular file, or malformed.

    The path is in a directory the rank can write to, so it is opened
    without following links and without blocking (a FIFO planted there
    must not hang the sensor thread), and read only up to its largest size.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return {}
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return {}
        return parse(os.pread(fd, HEADER + MAX_SLOTS * SLOT, 0))
    except OSError:
        return {}
    finally:
        os.close(fd)


def discount_ns(cpu_ns: int, wall_ns: int, level: int, levels: int = 16,
                rate: Optional[float] = None) -> int:
    """The part of ``cpu_ns`` throttled cpu time not to bill.

    At level L a polling core runs L/levels of the wall time; a thread that
    ran less than that in the window (it blocked, or was preempted) is
    billed what it ran. ``rate`` replaces L/levels when the in-wait
    setting also drops the frequency: the cpu ns billed per wall ns that
    give the throttled setting's power at the cpu's billing (the emulated
    node's ``inwait_rate``).
    """
    if cpu_ns <= 0:
        return 0
    per_wall = level / levels if rate is None else max(0.0, rate)
    billed = min(float(cpu_ns), max(0.0, float(wall_ns)) * per_wall)
    return int(cpu_ns - billed)


class ThreadLedger:
    """Per-thread counter state between model steps: the last counters seen
    and a discount not yet applied (a wait's time arrives at its exit, in
    one piece; what does not fit the thread's run time of this period is
    carried into the next one only)."""

    def __init__(self) -> None:
        self.last: Dict[int, Counters] = {}
        self.carry: Dict[int, int] = {}

    def discount(self, tid: int, counters: Optional[Counters], run_ns: int,
                 level: int, rate: Optional[float] = None) -> int:
        """Cpu ns of ``tid``'s ``run_ns`` (this period) not to bill, with its
        throttled time priced at ``level`` (the container's), or at ``rate``
        (``discount_ns``) when given."""
        carried = self.carry.pop(tid, 0)
        new = 0
        if counters is not None:
            prev = self.last.get(tid)
            self.last[tid] = counters
            # A thread seen for the first time only sets the baseline, as
            # its run time does; counters that went back are a new writer.
            if prev is not None and counters.cpu_ns >= prev.cpu_ns \
                    and counters.wall_ns >= prev.wall_ns:
                new = discount_ns(counters.cpu_ns - prev.cpu_ns,
                                  counters.wall_ns - prev.wall_ns, level, rate=rate)
        run_ns = max(0, run_ns)
        from_carry = min(carried, run_ns)
        from_new = min(new, run_ns - from_carry)
        if new > from_new:
            self.carry[tid] = new - from_new
        return from_carry + from_new

    def forget(self, alive) -> None:
        """Drop threads not in ``alive``."""
        for tid in [t for t in self.last if t not in alive]:
            del self.last[tid]
        for tid in [t for t in self.carry if t not in alive]:
            del self.carry[tid]
