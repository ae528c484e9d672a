"""Isolation by cpu affinity only: for unprivileged daemons.

Children inherit the spawning thread's affinity, so binding costs nothing at
launch. There is no memory isolation and a task may widen its own affinity;
`nrm status` says so.
"""

from __future__ import annotations

import contextlib
import os

from nrm.containers.runtimes.base import Runtime


class AffinityRuntime(Runtime):
    name = "affinity"
    isolates_memory = False
    notes = ["cpu affinity only: no memory isolation; tasks can change their own affinity"]

    @contextlib.contextmanager
    def _membership(self, handle):
        saved = os.sched_getaffinity(0)
        os.sched_setaffinity(0, handle.cpus)
        try:
            yield
        finally:
            os.sched_setaffinity(0, saved)

    def placement(self, handle, bind_cpus):
        return {"join": [], "cpus": list(bind_cpus or handle.cpus)}
