"""The environment every task starts with, beyond what its client sent.

A task learns where to report (the downstream endpoint, its container and
task ids, the seed-era names older programs read), and, under a power
policy, gets the PMPI interposer preloaded: the one matching the MPI its
launcher belongs to, since an MPICH interposer in an Open MPI program
finds none of its symbols. When the container's policy throttles inside
MPI waits and the node has an actuator for it, the interposer is told how
(``NRM_INWAIT_*``, nrm.power.waitthrottle).
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

from nrm import paths
from nrm.hpc import mpi


class TaskEnvironment:
    def __init__(self, rundir: str, seed_downstream: Optional[str], pmpi_lib: Optional[str],
                 wait_throttle: Optional[Callable[..., Dict[str, str]]] = None):
        self.rundir = rundir
        self.wait_throttle = wait_throttle
        self.seed_downstream = seed_downstream
        self.pmpi_lib = pmpi_lib
        self.downstream_uri = paths.downstream_uri(rundir)

    def __call__(self, container, task, env: Dict[str, str]) -> Dict[str, str]:
        out = dict(env)
        out.update({
            "NRM_RUNTIME_DIR": self.rundir,
            "NRM_CONTAINER_ID": container.id,
            "NRM_TASK_ID": task.id,
            "NRM_DOWNSTREAM_URI": self.downstream_uri,
            "ARGO_CONTAINER_UUID": container.id,
            "AC_APP_NAME": container.manifest.name,
            "NRM_RATELIMIT": f"{container.manifest.monitoring.ratelimit:.9f}s",
        })
        if self.seed_downstream:
            out["ARGO_NRM_DOWNSTREAM_IN_URI"] = self.seed_downstream
        power = container.manifest.power
        if power.policy != "NONE":
            lib = self.pmpi_lib
            if not lib:
                flavor = mpi.launched_by(task.argv, out.get("PATH")) or mpi.MPICH
                lib = paths.find_pmpi_lib(None, flavor.pmpi)
            if lib:
                pre = out.get("LD_PRELOAD")
                out["LD_PRELOAD"] = f"{lib} {pre}" if pre else lib
            out["NRM_TRANSMIT"] = "1"
            out["NRM_DAMPER"] = f"{power.damper:.9f}"
        # only nrmd decides whether a rank throttles; the joined names are
        # searched in C first (a pilot's task has some 60 variables)
        if "NRM_INWAIT_" in "\0".join(out):
            for name in [k for k in out if k.startswith("NRM_INWAIT_")]:
                del out[name]
        if self.wait_throttle is not None:
            out.update(self.wait_throttle(container))
        return out
