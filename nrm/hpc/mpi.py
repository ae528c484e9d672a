"""Which MPI compiler, launcher and interposer belong together.

Debian's `mpicc`/`mpiexec` alternatives point at whichever MPI has the
highest priority, so installing Open MPI next to MPICH silently moves them
(Open MPI's priority is 50, MPICH's 40). Everything in nrm that means a
given MPI names its own wrappers through this module instead, and so gets
the same answer on any machine whatever apt chose. An interposer built
against one MPI must only be preloaded into that MPI's programs: the
handles differ in type (ints in MPICH, pointers in Open MPI).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple


@dataclass(frozen=True)
class Mpi:
    """One MPI implementation: its compiler wrapper, its launcher, the flags
    it needs as root, and the PMPI interposer that matches its ABI."""
    name: str
    mpicc: str
    mpiexec: str
    #: interposer file name, as libnrm/Makefile names it for this MPI
    pmpi: str
    #: launcher options nrm's own runs always need
    args: Tuple[str, ...] = ()
    #: and those it needs to run ranks as root
    root_args: Tuple[str, ...] = ()
    root_env: Tuple[Tuple[str, str], ...] = ()

    def available(self) -> bool:
        return bool(shutil.which(self.mpicc) and shutil.which(self.mpiexec))

    def launcher(self) -> List[str]:
        """The launcher command, with the root flags when we are root."""
        root = list(self.root_args) if os.geteuid() == 0 else []
        return [self.mpiexec] + root + list(self.args)

    def env(self) -> Dict[str, str]:
        return dict(self.root_env) if os.geteuid() == 0 else {}


MPICH = Mpi(name="mpich", mpicc="mpicc.mpich", mpiexec="mpiexec.mpich",
            pmpi="libnrm-pmpi.so")

OPENMPI = Mpi(name="openmpi", mpicc="mpicc.openmpi", mpiexec="mpirun.openmpi",
              pmpi="libnrm-pmpi-openmpi.so",
              # Open MPI counts slots by cores and refuses more ranks than
              # the cpus it sees (a small slice, a shared CI machine).
              args=("--oversubscribe",), root_args=("--allow-run-as-root",),
              root_env=(("OMPI_ALLOW_RUN_AS_ROOT", "1"),
                        ("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")))


def find(name: str) -> Optional[Mpi]:
    """The MPI called ``name`` when its compiler and launcher are installed."""
    mpi = {"mpich": MPICH, "openmpi": OPENMPI}[name]
    return mpi if mpi.available() else None


#: launcher programs (after following symlinks) and the MPI they belong to
_LAUNCHERS = {
    "orterun": OPENMPI, "prterun": OPENMPI, "mpirun.openmpi": OPENMPI,
    "mpiexec.openmpi": OPENMPI,
    "mpiexec.hydra": MPICH, "mpiexec.mpich": MPICH, "mpirun.mpich": MPICH,
}


def launched_by(argv: List[str], path: Optional[str] = None) -> Optional[Mpi]:
    """The MPI whose launcher ``argv`` runs, or None when it is no known
    launcher. Debian's `mpiexec`/`mpirun` are alternatives symlinks, so the
    name is read after resolving them (with the task's PATH)."""
    if not argv:
        return None
    exe = shutil.which(argv[0], path=path) if os.sep not in argv[0] else argv[0]
    if exe is None:
        return None
    return _LAUNCHERS.get(os.path.basename(os.path.realpath(exe)))


def intel_missing() -> str:
    """Why Intel MPI cannot be used here ('' when it can): Debian's MPICH
    also installs an ``mpiexec.hydra``, so only Intel's own marks count."""
    if os.environ.get("I_MPI_ROOT") or shutil.which("impi_info"):
        return ""
    return "Intel MPI is not installed here (I_MPI_ROOT unset, no impi_info on PATH)"
