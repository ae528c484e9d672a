"""Runtimes: how a container's slice is enforced.

`make_runtime("auto")` picks cgroup v2 when the unified hierarchy offers
the cpuset and memory controllers and spawner processes exist (v2 moves
whole processes), else cgroup v1 when this process can write it, else cpu
affinity. `--runtime cgroup` makes the same choice between v2 and v1 and
refuses when neither works. The reasons for what was not picked go to
`nrm status`.
"""

from __future__ import annotations

from typing import List, Tuple

from nrm.containers.runtimes.affinity import AffinityRuntime
from nrm.containers.runtimes.base import Handle, Runtime, RuntimeError_, SCHED_POLICIES
from nrm.containers.runtimes.cgroup import CgroupRuntime, cgroup_usable
from nrm.containers.runtimes.cgroup2 import Cgroup2Runtime, cgroup2_usable
from nrm.containers.runtimes.wrappers import SingularityRuntime

KINDS = ("auto", "cgroup", "affinity", "singularity")

__all__ = ["make_runtime", "Runtime", "Handle", "RuntimeError_", "SCHED_POLICIES", "KINDS"]


def _cgroups(prefix: str, spawners: int, root: str) -> Tuple[Runtime, List[str]]:
    """The best cgroup runtime, or (None, reasons)."""
    reasons = []
    reason = cgroup2_usable(root)
    if reason is None and spawners <= 0:
        reason = "cgroup v2 needs spawner processes (--spawners 0 was given)"
    if reason is None:
        try:
            return Cgroup2Runtime(prefix, root), []
        except RuntimeError_ as exc:
            reason = str(exc)
    reasons.append(f"cgroup v2 not used: {reason}")
    reason = cgroup_usable()
    if reason is None:
        return CgroupRuntime(prefix), reasons
    reasons.append(f"cgroup v1 not used: {reason}")
    return None, reasons


def _isolation(prefix: str, spawners: int, root: str) -> Runtime:
    runtime, reasons = _cgroups(prefix, spawners, root)
    if runtime is None:
        runtime = AffinityRuntime()
    runtime.notes = list(runtime.notes) + reasons
    return runtime


def make_runtime(kind: str = "auto", prefix: str = "nrm", spawners: int = 0,
                 root: str = "/") -> Runtime:
    """``root``: where the cgroup2 mount table and hierarchy are looked up."""
    if kind == "auto":
        return _isolation(prefix, spawners, root)
    if kind == "cgroup":
        runtime, reasons = _cgroups(prefix, spawners, root)
        if runtime is None:
            raise RuntimeError_("runtime cgroup unavailable: " + "; ".join(reasons))
        runtime.notes = list(runtime.notes) + reasons
        return runtime
    if kind == "affinity":
        return AffinityRuntime()
    if kind == "singularity":
        return SingularityRuntime(_isolation(prefix, spawners, root))
    raise RuntimeError_(f"unknown runtime {kind!r}; choose one of {', '.join(KINDS)}")
