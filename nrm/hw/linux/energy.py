"""Turning a wrapping hardware energy counter into cumulative joules.

RAPL counters are 32-bit (MSR) or wrap at ``max_energy_range_uj`` (sysfs),
about every 20 minutes at 200 W, so every delta is taken modulo the counter
range. A counter sampled less often than it wraps cannot be corrected; the
sensor manager samples every second or faster.
"""

from __future__ import annotations

from typing import Callable, Optional


class WrappingCounter:
    __slots__ = ("_read_raw", "modulus", "scale_j", "_last_raw", "_total")

    def __init__(self, read_raw: Callable[[], int], modulus: int, scale_j: float):
        self._read_raw = read_raw
        self.modulus = modulus
        self.scale_j = scale_j
        self._last_raw: Optional[int] = None
        self._total = 0

    def update(self, raw: int) -> float:
        """Fold in one raw reading and return the cumulative joules."""
        if self._last_raw is None:
            self._total = raw
        else:
            self._total += (raw - self._last_raw) % self.modulus
        self._last_raw = raw
        return self._total * self.scale_j

    def read(self) -> float:
        return self.update(self._read_raw())
