"""nrm under a real Slurm: two fake nodes on this host, one nrmd each.

The helpers' rules (container name, slice size, PMI bridge) are checked on
their own first; then srun runs `nrm run` on both nodes, an MPICH job sends
its phase contexts to each node's daemon through the PMI bridge, and the
prolog/epilog scripts are run both by hand and by slurmd.

Tasks find their node's daemon through a TaskProlog that exports
``NRM_RUNTIME_DIR=<base>/$SLURMD_NODENAME`` (the base is a temp dir, not
/run/nrm, so tests never meet a real nrmd).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time

import pytest

from nrm import paths

from nrm.hpc import mpi, slurm
from nrm.client import Client
from nrm.manifest import load
from tests.nrmd import REPO, VENV_BIN, wait_for
from tests.slurm_cluster import (SlurmCluster, SlurmUnavailable, node_daemons, started_or_skip,
                                 task_prolog_to_node_nrmd)

NRM = os.path.join(VENV_BIN, "nrm")
PROLOG = os.path.join(REPO, "contrib", "slurm", "prolog.sh")
EPILOG = os.path.join(REPO, "contrib", "slurm", "epilog.sh")
EXAMPLES = os.path.join(REPO, "examples")
NODES = ("n1", "n2")


def _pmpi_lib():
    found = paths.find_pmpi_lib()
    if found:
        return found
    built = os.path.join(REPO, "libnrm", "build", "libnrm-pmpi.so")
    return built if os.path.exists(built) else None


# ------------------------------------------------------------ the rules ---

def test_container_name_from_job_and_step():
    assert slurm.default_container({"SLURM_JOB_ID": "42", "SLURM_STEP_ID": "3"}) == "slurm-42.3"
    assert slurm.default_container({"SLURM_JOBID": "42", "SLURM_STEPID": "0"}) == "slurm-42.0"
    assert slurm.default_container({"SLURM_JOB_ID": "42"}) == "slurm-42.batch"
    assert slurm.default_container({}) is None
    assert not slurm.in_job({})
    # the epilog's prefix must not catch job 420 when cleaning job 42
    assert not "slurm-420.0".startswith(slurm.job_prefix("42"))


def test_slice_is_the_request_when_it_fits_else_the_allocation():
    m = load(os.path.join(EXAMPLES, "imbalance.yml"))          # asks for 2 cpus
    assert m.slice.cpus == 2
    assert slurm.fit_manifest(m, [5]).slice.cpus == 1
    assert slurm.fit_manifest(m, [0, 1, 2, 3]) is m
    assert slurm.fit_manifest(m, [0, 1]).slice.cpus == 2
    assert slurm.fit_manifest(m, [3]).slice.mems == m.slice.mems
    assert slurm.slice_cpus(8, 3) == 3 and slurm.slice_cpus(2, 3) == 2


def test_step_cpus_are_this_process_affinity():
    assert slurm.step_cpus() == sorted(os.sched_getaffinity(0))


def _readline(sock) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    return data


def test_pmi_bridge_answers_the_port_handshake_and_relays():
    """A socketpair stands in for slurmstepd's end of PMI_FD."""
    stepd, task_end = socket.socketpair()
    bridge = slurm.PmiBridge.from_env({"PMI_FD": str(task_end.fileno()), "PMI_RANK": "1",
                                       "PMI_SIZE": "4"})
    assert bridge is not None
    env = bridge.task_env({"PMI_FD": "11", "PMI_RANK": "1", "HOME": "/root"})
    assert "PMI_FD" not in env and env["HOME"] == "/root"
    assert env["PMI_PORT"] == f"127.0.0.1:{bridge.port}" and env["PMI_ID"] == "1"
    bridge.start()
    try:
        with socket.create_connection(("127.0.0.1", bridge.port), timeout=10) as app:
            app.sendall(b"cmd=initack pmiid=1\n")
            assert [_readline(app) for _ in range(4)] == [
                b"cmd=initack\n", b"cmd=set size=4\n", b"cmd=set rank=1\n", b"cmd=set debug=0\n"]
            app.sendall(b"cmd=init pmi_version=1 pmi_subversion=1\n")
            stepd.settimeout(10)
            assert _readline(stepd) == b"cmd=init pmi_version=1 pmi_subversion=1\n"
            stepd.sendall(b"cmd=response_to_init rc=0\n")
            assert _readline(app) == b"cmd=response_to_init rc=0\n"
        # a second program of the same task connects again
        with socket.create_connection(("127.0.0.1", bridge.port), timeout=10) as app:
            app.sendall(b"cmd=get_maxes\n")
            assert _readline(stepd) == b"cmd=get_maxes\n"
    finally:
        bridge.close()
        stepd.close()
        task_end.close()


def test_pmi_bridge_needs_a_real_descriptor():
    assert slurm.PmiBridge.from_env({}) is None
    assert slurm.PmiBridge.from_env({"PMI_FD": "not-a-number"}) is None
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    assert slurm.PmiBridge.from_env({"PMI_FD": str(r)}) is None


# ---------------------------------------------------- one nrmd per node ---

@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    """n1 and n2's daemons under one base dir, as `--node-name` lays them out."""
    base = str(tmp_path_factory.mktemp("nrm-nodes"))
    extra = ["--hw", "emulated", "--runtime", "affinity", "--sensor-period", "0.5"]
    lib = _pmpi_lib()
    if lib:
        extra += ["--pmpi-lib", lib]
    with node_daemons(base, NODES, *extra) as daemons:
        yield daemons


def _script_env(node, **extra):
    env = dict(os.environ, NRM=NRM, NRM_RUNTIME_DIR=node.node_dir, SLURMD_NODENAME=node.name,
               **extra)
    return env


def test_prolog_passes_when_nrmd_answers(nodes):
    r = subprocess.run([PROLOG], env=_script_env(nodes["n1"], SLURM_JOB_ID="7"),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_prolog_fails_clearly_when_nrmd_is_down(tmp_path):
    env = dict(os.environ, NRM=NRM, NRM_RUNTIME_DIR=str(tmp_path), SLURMD_NODENAME="n9",
               SLURM_JOB_ID="7", NRM_TIMEOUT="1")
    r = subprocess.run([PROLOG], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "node n9" in r.stderr and "nrmd is not answering" in r.stderr, r.stderr


def test_epilog_kills_only_this_jobs_containers(nodes):
    n1 = nodes["n1"]
    basic = os.path.join(EXAMPLES, "basic.yml")
    for name in ("slurm-990.0", "slurm-990.1", "slurm-9900.0"):
        r = n1.cli("run", "-d", "--oversubscribe", "--container", name, basic, "sleep", "600")
        assert r.returncode == 0, r.stderr
    try:
        r = subprocess.run([EPILOG], env=_script_env(n1, SLURM_JOB_ID="990"),
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert "killed leftover container slurm-990.0" in r.stderr
        left = [c["id"] for c in json.loads(n1.cli("list", "--json").stdout)]
        assert "slurm-990.0" not in left and "slurm-990.1" not in left
        assert "slurm-9900.0" in left
    finally:
        n1.cli("kill", "slurm-9900.0")


def test_epilog_tolerates_a_node_without_nrmd(tmp_path):
    env = dict(os.environ, NRM=NRM, NRM_RUNTIME_DIR=str(tmp_path), SLURM_JOB_ID="5",
               NRM_TIMEOUT="1")
    r = subprocess.run([EPILOG], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "nothing to clean" in r.stderr


# ------------------------------------------------------------ real Slurm ---

def _wrapper(path: str, body: str) -> str:
    with open(path, "w") as f:
        f.write("#!/bin/sh\n" + body)
    os.chmod(path, 0o755)
    return path


@pytest.fixture(scope="module")
def cluster(nodes, tmp_path_factory):
    """slurmctld + slurmd n1, n2, with nrm's prolog and epilog installed."""
    base = next(iter(nodes.values())).base
    scripts = tmp_path_factory.mktemp("slurm-scripts")
    # slurmd gives prolog/epilog a fresh environment: say where nrm and the
    # node's daemon are, as a site would in the scripts' installed copies.
    env_lines = (f"export NRM={NRM} PYTHON=python3\n"
                 f"export NRM_RUNTIME_DIR={base}/$SLURMD_NODENAME\n")
    prolog = _wrapper(str(scripts / "prolog"), env_lines + f"exec {PROLOG}\n")
    epilog = _wrapper(str(scripts / "epilog"), env_lines + f"exec {EPILOG}\n")
    task_prolog = task_prolog_to_node_nrmd(str(scripts / "task_prolog"), base)
    c = started_or_skip(SlurmCluster(nodes=len(NODES), prolog=prolog, epilog=epilog,
                                     task_prolog=task_prolog))
    yield c
    c.cleanup()


def _fields(line: str) -> dict:
    return dict(kv.split("=", 1) for kv in line.split() if "=" in kv)


REPORT = ('echo node=$SLURMD_NODENAME rundir=$NRM_RUNTIME_DIR container=$NRM_CONTAINER_ID '
          'cpus=$(sed -n "s/^Cpus_allowed_list:[[:space:]]*//p" /proc/self/status)')


@pytest.mark.slurm
def test_srun_runs_tasks_in_slices_on_both_nodes(cluster, nodes, tmp_path):
    manifest = os.path.join(EXAMPLES, "imbalance.yml")      # asks for 2 cpus
    r = cluster.srun("-N2", "-n2", NRM, "run", manifest, "sh", "-c", REPORT, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    lines = sorted((_fields(x) for x in r.stdout.splitlines() if x.startswith("node=")),
                   key=lambda f: f["node"])
    assert [f["node"] for f in lines] == list(NODES), r.stdout
    jobs = set()
    for f in lines:
        # the task was started by its own node's daemon ...
        assert f["rundir"] == nodes[f["node"]].node_dir
        assert f["container"].startswith("slurm-") and f["container"].endswith(".0")
        jobs.add(f["container"])
        # ... in a slice shrunk to the one cpu Slurm gave the task (-c1)
        assert len(paths_cpus(f["cpus"])) == 1, f
    assert len(jobs) == 1


@pytest.mark.slurm
def test_srun_slice_keeps_a_request_that_fits(cluster, tmp_path):
    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs 2 cpus")
    basic = os.path.join(EXAMPLES, "basic.yml")            # asks for 1 cpu
    big = os.path.join(EXAMPLES, "imbalance.yml")          # asks for 2 cpus
    for manifest, want in ((basic, 1), (big, 2)):
        r = cluster.srun("-N1", "-n1", "-c2", "-w", "n2", NRM, "run", manifest, "sh", "-c",
                         REPORT, cwd=str(tmp_path))
        assert r.returncode == 0, r.stderr
        f = _fields(r.stdout.strip().splitlines()[-1])
        assert len(paths_cpus(f["cpus"])) == want, (manifest, r.stdout)


def paths_cpus(text: str):
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


@pytest.mark.slurm
def test_srun_exit_codes_and_output(cluster, tmp_path):
    basic = os.path.join(EXAMPLES, "basic.yml")
    r = cluster.srun("-N2", "-n2", NRM, "run", basic, "sh", "-c",
                     'echo out-$SLURM_PROCID; echo err-$SLURM_PROCID >&2; '
                     'exit $((SLURM_PROCID * 7))', cwd=str(tmp_path))
    assert r.returncode == 7, (r.stdout, r.stderr)
    assert sorted(r.stdout.split()) == ["out-0", "out-1"]
    assert "err-0" in r.stderr and "err-1" in r.stderr
    ok = cluster.srun("-N2", "-n2", NRM, "run", basic, "true", cwd=str(tmp_path))
    assert ok.returncode == 0, ok.stderr
    missing = cluster.srun("-N1", NRM, "run", basic, "/nonexistent/prog", cwd=str(tmp_path))
    assert missing.returncode == 127, missing.stderr


@pytest.mark.slurm
def test_epilog_run_by_slurm_kills_detached_leftovers(cluster, nodes, tmp_path):
    basic = os.path.join(EXAMPLES, "basic.yml")
    r = cluster.srun("-N1", "-w", "n1", NRM, "run", "-d", basic, "sleep", "600",
                     cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    container = r.stdout.split()[0]
    assert container.startswith("slurm-"), r.stdout
    n1 = nodes["n1"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        left = [c["id"] for c in json.loads(n1.cli("list", "--json").stdout)]
        if container not in left:
            return
        time.sleep(0.1)
    n1.cli("kill", container)
    pytest.fail(f"{container} still on n1 after the job's epilog:\n"
                + open(os.path.join(cluster.dir, "slurmd-n1.log")).read()[-2000:])


# ------------------------------------------------------------------ MPI ---

@pytest.fixture(scope="module")
def imbalance(tmp_path_factory):
    if shutil.which(mpi.MPICH.mpicc) is None:
        pytest.skip("needs mpicc.mpich (MPICH: the job uses Slurm's pmi2)")
    exe = tmp_path_factory.mktemp("imb") / "imbalance"
    subprocess.run([mpi.MPICH.mpicc, "-O2", "-o", str(exe), os.path.join(EXAMPLES, "imbalance.c")],
                   check=True)
    return str(exe)


def _subscribe(node):
    """A SUB socket on the node's events, made in this process so that it is
    connected before srun even starts (`nrm listen` would race the job)."""
    client = Client(node.node_dir)
    return client, client.subscribe(["phase_context"])


def _downstream(node) -> int:
    """Messages the node's nrmd decoded on its downstream endpoint."""
    counters = json.loads(node.cli("status", "--json").stdout).get("downstream") or {}
    return (counters.get("downstream") or {}).get("decoded", 0)


@pytest.mark.slurm
@pytest.mark.mpi
def test_mpich_job_across_nodes_reports_to_each_nodes_daemon(cluster, nodes, imbalance,
                                                             tmp_path):
    if _pmpi_lib() is None:
        pytest.skip("libnrm-pmpi.so not built (make setup installs it into .venv/lib)")
    plugins = cluster.srun("--mpi=list")
    if "pmi2" not in plugins.stdout + plugins.stderr:
        pytest.skip("this Slurm has no mpi/pmi2 plugin")
    before = {name: _downstream(d) for name, d in nodes.items()}
    subs = {name: _subscribe(d) for name, d in nodes.items()}
    try:
        r = cluster.srun("-N2", "-n2", "--mpi=pmi2", NRM, "run",
                         os.path.join(EXAMPLES, "imbalance.yml"), imbalance,
                         "-n", "200", "-u", "2000", cwd=str(tmp_path), timeout=120)
        assert r.returncode == 0, r.stderr
        assert "imbalance: ranks=2" in r.stdout, r.stdout
        ranks = {}
        for name, (_, sock) in subs.items():
            assert sock.poll(30000), f"no phase context reached {name}'s nrmd"
            topic, body = sock.recv_multipart()
            event = json.loads(body)
            assert topic == b"phase_context"
            assert event["container"].startswith("slurm-"), event
            ranks[name] = event["rank"]
        assert ranks == {"n1": 0, "n2": 1}         # srun's block distribution
    finally:
        for client, sock in subs.values():
            sock.close(linger=0)
            client.close()
    for name, d in nodes.items():
        assert _downstream(d) > before[name]


@pytest.mark.slurm
def test_prolog_run_by_slurm_refuses_a_node_without_nrmd(tmp_path):
    """A private one-node cluster whose node has no nrmd: the job fails at
    the prolog, slurmd logs the prolog's reason, and the node is drained."""
    nowhere = tmp_path / "no-nrmd"
    nowhere.mkdir()
    prolog = _wrapper(str(tmp_path / "prolog"), f"export NRM={NRM} NRM_TIMEOUT=1 "
                      f"NRM_RUNTIME_DIR={nowhere}\nexec {PROLOG}\n")
    c = SlurmCluster(nodes=1, prolog=prolog)
    try:
        c.start(timeout=15)
    except SlurmUnavailable as exc:
        shutil.rmtree(c.dir, ignore_errors=True)
        pytest.skip(f"cannot start a local Slurm: {exc}")
    try:
        r = c.srun("-N1", "--immediate=10", "true", timeout=60)
        assert r.returncode != 0
        assert "prolog" in r.stderr.lower(), r.stderr
        with open(os.path.join(c.dir, "slurmd-n1.log")) as f:
            assert "nrm prolog: node n1" in f.read()
        # slurmd drains the node once the job has left "completing"
        wait_for(lambda: c.node_states().get("n1", "").startswith("drain"), timeout=30)
    finally:
        c.cleanup()
