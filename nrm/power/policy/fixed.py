"""FIXED: settings chosen in advance, pinned per MPI rank.

Why: to measure an oracle on the same machine, in the same run, as the
policies it is compared with (benchmarks/power_oracle.py --live). The
oracle knows each rank's work before the program starts; what it would
choose is written into the manifest (``app.power.settings``) and this
class pins it through the same actuators the policies use, and the daemon
restores the node when the container ends, as for every policy.

A rank's cpu is known only from its phase reports (the launcher binds
ranks, not nrm), so a rank is pinned when its first report arrives: after
the program's first collective. Nothing is decided afterwards; the setting
holds for the whole run, so this is the best *static* per-rank setting, not
a per-phase oracle (a per-phase table applied by the daemon would land late,
like any decision: docs/policies.md).

Pure, like the other policies: no I/O, no clock. Same interface as
``ContainerPolicy`` (on_phase, remove_source, reset, settings, stats).
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence

from nrm.power.policy import dvfs
from nrm.power.policy.container import DUTY_CYCLE, FREQUENCY, Decision, Frequencies, _grids

STAT_KEYS = (
    "messages",       # phase-context messages received
    "foreign_cpu",    # messages naming a cpu outside the container
    "unlisted",       # messages from a source without an entry (left at full speed)
    "pinned",         # sources pinned (first report of a listed source)
    "shared",         # pins that met another listed source on the same cpu
    "acted",          # settings changed
    "resets",         # reset() calls
    "sources_dropped",  # sources removed
)

REASON = "fixed"


class FixedPolicy:
    """Pin ``settings[source] = {"level": L, "frequency": Hz or None}`` on the
    cpu each source reports from.

    ``source`` is the MPI rank (the daemon passes the cpu for senders that
    report no rank). Two listed sources on one cpu: the faster setting wins,
    so that neither is slowed below what it was given. A frequency is rounded
    up onto the cpu's grid (as the actuator would); a frequency without a
    grid is refused at construction, with the reason.
    """

    policy = "FIXED"

    def __init__(self, settings: Mapping[int, Mapping[str, Optional[float]]],
                 cpus: Sequence[int], frequencies: Frequencies = None,
                 levels: int = 16) -> None:
        if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
            raise ValueError(f"levels must be a positive integer, got {levels!r}")
        self.levels = levels
        self.cpus = tuple(dict.fromkeys(int(c) for c in cpus))
        wants_hz = any(s.get("frequency") is not None for s in settings.values())
        self._grids = _grids("DVFS" if wants_hz else "NONE", self.cpus, frequencies)
        self._pins: Dict[int, Dict[str, Optional[float]]] = {}
        for source, s in settings.items():
            level = s.get("level", levels)
            if isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= levels:
                raise ValueError(f"rank {source}: level must be an integer 1..{levels}, "
                                 f"got {level!r}")
            self._pins[int(source)] = {"level": level, "frequency": s.get("frequency")}
        self._level: Dict[int, int] = {cpu: levels for cpu in self.cpus}
        self._hz: Dict[int, Optional[float]] = {cpu: self._max_hz(cpu) for cpu in self.cpus}
        self._where: Dict[int, int] = {}  # source -> cpu it was pinned on
        self.stats: Dict[str, int] = {key: 0 for key in STAT_KEYS}

    # -- inputs -----------------------------------------------------------

    def on_phase(self, source: int, cpu: int, aggregation: int = 1, compute_s: float = 0.0,
                 total_s: float = 0.0, phase: int = 0, site: int = 0) -> List[Decision]:
        """The first report of a listed source pins its cpu; the rest change nothing
        (a source that moved to another cpu is pinned there, its old cpu released)."""
        self.stats["messages"] += 1
        if cpu not in self._level:
            self.stats["foreign_cpu"] += 1
            return []
        if source not in self._pins:
            self.stats["unlisted"] += 1
            return []
        old = self._where.get(source)
        if old == cpu:
            return []
        self._where[source] = cpu
        self.stats["pinned"] += 1
        decisions = self._apply(old) if old is not None else []
        return decisions + self._apply(cpu)

    def remove_source(self, source: int) -> List[Decision]:
        cpu = self._where.pop(source, None)
        if cpu is None:
            return []
        self.stats["sources_dropped"] += 1
        return self._apply(cpu, reason="remove")

    def reset(self) -> List[Decision]:
        """Every cpu back to full speed; pins are taken again from the next reports."""
        self.stats["resets"] += 1
        self._where.clear()
        out: List[Decision] = []
        for cpu in self.cpus:
            out += self._set(cpu, self.levels, self._max_hz(cpu), "reset")
        return out

    # -- state --------------------------------------------------------------

    def settings(self) -> Dict[int, Dict[str, Optional[float]]]:
        return {cpu: {"level": self._level[cpu], "frequency": self._hz[cpu]} for cpu in self.cpus}

    def target(self, cpu: int) -> Dict[str, Optional[float]]:
        """What the sources pinned on ``cpu`` ask for: the fastest of them (full speed if none)."""
        best = (self.levels, self._max_hz(cpu))
        asks = [self._pinned(s) for s, c in self._where.items() if c == cpu]
        if asks:
            best = max(asks, key=lambda a: self._speed(cpu, *a))
        return {"level": best[0], "frequency": best[1]}

    # -- helpers ------------------------------------------------------------

    def _max_hz(self, cpu: int) -> Optional[float]:
        grid = self._grids.get(cpu)
        return grid[-1] if grid else None

    def _pinned(self, source: int):
        pin = self._pins[source]
        hz = pin["frequency"]
        grid = self._grids.get(self._where[source])
        if hz is not None and grid:
            hz = dvfs.round_up(float(hz), grid)
        return (int(pin["level"]), hz if hz is not None else None)

    def _speed(self, cpu: int, level: int, hz: Optional[float]) -> float:
        top = self._max_hz(cpu)
        return level / self.levels * (1.0 if hz is None or not top else hz / top)

    def _apply(self, cpu: int, reason: str = REASON) -> List[Decision]:
        sharing = sum(1 for c in self._where.values() if c == cpu)
        if sharing > 1 and reason == REASON:
            self.stats["shared"] += 1
        t = self.target(cpu)
        hz = t["frequency"] if t["frequency"] is not None else self._max_hz(cpu)
        return self._set(cpu, int(t["level"]), hz, reason)

    def _set(self, cpu: int, level: int, hz: Optional[float], reason: str) -> List[Decision]:
        out = []
        if hz is not None and self._hz[cpu] is not None and hz != self._hz[cpu]:
            out.append(Decision(cpu, FREQUENCY, self._hz[cpu], hz, reason))
            self._hz[cpu] = hz
        if level != self._level[cpu]:
            out.append(Decision(cpu, DUTY_CYCLE, self._level[cpu], level, reason))
            self._level[cpu] = level
        if out and reason == REASON:
            self.stats["acted"] += 1
        return out
