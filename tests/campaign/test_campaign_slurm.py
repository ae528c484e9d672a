"""nrm campaign inside a Slurm allocation: the project's real local Slurm
(fake nodes n1, n2 on this host, each with its own nrmd), the coordinator
under ``salloc``, one ``srun`` step per run on the run's node.

Checked: runs spread over both nodes, never two at once on a node, each
through its own node's nrmd, with the run's cap applied on that node and
every node's cap put back; a kill -9 of the coordinator leaves no task
behind, and the rerun finishes every run exactly once.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import textwrap

import pytest

from nrm.campaign import journal, slurmrun
from tests.nrmd import VENV_BIN, wait_for
from tests.slurm_cluster import (SlurmCluster, node_daemons, started_or_skip,
                                 task_prolog_to_node_nrmd)

NRM = os.path.join(VENV_BIN, "nrm")
NODES = ("n1", "n2")
MANIFEST = "name: app\napp:\n  slice: {cpus: 1, mems: 1}\n"


def test_allocation_mode_is_chosen_from_the_environment():
    alloc = {"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_JOB_CPUS_PER_NODE": "2(x2)"}
    if shutil.which("srun"):
        assert slurmrun.in_allocation(alloc)
    assert not slurmrun.in_allocation(dict(alloc, SLURM_STEP_ID="0"))   # inside a step
    assert not slurmrun.in_allocation({})
    assert slurmrun.allocation_nodes(alloc, ["n2"]) == [("n2", 2)]
    with pytest.raises(slurmrun.AllocationError, match="n3 not in the allocation"):
        slurmrun.allocation_nodes(alloc, ["n3"])


# ------------------------------------------------------------ real Slurm ---

@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("campaign-nodes"))
    with node_daemons(base, NODES, "--hw", "emulated", "--runtime", "affinity",
                      "--sensor-period", "0.1") as daemons:
        yield daemons


@pytest.fixture(scope="module")
def cluster(nodes, tmp_path_factory):
    base = next(iter(nodes.values())).base
    scripts = tmp_path_factory.mktemp("campaign-slurm-scripts")
    prolog = task_prolog_to_node_nrmd(str(scripts / "task_prolog"), base)
    c = started_or_skip(SlurmCluster(nodes=len(NODES), task_prolog=prolog))
    yield c
    c.cleanup()


def write(tmp_path, text):
    (tmp_path / "m.yml").write_text(MANIFEST)
    path = tmp_path / "c.yml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def salloc(cluster, tmp_path, *args, timeout=120):
    return subprocess.run(["salloc", "-N2", "--exclusive", NRM, "campaign", *args],
                          env=cluster.env, cwd=str(tmp_path), capture_output=True, text=True,
                          timeout=timeout)


def caps(nodes):
    return {name: json.loads(d.cli("status", "--json").stdout)["power_cap_w"]
            for name, d in nodes.items()}


def containers(node, prefix="campaign-"):
    return [c["id"] for c in json.loads(node.cli("list", "--json").stdout)
            if c["id"].startswith(prefix)]


def rows(cluster, tmp_path, d, attempts="last"):
    out = str(tmp_path / f"{attempts}.csv")
    r = subprocess.run([NRM, "campaign", "table", d, "-o", out, "--attempts", attempts],
                       capture_output=True, text=True, env=cluster.env)
    assert r.returncode == 0, r.stderr
    return list(csv.DictReader(open(out)))


@pytest.mark.slurm
def test_runs_spread_over_the_nodes_one_at_a_time_each_with_its_cap(cluster, nodes, tmp_path):
    log = tmp_path / "log"
    log.mkdir()
    # each run logs where it ran, when, and the cap its node's nrmd had
    path = write(tmp_path, f"""\
        name: spread
        manifest: m.yml
        command: [sh, -c, "echo start $(date +%s.%N) >> {log}/$SLURMD_NODENAME; sleep 0.4;
          {NRM} status --json | grep power_cap_w;
          echo where=$SLURMD_NODENAME rundir=$NRM_RUNTIME_DIR;
          echo end $(date +%s.%N) >> {log}/$SLURMD_NODENAME"]
        parameters:
          cap_w: [150, 120]
          n: [1, 2, 3]
        metrics: {{cap_seen: '"power_cap_w": *([0-9.]+)', where: 'where=(\\S+)'}}
        """)
    d = str(tmp_path / "d")
    assert caps(nodes) == {"n1": None, "n2": None}
    r = salloc(cluster, tmp_path, "run", path, "--dir", d)
    assert r.returncode == 0, r.stderr
    assert "6 runs, 0 finished before, 6 to run" in r.stderr and "on 2 nodes (n1, n2)" in r.stderr
    assert len([x for x in r.stderr.splitlines() if "] cap_w=" in x]) == 6
    table = rows(cluster, tmp_path, d)
    assert len(table) == 6 and all(row["outcome"] == "ok" for row in table)
    # the journal's node is where it ran, through that node's own nrmd
    for row in table:
        assert row["node"] == row["where"], row
        out = open(os.path.join(d, "runs", row["run_id"], "a1", "stdout")).read()
        assert f"rundir={nodes[row['node']].node_dir}" in out
        assert float(row["cap_seen"]) == float(row["cap_w"]) == float(row["cap_applied_w"])
        assert row["energy_source"] == "emulated" and float(row["energy_j"]) > 0
    assert {row["node"] for row in table} == set(NODES)
    # never two at once on a node
    for name in NODES:
        events = [line.split() for line in (log / name).read_text().splitlines()]
        assert [e[0] for e in events] == ["start", "end"] * (len(events) // 2), events
        assert [float(e[1]) for e in events] == sorted(float(e[1]) for e in events)
    # every node's cap is back, and the record of originals is gone
    assert caps(nodes) == {"n1": None, "n2": None}
    assert not os.path.exists(os.path.join(d, "cap.json"))


RESUME = """\
    name: resume
    manifest: m.yml
    command: [sh, -c, "if [ -e {marks}/rerun ]; then echo done {n};
      else echo $SLURMD_NODENAME > {marks}/{n}; sleep 120; fi"]
    parameters:
      cap_w: [150]
      n: [1, 2, 3]
    """


@pytest.mark.slurm
def test_kill_9_of_the_coordinator_then_rerun_finishes_each_run_once(cluster, nodes, tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    path = write(tmp_path, RESUME.replace("{marks}", str(marks)))
    d = str(tmp_path / "d")
    pidfile, release = tmp_path / "coordinator.pid", tmp_path / "release"
    # the allocation outlives its coordinator (as in a batch script that goes
    # on): only the coordinator's own cleanup can stop the steps
    proc = subprocess.Popen(
        ["salloc", "-N2", "--exclusive", "sh", "-c",
         f"{NRM} campaign run {path} --dir {d} 2>/dev/null & echo $! > {pidfile}; wait; "
         f"while [ ! -e {release} ]; do sleep 0.1; done"],
        env=cluster.env, cwd=str(tmp_path), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    try:
        # both nodes busy with a first attempt that would sleep for minutes
        wait_for(lambda: len(os.listdir(marks)) == 2, timeout=60)
        wait_for(lambda: all(containers(n) for n in nodes.values()), timeout=30)
        assert caps(nodes) == {"n1": 150, "n2": 150}
        os.kill(int(pidfile.read_text()), 9)
        # no task outlives its coordinator: its srun ends the step, nrmd kills the task
        wait_for(lambda: not any(containers(n) for n in nodes.values()), timeout=30)
        assert proc.poll() is None                  # while the allocation goes on
    finally:
        release.write_text("")
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    records = journal.read(d)[0]
    left = [rec for rec in records if rec["e"] == "started"]
    assert sorted(rec["node"] for rec in left) == list(NODES)
    assert json.load(open(os.path.join(d, "cap.json"))) == {"nodes": {"n1": None, "n2": None}}
    first_nodes = {p.name: p.read_text().strip() for p in marks.iterdir()}
    (marks / "rerun").write_text("")

    r = salloc(cluster, tmp_path, "run", path, "--dir", d)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("was interrupted by the coordinator's death") == 2, r.stderr
    everything = rows(cluster, tmp_path, d, "all")
    ok = [row for row in everything if row["outcome"] == "ok"]
    assert sorted(row["n"] for row in ok) == ["1", "2", "3"]          # each exactly once
    interrupted = {row["n"] for row in everything if row["outcome"] == "interrupted"}
    assert interrupted == set(first_nodes)
    for row in ok:
        assert row["attempt"] == ("2" if row["n"] in interrupted else "1")
        assert row["node"] in NODES and row["cap_applied_w"] == "150.0"
    assert caps(nodes) == {"n1": None, "n2": None}
    assert not os.path.exists(os.path.join(d, "cap.json"))
    # a second rerun has nothing left to do
    again = salloc(cluster, tmp_path, "run", path, "--dir", d)
    assert again.returncode == 0 and "0 to run" in again.stderr, again.stderr
