"""Guards evaluated before a policy, and the gate that aligns MPI ranks' phases.

A policy compares a cpu's compute with the phase it belongs to; that is only
meaningful when every rank's numbers cover the same phases, hence the gate.
The guards protect against deciding on noise (damper) and against a decision
that made the whole application slower (slowdown).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple


def damper_skips(total_s: float, phases: int, damper_s: float) -> bool:
    """Phases shorter than the damper are start-up noise or too short to act on.

    The comparison is per phase (``total / phases``) so that aggregating more
    phases into one message does not let tiny phases through.
    """
    if phases < 1:
        return True
    return total_s / phases < damper_s


class SlowdownGuard:
    """Reset a slowed cpu whose phases got longer than ``factor`` x the previous one.

    The previous per-phase time is read before it is replaced; the seed
    replaced it first, so its guard compared a value with itself and never
    fired.
    """

    def __init__(self, factor: float) -> None:
        if not factor >= 1.0:
            raise ValueError(f"slowdown factor must be >= 1.0, got {factor!r}")
        self.factor = float(factor)
        self._previous: Dict[int, float] = {}

    def check(self, cpu: int, per_phase_total_s: float, slowed: bool) -> bool:
        """Record this phase and tell whether the cpu must go back to full speed."""
        previous = self._previous.get(cpu)
        self._previous[cpu] = per_phase_total_s
        if not slowed or previous is None:
            return False
        return per_phase_total_s > self.factor * previous

    def previous(self, cpu: int) -> Optional[float]:
        return self._previous.get(cpu)

    def forget(self, cpu: Optional[int] = None) -> None:
        """A reset or a departed rank makes the old reference meaningless."""
        if cpu is None:
            self._previous.clear()
        else:
            self._previous.pop(cpu, None)


@dataclass(frozen=True)
class Ready:
    """One source's data accumulated up to the common phase count of a gate firing."""

    source: int
    cpu: int
    phases: int
    compute_s: float
    total_s: float
    site: int = 0
    """The phase type (call site of the collective that ended it); 0 when unknown or mixed."""

    @property
    def per_phase_total_s(self) -> float:
        return self.total_s / self.phases

    @property
    def work(self) -> float:
        return min(max(self.compute_s / self.total_s, 0.0), 1.0) if self.total_s > 0 else 0.0


@dataclass(frozen=True)
class GateResult:
    """``ready`` is empty while the gate waits; ``dropped`` lists (source, cpu) given up on."""

    ready: Tuple[Ready, ...] = ()
    dropped: Tuple[Tuple[int, int], ...] = ()
    restarted: bool = False

    @property
    def fired(self) -> bool:
        return bool(self.ready)


_NOTHING = GateResult()
"""The gate waits and dropped nobody: shared, since GateResult is immutable."""


@dataclass
class _Source:
    cpu: int
    last_end: int = 0
    compute_s: float = 0.0
    total_s: float = 0.0
    phases: int = 0
    last_seq: int = 0
    site: int = 0

    @property
    def pending(self) -> bool:
        return self.phases > 0


DEFAULT_STALE_ROUNDS = 16


class PhaseGate:
    """Accumulate phase contexts per source and release them at a common phase count.

    A source is active from its first message until it is removed. The gate
    fires when every active source has pending data and all pending data end
    at the same cumulative phase count; a source that is behind keeps
    accumulating. Senders that do not report a count (``phase == 0``) are
    counted by the gate from their aggregations.

    A source that left without being removed would block the gate forever, so
    a source that blocks the gate (no pending data, or behind the others) and
    has been silent while the others sent more than ``stale_rounds`` messages
    each on average is dropped. Dropping a slow but alive source is harmless:
    its next message makes it active again.

    A count that goes backwards means the sender restarted (a new program
    reusing the rank): its pending data are discarded and counting restarts.
    """

    def __init__(self, stale_rounds: int = DEFAULT_STALE_ROUNDS) -> None:
        if stale_rounds < 1:
            raise ValueError(f"stale_rounds must be >= 1, got {stale_rounds!r}")
        self.stale_rounds = stale_rounds
        self._sources: Dict[int, _Source] = {}
        self._seq = 0

    @property
    def sources(self) -> Dict[int, int]:
        """Active sources and the cpu each last reported."""
        return {key: src.cpu for key, src in self._sources.items()}

    def pending(self, source: int) -> Optional[Tuple[int, int]]:
        """(pending phases, phase count they end at), or None for an unknown source."""
        src = self._sources.get(source)
        if src is None:
            return None
        return src.phases, src.last_end

    def offer(
        self,
        source: int,
        cpu: int,
        aggregation: int,
        compute_s: float,
        total_s: float,
        phase: int = 0,
        site: int = 0,
    ) -> GateResult:
        if aggregation < 1:
            raise ValueError(f"aggregation must be >= 1, got {aggregation!r}")
        self._seq += 1
        src = self._sources.get(source)
        if src is None:
            src = self._sources[source] = _Source(cpu=cpu)
        restarted = False
        if phase > 0:
            if phase <= src.last_end:
                restarted = True
                src.compute_s = src.total_s = 0.0
                src.phases = 0
            end = phase
        else:
            end = src.last_end + aggregation
        # Pending data of several messages are one phase type only if all say so.
        src.site = site if src.phases == 0 or src.site == site else 0
        src.cpu = cpu
        src.last_end = end
        src.compute_s += compute_s
        src.total_s += total_s
        src.phases += aggregation
        src.last_seq = self._seq

        result = self._try_fire()
        if restarted:
            result = GateResult(result.ready, result.dropped, True)
        return result

    def poll(self) -> GateResult:
        """Fire if possible without new data (after a source was removed)."""
        return self._try_fire(drop_stale=False)

    def remove(self, source: int) -> Optional[int]:
        """Forget a source (its rank exited); returns the cpu it last used."""
        src = self._sources.pop(source, None)
        return None if src is None else src.cpu

    def clear_pending(self) -> None:
        """Data measured under settings that no longer hold must not drive a decision."""
        for src in self._sources.values():
            src.compute_s = src.total_s = 0.0
            src.phases = 0

    def _blocking(self) -> List[int]:
        # One pass for the frontier, one for the laggards: this runs for every
        # phase-context message, a hot path at 10 k msg/s.
        frontier = -1
        for s in self._sources.values():
            if s.phases > 0 and s.last_end > frontier:
                frontier = s.last_end
        if frontier < 0:
            return []
        return [key for key, s in self._sources.items()
                if s.phases == 0 or s.last_end < frontier]

    def _try_fire(self, drop_stale: bool = True) -> GateResult:
        if not self._sources:
            return _NOTHING
        blocking = self._blocking()
        dropped: List[Tuple[int, int]] = []
        if blocking and drop_stale and len(self._sources) > 1:
            allowance = self.stale_rounds * (len(self._sources) - 1)
            for key in blocking:
                src = self._sources[key]
                if self._seq - src.last_seq > allowance:
                    dropped.append((key, src.cpu))
            if dropped:
                for key, _ in dropped:
                    del self._sources[key]
                blocking = self._blocking()
        if blocking or not any(s.phases > 0 for s in self._sources.values()):
            return GateResult(dropped=tuple(dropped)) if dropped else _NOTHING
        ready = tuple(
            Ready(key, s.cpu, s.phases, s.compute_s, s.total_s, s.site)
            for key, s in sorted(self._sources.items())
        )
        self.clear_pending()
        return GateResult(ready=ready, dropped=tuple(dropped))
