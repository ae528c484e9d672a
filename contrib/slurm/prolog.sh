#!/bin/sh
# Slurm Prolog (slurm.conf: Prolog=/etc/slurm/nrm-prolog.sh): refuse a job on
# a node whose nrmd does not answer. A failing prolog drains the node and
# requeues the job, which beats tasks failing one by one in `nrm run`.
#
# Environment (all optional):
#   NRM          the nrm client (default: nrm in PATH, then /usr/local/bin/nrm)
#   NRM_TIMEOUT  seconds to wait for nrmd's answer (default 5)
#   NRM_RUNTIME_DIR  nrmd's runtime dir; by default nrm finds
#                /run/nrm/$SLURMD_NODENAME or /run/nrm by itself
set -u

node=${SLURMD_NODENAME:-$(hostname -s)}
wait_s=${NRM_TIMEOUT:-5}
nrm=${NRM:-}
if [ -z "$nrm" ]; then
    nrm=$(command -v nrm 2>/dev/null || echo /usr/local/bin/nrm)
fi

fail() {
    msg="nrm prolog: node $node, job ${SLURM_JOB_ID:-?}: $*"
    echo "$msg" >&2
    command -v logger >/dev/null 2>&1 && logger -t nrm-prolog -- "$msg"
    exit 1
}

[ -x "$nrm" ] || fail "nrm client not found at $nrm (set NRM in the prolog's environment)"

# timeout(1) guards against a client that hangs before its own timeout applies.
if out=$(timeout "$((wait_s + 5))" "$nrm" --timeout "$wait_s" status 2>&1); then
    exit 0
fi
fail "nrmd is not answering: $(echo "$out" | tail -n 1); start it (systemctl start nrmd)"
