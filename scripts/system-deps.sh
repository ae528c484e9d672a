#!/bin/sh
# Check the system packages nrm needs on Debian/Ubuntu. As root, install the
# missing ones with apt-get; otherwise print the exact command and fail.
set -eu

missing=""
need() {  # need PACKAGE PROBE...
    pkg=$1; shift
    if ! "$@" >/dev/null 2>&1; then missing="$missing $pkg"; fi
}
have() { command -v "$1"; }

need gcc            have cc
need make           have make
need cmake          have cmake
need pkg-config     have pkg-config
need libzmq3-dev    pkg-config --exists libzmq
need mpich          have mpiexec.mpich
need libmpich-dev   have mpicc.mpich
need openmpi-bin    have mpirun.openmpi
need libopenmpi-dev have mpicc.openmpi
need gfortran       have gfortran
need hwloc          have hwloc-bind
need util-linux     have chrt
need python3-venv   python3 -c "import venv, ensurepip"
need prometheus     have promtool
need chromium       have chromium
need slurm-wlm      have slurmd
need munge          have munged

[ -z "$missing" ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
    echo "nrm needs these system packages; run:" >&2
    echo "    sudo apt-get update && sudo apt-get install -y$missing" >&2
    exit 1
fi
echo "installing system packages:$missing" >&2
export DEBIAN_FRONTEND=noninteractive
# Installing an MPI moves Debian's mpicc/mpiexec alternatives to the highest
# priority one (Open MPI over MPICH). nrm names its wrappers (mpicc.mpich,
# mpirun.openmpi) and does not care, but the admin's `mpicc` should keep
# meaning what it meant: put back the alternatives that already existed.
alts="mpi mpirun mpi-$(gcc -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)"
before=""
for alt in $alts; do
    value=$(update-alternatives --query "$alt" 2>/dev/null | sed -n 's/^Value: //p')
    if [ -n "$value" ]; then before="$before $alt=$value"; fi
done
apt-get update -qq
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends $missing >/dev/null
for pair in $before; do
    alt=${pair%%=*}; value=${pair#*=}
    now=$(update-alternatives --query "$alt" 2>/dev/null | sed -n 's/^Value: //p')
    [ "$now" = "$value" ] || update-alternatives --set "$alt" "$value" >&2
done
