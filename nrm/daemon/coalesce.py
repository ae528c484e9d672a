"""Coalesce the events a downstream flood would publish, per reporting key.

An unthrottled program (``ratelimit: 0``, or many ranks) sends 100 k
messages/s; one event per message, sent to every listener, would keep the
daemon busy publishing, behind its downstream queue, with libzmq's queues
holding the backlog (benchmarks/load.py).  Listeners need the totals, not every step,
so at most one event per key and ``interval`` is published; what arrives
in between is summed into the next one, which carries ``messages``, how
many it stands for.

Sums keep the meaning: a progress ``payload`` is an increment and
``total`` the latest running total; a phase_context's ``aggregation``,
``computetime`` and ``totaltime`` are totals over phases, so summed they
are the totals over all the phases merged, and ``phase`` is the latest
cumulative count.  The first event of a key after a quiet ``interval`` goes
out at once, so a sender that respects libnrm's default 10 ms rate limit
sees its events unchanged.  Policies get every message directly; only
the published events are coalesced.
"""

from __future__ import annotations

import asyncio
from typing import Callable, Dict, Optional, Tuple

COALESCED_TOPICS = ("progress", "phase_context")
DEFAULT_INTERVAL_S = 0.01
MAX_KEYS = 4096

_SUMMED = {"progress": ("payload",),
           "phase_context": ("aggregation", "computetime", "totaltime")}


def _key(topic: str, body: dict) -> tuple:
    return (topic, body.get("container"), body.get("task"), body.get("app"),
            body.get("rank"), body.get("cpu"))


class EventCoalescer:
    """Wraps ``publish(topic, body)``; other topics pass straight through."""

    def __init__(self, loop: asyncio.AbstractEventLoop, publish: Callable[[str, dict], None],
                 interval: float = DEFAULT_INTERVAL_S, max_keys: int = MAX_KEYS):
        self.loop = loop
        self.publish = publish
        self.interval = interval
        self.max_keys = max_keys
        self._last: Dict[tuple, float] = {}             # key -> when last published
        self._pending: Dict[tuple, Tuple[str, dict]] = {}
        self._timer: Optional[asyncio.TimerHandle] = None
        self.counters = {"events_published": 0, "events_merged": 0}

    def offer(self, topic: str, body: dict) -> None:
        if topic not in COALESCED_TOPICS:
            self.publish(topic, body)
            return
        key = _key(topic, body)
        pending = self._pending.get(key)
        if pending is not None:
            merged = pending[1]
            for name in _SUMMED[topic]:
                merged[name] = merged.get(name, 0) + body.get(name, 0)
            for name, value in body.items():
                if name not in _SUMMED[topic]:
                    merged[name] = value
            merged["messages"] = merged.get("messages", 1) + 1
            self.counters["events_merged"] += 1
            return
        now = self.loop.time()
        last = self._last.get(key)
        if last is None or now - last >= self.interval:
            self._send(key, topic, body, now)
            return
        self._pending[key] = (topic, dict(body))
        if self._timer is None:
            self._timer = self.loop.call_at(last + self.interval, self.flush)

    def flush(self) -> None:
        """Publish everything pending now (also at container end and stop)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        now = self.loop.time()
        pending, self._pending = self._pending, {}
        for key, (topic, body) in pending.items():
            self._send(key, topic, body, now)

    def _send(self, key: tuple, topic: str, body: dict, now: float) -> None:
        if len(self._last) >= self.max_keys and key not in self._last:
            # keys quiet for an interval behave as unseen: forget them, and
            # everything if all are busy (coalescing then pauses one interval)
            self._last = {k: t for k, t in self._last.items() if now - t < self.interval}
            if len(self._last) >= self.max_keys:
                self._last.clear()
        self._last[key] = now
        self.counters["events_published"] += 1
        self.publish(topic, body)
