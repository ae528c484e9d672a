"""Batched launches (``run_batch``, docs/protocol.md "Batches"): keyed,
detached tasks, one at a time per cpus in arrival order, concurrent across
cpus, their exits coalesced and each reported once. Real nrmd, real
clients, real processes; the emulated path of AsyncClient.run_batch
against the same nrmd."""

import asyncio
import collections
import os
import subprocess
import sys
import textwrap

import pytest

from nrm import protocol
from nrm.client import AsyncClient, Client, NrmError
from nrm.manifest import Manifest, Slice
from tests.nrmd import REPO, wait_for

ONE = Manifest(name="batch", slice=Slice(cpus=1, mems=1))
ENV = {"PATH": "/usr/bin:/bin"}


def _task(key, argv, cpus, **kw):
    return protocol.BatchTask(key=key, container=key.replace(".", "-"), argv=argv, cpus=cpus,
                              **kw)


def _sh(script):
    return ["sh", "-c", script]


def _stamped(path):
    """A task that writes when it started and ended, in ns."""
    return _sh(f"s=$(date +%s%N); sleep 0.05; echo $s $(date +%s%N) > {path}")


async def _batches(rundir, *batches, emulate=False):
    """Run each (tasks, oversubscribe) through one client, in call order;
    returns every list on_exits was called with."""
    async with AsyncClient(rundir) as c:
        if emulate:
            c.features = frozenset()
        lists = []
        futs = [c.run_batch(ONE, ENV, tasks, lists.append, oversubscribe=over)
                for tasks, over in batches]
        await asyncio.gather(*futs)
        return lists


def _by_key(lists, tasks):
    exits = [e for exits in lists for e in exits]
    counts = collections.Counter(e.key for e in exits)
    assert counts == collections.Counter(t.key for t in tasks), counts   # each once
    return {e.key: e for e in exits}


def _check_order_and_concurrency(daemon, tmp_path, prefix, emulate):
    # the first task of each cpu waits for the other's: they must run at once
    meet = [_task(f"{prefix}.m0", _sh(f"touch {tmp_path}/a; while [ ! -e {tmp_path}/b ]; "
                                      "do sleep 0.01; done"), [0]),
            _task(f"{prefix}.m1", _sh(f"touch {tmp_path}/b; while [ ! -e {tmp_path}/a ]; "
                                      "do sleep 0.01; done"), [1])]
    first = meet + [_task(f"{prefix}.{i}", _stamped(tmp_path / str(i)), [i % 2])
                    for i in range(8)]
    second = [_task(f"{prefix}.{i}", _stamped(tmp_path / str(i)), [i % 2])
              for i in range(8, 12)]
    lists = asyncio.run(_batches(daemon.rundir, (first, False), (second, False),
                                 emulate=emulate))
    exits = _by_key(lists, first + second)
    assert all(e.status == 0 and e.error is None and e.pid > 0 for e in exits.values())
    if emulate:
        assert all(len(x) == 1 for x in lists)
    for cpu in (0, 1):
        spans = [tuple(map(int, (tmp_path / str(i)).read_text().split()))
                 for i in range(cpu, 12, 2)]
        for (_, end), (start, _) in zip(spans, spans[1:]):
            assert end <= start, spans      # in order, never overlapping
    return exits


def test_order_per_cpus_concurrency_across_and_each_exit_once(daemon, tmp_path):
    with Client(daemon.rundir) as c:
        assert "batch" in c.status()["features"]
        before = c.status()["tasks"]["batch_chained"]
    exits = _check_order_and_concurrency(daemon, tmp_path, "ord", emulate=False)
    with Client(daemon.rundir) as c:
        states = c.claim(list(exits))["keys"]
        # the next task of a cpu was held by a spawner, started at its predecessor's exit
        assert c.status()["tasks"]["batch_chained"] > before
    assert all(s["state"] == "exited" and s["status"] == 0 for s in states.values())


def test_emulated_run_batch_keeps_the_semantics(daemon, tmp_path):
    exits = _check_order_and_concurrency(daemon, tmp_path, "emu", emulate=True)
    with Client(daemon.rundir) as c:
        states = c.claim(list(exits))["keys"]
    assert all(s["state"] == "exited" for s in states.values())


@pytest.mark.parametrize("emulate", [False, True])
def test_a_bad_task_is_reported_while_the_others_run(daemon, tmp_path, emulate):
    p = f"bad{int(emulate)}"
    with Client(daemon.rundir) as c:
        c.claim([f"{p}.fenced"])
    tasks = [_task(f"{p}.ok", ["sh", "-c", "exit 3"], [0]),
             _task(f"{p}.prog", ["/no/such/program"], [0]),
             _task(f"{p}.cwd", ["true"], [1], cwd="/no/such/dir"),
             _task(f"{p}.fenced", ["touch", str(tmp_path / "fenced")], [1]),
             _task(f"{p}.sig", _sh("kill -TERM $$"), [1]),
             _task(f"{p}.env", _sh(f'echo "$A $B ${{NRM_INWAIT_DELAY:-none}} '
                                   f'${{NRM_TASK_ID:+id}}" > {tmp_path}/env'), [0],
                   env={"B": "two", "A": "one"})]
    # the task's env over the base; what only nrmd sets is dropped from both
    env = dict(ENV, A="zero", B="zero", NRM_INWAIT_DELAY="1us", NRM_TASK_ID="mine")

    async def go():
        async with AsyncClient(daemon.rundir) as c:
            if emulate:
                c.features = frozenset()
            lists = []
            await c.run_batch(ONE, env, tasks, lists.append)
            return lists
    exits = _by_key(asyncio.run(go()), tasks)
    assert exits[f"{p}.ok"].status == 3 and exits[f"{p}.ok"].error is None
    assert exits[f"{p}.sig"].status == -15
    assert (tmp_path / "env").read_text() == "one two none id\n"
    for key in (f"{p}.prog", f"{p}.cwd", f"{p}.fenced"):
        assert exits[key].pid == 0 and exits[key].status is None and exits[key].error, exits[key]
    assert "/no/such/program" in exits[f"{p}.prog"].error
    assert exits[f"{p}.fenced"].error.startswith("fenced")
    assert not (tmp_path / "fenced").exists()
    with Client(daemon.rundir) as c:
        states = c.claim([f"{p}.ok", f"{p}.prog", f"{p}.cwd"])["keys"]
    assert states[f"{p}.ok"]["status"] == 3
    assert states[f"{p}.prog"]["state"] == states[f"{p}.cwd"]["state"] == "failed"


def test_a_malformed_request_is_refused_whole(daemon, tmp_path):
    mark = tmp_path / "ran"
    good = _task("mal.1", ["touch", str(mark)], [0])
    bad_sets = [[good, _task("mal.1", ["true"], [1])],                  # key twice
                [good, protocol.BatchTask(key="mal.2", container="mal-1", argv=["true"],
                                          cpus=[1])],                   # name twice
                [good, _task("mal.3", [], [0])],                        # no command
                [good, _task("mal.4", ["true"], [])],                   # no cpus
                [good, _task("mal.5", ["true"], [0, 0])],
                [good, _task("bad key!", ["true"], [0])]]

    async def go():
        async with AsyncClient(daemon.rundir) as c:
            codes = []
            for tasks in bad_sets:
                with pytest.raises(NrmError) as err:
                    await c.run_batch(ONE, ENV, tasks, lambda exits: None)
                codes.append(err.value.code)
            with pytest.raises(NrmError) as err:
                await c.run_batch(Manifest(name="x", slice=Slice(cpus=0, mems=1)), ENV,
                                  [good], lambda exits: None)
            codes.append(err.value.code)
            return codes
    codes = asyncio.run(go())
    assert codes == ["invalid"] * len(bad_sets) + ["manifest"]
    assert not mark.exists()
    # nothing was queued: the key was never taken
    with Client(daemon.rundir) as c:
        assert c.claim(["mal.1"])["keys"]["mal.1"] == {"state": "unknown"}
    # a task of the wrong shape fails the request's decoding (one error reply)
    raw = protocol.encode(protocol.RunBatch(manifest=ONE.to_dict(), tasks=[
        {"key": "mal.6", "container": "mal-6", "argv": ["true"], "cpus": [0], "surprise": 1}]))
    with pytest.raises(protocol.ProtocolError) as err:
        protocol.decode_request(raw)
    assert err.value.code == "invalid"


def test_kill_and_claim_of_queued_tasks(daemon, tmp_path):
    sleep = ["sleep", "60"]
    tasks = [_task("kq.run", sleep, [0]),
             _task("kq.next", ["touch", str(tmp_path / "next")], [0]),   # promised
             _task("kq.queued", ["touch", str(tmp_path / "queued")], [0]),
             _task("kq.claimed", ["touch", str(tmp_path / "claimed")], [0]),
             _task("kq.last", ["touch", str(tmp_path / "last")], [0])]

    async def go():
        async with AsyncClient(daemon.rundir) as c:
            await c.status()        # features known: run_batch sends at once
            lists = []
            fut = c.run_batch(ONE, ENV, tasks, lists.append)
            for _ in range(500):
                keys = (await c.claim(["kq.run"]))["keys"]
                if keys["kq.run"]["state"] == "running":
                    break
                await asyncio.sleep(0.01)
            await c.kill("kq-queued")
            # still in its slot (kq.next holds the slot's second place): withdrawn
            states = (await c.claim(["kq.claimed"]))["keys"]
            assert states["kq.claimed"] == {"state": "unknown"}
            assert (await c.claim(["kq.claimed"]))["keys"]["kq.claimed"] == {"state": "fenced"}
            # promised kq.run's slice (a spawner holds it): a claim finds it pending
            assert (await c.claim(["kq.next"]))["keys"]["kq.next"] == {"state": "pending"}
            await c.kill("kq-next")
            await c.kill("kq-run")
            await fut
            return lists, (await c.claim([t.key for t in tasks]))["keys"]
    lists, states = asyncio.run(go())
    exits = _by_key(lists, tasks)
    assert exits["kq.run"].status == -9 and exits["kq.run"].pid > 0
    for key in ("kq.next", "kq.queued"):
        assert exits[key].error == "killed before it started" and exits[key].pid == 0
        assert states[key] == {"state": "failed", "message": "killed before it started"}
    assert exits["kq.claimed"].error == "claimed before it started"
    assert states["kq.claimed"] == {"state": "fenced"}
    assert exits["kq.last"].status == 0 and states["kq.last"]["state"] == "exited"
    assert sorted(os.listdir(tmp_path)) == ["last"]


CLIENT = textwrap.dedent("""
    import asyncio, os, sys
    from nrm import protocol
    from nrm.client import AsyncClient
    from nrm.manifest import Manifest, Slice
    async def main():
        c = AsyncClient(sys.argv[1])
        await c.status()
        tasks = [protocol.BatchTask(key=f"gone.{i}", container=f"gone-{i}", cpus=[1],
                                    argv=["sh", "-c",
                                          f"sleep 0.2; touch {sys.argv[2]}/{i}; exit {i}"])
                 for i in range(4)]
        c.run_batch(Manifest(name="gone", slice=Slice(cpus=1, mems=1)), {}, tasks,
                    lambda exits: None)
        await c.status()        # the batch was sent before this request
        os._exit(0)
    asyncio.run(main())
""")


def test_tasks_outlive_a_client_that_vanished_and_keys_keep_their_ends(daemon, tmp_path):
    subprocess.run([sys.executable, "-c", CLIENT, daemon.rundir, str(tmp_path)], check=True,
                   cwd=REPO, timeout=60)
    assert len(os.listdir(tmp_path)) < 4       # gone before its batch ended
    keys = [f"gone.{i}" for i in range(4)]
    # (a claim now would withdraw the queued ones: wait for the last to run)
    wait_for(lambda: (tmp_path / "3").exists())
    with Client(daemon.rundir) as c:
        wait_for(lambda: all(s["state"] == "exited"
                             for s in c.claim(keys)["keys"].values()))
        states = c.claim(keys)["keys"]
    assert [states[k]["status"] for k in keys] == [0, 1, 2, 3]
    assert sorted(os.listdir(tmp_path)) == ["0", "1", "2", "3"]


def test_a_name_in_a_batch_is_reserved(daemon):
    async def go():
        async with AsyncClient(daemon.rundir) as c:
            await c.status()
            lists = []
            fut = c.run_batch(ONE, ENV, [_task("res.a", ["sleep", "60"], [1]),
                                         _task("res.b", ["true"], [1])], lists.append)
            await asyncio.sleep(0)
            with pytest.raises(NrmError) as err:    # a run cannot join nor shadow it
                await c.run(ONE, ["true"], container="res-b", output=False)
            assert err.value.code == "busy"
            dup = []
            await c.run_batch(ONE, ENV, [protocol.BatchTask(
                key="res.c", container="res-a", argv=["true"], cpus=[0])], dup.append)
            await c.kill("res-a")
            await fut
            return lists, dup
    lists, dup = asyncio.run(go())
    assert dup[0][0].error.startswith("busy")
    assert _by_key(lists, [_task("res.a", [], [1]), _task("res.b", [], [1])])["res.b"].status == 0


def test_what_a_task_leaves_behind_is_killed_and_the_next_one_runs(daemon, tmp_path):
    """Tasks of one cpus set share a container: a process the first leaves
    in it is killed (as at a container's end), then the second starts."""
    pidfile = tmp_path / "left"
    tasks = [_task("left.1", _sh(f"sleep 60 & echo $! > {pidfile}"), [1]),
             _task("left.2", ["touch", str(tmp_path / "ran")], [1])]
    with Client(daemon.rundir) as c:
        before = c.status()["tasks"]["batch_occupied"]
    exits = _by_key(asyncio.run(_batches(daemon.rundir, (tasks, False))), tasks)
    assert exits["left.1"].status == exits["left.2"].status == 0, exits
    assert (tmp_path / "ran").exists()
    with Client(daemon.rundir) as c:
        assert c.status()["tasks"]["batch_occupied"] == before + 1
    leftover = int(pidfile.read_text())

    def gone():
        try:
            with open(f"/proc/{leftover}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            return True
    wait_for(gone)      # killed: it would sleep for a minute


def test_an_oversubscribed_batch_keeps_its_order(daemon, tmp_path):
    tasks = [_task(f"over.{i}", _stamped(tmp_path / str(i)), [0]) for i in range(4)]
    exits = _by_key(asyncio.run(_batches(daemon.rundir, (tasks, True))), tasks)
    assert all(e.status == 0 for e in exits.values())
    spans = [tuple(map(int, (tmp_path / str(i)).read_text().split())) for i in range(4)]
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert end <= start, spans
