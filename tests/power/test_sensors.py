"""The sensor thread and energy profiles, on fake trees."""

from __future__ import annotations

import threading
import time

import pytest

from nrm.hw import HardwareError, open_platform
from nrm.power.sensors import SensorManager
from tests.fakehw import FakeNode


def wait_for(cond, timeout: float = 20.0) -> bool:
    """Generous deadline: these tests count events, they never time them."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.005)
    return cond()


def test_runs_at_5ms_and_counts_ticks(tmp_path):
    node = FakeNode(tmp_path, packages=2)
    got = []
    with open_platform("linux", root=node.root) as p:
        sm = SensorManager(p, period_s=0.005, on_sample=got.append)
        sm.start()
        try:
            assert wait_for(lambda: sm.stats()["ticks"] >= 40)
        finally:
            sm.stop()
        assert not sm.running
        st = sm.stats()
        assert st["ticks"] >= 40 and st["errors"] == 0 and st["period_s"] == 0.005
        assert st["max_duration_s"] >= st["latest_duration_s"] >= 0
        assert st["max_lateness_s"] >= st["latest_lateness_s"] >= 0
        assert st["max_lateness_s"] >= st["mean_lateness_s"]
        assert len(got) == st["ticks"]
        times = [s.time for s in got]
        assert times == sorted(times)
        assert sm.latest is got[-1]
        assert got[-1].packages[0]["power_w"] is not None
        ticks = st["ticks"]
        time.sleep(0.05)
        assert sm.stats()["ticks"] == ticks          # really stopped


def test_sampling_errors_are_counted_and_do_not_kill_the_thread(tmp_path, caplog):
    node = FakeNode(tmp_path)
    with open_platform("linux", root=node.root) as p:
        calls = []

        def callback(sample):
            calls.append(sample)
            raise RuntimeError("consumer bug")

        sm = SensorManager(p, period_s=0.005, on_sample=callback)
        sm.start()
        try:
            assert wait_for(lambda: sm.stats()["callback_errors"] >= 3)
            node.write(f"{node.zone(0)}/energy_uj", "garbage")
            assert wait_for(lambda: sm.stats()["errors"] >= 3)
            node.write(f"{node.zone(0)}/energy_uj", 5)
            before = len(calls)
            assert wait_for(lambda: len(calls) > before + 2)
        finally:
            sm.stop()
    assert "sensor sample failed" in caplog.text
    # rate-limited: a handful of lines, not one per failed tick
    assert caplog.text.count("sensor sample failed") <= 2


def test_stop_is_prompt_with_a_long_period(tmp_path):
    node = FakeNode(tmp_path)
    with open_platform("linux", root=node.root) as p:
        sm = SensorManager(p, period_s=3600.0)
        sm.start()
        assert wait_for(lambda: sm.stats()["ticks"] == 1)
        t = threading.Thread(target=sm.stop)
        t.start()
        t.join(30)
        assert not t.is_alive() and not sm.running


def test_profile_energy_power_and_temperatures(tmp_path):
    node = FakeNode(tmp_path, packages=2)
    with open_platform("linux", root=node.root) as p:
        sm = SensorManager(p, period_s=0.005)
        sm.start()
        try:
            sm.begin_profile("c1")
            node.advance_energy(0, 100.0)
            node.advance_energy(1, 50.0)
            node.advance_energy(0, 10.0, dram=True)
            node.set_temperature(1, 66.0)
            prof = sm.end_profile("c1")
        finally:
            sm.stop()
    assert prof["packages"]["0"]["energy_j"] == pytest.approx(100.0)
    assert prof["packages"]["0"]["dram_energy_j"] == pytest.approx(10.0)
    assert prof["energy_j"] == pytest.approx(150.0)
    assert prof["dram_energy_j"] == pytest.approx(10.0)
    assert prof["duration_s"] > 0
    assert prof["power_w"] == pytest.approx(150.0 / prof["duration_s"])
    assert prof["node_power_w"] == pytest.approx(160.0 / prof["duration_s"])
    assert prof["temperatures_c"] == {"0": 40.0, "1": 66.0}
    assert prof["emulated"] is False
    with pytest.raises(KeyError):
        sm.end_profile("c1")


def test_profile_on_emulated_node_is_labelled(tmp_path):
    node = FakeNode(tmp_path)
    with open_platform("emulated", root=node.root) as p:
        sm = SensorManager(p)
        sm.begin_profile(("container", 7))
        prof = sm.end_profile(("container", 7))
    assert prof["emulated"] is True and prof["energy_j"] >= 0


def test_profile_begin_reports_hardware_errors(tmp_path):
    node = FakeNode(tmp_path)
    with open_platform("linux", root=node.root) as p:
        sm = SensorManager(p)
        node.write(f"{node.zone(0)}/energy_uj", "garbage")
        with pytest.raises(HardwareError):
            sm.begin_profile("x")


def test_rejects_bad_period(tmp_path):
    node = FakeNode(tmp_path)
    with open_platform("linux", root=node.root) as p:
        with pytest.raises(ValueError):
            SensorManager(p, period_s=0)
