"""The slowdown budget: how far a rank's compute may be slowed, and whether slowing it pays.

Pure functions; ``ContainerPolicy`` counts the critical episodes they read.

Why a budget: a rank slowed to speed ``s`` that becomes the critical one
runs that phase at ``s`` before anyone can know (no causal rule sees a
shift coming), and keeps running slow until the raise lands: ``window``
phases in all (the aggregation plus the daemon's lag). One such event costs
about ``window * (1/s - 1)`` phases of run time. With events at a rate of
``p`` per phase the expected loss is ``p * window * (1/s - 1)`` of the run,
so keeping it under ``budget`` bounds the depth:

    1/s - 1 <= budget / (p * window)

``p`` is estimated per cpu by the rule of succession, ``(k + 1) / (n + 1)``
for ``k`` episodes of that cpu being the critical rank in ``n`` phases: a
rank never seen critical is slowed gradually as the evidence grows (after
``n`` quiet phases, by ``budget * (n + 1) / window``), one seen critical
every 15 phases hardly at all. The guarantee is per event: each costs at
most ``budget`` times the phases that earned it.

Why an expected cost on top: within the budget a slower setting is chosen
only if what it saves per phase exceeds what it risks, ``p * window *
(1/s - 1)`` phases of the whole container's power. With in-wait throttling
(``inwait.py``) the wait is already nearly free, so slowing the compute by
the duty cycle saves only ``level/16`` of the dynamic power over the
shortened wait (duty cycling keeps the energy per unit of work constant):
DDCM then throttles the compute only after a long quiet record, while a
lower frequency (cheaper per unit of work) pays much sooner.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

BUDGET = 0.01
"""The daemon's slowdown budget: the expected fraction of run time lost to shifts."""

STATIC_PER_CPU = 1.0
"""Package static power per cpu, in units of one busy cpu's dynamic power at fmax.

The emulated node: 20 W idle for 2 cpus of 10 W (nrm.hw.emulated). It prices
a late phase: the package burns its static power while the others wait.
"""


@dataclass(frozen=True)
class Risk:
    """What a cpu's choice weighs beyond its need (one cpu, one gate firing)."""

    floor: float = 0.0
    """The slowest compute speed (fraction of full) the slowdown budget allows."""
    rate: float = 0.0
    """Estimated episodes per phase in which this cpu becomes the critical rank."""
    window: int = 1
    """Phases a late rank runs at its old speed before a raise lands."""
    lateness: float = 0.0
    """Power burnt while the container waits for a late rank, in busy-cpu units."""
    wait_level: Optional[int] = None
    """The in-wait throttle's duty-cycle level (inwait.py), None when waits are not throttled."""


def change_rate(episodes: int, phases: int) -> float:
    """Critical episodes per phase of one cpu, by the rule of succession: ``(k+1)/(n+1)``."""
    return (max(episodes, 0) + 1) / (max(phases, 0) + 1)


def speed_floor(rate: float, window: int, budget: Optional[float]) -> float:
    """The slowest speed whose expected loss ``rate * window * (1/s - 1)`` fits ``budget``.

    0 (no bound) without a budget or without risk; 1 (full speed) with a
    budget of 0.
    """
    if budget is None or rate <= 0 or window <= 0:
        return 0.0
    if budget <= 0:
        return 1.0
    return 1.0 / (1.0 + budget / (rate * window))


def lateness_power(ranks: int, wait_level: Optional[int], levels: int) -> float:
    """What a phase of lateness costs, in busy-cpu units: static power and the others' waits.

    Each of ``ranks`` cpus carries ``STATIC_PER_CPU``; the ``ranks - 1``
    others wait at full power, or at ``wait_level`` when waits are throttled.
    """
    ranks = max(ranks, 1)
    waiting = 1.0 if wait_level is None else wait_level / levels
    return ranks * STATIC_PER_CPU + (ranks - 1) * waiting
