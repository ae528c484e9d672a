"""nrm report: the table, --json and --plot, plus the summary arithmetic."""

import json
import os
import sys

import pytest

from nrm.tools import reports as reporting
from tests.conftest import EXAMPLES

BASIC = os.path.join(EXAMPLES, "basic.yml")
PY = sys.executable

try:
    import matplotlib  # noqa: F401
    HAVE_MATPLOTLIB = True
except ImportError:
    HAVE_MATPLOTLIB = False


@pytest.fixture(scope="module")
def finished(daemon):
    """Two finished containers: one with an energy profile, one without."""
    spin = "import time\nt = time.time() + 0.5\nwhile time.time() < t: pass"
    r = daemon.cli("run", "--profile", BASIC, PY, "-c", spin)
    assert r.returncode == 0, r.stderr
    r = daemon.cli("run", BASIC, PY, "-c", spin)
    assert r.returncode == 0, r.stderr
    r = daemon.cli("report", "--json")
    assert r.returncode == 0, r.stderr
    reports = json.loads(r.stdout)
    assert len(reports) >= 2
    return reports[-2:]


def test_json_has_profiles(finished):
    profiled, plain = finished
    assert profiled["energy"]["energy_j"] > 0
    assert "energy" not in plain
    for r in finished:
        assert r["duration_s"] >= 0.5
        assert r["power_series"], r
        assert r["decisions"] == []


def test_table(daemon, finished):
    r = daemon.cli("report")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    assert lines[0].split() == ["CONTAINER", "NAME", "DURATION", "ENERGY", "AVG", "POWER",
                                "POLICY", "DECISIONS"]
    rows = {line.split()[0]: line for line in lines[1:]}
    profiled, plain = finished
    row = rows[profiled["container"]].split()
    s = reporting.summary(profiled)
    assert row[1] == "basic"
    assert row[3] == f"{s['energy_j']:.1f}" and row[4] == "J"
    assert row[5] == f"{s['average_power_w']:.1f}"
    assert row[-2:] == ["NONE", "0"]
    # no energy counters for this one: estimated from the series, marked "~"
    assert rows[plain["container"]].split()[3].startswith("~")


def test_report_one_container(daemon, finished):
    cid = finished[0]["container"]
    r = daemon.cli("report", cid, "--json")
    assert [p["container"] for p in json.loads(r.stdout)] == [cid]


@pytest.mark.skipif(HAVE_MATPLOTLIB, reason="matplotlib is installed")
def test_plot_without_matplotlib(daemon, finished, tmp_path):
    out = tmp_path / "r.png"
    r = daemon.cli("report", "--plot", str(out))
    assert r.returncode == 1
    assert r.stderr.decode() == f"nrm: {reporting.MISSING_MATPLOTLIB}\n"
    assert not out.exists()


@pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="needs matplotlib (pip install 'nrm[plot]')")
def test_plot_png(daemon, finished, tmp_path):
    out = tmp_path / "r.png"
    r = daemon.cli("report", "--plot", str(out))
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ no daemon

def synthetic(decisions=True) -> dict:
    series = [[1000.0 + i, 30.0 if i < 5 else 20.0] for i in range(11)]
    ds = [{"container": "c1", "cpu": 0, "control": "cpu.duty_cycle", "old": 16, "new": 8,
           "reason": "slack", "time": 1004.5},
          {"container": "c1", "cpu": 1, "control": "cpu.duty_cycle", "old": 16, "new": 12,
           "reason": "slack", "time": 1006.0}] if decisions else []
    return {"container": "c1", "name": "app", "duration_s": 10.0, "cpus": [0, 1],
            "power_series": series, "decisions": ds,
            "policy": {"name": "DDCM", "decisions": len(ds)}}


def test_summary_integrates_series_without_energy_counters():
    s = reporting.summary(synthetic())
    # 4 s at 30 W, 1 s ramp (25 W), 5 s at 20 W
    assert s["energy_j"] == pytest.approx(120 + 25 + 100)
    assert s["energy_source"] == "series"
    assert s["average_power_w"] == pytest.approx(24.5)
    assert s["policy"] == "DDCM" and s["decisions"] == 2


def test_summary_prefers_energy_counters():
    r = synthetic()
    r["energy"] = {"energy_j": 200.0, "dram_energy_j": 20.0, "node_power_w": 22.0,
                   "duration_s": 10.0}
    s = reporting.summary(r)
    assert s["energy_j"] == 220.0 and s["energy_source"] == "sensors"
    assert s["average_power_w"] == 22.0


def test_summary_of_empty_profile():
    s = reporting.summary({"container": "c", "name": "n", "duration_s": 0.0})
    assert s["energy_j"] is None and s["average_power_w"] is None
    assert s["policy"] == "NONE" and s["decisions"] == 0


def test_plot_error_messages(tmp_path):
    if not HAVE_MATPLOTLIB:
        with pytest.raises(reporting.PlotError, match="pip install 'nrm\\[plot\\]'"):
            reporting.plot([synthetic()], str(tmp_path / "x.png"))
        return
    with pytest.raises(reporting.PlotError, match="no finished containers"):
        reporting.plot([], str(tmp_path / "x.png"))
    with pytest.raises(reporting.PlotError, match="cannot write"):
        reporting.plot([synthetic()], str(tmp_path / "no" / "such" / "x.png"))


@pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="needs matplotlib (pip install 'nrm[plot]')")
def test_plot_with_decisions(tmp_path):
    out = tmp_path / "x.png"
    reporting.plot([synthetic(), synthetic(decisions=False), {"container": "e", "name": "e"}],
                   str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
