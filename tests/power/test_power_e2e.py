"""Issue 5 end to end: 2 MPI ranks (rank 0 twice the work of rank 1) under
DDCM on the emulated node, launched as users launch MPI."""

import json
import os
import re
import subprocess
import sys

import pytest

from nrm.hpc import mpi
from tests.conftest import needs_root

pytestmark = pytest.mark.skipif(mpi.find("mpich") is None, reason="MPICH not installed")


def _run_imbalance(daemon, imbalance, tmp_path, policy, decides=True, phases=60,
                   imbalance_factor=-0.5):
    """Rank 0 does twice the work of rank 1; returns (rank -> cpu, profile's policy, status).

    ``decides``: whether the policy is expected to write a control during the run
    (None: either).
    """
    manifest = tmp_path / f"{policy.lower()}.yml"
    manifest.write_text(f"name: {policy.lower()}\napp:\n  slice: {{cpus: 2, mems: 1}}\n"
                        f"  power: {{policy: {policy}, profile: true, damper: 1ms, "
                        "slowdown: 1.1}\n")
    profile_path = tmp_path / "profile.json"
    r = daemon.cli("run", "--profile-json", str(profile_path), str(manifest),
                   mpi.MPICH.mpiexec, "-n", "2", "-bind-to", "core", imbalance,
                   "-n", str(phases), "-u", "30000000", "-b", str(imbalance_factor), "-a",
                   timeout=300)
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    rank_cpu = {int(rank): cpus for rank, cpus in
                re.findall(r"affinity rank=(\d+) cpus=([\d,]+)", out)}
    assert sorted(rank_cpu) == [0, 1], out
    assert "," not in rank_cpu[1], rank_cpu     # bound to one core by the MPI launcher
    policy_profile = json.loads(profile_path.read_text())["policy"]
    assert policy_profile["name"] == policy
    if decides is not None:
        assert (policy_profile["decisions"] > 0) == decides, policy_profile
    assert policy_profile["stats"]["resets"] == 1
    # each rank's first phase (MPI_Init to the first barrier) is start-up, not slack
    assert policy_profile["stats"]["warmup_skipped"] == 2
    status = json.loads(daemon.cli("status", "--json").stdout)
    return rank_cpu, policy_profile, status


def _assert_restored_and_measured(daemon, status, decided=True):
    assert status["policy"]["write_errors"] == 0
    power = json.loads(daemon.cli("power", "--json").stdout)
    assert power["emulated"] is True
    # restored: the emulated actuation is back to unthrottled for every cpu
    saved = status["saved_controls"]
    assert not any(saved.get(name) for name in ("cpu.duty_cycle", "cpu.frequency")), saved
    if not decided:
        return
    # decision latency, from the drain of the message to the control written, was recorded
    latency = status["policy"]["decision_latency"]
    assert 0 < latency["count"] <= status["policy"]["decisions"]  # >= 1 write per message
    assert sum(latency["histogram"]["counts"]) == latency["count"]
    assert 0 < latency["p50_us"] <= latency["max_us"]


@needs_root()
def test_ddcm_leaves_the_compute_to_the_wait_throttle(daemon, imbalance, tmp_path):
    """DDCM carries in-wait throttling (nrm/power/policy/inwait.py): the waiting rank's
    spin is the interposer's to cut. Slowing its compute by the duty cycle would save only
    1/16 of the shortened wait, less than the slowdown it risks after 60 phases
    (policy/budget.py), so the daemon evaluates every firing and writes nothing.

    nrmd's own threads (nrm/daemon/affinity.py) ran on the light rank's cpu,
    the one that waits, never on the critical rank's, and had every cpu back
    once the run ended."""
    before = json.loads(daemon.cli("status", "--json").stdout)["daemon_cpus"]
    rank_cpu, policy, status = _run_imbalance(daemon, imbalance, tmp_path, "DDCM",
                                              decides=False)
    assert policy["stats"]["evaluations"] > 0 and policy["stats"]["acted"] == 0
    assert policy["lowest_level"] == {}
    _assert_restored_and_measured(daemon, status, decided=False)
    after = status["daemon_cpus"]

    def moves_to(state, cpu):
        return state["moved_to"].get(cpu, 0)
    mask = os.sched_getaffinity(0)
    if len(mask) == 2:      # the slice is the whole node: no idle cpu to go to first
        assert moves_to(after, rank_cpu[1]) > moves_to(before, rank_cpu[1]), (before, after)
    assert after["moves"] > before["moves"], (before, after)
    assert moves_to(after, rank_cpu[0]) == moves_to(before, rank_cpu[0]), (before, after)
    for tid in os.listdir(f"/proc/{daemon.pid}/task"):
        try:
            assert os.sched_getaffinity(int(tid)) == mask, after
        except ProcessLookupError:
            pass


@needs_root()
def test_combined_lowers_the_waiting_ranks_frequency_and_restores(daemon, imbalance, tmp_path):
    # The slowdown budget (nrm/power/policy/budget.py) lowers a rank's speed
    # floor only as phases pass without that rank becoming critical; on a
    # loaded machine preemption makes the light rank look critical now and
    # then, so it gets a quarter of the work and 100 phases.
    rank_cpu, policy, status = _run_imbalance(daemon, imbalance, tmp_path, "COMBINED",
                                              phases=100, imbalance_factor=-0.75)
    light = rank_cpu[1]
    top = max(json.loads(daemon.cli("status", "--json").stdout)["hardware"]["model"]
              ["frequencies_hz"])
    assert policy["lowest_frequency"][light] < top       # DVFS did the bulk of the slowdown
    _assert_restored_and_measured(daemon, status)


HOG = "import os\nos.nice(5)\nwhile True:\n    pass\n"


@needs_root()
@pytest.mark.parametrize("policy", ["DVFS", "COMBINED"])
def test_a_cpu_hog_beside_the_program_never_gets_its_critical_rank_slowed(
        daemon, imbalance, tmp_path, policy):
    """Issue 24's foreign load: busy loops outside the container, one per cpu,
    stretch every rank's compute and preempt it at random. The policies read
    the ranks' own phase timings, so a hog can only make a rank look busier:
    the light rank may be slowed less, but the heavy rank (twice the work, the
    critical path) must never be slowed, and the node is restored after.
    (What the hog costs in time is a measurement: benchmarks/foreign_load.py.)"""
    hogs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(os.cpu_count() or 1)]
    try:
        rank_cpu, policy_profile, status = _run_imbalance(
            daemon, imbalance, tmp_path, policy, decides=None, phases=60)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    heavy = rank_cpu[0]
    top = max(status["hardware"]["model"]["frequencies_hz"])
    assert policy_profile["lowest_frequency"].get(heavy, top) == top, policy_profile
    assert policy_profile["lowest_level"].get(heavy, 16) == 16, policy_profile
    _assert_restored_and_measured(daemon, status, decided=False)


@needs_root()
def test_fixed_pins_the_listed_rank_only_and_restores(daemon, imbalance, tmp_path):
    """The ORACLE of benchmarks/power_oracle.py --live: settings from the manifest, through
    the same actuators, applied on the cpu the rank reports from."""
    manifest = tmp_path / "fixed.yml"
    manifest.write_text("name: fixed\napp:\n  slice: {cpus: 2, mems: 1}\n"
                        "  power: {policy: FIXED, profile: true,\n"
                        "          settings: {1: {level: 8, frequency: 1.4GHz}}}\n")
    profile_path = tmp_path / "profile.json"
    r = daemon.cli("run", "--profile-json", str(profile_path), str(manifest),
                   mpi.MPICH.mpiexec, "-n", "2", "-bind-to", "core", imbalance,
                   "-n", "10", "-u", "30000000", "-b", "-0.5", "-a", timeout=180)
    assert r.returncode == 0, r.stderr
    rank_cpu = dict(re.findall(r"affinity rank=(\d+) cpus=([\d,]+)", r.stdout.decode()))
    policy = json.loads(profile_path.read_text())["policy"]
    assert policy["name"] == "FIXED"
    assert policy["stats"]["pinned"] == 1 and policy["stats"]["unlisted"] > 0
    assert policy["lowest_level"] == {rank_cpu["1"]: 8}              # rank 0's cpu untouched
    assert policy["lowest_frequency"] == {rank_cpu["1"]: 1.4e9}
    assert policy["final_settings"][rank_cpu["1"]] == {"level": 8, "frequency": 1.4e9}
    status = json.loads(daemon.cli("status", "--json").stdout)
    _assert_restored_and_measured(daemon, status)
