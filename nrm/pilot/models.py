"""QCG's parallel execution models as launcher commands.

``default`` and ``threads`` run the command as it is. The others start one
process per granted core:

``openmpi``
    ``mpirun.openmpi`` (or ``model_opts.mpirun``) ``-np N`` with the host
    list ``--host n1:2,n2:2`` when the grant spans nodes, then
    ``model_opts.mpirun_args``. mpirun runs in the slice of the first node;
    inside a Slurm allocation Open MPI starts its daemons on the other
    nodes itself (with srun), so those ranks are outside nrmd's slices.
``intelmpi``
    Intel MPI's ``mpirun -hosts ... -ppn`` with ``I_MPI_PIN_PROCESSOR_LIST``;
    refused when no Intel MPI is installed (checked at submit).
``srunmpi``
    an ``srun --overlap`` step over the granted nodes (``--distribution=
    arbitrary`` from the task's hostfile), each rank started as
    ``nrm run MANIFEST CMD``: every rank is a client of its own node's nrmd
    and runs in a slice there. ``model_opts.srun_args`` adds options
    (``--mpi=pmi2`` for MPICH).
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Dict, List

from nrm.hpc import mpi
from nrm.pilot.model import Allocation, Task

PARALLEL = ("openmpi", "intelmpi", "srunmpi")


class ModelError(ValueError):
    pass


def nrm_command() -> List[str]:
    """This installation's ``nrm`` (beside the running python), for ranks."""
    exe = os.path.join(os.path.dirname(sys.executable), "nrm")
    return [exe] if os.access(exe, os.X_OK) else [sys.executable, "-m", "nrm.cli.main"]


def wrap(task: Task, alloc: Allocation, argv: List[str], env: Dict[str, str],
         rank_manifest: str = "") -> List[str]:
    """``argv`` under the job's execution model (``env`` gains what the
    launcher needs)."""
    ex = task.job.spec.execution
    name = ex.model
    if name not in PARALLEL:
        return argv
    opts = ex.model_opts or {}
    ncores = str(alloc.ncores)
    multi = len(alloc.parts) > 1
    if name == "openmpi":
        launcher = [opts["mpirun"]] if opts.get("mpirun") else mpi.OPENMPI.launcher()
        env.update(mpi.OPENMPI.env())
        hosts = ["--host", ",".join(f"{n}:{len(c)}" for n, c in alloc.parts)] if multi else []
        return launcher + ["-np", ncores] + hosts + list(opts.get("mpirun_args") or ()) + argv
    if name == "intelmpi":
        launcher = [opts.get("mpirun") or "mpirun"]
        env["I_MPI_PIN_PROCESSOR_LIST"] = env.get("QCG_PM_CPU_SET", "")
        hosts = ["-hosts", ",".join(alloc.nodes)] if multi else []
        return launcher + ["-n", ncores] + hosts + list(opts.get("mpirun_args") or ()) + argv
    if shutil.which("srun") is None or not (env.get("SLURM_JOB_ID")
                                            or os.environ.get("SLURM_JOB_ID")):
        raise ModelError("execution model srunmpi needs a Slurm allocation (srun, SLURM_JOB_ID)")
    # srun reads this one as --ntasks-per-node, and N(xK) is not its syntax
    env.pop("SLURM_NTASKS_PER_NODE", None)
    ranks = nrm_command() + ["run", rank_manifest] + argv if rank_manifest else argv
    return (["srun", "--overlap", "--nodelist", ",".join(alloc.nodes), "-N", str(len(alloc.parts)),
             "-n", ncores, "--distribution=arbitrary", "--kill-on-bad-exit=1"]
            + list(opts.get("srun_args") or ()) + ranks)
