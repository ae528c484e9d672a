# Spack package for nrm: a Python package whose C parts (libnrm, nrm-spawner,
# the PMPI interposer, the Fortran bindings) are built by its own PEP 517
# backend (scikit-build-core running libnrm/CMakeLists.txt).
#
# UNTESTED: written to Spack's conventions for a PythonPackage with C parts
# and an MPI variant, but Spack was not available where nrm is developed.
# Use it from a repo: `spack repo add contrib/spack` (repo.yaml is there),
# then `spack install py-nrm +mpi ^openmpi`.

from spack.package import *


class PyNrm(PythonPackage):
    """Node resource manager for HPC nodes: slices of cpus and memory for
    tasks, telemetry, and power policies fed by MPI phase timings."""

    homepage = "https://github.com/anlsys/nrm"
    git = "https://github.com/anlsys/nrm.git"

    license("BSD-3-Clause")

    version("main", branch="main")

    variant("mpi", default=True,
            description="Build the PMPI interposer against the spec's MPI")
    variant("fortran", default=True, description="Build the Fortran bindings")

    depends_on("c", type="build")
    depends_on("fortran", type="build", when="+fortran")

    depends_on("python@3.9:", type=("build", "run"))
    depends_on("py-scikit-build-core@0.10:", type="build")
    depends_on("cmake@3.15:", type="build")
    depends_on("pkgconfig", type="build")

    depends_on("libzmq")
    depends_on("mpi", when="+mpi")

    depends_on("py-pyzmq@25:", type=("build", "run"))
    depends_on("py-tornado@6.1:", type=("build", "run"))
    depends_on("py-msgspec@0.18:", type=("build", "run"))
    depends_on("py-pyyaml@5.4:", type=("build", "run"))
    depends_on("py-prometheus-client@0.17:", type=("build", "run"))

    def config_settings(self, spec, prefix):
        # the build's own switches (libnrm/CMakeLists.txt); with +mpi the
        # interposer is built against this spec's MPI only, named after the
        # MPI its mpi.h belongs to
        settings = {
            "cmake.define.NRM_MPI": "ON" if spec.satisfies("+mpi") else "OFF",
            "cmake.define.NRM_FORTRAN": "ON" if spec.satisfies("+fortran") else "OFF",
        }
        if spec.satisfies("+mpi"):
            settings["cmake.define.NRM_MPICC"] = spec["mpi"].mpicc
        return settings

    def setup_build_environment(self, env):
        # mpi4py's convention, read by the build when NRM_MPICC is not given
        if self.spec.satisfies("+mpi"):
            env.set("MPICC", self.spec["mpi"].mpicc)

    def setup_run_environment(self, env):
        # nrmd and `nrm build-interposer` look in NRM_LIBRARY_PATH first
        env.prepend_path("NRM_LIBRARY_PATH", self.prefix.lib)
        env.prepend_path("PKG_CONFIG_PATH", self.prefix.lib.pkgconfig)

    @run_after("install")
    @on_package_attributes(run_tests=True)
    def check_c_parts(self):
        spawner = join_path(self.prefix, "libexec", "nrm", "nrm-spawner")
        if not is_exe(spawner):
            raise InstallError(f"nrm-spawner was not installed at {spawner}")
