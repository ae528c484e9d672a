"""The emulated node: model on fake trees, actuation on real cgroup v1 bandwidth."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from nrm.hw import HardwareError, open_platform
from nrm.hw.emulated import EmulatedPlatform, find_cpu_cgroup_mount, last_cpu, placement_wait
from tests.nrmd import wait_for
from tests.fakehw import FakeNode


class Busy:
    """Advances the fake /proc/stat as if the given cpus were 100 % busy."""

    def __init__(self, node: FakeNode, cpus):
        self.node, self.cpus, self.ticks = node, set(cpus), 0

    def step(self, n: int = 100) -> None:
        self.ticks += n
        self.node.set_proc_stat({c: (self.ticks if c in self.cpus else 0,
                                     0 if c in self.cpus else self.ticks)
                                 for c in range(self.node.ncpus)})


def model_only(node: FakeNode, **opts) -> EmulatedPlatform:
    opts.setdefault("model_period_s", 0.0)
    p = open_platform("emulated", root=node.root, emulated_options=opts)
    assert isinstance(p, EmulatedPlatform)
    return p


def settle(p, busy: Busy, steps: int = 4):
    s = None
    for _ in range(steps):
        busy.step()
        s = p.sample()
    return s


def test_fake_tree_senses_and_labels_everything_emulated(tmp_path):
    node = FakeNode(tmp_path, packages=2, cores=2)
    with model_only(node) as p:
        d = p.describe()
        assert d["backend"] == "emulated" and d["emulated"] is True
        assert d["actuation_effective"] is False
        assert any("cgroup" in r for r in d["reasons"])
        assert p.duty_cycle_levels == 16
        names = {s.name for s in p.signals()}
        assert names >= {"package.energy", "dram.energy", "package.temperature",
                         "cpu.duty_cycle"}
        s = p.sample()
        assert s.emulated and s.to_dict()["emulated"] is True
        assert set(s.packages) == {0, 1}
        assert p.frequencies(0)[0] == 1.0e9 and p.frequencies(0)[-1] == 2.4e9
        assert p.frequencies(99) == []


def test_controls_quantize_like_hardware(tmp_path):
    node = FakeNode(tmp_path)
    with model_only(node) as p:
        assert p.write("cpu.frequency", 1, 1.25e9) == 1.4e9
        assert p.read("cpu.frequency", 1) == 1.4e9
        assert p.write("cpu.frequency", 1, 5e9) == 2.4e9
        assert p.write("cpu.duty_cycle", 0, 7.2) == 8
        assert p.write("package.power_limit", 0, 1.0) == 20.0        # not below idle
        with pytest.raises(HardwareError, match="out of range"):
            p.write("cpu.duty_cycle", 0, 0)
        p.restore_all()
        assert p.read("cpu.duty_cycle", 0) == 16
        assert p.read("package.power_limit", 0) == 40.0


def test_energy_model(tmp_path):
    node = FakeNode(tmp_path, cores=2)
    busy = Busy(node, [0, 1])
    with model_only(node, thermal_tau_s=1e-9) as p:
        s = settle(p, busy)
        pkg = s.packages[0]
        assert pkg["power_w"] == pytest.approx(40.0)                 # 20 idle + 2 x 10
        assert pkg["dram_power_w"] == pytest.approx(4.0)             # 2 + 0.1 x 20
        assert pkg["temperature_c"] == pytest.approx(80.0)           # full load
        assert s.node_power_w == pytest.approx(44.0)
        # no cgroups here, so the throttle is applied in the model
        p.write("cpu.duty_cycle", 0, 8)                              # 20 + 5 + 10
        assert settle(p, busy).packages[0]["power_w"] == pytest.approx(35.0)
        p.write("cpu.frequency", 1, 1.2e9)                           # + 10 x 0.5 x 0.25
        assert settle(p, busy).packages[0]["power_w"] == pytest.approx(26.25)
        busy.cpus = set()
        assert settle(p, busy).packages[0]["power_w"] == pytest.approx(20.0)
        e0 = p.read("package.energy", 0)
        assert p.read("package.energy", 0) >= e0


@pytest.mark.parametrize("hz, expected_w", [
    (2.4e9, 40.0),                     # 20 idle + 2 x 10
    (1.8e9, 20 + 10 + 10 * 0.75 * 0.75 ** 2),
    (1.2e9, 20 + 10 + 10 * 0.5 * 0.5 ** 2),    # at the voltage floor
    (1.0e9, 20 + 10 + 10 * (1 / 2.4) * 0.5 ** 2),  # below it: power falls with f only
])
def test_voltage_floor(tmp_path, hz, expected_w):
    node = FakeNode(tmp_path, cores=2)
    busy = Busy(node, [0, 1])
    with model_only(node, thermal_tau_s=1e-9) as p:
        p.write("cpu.frequency", 1, hz)
        assert settle(p, busy).packages[0]["power_w"] == pytest.approx(expected_w)


def test_emulated_power_limit_converges_like_rapl(tmp_path):
    node = FakeNode(tmp_path, cores=2)
    busy = Busy(node, [0, 1])
    with model_only(node) as p:
        settle(p, busy)
        p.write("package.power_limit", 0, 30.0)
        s = settle(p, busy, steps=40)
        assert s.packages[0]["power_w"] == pytest.approx(30.0, abs=0.3)
        assert p.describe()["speed_factor"][0] == pytest.approx(0.5, abs=0.02)
        p.restore("package.power_limit")
        assert settle(p, busy, steps=10).packages[0]["power_w"] == pytest.approx(40.0)


def test_unknown_option_is_refused(tmp_path):
    node = FakeNode(tmp_path)
    with pytest.raises(HardwareError, match="unknown emulated option"):
        open_platform("emulated", root=node.root, emulated_options={"idle": 3})


def test_last_cpu_parses_odd_command_names():
    fields = " ".join(str(i) for i in range(3, 53))
    assert last_cpu(f"123 (a) b) c) {fields}") == 39


def test_mountinfo_lookup(tmp_path):
    node = FakeNode(tmp_path)
    node.write("proc/self/mountinfo",
               "31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n"
               "33 31 0:30 / /x/cpuacct rw,relatime - cgroup cgroup rw,cpuacct\n"
               "32 31 0:29 / /x/cpu rw,relatime - cgroup cgroup rw,cpu\n")
    assert find_cpu_cgroup_mount(node.root) == "/x/cpu"


# ------------------------------------------------------------ real cgroups

CPU_MOUNT = find_cpu_cgroup_mount("/")


def _cgroups_usable() -> str:
    if os.geteuid() != 0:
        return "needs root to create cgroups"
    if not CPU_MOUNT or not os.path.exists(os.path.join(CPU_MOUNT, "cpu.cfs_quota_us")):
        return "no cgroup v1 cpu controller with CFS bandwidth"
    if 0 not in os.sched_getaffinity(0):
        return "cpu 0 not available to this process"
    return ""


needs_cgroups = pytest.mark.skipif(bool(_cgroups_usable()), reason=_cgroups_usable() or "ok")

# nice -10 so that other load on this shared 2-cpu machine does not take the
# share the measurement needs; bandwidth limits apply whatever the weight.
SPIN = "import os\nos.sched_setaffinity(0, {0})\nos.nice(-10)\nwhile True:\n    pass\n"


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_cgroup(pid: int) -> str:
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if "cpu" in controllers.split(","):
                return path
    raise AssertionError(f"no cpu cgroup line for {pid}")


def _share(pid: int, seconds: float = 1.0) -> float:
    a, t = _cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return (_cpu_seconds(pid) - a) / (time.monotonic() - t)


@pytest.mark.root
@needs_cgroups
def test_real_bandwidth_halves_a_busy_loop_and_restore_releases_it():
    name = f"nrm.emu.test{os.getpid()}"
    base = os.path.join(CPU_MOUNT, name)
    p = EmulatedPlatform(root="/", options={"cgroup_name": name})
    child = subprocess.Popen([sys.executable, "-c", SPIN])
    try:
        assert p.describe()["actuation_effective"] is True
        origin = _cpu_cgroup(child.pid)
        p.set_task_provider(lambda: [child.pid])
        time.sleep(0.2)
        full = _share(child.pid)
        if full < 0.5:
            pytest.skip(f"machine too busy to measure: a busy loop got {full:.2f} of cpu 0")
        assert p.write("cpu.duty_cycle", 0, 8) == 8
        with open(os.path.join(base, "cpu0", "cpu.cfs_quota_us")) as f:
            assert int(f.read()) == 8000
        # placed by the placement thread, woken by the write
        wait_for(lambda: str(child.pid) in open(os.path.join(base, "cpu0", "tasks")).read().split(),
                 timeout=5)
        half = _share(child.pid)
        assert 0.3 < half / full < 0.75, (full, half)
        with open(os.path.join(base, "cpu0", "cpu.stat")) as f:
            throttled = dict(line.split() for line in f)["nr_throttled"]
        assert int(throttled) > 0
        p.restore_all()
        with open(os.path.join(base, "cpu0", "cpu.cfs_quota_us")) as f:
            assert int(f.read()) == -1
        assert not p.describe()["slowed_cpus"]
        # released by the placement thread, back to the group it came from
        wait_for(lambda: _cpu_cgroup(child.pid) == origin, timeout=5)
    finally:
        p.close()
        child.kill()
        child.wait()
    assert not os.path.exists(base)


@pytest.mark.root
@needs_cgroups
def test_a_new_quota_on_a_slowed_cpu_moves_nothing_and_wakes_no_pass():
    """Slowing a cpu or releasing it places at once; a new quota on a cpu
    already slowed applies to its group as it is, without a pass (the
    periods are long here, so any pass seen soon after a write was woken)."""
    name = f"nrm.emu.requota{os.getpid()}"
    base = os.path.join(CPU_MOUNT, name)
    p = EmulatedPlatform(root="/", options={"cgroup_name": name, "placement_period_s": 30,
                                            "placement_idle_period_s": 30})
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                             preexec_fn=lambda: os.sched_setaffinity(0, {0}))
    origin = _cpu_cgroup(child.pid)
    passes = []
    place = p.place_threads
    p.place_threads = lambda: passes.append(place()) or passes[-1]
    try:
        p.set_task_provider(lambda: [child.pid])
        p.write("cpu.duty_cycle", 0, 8)
        wait_for(lambda: passes == [1], timeout=5)
        p.write("cpu.duty_cycle", 0, 4)
        with open(os.path.join(base, "cpu0", "cpu.cfs_quota_us")) as f:
            assert int(f.read()) == 4000
        time.sleep(0.5)
        assert passes == [1]
        assert str(child.pid) in open(os.path.join(base, "cpu0", "tasks")).read().split()
        p.write("cpu.duty_cycle", 0, 16)
        wait_for(lambda: len(passes) == 2, timeout=5)
        assert _cpu_cgroup(child.pid) == origin
    finally:
        p.close()
        child.kill()
        child.wait()


@pytest.mark.root
@needs_cgroups
def test_a_released_thread_goes_back_to_the_group_it_came_from():
    """Not to a group shared by every released thread: in cgroup v1 such a
    group's weight is split across the cpus its threads run on, so ranks
    released into it lose cpu to any task beside them (a foreign hog)."""
    name = f"nrm.emu.home{os.getpid()}"
    # a sibling whose name starts with ours is still not one of our groups
    home = os.path.join(CPU_MOUNT, f"{name}.job")
    os.makedirs(home)
    p = EmulatedPlatform(root="/", options={"cgroup_name": name})
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                             preexec_fn=lambda: os.sched_setaffinity(0, {0}))
    try:
        with open(os.path.join(home, "tasks"), "w") as f:
            f.write(str(child.pid))
        p.set_task_provider(lambda: [child.pid])
        p.write("cpu.duty_cycle", 0, 8)
        wait_for(lambda: _cpu_cgroup(child.pid) == f"/{name}/cpu0", timeout=5)
        p.write("cpu.duty_cycle", 0, 16)
        wait_for(lambda: _cpu_cgroup(child.pid) != f"/{name}/cpu0", timeout=5)
        assert _cpu_cgroup(child.pid) == f"/{name}.job"
    finally:
        p.close()
        child.kill()
        child.wait()
        os.rmdir(home)


@pytest.mark.root
@needs_cgroups
def test_stale_groups_from_a_crash_are_cleaned(tmp_path):
    name = f"nrm.emu.stale{os.getpid()}"
    base = os.path.join(CPU_MOUNT, name)
    os.makedirs(os.path.join(base, "cpu0"))
    with open(os.path.join(base, "cpu0", "cpu.cfs_quota_us"), "w") as f:
        f.write("2000")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with open(os.path.join(base, "cpu0", "tasks"), "w") as f:
            f.write(str(child.pid))
        p = EmulatedPlatform(root="/", options={"cgroup_name": name})
        try:
            assert not os.path.exists(os.path.join(base, "cpu0"))
            with open(f"/proc/{child.pid}/cgroup") as f:
                line = [x for x in f.read().splitlines() if ":cpu:" in x][0]
            assert line.endswith(":/")
        finally:
            p.close()
    finally:
        child.kill()
        child.wait()
    assert not os.path.exists(base)


HOG = "import os\nos.sched_setaffinity(0, {0})\nwhile True:\n    pass\n"
SLEEPER = "import time\nwhile True:\n    time.sleep(1)\n"


def _average_power(p, seconds: float) -> float:
    """The model integrates the power computed at each read over the time to the next,
    so read often, after a first window has set every thread's baseline."""
    for _ in range(2):
        p.read("package.energy", 0)
        time.sleep(0.2)
    e0, t0 = p.read("package.energy", 0), time.monotonic()
    for _ in range(int(seconds / 0.1)):
        time.sleep(0.1)
        e1 = p.read("package.energy", 0)
    return (e1 - e0) / (time.monotonic() - t0)


@pytest.mark.root
def test_only_the_containers_own_threads_are_billed():
    # A cpu hog outside the containers must not be billed to them: with a
    # sleeping container, the package draws its idle power whatever the hog
    # does (whole-cpu /proc/stat would bill the hog's cpu, +10 W).
    name = f"nrm.emu.bill{os.getpid()}"
    p = EmulatedPlatform(root="/", options={"cgroup_name": name, "model_period_s": 0.05})
    container = subprocess.Popen([sys.executable, "-c", SLEEPER])
    hog = subprocess.Popen([sys.executable, "-c", HOG])
    try:
        p.set_task_provider(lambda: [container.pid])
        time.sleep(0.3)
        if _share(hog.pid, 0.5) < 0.3:
            pytest.skip("machine too busy: the hog got under 0.3 of a cpu")
        idle = float(p.options["idle_w"])
        assert _average_power(p, 1.0) < idle + 0.5     # the idle share, nothing of the hog
        # the same hog, now inside a container, is billed
        p.set_task_provider(lambda: [container.pid, hog.pid])
        time.sleep(0.3)
        share = _share(hog.pid, 0.5)
        assert _average_power(p, 1.0) > idle + 10 * share / 2
    finally:
        p.close()
        for child in (container, hog):
            child.kill()
            child.wait()


@pytest.mark.parametrize("last,moved,expected", [
    (0.0, False, 0.02),     # the first pass after a wake-up: fast
    (0.02, True, 0.02),     # a thread moved: stay fast
    (0.02, False, 0.04),    # nothing moved: back off
    (0.16, False, 0.2),     # ... up to the idle period
    (0.2, False, 0.2),
    (0.2, True, 0.02),      # a move brings the fast rate back at once
])
def test_placement_backs_off_while_nothing_moves(last, moved, expected):
    assert placement_wait(last, moved, fast=0.02, idle=0.2) == pytest.approx(expected)


def test_placement_idle_period_never_below_the_fast_one():
    assert placement_wait(0.05, False, fast=0.05, idle=0.01) == 0.05
