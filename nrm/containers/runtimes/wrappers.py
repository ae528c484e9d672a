"""Runtimes that wrap the command in a container tool (Singularity or
Apptainer). Isolation of cpus and memory still comes from an inner runtime
(cgroup or affinity); the tool adds the image. It refuses to start when
its binary is missing.
"""

from __future__ import annotations

import shutil
from typing import List

from nrm.containers.runtimes.base import Handle, Runtime, RuntimeError_


class WrappingRuntime(Runtime):
    """Isolation from an inner runtime, the command wrapped in a container
    tool."""

    binary_names: tuple = ()

    def __init__(self, inner: Runtime, binary: str = None):
        self.inner = inner
        self.binary = binary or next(
            (shutil.which(b) for b in self.binary_names if shutil.which(b)), None)
        if not self.binary:
            raise RuntimeError_(
                f"runtime {self.name} needs one of {', '.join(self.binary_names)} on PATH")
        self.isolates_memory = inner.isolates_memory
        self.in_process = inner.in_process
        self.notes = [f"{self.binary} over {inner.name}"] + list(inner.notes)

    def create(self, cid, cpus, mems) -> Handle:
        return self.inner.create(cid, cpus, mems)

    def _membership(self, handle):
        return self.inner._membership(handle)

    def placement(self, handle, bind_cpus):
        return self.inner.placement(handle, bind_cpus)

    def adopt(self, handle, pid):
        self.inner.adopt(handle, pid)

    def pids(self, handle):
        return self.inner.pids(handle)

    def kill_all(self, handle, sig=9):
        self.inner.kill_all(handle, sig)

    def remove(self, handle):
        self.inner.remove(handle)

    def cgroup_dirs(self, handle):
        return self.inner.cgroup_dirs(handle)

    def take_over(self, handle, pids):
        self.inner.take_over(handle, pids)

    def stale_pids(self, record_cgroups):
        return self.inner.stale_pids(record_cgroups)

    def reap_stale(self):
        return self.inner.reap_stale()

    def close(self):
        self.inner.close()


class SingularityRuntime(WrappingRuntime):
    name = "singularity"
    binary_names = ("apptainer", "singularity")

    def wrap(self, handle: Handle, argv: List[str]) -> List[str]:
        image = getattr(handle, "image", None)
        if image is None:
            raise RuntimeError_("the singularity runtime needs app.image.path in the manifest")
        cmd = [self.binary, "exec"]
        for b in image.binds:
            cmd += ["--bind", b]
        return cmd + [image.path] + list(argv)
