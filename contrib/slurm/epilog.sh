#!/bin/sh
# Slurm Epilog (slurm.conf: Epilog=/etc/slurm/nrm-epilog.sh): kill what is left
# of the job's containers on this node. `nrm run` names them
# slurm-<job>.<step>; their tasks are nrmd's children, outside the job's
# process tracking, so Slurm cannot kill them itself.
#
# Exits non-zero (Slurm then drains the node) only when a container of the
# job survives; a node whose nrmd is down has nothing to clean up.
#
# Environment: SLURM_JOB_ID (set by slurmd); optional NRM, NRM_TIMEOUT,
# NRM_RUNTIME_DIR as for prolog.sh; PYTHON to parse JSON (default python3).
set -u

job=${SLURM_JOB_ID:-}
node=${SLURMD_NODENAME:-$(hostname -s)}
wait_s=${NRM_TIMEOUT:-5}
python=${PYTHON:-python3}
nrm=${NRM:-}
if [ -z "$nrm" ]; then
    nrm=$(command -v nrm 2>/dev/null || echo /usr/local/bin/nrm)
fi

say() {
    msg="nrm epilog: node $node, job $job: $*"
    echo "$msg" >&2
    command -v logger >/dev/null 2>&1 && logger -t nrm-epilog -- "$msg"
}

[ -n "$job" ] || { echo "nrm epilog: SLURM_JOB_ID is not set" >&2; exit 1; }
[ -x "$nrm" ] || { say "nrm client not found at $nrm; nothing cleaned"; exit 0; }

# Names of this job's containers, one per line.
containers() {
    timeout "$((wait_s + 5))" "$nrm" --timeout "$wait_s" list --json | "$python" -c '
import json, sys
prefix = "slurm-" + sys.argv[1] + "."
for c in json.load(sys.stdin):
    if c["id"].startswith(prefix):
        print(c["id"])
' "$job"
}

if ! names=$(containers 2>/dev/null); then
    say "nrmd is not answering; nothing to clean"
    exit 0
fi
for name in $names; do
    timeout "$((wait_s + 5))" "$nrm" --timeout "$wait_s" kill "$name" >/dev/null 2>&1 \
        && say "killed leftover container $name"
done
[ -z "$names" ] && exit 0

# Killed containers go once nrmd has reaped their tasks: give it a moment.
tries=0
while :; do
    left=$(containers 2>/dev/null) || left=""
    [ -z "$left" ] && exit 0
    tries=$((tries + 1))
    [ "$tries" -ge 20 ] && break
    sleep 0.25
done
say "containers still running after kill: $(echo $left)"
exit 1
