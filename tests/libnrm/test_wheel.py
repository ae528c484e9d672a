"""The wheel pip builds from this checkout, installed into a fresh venv, is a
whole nrm: the C parts built by the package's own build (libnrm/CMakeLists.txt
through scikit-build-core) land in the venv's prefix, nrmd uses nrm-spawner
without a warning, a task runs in its slice, and MPICH and Open MPI programs
under `nrm run` deliver phase contexts through the interposers the wheel
carries.

The wheel is built once per session. The fresh venv has no pip and no
dependencies of its own: a .pth puts this venv's site-packages (pyzmq, ...)
after its own, so nrm itself comes from the wheel only, and nothing is
fetched from the network.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig

import pytest

from nrm.hpc import mpi
from tests.conftest import needs_root
from nrm.tools.localnrmd import spawner_pids
from tests.nrmd import REPO, DaemonProcess

pytestmark = pytest.mark.skipif(
    shutil.which("cc") is None or shutil.which("cmake") is None,
    reason="needs cc and cmake")

PARTS = ("lib/libnrm.so", "libexec/nrm/nrm-spawner", "include/nrm.h",
         "include/downstream_api.h", "lib/pkgconfig/nrm.pc", "share/nrm/build.json",
         "share/nrm/src/pmpi.c")


def clean_env(**extra):
    """No PYTHONPATH, no NRM_* from the test run: only the venv decides."""
    env = {k: v for k, v in os.environ.items()
           if k != "PYTHONPATH" and not k.startswith("NRM_")}
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    # make setup installs the build backend: no need for PyPI then
    isolation = ["--no-build-isolation"] if _has_build_backend() else []
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                           *isolation, "-w", str(out), REPO],
                          capture_output=True, text=True, timeout=600, cwd=str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (path,) = out.glob("nrm-*.whl")
    return path


def _has_build_backend() -> bool:
    try:
        import scikit_build_core  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory):
    root = tmp_path_factory.mktemp("fresh") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    py = root / "bin" / "python"
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q",
                           "--no-deps", str(wheel)], capture_output=True, text=True,
                          timeout=300, cwd=str(root))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"], capture_output=True, text=True, check=True,
                          env=clean_env()).stdout.strip()
    with open(os.path.join(site, "zz_test_deps.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    return root


def in_venv(venv, *argv, **kw):
    return subprocess.run([str(venv / "bin" / argv[0]), *argv[1:]], capture_output=True,
                          text=True, env=clean_env(**kw.pop("env", {})),
                          cwd=kw.pop("cwd", str(venv)), **kw)


def test_the_wheel_installs_the_c_parts_into_the_prefix(venv, tmp_path):
    where = in_venv(venv, "python", "-c", "import nrm; print(nrm.__file__)")
    assert where.stdout.startswith(str(venv)), where.stdout + where.stderr
    for rel in PARTS:
        assert (venv / rel).exists(), rel
    assert os.access(venv / "libexec/nrm/nrm-spawner", os.X_OK)
    for flavor in ("mpich", "openmpi"):
        if mpi.find(flavor):
            assert (venv / "lib" / getattr(mpi, flavor.upper()).pmpi).exists(), flavor
    if shutil.which("gfortran"):
        assert (venv / "include/nrm.mod").exists() and (venv / "lib/libnrmf.so").exists()
    # nrm.pc knows where it is, wherever pip put it
    env = dict(os.environ, PKG_CONFIG_PATH=str(venv / "lib/pkgconfig"))
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "nrm"], env=env,
                           capture_output=True, text=True, check=True).stdout.split()
    assert "-lnrm" in flags
    exe = tmp_path / "progress"
    subprocess.run(["cc", "-o", str(exe), os.path.join(REPO, "examples", "progress.c")]
                   + flags, check=True)
    assert subprocess.run([str(exe), "3"], env=clean_env(), capture_output=True,
                          timeout=60).returncode == 0


class VenvDaemon(DaemonProcess):
    """nrmd and nrm from the fresh venv's console scripts."""

    def __init__(self, venv, *extra):
        super().__init__(*extra)
        self.venv = venv
        self.env = clean_env(NRM_RUNTIME_DIR=self.rundir)

    def start(self, timeout: float = 10.0) -> "VenvDaemon":
        argv = [str(self.venv / "bin" / "nrmd"), "--runtime-dir", self.rundir,
                "--log-level", "debug"] + self.args
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=self.env, cwd=self.rundir)
        self.wait_ready(timeout)
        return self

    def cli(self, *args, timeout: float = 120, env=None):
        return subprocess.run([str(self.venv / "bin" / "nrm"), *args], capture_output=True,
                              text=True, timeout=timeout, env=dict(self.env, **(env or {})),
                              cwd=self.rundir)


@pytest.fixture(scope="module")
def nrmd(venv):
    d = VenvDaemon(venv, "--hw", "emulated", "--sensor-period", "0.1").start()
    yield d
    assert d.stop() == 0


def test_nrmd_uses_the_spawner_and_reports_every_part(nrmd):
    assert spawner_pids(nrmd.proc.pid)
    assert "spawner" not in " ".join(line for line in nrmd.log().splitlines()
                                     if "WARN" in line or "ERROR" in line)
    status = json.loads(nrmd.cli("status", "--json").stdout)
    parts = status["c_parts"]
    assert parts["found"]["nrm-spawner"].startswith(str(nrmd.venv))
    assert parts["found"]["libnrm"].startswith(str(nrmd.venv))
    for flavor in ("mpich", "openmpi"):
        if mpi.find(flavor):
            assert f"pmpi-{flavor}" in parts["found"]


def test_a_task_runs_in_its_slice(nrmd, tmp_path):
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one cpu: a one-cpu slice looks like no slice")
    manifest = tmp_path / "one.yml"
    manifest.write_text("name: one\napp:\n  slice: {cpus: 1, mems: 1}\n")
    r = nrmd.cli("run", str(manifest), "grep", "Cpus_allowed_list", "/proc/self/status")
    assert r.returncode == 0, r.stderr
    cpus = r.stdout.split()[-1]
    assert re.fullmatch(r"\d+", cpus), r.stdout


ITERATIONS = 20


def _imbalance(flavor, tmp_path):
    exe = tmp_path / f"imbalance-{flavor.name}"
    subprocess.run([flavor.mpicc, "-O2", "-o", str(exe),
                    os.path.join(REPO, "examples", "imbalance.c")], check=True)
    return str(exe)


@needs_root()
@pytest.mark.mpi
@pytest.mark.parametrize("flavor", [mpi.MPICH, mpi.OPENMPI], ids=lambda f: f.name)
def test_mpi_ranks_deliver_phase_contexts(nrmd, tmp_path, flavor):
    if not flavor.available():
        pytest.skip(f"{flavor.name} not installed")
    exe = _imbalance(flavor, tmp_path)
    manifest = tmp_path / "ddcm.yml"
    manifest.write_text("name: ddcm\napp:\n  slice: {cpus: 2, mems: 1}\n"
                        "  power: {policy: DDCM, profile: true, damper: 1ms}\n")
    profile = tmp_path / "profile.json"
    before = _downstream_decoded(nrmd)
    r = nrmd.cli("run", "--profile-json", str(profile), str(manifest), *flavor.launcher(),
                 "-n", "2", exe, "-n", str(ITERATIONS), "-u", "2000000", env=flavor.env())
    assert r.returncode == 0, r.stdout + r.stderr
    assert _downstream_decoded(nrmd) > before
    stats = json.loads(profile.read_text())["policy"]["stats"]
    # every phase of both ranks reached the policy: 20 iterations and the
    # first one (MPI_Init to the first barrier), which it skips as warm-up
    assert stats["phases"] == 2 * (ITERATIONS + 1) and stats["warmup_skipped"] == 2, stats


def _downstream_decoded(nrmd) -> int:
    status = json.loads(nrmd.cli("status", "--json").stdout)
    return status["downstream"]["downstream"]["decoded"]


@pytest.mark.mpi
def test_build_interposer_replaces_a_missing_one_and_status_tells(nrmd, venv):
    """An interposer missing from the install (no such MPI at pip time) shows
    in `nrm status`; `nrm build-interposer` builds it where nrmd looks."""
    if not mpi.OPENMPI.available():
        pytest.skip("Open MPI not installed")
    lib = venv / "lib" / mpi.OPENMPI.pmpi
    lib.unlink()
    shown = nrmd.cli("status")
    assert re.search(r"^missing:\s+pmpi-openmpi: .*nrm build-interposer", shown.stdout, re.M), \
        shown.stdout
    r = in_venv(venv, "nrm", "build-interposer", "--mpicc", mpi.OPENMPI.mpicc)
    assert r.returncode == 0 and str(lib) in r.stdout, r.stdout + r.stderr
    assert "missing:" not in nrmd.cli("status").stdout
    r = in_venv(venv, "nrm", "build-interposer", "--mpicc", "no-such-mpicc")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "no-such-mpicc" in r.stderr


def test_a_missing_mpi_or_fortran_is_skipped_and_recorded(tmp_path):
    """The build never fails for want of an MPI or a Fortran compiler: it
    says what it skipped and records why for `nrm status`."""
    build = tmp_path / "build"
    proc = subprocess.run(["cmake", "-S", os.path.join(REPO, "libnrm"), "-B", str(build),
                           "-DNRM_MPICC=/nonexistent/mpicc"], capture_output=True, text=True,
                          env=clean_env(FC="/nonexistent/gfortran"), timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "pmpi-openmpi skipped" in proc.stderr and "fortran skipped" in proc.stderr
    record = json.loads((build / "build.json").read_text())
    assert {"libnrm", "nrm-spawner"} <= set(record["built"])
    assert set(record["skipped"]) == {"fortran", "pmpi-mpich", "pmpi-openmpi"}
    assert "MPICC=/nonexistent/mpicc not found" in record["skipped"]["pmpi-mpich"]
