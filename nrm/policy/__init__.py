"""Power policies (DDCM, DVFS, COMBINED) as pure code; the daemon owns the actuators."""

from __future__ import annotations

from nrm.policy.combined import next_setting
from nrm.policy.ddcm import next_level
from nrm.policy.dvfs import next_frequency
from nrm.policy.manager import POLICIES, ContainerPolicy, Decision

__all__ = [
    "POLICIES",
    "ContainerPolicy",
    "Decision",
    "next_frequency",
    "next_level",
    "next_setting",
]
