"""The node power cap: the pure control law, then the controller on fake nodes."""

from __future__ import annotations

import dataclasses
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nrm.power.cap import PowerCapController, control_law, split_cap
from nrm.hw import HardwareError, open_platform
from nrm.hw.registry import Sample, package_entry
from tests.fakehw import FakeNode

B2 = {0: (10.0, 150.0), 1: (10.0, 150.0)}

# cap, measured, limits, bounds, shares, expected limits
LAW_CASES = [
    pytest.param(100, None, {0: 50, 1: 50}, B2, None, {0: 50, 1: 50}, id="no-measurement"),
    pytest.param(100, 101.5, {0: 50, 1: 50}, B2, None, {0: 50, 1: 50}, id="inside-deadband"),
    pytest.param(100, 98.5, {0: 50, 1: 50}, B2, None, {0: 50, 1: 50}, id="deadband-below"),
    pytest.param(100, 120, {0: 50, 1: 50}, B2, None, {0: 45, 1: 45}, id="over-equal-split"),
    pytest.param(100, 80, {0: 50, 1: 50}, B2, None, {0: 55, 1: 55}, id="under-equal-split"),
    pytest.param(100, 120, {0: 60, 1: 40}, B2, {0: 75, 1: 25}, {0: 52.5, 1: 37.5},
                 id="over-proportional"),
    pytest.param(100, 80, {0: 150, 1: 40}, B2, None, {0: 150, 1: 50},
                 id="saturated-package-skipped"),
    pytest.param(100, 200, {0: 12, 1: 40}, B2, None, {0: 10, 1: 15}, id="clamped-at-min"),
    pytest.param(100, 200, {0: 10, 1: 10}, B2, None, {0: 10, 1: 10}, id="all-at-min"),
    pytest.param(100, 80, {0: 200, 1: 5}, B2, None, {0: 150, 1: 20},
                 id="out-of-bounds-clamped-first"),
    pytest.param(100, 120, {0: 60, 1: 40}, B2, {0: 0, 1: 0}, {0: 55, 1: 35},
                 id="zero-shares-equal"),
]


@pytest.mark.parametrize("cap,measured,limits,bounds,shares,expected", LAW_CASES)
def test_control_law_table(cap, measured, limits, bounds, shares, expected):
    assert control_law(cap, measured, limits, bounds, shares) == pytest.approx(expected)


def test_split_cap():
    assert split_cap(100, [0, 1], B2) == {0: 50, 1: 50}
    assert split_cap(100, [0, 1], B2, {0: 30, 1: 10}) == {0: 75, 1: 25}
    assert split_cap(400, [0, 1], B2) == {0: 150, 1: 150}
    assert split_cap(5, [0, 1], B2) == {0: 10, 1: 10}


@given(cap=st.floats(20, 400), measured=st.floats(0, 600),
       l0=st.floats(0, 300), l1=st.floats(0, 300),
       s0=st.floats(0, 200), s1=st.floats(0, 200))
def test_law_stays_in_bounds_and_moves_the_right_way(cap, measured, l0, l1, s0, s1):
    out = control_law(cap, measured, {0: l0, 1: l1}, B2, {0: s0, 1: s1})
    clamped = {0: min(max(l0, 10), 150), 1: min(max(l1, 10), 150)}
    for p in (0, 1):
        assert 10 <= out[p] <= 150
        if measured > cap:
            assert out[p] <= clamped[p] + 1e-9
        else:
            assert out[p] >= clamped[p] - 1e-9


def plant(limits, demand, dram=6.0):
    """A node whose packages draw min(limit, demand) plus an uncapped DRAM share."""
    pkgs = {p: min(limits[p], demand[p]) for p in limits}
    return sum(pkgs.values()) + dram, pkgs


@pytest.mark.parametrize("cap", [60.0, 100.0, 140.0])
def test_closed_loop_converges_without_oscillating(cap):
    demand = {0: 90.0, 1: 40.0}
    limits = split_cap(cap, [0, 1], B2)
    history = []
    for _ in range(60):
        measured, shares = plant(limits, demand)
        limits = control_law(cap, measured, limits, B2, shares)
        history.append(measured)
    tail = history[-10:]
    if cap < sum(demand.values()) + 6:
        assert all(abs(m - cap) <= max(0.5, 0.02 * cap) for m in tail)
    else:
        assert all(m <= cap for m in tail)
    assert len({round(m, 6) for m in tail}) == 1          # steady: no limit cycle


# ------------------------------------------------------------ on platforms

def sample_with(power, dram=0.0, t=0.0):
    pk = {p: package_entry(0.0, w, 0.0, dram, 50.0) for p, w in power.items()}
    return Sample(time=t, packages=pk, node_power_w=sum(power.values()) + dram * len(power))


def test_controller_writes_limits_and_clear_restores(tmp_path):
    node = FakeNode(tmp_path, packages=2)
    limit = f"{node.zone(0)}/constraint_0_power_limit_uw"
    with open_platform("linux", root=node.root) as p:
        c = PowerCapController(p, period_s=0.0)
        assert c.cap is None
        c.on_sample(sample_with({0: 90.0, 1: 30.0}))          # no cap: only learns shares
        assert p.saved() == {}
        limits = c.set_cap(120)
        assert limits == {0: 90.0, 1: 30.0}                   # proportional split
        assert node.read(limit) == "90000000"
        c.on_sample(sample_with({0: 100.0, 1: 40.0}))         # 20 W over -> -10 W
        assert c.status()["limits_w"]["0"] == pytest.approx(100 * 0.5 * -20 / 140 + 90)
        assert c.status()["writes"] == 4
        c.on_sample(sample_with({0: 90.0, 1: 30.5}))          # inside the deadband
        assert c.status()["writes"] == 4
        c.clear()
        assert c.cap is None
        assert node.read(limit) == "100000000"
        assert p.saved() == {}
        with pytest.raises(ValueError):
            c.set_cap(0)


def test_controller_without_power_limit_control(tmp_path):
    node = FakeNode(tmp_path, powercap=False, msr=True)
    for cpu in range(node.ncpus):
        with open(node.msr_path(cpu), "r+b") as f:
            f.truncate(0x612 * 8)            # energy readable, PL1 (0x610) too, no 0x614
    with open_platform("linux", root=node.root) as p:
        c = PowerCapController(p)
        c.set_cap(80)                        # bounds fall back to [1 W, original limit]
        assert p.read("package.power_limit", 0) == 80.0
        c.set_cap(500)
        assert p.read("package.power_limit", 0) == 100.0      # never above the original
    node2 = FakeNode(tmp_path / "b")
    os.unlink(node2.path(f"{node2.zone(0)}/constraint_0_power_limit_uw"))
    with open_platform("linux", root=node2.root) as p2:
        with pytest.raises(HardwareError, match="unknown control 'package.power_limit'"):
            PowerCapController(p2).set_cap(50)


def test_controller_acts_once_per_period_on_the_mean(tmp_path):
    node = FakeNode(tmp_path, packages=2)
    with open_platform("linux", root=node.root) as p:
        c = PowerCapController(p, period_s=1.0)
        c.set_cap(100)
        assert c.set_cap(100) == {0: 50.0, 1: 50.0}
        writes = c.status()["writes"]
        for i, w in enumerate([70.0, 60.0, 50.0, 60.0]):       # t = 0 .. 0.75 s
            c.on_sample(sample_with({0: w, 1: w}, t=i * 0.25))
        assert c.status()["writes"] == writes
        c.on_sample(sample_with({0: 60.0, 1: 60.0}, t=1.0))    # mean 120 W: 20 W over
        assert c.status()["limits_w"] == {"0": 45.0, "1": 45.0}


def test_cap_holds_on_the_emulated_node(tmp_path):
    """End to end: samples -> controller -> emulated RAPL -> model -> samples.

    Sample times are synthetic (0.1 s apart) so the outcome does not depend
    on how fast this machine runs the loop.
    """
    node = FakeNode(tmp_path, packages=2, cores=4)
    ticks = 0
    with open_platform("emulated", root=node.root,
                       emulated_options={"model_period_s": 0.0}) as p:
        c = PowerCapController(p)
        full = None
        history = []
        for i in range(400):
            ticks += 100
            node.set_proc_stat({cpu: (ticks, 0) for cpu in range(node.ncpus)})
            s = dataclasses.replace(p.sample(), time=i * 0.1)
            if i == 5:
                full = s.node_power_w             # 2 x (20 + 4 x 10) + 2 x (2 + 4)
                c.set_cap(100.0)
            c.on_sample(s)
            history.append(s.node_power_w)
        assert full == pytest.approx(132.0)
        assert all(abs(w - 100.0) <= 2.0 for w in history[-50:]), history[-50:]
        c.clear()
        assert p.read("package.power_limit", 0) == 60.0
