"""Power policies (DDCM, DVFS, COMBINED) as pure code; the daemon owns the actuators."""

from __future__ import annotations

from nrm.power.policy.combined import next_setting
from nrm.power.policy.ddcm import next_level
from nrm.power.policy.dvfs import next_frequency
from nrm.power.policy.container import POLICIES, ContainerPolicy, Decision

__all__ = [
    "POLICIES",
    "ContainerPolicy",
    "Decision",
    "next_frequency",
    "next_level",
    "next_setting",
]
