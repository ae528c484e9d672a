"""Issue 5 end to end: 2 MPI ranks (rank 0 twice the work of rank 1) under
DDCM on the emulated node, launched as users launch MPI."""

import json
import os
import shutil
import subprocess

import pytest

from tests.conftest import EXAMPLES, needs_root

pytestmark = pytest.mark.skipif(not shutil.which("mpiexec"), reason="MPICH not installed")


@pytest.fixture(scope="module")
def imbalance():
    r = subprocess.run(["make", "-s", "-C", EXAMPLES, "imbalance"], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot build examples/imbalance: " + r.stderr.decode()[-500:])
    return os.path.join(EXAMPLES, "imbalance")


@needs_root()
def test_ddcm_slows_the_waiting_rank_and_restores(daemon, imbalance, tmp_path):
    manifest = tmp_path / "ddcm.yml"
    manifest.write_text("name: ddcm\napp:\n  slice: {cpus: 2, mems: 1}\n"
                        "  power: {policy: DDCM, profile: true, damper: 1ms, slowdown: 1.1}\n")
    profile_path = tmp_path / "profile.json"
    r = daemon.cli("run", "--profile-json", str(profile_path), str(manifest),
                   "mpiexec", "-n", "2", "-bind-to", "core", imbalance,
                   "-n", "60", "-u", "30000000", "-b", "-0.5", "-a", timeout=180)
    assert r.returncode == 0, r.stderr
    rank_cpu = {}
    for line in r.stdout.decode().splitlines():
        if line.startswith("affinity"):
            fields = dict(kv.split("=") for kv in line.split()[1:])
            rank_cpu[int(fields["rank"])] = fields["cpus"]
    profile = json.loads(profile_path.read_text())
    policy = profile["policy"]
    assert policy["name"] == "DDCM" and policy["decisions"] > 0
    light = rank_cpu[1]
    assert "," not in light, rank_cpu          # bound to one core by the MPI launcher
    assert policy["lowest_level"][light] < 16     # the waiting rank's cpu was slowed
    assert policy["stats"]["resets"] == 1
    # restored: the emulated actuation is back to unthrottled for every cpu
    status = json.loads(daemon.cli("status", "--json").stdout)
    assert status["policy"]["write_errors"] == 0
    power = json.loads(daemon.cli("power", "--json").stdout)
    assert power["emulated"] is True
    saved = status["saved_controls"]
    assert not any(saved.get(name) for name in ("cpu.duty_cycle", "cpu.frequency")), saved
