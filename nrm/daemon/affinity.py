"""Where nrmd's own threads run: on the cpus the ranks can spare.

Why: on a node where every cpu runs a rank, each millisecond nrmd spends
on the cpu of the critical rank (the last to reach each collective) is a
millisecond lost by the whole program, and on the cpu of a rank that
waits it costs nothing. Measured on the emulated node, with a busy loop
beside each rank: COUNTDOWN, which changes no cpu's speed there, cost
about 3 % with nrmd pinned to the critical rank's cpu and about 0 %
pinned to the other one (docs/performance.md, "Foreign load").

The ranks' phase reports say which cpu waits, and for how much of each
phase: nrmd moves its threads to the cpu that waits most, keeps them
there while it still waits about as much as the best, and gives them
every cpu again when no report is recent. Cpus that no container uses
come first: nothing critical runs there. An admin who keeps cpus for
system daemons names them (``nrmd --daemon-cpus 0-1``) and nrmd stays on
them; ``--daemon-cpus all`` leaves the threads where the kernel puts them.

``choose`` is the rule, a pure function; ``DaemonAffinity`` feeds it and
applies its answer to every thread of this process.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable, Dict, FrozenSet, Iterable, Optional, Tuple

from nrm.containers.model import Container, ContainerListener
from nrm.hw.topology import format_cpulist, parse_cpulist

log = logging.getLogger(__name__)

#: a cpu must wait at least this fraction of its phases to attract nrmd
LEAST_WAIT = 0.05
#: stay on the current cpu while it waits within this of the best one
HYSTERESIS = 0.05
#: weight of the newest report in a cpu's wait fraction
ALPHA = 0.3
#: seconds after which a cpu's reports no longer count
STALE_S = 2.0
#: seconds between two looks at the reports
PERIOD_S = 0.5

Cpus = FrozenSet[int]


def choose(waits: Dict[int, float], current: Cpus, allowed: Cpus, busy: Cpus) -> Cpus:
    """The cpus nrmd's threads should run on.

    ``waits``: recent wait fraction of each reporting cpu; ``current``: the
    cpus they run on now; ``allowed``: the cpus nrmd may use at all (its
    mask at start); ``busy``: the cpus of running containers. Without any
    report nothing is known of anyone's slack and nrmd stays on every cpu:
    work that does not report (most tasks of a pilot) never moves it."""
    waits = {c: w for c, w in waits.items() if c in allowed}
    if not waits:
        return allowed
    idle = allowed - busy
    if idle:
        return idle
    best = min(waits, key=lambda c: (-waits[c], c))
    if waits[best] < LEAST_WAIT:
        return allowed
    if len(current) == 1:
        (here,) = current
        if here in waits and waits[here] >= waits[best] - HYSTERESIS:
            return current
    return frozenset({best})


def parse_daemon_cpus(text: str) -> Optional[Cpus]:
    """``--daemon-cpus``: "follow" (None: follow the ranks' slack), "all"
    (the empty set: never move), or a cpu list. ValueError says why not."""
    if text in ("follow", "all"):
        return None if text == "follow" else frozenset()
    try:
        cpus = frozenset(parse_cpulist(text))
    except ValueError:
        raise ValueError(f"--daemon-cpus {text!r}: want follow, all or a cpu list "
                         "such as 0-1,4") from None
    if not cpus:
        raise ValueError(f"--daemon-cpus {text!r}: no cpu in the list")
    return cpus


def set_own_affinity(cpus: Iterable[int]) -> int:
    """Every thread of this process onto ``cpus``; the number moved.
    Threads that ended meanwhile are skipped; threads started later
    inherit their creator's mask. OSError when the calling thread could
    not be moved (a cpu offline or outside nrmd's cpuset)."""
    moved = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
            moved += 1
        except ProcessLookupError:
            continue
        except OSError:
            if int(tid) == threading.get_native_id():
                raise
    return moved


class DaemonAffinity(ContainerListener):
    """Follows the ranks' wait per cpu and moves nrmd's threads (module doc)."""

    def __init__(self, loop, fixed: Optional[Cpus] = None,
                 apply: Callable[[Cpus], int] = set_own_affinity,
                 clock: Callable[[], float] = time.monotonic,
                 allowed: Optional[Cpus] = None):
        self.loop = loop
        self.apply = apply
        self.clock = clock
        self.allowed: Cpus = allowed or frozenset(os.sched_getaffinity(0))
        self.following = fixed is None
        self.mode = "follow" if fixed is None else "fixed" if fixed else "all"
        self.current: Cpus = self.allowed
        self.moves = 0
        self.moved_to: Dict[int, int] = {}     # single cpus followed, and how often
        self._waits: Dict[int, Tuple[float, float]] = {}    # cpu -> (fraction, last seen)
        self._containers: Dict[str, Cpus] = {}
        self._timer = None
        self._warned = False
        if fixed:
            self._move(fixed)

    # -- inputs -----------------------------------------------------------
    def on_phase(self, cpu: int, compute_ns: int, total_ns: int) -> None:
        """One phase report (hot path: a few arithmetic operations). The
        first report starts the periodic look; without reports there is
        no timer at all."""
        if not self.following or total_ns <= 0:
            return
        wait = max(0.0, min(1.0, (total_ns - compute_ns) / total_ns))
        old = self._waits.get(cpu)
        self._waits[cpu] = (wait if old is None else old[0] + ALPHA * (wait - old[0]),
                            self.clock())
        if self._timer is None:
            self._timer = self.loop.call_later(PERIOD_S, self.tick)

    def container_started(self, container: Container) -> None:
        if self.following:
            self._containers[container.id] = frozenset(container.slice.cpus)

    def container_ended(self, container: Container) -> Optional[dict]:
        cpus = self._containers.pop(container.id, None)
        if cpus is None:
            return None
        reported = [cpu for cpu in cpus if self._waits.pop(cpu, None) is not None]
        if reported and self.current != self.allowed:
            self._schedule_now()    # its ranks are gone, and their slack with them
        return None

    # -- decision ---------------------------------------------------------
    def waits(self) -> Dict[int, float]:
        """The recent wait fraction per cpu; stale ones are forgotten."""
        now = self.clock()
        for cpu in [c for c, (_, seen) in self._waits.items() if now - seen > STALE_S]:
            del self._waits[cpu]
        return {c: w for c, (w, _) in self._waits.items()}

    def tick(self) -> None:
        self._timer = None
        busy = frozenset().union(*self._containers.values())
        waits = self.waits()
        target = choose(waits, self.current, self.allowed, busy)
        if target != self.current:
            self._move(target)
        if waits or self.current != self.allowed:
            self._timer = self.loop.call_later(PERIOD_S, self.tick)

    def _schedule_now(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(0.0, self.tick)

    def _move(self, cpus: Cpus) -> None:
        try:
            self.apply(cpus)
        except OSError as exc:      # never stop the daemon over where it runs
            (log.debug if self._warned else log.warning)(
                "cannot move nrmd's threads to cpus %s: %s", format_cpulist(cpus), exc)
            self._warned = True
            return
        self.current = cpus
        self.moves += 1
        if len(cpus) == 1 and cpus != self.allowed:
            (cpu,) = cpus
            self.moved_to[cpu] = self.moved_to.get(cpu, 0) + 1
        log.debug("nrmd's threads on cpus %s", format_cpulist(cpus))

    def close(self) -> None:
        self.following = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def state(self) -> dict:
        return {"mode": self.mode,
                "cpus": format_cpulist(self.current), "moves": self.moves,
                "moved_to": {str(c): n for c, n in sorted(self.moved_to.items())}}
