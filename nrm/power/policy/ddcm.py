"""Dynamic duty-cycle modulation (DDCM): one cpu, one phase, one decision.

The rule follows the seed daemon's shape (one level of relaxation, at most
13 of 16 levels dropped at once, a proportional speed-up for a cpu on the
critical path) but fixes its scaling. Phase times are wall-clock times
measured while the core runs at level ``L``, i.e. ``L/levels`` of the time, so
the same work at full speed takes ``c * L / levels``. The seed divided by
``L`` instead of multiplying, which made every modulated cpu look like the
critical path and crept levels back up; see docs/policies.md.
"""

from __future__ import annotations

import math

LEVELS = 16
"""Duty-cycle levels of Intel extended clock modulation (6.25 % steps)."""

_EPS = 1e-9
"""Tolerance so that a need of exactly ``k`` levels is not rounded to ``k + 1``."""


def default_max_drop(levels: int) -> int:
    """The seed allowed 13 of 16 levels per step; keep that proportion for other scales."""
    return max(1, (levels * 13) // 16)


def _finite(*values: float) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def level_in_range(level: object, levels: int) -> bool:
    """Levels are integral; a float such as 12.0 is accepted because settings travel as floats."""
    if isinstance(level, bool) or not isinstance(level, (int, float)):
        return False
    if not math.isfinite(level) or level != int(level):
        return False
    return 1 <= int(level) <= levels


def next_level(
    compute_s: float,
    total_s: float,
    level: int,
    levels: int = LEVELS,
    max_drop: int | None = None,
) -> int:
    """Return the duty-cycle level for the next phase of one cpu.

    ``x = (c / t) * L`` is the number of levels that would have finished the
    phase's compute exactly at the barrier. It does not depend on the current
    level (``c * L`` is the work), so the rule is idempotent once converged.

    * slow down to ``ceil(x) + 1`` (one level of relaxation, so the cpu keeps
      visible slack) when that is below ``L``, by at most ``max_drop`` levels;
    * speed up when the cpu waited less than half a level (``x > L - 1/2``):
      it is on the critical path and the timings cannot say by how much it is
      late, so step by ``floor(work * levels / L)`` levels (at least one),
      which is larger where one level is a larger share of the speed;
    * otherwise keep ``L``: the one-level band absorbs measurement noise.

    Edge cases: a level outside ``1..levels`` means the caller does not know
    the hardware state, so the answer is full speed (``levels``). ``t <= 0`` or
    a non-finite time carries no information: the level is kept. ``c > t``
    (clock skew between the two timestamps) is read as ``c = t`` and
    ``c < 0`` as ``0``. The result is always within ``1..levels``.
    """
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
        raise ValueError(f"levels must be a positive integer, got {levels!r}")
    if not level_in_range(level, levels):
        return levels
    current = int(level)
    if not _finite(compute_s, total_s) or total_s <= 0:
        return current
    drop = default_max_drop(levels) if max_drop is None else max_drop
    if drop < 1:
        raise ValueError(f"max_drop must be at least 1, got {max_drop!r}")

    work = min(max(compute_s / total_s, 0.0), 1.0)
    need = work * current
    target = math.ceil(need - _EPS) + 1
    if target < current:
        return max(target, current - drop, 1)
    if need > current - 0.5:
        step = max(1, math.floor(work * levels / current + _EPS))
        return min(levels, current + step)
    return current
