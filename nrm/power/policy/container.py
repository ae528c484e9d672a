"""Per-container power-policy manager: phase contexts in, control decisions out.

It performs no I/O so that the whole closed loop (gate, guards, policy) can be
tested and simulated without hardware; the daemon applies the decisions and
owns the actuators. The manager keeps its own view of every cpu's level and
frequency, starting at full speed, and reports only changes.
"""

from __future__ import annotations

import math
from collections import abc
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

from nrm.power.policy import budget, combined, crossrank, ddcm, dvfs, inwait
from nrm.power.policy.guards import (DEFAULT_STALE_ROUNDS, PhaseGate, Ready, SlowdownGuard,
                                     damper_skips)

POLICIES = ("NONE", "DDCM", "DVFS", "COMBINED", "COUNTDOWN")
"""COUNTDOWN throttles inside waits only (the interposer's, inwait.py): no compute decision."""

_PASSIVE = ("NONE", "COUNTDOWN")

_CONTRACT = object()
"""``wait_throttle``'s default: what ``inwait.for_policy`` gives the policy (the daemon's)."""

DUTY_CYCLE = "cpu.duty_cycle"
FREQUENCY = "cpu.frequency"

DEFAULT_DAMPER_S = 0.001
"""1 ms: MPI phases are often a few ms long; the historical 0.1 s would skip most of them."""

DEFAULT_SLOWDOWN = 1.1

LATE_WAIT = 0.01
"""A cpu that waited less than this fraction of the phase reached the collective last."""

MAX_WIDEN = 4.0
"""The critical-path guard doubles a late cpu's margin, up to this factor."""

WIDEN_DECAY = 0.9
"""Per firing on time, a widened margin shrinks back by this factor."""

EXACT = 0.01
"""A need interval narrower than this (relative) counts as measured exactly, for the history."""

STAT_KEYS = (
    "messages",         # phase-context messages received
    "phases",           # phases they covered (sum of aggregations), own cpus only
    "invalid",          # messages with unusable numbers
    "foreign_cpu",      # messages naming a cpu outside the container
    "gate_waits",       # messages after which the gate kept waiting
    "gate_fires",       # times the gate released a common phase count
    "evaluations",      # per-cpu policy evaluations at gate firings
    "acted",            # decisions issued by the policy itself (settings changed)
    "damper_skipped",   # per-cpu evaluations skipped because phases were too short
    "slowdown_resets",  # cpus sent back to full speed by the slowdown guard
    "resets",           # explicit reset() calls
    "sources_dropped",  # sources removed (explicitly or for staleness)
    "restarts",         # sources whose phase count went backwards
    "warmup_skipped",   # messages inside a program's first ``warmup_phases`` phases
    "settle_skipped",   # gate firings not evaluated because the previous one changed a setting
    "critical_holds",   # cpus not slowed because a slowed cpu was on the critical path
)

Frequencies = Union[Mapping[int, Sequence[float]], Sequence[float], None]


@dataclass(frozen=True)
class Decision:
    """A change to apply; ``new`` is a level (1..levels) or a frequency in Hz."""

    cpu: int
    control: str
    old: float
    new: float
    reason: str


def _grids(policy: str, cpus: Sequence[int], frequencies: Frequencies) -> Dict[int, List[float]]:
    if frequencies is None:
        if policy in ("DVFS", "COMBINED"):
            raise ValueError(
                f"policy {policy} needs the available frequencies of the container's cpus "
                "(none given: is cpufreq present and readable?)")
        return {}
    if isinstance(frequencies, (str, bytes)):
        raise ValueError("frequencies must be numbers in Hz, not a string")
    grids: Dict[int, List[float]] = {}
    for cpu in cpus:
        if isinstance(frequencies, abc.Mapping):
            if cpu not in frequencies:
                raise ValueError(f"no available frequencies given for cpu {cpu}")
            values = frequencies[cpu]
        else:
            values = frequencies
        try:
            grids[cpu] = dvfs.frequency_grid(values)
        except ValueError as exc:
            raise ValueError(f"cpu {cpu}: {exc}") from None
    return grids


class ContainerPolicy:
    """Run one power policy for the cpus of one container.

    ``damper_s`` is in seconds (the manifest parser converts the manifest's
    forms); ``slowdown`` is a factor >= 1.0. Phase contexts naming a cpu
    outside ``cpus`` are ignored: a process must not steer cpus that are not
    in its container. Messages that end within a program's first
    ``warmup_phases`` phases are counted but not acted on (the daemon uses 1),
    and so are the ``settle_rounds`` gate firings after one that changed a
    setting: docs/policies.md says why. ``cross_rank`` (the daemon's choice)
    sets every cpu from its need relative to the critical rank's work
    (``crossrank.py``) instead of the single-cpu rules and the phase-to-phase
    slowdown guard. With the cross-rank rule, ``slowdown_budget`` (a
    fraction of run time; the daemon passes ``budget.BUDGET``, None: no
    bound) limits how far a cpu's compute is slowed by how often it has been
    the critical rank, and ``wait_throttle`` (by default
    ``inwait.for_policy(policy)``: the contract the daemon runs the policy
    under) tells the expected-cost choice that its waits are nearly free
    (``budget.py``). COUNTDOWN decides nothing: its waits are the
    interposer's.
    """

    def __init__(
        self,
        policy: str,
        cpus: Sequence[int],
        damper_s: float = DEFAULT_DAMPER_S,
        slowdown: float = DEFAULT_SLOWDOWN,
        frequencies: Frequencies = None,
        levels: int = ddcm.LEVELS,
        hysteresis: float = dvfs.DEFAULT_HYSTERESIS,
        margin: float = dvfs.DEFAULT_MARGIN,
        stale_rounds: int = DEFAULT_STALE_ROUNDS,
        warmup_phases: int = 0,
        settle_rounds: int = 0,
        cross_rank: bool = False,
        phase_window: int = 2,
        slowdown_budget: Optional[float] = None,
        wait_throttle=_CONTRACT,
    ) -> None:
        name = str(policy).strip().upper()
        if name not in POLICIES:
            raise ValueError(
                f"unknown power policy {policy!r}; expected one of {', '.join(POLICIES)}")
        if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
            raise ValueError(f"levels must be a positive integer, got {levels!r}")
        if not (isinstance(damper_s, (int, float)) and math.isfinite(damper_s) and damper_s >= 0):
            raise ValueError(f"damper_s must be a finite number of seconds >= 0, got {damper_s!r}")
        if not (isinstance(slowdown, (int, float)) and math.isfinite(slowdown)):
            raise ValueError(f"slowdown must be a finite factor >= 1.0, got {slowdown!r}")
        if not (isinstance(hysteresis, (int, float)) and math.isfinite(hysteresis)
                and hysteresis >= 0):
            raise ValueError(f"hysteresis must be a fraction >= 0, got {hysteresis!r}")
        if not (isinstance(margin, (int, float)) and math.isfinite(margin) and 0 <= margin < 1):
            raise ValueError(f"margin must be a fraction within [0, 1), got {margin!r}")
        if isinstance(warmup_phases, bool) or not isinstance(warmup_phases, int) \
                or warmup_phases < 0:
            raise ValueError(f"warmup_phases must be an integer >= 0, got {warmup_phases!r}")
        if isinstance(settle_rounds, bool) or not isinstance(settle_rounds, int) \
                or settle_rounds < 0:
            raise ValueError(f"settle_rounds must be an integer >= 0, got {settle_rounds!r}")
        if phase_window not in (1, 2):
            raise ValueError(f"phase_window must be 1 or 2, got {phase_window!r}")
        if slowdown_budget is not None and not (
                isinstance(slowdown_budget, (int, float)) and not isinstance(slowdown_budget, bool)
                and math.isfinite(slowdown_budget) and slowdown_budget >= 0):
            raise ValueError(
                f"slowdown_budget must be a fraction >= 0 or None, got {slowdown_budget!r}")
        if wait_throttle is _CONTRACT:
            wait_throttle = inwait.for_policy(name)
        if wait_throttle is not None and not isinstance(wait_throttle, inwait.WaitThrottle):
            raise ValueError(f"wait_throttle must be an inwait.WaitThrottle or None, "
                             f"got {wait_throttle!r}")
        self.slowdown_budget = slowdown_budget
        self.wait_throttle = wait_throttle
        self.phase_window = phase_window
        self.policy = name
        self.warmup_phases = warmup_phases
        self.settle_rounds = settle_rounds
        self._settling = 0
        self.cpus: Tuple[int, ...] = tuple(dict.fromkeys(int(c) for c in cpus))
        self.damper_s = float(damper_s)
        self.levels = levels
        self.hysteresis = hysteresis
        self.margin = margin
        self._guard = SlowdownGuard(slowdown)
        self.slowdown = self._guard.factor
        self.cross_rank = bool(cross_rank)
        self._knob = name
        self._speed_before: Dict[int, float] = {}
        self._history: Dict[int, List[float]] = {}
        self._widen: Dict[int, float] = {}
        self._typed: Dict[int, Dict[int, List[float]]] = {}
        self._successors: Dict[int, int] = {}
        self._last_site = 0
        self._sites: set = set()
        self._episodes: Dict[int, int] = {}
        self._critical_cpu: Optional[int] = None
        self._phases_seen = 0
        self._gate = PhaseGate(stale_rounds)
        self._grids = _grids(name, self.cpus, frequencies)
        self._level: Dict[int, int] = {cpu: levels for cpu in self.cpus}
        self._hz: Dict[int, Optional[float]] = {
            cpu: (self._grids[cpu][-1] if cpu in self._grids else None) for cpu in self.cpus}
        self.stats: Dict[str, int] = {key: 0 for key in STAT_KEYS}

    # -- inputs ---------------------------------------------------------

    def on_phase(
        self,
        source: int,
        cpu: int,
        aggregation: int,
        compute_s: float,
        total_s: float,
        phase: int = 0,
        site: int = 0,
    ) -> List[Decision]:
        """Feed one phase-context message; returns the changes it caused (often none).

        ``site`` identifies the phase type (the call site of the collective
        that ended the phases, 0 when unknown or mixed): with it the
        cross-rank rule predicts per type (``phase_window``).
        """
        self.stats["messages"] += 1
        if not self._valid(aggregation, compute_s, total_s, phase):
            self.stats["invalid"] += 1
            return []
        if cpu not in self._level:
            self.stats["foreign_cpu"] += 1
            return []
        self.stats["phases"] += aggregation
        if self.policy in _PASSIVE:
            return []
        if 0 < phase <= self.warmup_phases:
            # The first phase of an MPI program runs from MPI_Init to the
            # first collective: its wait is start-up skew, not slack.
            self.stats["warmup_skipped"] += 1
            return []
        if isinstance(site, bool) or not isinstance(site, int):
            site = 0
        result = self._gate.offer(source, cpu, aggregation, compute_s, total_s, phase, site)
        if result.restarted:
            self.stats["restarts"] += 1
        decisions = []
        for _, gone_cpu in result.dropped:
            self.stats["sources_dropped"] += 1
            decisions += self._release(gone_cpu, "stale")
        if not result.fired:
            self.stats["gate_waits"] += 1
            return decisions
        self.stats["gate_fires"] += 1
        return decisions + self._act(result.ready)

    def remove_source(self, source: int) -> List[Decision]:
        """A rank exited: stop waiting for it and give its cpu back its full speed."""
        cpu = self._gate.remove(source)
        if cpu is None:
            return []
        self.stats["sources_dropped"] += 1
        decisions = self._release(cpu, "remove")
        result = self._gate.poll()
        if result.fired:
            self.stats["gate_fires"] += 1
            decisions += self._act(result.ready)
        return decisions

    def reset(self) -> List[Decision]:
        """Everything back to full speed; pending data and slowdown references are dropped."""
        self.stats["resets"] += 1
        self._settling = 0
        self._gate.clear_pending()
        self._forget()
        decisions: List[Decision] = []
        for cpu in self.cpus:
            decisions += self._set(cpu, self.levels, self._max_hz(cpu), "reset")
        return decisions

    def settings(self) -> Dict[int, Dict[str, Optional[float]]]:
        """Current view per cpu: ``level`` (1..levels) and ``frequency`` (Hz, None if unknown)."""
        return {cpu: {"level": self._level[cpu], "frequency": self._hz[cpu]} for cpu in self.cpus}

    @property
    def sources(self) -> Dict[int, int]:
        return self._gate.sources

    # -- internals ------------------------------------------------------

    @staticmethod
    def _valid(aggregation: int, compute_s: float, total_s: float, phase: int) -> bool:
        if isinstance(aggregation, bool) or not isinstance(aggregation, int) or aggregation < 1:
            return False
        if isinstance(phase, bool) or not isinstance(phase, int) or phase < 0:
            return False
        for value in (compute_s, total_s):
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                return False
        return True

    def _max_hz(self, cpu: int) -> Optional[float]:
        grid = self._grids.get(cpu)
        return grid[-1] if grid else None

    def _slowed(self, cpu: int) -> bool:
        hz, top = self._hz[cpu], self._max_hz(cpu)
        return self._level[cpu] < self.levels or (hz is not None and top is not None and hz < top)

    def _release(self, cpu: int, reason: str) -> List[Decision]:
        if cpu in self._gate.sources.values():
            return []  # another rank still runs there and keeps steering it
        self._forget(cpu)
        return self._set(cpu, self.levels, self._max_hz(cpu), reason)

    def _forget(self, cpu: Optional[int] = None) -> None:
        """Needs measured under settings or ranks that no longer hold."""
        self._guard.forget(cpu)
        if cpu is None:
            self._successors.clear()
            self._last_site = 0
            self._sites.clear()
            self._critical_cpu = None
            self._phases_seen = 0
        elif self._critical_cpu == cpu:
            self._critical_cpu = None
        for table in (self._speed_before, self._history, self._widen, self._typed,
                      self._episodes):
            if cpu is None:
                table.clear()
            else:
                table.pop(cpu, None)

    def _set(self, cpu: int, level: int, hz: Optional[float], reason: str) -> List[Decision]:
        out = []
        if hz is not None and self._hz[cpu] is not None and hz != self._hz[cpu]:
            out.append(Decision(cpu, FREQUENCY, float(self._hz[cpu]), float(hz), reason))
            self._hz[cpu] = hz
        if level != self._level[cpu]:
            out.append(Decision(cpu, DUTY_CYCLE, float(self._level[cpu]), float(level), reason))
            self._level[cpu] = level
        return out

    def _act(self, ready: Sequence[Ready]) -> List[Decision]:
        if not self.cross_rank:
            return self._act_per_cpu(ready)
        return self._act_cross_rank(ready)

    def _neediest_per_cpu(self, ready: Sequence[Ready]) -> Dict[int, Ready]:
        """Ranks sharing a cpu: the cpu must serve the one with the least slack."""
        per_cpu: Dict[int, Ready] = {}
        for item in ready:
            held = per_cpu.get(item.cpu)
            if held is None or item.work > held.work:
                per_cpu[item.cpu] = item
        return per_cpu

    def _settle(self) -> bool:
        """Whether this firing is one the settling rule skips (and count it)."""
        if self._settling <= 0:
            return False
        self._settling -= 1
        self.stats["settle_skipped"] += 1
        return True

    def _act_cross_rank(self, ready: Sequence[Ready]) -> List[Decision]:
        per_cpu = self._neediest_per_cpu(ready)
        settling = self._settle()
        # The phase ran at the setting decided two firings ago until the last
        # firing's decision landed: its work is an interval (crossrank.py).
        works: Dict[int, Tuple[float, float]] = {}
        for cpu, item in per_cpu.items():
            if damper_skips(item.total_s, item.phases, self.damper_s):
                self.stats["damper_skipped"] += 1
                continue
            now = self._speed(cpu)
            # Applied at the collective's exit (window 1), a phase runs at one setting.
            before = now if self.phase_window == 1 else self._speed_before.get(cpu, now)
            self._speed_before[cpu] = now
            works[cpu] = crossrank.work_interval(item.compute_s / item.phases, now, before)
        needs = crossrank.need_intervals(works)
        phases = max((per_cpu[cpu].phases for cpu in works), default=1)
        self._count_critical(works, phases)
        site = self._learn_order(per_cpu.values())
        upcoming = (crossrank.successor_types(site, self._successors, self.phase_window)
                    if site else None)
        decisions: List[Decision] = []
        for cpu in sorted(needs):
            item = per_cpu[cpu]
            self.stats["evaluations"] += 1
            need = needs[cpu]
            typed = self._typed.setdefault(cpu, {})
            history = typed.setdefault(site, []) if site else self._history.setdefault(cpu, [])
            widen = self._widen.get(cpu, 1.0)
            if self._slowed(cpu) and item.work >= 1.0 - LATE_WAIT:
                # Critical-path guard: a cpu we slowed reached the collective
                # last. Raise this cpu only, with a wider margin from now on.
                self.stats["slowdown_resets"] += 1
                widen = min(MAX_WIDEN, widen * 2.0)
            elif widen > 1.0:
                widen = max(1.0, widen * WIDEN_DECAY)
            self._widen[cpu] = widen
            if settling:
                continue
            current = (self._hz[cpu] or self._grid(cpu)[-1], self._level[cpu])
            exact = need[1] - need[0] <= EXACT * max(need[1], 1e-9)
            if site and (exact or not history or need[1] < history[-1]
                         or need[0] > history[-1]):
                # Per type, an inexact need that is new or moved away from the
                # last one enters at its high end: safe, as decide()'s jump.
                history.append((need[0] + need[1]) / 2 if exact else need[1])
                del history[:-crossrank.HISTORY]
                exact = False
            target = None
            if upcoming is not None:
                target = crossrank.provision([typed.get(t, []) for t in upcoming], widen)
            risk = self._risk(cpu, phases, len(works))
            if target is not None:
                hz, level = crossrank.choose(self._knob, target, self._grid(cpu), self.levels,
                                             risk)
            else:
                # A typed phase whose successor is not known yet may be followed
                # by any need: raise when required, never cut.
                bound = (need[0], 1.0) if site else need
                hz, level = crossrank.decide(self._knob, bound, history, current,
                                             self._grid(cpu), self.levels, widen, risk)
            if exact:
                history.append((need[0] + need[1]) / 2)
                del history[:-crossrank.HISTORY]
            changes = self._set(cpu, level, hz if self._hz[cpu] is not None else None,
                                self.policy.lower())
            self.stats["acted"] += len(changes)
            decisions += changes
        if decisions:
            self._settling = self.settle_rounds
        return decisions

    def _count_critical(self, works: Mapping[int, Tuple[float, float]], phases: int) -> None:
        """Count the phases seen and each cpu's episodes as the critical rank (budget.py).

        The critical rank is the one with the most full-speed work (the
        middle of its interval), which does not depend on the settings: all
        policies see the same episodes. An episode starts when the critical
        rank differs from the last firing's.
        """
        if not works:
            return
        self._phases_seen += phases
        critical = max(sorted(works), key=lambda c: works[c][0] + works[c][1])
        if critical != self._critical_cpu:
            self._episodes[critical] = self._episodes.get(critical, 0) + 1
            self._critical_cpu = critical

    def _risk(self, cpu: int, phases: int, ranks: int) -> Optional[budget.Risk]:
        """The slowdown budget's floor and the expected cost's terms for ``cpu`` (None: no budget).

        A late rank runs slow for the firing's phases and, until the raise
        lands, the ``phase_window - 1`` after them.
        """
        if self.slowdown_budget is None:
            return None
        rate = budget.change_rate(self._episodes.get(cpu, 0), self._phases_seen)
        window = phases + self.phase_window - 1
        wait_level = None if self.wait_throttle is None else self.wait_throttle.level
        return budget.Risk(floor=budget.speed_floor(rate, window, self.slowdown_budget),
                           rate=rate, window=window,
                           lateness=budget.lateness_power(ranks, wait_level, self.levels),
                           wait_level=wait_level)

    def _learn_order(self, items) -> int:
        """The firing's phase type (0 unless every rank names the same), and its predecessor's
        successor: collectives come in a fixed order per iteration.

        A program whose one call site has followed itself, and no other site
        was seen, is treated as untyped (0): its one type is every phase, and
        the untyped rule keeps an inexact need out of the history instead of
        entering it at its high end. Until a site has followed itself, a
        second type may still come, so the phase stays typed (and is not cut).
        """
        sites = {item.site for item in items}
        site = sites.pop() if len(sites) == 1 else 0
        if site and self._last_site:
            self._successors[self._last_site] = site
        self._last_site = site
        if site:
            self._sites.add(site)
        one_site = self._sites == {site} and self._successors.get(site) == site
        return 0 if one_site else site

    def _speed(self, cpu: int) -> float:
        hz = self._hz[cpu]
        return self._level[cpu] / self.levels * (1.0 if hz is None else hz / self._max_hz(cpu))

    def _grid(self, cpu: int) -> List[float]:
        return self._grids.get(cpu) or [1.0]

    def _act_per_cpu(self, ready: Sequence[Ready]) -> List[Decision]:
        per_cpu = self._neediest_per_cpu(ready)
        # A decision is written while the next phase is already running, so
        # that phase ran partly at the old settings: with settle_rounds, the
        # policy does not act on it (the slowdown guard still does).
        settling = self._settle()
        # When a cpu we slowed is on the critical path, the others' slack is
        # (partly) our doing: speed that cpu up before cutting anyone else.
        rescue = any(self._slowed(cpu) and self._critical(cpu, item)
                     for cpu, item in per_cpu.items())
        decisions: List[Decision] = []
        for cpu in sorted(per_cpu):
            item = per_cpu[cpu]
            if damper_skips(item.total_s, item.phases, self.damper_s):
                self.stats["damper_skipped"] += 1
                continue
            self.stats["evaluations"] += 1
            if self._guard.check(cpu, item.per_phase_total_s, self._slowed(cpu)):
                self.stats["slowdown_resets"] += 1
                decisions += self._set(cpu, self.levels, self._max_hz(cpu), "slowdown")
                continue
            if settling:
                continue
            if rescue and not self._critical(cpu, item):
                self.stats["critical_holds"] += 1
                continue
            level, hz = self._decide(cpu, item)
            changes = self._set(cpu, level, hz, self.policy.lower())
            self.stats["acted"] += len(changes)
            decisions += changes
        if decisions:
            self._settling = self.settle_rounds
        return decisions

    def _critical(self, cpu: int, item: Ready) -> bool:
        """The policy's own test for "this cpu waited (almost) nothing"."""
        if self.policy == "DVFS":
            return 1.0 - item.work < self.margin / 2
        level = self._level[cpu]
        return item.work * level > level - 0.5

    def _decide(self, cpu: int, item: Ready) -> Tuple[int, Optional[float]]:
        level, hz = self._level[cpu], self._hz[cpu]
        if self.policy == "DDCM":
            return ddcm.next_level(item.compute_s, item.total_s, level, self.levels), hz
        if self.policy == "DVFS":
            assert hz is not None
            new_hz = dvfs.next_frequency(item.compute_s, item.total_s, hz, self._grids[cpu],
                                         self.hysteresis, self.margin)
            return level, new_hz
        assert hz is not None
        new_hz, new_level = combined.next_setting(item.compute_s, item.total_s, hz, level,
                                                  self._grids[cpu], self.levels)
        return new_level, new_hz
