"""Node power cap: a closed loop over the packages' power limits.

The cap is for the node as measured (package + DRAM power), but the only
actuators are per-package limits (RAPL PL1, or the emulated limit), so:

* ``set_cap`` first splits the cap across packages in proportion to their
  last measured power (equally before any measurement, or when all read
  zero): an idle package then does not keep headroom a busy one needs.
* every sample, ``control_law`` moves the limits by ``gain`` times the error
  (cap - measured node power), shared out by the same proportions among
  the packages that can still move in that direction. This is an integral
  controller: it absorbs what the limits do not cover (DRAM, firmware
  inaccuracy) without a model. A deadband keeps a steady load from
  making it chatter, and limits are clamped to the hardware bounds, which
  also bounds the integral (no wind-up).

The loop acts at most once per ``period_s`` (1 s by default) on the mean
node power measured since its previous action. Each package limit is
itself a feedback loop (firmware RAPL averages over a ~1 s window; the
emulated limit converges over a few model steps); an outer loop acting
as fast as the inner one integrates the inner loop's transient and ends
in a limit cycle. Resetting the window after each action means every
decision is made on power measured under the limits it set.

The law is a pure function so its behaviour is tested with a table of
cases; the class only does I/O and bookkeeping.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from nrm.hw.registry import HardwareError, Platform, Sample
from nrm.log import RateLimitedLog

log = logging.getLogger(__name__)

CONTROL = "package.power_limit"
DEFAULT_GAIN = 0.5
DEFAULT_PERIOD_S = 1.0
MIN_DEADBAND_W = 0.5
DEADBAND_FRACTION = 0.02
FALLBACK_MIN_W = 1.0

Bounds = Mapping[int, Tuple[float, float]]


def default_deadband(cap_w: float) -> float:
    return max(MIN_DEADBAND_W, DEADBAND_FRACTION * cap_w)


def _clamp(v: float, lo: float, hi: float) -> float:
    return min(max(v, lo), hi)


def _weights(packages: Sequence[int], shares: Optional[Mapping[int, float]]) -> Dict[int, float]:
    """Normalised weights: measured shares when usable, else equal."""
    if shares:
        w = {p: max(float(shares.get(p) or 0.0), 0.0) for p in packages}
        total = sum(w.values())
        if total > 0:
            return {p: v / total for p, v in w.items()}
    return {p: 1.0 / len(packages) for p in packages} if packages else {}


def split_cap(cap_w: float, packages: Sequence[int], bounds: Bounds,
              shares: Optional[Mapping[int, float]] = None) -> Dict[int, float]:
    """Initial per-package limits for a node cap."""
    w = _weights(packages, shares)
    return {p: _clamp(cap_w * w[p], *bounds[p]) for p in packages}


def control_law(cap_w: float, measured_w: Optional[float], limits: Mapping[int, float],
                bounds: Bounds, shares: Optional[Mapping[int, float]] = None,
                gain: float = DEFAULT_GAIN, deadband_w: Optional[float] = None
                ) -> Dict[int, float]:
    """Next package limits for one measurement of node power.

    Returns the current limits (clamped) when there is no measurement, the
    error is inside the deadband, or every package is saturated in the
    direction the error asks for.
    """
    out = {p: _clamp(v, *bounds[p]) for p, v in limits.items()}
    if measured_w is None:
        return out
    error = cap_w - measured_w
    band = default_deadband(cap_w) if deadband_w is None else deadband_w
    if abs(error) <= band:
        return out
    movable = [p for p, v in out.items()
               if (error < 0 and v > bounds[p][0]) or (error > 0 and v < bounds[p][1])]
    if not movable:
        return out
    w = _weights(movable, shares)
    step = gain * error
    for p in movable:
        out[p] = _clamp(out[p] + step * w[p], *bounds[p])
    return out


class PowerCapController:
    """Keeps measured node power at or under a cap through package limits."""

    def __init__(self, platform: Platform, gain: float = DEFAULT_GAIN,
                 deadband_w: Optional[float] = None, min_change_w: float = 0.1,
                 period_s: float = DEFAULT_PERIOD_S):
        self.platform = platform
        self.gain = gain
        self.period_s = period_s
        self.deadband_w = deadband_w
        self.min_change_w = min_change_w
        self._lock = threading.Lock()
        self._rl_log = RateLimitedLog(log, 30.0)
        self._cap: Optional[float] = None
        self._limits: Dict[int, float] = {}
        self._bounds: Dict[int, Tuple[float, float]] = {}
        self._ceiling: Dict[int, float] = {}
        self._shares: Dict[int, float] = {}
        self._measured: Optional[float] = None
        self._window: list = []
        self._window_start: Optional[float] = None
        self._writes = 0
        self._errors = 0

    @property
    def cap(self) -> Optional[float]:
        return self._cap

    def _package_bounds(self) -> Dict[int, Tuple[float, float]]:
        info = self.platform.control_info(CONTROL)
        out = {}
        for p in info.indices:
            lo = info.minimum if info.minimum is not None else FALLBACK_MIN_W
            hi = info.maximum
            if hi is None:
                # Without a published maximum, never raise a limit above what
                # it was before this controller first touched it.
                if p not in self._ceiling:
                    self._ceiling[p] = self.platform.read(CONTROL, p)
                hi = self._ceiling[p]
            out[p] = (lo, max(hi, lo))
        return out

    def set_cap(self, watts: Optional[float]) -> Dict[int, float]:
        """Start capping (or stop with None); returns the initial package limits.

        Raises ValueError for a non-positive cap and HardwareError when the
        node has no power limit control or a write fails.
        """
        if watts is None:
            self.clear()
            return {}
        cap = float(watts)
        if not cap > 0:
            raise ValueError(f"power cap must be positive, got {watts!r}")
        with self._lock:
            bounds = self._package_bounds()
            limits = split_cap(cap, sorted(bounds), bounds, self._shares or None)
            self._bounds = bounds
            self._cap = cap
            self._reset_window()
            self._apply(limits, force=True)
            return dict(self._limits)

    def _reset_window(self) -> None:
        self._window = []
        self._window_start = None

    def clear(self) -> None:
        """Stop capping and put the original package limits back.

        Raises HardwareError when a limit cannot be put back; it stays
        journaled, so a later restore or the next daemon start retries it.
        """
        with self._lock:
            self._cap = None
            self._limits = {}
            try:
                self.platform.restore(CONTROL)
            except HardwareError as e:
                log.error("cannot restore package power limits: %s", e)
                raise

    def on_sample(self, sample: Sample) -> None:
        shares = {p: v.get("power_w") for p, v in sample.packages.items()
                  if v.get("power_w") is not None}
        with self._lock:
            if shares:
                self._shares = shares
            self._measured = sample.node_power_w
            if self._cap is None or sample.node_power_w is None or not self._limits:
                return
            if self._window_start is None:
                self._window_start = sample.time
            self._window.append(sample.node_power_w)
            if sample.time - self._window_start < self.period_s:
                return
            mean = sum(self._window) / len(self._window)
            self._reset_window()
            new = control_law(self._cap, mean, self._limits, self._bounds,
                              self._shares, self.gain, self.deadband_w)
            try:
                self._apply(new)
            except HardwareError as e:
                self._errors += 1
                self._rl_log.warning("power cap: %s", e)

    def _apply(self, limits: Mapping[int, float], force: bool = False) -> None:
        failures = []
        for p, v in sorted(limits.items()):
            old = self._limits.get(p)
            if not force and old is not None and abs(v - old) < self.min_change_w:
                continue
            try:
                self._limits[p] = self.platform.write(CONTROL, p, v)
                self._writes += 1
            except HardwareError as e:
                failures.append(str(e))
        if failures:
            raise HardwareError("; ".join(failures))

    def status(self) -> Dict[str, Any]:
        with self._lock:
            return {"cap_w": self._cap, "limits_w": {str(p): v for p, v in self._limits.items()},
                    "measured_w": self._measured, "writes": self._writes,
                    "errors": self._errors, "gain": self.gain, "period_s": self.period_s,
                    "deadband_w": None if self._cap is None else
                    (self.deadband_w if self.deadband_w is not None
                     else default_deadband(self._cap))}
