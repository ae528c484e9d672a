"""In-wait throttling (COUNTDOWN) through a real nrmd: the ranks throttle
their own cores inside MPI waits, the daemon decides, tells them how, and
restores.

* Emulated node: the ranks count their throttled time in files the
  platform bills at level 1's power. An imbalanced program's waiting rank
  spins for most of the run, so COUNTDOWN bills less power than NONE; a
  balanced program hardly waits, so both bill the same within the model.
* Hardware path (the linux backend on a fake tree with msr_safe files):
  the waiting rank writes level 1 into its cpu's IA32_CLOCK_MODULATION
  (DVFS: the lowest ratio into its IA32_PERF_CTL), and when the container
  is killed while it waits throttled, nrmd puts the original back.

The energy compared is the dynamic package energy per second of the
container's cpu time: it does not depend on how long the loaded machine
made a run take or on how much cpu other tenants left the ranks, only on
the price each cpu second was billed at.
"""

import json
import os
import struct
import subprocess

import pytest

from nrm.hpc import mpi
from tests.conftest import needs_root
from tests.fakehw import FakeNode
from tests.nrmd import REPO, DaemonProcess, wait_for

pytestmark = [pytest.mark.mpi,
              pytest.mark.skipif(mpi.find("mpich") is None, reason="MPICH not installed")]

PROBE = os.path.join(REPO, "tests", "libnrm", "inwait_probe.c")
PMPI = os.path.join(REPO, "libnrm", "build", mpi.MPICH.pmpi)
ORIGINAL = 0x1234500   # bits outside 4:0 set, modulation off
PERF_ORIGINAL = 0x100001805       # IA32_PERF_CTL: ratio 24, bits outside 15:8 set
PERF_SLOWED = 0x100000C05         # ratio 12: the fake node's 1.2 GHz cpuinfo_min_freq


@pytest.fixture(scope="module")
def daemon(probe):
    """The emulated node, preloading this checkout's interposer (built by ``probe``)."""
    d = DaemonProcess("--hw", "emulated", "--sensor-period", "0.1", "--pmpi-lib", PMPI).start()
    yield d
    assert d.stop() == 0, d.log()


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    subprocess.run(["make", "-s", "-C", os.path.join(REPO, "libnrm"), "all"], check=True,
                   stdout=subprocess.DEVNULL)
    exe = tmp_path_factory.mktemp("probe") / "inwait_probe"
    subprocess.run([mpi.MPICH.mpicc, "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(exe),
                    PROBE], check=True)
    return str(exe)


def _profile(daemon, tmp_path, policy, argv):
    manifest = tmp_path / f"{policy.lower()}.yml"
    manifest.write_text(f"name: {policy.lower()}\napp:\n  slice: {{cpus: 2, mems: 1}}\n"
                        f"  power: {{policy: {policy}, profile: true}}\n")
    path = tmp_path / f"{policy.lower()}.json"
    r = daemon.cli("run", "--profile-json", str(path), str(manifest), *argv, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(path.read_text())


def _rate(profile, idle_w=20.0):
    """Dynamic package energy per second of the container's cpu time (J/s)."""
    return (profile["energy"]["energy_j"] - idle_w * profile["energy"]["duration_s"]) \
        / profile["cpu_time_s"]


def _imbalance_argv(imbalance, factor, phases=150):
    return [mpi.MPICH.mpiexec, "-n", "2", "-bind-to", "core", imbalance,
            "-n", str(phases), "-u", "3000000", "-b", str(factor)]


def _discounted(profile):
    """The share of the container's cpu time the model bills at level 1 instead
    of full power: per nrm.hw.waitcounters, throttled cpu time beyond L/16 of
    the throttled wall time."""
    iw = profile["inwait"]
    off = iw["throttled_cpu_s"] - min(iw["throttled_cpu_s"], iw["throttled_wall_s"] / 16)
    return off / profile["cpu_time_s"]


@needs_root()
def test_countdown_bills_the_waiting_rank_at_level_1(daemon, imbalance, tmp_path):
    """Rank 1 does a quarter of rank 0's work: it spins in the barrier for
    about three quarters of the run under NONE, and is billed level 1 there
    under COUNTDOWN."""
    argv = _imbalance_argv(imbalance, -0.75, phases=600)   # seconds, not 0.1 s ticks
    # NONE before and after: the emulated package warms over the runs and
    # its leakage with it, so the run in the middle is compared with both
    none = _profile(daemon, tmp_path, "NONE", argv)
    countdown = _profile(daemon, tmp_path, "COUNTDOWN", argv)
    none_after = _profile(daemon, tmp_path, "NONE", argv)
    assert "inwait" not in none
    iw = countdown["inwait"]
    assert iw["backend"] == "counters" and iw["level"] == 1 and iw["delay_s"] == 0.0005
    assert iw["throttled_waits"] > 200, iw         # 600 barriers, the first teaches
    assert 0 < iw["throttled_cpu_s"] <= iw["throttled_wall_s"] * 1.05, iw
    assert "policy" not in countdown               # NONE's settings: no phase decisions
    # Per second of the container's cpu time (independent of how long the
    # loaded machine made each run): NONE bills every second at full power,
    # COUNTDOWN the waiting rank's throttled part at 1/16.
    assert _discounted(countdown) > 0.1, iw
    assert _rate(countdown) < 0.9 * min(_rate(none), _rate(none_after)), \
        (_rate(none), _rate(countdown), _rate(none_after), iw)


@needs_root()
def test_dvfs_bills_the_waiting_rank_at_the_lowest_frequency(daemon, imbalance, tmp_path):
    """DVFS's compute slowing is bounded by its slowdown budget; its waits
    drop to the lowest frequency (1.0 of 2.4 GHz: 10.4 % of a busy core's
    power in the model), so the waiting rank's spin is billed far below
    NONE's."""
    # the model's figure is ~0.66 of NONE's rate; a 1.8 s run read at the
    # sensor's 0.1 s ticks put single runs anywhere in 0.55-0.92, so the
    # run is longer and NONE is taken on both sides (A-B-A), as below
    argv = _imbalance_argv(imbalance, -0.75, phases=450)
    none = _profile(daemon, tmp_path, "NONE", argv)
    dvfs = _profile(daemon, tmp_path, "DVFS", argv)
    none_after = _profile(daemon, tmp_path, "NONE", argv)
    iw = dvfs["inwait"]
    assert iw["backend"] == "counters" and iw["level"] == 16 and iw["frequency"] == "lowest"
    assert iw["throttled_waits"] > 50, iw
    assert 0 < iw["throttled_cpu_s"] <= iw["throttled_wall_s"] * 1.05, iw
    base = (_rate(none) + _rate(none_after)) / 2
    assert _rate(dvfs) < 0.9 * base, (_rate(none), _rate(dvfs), _rate(none_after), iw)


@needs_root()
def test_countdown_bills_only_the_throttled_waits(daemon, imbalance, tmp_path):
    """Equal work on both ranks: COUNTDOWN's bill differs from NONE's by the
    throttled waits the ranks reported, at the model's price, and by
    nothing else. (On a quiet node a balanced program hardly waits; on this
    shared machine a rank also waits for a peer that other tenants
    preempted, and that wait is rightly throttled.)"""
    # long enough (a few seconds) that the energy read at the sensor's
    # 0.1 s ticks is not a coarse fraction of the run
    argv = _imbalance_argv(imbalance, 0, phases=600)
    none = _profile(daemon, tmp_path, "NONE", argv)
    countdown = _profile(daemon, tmp_path, "COUNTDOWN", argv)
    none_after = _profile(daemon, tmp_path, "NONE", argv)    # the package warms: A-B-A
    base = (_rate(none) + _rate(none_after)) / 2
    expected = base * (1 - _discounted(countdown))
    assert abs(_rate(countdown) - expected) < 0.15 * base, \
        (_rate(none), _rate(countdown), _rate(none_after), expected, countdown["inwait"])


@needs_root()
def test_only_nrmd_tells_a_rank_to_throttle(daemon, tmp_path):
    manifest = tmp_path / "m.yml"
    for policy, expected in (("COUNTDOWN", True), ("NONE", False), ("DVFS", True)):
        manifest.write_text(f"name: env\napp:\n  slice: {{cpus: 1, mems: 1}}\n"
                            f"  power: {{policy: {policy}}}\n")
        r = daemon.cli("run", str(manifest), "env",
                       env={"NRM_INWAIT_MSR_DIR": "/dev/cpu", "NRM_INWAIT_DELAY": "1us"})
        assert r.returncode == 0, r.stderr
        env = dict(line.split("=", 1) for line in r.stdout.decode().splitlines() if "=" in line)
        assert "NRM_INWAIT_MSR_DIR" not in env             # the client's own is dropped
        assert ("NRM_INWAIT_COUNTERS" in env) == expected, (policy, env)
        if expected:
            assert env["NRM_INWAIT_DELAY"] == "500000ns"
            # DVFS keeps the duty cycle (level 16): its frequency is
            # billed by the platform
            assert env["NRM_INWAIT_LEVEL"] == ("1" if policy == "COUNTDOWN" else "16"), env
            assert "NRM_INWAIT_PERF_CTL" not in env, env    # no register on this node
            # the directory goes with the container
            assert not os.path.exists(env["NRM_INWAIT_COUNTERS"])


def _msr(node, cpu, reg=0x19A):
    with open(os.path.join(node.root, "dev/cpu", str(cpu), "msr_safe"), "rb") as f:
        f.seek(8 * reg)
        return struct.unpack("<Q", f.read(8))[0]


def _seen(out):
    """What rank 0 read from the waiting rank's register before each barrier."""
    return [int(line.split("value=")[1].split()[0], 16) for line in out.read_text().splitlines()
            if line.startswith("seen")]


def _set_msr(node, cpu, value, reg=0x19A):
    with open(os.path.join(node.root, "dev/cpu", str(cpu), "msr_safe"), "r+b") as f:
        f.seek(8 * reg)
        f.write(struct.pack("<Q", value))


@needs_root()
def test_killed_in_a_throttled_wait_the_core_is_restored(probe, tmp_path):
    ncpus = os.cpu_count()
    node = FakeNode(tmp_path / "hw", packages=1, cores=ncpus, msr_safe=True)
    for c in range(ncpus):
        _set_msr(node, c, ORIGINAL)
    d = DaemonProcess("--hw", "linux", "--hw-root", node.root, "--sensor-period", "0.2",
                      "--pmpi-lib", PMPI).start()
    try:
        status = json.loads(d.cli("status", "--json").stdout)
        assert status["hardware"]["backend"] == "linux", status["hardware"]
        manifest = tmp_path / "countdown.yml"
        manifest.write_text("name: cd\napp:\n  slice: {cpus: 2, mems: 1}\n"
                            "  power: {policy: COUNTDOWN}\n")
        out = tmp_path / "out.txt"
        with open(out, "w") as f:
            proc = d.popen_cli(
                "run", "-c", "cd", str(manifest), mpi.MPICH.mpiexec, "-n", "2",
                "-bind-to", "core", probe, "-n", "10", "-u", "5000", "-f", "120",
                "-m", os.path.join(node.root, "dev/cpu"), stdout=f, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: "waiter cpu=" in out.read_text(), timeout=60)
            waiter = int(out.read_text().split("waiter cpu=")[1].split()[0])
            # Rank 0 computes 5 ms ten times, then 120 s: rank 1 waits at the
            # same barrier, armed after the first long wait.
            wait_for(lambda: _msr(node, waiter) == (ORIGINAL & ~0x1F) | 0x11, timeout=60)
            wait_for(lambda: len(_seen(out)) == 10, timeout=60)
            # the first long wait only teaches the call site; later ones are throttled
            seen = _seen(out)
            assert seen[0] == ORIGINAL and (ORIGINAL | 0x11) in seen, out.read_text()
            r = d.cli("kill", "cd")
            assert r.returncode == 0, r.stderr
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        # The rank died throttled; nrmd put the original back at the container's end.
        wait_for(lambda: _msr(node, waiter) == ORIGINAL, timeout=30)
        assert all(_msr(node, c) == ORIGINAL for c in range(ncpus))
        status = json.loads(d.cli("status", "--json").stdout)
        assert not status["saved_controls"].get("cpu.duty_cycle"), status["saved_controls"]
    finally:
        assert d.stop() == 0, d.log()


def _stop(d, procs):
    """Kill the clients still running, then stop nrmd (which restores)."""
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert d.stop() == 0, d.log()


def _linux_daemon(tmp_path, hwp=False):
    """A real nrmd on the linux backend over a fake tree whose cpus all
    hold ORIGINAL in IA32_CLOCK_MODULATION and PERF_ORIGINAL in
    IA32_PERF_CTL (``hwp``: hardware P-states on)."""
    ncpus = os.cpu_count()
    node = FakeNode(tmp_path / "hw", packages=1, cores=ncpus, msr_safe=True)
    for c in range(ncpus):
        _set_msr(node, c, ORIGINAL)
        _set_msr(node, c, PERF_ORIGINAL, 0x199)
        if hwp:
            _set_msr(node, c, 1, 0x770)
    d = DaemonProcess("--hw", "linux", "--hw-root", node.root, "--sensor-period", "0.2",
                      "--pmpi-lib", PMPI).start()
    return node, d


def _status(d):
    return json.loads(d.cli("status", "--json").stdout)


def _containers(d):
    return {c["name"]: c for c in json.loads(d.cli("list", "--json").stdout)}


def _tasks(d, name):
    c = _containers(d).get(name)
    return c["tasks"] if c else None


def _pids_of(exe):
    """This test's processes running ``exe`` (its own temporary build)."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.readlink(f"/proc/{pid}/exe") == exe:
                out.append(int(pid))
        except OSError:
            pass
    return out


@needs_root()
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two cpus")
def test_a_task_killed_in_a_throttled_wait_is_restored_while_its_container_lives(
        probe, tmp_path):
    """A named container runs on after one of its tasks died with a rank
    throttled in a wait: nrmd puts that task's core back at once, not at
    the container's end, and keeps the original for the end."""
    node, d = _linux_daemon(tmp_path)
    procs = []
    try:
        manifest = tmp_path / "countdown.yml"
        manifest.write_text("name: reused\napp:\n  slice: {cpus: 2, mems: 1}\n  hwbind: true\n"
                            "  power: {policy: COUNTDOWN}\n")
        # the first task holds one core (hwbind), the container lives on it
        procs.append(d.popen_cli("run", "-c", "reused", str(manifest), "sleep", "600",
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_for(lambda: _tasks(d, "reused"), timeout=30)
        out = tmp_path / "out.txt"
        with open(out, "w") as f:
            procs.append(d.popen_cli(
                "run", "-c", "reused", str(manifest), mpi.MPICH.mpiexec, "-n", "2",
                "-bind-to", "core", probe, "-n", "10", "-u", "5000", "-f", "120",
                "-m", os.path.join(node.root, "dev/cpu"), stdout=f, stderr=subprocess.STDOUT))
        wait_for(lambda: "waiter cpu=" in out.read_text(), timeout=60)
        waiter = int(out.read_text().split("waiter cpu=")[1].split()[0])
        wait_for(lambda: _msr(node, waiter) == (ORIGINAL & ~0x1F) | 0x11, timeout=60)
        for pid in _pids_of(probe):
            os.kill(pid, 9)
        procs[1].wait(timeout=60)
        assert len(_tasks(d, "reused")) == 1                # the container lives on
        wait_for(lambda: _msr(node, waiter) == ORIGINAL, timeout=30)
        # still claimed: the container's end restores again
        assert _status(d)["saved_controls"]["cpu.duty_cycle"], _status(d)
        _set_msr(node, waiter, ORIGINAL | 0x11)
        assert d.cli("kill", "reused").returncode == 0
        wait_for(lambda: _msr(node, waiter) == ORIGINAL, timeout=30)
        assert not _status(d)["saved_controls"].get("cpu.duty_cycle")
    finally:
        _stop(d, procs)


@needs_root()
def test_containers_sharing_cpus_restore_when_the_last_one_ends(tmp_path):
    """Two oversubscribed COUNTDOWN containers claim the same cpus: the
    first one's end leaves the originals saved for the second, whose end
    puts them back (a rank of it died throttled)."""
    node, d = _linux_daemon(tmp_path)
    procs = []
    try:
        for name in ("first", "second"):
            manifest = tmp_path / f"{name}.yml"
            # every cpu of the node: the second slice shares them all
            manifest.write_text(f"name: {name}\napp:\n  slice: {{cpus: {os.cpu_count()}, "
                                "mems: 1}\n  power: {policy: COUNTDOWN}\n")
            procs.append(d.popen_cli("run", "--oversubscribe", "-c", name, str(manifest),
                                     "sleep", "600", stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL))
            wait_for(lambda: _tasks(d, name), timeout=30)
        cpus = {n: c["cpus"] for n, c in _containers(d).items()}
        shared = sorted(set(cpus["first"]) & set(cpus["second"]))
        if not shared:
            pytest.skip(f"the slices did not overlap: {cpus}")
        assert d.cli("kill", "first").returncode == 0
        wait_for(lambda: _tasks(d, "first") is None, timeout=30)
        assert set(shared) <= {int(c) for c in _status(d)["saved_controls"]["cpu.duty_cycle"]}
        for c in shared:
            _set_msr(node, c, ORIGINAL | 0x11)       # the second's rank died throttled
        assert d.cli("kill", "second").returncode == 0
        wait_for(lambda: all(_msr(node, c) == ORIGINAL for c in shared), timeout=30)
        assert not _status(d)["saved_controls"].get("cpu.duty_cycle")
    finally:
        _stop(d, procs)


def _env_of(d, tmp_path, policy):
    """The environment a task of a one-cpu ``policy`` container runs with."""
    manifest = tmp_path / f"{policy}.yml"
    manifest.write_text(f"name: f\napp:\n  slice: {{cpus: 1, mems: 1}}\n"
                        f"  power: {{policy: {policy}}}\n")
    r = d.cli("run", str(manifest), "env")
    assert r.returncode == 0, r.stderr
    return dict(line.split("=", 1) for line in r.stdout.decode().splitlines() if "=" in line)


def test_dvfs_and_combined_ranks_get_the_frequency_form(tmp_path):
    """On msr-safe hardware DVFS's ranks drop IA32_PERF_CTL to the lowest
    ratio (cpuinfo_min_freq 1.2 GHz: 0x0c00) and leave the duty cycle
    (level 16, no bits for 0x19A); COMBINED's do both. nrmd claims only
    what the setting writes, and the container's end gives it back."""
    node, d = _linux_daemon(tmp_path)
    try:
        env = _env_of(d, tmp_path, "DVFS")
        assert env["NRM_INWAIT_LEVEL"] == "16" and env["NRM_INWAIT_PERF_CTL"] == "0x0c00", env
        assert env["NRM_INWAIT_MSR_DIR"] == os.path.join(node.root, "dev/cpu")
        assert "NRM_INWAIT_MSR_BITS" not in env and "NRM_INWAIT_COUNTERS" not in env, env
        env = _env_of(d, tmp_path, "COMBINED")
        assert (env["NRM_INWAIT_LEVEL"], env["NRM_INWAIT_MSR_BITS"],
                env["NRM_INWAIT_PERF_CTL"]) == ("1", "0x11", "0x0c00"), env
        env = _env_of(d, tmp_path, "COUNTDOWN")
        assert "NRM_INWAIT_PERF_CTL" not in env and env["NRM_INWAIT_LEVEL"] == "1", env
        wait_for(lambda: not _status(d)["saved_controls"], timeout=30)
        assert "drops the frequency" not in d.log()
    finally:
        assert d.stop() == 0, d.log()


def test_with_hwp_on_dvfs_does_not_throttle_in_waits(tmp_path):
    """Hardware P-states on: IA32_PERF_CTL is ignored, so DVFS gets no
    in-wait throttling (one warning), while COUNTDOWN still gets its duty
    cycle."""
    node, d = _linux_daemon(tmp_path, hwp=True)
    try:
        env = _env_of(d, tmp_path, "DVFS")
        assert not any(k.startswith("NRM_INWAIT_") for k in env), env
        assert "drops the frequency in waits, and IA32_PERF_CTL is not writable here: " \
            "hardware P-states (HWP) on" in d.log()
        env = _env_of(d, tmp_path, "COUNTDOWN")
        assert env["NRM_INWAIT_MSR_BITS"] == "0x11", env
        assert all(_msr(node, c, 0x199) == PERF_ORIGINAL for c in range(os.cpu_count()))
    finally:
        assert d.stop() == 0, d.log()


@needs_root()
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two cpus")
def test_dvfs_ranks_slow_the_waiting_core_and_nrmd_restores_it(probe, tmp_path):
    """A DVFS container's waiting rank holds its core at the lowest ratio
    in its waits (0x19A untouched); killed there, nrmd puts IA32_PERF_CTL
    back at once while the container lives on, and again at its end."""
    node, d = _linux_daemon(tmp_path)
    procs = []
    try:
        manifest = tmp_path / "dvfs.yml"
        manifest.write_text("name: reused\napp:\n  slice: {cpus: 2, mems: 1}\n  hwbind: true\n"
                            "  power: {policy: DVFS}\n")
        procs.append(d.popen_cli("run", "-c", "reused", str(manifest), "sleep", "600",
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_for(lambda: _tasks(d, "reused"), timeout=30)
        assert set(_status(d)["saved_controls"]) == {"cpu.perf_ctl"}, _status(d)
        out = tmp_path / "out.txt"
        with open(out, "w") as f:
            procs.append(d.popen_cli(
                "run", "-c", "reused", str(manifest), mpi.MPICH.mpiexec, "-n", "2",
                "-bind-to", "core", probe, "-n", "10", "-u", "5000", "-f", "120",
                "-m", os.path.join(node.root, "dev/cpu"), stdout=f, stderr=subprocess.STDOUT))
        wait_for(lambda: "waiter cpu=" in out.read_text(), timeout=60)
        waiter = int(out.read_text().split("waiter cpu=")[1].split()[0])
        wait_for(lambda: _msr(node, waiter, 0x199) == PERF_SLOWED, timeout=60)
        wait_for(lambda: len(_seen(out)) == 10, timeout=60)
        assert set(_seen(out)) == {ORIGINAL}, out.read_text()         # the duty cycle stays
        assert "nrm-pmpi" not in out.read_text(), out.read_text()
        for pid in _pids_of(probe):
            os.kill(pid, 9)
        procs[1].wait(timeout=60)
        assert len(_tasks(d, "reused")) == 1
        wait_for(lambda: _msr(node, waiter, 0x199) == PERF_ORIGINAL, timeout=30)
        assert _status(d)["saved_controls"]["cpu.perf_ctl"], _status(d)
        _set_msr(node, waiter, PERF_SLOWED, 0x199)       # slowed again when the container ends
        assert d.cli("kill", "reused").returncode == 0
        wait_for(lambda: _msr(node, waiter, 0x199) == PERF_ORIGINAL, timeout=30)
        assert not _status(d)["saved_controls"].get("cpu.perf_ctl")
        assert all(_msr(node, c) == ORIGINAL for c in range(os.cpu_count()))
    finally:
        _stop(d, procs)
