"""In-wait throttling's hardware side: the counter files the emulated node
bills, the linux backend's msr-safe target, and ``Platform.claim`` (the
originals the daemon restores after the ranks wrote clock modulation)."""

from __future__ import annotations

import os
import struct

import pytest

from nrm.hw import open_platform
from nrm.hw.emulated import cpu_speed, dynamic_power, inwait_rate
from nrm.hw.linux.msr import (IA32_CLOCK_MODULATION, IA32_PERF_CTL, IA32_PM_ENABLE,
                              writable_by)
from nrm.hw.registry import HardwareError
from nrm.hw.waitcounters import (CHECK, HEADER, MAGIC, SLOT, Counters, ThreadLedger,
                                 discount_ns, parse, read)
from tests.fakehw import FakeNode


def slot(tid, level, cpu_ns, wall_ns, waits, check=None):
    if check is None:
        check = tid ^ level ^ cpu_ns ^ wall_ns ^ waits ^ CHECK
    return struct.pack("<6Q", tid, level, cpu_ns, wall_ns, waits, check)


def counter_file(*slots):
    return MAGIC + struct.pack("<Q", SLOT) + b"".join(slots)


# ---------------------------------------------------------------- the file

def test_parse_keeps_sealed_slots_only():
    data = counter_file(slot(10, 1, 500, 900, 3),
                        slot(11, 1, 7, 8, 1, check=12345),      # torn: dropped
                        bytes(SLOT),                            # never used
                        slot(12, 17, 1, 1, 1),                  # not a level: dropped
                        slot(13, 16, 4, 5, 6))
    assert parse(data) == {10: Counters(1, 500, 900, 3), 13: Counters(16, 4, 5, 6)}


@pytest.mark.parametrize("data", [b"", b"NRMIW001", b"NOTMAGIC" + struct.pack("<Q", SLOT),
                                  MAGIC + struct.pack("<Q", 64) + slot(1, 1, 1, 1, 1)])
def test_parse_refuses_foreign_files(data):
    assert parse(data) == {}


def test_read_follows_no_link_and_opens_no_fifo(tmp_path):
    good = tmp_path / "1"
    good.write_bytes(counter_file(slot(1, 1, 2, 3, 4)))
    assert read(str(good)) == {1: Counters(1, 2, 3, 4)}
    os.symlink(good, tmp_path / "2")
    assert read(str(tmp_path / "2")) == {}
    os.mkfifo(tmp_path / "3")
    assert read(str(tmp_path / "3")) == {}          # returns, does not block
    assert read(str(tmp_path / "missing")) == {}
    assert HEADER == 16


# ------------------------------------------------------------- the billing

@pytest.mark.parametrize("cpu,wall,level,expected", [
    (16_000, 16_000, 1, 15_000),     # polled all along: billed 1/16
    (16_000, 16_000, 8, 8_000),
    (1_000, 16_000, 1, 0),           # mostly blocked: billed what it ran
    (16_000, 32_000, 1, 14_000),     # preempted half the time: 1/16 of the wall billed
    (0, 5_000, 1, 0),
    (16_000, 16_000, 16, 0),         # level 16 is full speed
])
def test_discount(cpu, wall, level, expected):
    assert discount_ns(cpu, wall, level) == expected


def test_ledger_baseline_cap_and_one_period_carry():
    led = ThreadLedger()
    # first sight: baseline only, as for the thread's run time
    assert led.discount(7, Counters(1, 10_000, 10_000, 1), 50_000, 1) == 0
    # 16 ms polled in a wait: 15 ms not billed
    assert led.discount(7, Counters(1, 26_000, 26_000, 2), 50_000, 1) == 15_000
    # a claim larger than what the thread ran is capped by it ...
    assert led.discount(7, Counters(1, 126_000, 126_000, 3), 40_000, 1) == 40_000
    # ... the rest carried into the next period only
    assert led.discount(7, Counters(1, 126_000, 126_000, 3), 30_000, 1) == 30_000
    assert led.discount(7, Counters(1, 126_000, 126_000, 3), 90_000, 1) == 0
    # counters that went back (a new writer) count from there
    assert led.discount(7, Counters(1, 5, 5, 1), 10_000, 1) == 0
    # a thread with no slot has nothing to discount
    assert led.discount(8, None, 10_000, 1) == 0
    led.forget({8})
    assert 7 not in led.last and 7 not in led.carry


def test_ledger_prices_at_the_containers_level_not_the_slots():
    """A rank that writes level 1 in its slot while its container throttles
    at level 8 is billed at level 8: half of a polled wait, not 1/16."""
    led = ThreadLedger()
    led.discount(7, Counters(1, 0, 0, 0), 0, 8)
    assert led.discount(7, Counters(1, 16_000, 16_000, 1), 50_000, 8) == 8_000


@pytest.mark.parametrize("level,hz,cpu_hz", [
    (16, 1.0e9, 2.4e9),      # DVFS's wait: full duty cycle at the lowest frequency
    (1, 1.0e9, 2.4e9),       # COMBINED's: level 1 there
    (16, 1.0e9, 1.6e9),      # the cpu already billed at a lower frequency
    (16, 2.0e9, 1.4e9),      # a wait frequency above the cpu's does not raise it
])
def test_a_frequency_settings_discount_is_the_models_power_ratio(level, hz, cpu_hz):
    """The throttled part of a polled wait is billed what the emulated
    node's power model says the in-wait setting draws, relative to the
    cpu's own busy price: ``speed x V(f_wait)^2 / V(f_cpu)^2``."""
    fmax = 2.4e9
    f = min(hz, cpu_hz)
    rate = inwait_rate(level, 16, hz, fmax, cpu_hz)
    waiting = dynamic_power(10.0, [(cpu_speed(level, 16, f, fmax), f / fmax)])
    busy = dynamic_power(10.0, [(1.0, cpu_hz / fmax)])
    assert rate == pytest.approx(waiting / busy)
    assert 0 < rate < 1
    cpu = wall = 1_000_000
    assert discount_ns(cpu, wall, level, rate=rate) == pytest.approx(cpu * (1 - rate), abs=1)
    led = ThreadLedger()
    led.discount(7, Counters(1, 0, 0, 0), 0, level, rate=rate)
    assert led.discount(7, Counters(1, cpu, wall, 1), 2 * cpu, level, rate=rate) \
        == discount_ns(cpu, wall, level, rate=rate)


def test_dvfs_wait_is_billed_between_full_power_and_level_1():
    """At 1.0 of 2.4 GHz with the voltage floor at 0.5, a polled wait draws
    1.0/2.4 x 0.5^2 = 10.4 % of a busy core: less than full, more than
    level 1's 1/16 (6.25 %)."""
    rate = inwait_rate(16, 16, 1.0e9, 2.4e9, 2.4e9)
    assert rate == pytest.approx(1.0 / 2.4 * 0.25)
    assert discount_ns(16_000, 16_000, 16) == 0 < discount_ns(16_000, 16_000, 16, rate=rate) \
        < discount_ns(16_000, 16_000, 1)


# ---------------------------------------------------- the hardware target

def test_linux_target_needs_msr_safe(tmp_path):
    node = FakeNode(tmp_path / "a", cores=2, msr=True)      # the raw device only
    with open_platform("linux", root=node.root) as p:
        assert p.wait_throttle_target() is None
    node = FakeNode(tmp_path / "b", cores=2, msr_safe=True)
    with open_platform("linux", root=node.root) as p:
        t = p.wait_throttle_target()
        assert t["kind"] == "msr" and t["cpus"] == [0, 1]
        assert t["dir"] == os.path.join(node.root, "dev/cpu")
        assert t["bits"][1] == 0x11 and t["bits"][15] == 0x1F


def test_linux_target_without_extended_modulation_rounds_up_to_even(tmp_path):
    node = FakeNode(tmp_path, cores=2, msr_safe=True, ecmd=False)
    with open_platform("linux", root=node.root) as p:
        bits = p.wait_throttle_target()["bits"]
        assert bits[1] == 0x12 and bits[2] == 0x12 and bits[3] == 0x14
        assert 15 not in bits                               # rounds up to 16: no throttle


@pytest.mark.parametrize("allowlist,offered", [
    ("# MSR # Write Mask # Comment\n0x0000019A 0x000000000000001F\n", True),
    ("0x0000019A 0x0000000000000010\n", False),
    ("0x00000610 0x0000000000FFFFFF\n", False),
])
def test_linux_target_honours_a_readable_allowlist(tmp_path, allowlist, offered):
    node = FakeNode(tmp_path, cores=2, msr_safe=True)
    with open(os.path.join(node.root, "dev/cpu/msr_allowlist"), "w") as f:
        f.write(allowlist)
    with open_platform("linux", root=node.root) as p:
        assert (p.wait_throttle_target() is not None) == offered


# ------------------------------------------- the frequency form (0x199)

def test_linux_target_offers_the_lowest_ratio(tmp_path):
    """The ratio of cpuinfo_min_freq in 100 MHz units (1.2 GHz: 12), the
    highest of cpuinfo_max_freq (2.4 GHz: 24)."""
    node = FakeNode(tmp_path, cores=2, msr_safe=True)
    with open_platform("linux", root=node.root) as p:
        t = p.wait_throttle_target()
        assert t["perf_ctl"] == {"lowest": {0: 12, 1: 12}, "highest": 24, "bus_hz": 100e6}
        assert "cpu.perf_ctl" in [c.name for c in p.controls()]


def test_linux_target_rounds_the_lowest_ratio_up(tmp_path):
    node = FakeNode(tmp_path, cores=2, msr_safe=True,
                    frequencies_khz=(799_000, 1_800_000, 2_301_000))
    with open_platform("linux", root=node.root) as p:
        assert p.wait_throttle_target()["perf_ctl"]["lowest"] == {0: 8, 1: 8}
        assert p.wait_throttle_target()["perf_ctl"]["highest"] == 23   # base + 1 MHz: base


def test_hwp_on_withdraws_the_frequency_form_only(tmp_path):
    """With hardware P-states on the core ignores IA32_PERF_CTL: no
    frequency form (a reason says why), the duty cycle is still offered."""
    node = FakeNode(tmp_path, cores=2, msr_safe=True)
    for c in range(2):
        node.set_msr(c, IA32_PM_ENABLE, 1)
    with open_platform("linux", root=node.root) as p:
        t = p.wait_throttle_target()
        assert t["perf_ctl"] is None and "HWP" in t["perf_ctl_why"]
        assert t["bits"][1] == 0x11
        assert "cpu.perf_ctl" not in [c.name for c in p.controls()]
        assert any("HWP" in r for r in p.describe()["reasons"])


def test_no_frequency_form_off_intel_or_without_cpufreq(tmp_path):
    node = FakeNode(tmp_path / "amd", cores=2, msr_safe=True, vendor="amd")
    with open_platform("linux", root=node.root) as p:
        t = p.wait_throttle_target()
        assert t["perf_ctl"] is None and "GenuineIntel" in t["perf_ctl_why"]
    node = FakeNode(tmp_path / "nofreq", cores=2, msr_safe=True, cpufreq=False)
    with open_platform("linux", root=node.root) as p:
        assert p.wait_throttle_target()["perf_ctl"] is None


@pytest.mark.parametrize("allowlist,bits,perf", [
    ("0x0000019A 0x000000000000001F\n", True, False),
    ("0x0000019A 0x000000000000001F\n0x00000199 0x000000000000FF00\n", True, True),
    ("0x00000199 0x0000000000000F00\n0x0000019A 0x1F\n", True, False),
    ("0x00000199 0x000000000000FF00\n", False, True),       # the frequency form alone
])
def test_the_allowlist_decides_each_form(tmp_path, allowlist, bits, perf):
    node = FakeNode(tmp_path, cores=2, msr_safe=True)
    with open(os.path.join(node.root, "dev/cpu/msr_allowlist"), "w") as f:
        f.write(allowlist)
    with open_platform("linux", root=node.root) as p:
        t = p.wait_throttle_target()
        assert bool(t["bits"]) == bits
        assert (t["perf_ctl"] is not None) == perf
        if not perf:
            assert "0x199" in t["perf_ctl_why"]


def test_perf_ctl_claim_restores_the_ratio_only_and_survives_a_crash(tmp_path):
    node = FakeNode(tmp_path / "hw", cores=2, msr_safe=True)
    node.set_msr(0, IA32_PERF_CTL, 0x100001805)               # ratio 24, other bits set
    node.set_msr(1, IA32_PERF_CTL, 0x1800)
    journal = str(tmp_path / "controls.journal")
    p = open_platform("linux", root=node.root, journal_path=journal)
    p.claim("cpu.perf_ctl", [0, 1])
    assert p.saved() == {"cpu.perf_ctl": {0: 0x100001805, 1: 0x1800}}
    node.set_msr(0, IA32_PERF_CTL, 0x100000C05)               # a rank died slowed
    p.restore("cpu.perf_ctl", [0], keep=True)                  # its task's end
    assert node.get_msr(0, IA32_PERF_CTL) == 0x100001805
    node.set_msr(0, IA32_PERF_CTL, 0x100000C05)
    node.set_msr(1, IA32_PERF_CTL, 0xC00)
    del p                                                      # no close: a crash
    with open_platform("linux", root=node.root, journal_path=journal) as p:
        assert node.get_msr(0, IA32_PERF_CTL) == 0x100001805   # recovered
        assert node.get_msr(1, IA32_PERF_CTL) == 0x1800
        assert p.read("cpu.perf_ctl", 1) == 24
    assert not os.path.exists(journal)


def test_perf_ctl_put_back_leaves_a_ratio_the_driver_set_since(tmp_path):
    """Above the in-wait ratio (12 here) the value is the cpufreq driver's
    newer choice, which it would not write again: it stays. At or below
    it, a rank may have left it: the claimed original goes back."""
    node = FakeNode(tmp_path / "hw", cores=2, msr_safe=True)
    node.set_msr(0, IA32_PERF_CTL, 0x1000)                    # ratio 16 when claimed
    node.set_msr(1, IA32_PERF_CTL, 0x1000)
    with open_platform("linux", root=node.root) as p:
        p.claim("cpu.perf_ctl", [0, 1])
        node.set_msr(0, IA32_PERF_CTL, 0x1400)                # the driver went to 20
        node.set_msr(1, IA32_PERF_CTL, 0x0C00)                # a rank left 12
        p.release("cpu.perf_ctl", [0, 1])
        assert node.get_msr(0, IA32_PERF_CTL) == 0x1400
        assert node.get_msr(1, IA32_PERF_CTL) == 0x1000


def test_writable_by(tmp_path):
    path = tmp_path / "msr_safe"
    path.write_bytes(b"")
    nobody = 65534
    os.chmod(path, 0o600)
    assert writable_by(str(path), 0)                     # root ignores modes
    assert not writable_by(str(path), nobody)
    os.chmod(path, 0o602)
    assert writable_by(str(path), nobody)                # other
    if os.geteuid() == 0:
        os.chown(path, nobody, -1)
        os.chmod(path, 0o200)
        assert writable_by(str(path), nobody)            # owner
        os.chmod(path, 0o400)
        assert not writable_by(str(path), nobody)
    assert not writable_by(str(tmp_path / "missing"), 0)


def test_claim_saves_journals_and_restore_puts_back(tmp_path):
    node = FakeNode(tmp_path / "hw", cores=2, msr_safe=True)
    node.set_msr(1, IA32_CLOCK_MODULATION, 0x1234500)
    journal = str(tmp_path / "controls.journal")
    with open_platform("linux", root=node.root, journal_path=journal) as p:
        p.claim("cpu.duty_cycle", [1])
        assert p.saved() == {"cpu.duty_cycle": {1: 0x1234500}}
        assert os.path.getsize(journal) > 0                      # before anyone writes
        node.set_msr(1, IA32_CLOCK_MODULATION, 0x1234511)       # a rank throttled and died
        p.claim("cpu.duty_cycle", [1])                          # a second claim keeps the first
        assert p.saved() == {"cpu.duty_cycle": {1: 0x1234500}}
        assert p.claimed("cpu.duty_cycle") == {1: 2}
        p.release("cpu.duty_cycle", [1])                        # one holder left: untouched
        assert node.get_msr(1, IA32_CLOCK_MODULATION) == 0x1234511
        assert p.saved() == {"cpu.duty_cycle": {1: 0x1234500}}
        p.release("cpu.duty_cycle", [1])                        # the last one restores
        assert node.get_msr(1, IA32_CLOCK_MODULATION) == 0x1234500
        assert p.saved() == {} and p.claimed("cpu.duty_cycle") == {}
    assert not os.path.exists(journal)


def test_a_claimed_control_outlives_a_restore_of_it(tmp_path):
    """A policy's restore (or a task's end, ``keep``) puts the original back
    but leaves it saved while a claim holds it."""
    node = FakeNode(tmp_path / "hw", cores=2, msr_safe=True)
    with open_platform("linux", root=node.root) as p:
        p.claim("cpu.duty_cycle", [0])
        p.write("cpu.duty_cycle", 1, 8)
        node.set_msr(0, IA32_CLOCK_MODULATION, 0x11)
        p.restore("cpu.duty_cycle")
        assert node.get_msr(0, IA32_CLOCK_MODULATION) == 0
        assert node.get_msr(1, IA32_CLOCK_MODULATION) == 0
        assert p.saved() == {"cpu.duty_cycle": {0: 0}}
        node.set_msr(0, IA32_CLOCK_MODULATION, 0x11)
        p.restore("cpu.duty_cycle", [0], keep=True)
        assert node.get_msr(0, IA32_CLOCK_MODULATION) == 0
        node.set_msr(0, IA32_CLOCK_MODULATION, 0x11)
        p.release("cpu.duty_cycle", [0])
        assert node.get_msr(0, IA32_CLOCK_MODULATION) == 0 and p.saved() == {}


def test_a_failed_claim_holds_nothing(tmp_path):
    node = FakeNode(tmp_path / "hw", cores=2, msr_safe=True)
    with open_platform("linux", root=node.root) as p:
        with pytest.raises(HardwareError):
            p.claim("cpu.duty_cycle", [0, 7])
        assert p.claimed("cpu.duty_cycle") == {} and p.saved() == {}


def test_a_modulated_register_is_never_claimed_as_the_original(tmp_path):
    """A rank (adopted after a restart, or killed) may hold the register
    throttled when nrmd claims it: the unmodulated value is saved instead."""
    node = FakeNode(tmp_path / "hw", cores=2, msr_safe=True)
    node.set_msr(0, IA32_CLOCK_MODULATION, 0x1234511)
    with open_platform("linux", root=node.root) as p:
        p.claim("cpu.duty_cycle", [0])
        assert p.saved() == {"cpu.duty_cycle": {0: 0x1234500}}
        p.release("cpu.duty_cycle", [0])
        assert node.get_msr(0, IA32_CLOCK_MODULATION) == 0x1234500


def test_after_a_restart_the_journaled_original_is_claimed(tmp_path):
    """``--on-restart adopt``: the adopted ranks throttle again between the
    new nrmd's recovery and its claim; the original is the journaled one."""
    node = FakeNode(tmp_path / "hw", cores=2, msr_safe=True)
    node.set_msr(0, IA32_CLOCK_MODULATION, 0x1234508)         # a site's own modulation
    journal = str(tmp_path / "controls.journal")
    p = open_platform("linux", root=node.root, journal_path=journal)
    p.claim("cpu.duty_cycle", [0])
    node.set_msr(0, IA32_CLOCK_MODULATION, 0x1234511)
    del p                                                      # no close: a crash
    with open_platform("linux", root=node.root, journal_path=journal) as p:
        assert node.get_msr(0, IA32_CLOCK_MODULATION) == 0x1234508    # recovered
        node.set_msr(0, IA32_CLOCK_MODULATION, 0x1234511)  # an adopted rank waits again
        p.claim("cpu.duty_cycle", [0])
        assert p.saved() == {"cpu.duty_cycle": {0: 0x1234508}}
        p.release("cpu.duty_cycle", [0])
        assert node.get_msr(0, IA32_CLOCK_MODULATION) == 0x1234508


def test_a_crashed_daemons_claim_is_restored_at_the_next_start(tmp_path):
    node = FakeNode(tmp_path / "hw", cores=2, msr_safe=True)
    journal = str(tmp_path / "controls.journal")
    p = open_platform("linux", root=node.root, journal_path=journal)
    p.claim("cpu.duty_cycle", [0, 1])
    node.set_msr(0, IA32_CLOCK_MODULATION, 0x11)               # throttled when nrmd died
    del p                                                       # no close: a crash
    with open_platform("linux", root=node.root, journal_path=journal):
        assert node.get_msr(0, IA32_CLOCK_MODULATION) == 0


def test_emulated_target_is_the_counter_files(tmp_path):
    with open_platform("emulated", emulated_options={"cgroup_mount": str(tmp_path)}) as p:
        assert p.wait_throttle_target()["kind"] == "counters"
