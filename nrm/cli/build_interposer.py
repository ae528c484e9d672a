"""nrm build-interposer: build the PMPI interposer against a site's own MPI.

`pip install` builds one interposer per MPI it finds at install time; on a
cluster the MPI programs use is often another one, reached by `module load`
later. This compiles the interposer source the install kept
(``<prefix>/share/nrm/src``) with that MPI's compiler wrapper, links it to
the installed libnrm, and puts it where nrmd looks: the install prefix's
lib by default. Needs no daemon.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

from nrm import paths

NAME = "build-interposer"
HELP = "build the PMPI interposer against an MPI compiler wrapper"

#: preprocessor macro that only Open MPI's mpi.h defines; the interposer's
#: file name tells nrmd which ABI it was built for
OPEN_MPI_MACRO = "#define OPEN_MPI 1"


def add_arguments(p) -> None:
    p.add_argument("--mpicc", metavar="PATH",
                   help="the MPI C compiler wrapper (default: $MPICC, else mpicc)")
    p.add_argument("--prefix", metavar="DIR",
                   help="install into DIR/lib (default: nrm's install prefix; elsewhere, "
                        "nrmd needs NRM_LIBRARY_PATH=DIR/lib or --pmpi-lib)")


class BuildError(Exception):
    pass


def _run(argv, **kw) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, capture_output=True, text=True, **kw)
    except OSError as exc:
        raise BuildError(f"cannot run {argv[0]}: {exc.strerror}") from None


def flavor_of(mpicc: str, workdir: str) -> str:
    probe = os.path.join(workdir, "probe.c")
    with open(probe, "w") as f:
        f.write("#include <mpi.h>\n")
    proc = _run([mpicc, "-E", "-dM", probe])
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise BuildError(f"{mpicc} cannot compile #include <mpi.h>: {last}")
    return "openmpi" if OPEN_MPI_MACRO in proc.stdout else "mpich"


def default_prefix() -> str:
    return paths.install_prefix() or sys.prefix


def build(mpicc: str, prefix: str) -> str:
    """Build and install; return the installed path."""
    src = paths.interposer_sources()
    if src is None:
        raise BuildError("the interposer source (share/nrm/src/pmpi.c) is not installed: "
                         "reinstall nrm with pip")
    libnrm = paths.find_lib("libnrm.so")
    if libnrm is None:
        raise BuildError("libnrm.so is not installed (see nrm status): the interposer "
                         "links to it")
    libdir = os.path.join(os.path.abspath(prefix), "lib")
    try:
        os.makedirs(libdir, exist_ok=True)
    except OSError as exc:
        raise BuildError(f"cannot create {libdir}: {exc.strerror} (use --prefix)") from None
    if not os.access(libdir, os.W_OK):
        raise BuildError(f"{libdir} is not writable (use --prefix DIR)")
    with tempfile.TemporaryDirectory(prefix="nrm-pmpi-") as work:
        flavor = flavor_of(mpicc, work)
        name = "libnrm-pmpi-openmpi.so" if flavor == "openmpi" else "libnrm-pmpi.so"
        out = os.path.join(work, name)
        libnrm_dir = os.path.dirname(libnrm)
        include = [f"-I{src}"]
        installed_include = os.path.join(os.path.dirname(libnrm_dir), "include")
        if os.path.exists(os.path.join(installed_include, "nrm.h")):
            include.append(f"-I{installed_include}")
        checkout_include = os.path.join(os.path.dirname(src), "include")
        if os.path.exists(os.path.join(checkout_include, "nrm.h")):
            include.append(f"-I{checkout_include}")
        argv = [mpicc, "-std=gnu11", "-O2", "-g", "-fPIC", "-shared", *include,
                f"-Wl,-soname,{name}", "-o", out, os.path.join(src, "pmpi.c"),
                f"-L{libnrm_dir}", f"-Wl,-rpath,{libnrm_dir}", "-Wl,-rpath,$ORIGIN",
                "-lnrm", "-lrt", "-pthread"]
        proc = _run(argv)
        if proc.returncode != 0 or not os.path.exists(out):
            sys.stderr.write(proc.stderr)
            raise BuildError(f"{mpicc} failed to build the interposer (exit {proc.returncode})")
        dest = os.path.join(libdir, name)
        # a copy next to the target, then a rename: a task starting now
        # preloads either the old file or the new one, never half of one
        tmp = dest + ".new"
        shutil.copyfile(out, tmp)
        os.chmod(tmp, 0o755)
        os.replace(tmp, dest)
    return dest


def execute(args) -> int:
    mpicc = args.mpicc or os.environ.get("MPICC") or "mpicc"
    found = shutil.which(mpicc)
    if found is None:
        print(f"nrm: build-interposer: MPI compiler wrapper {mpicc!r} not found "
              "(load your MPI module or pass --mpicc)", file=sys.stderr)
        return 1
    prefix = args.prefix or default_prefix()
    try:
        dest = build(found, prefix)
    except BuildError as exc:
        print(f"nrm: build-interposer: {exc}", file=sys.stderr)
        return 1
    print(f"built {dest} with {found}")
    if os.path.dirname(dest) not in paths.lib_dirs():
        print(f"nrmd looks for it with NRM_LIBRARY_PATH={os.path.dirname(dest)} in its "
              f"environment, or with --pmpi-lib {dest}")
    return 0
