"""nrm power / setpower through a real daemon on the emulated node."""

import json
import os
import subprocess
import sys

import pytest

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


@pytest.mark.parametrize("value", ["-3", "0", "nan", "inf", "1e308", "1000001"])
def test_setpower_rejects_bad_values(daemon, value):
    """NaN and infinity encode as JSON null, which clears the cap: refused
    with the other out-of-range values, and the cap stays as it was."""
    assert daemon.cli("setpower", "35").returncode == 0
    r = daemon.cli("setpower", value)
    assert r.returncode == 2 and b"expected watts in (0, 1000000]" in r.stderr, r.stderr
    assert json.loads(daemon.cli("power", "--json").stdout)["cap_w"] == 35
    assert daemon.cli("setpower", "off").returncode == 0


def test_nrmd_rejects_an_out_of_range_cap(daemon):
    from nrm import protocol
    from nrm.client import Client, NrmError
    with Client(daemon.rundir) as c:
        with pytest.raises(NrmError, match="expected a number in"):
            c.setpower(1e308)
        assert c.setpower(None) is not None
    assert protocol.MAX_POWER_CAP_W == 1e6


@needs_root()
def test_setpower_is_denied_to_ordinary_users(daemon):
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        sys.executable, "-m", "nrm.cli.main", "setpower", "50"],
                       capture_output=True, env=daemon.env, cwd="/tmp", timeout=30)
    assert r.returncode == 1 and b"only root" in r.stderr
    assert os.path.exists(daemon.rundir)
