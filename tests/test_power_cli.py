"""nrm power / setpower through a real daemon on the emulated node."""

import json
import os
import subprocess
import sys

from tests.conftest import needs_root


def test_power_json_reports_an_emulated_sample(daemon):
    import time
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        data = json.loads(daemon.cli("power", "--json").stdout)
        if data["sample"] and data["sample"].get("node_power_w") is not None:
            break   # power needs two samples: the first one only has energy
        time.sleep(0.1)
    assert data["emulated"] is True and data["backend"] == "emulated"
    assert data["sample"]["node_power_w"] > 0
    assert data["cap_w"] is None


@needs_root()
def test_setpower_sets_and_clears_the_cap(daemon):
    r = daemon.cli("setpower", "35")
    assert r.returncode == 0, r.stderr
    assert json.loads(daemon.cli("power", "--json").stdout)["cap_w"] == 35
    assert daemon.cli("setpower", "off").returncode == 0
    assert json.loads(daemon.cli("power", "--json").stdout)["cap_w"] is None


def test_setpower_rejects_bad_values(daemon):
    r = daemon.cli("setpower", "-3")
    assert r.returncode == 2 and b"positive number of watts" in r.stderr


@needs_root()
def test_setpower_is_denied_to_ordinary_users(daemon):
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        sys.executable, "-m", "nrm.cli.main", "setpower", "50"],
                       capture_output=True, env=daemon.env, cwd="/tmp", timeout=30)
    assert r.returncode == 1 and b"only root" in r.stderr
    assert os.path.exists(daemon.rundir)
