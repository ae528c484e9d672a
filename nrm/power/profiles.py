"""Exit profiles: what a container cost, merged into its exit report.

A container whose manifest asks for ``power.profile`` gets the node energy
over its life (sensor readings at its start and end). Every container gets
its cpu time when the runtime can tell, the node power series over its life
and the power-policy decisions taken for it: ``nrm report`` draws them, so
that a slowdown or an energy saving can be traced to what the policy did.
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, Optional

from nrm.power.node import NodePower, since

log = logging.getLogger(__name__)

PROFILE_SERIES_POINTS = 2000


class ProfileListener:
    """A container listener (nrm.containers.model.ContainerListener)
    building exit profiles."""

    def __init__(self, power: Optional[NodePower], cpu_time: Optional[Callable] = None):
        self.power = power
        self.cpu_time = cpu_time

    def container_started(self, container) -> None:
        if container.manifest.power.profile and self.power is not None:
            try:
                self.power.sensors.begin_profile(container.id)
            except Exception:
                log.exception("profile start for %s", container.id)

    def container_ended(self, container) -> Optional[dict]:
        out: Dict[str, object] = {"uid": container.uid}
        if container.manifest.power.profile and self.power is not None:
            try:
                out["energy"] = self.power.sensors.end_profile(container.id)
            except Exception as exc:
                log.exception("profile end for %s", container.id)
                out["energy_error"] = str(exc)
        if self.cpu_time is not None:
            out["cpu_time_s"] = self.cpu_time(container.handle)
        t0 = container.created
        samples = self.power.history.samples if self.power is not None else ()
        decisions = self.power.history.decisions if self.power is not None else ()
        series = [[s["wall_time"], s.get("node_power_w")] for s in since(samples, "wall_time", t0)]
        step = max(1, len(series) // PROFILE_SERIES_POINTS)
        out["power_series"] = series[::step]
        out["decisions"] = [d for d in since(decisions, "time", t0)
                            if d.get("container") == container.id][-PROFILE_SERIES_POINTS:]
        return out
