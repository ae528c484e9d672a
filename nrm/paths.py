"""Where nrm's sockets, journal and libraries live.

Daemon and clients compute the same runtime directory from the same rules so
that `nrm` finds the node-local `nrmd` without flags: `--runtime-dir` or
`NRM_RUNTIME_DIR` first, then `/run/nrm` for root, `$XDG_RUNTIME_DIR/nrm`, and
`/tmp/nrm-<uid>` last.

A client hands nrmd its whole environment, so it must never talk to an
impostor: it prefers the system daemon in `/run/nrm` when one serves there,
and trusts a runtime dir and socket only when they belong to root or to the
caller and nobody else can write the dir (`trust_problem`). Anyone can create
`/tmp/nrm-<victim uid>` before the victim does.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from typing import List, Optional

SEED_DOWNSTREAM_URI = "ipc:///tmp/nrm-downstream-in"
SYSTEM_RUNTIME_DIR = "/run/nrm"


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
        candidates.insert(0, SYSTEM_RUNTIME_DIR)
    for base in candidates:
        if node and os.path.exists(os.path.join(base, node, "upstream")):
            return os.path.join(base, node)
        if os.path.exists(os.path.join(base, "upstream")):
            return base
    return candidates[-1]


def own_dir_problem(path: str) -> Optional[str]:
    """Why nrmd must not use ``path`` as its runtime dir, or None: it must be
    a real directory of nrmd's own user that nobody else may write, or
    someone else could plant its lock, journal or state log (as symlinks
    to files nrmd would then overwrite, or with values it would restore)."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        return f"cannot inspect runtime dir {path}: {exc.strerror}"
    if stat.S_ISLNK(st.st_mode):
        return f"runtime dir {path} is a symlink"
    if not stat.S_ISDIR(st.st_mode):
        return f"runtime dir {path} is not a directory"
    if st.st_uid != os.geteuid():
        return (f"runtime dir {path} belongs to uid {st.st_uid}, "
                f"not to nrmd's user (uid {os.geteuid()})")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"runtime dir {path} is writable by others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _owner_problem(path: str, what: str, st: os.stat_result) -> Optional[str]:
    if st.st_uid not in (0, os.getuid()):
        return f"{what} {path} belongs to uid {st.st_uid}, not to root or to you"
    return None


def trust_problem(rundir: str, name: str = "upstream") -> Optional[str]:
    """Why the socket ``name`` in ``rundir`` cannot be trusted, or None.

    Trusted: the dir (and every link on the way to it, and the socket) owned
    by root or by the caller, and the dir writable by nobody else, so nobody
    else can have put or swapped the socket there."""
    try:
        link = os.lstat(rundir)
    except FileNotFoundError:
        return None     # nothing to trust: "not running" is the caller's to say
    except OSError as exc:
        return f"cannot inspect runtime dir {rundir}: {exc.strerror}"
    try:
        if stat.S_ISLNK(link.st_mode):
            problem = _owner_problem(rundir, "runtime dir link", link)
            if problem:
                return problem
        st = os.stat(rundir)
    except OSError as exc:
        return f"cannot inspect runtime dir {rundir}: {exc.strerror}"
    problem = _owner_problem(rundir, "runtime dir", st)
    if problem:
        return problem
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"runtime dir {rundir} is writable by others (mode {stat.S_IMODE(st.st_mode):o})"
    sock = os.path.join(rundir, name)
    try:
        sst = os.lstat(sock)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot inspect {sock}: {exc.strerror}"
    if not stat.S_ISSOCK(sst.st_mode):
        return f"{sock} is not a socket"
    return _owner_problem(sock, "socket", sst)


def upstream_uri(rundir: str) -> str:
    return "ipc://" + os.path.join(rundir, "upstream")


def events_uri(rundir: str) -> str:
    return "ipc://" + os.path.join(rundir, "events")


def downstream_uri(rundir: str) -> str:
    return "ipc://" + os.path.join(rundir, "downstream")


def journal_path(rundir: str) -> str:
    return os.path.join(rundir, "controls.journal")


def install_prefix() -> Optional[str]:
    """The prefix this nrm was installed into (a venv, ``pip install --prefix``,
    ``--user``'s ~/.local, pipx's venv, /usr): ``<prefix>/lib/pythonX.Y/
    site-packages/nrm``. The C parts go to the same prefix (the wheel's data
    scheme), which need not be ``sys.prefix``. None for a checkout."""
    site = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    pydir = os.path.dirname(site)
    libdir = os.path.dirname(pydir)
    if os.path.basename(pydir).startswith("python") and \
            os.path.basename(libdir) in ("lib", "lib64"):
        return os.path.dirname(libdir)
    return None


def lib_dirs() -> List[str]:
    """Directories searched for libnrm and the interposers: ``NRM_LIBRARY_PATH``
    (colon-separated, e.g. where ``nrm build-interposer --prefix`` put one),
    nrm's install prefix, the venv, then the system."""
    dirs = [d for d in os.environ.get("NRM_LIBRARY_PATH", "").split(":") if d]
    for prefix in (install_prefix(), sys.prefix):
        if prefix:
            dirs.append(os.path.join(prefix, "lib"))
    dirs += ["/usr/local/lib", "/usr/lib"]
    return list(dict.fromkeys(os.path.abspath(d) for d in dirs))


def checkout_build() -> str:
    """``make -C libnrm``'s build directory in a checkout."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(here, "libnrm", "build")


def find_spawner() -> Optional[str]:
    """nrm-spawner, nrmd's launch helper (libnrm/src/spawner.c): installed
    in ``<prefix>/libexec/nrm`` next to libnrm, or in this checkout's build."""
    candidates = [os.path.join(os.path.dirname(d), "libexec", "nrm", "nrm-spawner")
                  for d in lib_dirs()]
    candidates.append(os.path.join(checkout_build(), "nrm-spawner"))
    for path in candidates:
        if os.access(path, os.X_OK):
            return path
    return None


def find_lib(name: str) -> Optional[str]:
    for d in lib_dirs():
        path = os.path.join(d, name)
        if os.path.exists(path):
            return path
    return None


def find_pmpi_lib(explicit: Optional[str] = None,
                  name: str = "libnrm-pmpi.so") -> Optional[str]:
    """``name``: libnrm-pmpi.so (MPICH and its ABI) or libnrm-pmpi-openmpi.so."""
    if explicit:
        return explicit
    return find_lib(name)


def interposer_sources() -> Optional[str]:
    """A directory holding pmpi.c with the headers it includes: installed in
    ``<prefix>/share/nrm/src`` by the build, or this checkout's libnrm."""
    for d in lib_dirs():
        src = os.path.join(os.path.dirname(d), "share", "nrm", "src")
        if os.path.exists(os.path.join(src, "pmpi.c")):
            return src
    src = os.path.join(os.path.dirname(checkout_build()), "src")
    return src if os.path.exists(os.path.join(src, "pmpi.c")) else None


def build_record() -> dict:
    """What the C build made and skipped (libnrm/CMakeLists.txt writes
    ``<prefix>/share/nrm/build.json``); empty when there is none."""
    for d in lib_dirs() + [checkout_build()]:
        for path in (os.path.join(os.path.dirname(d), "share", "nrm", "build.json"),
                     os.path.join(d, "build.json")):
            try:
                with open(path) as f:
                    record = json.load(f)
            except (OSError, ValueError):
                continue
            if isinstance(record, dict):
                return record
    return {}


#: part name in the build record -> how to find it now
C_PARTS = {
    "nrm-spawner": find_spawner,
    "libnrm": lambda: find_lib("libnrm.so"),
    "fortran": lambda: find_lib("libnrmf.so"),
    "pmpi-mpich": lambda: find_pmpi_lib(None, "libnrm-pmpi.so"),
    "pmpi-openmpi": lambda: find_pmpi_lib(None, "libnrm-pmpi-openmpi.so"),
}


def c_parts() -> dict:
    """The C parts as nrmd sees them now: ``found`` (part -> path) and
    ``missing`` (part -> why: the build's reason for skipping it, when it
    recorded one). Looked up live, so that an interposer built later with
    ``nrm build-interposer`` counts."""
    skipped = build_record().get("skipped") or {}
    found, missing = {}, {}
    for part, find in C_PARTS.items():
        path = find()
        if path:
            found[part] = path
        else:
            missing[part] = str(skipped.get(part) or "not installed")
    return {"found": found, "missing": missing}
