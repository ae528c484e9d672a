"""Runtimes: how a container's slice is enforced.

`make_runtime("auto")` picks cgroup when this process can write cgroups,
else affinity.
"""

from __future__ import annotations

from typing import Tuple

from nrm.runtimes.affinity import AffinityRuntime
from nrm.runtimes.base import Handle, Runtime, RuntimeError_, SCHED_POLICIES
from nrm.runtimes.cgroup import CgroupRuntime, cgroup_usable
from nrm.runtimes.wrappers import NodeOSRuntime, SingularityRuntime

KINDS = ("auto", "cgroup", "affinity", "nodeos", "singularity")

__all__ = ["make_runtime", "Runtime", "Handle", "RuntimeError_", "SCHED_POLICIES", "KINDS"]


def _isolation(prefix: str) -> Tuple[Runtime, str]:
    reason = cgroup_usable()
    if reason is None:
        return CgroupRuntime(prefix), ""
    return AffinityRuntime(), reason


def make_runtime(kind: str = "auto", prefix: str = "nrm") -> Runtime:
    if kind == "auto":
        runtime, reason = _isolation(prefix)
        if reason:
            runtime.notes = list(runtime.notes) + [f"cgroups not used: {reason}"]
        return runtime
    if kind == "cgroup":
        reason = cgroup_usable()
        if reason:
            raise RuntimeError_(f"runtime cgroup unavailable: {reason}")
        return CgroupRuntime(prefix)
    if kind == "affinity":
        return AffinityRuntime()
    if kind == "singularity":
        return SingularityRuntime(_isolation(prefix)[0])
    if kind == "nodeos":
        return NodeOSRuntime(_isolation(prefix)[0])
    raise RuntimeError_(f"unknown runtime {kind!r}; choose one of {', '.join(KINDS)}")
