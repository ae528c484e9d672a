"""DVFS for the bulk of a slowdown, duty-cycle modulation for the remainder.

Lowering the frequency also lowers the voltage, so it saves more energy per
unit of slowdown than clock modulation; modulation is finer grained and keeps
working below the lowest available frequency. The combination therefore
chooses the frequency first and covers what is left with a duty-cycle level.

It reuses the DDCM rule's safety features, applied to the effective speed
(frequency x duty cycle) instead of the level alone: one level of relaxation,
a bounded drop per step, a hold band against noise and a proportional
speed-up on the critical path. An earlier version had none of them (5 %
margin, no hold band, unbounded drops): on a noisy node every jitter moved
it, a start-up phase could take a cpu to 1/40 of its speed in one step, and
the slowdown guard kept resetting it (+11 % run time in the imbalance demo).
"""

from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence, Tuple

from nrm.power.policy.ddcm import LEVELS, default_max_drop, level_in_range
from nrm.power.policy.dvfs import frequency_grid, round_up

_EPS = 1e-9


def _finite(*values: float) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def cover(target_hz: float, grid: Sequence[float], levels: int = LEVELS,
          relax: int = 0) -> Tuple[float, int]:
    """The lowest available frequency whose levels cover ``target_hz`` plus ``relax`` levels.

    Returns ``(frequency, level)`` with ``frequency * level / levels >=
    target_hz``: the frequency is the nearest available one at or above the
    need (raised by one step when the relaxation level would not fit under
    full duty cycle), the level the fewest that cover the rest. When even
    the maximum frequency cannot, the answer is full speed.
    """
    for hz in grid[grid.index(round_up(target_hz * (1 - _EPS), grid)):]:
        level = max(1, math.ceil(levels * target_hz / hz - _EPS) + relax)
        if level <= levels:
            return hz, level
    return grid[-1], levels


def next_setting(
    compute_s: float,
    total_s: float,
    current_hz: float,
    level: int,
    available_hz: Iterable[float],
    levels: int = LEVELS,
    max_drop: Optional[int] = None,
) -> Tuple[float, int]:
    """Return ``(frequency_hz, level)`` for the next phase of one cpu.

    The cpu ran at the effective speed ``s = f * L / levels`` (``f`` rounded
    onto the grid, as the hardware does), so ``need = s * c / t`` would have
    finished the compute exactly at the barrier.

    * Slow down to ``cover(need, relax=1)``: the nearest available frequency
      at or above the need, then the duty-cycle level for the remaining
      fraction plus one level of relaxation, as in DDCM, so that the cpu
      keeps visible slack. Only when that saves at least one level at the
      current frequency (the hold band), and never below ``(E - max_drop)
      / E`` of the current speed in one step (DDCM's 13-of-16 bound).
    * A cpu that waited less than half a level (``(c/t) * L > L - 1/2``) is
      on the critical path: its speed grows by DDCM's step at the *effective*
      level ``E = levels * s / f_max``, ``floor(16 * c/t / E)`` (at least
      one), i.e. to ``s * (E + step) / E``, mapped back onto frequency and
      level.
    * Otherwise keep the setting, so that noise does not make it jitter.

    Edge cases match the single policies: an unknown level or frequency gives
    full speed, ``t <= 0`` keeps the setting (frequency rounded onto the
    grid), ``c`` is clamped into ``[0, t]``.
    """
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
        raise ValueError(f"levels must be a positive integer, got {levels!r}")
    drop = default_max_drop(levels) if max_drop is None else max_drop
    if isinstance(drop, bool) or not isinstance(drop, int) or drop < 1:
        raise ValueError(f"max_drop must be an integer >= 1, got {max_drop!r}")
    grid = frequency_grid(available_hz)
    if not level_in_range(level, levels) or not _finite(current_hz) or current_hz <= 0:
        return grid[-1], levels
    current = int(level)
    here = round_up(current_hz, grid)
    if not _finite(compute_s, total_s) or total_s <= 0:
        return here, current

    work = min(max(compute_s / total_s, 0.0), 1.0)
    speed = here * current / levels
    # The effective level: the DDCM level that would run at this speed at the
    # maximum frequency. Steps and the drop bound use it, so that a cpu at
    # (min frequency, 11/16) recovers as fast as DDCM's level 4 would.
    effective = levels * speed / grid[-1]
    if work * current > current - 0.5:
        step = max(1, math.floor(work * levels / effective + _EPS))
        return cover(speed * (effective + step) / effective, grid, levels)

    hz, new_level = cover(speed * work, grid, levels, relax=1)
    floor_speed = speed * (effective - drop) / effective
    if hz * new_level < floor_speed * levels * (1 - _EPS):
        hz, new_level = cover(floor_speed, grid, levels)
    if hz * new_level <= here * (current - 1) * (1 + _EPS):
        return hz, new_level
    return here, current
