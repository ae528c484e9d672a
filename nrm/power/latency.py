"""A bounded latency histogram: log-spaced buckets, cumulative over the daemon's life.

The daemon records one latency per phase context, possibly hundreds of
thousands per second, for as long as it runs: keeping samples (or sorting a
window of them on every query) would cost memory or time that grows with
the load. Fixed log-spaced buckets cost one bisection per record, a few
hundred integers of memory, and percentiles within one bucket's width
(``1 / per_decade`` of a decade, ~12 % at the default 20). The counts are
cumulative, so a reader (a benchmark, Prometheus) takes the difference of
two snapshots to get the distribution of an interval.
"""

from __future__ import annotations

import bisect
import math
from typing import Dict, List, Mapping, Optional, Sequence

MIN_S = 1e-6
MAX_S = 10.0
PER_DECADE = 20


def bucket_bounds(min_s: float = MIN_S, max_s: float = MAX_S,
                  per_decade: int = PER_DECADE) -> List[float]:
    """Upper bounds (s) of the buckets; a last, open bucket holds what lies above."""
    decades = math.log10(max_s / min_s)
    n = int(round(decades * per_decade))
    return [min_s * 10 ** (i / per_decade) for i in range(n + 1)]


class LatencyHistogram:
    """Count latencies (seconds) into fixed buckets; ``summary()`` for status."""

    def __init__(self, bounds: Optional[Sequence[float]] = None) -> None:
        self.bounds = list(bounds) if bounds is not None else bucket_bounds()
        self.counts = [0] * (len(self.bounds) + 1)
        self.count = 0
        self.sum_s = 0.0
        self.max_s = 0.0

    def record(self, seconds: float) -> None:
        if not seconds >= 0.0:  # NaN or a clock that went backwards: not a latency
            return
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.count += 1
        self.sum_s += seconds
        if seconds > self.max_s:
            self.max_s = seconds

    def snapshot(self) -> Dict[str, object]:
        """Cumulative counts: ``{"bounds_s": [...], "counts": [...], ...}``."""
        return {"bounds_s": list(self.bounds), "counts": list(self.counts), "count": self.count,
                "sum_s": self.sum_s, "max_s": self.max_s}

    def summary(self) -> Dict[str, object]:
        """Count, median, p99 and max in microseconds, plus the cumulative buckets.

        A percentile is its bucket's upper bound, but never above the largest
        value recorded (with a few records the bound can be, and a p50 above
        the max reads as a bug).
        """
        out: Dict[str, object] = {"count": self.count}
        if self.count:
            out.update(p50_us=min(percentile(self.bounds, self.counts, 0.50), self.max_s) * 1e6,
                       p99_us=min(percentile(self.bounds, self.counts, 0.99), self.max_s) * 1e6,
                       max_us=self.max_s * 1e6, mean_us=self.sum_s / self.count * 1e6)
        out["histogram"] = self.snapshot()
        return out


def percentile(bounds: Sequence[float], counts: Sequence[int], q: float) -> float:
    """Upper bound of the bucket holding quantile ``q`` (an over-estimate by < 1 bucket).

    The open last bucket reports the last bound: "at least this much".
    """
    total = sum(counts)
    if total <= 0:
        return math.nan
    rank = max(1, math.ceil(q * total))
    seen = 0
    for i, c in enumerate(counts):
        seen += c
        if seen >= rank:
            return bounds[min(i, len(bounds) - 1)]
    return bounds[-1]


def difference(after: Mapping[str, object], before: Optional[Mapping[str, object]]
               ) -> List[int]:
    """Bucket counts recorded between two snapshots of the same histogram."""
    now = list(after["counts"])  # type: ignore[arg-type]
    if not before:
        return now
    return [a - b for a, b in zip(now, before["counts"])]  # type: ignore[arg-type]
