"""Hand-over: a queued run promised the slice of a container that ends with
its task (nrm/containers/model.py, Promise). Real daemon, real cgroups, real
spawners: the properties users rely on are that a slice is never held by
two containers at once, that nothing a predecessor left behind shares the
cpus with its heir, and that a waiter who gives up is never run."""

import json
import os
import shutil
import subprocess

import pytest

from tests.conftest import EXAMPLES, needs_root
from tests.nrmd import DaemonProcess, wait_for, wait_subscribed

BASIC = os.path.join(EXAMPLES, "basic.yml")

pytestmark = needs_root()


@pytest.fixture(scope="module")
def nrmd():
    d = DaemonProcess("--hw", "emulated", "--spawners", "2").start()
    yield d
    assert d.stop() == 0, d.log()
    shutil.rmtree(d.rundir, ignore_errors=True)


def status(d):
    return json.loads(d.cli("status", "--json").stdout)


def gated(gate, before: str = ""):
    """A task that runs until ``gate`` exists: gates, not durations, end the
    predecessors, so that a slow client start cannot free a slot before the
    waiters queue."""
    return ["sh", "-c", f"{before}while [ ! -e {gate} ]; do sleep 0.02; done"]


def fill(d, *argv):
    """One detached, unnamed 1-cpu container per cpu, running argv."""
    ncpus = status(d)["resources"]["cpus"]
    for _ in range(ncpus):
        r = d.cli("run", "-d", BASIC, *argv)
        assert r.returncode == 0, r.stderr
    return ncpus


def test_a_queued_run_takes_over_a_slice_and_no_cpu_is_held_twice(nrmd, tmp_path):
    listener = nrmd.popen_cli("listen", "--json", "--topic", "container",
                              stdout=subprocess.PIPE)
    wait_subscribed(nrmd, "container")
    before = status(nrmd)["tasks"]["handovers"]
    gate = tmp_path / "gate"
    ncpus = fill(nrmd, *gated(gate))
    waiters = [nrmd.popen_cli("run", "--wait", BASIC, "sh", "-c",
                              "grep Cpus_allowed_list /proc/self/status",
                              stdout=subprocess.PIPE) for _ in range(ncpus + 1)]
    wait_for(lambda: status(nrmd)["waiting"] == ncpus + 1)
    gate.touch()
    outs = [w.communicate(timeout=30)[0] for w in waiters]
    assert [w.returncode for w in waiters] == [0] * len(waiters)
    assert all(o.startswith(b"Cpus_allowed_list:") for o in outs)
    assert status(nrmd)["tasks"]["handovers"] > before
    wait_for(lambda: not json.loads(nrmd.cli("list", "--json").stdout))
    listener.terminate()
    events = [json.loads(line) for line in listener.communicate(timeout=10)[0].splitlines()]
    holder = {}
    starts = 0
    for ev in events:
        if ev["event"] == "start":
            starts += 1
            for cpu in ev["cpus"]:
                assert cpu not in holder, f"cpu {cpu} held by {holder[cpu]} and {ev['id']}"
                holder[cpu] = ev["id"]
        elif ev["event"] == "exit":
            holder = {c: i for c, i in holder.items() if i != ev["id"]}
    assert starts == 2 * ncpus + 1


def test_what_a_predecessor_left_is_killed_before_its_heir_starts(nrmd, tmp_path):
    before = status(nrmd)["tasks"]
    ncpus = status(nrmd)["resources"]["cpus"]
    left = tmp_path / "left"
    gates = [tmp_path / f"gate{i}" for i in range(ncpus)]
    for i in range(ncpus):      # each leaves a sleep behind, and says where
        r = nrmd.cli("run", "-d", BASIC, *gated(
            gates[i], "sleep 300 & echo $! $(grep Cpus_allowed_list /proc/self/status "
            f"| cut -f2) > {left}{i}; "))
        assert r.returncode == 0, r.stderr
    wait_for(lambda: all(os.path.getsize(f"{left}{i}") if os.path.exists(f"{left}{i}")
                         else 0 for i in range(ncpus)))
    # the heir: is the leftover of the container whose cpus it took still alive?
    probe = ("import glob, os, sys\n"
             "mine = [ln.split()[1] for ln in open('/proc/self/status') "
             "if ln.startswith('Cpus_allowed_list')][0]\n"
             f"for path in glob.glob('{left}*'):\n"
             "    pid, cpus = open(path).read().split()\n"
             "    try:\n"
             "        state = open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()[0]\n"
             "    except OSError:\n"
             "        state = 'gone'\n"
             "    if cpus == mine:\n"
             "        sys.exit(state not in ('gone', 'Z'))\n"
             "sys.exit(2)\n")
    heir = nrmd.popen_cli("run", "--wait", BASIC, "python3", "-c", probe,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(lambda: status(nrmd)["waiting"] == 1)
    # the heir is promised the slice whose task started first; only that one
    # ends, so the hand-over (and not an ordinary launch) must handle the leftover
    gates[0].touch()
    try:
        out, err = heir.communicate(timeout=30)
    finally:
        for g in gates:
            g.touch()
    assert heir.returncode == 0, ("the leftover of the slice's last container was alive"
                                  if heir.returncode == 1 else (out, err))
    # the spawner found the leftover ("occupied"), or nrmd ended the
    # predecessor (killing it) before the spawner looked: a race either side wins
    after = status(nrmd)["tasks"]
    assert (after["handovers_occupied"] + after["handovers"]
            > before["handovers_occupied"] + before["handovers"])
    wait_for(lambda: not json.loads(nrmd.cli("list", "--json").stdout))


def test_a_promised_waiter_that_gives_up_is_never_run(nrmd, tmp_path):
    before = status(nrmd)["tasks"]["handovers_cancelled"]
    gate = tmp_path / "gate"
    fill(nrmd, *gated(gate))
    marker = tmp_path / "ran"
    waiter = nrmd.popen_cli("run", "--wait", BASIC, "touch", str(marker))
    wait_for(lambda: status(nrmd)["waiting"] == 1)
    waiter.kill()
    waiter.wait()
    wait_for(lambda: status(nrmd)["tasks"]["handovers_cancelled"] > before)
    gate.touch()
    wait_for(lambda: not json.loads(nrmd.cli("list", "--json").stdout), timeout=10)
    assert status(nrmd)["waiting"] == 0
    assert not marker.exists()
    assert nrmd.cli("run", BASIC, "true").returncode == 0     # the slices are free


def test_a_promise_passed_over_twice_is_taken_back_and_kept_elsewhere(nrmd, tmp_path):
    """The oldest waiter is promised the slice whose task started first: a
    long one here. Younger waiters pass it through the short slot; after
    two passes its promise moves, and it runs while the long task still
    runs."""
    long_gate, short_gate = tmp_path / "long", tmp_path / "short"
    before = status(nrmd)["tasks"]["handovers_cancelled"]
    ncpus = status(nrmd)["resources"]["cpus"]
    for _ in range(ncpus - 1):
        assert nrmd.cli("run", "-d", BASIC, *gated(long_gate)).returncode == 0
    assert nrmd.cli("run", "-d", BASIC, *gated(short_gate)).returncode == 0
    first = nrmd.popen_cli("run", "--wait", BASIC, "true")
    wait_for(lambda: status(nrmd)["waiting"] == 1)
    others = []
    for i in range(ncpus + 4):
        others.append(nrmd.popen_cli("run", "--wait", BASIC, "sleep", "0.3"))
        wait_for(lambda: status(nrmd)["waiting"] == i + 2)     # in order: each is younger
    short_gate.touch()
    try:
        assert first.wait(timeout=30) == 0
        long_running = [c for c in json.loads(nrmd.cli("list", "--json").stdout)
                        if any(t["argv"] == gated(long_gate) for t in c["tasks"])]
        assert long_running, "the first waiter waited for a long task to end"
        assert status(nrmd)["tasks"]["handovers_cancelled"] > before
    finally:
        long_gate.touch()
    for p in others:
        p.wait(timeout=60)
    wait_for(lambda: not json.loads(nrmd.cli("list", "--json").stdout), timeout=30)
