"""Per-container power-policy managers in the daemon: the I/O edge of
nrm.power.policy.

A container whose manifest names a policy other than NONE gets a
``ContainerPolicy``. Phase contexts from its ranks go in as they arrive (no
timer); the decisions that come out are written through the hardware
platform and published as ``decision`` events. When the container ends its
cpus go back to full speed and the platform restores the values it saved
before the first write, so the node is never left throttled.

Decision latency is measured from the moment the ingest drained the
message's batch from the socket (``arrival``, a ``time.perf_counter()``
value) to the moment the last control it caused was written, so it covers
the queueing inside the daemon (the messages drained before it in the same
batch, decoding, the application manager) and not only the policy call.
Phase contexts that cause no write, and every phase context of a container
without a policy, go to a second histogram (arrival to handled): the
baseline the decision latency is compared with.
"""

from __future__ import annotations

import logging
import time
from typing import Dict, List, Optional

from nrm.log import RateLimitedLog
from nrm.power.latency import LatencyHistogram
from nrm.power.policy import budget
from nrm.power.policy.container import DUTY_CYCLE, FREQUENCY, ContainerPolicy, Decision
from nrm.power.policy.fixed import FixedPolicy

log = logging.getLogger(__name__)
rl_log = RateLimitedLog(log)

WARMUP_PHASES = 1
"""The interposer's first phase runs from MPI_Init to the first collective: skew, not slack."""

SETTLE_ROUNDS = 0
"""The policies read a mixed phase as a work interval (policy/crossrank.py): no firing skipped."""

CROSS_RANK = True
"""Each rank's need relative to the critical rank's work (policy/crossrank.py, docs/policies.md)."""

PHASE_WINDOW = 2
"""A decision is written after the collective's exit, so it lands inside the next phase and
stays until the next decision lands inside the one after: it must cover two phase types."""

SLOWDOWN_BUDGET = budget.BUDGET
"""The compute is slowed only as far as the observed rate of critical-rank changes keeps the
expected loss under this fraction of run time (policy/budget.py)."""


WAIT_ONLY = ("NONE", "COUNTDOWN")
"""Policies without per-phase decisions: COUNTDOWN is in-wait throttling alone, which the
ranks do themselves (nrm.power.waitthrottle), with NONE's settings otherwise."""


class _Active:
    def __init__(self, policy: ContainerPolicy, cpus: List[int]):
        self.policy = policy
        self.cpus = cpus
        self.decisions = 0
        self.lowest: Dict[int, float] = {}
        self.lowest_hz: Dict[int, float] = {}
        self.last: Dict[int, Dict[str, float]] = {}
        self.write_errors = 0


class PowerPolicyManager:
    """Owns one ContainerPolicy per container with a power policy, writes
    their decisions through the platform, and puts every cpu back when the
    container ends (a container listener)."""

    def __init__(self, platform, publish):
        self.platform = platform
        self.publish = publish
        self.active: Dict[str, _Active] = {}
        self.decision_latency = LatencyHistogram()
        self.handled_latency = LatencyHistogram()
        self.write_latency = LatencyHistogram()  # the platform's write alone, per control
        self.counters = {"decisions": 0, "write_errors": 0, "policy_errors": 0}

    # -- lifecycle (ContainerListener) -------------------------------------
    def container_started(self, container) -> None:
        power = container.manifest.power
        if power.policy in WAIT_ONLY or self.platform is None:
            return
        cpus = list(container.slice.cpus)
        freqs = {c: self.platform.frequencies(c) for c in cpus}
        try:
            policy = self._policy(power, cpus, freqs if any(freqs.values()) else None)
        except ValueError as exc:
            self.counters["policy_errors"] += 1
            log.warning("container %s: policy %s not started: %s", container.id,
                        power.policy, exc)
            self.publish("decision", {"container": container.id, "event": "error",
                                      "policy": power.policy, "message": str(exc)})
            return
        self.active[container.id] = _Active(policy, cpus)

    @staticmethod
    def _policy(power, cpus, freqs):
        if power.policy == "FIXED":
            return FixedPolicy(power.settings, cpus, frequencies=freqs, levels=16)
        return ContainerPolicy(power.policy, cpus, damper_s=power.damper,
                               slowdown=power.slowdown, frequencies=freqs,
                               levels=16, warmup_phases=WARMUP_PHASES,
                               settle_rounds=SETTLE_ROUNDS, cross_rank=CROSS_RANK,
                               phase_window=PHASE_WINDOW, slowdown_budget=SLOWDOWN_BUDGET)

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
            "lowest_frequency": {str(c): v for c, v in state.lowest_hz.items()},
            "emulated": bool(getattr(self.platform, "emulated", False)),
        }}

    # -- phase contexts ----------------------------------------------------
    def on_phase_context(self, container, msg, arrival: Optional[float] = None) -> None:
        """``arrival``: ``time.perf_counter()`` when the message's batch left the socket."""
        state = self.active.get(container.id)
        if state is None:
            if arrival is not None:
                self.handled_latency.record(time.perf_counter() - arrival)
            return
        if arrival is None:
            arrival = time.perf_counter()
        source = msg.rank if msg.rank >= 0 else msg.cpu
        decisions = state.policy.on_phase(source, msg.cpu, msg.aggregation,
                                          msg.computetime / 1e9, msg.totaltime / 1e9, msg.phase,
                                          msg.site)
        written = self._apply(container.id, state, decisions) if decisions else None
        if written is not None:
            self.decision_latency.record(written - arrival)
        else:
            self.handled_latency.record(time.perf_counter() - arrival)

    def _apply(self, cid: str, state: _Active, decisions: List[Decision]) -> Optional[float]:
        """Write the decisions; returns when the last successful write ended, if any."""
        written = None
        for d in decisions:
            start = time.perf_counter()
            try:
                applied = self.platform.write(d.control, d.cpu, d.new)
                written = time.perf_counter()
                self.write_latency.record(written - start)
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
            elif d.control == FREQUENCY:
                state.lowest_hz[d.cpu] = min(state.lowest_hz.get(d.cpu, applied), applied)
            self.publish("decision", {"container": cid, "cpu": d.cpu, "control": d.control,
                                      "old": d.old, "new": applied, "reason": d.reason})
        return written

    # -- queries -----------------------------------------------------------
    def latency(self) -> dict:
        """Arrival to control written: count, p50/p99/max/mean (us), since nrmd started."""
        out = self.decision_latency.summary()
        out.pop("histogram")
        return out

    def status(self) -> dict:
        """For ``nrm status``: the latencies with their cumulative buckets, and counters."""
        return {"decision_latency": self.decision_latency.summary(),
                "handled_latency": self.handled_latency.summary(),
                "write_latency": self.write_latency.summary(), **self.counters}

    def snapshot(self) -> dict:
        return {cid: {"policy": s.policy.policy, "cpus": s.cpus,
                      "settings": {str(c): v for c, v in s.policy.settings().items()},
                      "stats": dict(s.policy.stats)}
                for cid, s in self.active.items()}
