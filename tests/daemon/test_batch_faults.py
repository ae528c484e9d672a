"""Batches (``run_batch``) when things go wrong, each against an nrmd of its
own: a long run of launches that fail at once, nrmd stopping with tasks
still queued, and a restart that adopts a running batch task."""

import asyncio
import signal

import pytest

from nrm.client import AsyncClient, Client
from tests.conftest import needs_root
from tests.daemon.test_batch import ENV, ONE, _batches, _by_key, _task
from tests.nrmd import DaemonProcess, wait_for


@pytest.fixture
def stopped():
    """Daemons a test started, stopped at its end (cleanly: rc 0)."""
    daemons = []
    yield daemons
    for d in daemons:
        if d.proc.poll() is None:
            assert d.stop() == 0, d.log()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_long_run_of_failing_launches_is_reported_and_leaves_the_slot_usable(stopped):
    """Without spawners a launch fails at once, and each failure hands the
    cpus' next task on: thousands of them must not nest (a RecursionError
    would leave keys pending and the cpus wedged)."""
    d = DaemonProcess("--hw", "emulated", "--spawners", "0").start()
    stopped.append(d)
    tasks = [_task(f"fail.{i}", ["/no/such/program"], [0]) for i in range(2000)]

    async def run(*batches):
        return await asyncio.wait_for(_batches(d.rundir, *batches), 120)
    exits = _by_key(asyncio.run(run((tasks, False))), tasks)
    assert all(e.pid == 0 and "/no/such/program" in e.error for e in exits.values())
    after = [_task("fail.after", ["true"], [0])]
    assert _by_key(asyncio.run(run((after, False))), after)["fail.after"].status == 0
    with Client(d.rundir) as c:
        states = c.claim([t.key for t in tasks[::97]])["keys"]
        assert {s["state"] for s in states.values()} == {"failed"}
        assert c.list() == []       # no container left behind by a failed launch


def test_tasks_nrmd_stops_before_they_start_are_lost_not_failed(stopped):
    """A held task and a queued one never ran when nrmd stops: their keys
    read ``lost`` (may run again), as a queued run's, not ``failed``."""
    d = DaemonProcess("--hw", "emulated").start()
    stopped.append(d)
    tasks = [_task("stop.run", ["sleep", "60"], [0]),
             _task("stop.held", ["true"], [0]),
             _task("stop.queued", ["true"], [0])]

    async def go():
        async with AsyncClient(d.rundir) as c:
            await c.status()
            c.run_batch(ONE, ENV, tasks, lambda exits: None)
            while (await c.claim(["stop.run"]))["keys"]["stop.run"]["state"] != "running":
                await asyncio.sleep(0.01)
            assert (await c.status())["tasks"]["batch_chained"] == 1     # stop.held
            assert d.stop() == 0, d.log()
    asyncio.run(go())
    d2 = DaemonProcess("--hw", "emulated", rundir=d.rundir).start()
    stopped.append(d2)
    with Client(d2.rundir) as c:
        states = c.claim([t.key for t in tasks])["keys"]
    assert states == {t.key: {"state": "lost"} for t in tasks}, states


@needs_root()
def test_an_adopted_batch_task_is_killed_by_its_name(stopped):
    """After a crash and a restart that adopts it, a batch task's name is
    no container's: ``kill`` finds it through its key."""
    d = DaemonProcess("--hw", "emulated", "--runtime", "cgroup").start()
    stopped.append(d)

    async def go():
        async with AsyncClient(d.rundir) as c:
            await c.status()
            c.run_batch(ONE, ENV, [_task("adopt.a", ["sleep", "600"], [0])], lambda exits: None)
            while True:
                state = (await c.claim(["adopt.a"]))["keys"]["adopt.a"]
                if state["state"] == "running":
                    return state["pid"]
                await asyncio.sleep(0.01)
    pid = asyncio.run(go())
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()
    d2 = DaemonProcess("--hw", "emulated", "--runtime", "cgroup", "--on-restart", "adopt",
                       rundir=d.rundir).start()
    stopped.append(d2)
    assert _alive(pid)
    with Client(d2.rundir) as c:
        assert c.claim(["adopt.a"])["keys"]["adopt.a"]["state"] == "running"
        assert c.kill("adopt-a")["tasks"] == 1
    wait_for(lambda: not _alive(pid))
