"""Cross-rank, lag-corrected need of every cpu, and the cheapest setting that covers it.

Pure functions; ``ContainerPolicy`` keeps the per-cpu history they read.

Why cross-rank: a cpu alone cannot tell how late it was (a cpu that did not
wait only knows it was on the critical path), so the single-cpu rules climb
step by step. At a gate firing every rank's compute of the same phases is
known; ``work = c * speed`` (full-speed seconds) does not depend on the
setting, so ``need = work / max work`` is the speed at which the rank would
have reached the collective just in time, and the cpu can jump straight to
the cheapest setting that covers it.

Why intervals: a decision lands while the next phase already runs, so that
phase ran partly at the old speed and partly at the new one. Its work is
then only known to lie between ``c * min(old, new)`` and ``c * max(old,
new)``. A cpu is slowed only when even the high end of its need allows it,
and sped up only when even the low end requires it; a mixed phase can
therefore not trigger a wrong move, and no firing has to be skipped.
"""

from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from nrm.hw.emulated import voltage_ratio
from nrm.power.policy.budget import Risk
from nrm.power.policy.dvfs import round_up

_EPS = 1e-9

Interval = Tuple[float, float]

MARGIN_FLOOR = 0.02
"""The smallest margin over the predicted need: a few percent, not a whole level or step."""

MARGIN_Z = 1.0
"""The margin in multiples of the recent spread of a cpu's need."""

HISTORY = 8
"""Exact needs kept per cpu for the prediction and the spread."""

PREDICT_LAST = 1
"""The prediction is the largest of the last few exact needs (a burst is covered at once)."""


def work_interval(compute_s: float, speed_now: float, speed_before: float) -> Interval:
    """Full-speed work of a phase that ran at ``speed_before`` and/or ``speed_now``."""
    c = max(compute_s, 0.0)
    lo, hi = sorted((speed_now, speed_before))
    return c * lo, c * hi


def need_intervals(works: Mapping[int, Interval]) -> Dict[int, Interval]:
    """Each cpu's need (speed, 0..1) relative to the critical rank, low and high end.

    The high end divides the cpu's largest possible work by the smallest
    possible critical work, the low end the other way round.
    """
    top_lo = max((lo for lo, _ in works.values()), default=0.0)
    top_hi = max((hi for _, hi in works.values()), default=0.0)
    out = {}
    for cpu, (lo, hi) in works.items():
        need_hi = 1.0 if top_lo <= 0 else min(1.0, hi / top_lo)
        need_lo = 1.0 if top_hi <= 0 else min(1.0, lo / top_hi)
        out[cpu] = (need_lo, need_hi)
    return out


def margin(history: Sequence[float], floor: float = MARGIN_FLOOR, z: float = MARGIN_Z) -> float:
    """A statistical margin: ``max(floor, z * relative spread of the recent needs)``."""
    if len(history) < 2:
        return floor
    mean = math.fsum(history) / len(history)
    if mean <= 0:
        return floor
    # in floats: statistics.pstdev's exact Fractions cost ~70 us a call (3 us here) on
    # the daemon's per-phase path, for digits a margin does not need
    spread = math.sqrt(math.fsum((x - mean) ** 2 for x in history) / len(history))
    return max(floor, z * spread / mean)


def predict(history: Sequence[float], now: float, last: int = PREDICT_LAST) -> float:
    """The need to provision for: the largest of ``now`` and the last few exact needs."""
    return max([now, *history[-last:]])


def relative_power(level: int, levels: int, hz: float, fmax: float) -> float:
    """Dynamic power of a busy cpu relative to full speed: ``speed * V(f)^2``.

    The emulated node's model (``nrm.hw.emulated.dynamic_power``): voltage
    proportional to frequency down to a floor, flat below it; a busy-polling
    cpu is charged its speed, so this is also the energy per phase of a
    rank that waits.
    """
    ratio = hz / fmax
    return (level / levels) * ratio * voltage_ratio(ratio) ** 2


def cover(knob: str, need: float, grid: Sequence[float], levels: int) -> Tuple[float, int]:
    """The ``(frequency, level)`` of ``knob`` for the compute speed ``need``.

    ``DDCM`` varies the level at the maximum frequency, ``DVFS`` the
    frequency at full duty cycle (the minimum frequency when the need is
    below it). ``COMBINED`` computes at DVFS's setting, or at DDCM's where
    the need is below the lowest frequency and DDCM's is cheaper by
    ``relative_power`` (under 1/16 of full speed on the emulated grid), and
    keeps the duty cycle for the wait (level 1 inside a collective,
    COUNTDOWN-style, applied by the ranks' interposer: nrm/power/policy/
    inwait.py, docs/policies.md). Trimming the level to the need at a
    frequency is cheaper per phase but removes the slack of the frequency
    grid: over whole runs it was late often enough to save less than DVFS
    alone, so COMBINED does not do it.
    """
    fmax = grid[-1]
    need = min(max(need, 0.0), 1.0)
    by_level = fmax, max(1, math.ceil(levels * need - _EPS))
    if knob == "DDCM":
        return by_level
    by_frequency = round_up(need * fmax * (1 - _EPS), grid), levels
    if knob == "DVFS":
        return by_frequency
    cheaper = relative_power(by_level[1], levels, fmax, fmax) < \
        relative_power(levels, levels, by_frequency[0], fmax) - _EPS
    return by_level if need < grid[0] / fmax and cheaper else by_frequency


def phase_energy(setting: Tuple[float, int], need: float, grid: Sequence[float], levels: int,
                 wait_level: Optional[int] = None) -> float:
    """Dynamic energy of one cpu over a phase, relative to a busy cpu at fmax all phase.

    The cpu computes ``need / speed`` of the phase at ``setting`` and
    busy-polls the rest, at the same setting or, with in-wait throttling,
    at ``wait_level`` at its frequency (the 0.5 ms delay is neglected).
    """
    hz, level = setting
    fmax = grid[-1]
    speed = level / levels * hz / fmax
    busy = 1.0 if speed <= 0 else min(1.0, max(need, 0.0) / speed)
    power = relative_power(level, levels, hz, fmax)
    wait = power if wait_level is None else relative_power(min(wait_level, level), levels, hz, fmax)
    return busy * power + (1.0 - busy) * wait


def _candidates(knob: str, grid: Sequence[float], levels: int) -> List[Tuple[float, int]]:
    """DDCM: the levels at fmax; DVFS: the frequencies at full duty cycle; COMBINED: both."""
    by_level = [(grid[-1], level) for level in range(1, levels + 1)]
    by_frequency = [(hz, levels) for hz in grid]
    if knob == "DDCM":
        return by_level
    if knob == "DVFS":
        return by_frequency
    return by_level + by_frequency


def choose(knob: str, need: float, grid: Sequence[float], levels: int,
           risk: Optional[Risk] = None) -> Tuple[float, int]:
    """The ``(frequency, level)`` of ``knob`` to compute a phase of speed ``need`` at.

    Without ``risk``: ``cover``. With it: among the knob's settings at
    least as fast as ``need`` and as the budget's floor, the one of least
    expected cost per phase, ``phase_energy`` (with the wait throttled if
    ``risk.wait_level``) plus the lateness it risks, ``rate * window *
    (1/speed - 1) * lateness`` (budget.py); ties go to the faster setting.
    COMBINED chooses among DDCM's and DVFS's settings, so its expected cost
    is never above either knob's, and its wait is throttled.
    """
    if risk is None:
        return cover(knob, need, grid, levels)
    fmax = grid[-1]
    need = min(max(need, 0.0), 1.0)
    lowest = max(need, min(risk.floor, 1.0))

    def speed(setting: Tuple[float, int]) -> float:
        return setting[0] / fmax * setting[1] / levels

    ok = [s for s in _candidates(knob, grid, levels) if speed(s) >= lowest - _EPS]
    if not ok:
        return fmax, levels

    def cost(setting: Tuple[float, int]) -> Tuple[float, float]:
        late = risk.rate * risk.window * (1.0 / speed(setting) - 1.0) * risk.lateness
        energy = phase_energy(setting, need, grid, levels, risk.wait_level)
        return round(energy + late, 12), -speed(setting)

    return min(ok, key=cost)


def decide(knob: str, need: Interval, history: Sequence[float], current: Tuple[float, int],
           grid: Sequence[float], levels: int, widen: float = 1.0,
           risk: Optional[Risk] = None) -> Tuple[float, int]:
    """The next ``(frequency, level)`` of one cpu from its need interval and history.

    Provision ``predict(history, need) * (1 + widen * margin(history))``
    (at the setting ``choose`` gives under ``risk``); move down only when
    the high end of the need allows it, up only when the low end requires
    it (or the budget's floor rose above the current speed), and otherwise
    hold the current setting. ``widen`` (>= 1) is the critical-path guard's
    extra margin for a cpu that was late.
    """
    fmax = grid[-1]
    g = widen * margin(history)
    cur_speed = current[0] * current[1] / (fmax * levels)
    hi = choose(knob, min(1.0, predict(history, need[1]) * (1 + g)), grid, levels, risk)
    if hi[0] * hi[1] / (fmax * levels) < cur_speed - _EPS:
        return hi
    lo = choose(knob, min(1.0, predict(history, need[0]) * (1 + g)), grid, levels, risk)
    if lo[0] * lo[1] / (fmax * levels) > cur_speed + _EPS:
        return max(hi, lo, key=lambda s: s[0] * s[1])
    return current


def provision(histories: Sequence[Sequence[float]], widen: float = 1.0) -> Optional[float]:
    """The speed to provision for a window spanning phase types with these need histories.

    Each type asks for ``predict(history) * (1 + widen * margin(history))``;
    the window needs the largest. None when a type has no history yet: the
    caller then cannot predict and keeps its other rule.
    """
    if not histories or any(not h for h in histories):
        return None
    return min(1.0, max(predict(h[:-1], h[-1]) * (1 + widen * margin(h)) for h in histories))


def successor_types(site: int, successors: Mapping[int, int], window: int) -> Optional[list]:
    """The phase types of the next ``window`` phases after one ending at ``site``.

    ``successors`` maps a type to the type that followed it last time (a
    program's collectives come in a fixed order per iteration, as Adagio
    and COUNTDOWN exploit); None when the order is not known yet.
    """
    out = []
    here = site
    for _ in range(window):
        here = successors.get(here)
        if here is None:
            return None
        out.append(here)
    return out
