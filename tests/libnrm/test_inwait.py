"""In-wait throttling in the PMPI interposer, under real MPICH and Open MPI.

2 ranks of tests/libnrm/inwait_probe: rank 0 computes 5 ms per iteration
while rank 1 waits in a barrier (one call site). Before each barrier rank 0
reads rank 1's cpu register from the fake msr tree, so the test sees what
the waiting rank's core held *during* its wait, and the file afterwards.
"""

import os
import struct
import subprocess

import pytest

from nrm.hpc import mpi
from nrm.hw.waitcounters import parse
from tests.nrmd import REPO

LIBNRM = os.path.join(REPO, "libnrm")
PROBE = os.path.join(REPO, "tests", "libnrm", "inwait_probe.c")
ORIGINAL = 0x1234500        # bits outside 4:0 set: they must survive
THROTTLED = ORIGINAL | 0x11  # enable + level 1
PERF_ORIGINAL = 0x100001A05  # IA32_PERF_CTL: ratio 0x1A, bits outside 15:8 set
PERF_SLOWED = 0x100000805    # ratio 8 (NRM_INWAIT_PERF_CTL=0x0800)

FLAVORS = [pytest.param(name, marks=pytest.mark.skipif(
    mpi.find(name) is None, reason=f"{name} not installed")) for name in ("mpich", "openmpi")]
pytestmark = pytest.mark.mpi


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """flavor -> (probe executable, interposer)."""
    out = {}
    for name in ("mpich", "openmpi"):
        m = mpi.find(name)
        if m is None:
            continue
        subprocess.run(["make", "-s", "-C", LIBNRM, "all", f"MPICC={m.mpicc}"], check=True,
                       stdout=subprocess.DEVNULL)
        exe = tmp_path_factory.mktemp(name) / "inwait_probe"
        subprocess.run([m.mpicc, "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(exe), PROBE],
                       check=True)
        out[name] = (str(exe), os.path.join(LIBNRM, "build", m.pmpi))
    return out


def fake_msr(root, value=ORIGINAL, perf=PERF_ORIGINAL):
    """One regular file per cpu, a register's slot at 8 x register (tests/fakehw.py's layout)."""
    for cpu in range(os.cpu_count()):
        os.makedirs(root / str(cpu), exist_ok=True)
        with open(root / str(cpu) / "msr_safe", "wb") as f:
            f.truncate(0x2000 * 8)
            f.seek(8 * 0x19A)
            f.write(struct.pack("<Q", value))
            f.seek(8 * 0x199)
            f.write(struct.pack("<Q", perf))
    return str(root)


def msr(root, cpu, reg=0x19A):
    with open(os.path.join(root, str(cpu), "msr_safe"), "rb") as f:
        f.seek(8 * reg)
        return struct.unpack("<Q", f.read(8))[0]


def run(flavor, build, env, *args, bind="core", mca=()):
    exe, lib = build[flavor]
    m = mpi.find(flavor)
    full = {k: v for k, v in os.environ.items()
            if not k.startswith(("NRM_", "LD_PRELOAD"))}
    full.update(m.env())
    full.update(env, LD_PRELOAD=lib)
    argv = m.launcher() + ["-n", "2"]
    if flavor == "openmpi":
        argv += [a for k in env for a in ("-x", k)] + ["-x", "LD_PRELOAD", "--bind-to", bind]
        argv += [a for k, v in mca for a in ("--mca", k, v)]
    else:
        argv += ["-bind-to", bind]
    r = subprocess.run(argv + [exe, *args], env=full, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout, r.stderr


def seen(stdout, field="value"):
    return [int(line.split(f"{field}=")[1].split()[0], 16) for line in stdout.splitlines()
            if line.startswith("seen")]


@pytest.mark.parametrize("flavor", FLAVORS)
def test_waiting_rank_core_throttled_and_restored(flavor, build, tmp_path):
    root = fake_msr(tmp_path / "cpu")
    out, err = run(flavor, build, {"NRM_INWAIT_DELAY": "500us", "NRM_INWAIT_MSR_DIR": root},
                   "-n", "8", "-u", "5000", "-m", root)
    assert "in-wait throttling off" not in err, err
    values = seen(out)
    assert len(values) == 8, out
    # The first long wait at the call site only teaches the prediction.
    assert values[0] == ORIGINAL, values
    # Later ones are throttled 0.5 ms in, while rank 0 still computes; on
    # this shared machine a wait can start late, so not every iteration.
    assert values.count(THROTTLED) >= 3, values
    assert set(values) <= {ORIGINAL, THROTTLED}, [hex(v) for v in values]
    # every exit put the original back, on every cpu
    assert [msr(root, c) for c in range(os.cpu_count())] == [ORIGINAL] * os.cpu_count()


@pytest.mark.parametrize("flavor", FLAVORS)
def test_the_frequency_form_slows_the_waiting_core_and_leaves_its_duty_cycle(
        flavor, build, tmp_path):
    """DVFS's setting: level 16 (duty cycle unchanged) and a ratio. The
    waiting rank's IA32_PERF_CTL holds ratio 8 inside its waits, bits
    outside 15:8 kept, and its original after; 0x19A is never changed."""
    root = fake_msr(tmp_path / "cpu")
    out, err = run(flavor, build, {"NRM_INWAIT_DELAY": "500us", "NRM_INWAIT_MSR_DIR": root,
                                   "NRM_INWAIT_LEVEL": "16", "NRM_INWAIT_PERF_CTL": "0x0800"},
                   "-n", "8", "-u", "5000", "-m", root)
    assert "nrm-pmpi" not in err, err
    perf = seen(out, "perf")
    assert len(perf) == 8 and perf[0] == PERF_ORIGINAL, out
    assert perf.count(PERF_SLOWED) >= 3, [hex(v) for v in perf]
    assert set(perf) <= {PERF_ORIGINAL, PERF_SLOWED}, [hex(v) for v in perf]
    assert seen(out) == [ORIGINAL] * 8, out
    n = os.cpu_count()
    assert [msr(root, c, 0x199) for c in range(n)] == [PERF_ORIGINAL] * n
    assert [msr(root, c) for c in range(n)] == [ORIGINAL] * n


def test_the_combined_form_writes_both_registers(build, tmp_path):
    """COMBINED's setting: level 1 and a ratio, both inside the same waits."""
    if "mpich" not in build:
        pytest.skip("MPICH not installed")
    root = fake_msr(tmp_path / "cpu")
    out, err = run("mpich", build, {"NRM_INWAIT_DELAY": "500us", "NRM_INWAIT_MSR_DIR": root,
                                    "NRM_INWAIT_LEVEL": "1", "NRM_INWAIT_PERF_CTL": "0x0800"},
                   "-n", "8", "-u", "5000", "-m", root)
    assert "nrm-pmpi" not in err, err
    both = list(zip(seen(out), seen(out, "perf")))
    assert both.count((THROTTLED, PERF_SLOWED)) >= 3, both
    assert msr(root, 1) == ORIGINAL and msr(root, 1, 0x199) == PERF_ORIGINAL


@pytest.mark.parametrize("flavor", FLAVORS)
def test_ranks_free_to_migrate_do_not_throttle(flavor, build, tmp_path):
    """msr mode throttles the cpu a thread is on: only a thread bound to
    one cpu may, or a migration mid-wait would leave a cpu slow under
    another rank. Unbound, each rank says so once and runs unthrottled."""
    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs two cpus to be unbound")
    root = fake_msr(tmp_path / "cpu")
    out, err = run(flavor, build, {"NRM_INWAIT_DELAY": "500us", "NRM_INWAIT_MSR_DIR": root},
                   "-n", "8", "-u", "5000", "-m", root, bind="none")
    assert seen(out) == [ORIGINAL] * 8, out
    lines = [line for line in err.splitlines() if "nrm-pmpi" in line]
    assert 1 <= len(lines) <= 2 and all("not bound to one cpu" in line for line in lines), err


def test_throttled_waits_under_open_mpis_yielding_progress(build, tmp_path):
    """Open MPI told to yield when idle (sched_yield in its progress loop):
    the timer signal interrupts the wait's system calls, the wait goes on."""
    if "openmpi" not in build:
        pytest.skip("Open MPI not installed")
    root = fake_msr(tmp_path / "cpu")
    out, err = run("openmpi", build, {"NRM_INWAIT_DELAY": "500us", "NRM_INWAIT_MSR_DIR": root},
                   "-n", "8", "-u", "5000", "-m", root, mca=[("mpi_yield_when_idle", "1")])
    assert "in-wait throttling off" not in err, err
    assert seen(out).count(THROTTLED) >= 3, out
    assert [msr(root, c) for c in range(os.cpu_count())] == [ORIGINAL] * os.cpu_count()


def test_short_waits_are_not_armed(build, tmp_path):
    """With a delay longer than any wait the register is never touched."""
    if "mpich" not in build:
        pytest.skip("MPICH not installed")
    root = fake_msr(tmp_path / "cpu")
    out, err = run("mpich", build, {"NRM_INWAIT_DELAY": "1s", "NRM_INWAIT_MSR_DIR": root},
                   "-n", "5", "-u", "2000", "-m", root)
    assert seen(out) == [ORIGINAL] * 5
    assert msr(root, 1) == ORIGINAL


def test_the_level_and_bits_come_from_the_environment(build, tmp_path):
    if "mpich" not in build:
        pytest.skip("MPICH not installed")
    root = fake_msr(tmp_path / "cpu")
    out, _ = run("mpich", build, {"NRM_INWAIT_DELAY": "500us", "NRM_INWAIT_MSR_DIR": root,
                                  "NRM_INWAIT_MSR_BITS": "0x12"},
                 "-n", "8", "-u", "5000", "-m", root)
    assert (ORIGINAL | 0x12) in seen(out), out


@pytest.mark.parametrize("flavor", FLAVORS)
def test_emulated_counters(flavor, build, tmp_path):
    """The emulated node's backend: each process writes its throttled time
    per thread; only the waiting rank has any."""
    counters = tmp_path / "counters"
    counters.mkdir()
    out, err = run(flavor, build, {"NRM_INWAIT_DELAY": "500us",
                                   "NRM_INWAIT_COUNTERS": str(counters),
                                   "NRM_INWAIT_LEVEL": "2"},
                   "-n", "20", "-u", "5000")
    assert "in-wait throttling off" not in err, err
    files = {int(name): parse((counters / name).read_bytes()) for name in os.listdir(counters)}
    assert len(files) == 2, files                      # one per rank, named by pid
    throttled = [(pid, tid, c) for pid, slots in files.items() for tid, c in slots.items()]
    # Rank 1's main thread waits at every barrier; rank 0 may have waited
    # once or twice too, when other tenants delayed rank 1.
    pid, tid, c = max(throttled, key=lambda x: x[2].waits)
    assert tid == pid and c.level == 2
    assert 10 <= c.waits <= 20, files
    assert sum(x[2].waits for x in throttled) - c.waits < c.waits, files
    assert 0 < c.cpu_ns <= c.wall_ns


@pytest.mark.parametrize("env,message", [
    ({"NRM_INWAIT_DELAY": "soon"}, "invalid NRM_INWAIT_DELAY"),
    ({"NRM_INWAIT_DELAY": "1ms", "NRM_INWAIT_LEVEL": "17"}, "NRM_INWAIT_LEVEL must be 1..16"),
    ({"NRM_INWAIT_DELAY": "1ms", "NRM_INWAIT_COUNTERS": "/tmp", "NRM_INWAIT_PERF_CTL": "0x0801"},
     "NRM_INWAIT_PERF_CTL must be a ratio in bits 15:8"),
    ({"NRM_INWAIT_DELAY": "1ms", "NRM_INWAIT_MSR_DIR": "/tmp", "NRM_INWAIT_LEVEL": "16"},
     "NRM_INWAIT_LEVEL=16 (duty cycle unchanged) without NRM_INWAIT_PERF_CTL"),
    ({"NRM_INWAIT_DELAY": "1ms"}, "neither NRM_INWAIT_MSR_DIR nor NRM_INWAIT_COUNTERS"),
    ({"NRM_INWAIT_DELAY": "1ms", "NRM_INWAIT_MSR_DIR": "/nonexistent"},
     "no writable msr_safe for this process's cpus under: /nonexistent"),
    ({"NRM_INWAIT_DELAY": "1ms", "NRM_INWAIT_COUNTERS": "/tmp", "NRM_INWAIT_SIGNAL": "9"},
     "NRM_INWAIT_SIGNAL must be a realtime signal number"),
    ({"NRM_INWAIT_DELAY": "1ms", "NRM_INWAIT_MSR_DIR": "/tmp", "NRM_INWAIT_MSR_BITS": "0x21"},
     "NRM_INWAIT_MSR_BITS must set bit 4 and fit 0x1f"),
])
def test_bad_environment_is_one_line_and_the_program_runs(build, tmp_path, env, message):
    if "mpich" not in build:
        pytest.skip("MPICH not installed")
    out, err = run("mpich", build, env, "-n", "3", "-u", "2000")
    assert "done" in out
    lines = [line for line in err.splitlines() if "nrm-pmpi" in line]
    assert lines and all(message in line for line in lines), err
