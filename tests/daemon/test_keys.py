"""Task keys (nrm/daemon/keys.py): nrmd remembers what became of a keyed
launch for its owner, and a claim fences the keys it has never seen, so a
launch with one arriving later never runs. Real nrmd, real clients."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from nrm import protocol
from nrm.client import Client, NrmError
from nrm.manifest import Manifest, Slice
from tests.conftest import needs_root
from tests.daemon.test_security import NOBODY
from tests.nrmd import DaemonProcess, wait_for

ONE = Manifest(name="keys", slice=Slice(cpus=1, mems=1))


def _run(c: Client, key, argv, detach=False):
    return c.run(ONE, argv, key=key, detach=detach, stdout=None, stderr=None, cwd="/",
                 oversubscribe=True)


def _state(c: Client, key):
    return c.claim([key])["keys"][key]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_claim_answers_each_state_and_fences_what_it_never_saw(daemon, tmp_path):
    with Client(daemon.rundir) as c:
        assert "keys" in c.status()["features"]
        assert _run(c, "t.1.1", ["sh", "-c", "exit 3"]).status == 3
        mark = tmp_path / "ran"
        started = _run(c, "t.2.1", ["sleep", "60"], detach=True)
        states = c.claim(["t.1.1", "t.2.1", "t.3.1"])
        assert states["keys"]["t.1.1"] == {"state": "exited", "status": 3, "code": 3,
                                           "signal": None}
        assert states["keys"]["t.2.1"]["state"] == "running"
        assert states["keys"]["t.2.1"]["pid"] == started.pid
        assert states["keys"]["t.3.1"] == {"state": "unknown"}
        assert states["epoch"] == c.status()["keys"]["epoch"]
        # the launch that arrives after the claim (a dead client's, in flight) never runs
        with pytest.raises(NrmError) as err:
            _run(c, "t.3.1", ["touch", str(mark)])
        assert err.value.code == "fenced"
        assert not mark.exists()
        assert _state(c, "t.3.1") == {"state": "fenced"}
        # a key names one launch: a second one with it is refused too
        with pytest.raises(NrmError) as err:
            _run(c, "t.1.1", ["touch", str(mark)])
        assert err.value.code == "duplicate" and not mark.exists()
        # a killed task ends with its signal; a refused launch is failed, never run
        c.kill(started.container)
        wait_for(lambda: _state(c, "t.2.1")["state"] == "exited")
        assert _state(c, "t.2.1")["status"] == 128 + signal.SIGKILL
        with pytest.raises(NrmError):
            _run(c, "t.4.1", ["/no/such/program"])
        assert _state(c, "t.4.1")["state"] == "failed"
        assert "cannot execute" in _state(c, "t.4.1")["message"]
        # forget drops ended keys only, by name or prefix
        running = _run(c, "t.5.1", ["sleep", "60"], detach=True)
        assert c.forget(["t.1.1"]) == 1
        assert _state(c, "t.1.1") == {"state": "unknown"}    # (fenced again by this claim)
        assert c.forget(prefix="t.") == 4
        assert _state(c, "t.5.1")["state"] == "running"
        c.kill(running.container)
        wait_for(lambda: _state(c, "t.5.1")["state"] == "exited")
        assert c.forget(prefix="t.") == 1


def test_a_run_that_never_starts_is_lost_once_its_client_leaves(daemon):
    """A keyed run queued for a busy slice whose client dies is dropped by
    nrmd (a detached one would run): its key says lost, never ran, not
    pending for ever."""
    ncpu = len(os.sched_getaffinity(0))
    whole = Manifest(name="keys", slice=Slice(cpus=ncpu, mems=1))
    script = (f"from nrm.client import Client; from nrm.manifest import Manifest, Slice\n"
              f"c = Client({daemon.rundir!r})\n"
              f"c.run(Manifest(name='k', slice=Slice(cpus={ncpu}, mems=1)), ['true'], "
              f"key='q.1.1', wait=True, stdout=None, stderr=None, cwd='/')\n")
    with Client(daemon.rundir) as c:
        started = c.status()["tasks"]["tasks_started"]
        # named: its slice is not promised to the queued run (a hand-over
        # could launch it before nrmd sees its client gone)
        hog = c.run(whole, ["sleep", "60"], detach=True, stdout=None, stderr=None, cwd="/",
                    container="keys-hog")
        try:
            p = subprocess.Popen([sys.executable, "-c", script], cwd=os.getcwd())
            wait_for(lambda: c.status()["waiting"] == 1)
            assert _state(c, "q.1.1") == {"state": "pending"}
            p.kill()
            p.wait()
        finally:
            c.kill(hog.container)           # the queue is looked at again: dropped
        wait_for(lambda: _state(c, "q.1.1")["state"] == "lost")
        assert c.status()["tasks"]["tasks_started"] == started + 1      # the hog alone
        assert c.forget(["q.1.1"]) == 1


@needs_root()
def test_another_user_can_neither_read_nor_fence_your_keys(daemon):
    script = ("import json, sys; from nrm.client import Client\n"
              f"c = Client({daemon.rundir!r})\n"
              "print(json.dumps([c.claim(['mine.1.1', 'later.1.1'])['keys'], "
              "c.forget(prefix='')]))\n")
    with Client(daemon.rundir) as c:
        assert _run(c, "mine.1.1", ["true"]).status == 0
        out = subprocess.run(NOBODY + [sys.executable, "-c", script], cwd="/",
                             env=dict(daemon.env, PYTHONPATH=os.getcwd()),
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        seen, forgotten = json.loads(out.stdout)
        assert seen == {"mine.1.1": {"state": "unknown"}, "later.1.1": {"state": "unknown"}}
        assert forgotten == 2           # its own two fences, nothing of ours
        assert _state(c, "mine.1.1")["state"] == "exited"
        assert _run(c, "later.1.1", ["true"]).status == 0     # not fenced for us
        assert c.forget(prefix="") == 2


def test_the_bound_refuses_new_keys_until_ended_ones_are_forgotten(daemon):
    """Launches stop at the per-user bound; claims may fence a reserve past
    it (a client whose launches were refused must still fence them when it
    resumes), all or none, and no more."""
    with Client(daemon.rundir) as c:
        info = c.status()["keys"]
        bound, reserve = info["max_per_user"], info["claim_reserve"]
        chunk = 4096
        for start in range(0, bound, chunk):
            c.claim([f"b.{i}" for i in range(start, min(bound, start + chunk))])
        assert c.status()["keys"]["keys"] >= bound
        with pytest.raises(NrmError) as err:
            _run(c, "b.run", ["true"])
        assert err.value.code == "keys_full" and "forget" in str(err.value)
        assert c.claim(["r.0"])["keys"] == {"r.0": {"state": "unknown"}}    # the reserve
        with pytest.raises(NrmError) as err:        # all or none: past the reserve
            c.claim([f"r.{i}" for i in range(1, reserve + 1)])
        assert err.value.code == "keys_full"
        assert _state(c, "r.1") == {"state": "unknown"} and _state(c, "r.1") == {
            "state": "fenced"}
        with pytest.raises(NrmError) as err:
            c.claim([f"r.{i}" for i in range(2, reserve + 1)])
        assert err.value.code == "keys_full"
        assert _state(c, "b.0") == {"state": "fenced"}      # known ones still answer
        assert c.forget(prefix="b.") == bound
        assert _run(c, "b.run", ["true"]).status == 0
        assert c.forget(["b.run"]) == 1 and c.forget(prefix="r.") == 2


def test_a_key_named_twice_is_answered_once_as_it_was(daemon):
    with Client(daemon.rundir) as c:
        assert c.claim(["d.1", "d.1"])["keys"] == {"d.1": {"state": "unknown"}}
        assert c.claim(["d.1", "d.1"])["keys"] == {"d.1": {"state": "fenced"}}
        assert c.status()["keys"]["keys"] == 1
        assert c.forget(["d.1", "d.1"]) == 1


@pytest.mark.parametrize("request_", [
    protocol.Run(manifest=ONE.to_dict(), argv=["true"], key="a b"),
    protocol.Run(manifest=ONE.to_dict(), argv=["true"], key=""),
    protocol.Run(manifest=ONE.to_dict(), argv=["true"], key="x" * 129),
    protocol.Claim(keys=["ok", "no/../\n"]),
    protocol.Claim(keys=[str(i) for i in range(5000)]),
    protocol.Forget(prefix="a b"),
], ids=["space", "empty", "long", "newline", "too-many", "prefix"])
def test_a_malformed_key_gets_an_error_naming_it_and_nrmd_lives(daemon, request_):
    with Client(daemon.rundir) as c:
        with pytest.raises(NrmError) as err:
            c.call(request_)
        assert err.value.code == "invalid"
        assert "key" in str(err.value) and "\n" not in str(err.value)
        assert c.status()["keys"]["keys"] == 0 or c.forget(prefix="") >= 0


def test_keys_of_the_wrong_type_are_invalid_and_nrmd_lives(daemon):
    import zmq
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect("ipc://" + os.path.join(daemon.rundir, "upstream"))
    try:
        for body in ({"type": "claim", "v": 1, "id": 1, "keys": [1, 2]},
                     {"type": "claim", "v": 1, "id": 2, "keys": "abc"},
                     {"type": "forget", "v": 1, "id": 3, "prefix": 7},
                     {"type": "run", "v": 1, "id": 4, "argv": ["true"], "key": {"a": 1}}):
            sock.send(json.dumps(body).encode())
            assert sock.poll(10000), body
            reply = json.loads(sock.recv())
            assert reply["type"] == "error" and reply["code"] == "invalid", reply
    finally:
        sock.close()
    with Client(daemon.rundir) as c:
        assert c.status()["pid"] == daemon.pid


def _on_file(rundir, key, state):
    with open(os.path.join(rundir, "keys.log")) as f:
        return any(r.get("k") == key and r.get("s") == state for r in map(json.loads, f))


def _start(rundir, *extra):
    return DaemonProcess("--hw", "emulated", *extra, rundir=rundir).start()


def test_keys_survive_a_restart_and_tasks_killed_with_nrmd_are_lost():
    d = _start(None)
    rundir = d.rundir
    try:
        with Client(rundir) as c:
            epoch = c.status()["keys"]["epoch"]
            assert _run(c, "r.1.1", ["sh", "-c", "exit 5"]).status == 5
            c.claim(["r.2.1"])
            running = _run(c, "r.3.1", ["sleep", "60"], detach=True)
        assert d.stop() == 0                     # a clean stop kills its tasks
        wait_for(lambda: not _alive(running.pid))
        d = _start(rundir)
        with Client(rundir) as c:
            assert c.status()["keys"]["epoch"] == epoch
            states = c.claim(["r.1.1", "r.2.1", "r.3.1"])["keys"]
            assert states["r.1.1"]["status"] == 5
            assert states["r.2.1"] == {"state": "fenced"}
            assert states["r.3.1"] == {"state": "lost"}
            assert c.status()["keys"]["exact"] is True
            # a crash at once: the key is on file before the launch goes to a spawner
            crashed = _run(c, "r.4.1", ["sleep", "60"], detach=True)
        d.proc.send_signal(signal.SIGKILL)       # the next nrmd kills (the default)
        d.proc.wait()
        d = _start(rundir)
        wait_for(lambda: not _alive(crashed.pid))
        with Client(rundir) as c:
            assert _state(c, "r.4.1") == {"state": "lost"}
            adopted = _run(c, "r.5.1", ["sleep", "2"], detach=True)
        wait_for(lambda: _on_file(rundir, "r.5.1", "running"))     # the turn's writes done
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait()
        d = _start(rundir, "--on-restart", "adopt")
        with Client(rundir) as c:
            assert c.status()["keys"]["exact"] is False
            assert _state(c, "r.5.1")["state"] == "running"
            assert _state(c, "r.5.1")["pid"] == adopted.pid
            wait_for(lambda: _state(c, "r.5.1")["state"] == "exited", timeout=10)
            assert _state(c, "r.5.1")["status"] is None      # adopted: not our child
            assert c.status()["keys"]["epoch"] == epoch
    finally:
        if d.proc.poll() is None:
            d.stop()
        shutil.rmtree(rundir, ignore_errors=True)


def test_a_task_that_ended_on_its_own_before_a_clean_stop_is_exited_not_lost(tmp_path):
    """The task (sh) exits 0 while its output is held: a child keeps the
    pipe and its client gives no credit, so nrmd stops reading and the task
    stays in its container, exited. The clean stop that follows ends it
    without killing it: its key says exited 0 (lost would run it again)."""
    import zmq
    d = _start(None)
    rundir = d.rundir
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    try:
        sock.connect("ipc://" + os.path.join(rundir, "upstream"))
        run = protocol.Run(id=1, manifest=ONE.to_dict(), key="s.1.1", cwd="/",
                           oversubscribe=True, window=1,     # raised to 256 KiB
                           argv=["sh", "-c", "head -c 4000000 /dev/zero & sleep 1; exit 0"])
        sock.send(protocol.encode(run))
        assert sock.poll(15000)         # its started reply: claims come after the launch
        started = json.loads(sock.recv())
        assert started["type"] == "started", started
        with Client(rundir) as c:
            pid = _state(c, "s.1.1")["pid"]
            wait_for(lambda: not _alive(pid))           # exited, and reaped by nrmd
            assert _state(c, "s.1.1")["state"] == "running"    # its pipe still held
        assert d.stop() == 0
        assert _on_file(rundir, "s.1.1", "exited") and not _on_file(rundir, "s.1.1", "lost")
        d = _start(rundir)
        with Client(rundir) as c:
            assert _state(c, "s.1.1") == {"state": "exited", "status": 0, "code": 0,
                                          "signal": None}
    finally:
        sock.close()
        if d.proc.poll() is None:
            d.stop()
        shutil.rmtree(rundir, ignore_errors=True)


def test_an_old_client_is_unaffected(daemon):
    """A run without a key (what older clients send) keeps no key."""
    with Client(daemon.rundir) as c:
        before = c.status()["keys"]["keys"]
        r = c.run(ONE, ["true"], stdout=None, stderr=None, cwd="/", oversubscribe=True)
        assert r.status == 0 and c.status()["keys"]["keys"] == before


def test_nrm_keys_shows_fences_and_forgets(daemon):
    r = daemon.cli("keys", "show", "cli.1", "cli.2")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["keys"] == {"cli.1": {"state": "unknown"},
                                            "cli.2": {"state": "unknown"}}
    assert json.loads(daemon.cli("keys", "show", "cli.1").stdout)["keys"]["cli.1"] == \
        {"state": "fenced"}
    r = daemon.cli("keys", "show", "no good")
    err = r.stderr.decode()
    assert r.returncode != 0 and "not a task key" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert daemon.cli("keys", "forget").returncode == 2
    r = daemon.cli("keys", "forget", "--prefix", "cli.")
    assert r.returncode == 0 and r.stdout.strip() == b"forgot 2 keys"
    assert b"resume" in r.stderr          # the warning: never a pilot still to resume
