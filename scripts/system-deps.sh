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
need pkg-config     have pkg-config
need libzmq3-dev    pkg-config --exists libzmq
need mpich          have mpiexec.mpich
need libmpich-dev   have mpicc.mpich
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
apt-get update -qq
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends $missing >/dev/null
