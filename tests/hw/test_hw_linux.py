"""The linux backend against fake sysfs/devfs trees (tests/fakehw.py)."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile

import pytest

from nrm.hw import HardwareError, open_platform
from nrm.hw.linux.backend import LinuxPlatform
from nrm.hw.linux.msr import MsrAccess, detect_extended_modulation
from nrm.hw.linux.sysfs import hw_error
from tests.fakehw import FakeNode


def linux(node: FakeNode, **kw) -> LinuxPlatform:
    p = open_platform("linux", root=node.root, **kw)
    assert isinstance(p, LinuxPlatform)
    return p


# ------------------------------------------------------------------ energy

def test_powercap_power_across_wraparound(tmp_path):
    node = FakeNode(tmp_path, packages=2, max_energy_range_uj=1_000_000)
    node.set_energy_uj(0, 900_000)
    node.set_energy_uj(0, 990_000, dram=True)
    with linux(node) as p:
        first = p.sample()
        assert first.packages[0]["power_w"] is None and first.node_power_w is None
        node.advance_energy(0, 0.3)            # 900000 + 300000 wraps to 199999
        node.advance_energy(0, 0.02, dram=True)
        assert node.energy_uj(0) == 199_999
        second = p.sample()
        pkg = second.packages[0]
        de = pkg["energy_j"] - first.packages[0]["energy_j"]
        assert de == pytest.approx(0.3, abs=1e-6)
        assert pkg["dram_energy_j"] - first.packages[0]["dram_energy_j"] == \
            pytest.approx(0.02, abs=1e-6)
        dt = second.time - first.time
        assert pkg["power_w"] == pytest.approx(0.3 / dt)
        assert second.packages[1]["power_w"] == 0.0
        assert second.node_power_w == pytest.approx((0.3 + 0.02) / dt)
        assert second.to_dict()["packages"]["0"]["energy_j"] == pkg["energy_j"]


def test_msr_fallback_units_and_32bit_wrap(tmp_path):
    node = FakeNode(tmp_path, packages=2, powercap=False, msr=True, energy_unit_exp=16)
    for cpu in node.cpus_of(1):
        node.set_msr(cpu, 0x611, 0xFFFFFFFF - 100)
    with linux(node) as p:
        d = p.describe()
        assert d["energy_source"] == "msr"
        before = p.read("package.energy", 1)
        node.advance_msr_energy(1, 2.0)       # 2 J at 1/2^16 J per unit, across the wrap
        assert node.get_msr(node.cpus_of(1)[0], 0x611) < 0xFFFFFFFF - 100
        assert p.read("package.energy", 1) - before == pytest.approx(2.0, abs=1 / 65536)
        node.advance_msr_energy(0, 1.0, dram=True)
        assert p.read("dram.energy", 0) == pytest.approx(1.0, abs=1 / 65536)


def test_msr_safe_preferred_over_msr(tmp_path):
    node = FakeNode(tmp_path, powercap=False, msr_safe=True)
    os.makedirs(node.path("dev/cpu/0"), exist_ok=True)
    with open(node.path("dev/cpu/0/msr"), "wb"):
        pass                                   # an empty msr device would read nothing
    with linux(node) as p:
        assert p.describe()["paths"]["msr"].endswith("msr_safe")
        assert "package.energy" in [s.name for s in p.signals()]


def test_no_rapl_auto_falls_back_to_emulated(tmp_path):
    node = FakeNode(tmp_path, powercap=False)
    p = open_platform("auto", root=node.root)
    try:
        assert p.backend_name == "emulated" and p.emulated
        d = p.describe()
        assert any("RAPL is not readable" in r for r in d["reasons"])
        assert d["actuation_effective"] is False      # no cgroup mount in a fake tree
    finally:
        p.close()
    node2 = FakeNode(tmp_path / "b")
    with open_platform("auto", root=node2.root) as p2:
        assert p2.backend_name == "linux"


def test_unreadable_energy_file_is_reported_with_path(tmp_path):
    node = FakeNode(tmp_path, dram=False)
    energy = node.path(f"{node.zone(0)}/energy_uj")
    os.unlink(energy)
    os.mkdir(energy)                           # reading a directory fails: EISDIR
    with linux(node) as p:
        assert "package.energy" not in [s.name for s in p.signals()]
        reasons = " ".join(p.describe()["reasons"])
        assert energy in reasons
        with pytest.raises(HardwareError, match="unknown signal 'package.energy'"):
            p.read("package.energy", 0)


def test_energy_permission_message_names_the_cve():
    e = hw_error("/sys/class/powercap/intel-rapl:0/energy_uj",
                 PermissionError(errno.EACCES, "Permission denied"))
    assert "CVE-2020-8694" in str(e) and "intel-rapl:0/energy_uj" in str(e)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to an unprivileged euid")
def test_real_permission_denied_as_unprivileged_user():
    """chmod 000 does not stop root, so read the tree as nobody (seteuid)."""
    root = tempfile.mkdtemp(prefix="nrm-fakehw-")
    try:
        os.chmod(root, 0o755)
        node = FakeNode(root)
        os.chmod(node.path(f"{node.zone(0)}/energy_uj"), 0)
        os.seteuid(65534)
        try:
            p = open_platform("auto", root=root)
        finally:
            os.seteuid(0)
        try:
            assert p.backend_name == "emulated"
            assert any("CVE-2020-8694" in r for r in p.describe()["reasons"])
        finally:
            p.close()
    finally:
        shutil.rmtree(root)


def test_garbage_in_energy_file_is_a_hardware_error(tmp_path):
    node = FakeNode(tmp_path)
    with linux(node) as p:
        node.write(f"{node.zone(0)}/energy_uj", "not-a-number")
        with pytest.raises(HardwareError, match="energy_uj"):
            p.sample()


# -------------------------------------------------------------- names/index

def test_unknown_names_and_indices(tmp_path):
    node = FakeNode(tmp_path, packages=2, msr=True)
    with linux(node) as p:
        with pytest.raises(HardwareError, match="unknown control 'cpu.voltage'"):
            p.write("cpu.voltage", 0, 1)
        with pytest.raises(HardwareError, match="no index 9"):
            p.write("cpu.duty_cycle", 9, 8)
        with pytest.raises(HardwareError, match="no index 2"):
            p.read("package.energy", 2)
        with pytest.raises(HardwareError, match="not finite"):
            p.write("cpu.duty_cycle", 0, float("nan"))
        with pytest.raises(HardwareError, match="out of range"):
            p.write("cpu.duty_cycle", 0, 17)
        infos = {c.name: c for c in p.controls()}
        assert infos["cpu.duty_cycle"].indices == (0, 1, 2, 3)
        assert infos["package.power_limit"].domain == "package"
        for s in p.signals():
            assert s.aggregation in ("sum", "average", "max") and s.unit


# --------------------------------------------------------------------- MSR

def test_msr_writes_outside_mask_are_refused(tmp_path, caplog):
    node = FakeNode(tmp_path, msr=True)
    node.set_msr(0, 0x19A, 0x100)              # a bit nrm does not own
    msr = MsrAccess(node.root)
    try:
        with pytest.raises(HardwareError, match="outside the write mask"):
            msr.write(0, 0x19A, 0x000)         # would clear bit 8
        with pytest.raises(HardwareError, match="not writable"):
            msr.write(0, 0x1A0, 0)
        with pytest.raises(HardwareError, match="outside the write mask"):
            msr.write(0, 0x610, node.get_msr(0, 0x610) | (1 << 40))   # PL2 half
        assert node.get_msr(0, 0x19A) == 0x100
        msr.write(0, 0x19A, 0x11F)
        assert node.get_msr(0, 0x19A) == 0x11F
        with pytest.raises(HardwareError, match="read allowlist"):
            msr.read(0, 0x10)
    finally:
        msr.close()
    assert "refused write" in caplog.text


def test_duty_cycle_16_levels(tmp_path):
    node = FakeNode(tmp_path, msr=True, ecmd=True)
    with linux(node) as p:
        assert p.duty_cycle_levels == 16
        assert p.write("cpu.duty_cycle", 1, 7) == 7
        assert node.get_msr(1, 0x19A) == 16 + 7
        assert p.read("cpu.duty_cycle", 1) == 7
        assert p.write("cpu.duty_cycle", 1, 16) == 16
        assert node.get_msr(1, 0x19A) == 0
        assert p.write("cpu.duty_cycle", 1, 2.2) == 3   # quantized up


def test_duty_cycle_8_levels_quantize_up(tmp_path):
    node = FakeNode(tmp_path, msr=True, ecmd=False)
    with linux(node) as p:
        assert p.duty_cycle_levels == 8
        assert p.write("cpu.duty_cycle", 0, 7) == 8
        assert node.get_msr(0, 0x19A) == 0x10 | 8       # bits 3:1 = 4 -> 8/16
        assert p.write("cpu.duty_cycle", 0, 1) == 2
        assert node.get_msr(0, 0x19A) == 0x10 | 2
        assert p.write("cpu.duty_cycle", 0, 15) == 16
        assert node.get_msr(0, 0x19A) == 0
        assert p.read("cpu.duty_cycle", 0) == 16


def test_extended_modulation_detection(tmp_path):
    assert detect_extended_modulation(FakeNode(tmp_path / "a", ecmd=True).root)[0] is True
    assert detect_extended_modulation(FakeNode(tmp_path / "b", ecmd=False).root)[0] is False
    unknown = FakeNode(tmp_path / "c", ecmd=None, msr=True)
    ext, why = detect_extended_modulation(unknown.root)
    assert ext is None and "8 levels" in why
    with linux(unknown) as p:
        assert p.duty_cycle_levels == 8
    node_e = FakeNode(tmp_path / "e", ecmd=None)
    node_e.write("proc/cpuinfo", "processor\t: 0\nflags\t\t: fpu ecmd msr\n")
    assert detect_extended_modulation(node_e.root)[0] is True


def test_no_clock_modulation_register(tmp_path):
    node = FakeNode(tmp_path, msr=True)
    for cpu in range(node.ncpus):
        with open(node.msr_path(cpu), "r+b") as f:
            f.truncate(0x100 * 8)              # 0x19A reads nothing: not implemented
    with linux(node) as p:
        assert "cpu.duty_cycle" not in [c.name for c in p.controls()]
        assert any("clock modulation" in r for r in p.describe()["reasons"])


def test_msr_power_limit_and_lock_bit(tmp_path):
    node = FakeNode(tmp_path, powercap=False, msr=True, power_unit_exp=3)
    with linux(node) as p:
        info = {c.name: c for c in p.controls()}["package.power_limit"]
        assert info.maximum == 300.0 and info.minimum == pytest.approx(37.5)
        assert p.read("package.power_limit", 0) == 100.0
        assert p.write("package.power_limit", 0, 80.06) == 80.125   # 1/8 W units, rounded up
        raw = node.get_msr(0, 0x610)
        assert raw & 0x7FFF == 641 and raw & (1 << 15)
        assert (raw >> 17) & 0x7F == 0x6E                          # time window untouched
        p.restore("package.power_limit")
        assert node.get_msr(0, 0x610) & 0x7FFF == 800
        node.set_msr(0, 0x610, node.get_msr(0, 0x610) | (1 << 63))
        with pytest.raises(HardwareError, match="locked"):
            p.write("package.power_limit", 0, 90)


# ------------------------------------------------------------- powercap PL1

def test_powercap_power_limit_write_and_restore(tmp_path):
    node = FakeNode(tmp_path, packages=2)
    node.write(f"{node.zone(1)}/enabled", 0)
    with linux(node) as p:
        info = {c.name: c for c in p.controls()}["package.power_limit"]
        assert info.maximum == 150.0 and info.minimum == 15.0
        assert p.write("package.power_limit", 1, 500) == 150.0      # clamped to max
        assert p.write("package.power_limit", 1, 72.5) == 72.5
        assert node.read(f"{node.zone(1)}/constraint_0_power_limit_uw") == "72500000"
        assert node.read(f"{node.zone(1)}/enabled") == "1"
        p.restore("package.power_limit", [1])
        assert node.read(f"{node.zone(1)}/constraint_0_power_limit_uw") == "100000000"
        assert node.read(f"{node.zone(1)}/enabled") == "0"
        assert p.saved() == {}


# ------------------------------------------------------------------ cpufreq

def test_cpufreq_userspace_governor(tmp_path):
    node = FakeNode(tmp_path, cores=2)
    d = node.cpufreq_dir(1)
    with linux(node) as p:
        assert p.frequencies(1) == [1.2e9, 1.8e9, 2.4e9]
        assert p.write("cpu.frequency", 1, 1.5e9) == 1.8e9          # rounded up
        assert node.read(f"{d}/scaling_governor") == "userspace"
        assert node.read(f"{d}/scaling_setspeed") == "1800000"
        assert p.write("cpu.frequency", 1, 9e9) == 2.4e9
        p.restore("cpu.frequency")
        assert node.read(f"{d}/scaling_governor") == "performance"
        assert node.read(f"{d}/scaling_max_freq") == "2400000"


def test_cpufreq_without_userspace_uses_max_freq_and_grid(tmp_path):
    node = FakeNode(tmp_path, userspace_governor=False, available_frequencies=False,
                    frequencies_khz=(800000, 2000000))
    d = node.cpufreq_dir(0)
    with linux(node) as p:
        freqs = p.frequencies(0)
        assert freqs[0] == 0.8e9 and freqs[-1] == 2.0e9 and len(freqs) == 13
        assert p.write("cpu.frequency", 0, 1.25e9) == 1.3e9
        assert node.read(f"{d}/scaling_max_freq") == "1300000"
        assert node.read(f"{d}/scaling_governor") == "performance"
        p.restore_all()
        assert node.read(f"{d}/scaling_max_freq") == "2000000"


def test_no_cpufreq(tmp_path):
    node = FakeNode(tmp_path, cpufreq=False)
    with linux(node) as p:
        assert p.frequencies(0) == []
        assert "cpu.frequency" not in [c.name for c in p.controls()]


# -------------------------------------------------------------------- hwmon

def test_coretemp_package_and_core_temperatures(tmp_path):
    node = FakeNode(tmp_path, packages=2, cores=2, threads=2)
    node.set_temperature(1, 61.5)
    node.set_temperature(1, 70.0, core=1)
    with linux(node) as p:
        assert p.read("package.temperature", 1) == 61.5
        first_cpu = node.cpu_id(1, 1, 0)
        assert p.read("core.temperature", first_cpu) == 70.0
        info = {s.name: s for s in p.signals()}["core.temperature"]
        assert info.indices == (0, 1, 4, 5)                 # first thread of each core
        assert p.sample().packages[1]["temperature_c"] == 61.5


def test_k10temp(tmp_path):
    node = FakeNode(tmp_path, packages=2, vendor="amd", hwmon="k10temp")
    node.write("sys/class/hwmon/hwmon1/temp2_label", "Tdie")
    node.write("sys/class/hwmon/hwmon1/temp2_input", 55000)
    with linux(node) as p:
        assert p.describe()["paths"]["powercap"].endswith("powercap")
        assert p.read("package.temperature", 0) == 50.0
        assert p.read("package.temperature", 1) == 55.0        # Tdie preferred over Tctl
        assert "core.temperature" not in [s.name for s in p.signals()]


def test_no_hwmon_means_no_temperature(tmp_path):
    node = FakeNode(tmp_path, hwmon=None)
    with linux(node) as p:
        assert p.sample().packages[0]["temperature_c"] is None
        assert any("hwmon" in r for r in p.describe()["reasons"])
