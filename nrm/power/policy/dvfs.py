"""Per-core dynamic voltage and frequency scaling (DVFS): one cpu, one phase.

Assumption: the compute part of a phase scales inversely with the core
frequency. That holds for compute-bound code; memory-bound code slows down
less than predicted when the clock drops, so for it the rule picks a
frequency higher than necessary. The error is on the safe side (less energy
saved, no added delay).
"""

from __future__ import annotations

import bisect
import math
from typing import Iterable, Sequence

DEFAULT_HYSTERESIS = 0.05
"""Relative change below which a down move is not worth a frequency transition."""

DEFAULT_MARGIN = 0.05
"""Slack kept after a down move so that a cpu just slowed is not taken for the critical path."""


def _finite(*values: float) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def frequency_grid(available_hz: Iterable[float]) -> list[float]:
    """Sort and deduplicate once so that rounding is a bisection and the maximum is ``[-1]``."""
    grid = sorted({float(f) for f in available_hz if _finite(f) and f > 0})
    if not grid:
        raise ValueError("available frequencies must contain at least one positive value")
    return grid


def round_up(hz: float, grid: Sequence[float]) -> float:
    """Smallest available frequency >= ``hz``; the maximum when none is high enough."""
    i = bisect.bisect_left(grid, hz)
    return grid[i] if i < len(grid) else grid[-1]


def step_up(hz: float, grid: Sequence[float]) -> float:
    """Next available frequency strictly above ``hz``; the maximum when there is none."""
    i = bisect.bisect_right(grid, hz)
    return grid[i] if i < len(grid) else grid[-1]


def next_frequency(
    compute_s: float,
    total_s: float,
    current_hz: float,
    available_hz: Iterable[float],
    hysteresis: float = DEFAULT_HYSTERESIS,
    margin: float = DEFAULT_MARGIN,
) -> float:
    """Return the frequency (Hz) for the next phase of one cpu; always an available one.

    ``needed = current * c / t`` would have finished the compute exactly at
    the barrier. A cpu exactly on time has no wait and looks like the critical
    path, so the target keeps ``margin`` of the phase as slack:
    ``want = needed / (1 - margin)``, rounded UP to an available frequency
    (never below the minimum available).

    * A cpu that waited less than ``margin / 2`` of the phase is on the
      critical path: it goes one available step up at once (never delayed).
    * Otherwise it only goes down, and only when the drop is at least
      ``hysteresis * current``; smaller changes keep the current frequency.

    Edge cases: an unknown current frequency (non-positive or non-finite)
    returns the maximum; a current frequency off the grid is first rounded up
    onto it; ``t <= 0`` or non-finite times keep the (rounded) current
    frequency; ``c > t`` is read as ``c = t`` and ``c < 0`` as ``0``.
    """
    grid = frequency_grid(available_hz)
    if not _finite(hysteresis, margin) or hysteresis < 0 or not 0 <= margin < 1:
        raise ValueError("hysteresis must be >= 0 and margin within [0, 1)")
    if not _finite(current_hz) or current_hz <= 0:
        return grid[-1]
    here = round_up(current_hz, grid)
    if not _finite(compute_s, total_s) or total_s <= 0:
        return here

    work = min(max(compute_s / total_s, 0.0), 1.0)
    if 1.0 - work < margin / 2:
        return step_up(current_hz, grid)
    needed = current_hz * work
    candidate = min(round_up(needed / (1.0 - margin), grid), here)
    if here - candidate < hysteresis * here:
        return here
    return candidate
