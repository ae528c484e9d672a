"""DVFS for the bulk of a slowdown, duty-cycle modulation for the remainder.

Lowering the frequency also lowers the voltage, so it saves more energy per
unit of slowdown than clock modulation; modulation is finer grained and keeps
working below the lowest available frequency. The combination therefore
chooses the frequency first and covers what is left with a duty-cycle level.
"""

from __future__ import annotations

import math
from typing import Iterable

from nrm.policy.ddcm import LEVELS, level_in_range
from nrm.policy.dvfs import DEFAULT_MARGIN, frequency_grid, round_up, step_up

_EPS = 1e-9


def _finite(*values: float) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def next_setting(
    compute_s: float,
    total_s: float,
    current_hz: float,
    level: int,
    available_hz: Iterable[float],
    levels: int = LEVELS,
    margin: float = DEFAULT_MARGIN,
) -> tuple[float, int]:
    """Return ``(frequency_hz, level)`` for the next phase of one cpu.

    The cpu ran at the effective speed ``s = current * L / levels``, so
    ``needed = s * c / t`` would have finished the compute at the barrier; as
    in DVFS, ``want = needed / (1 - margin)`` keeps some slack visible.

    * frequency: the smallest available frequency >= ``want`` (the maximum if
      none is), never below the minimum;
    * level: ``ceil(levels * want / frequency)``, the fewest levels that cover
      the remaining fraction, within ``1..levels``.

    The result never speeds the cpu up unless it is on the critical path
    (waited less than ``margin / 2`` of the phase): then modulation is
    removed first (level -> ``levels``) and, if there was none, the frequency
    goes one available step up.

    Edge cases match the single policies: an unknown level or frequency gives
    full speed, ``t <= 0`` keeps the setting (frequency rounded onto the
    grid), ``c`` is clamped into ``[0, t]``.
    """
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
        raise ValueError(f"levels must be a positive integer, got {levels!r}")
    if not _finite(margin) or not 0 <= margin < 1:
        raise ValueError("margin must be within [0, 1)")
    grid = frequency_grid(available_hz)
    if not level_in_range(level, levels) or not _finite(current_hz) or current_hz <= 0:
        return grid[-1], levels
    current_level = int(level)
    here = round_up(current_hz, grid)
    if not _finite(compute_s, total_s) or total_s <= 0:
        return here, current_level

    work = min(max(compute_s / total_s, 0.0), 1.0)
    if 1.0 - work < margin / 2:
        if current_level < levels:
            return here, levels
        return step_up(current_hz, grid), levels

    speed = current_hz * current_level / levels
    want = speed * work / (1.0 - margin)
    hz = round_up(want, grid)
    new_level = min(levels, max(1, math.ceil(levels * want / hz - _EPS)))
    if hz * new_level > speed * levels * (1 + _EPS):
        # Rounding onto the grid would make a cpu with slack faster than it is.
        return here, current_level
    return hz, new_level
