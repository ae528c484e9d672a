"""Where nrm's sockets, journal and libraries live.

Daemon and clients compute the same runtime directory from the same rules so
that `nrm` finds the node-local `nrmd` without flags: `--runtime-dir` or
`NRM_RUNTIME_DIR` first, then `/run/nrm` for root, `$XDG_RUNTIME_DIR/nrm`, and
`/tmp/nrm-<uid>` last.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

SEED_DOWNSTREAM_URI = "ipc:///tmp/nrm-downstream-in"


def default_runtime_dir() -> str:
    if os.geteuid() == 0:
        return "/run/nrm"
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        return os.path.join(xdg, "nrm")
    return f"/tmp/nrm-{os.getuid()}"


def runtime_dir(explicit: Optional[str] = None) -> str:
    """Clients inside a Slurm step on a host running several slurmd (fake
    nodes) find their node's daemon at ``<root>/<SLURMD_NODENAME>`` when a
    daemon was started with ``--node-name``; a root daemon's ``/run/nrm``
    is tried for unprivileged clients too."""
    if explicit:
        return os.path.abspath(explicit)
    env = os.environ.get("NRM_RUNTIME_DIR")
    if env:
        return os.path.abspath(env)
    node = os.environ.get("SLURMD_NODENAME")
    candidates = [default_runtime_dir()]
    if os.geteuid() != 0:
        candidates.append("/run/nrm")
    for base in candidates:
        if node and os.path.exists(os.path.join(base, node, "upstream")):
            return os.path.join(base, node)
        if os.path.exists(os.path.join(base, "upstream")):
            return base
    return candidates[0]


def upstream_uri(rundir: str) -> str:
    return "ipc://" + os.path.join(rundir, "upstream")


def events_uri(rundir: str) -> str:
    return "ipc://" + os.path.join(rundir, "events")


def downstream_uri(rundir: str) -> str:
    return "ipc://" + os.path.join(rundir, "downstream")


def journal_path(rundir: str) -> str:
    return os.path.join(rundir, "controls.journal")


def lib_dirs():
    """Directories searched for libnrm: the venv/prefix first, then system."""
    return [os.path.join(sys.prefix, "lib"), "/usr/local/lib", "/usr/lib"]


def find_spawner() -> Optional[str]:
    """nrm-spawner, nrmd's launch helper (libnrm/src/spawner.c): installed
    next to libnrm, or in this checkout's libnrm build."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    candidates = [os.path.join(os.path.dirname(d), "libexec", "nrm", "nrm-spawner")
                  for d in lib_dirs()]
    candidates.append(os.path.join(here, "libnrm", "build", "nrm-spawner"))
    for path in candidates:
        if os.access(path, os.X_OK):
            return path
    return None


def find_pmpi_lib(explicit: Optional[str] = None,
                  name: str = "libnrm-pmpi.so") -> Optional[str]:
    """``name``: libnrm-pmpi.so (MPICH and its ABI) or libnrm-pmpi-openmpi.so."""
    if explicit:
        return explicit
    for d in lib_dirs():
        path = os.path.join(d, name)
        if os.path.exists(path):
            return path
    return None
