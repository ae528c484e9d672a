"""What the web side reads: the daemon's managers, handed over at start.

The HTTP server never holds the daemon itself: it gets this read-only view
of the managers it reports on, so what it can reach is written down here
and nowhere else. Any of the optional parts may be None (no hardware, a
part that did not start); every reader copes.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, Optional


@dataclass
class Sources:
    """The managers the web side reads, and only those."""
    started: float                       # when nrmd started (Unix time)
    status: Callable[[], dict]           # what `nrm status --json` shows
    containers: Any                      # nrm.containers.manager.ContainerManager
    runtime: Any                         # nrm.containers.runtimes.Runtime
    request_counts: Dict[str, int]
    upstream: Any = None                 # nrm.daemon.upstream.Upstream (its counters)
    platform: Any = None                 # nrm.hw.registry.Platform
    power: Any = None                    # nrm.power.node.NodePower
    policies: Any = None                 # nrm.power.policies.PowerPolicyManager
    apps: Any = None                     # nrm.daemon.applications.ApplicationManager
    ingest: Any = None                   # nrm.daemon.ingest.Ingest
    downstream_rejects: Dict[str, int] = field(default_factory=dict)

    @property
    def sensors(self):
        return self.power.sensors if self.power is not None else None

    @property
    def power_history(self) -> Deque[dict]:
        return self.power.history.samples if self.power is not None else _EMPTY

    @property
    def decision_history(self) -> Deque[dict]:
        return self.power.history.decisions if self.power is not None else _EMPTY

    @property
    def latest_sample(self) -> Optional[dict]:
        return self.power.history.latest if self.power is not None else None

    @property
    def power_cap(self) -> Optional[float]:
        return self.power.cap_w if self.power is not None else None


_EMPTY: Deque[dict] = deque(maxlen=0)
