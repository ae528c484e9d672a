"""In-wait throttling (COUNTDOWN-style): which policies carry it, and how.

A rank that waits in an MPI collective for more than ``delay_s`` has its
core dropped to duty-cycle ``level`` (and, in the frequency form, to the
platform's lowest frequency) until the collective returns. The
compute never runs slower, so it costs no time, and it is the part of a
rank's slack that a per-phase decision cannot reach: the critical rank may
change every phase and the wait is still cheap.

The decision is policy (this module, pure); the actuation must be faster
than a phase decision can be (microseconds), so it belongs to the
interposer in the rank's own process, never to a daemon round trip. The
daemon restores every cpu of a container when it ends, so a rank killed
inside a throttled wait never leaves its core slow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

#: duty-cycle levels of 16 (extended clock modulation, docs/hardware.md)
LEVELS = 16

#: ``WaitThrottle.frequency``: the platform's lowest frequency, whatever it is
LOWEST = "lowest"


@dataclass(frozen=True)
class WaitThrottle:
    """The in-wait setting: after ``delay_s`` inside a collective, ``level``
    of 16 and ``frequency`` (None: the frequency is left as it is;
    ``LOWEST``: the platform's lowest; else Hz)."""

    delay_s: float = 0.0005
    level: int = 1
    frequency: Optional[Union[str, float]] = None

    def frequency_hz(self, grid: Sequence[float]) -> Optional[float]:
        """The in-wait frequency on a platform whose frequencies are
        ``grid`` (None: unchanged). A value in Hz is clamped to the grid's
        range: the platform cannot go lower than its lowest."""
        if self.frequency is None or not grid:
            return None
        if self.frequency == LOWEST:
            return float(min(grid))
        return float(min(max(float(self.frequency), min(grid)), max(grid)))


#: the setting of each manifest policy that throttles inside waits. DVFS
#: drops the frequency only (its knob: the duty cycle stays), DDCM and
#: COUNTDOWN the duty cycle only; COMBINED both, the cheapest wait of all
#: (level 1 at the lowest frequency draws 1/16 x f_min/f_max x V(f_min)^2
#: of a busy core, benchmarks/power_oracle.py)
SETTINGS = {
    "DDCM": WaitThrottle(),
    "COUNTDOWN": WaitThrottle(),
    "DVFS": WaitThrottle(level=LEVELS, frequency=LOWEST),
    "COMBINED": WaitThrottle(level=1, frequency=LOWEST),
}

#: manifest policies that throttle inside waits
POLICIES_WITH_WAIT_THROTTLE = frozenset(SETTINGS)


def for_policy(policy: str, setting: Optional[WaitThrottle] = None) -> Optional[WaitThrottle]:
    """The in-wait setting a container under ``policy`` runs with, or None;
    ``setting`` replaces the policy's own for every policy that has one."""
    if policy not in SETTINGS:
        return None
    return SETTINGS[policy] if setting is None else setting
