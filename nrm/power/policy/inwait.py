"""In-wait throttling (COUNTDOWN-style): which policies carry it, and how.

A rank that waits in an MPI collective for more than ``delay_s`` has its
core dropped to duty-cycle ``level`` until the collective returns. The
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
from typing import Optional

#: duty-cycle levels of 16 (extended clock modulation, docs/hardware.md)
LEVELS = 16


@dataclass(frozen=True)
class WaitThrottle:
    """The in-wait setting: after ``delay_s`` inside a collective, ``level`` of 16."""

    delay_s: float = 0.0005
    level: int = 1


#: manifest policies that throttle inside waits; DVFS stays the frequency
#: knob alone, so that COMBINED (both) can be compared with each knob
POLICIES_WITH_WAIT_THROTTLE = frozenset({"DDCM", "COMBINED", "COUNTDOWN"})


def for_policy(policy: str, setting: WaitThrottle = WaitThrottle()) -> Optional[WaitThrottle]:
    """The in-wait setting a container under ``policy`` runs with, or None."""
    return setting if policy in POLICIES_WITH_WAIT_THROTTLE else None
