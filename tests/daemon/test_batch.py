"""Batched launches (``run_batch``, docs/protocol.md "Batches"): keyed,
detached tasks, one at a time per cpus in arrival order, concurrent across
cpus, their exits coalesced and each reported once. Real nrmd, real
clients, real processes; the emulated path of AsyncClient.run_batch
against the same nrmd."""

import asyncio
import collections
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import textwrap

import pytest

from nrm import protocol
from nrm.client import AsyncClient, Client, NrmError
from nrm.manifest import Manifest, Slice
from tests.conftest import needs_root
from tests.daemon.test_security import NOBODY
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


def _as_nobody(daemon, script, *args):
    """A client process of uid 65534 (the tests run as root); its stdout."""
    out = subprocess.run(NOBODY + [sys.executable, "-c", script, daemon.rundir, *args], cwd="/",
                         env=dict(daemon.env, PYTHONPATH=REPO), capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.fixture
def shared_dir():
    """A directory another user can write in (pytest's tmp_path is root's alone)."""
    path = tempfile.mkdtemp(prefix="nrmt-batch-", dir="/tmp")
    os.chmod(path, 0o777)
    yield pathlib.Path(path)
    shutil.rmtree(path, ignore_errors=True)


NOBODY_BATCH = textwrap.dedent("""
    import asyncio, json, sys
    from nrm import protocol
    from nrm.client import AsyncClient
    from nrm.manifest import Manifest, Slice
    async def main():
        async with AsyncClient(sys.argv[1]) as c:
            await c.status()
            lists = []
            await c.run_batch(Manifest(name="batch", slice=Slice(cpus=1, mems=1)),
                              {"PATH": "/usr/bin:/bin"}, [protocol.BatchTask(
                key="two.b", container="two-b", cpus=[1],
                argv=["sh", "-c", f"echo $NRM_CONTAINER_ID > {sys.argv[2]}/b"])], lists.append)
            print(json.dumps([[e.status, e.error] for x in lists for e in x]))
    asyncio.run(main())
""")


@needs_root()
def test_tasks_of_two_users_on_the_same_cpus_never_share_a_container(daemon, shared_dir):
    """A task joins its cpus' container only as its owner's: another
    user's, queued behind it, gets a container of its own."""
    tmp_path = shared_dir
    gate = tmp_path / "go"
    tasks = [_task("two.a", _sh(f"echo $NRM_CONTAINER_ID > {tmp_path}/a; "
                                f"while [ ! -e {gate} ]; do sleep 0.01; done"), [1])]

    async def go():
        async with AsyncClient(daemon.rundir) as c:
            await c.status()
            lists = []
            fut = c.run_batch(ONE, ENV, tasks, lists.append)
            while not (tmp_path / "a").exists():
                await asyncio.sleep(0.01)
            keys = (await c.status())["keys"]["keys"]
            other = subprocess.Popen(
                NOBODY + [sys.executable, "-c", NOBODY_BATCH, daemon.rundir, str(tmp_path)],
                cwd="/", env=dict(daemon.env, PYTHONPATH=REPO), stdout=subprocess.PIPE,
                text=True)
            # its task is queued behind ours once its key is taken
            while (await c.status())["keys"]["keys"] == keys:
                await asyncio.sleep(0.01)
            gate.touch()
            await fut
            out, _ = other.communicate(timeout=60)
            assert other.returncode == 0
            return lists, json.loads(out)
    lists, theirs = asyncio.run(go())
    assert _by_key(lists, tasks)["two.a"].status == 0
    assert theirs == [[0, None]]
    assert (tmp_path / "a").read_text() != (tmp_path / "b").read_text()


NOBODY_NUL = textwrap.dedent("""
    import sys
    from nrm.client import Client, NrmError
    from nrm.manifest import Manifest, Slice
    with Client(sys.argv[1]) as c:
        before = len(c.list())
        try:
            c.run(Manifest(name="nul", slice=Slice(cpus=1, mems=1)), ["true"], cwd="/\\0x",
                  stdout=None, stderr=None)
        except NrmError as exc:
            print(exc.code, len(c.list()) - before)
""")


def test_a_nul_byte_refuses_the_request(daemon, tmp_path):
    """In a batch: the request whole, as any malformed one. In a run of
    another user (whose cwd nrmd checks): refused, no container left."""
    mark = tmp_path / "ran"
    good = _task("nul.1", ["touch", str(mark)], [0])
    bad_sets = [[good, _task("nul.2", ["true"], [0], cwd="/tmp\0x")],
                [good, _task("nul.3", ["true", "a\0b"], [0])],
                [good, _task("nul.4", ["true"], [0], env={"A": "x\0y"})]]

    async def go():
        async with AsyncClient(daemon.rundir) as c:
            codes = []
            for tasks, env in [(t, ENV) for t in bad_sets] + [([good], dict(ENV, B="\0"))]:
                with pytest.raises(NrmError) as err:
                    await c.run_batch(ONE, env, tasks, lambda exits: None)
                codes.append((err.value.code, str(err.value).split(":")[0]))
            return codes
    assert asyncio.run(go()) == [("invalid", "tasks[1].cwd"), ("invalid", "tasks[1].argv[1]"),
                                 ("invalid", "tasks[1].env['A']"), ("invalid", "env['B']")]
    assert not mark.exists()
    if os.geteuid() == 0:
        assert _as_nobody(daemon, NOBODY_NUL) == "invalid 0\n"


def test_a_batch_over_the_request_limit_is_split_and_only_its_bad_parts_fail(daemon, tmp_path):
    """Every part is encoded before any is sent: a task too large alone is
    reported as its own error, a part nrmd refuses reports its own tasks,
    and the others run and are reported."""
    pad = {f"PAD{i}": "x" * 100_000 for i in range(6)}     # two such tasks need two requests
    tasks = [_task("big.ok", _sh(f"sleep 0.2; touch {tmp_path}/ok"), [0], env=pad),
             _task("big.bad", ["true"], [], env=pad),                   # nrmd refuses its part
             _task("big.huge", ["true"], [1], env={"PAD": "x" * (1 << 20)})]
    exits = _by_key(asyncio.run(_batches(daemon.rundir, (tasks, False))), tasks)
    assert exits["big.ok"].status == 0 and (tmp_path / "ok").exists()
    assert exits["big.bad"].error.startswith("invalid: ") and exits["big.bad"].pid == 0
    assert exits["big.huge"].error.startswith("too_large: ") and exits["big.huge"].pid == 0


def test_an_older_waiting_run_goes_before_later_batch_tasks_of_its_cpus(daemon, tmp_path):
    """Chaining keeps a slot's container only while no older run waits for
    its cpus: a run queued before a later batch starts before its tasks."""
    gate = tmp_path / "go"
    first = [_task("fifo.0", _sh(f"while [ ! -e {gate} ]; do sleep 0.01; done"), [0]),
             _task("fifo.1", _stamped(tmp_path / "1"), [0])]
    later = [_task(f"fifo.{i}", _stamped(tmp_path / str(i)), [0]) for i in (2, 3)]

    async def go():
        async with AsyncClient(daemon.rundir) as c, AsyncClient(daemon.rundir) as c2:
            await c.status()
            lists = []
            f1 = c.run_batch(ONE, ENV, first, lists.append)
            # received before the run: nrmd's ROUTER fair-queues two clients'
            # pending requests, so the run, sent later by c2, may be read first
            await c.status()
            run = asyncio.ensure_future(c2.run(ONE, _stamped(tmp_path / "run"), wait=True,
                                               cpus_allowed=[0], output=False))
            while (await c.status())["waiting"] < 1:
                await asyncio.sleep(0.01)
            f2 = c.run_batch(ONE, ENV, later, lists.append)
            await c.status()        # the later batch is queued
            gate.touch()
            await asyncio.gather(f1, f2, run)
            return lists
    exits = _by_key(asyncio.run(go()), first + later)
    assert all(e.status == 0 for e in exits.values())
    start = {n: int((tmp_path / n).read_text().split()[0]) for n in ("1", "run", "2", "3")}
    assert start["1"] < start["run"] < start["2"] < start["3"], start


def test_an_emulated_task_the_client_cannot_send_is_reported_as_its_error(daemon):
    tasks = [_task("emubad.ok", ["true"], [0]), _task("emubad.obj", ["true", object()], [0])]

    async def go():
        async with AsyncClient(daemon.rundir) as c:
            c.features = frozenset()
            lists = []
            await asyncio.wait_for(c.run_batch(ONE, ENV, tasks, lists.append), 30)
            return lists
    exits = _by_key(asyncio.run(go()), tasks)
    assert exits["emubad.ok"].status == 0
    assert exits["emubad.obj"].error.startswith("client: ") and exits["emubad.obj"].pid == 0


def test_a_claim_withdraws_a_task_whose_promise_was_taken_back(daemon, tmp_path):
    """A batch task promised a slice (a spawner holds it) answers a claim
    ``pending``; taken back into the queue (younger runs passed it), a
    later claim still withdraws it: it never runs."""
    mark = tmp_path / "ran"

    async def go():
        async with AsyncClient(daemon.rundir) as c:
            await c.status()
            hog = await c.run(ONE, ["sleep", "60"], detach=True, cpus_allowed=[0], output=False)
            lists = []
            fut = c.run_batch(ONE, ENV, [_task("prom.x", ["touch", str(mark)], [0])],
                              lists.append)
            while (await c.status())["waiting"] < 1:
                await asyncio.sleep(0.01)
            assert (await c.claim(["prom.x"]))["keys"]["prom.x"] == {"state": "pending"}
            before = (await c.status())["tasks"]["handovers_cancelled"]
            while (await c.status())["tasks"]["handovers_cancelled"] == before:
                await c.run(ONE, ["true"], cpus_allowed=[1], output=False)    # passes it
            states = (await c.claim(["prom.x"]))["keys"]
            await c.kill(hog.container)
            await fut
            return lists, states
    lists, states = asyncio.run(go())
    assert states["prom.x"] == {"state": "unknown"}
    assert lists == [[protocol.BatchExit(key="prom.x", container="prom-x",
                                         error="claimed before it started")]]
    assert not mark.exists()
