"""Per-container power-policy managers in the daemon: the I/O edge of
nrm.policy.

A container whose manifest names a policy other than NONE gets a
``ContainerPolicy``. Phase contexts from its ranks go in as they arrive (no
timer); the decisions that come out are written through the hardware
platform and published as ``decision`` events. When the container ends its
cpus go back to full speed and the platform restores the values it saved
before the first write, so the node is never left throttled.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Deque, Dict, List, Optional

from nrm.log import RateLimitedLog
from nrm.policy.manager import DUTY_CYCLE, FREQUENCY, ContainerPolicy, Decision

log = logging.getLogger(__name__)
rl_log = RateLimitedLog(log)

LATENCY_WINDOW = 4096


class _Active:
    def __init__(self, policy: ContainerPolicy, cpus: List[int]):
        self.policy = policy
        self.cpus = cpus
        self.decisions = 0
        self.lowest: Dict[int, float] = {}
        self.last: Dict[int, Dict[str, float]] = {}
        self.write_errors = 0


class PowerPolicyManager:
    def __init__(self, platform, publish):
        self.platform = platform
        self.publish = publish
        self.active: Dict[str, _Active] = {}
        self.latencies_s: Deque[float] = deque(maxlen=LATENCY_WINDOW)
        self.counters = {"decisions": 0, "write_errors": 0, "policy_errors": 0}

    # -- lifecycle (ContainerListener) -------------------------------------
    def container_started(self, container) -> None:
        power = container.manifest.power
        if power.policy == "NONE" or self.platform is None:
            return
        cpus = list(container.slice.cpus)
        freqs = {c: self.platform.frequencies(c) for c in cpus}
        try:
            policy = ContainerPolicy(power.policy, cpus, damper_s=power.damper,
                                     slowdown=power.slowdown,
                                     frequencies=freqs if any(freqs.values()) else None,
                                     levels=16)
        except ValueError as exc:
            self.counters["policy_errors"] += 1
            log.warning("container %s: policy %s not started: %s", container.id,
                        power.policy, exc)
            self.publish("decision", {"container": container.id, "event": "error",
                                      "policy": power.policy, "message": str(exc)})
            return
        self.active[container.id] = _Active(policy, cpus)

    def container_ended(self, container) -> Optional[dict]:
        state = self.active.pop(container.id, None)
        if state is None:
            return None
        settings_before = state.policy.settings()
        self._apply(container.id, state, state.policy.reset())
        for control in (DUTY_CYCLE, FREQUENCY):
            try:
                self.platform.restore(control, state.cpus)
            except Exception as exc:
                log.error("restoring %s on cpus %s: %s", control, state.cpus, exc)
        power = container.manifest.power
        return {"policy": {
            "name": power.policy, "damper_s": power.damper, "slowdown": power.slowdown,
            "stats": dict(state.policy.stats), "decisions": state.decisions,
            "write_errors": state.write_errors,
            "final_settings": {str(c): v for c, v in settings_before.items()},
            "lowest_level": {str(c): v for c, v in state.lowest.items()},
            "emulated": bool(getattr(self.platform, "emulated", False)),
        }}

    # -- phase contexts ----------------------------------------------------
    def on_phase_context(self, container, msg) -> None:
        state = self.active.get(container.id)
        if state is None:
            return
        start = time.perf_counter()
        source = msg.rank if msg.rank >= 0 else msg.cpu
        decisions = state.policy.on_phase(source, msg.cpu, msg.aggregation,
                                          msg.computetime / 1e9, msg.totaltime / 1e9, msg.phase)
        if decisions:
            self._apply(container.id, state, decisions)
            self.latencies_s.append(time.perf_counter() - start)

    def _apply(self, cid: str, state: _Active, decisions: List[Decision]) -> None:
        for d in decisions:
            try:
                applied = self.platform.write(d.control, d.cpu, d.new)
            except Exception as exc:
                state.write_errors += 1
                self.counters["write_errors"] += 1
                rl_log.warning("policy write %s cpu %d = %s failed: %s", d.control, d.cpu,
                               d.new, exc)
                continue
            state.decisions += 1
            self.counters["decisions"] += 1
            if d.control == DUTY_CYCLE:
                state.lowest[d.cpu] = min(state.lowest.get(d.cpu, 16), applied)
            self.publish("decision", {"container": cid, "cpu": d.cpu, "control": d.control,
                                      "old": d.old, "new": applied, "reason": d.reason})

    # -- queries -----------------------------------------------------------
    def latency(self) -> dict:
        values = sorted(self.latencies_s)
        if not values:
            return {"count": 0}
        return {"count": len(values), "p50_us": values[len(values) // 2] * 1e6,
                "p99_us": values[min(len(values) - 1, int(len(values) * 0.99))] * 1e6}

    def snapshot(self) -> dict:
        return {cid: {"policy": s.policy.policy, "cpus": s.cpus,
                      "settings": {str(c): v for c, v in s.policy.settings().items()},
                      "stats": dict(s.policy.stats)}
                for cid, s in self.active.items()}
