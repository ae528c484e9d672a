"""Spawner processes: the launch path, with real helpers and real daemons.

The same user-visible semantics must hold with spawners (default) and
without (`--spawners 0`); a dead spawner must fail its launches cleanly and
be replaced; a stopped or killed daemon must leave no spawner behind.
"""

import asyncio
import errno
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest

from nrm.paths import find_spawner
from nrm.tools.localnrmd import spawner_pids
from nrm.containers.spawner import (CANCEL_MAGIC, PROTOCOL, SpawnError, SpawnerPool, Started,
                                    choose_helper, encode_request, env_list, fork_exec, fs_encoded,
                                    home_cpus)
from tests.conftest import EXAMPLES, needs_root
from tests.nrmd import (DaemonProcess, check_client_death_kills_the_task,
                        check_ctrl_c_reaches_the_task, wait_for)

BASIC = os.path.join(EXAMPLES, "basic.yml")
PY = sys.executable


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# -- fork_exec ---------------------------------------------------------------

def test_fork_exec_reports_a_missing_program_and_reaps_it():
    with pytest.raises(FileNotFoundError) as info:
        fork_exec(["/no/such/program"], [], "/", False)
    assert info.value.filename == "/no/such/program"
    try:
        assert os.waitpid(-1, os.WNOHANG)[0] == 0      # no zombie left for us
    except ChildProcessError:
        pass


def test_fork_exec_blames_the_cwd_when_chdir_fails():
    with pytest.raises(FileNotFoundError) as info:
        fork_exec(["true"], env_list({"PATH": "/usr/bin:/bin"}), "/no/such/dir", False)
    assert info.value.filename == "/no/such/dir"


def test_fork_exec_searches_the_tasks_path_and_captures_output(tmp_path):
    prog = tmp_path / "hello"
    prog.write_text("#!/bin/sh\necho out; echo err >&2; exit 4\n")
    prog.chmod(0o755)
    pid, out, err = fork_exec(["hello"], env_list({"PATH": str(tmp_path)}), "/", True)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 4
    assert os.read(out, 100) == b"out\n" and os.read(err, 100) == b"err\n"
    os.close(out)
    os.close(err)


# -- the pool, without a daemon ------------------------------------------------

class Harness:
    def __init__(self, count=1):
        self.count = count

    async def __aenter__(self):
        self.loop = asyncio.get_running_loop()
        self.pool = SpawnerPool(self.count, self.loop)
        self.pool.start()
        return self

    async def __aexit__(self, *exc):
        self.pool.close()

    async def launch(self, argv, capture=False, **extra):
        done = self.loop.create_future()
        req = {"argv": argv, "env": env_list({"PATH": os.environ["PATH"]}), "cwd": "/",
               "capture": capture, **extra}
        self.pool.submit(req, done.set_result)
        return await asyncio.wait_for(done, 10)

    async def exit_of(self, pid):
        """Tasks are our children (the spawner's child is made CLONE_PARENT)."""
        for _ in range(1000):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return status
            await asyncio.sleep(0.01)
        raise AssertionError(f"no exit for {pid}")


def test_pool_launches_reports_status_and_passes_pipes():
    async def go():
        async with Harness() as h:
            r = await h.launch(["sh", "-c", "echo hi; echo oops >&2; kill -USR1 $$"],
                               capture=True)
            assert isinstance(r, Started)
            status = await h.exit_of(r.pid)
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGUSR1
            assert os.read(r.stdout, 100) == b"hi\n"
            assert os.read(r.stderr, 100) == b"oops\n"
            for fd in (r.pidfd, r.stdout, r.stderr):
                os.close(fd)
    asyncio.run(go())


def test_pool_exec_failure_is_an_error_not_a_task():
    async def go():
        async with Harness() as h:
            r = await h.launch(["/no/such/program"])
            assert isinstance(r, SpawnError) and r.stage == "exec"
            assert r.oserror.errno == errno.ENOENT
            r = await h.launch(["true"], join=["/no/such/cgroup/tasks"])
            assert isinstance(r, SpawnError) and r.stage == "place"
            r = await h.launch(["true"])           # the spawner is still fine
            assert isinstance(r, Started)
            assert await h.exit_of(r.pid) == 0
            os.close(r.pidfd)
    asyncio.run(go())


def test_pool_large_requests_and_bad_arguments():
    big = "x" * 100000          # over the 64 KiB inline limit: travels in a memfd

    async def go():
        async with Harness() as h:
            done = h.loop.create_future()
            h.pool.submit({"argv": ["sh", "-c", 'printf %s "${#BIG}"'],
                           "env": env_list({"PATH": os.environ["PATH"], "BIG": big}),
                           "cwd": "/", "capture": True}, done.set_result)
            r = await asyncio.wait_for(done, 10)
            assert isinstance(r, Started), r
            assert await h.exit_of(r.pid) == 0
            assert os.read(r.stdout, 100) == str(len(big)).encode()
            for fd in (r.pidfd, r.stdout, r.stderr):
                os.close(fd)
            bad = await h.launch(["tr\0ue"])
            assert isinstance(bad, SpawnError) and bad.stage == "invalid"
            assert isinstance(await h.launch(["true"]), Started)
    asyncio.run(go())


@pytest.mark.parametrize("cpus, count, homes", [
    ([0, 1], 2, [[0], [1]]),
    ([0, 1, 2, 3], 2, [[0, 1], [2, 3]]),
    ([3, 1, 2, 0], 3, [[0], [1], [2, 3]]),
    ([4, 5, 6, 7, 8], 2, [[4, 5], [6, 7, 8]]),
    ([0, 1], 4, [[0], [1], [0], [1]]),
    ([7], 1, [[7]]),
])
def test_spawner_homes_are_contiguous_shares(cpus, count, homes):
    assert home_cpus(cpus, count) == homes


@pytest.mark.parametrize("loads, near, chosen", [
    ([0, 0], 2, 1),             # idle: the one at home on cpu 2
    ([0, 0], 0, 0),
    ([0, 0], None, 0),          # no slice cpu: least loaded, first
    ([1, 0], 0, 0),             # home counts one launch less and wins the tie
    ([2, 0], 0, 1),             # busier by two: the other one
    ([0, 1], 3, 1),
    ([0, 3], 3, 0),
    ([None, 5], 0, 1),          # a dead spawner is never chosen
    ([None, None], 0, None),
    ([3, 1, 2], 9, 1),          # no home holds cpu 9
])
def test_launches_go_to_the_spawner_at_home_unless_it_is_busier(loads, near, chosen):
    homes = [[0, 1], [2, 3], [4, 5]][:len(loads)]
    assert choose_helper(loads, homes, near) == chosen


def _cpus_allowed(pid):
    with open(f"/proc/{pid}/status") as f:
        return [ln.split()[-1] for ln in f if ln.startswith("Cpus_allowed_list")][0]


def test_spawners_live_at_home_and_their_children_do_not():
    """Each spawner is pinned to its share of cpus; a task asks for its
    cpus or gets the daemon's whole set, never the spawner's home."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs 2 cpus")

    async def go():
        async with Harness(count=2) as h:
            homes = [os.sched_getaffinity(helper.proc.pid) for helper in h.pool.helpers]
            out = []
            for extra in ({"cpus": [cpus[-1]]}, {}):
                r = await h.launch(["sh", "-c", "grep Cpus_allowed_list /proc/self/status"],
                                   capture=True, **extra)
                assert await h.exit_of(r.pid) == 0
                out.append(os.read(r.stdout, 200).decode().split()[-1])
                for fd in (r.pidfd, r.stdout, r.stderr):
                    os.close(fd)
            done = h.loop.create_future()
            h.pool.submit({"argv": ["true"], "env": [], "cwd": "/", "capture": False},
                          done.set_result, near=cpus[-1])
            sent_to = [len(helper.pending) for helper in h.pool.helpers]
            r = await asyncio.wait_for(done, 10)
            await h.exit_of(r.pid)
            os.close(r.pidfd)
            return homes, out, sent_to
    homes, (bound, unbound), sent_to = asyncio.run(go())
    assert homes == [set(home) for home in home_cpus(cpus, 2)]
    assert bound == str(cpus[-1])
    assert unbound == _cpus_allowed("self")
    assert sent_to == [0, 1]


def test_pool_spreads_requests_over_helpers():
    async def go():
        async with Harness(count=2) as h:
            launches = [asyncio.ensure_future(h.launch(["sleep", "30"])) for _ in range(4)]
            await asyncio.sleep(0)              # all four submitted, none answered yet
            in_flight = [len(helper.pending) for helper in h.pool.helpers]
            rs = await asyncio.gather(*launches)
            for r in rs:
                assert isinstance(r, Started)
                with open(f"/proc/{r.pid}/stat") as f:      # our child, whoever launched it
                    assert int(f.read().rsplit(")", 1)[1].split()[1]) == os.getpid()
                os.kill(r.pid, signal.SIGKILL)
                await h.exit_of(r.pid)
                os.close(r.pidfd)
            return in_flight
    assert asyncio.run(go()) == [2, 2]


def test_dead_spawner_fails_its_launches_and_is_replaced():
    async def go():
        async with Harness() as h:
            running = await h.launch(["sleep", "30"])
            old = h.pool.helpers[0].proc.pid
            os.kill(old, signal.SIGSTOP)          # hold it while a launch is in flight
            pending = h.loop.create_future()
            h.pool.submit({"argv": ["true"], "env": [], "cwd": "/", "capture": False},
                          pending.set_result)
            await asyncio.sleep(0.05)
            os.kill(old, signal.SIGKILL)
            failed = await asyncio.wait_for(pending, 10)
            assert isinstance(failed, SpawnError) and "died" in str(failed)
            assert _alive(running.pid)            # its task runs on, still our child
            os.kill(running.pid, signal.SIGKILL)
            status = await h.exit_of(running.pid)
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
            os.close(running.pidfd)
            new = h.pool.helpers[0].proc.pid
            assert new != old and h.pool.counters["restarts"] == 1
            r = await h.launch(["true"])
            assert isinstance(r, Started) and await h.exit_of(r.pid) == 0
            os.close(r.pidfd)
            return old, new
    old, new = asyncio.run(go())
    assert not _alive(old) and not _alive(new)        # close() stops the helper


# -- nrm-spawner itself -------------------------------------------------------

REPLY = struct.Struct("=IiQiiiiQ")


@pytest.fixture
def raw_spawner():
    """A real nrm-spawner on a socketpair, spoken to byte by byte."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    proc = subprocess.Popen([find_spawner(), str(theirs.fileno()), str(os.getpid())],
                            pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
    theirs.close()
    mine.settimeout(10)
    kind, pid, version, *_ = REPLY.unpack(mine.recv(64))
    assert (kind, pid, version) == (0, proc.pid, PROTOCOL)
    yield mine
    mine.close()
    assert proc.wait(timeout=10) == 0          # our end closed: it exits


def test_spawner_refuses_garbage_and_goes_on(raw_spawner):
    good, _, _ = encode_request(7, {"argv": ["true"], "env": [], "cwd": "/",
                                    "capture": False})
    for bad in (b"x", b"\0" * 200, good[:70], b"\1" + good[1:],
                good[:-1] + b"x",                               # last string unterminated
                good[:40] + struct.pack("=I", 1 << 30) + good[44:]):   # absurd argv count
        raw_spawner.send(bad)
        kind, _, _, stage, err, _, _, _ = REPLY.unpack(raw_spawner.recv(64))
        assert (kind, stage, err) == (2, 3, errno.EINVAL), bad[:80]
    raw_spawner.send(good)
    data, fds, _, _ = socket.recv_fds(raw_spawner, 64, 3)
    kind, pid, rid, *_ = REPLY.unpack(data)
    assert (kind, rid, len(fds)) == (1, 7, 1)
    assert os.waitpid(pid, 0) == (pid, 0)            # our child, not the spawner's
    os.close(fds[0])


def test_spawner_reports_the_start_time_proc_would(raw_spawner):
    """The state log's identity of a task is (pid, start time); the
    spawner's bracket around clone must give /proc's own value, or 0."""
    known = 0
    for i in range(20):
        req, _, _ = encode_request(i + 1, {"argv": ["sleep", "5"], "env": [b"PATH=/usr/bin:/bin"],
                                           "cwd": "/", "capture": False})
        raw_spawner.send(req)
        data, fds, _, _ = socket.recv_fds(raw_spawner, 64, 3)
        kind, pid, _, _, _, _, _, start = REPLY.unpack(data)
        assert kind == 1
        with open(f"/proc/{pid}/stat") as f:
            proc_start = int(f.read().rsplit(")", 1)[1].split()[19])
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(fds[0])
        assert start in (0, proc_start)
        known += start != 0
    # 0 when a clock tick fell inside the bracket: rare on a quiet machine
    # (about 1 in 20), common on a loaded one; never a wrong value
    assert known >= 1


def _launch_raw(sock, rid, argv, after=None, pidfd=None):
    req = {"argv": argv, "env": [b"PATH=/usr/bin:/bin"], "cwd": "/", "capture": False}
    if after is not None:
        req["after"] = str(after)
    data, _, _ = encode_request(rid, req)
    if pidfd is None:
        sock.send(data)
    else:
        socket.send_fds(sock, [data], [pidfd])


def _answer(sock, timeout=10.0):
    """(kind, pid, id, stage, errno, fds), or None when nothing comes."""
    sock.settimeout(timeout)
    try:
        data, fds, _, _ = socket.recv_fds(sock, 64, 3)
    except socket.timeout:
        return None
    kind, pid, rid, stage, err, _, _, _ = REPLY.unpack(data)
    return kind, pid, rid, stage, err, fds


def _predecessor(sock, rid):
    _launch_raw(sock, rid, ["sleep", "30"])
    kind, pid, _, _, _, fds = _answer(sock)
    assert kind == 1
    return pid, fds[0]


def test_a_held_launch_starts_when_its_predecessor_exits(raw_spawner, tmp_path):
    procs = tmp_path / "cgroup.procs"     # the predecessor's cgroup: empty
    procs.write_text("")
    pred, pidfd = _predecessor(raw_spawner, 1)
    _launch_raw(raw_spawner, 2, ["true"], after=procs, pidfd=pidfd)
    assert _answer(raw_spawner, 0.3) is None             # held while it runs
    _launch_raw(raw_spawner, 3, ["true"])                # others still launch
    kind, pid, rid, _, _, fds = _answer(raw_spawner)
    assert (kind, rid) == (1, 3) and os.waitpid(pid, 0) == (pid, 0)
    os.close(fds[0])
    os.kill(pred, signal.SIGKILL)
    kind, pid, rid, _, _, fds = _answer(raw_spawner)
    assert (kind, rid) == (1, 2)
    assert os.waitpid(pid, 0) == (pid, 0)
    assert os.waitpid(pred, 0)[0] == pred
    os.close(fds[0])
    os.close(pidfd)


def test_a_held_launch_is_refused_while_the_slice_holds_a_process(raw_spawner, tmp_path):
    procs = tmp_path / "cgroup.procs"
    procs.write_text("4242\n")      # something the predecessor left behind
    pred, pidfd = _predecessor(raw_spawner, 1)
    _launch_raw(raw_spawner, 2, ["true"], after=procs, pidfd=pidfd)
    os.kill(pred, signal.SIGKILL)
    kind, _, rid, stage, err, fds = _answer(raw_spawner)
    assert (kind, rid, stage, err, fds) == (2, 2, 4, errno.EBUSY, [])
    os.waitpid(pred, 0)
    os.close(pidfd)


def test_a_held_launch_can_be_cancelled_once(raw_spawner, tmp_path):
    procs = tmp_path / "cgroup.procs"
    procs.write_text("")
    pred, pidfd = _predecessor(raw_spawner, 1)
    _launch_raw(raw_spawner, 2, ["true"], after=procs, pidfd=pidfd)
    cancel = struct.pack("=IIQ", CANCEL_MAGIC, 0, 2)
    raw_spawner.send(cancel)
    kind, _, rid, stage, err, _ = _answer(raw_spawner)
    assert (kind, rid, stage, err) == (2, 2, 5, errno.ECANCELED)
    raw_spawner.send(cancel)                       # not held any more: no answer
    raw_spawner.send(struct.pack("=IIQ", CANCEL_MAGIC, 0, 99))
    os.kill(pred, signal.SIGKILL)
    assert _answer(raw_spawner, 0.3) is None      # and it never starts
    os.waitpid(pred, 0)
    _launch_raw(raw_spawner, 4, ["true"], after=procs)   # held, but no pidfd
    kind, _, rid, stage, _, _ = _answer(raw_spawner)
    assert (kind, rid, stage) == (2, 4, 3)
    os.close(pidfd)


@pytest.mark.parametrize("queued", [False, True], ids=["sent-at-once", "queued"])
def test_the_pool_holds_a_launch_even_when_its_caller_closes_the_pidfd(tmp_path, queued):
    """nrmd closes a predecessor's pidfd when it handles its exit, which
    may come before a queued request leaves: the pool must send its own
    copy then (sent at once, it borrows the caller's)."""
    procs = tmp_path / "cgroup.procs"
    procs.write_text("")

    async def go():
        async with Harness() as h:
            pred = await h.launch(["sleep", "30"])
            helper = h.pool.helpers[0]
            backlog, results = [], []
            if queued:      # a stopped spawner: requests pile up in our queue
                os.kill(helper.proc.pid, signal.SIGSTOP)
                env = env_list({"PATH": os.environ["PATH"], "PAD": "x" * 60000})
                while not helper.outq:
                    fut = h.loop.create_future()
                    h.pool.submit({"argv": ["true"], "env": env, "cwd": "/",
                                   "capture": False}, fut.set_result)
                    backlog.append(fut)
            held = h.loop.create_future()
            h.pool.submit({"argv": ["true"], "env": env_list({"PATH": os.environ["PATH"]}),
                           "cwd": "/", "capture": False, "after": str(procs)},
                          held.set_result, after=pred.pidfd)
            assert bool(helper.outq) == queued
            os.close(pred.pidfd)        # as nrmd does at the predecessor's exit
            if queued:
                os.kill(helper.proc.pid, signal.SIGCONT)
            for fut in backlog:
                r = await asyncio.wait_for(fut, 10)
                results.append(r)
                assert isinstance(r, Started)
                assert await h.exit_of(r.pid) == 0
                os.close(r.pidfd)
            await asyncio.sleep(0.2)
            assert not held.done()          # still held: the predecessor runs
            os.kill(pred.pid, signal.SIGKILL)
            r = await asyncio.wait_for(held, 10)
            assert isinstance(r, Started), r
            assert await h.exit_of(r.pid) == 0
            assert os.WTERMSIG(await h.exit_of(pred.pid)) == signal.SIGKILL
            os.close(r.pidfd)
            assert h.pool.alive() == 1
    asyncio.run(go())


def test_a_stale_or_missing_spawner_is_a_startup_error(tmp_path, monkeypatch):
    liar = tmp_path / "nrm-spawner"
    liar.write_text(f"#!{PY}\nimport os, socket, struct, sys, time\n"
                    "s = socket.socket(fileno=int(sys.argv[1]))\n"
                    "s.send(struct.pack('=IiQiiiiQ', 0, os.getpid(), 99, 0, 0, 0, 0, 0))\n"
                    "time.sleep(30)\n")
    liar.chmod(0o755)

    async def start():
        pool = SpawnerPool(1, asyncio.get_running_loop())
        try:
            pool.start()
        finally:
            pool.close()

    monkeypatch.setattr("nrm.containers.spawner.find_spawner", lambda: str(liar))
    with pytest.raises(OSError, match=f"protocol {PROTOCOL} expected"):
        asyncio.run(start())
    monkeypatch.setattr("nrm.containers.spawner.find_spawner", lambda: None)
    with pytest.raises(OSError, match="nrm-spawner not found") as missing:
        asyncio.run(start())
    assert "pip install" in str(missing.value) and "make setup" in str(missing.value)


@needs_root()
def test_a_recreated_cgroup_is_joined_through_a_fresh_fd():
    """The spawner keeps membership files open; a cgroup removed and made
    again under the same path leaves it a stale fd (ENODEV)."""
    base = "/sys/fs/cgroup/cpuacct"
    if not os.access(base, os.W_OK):
        pytest.skip("no writable cgroup v1 cpuacct hierarchy")
    cg = os.path.join(base, f"nrm-test-stale-{os.getpid()}")

    async def in_cgroup(h):
        r = await h.launch(["sleep", "30"], join=[os.path.join(cg, "tasks")])
        assert isinstance(r, Started), r
        with open(f"/proc/{r.pid}/cgroup") as f:
            joined = any(line.endswith(":" + cg[len(base):]) for line in f.read().split())
        os.kill(r.pid, signal.SIGKILL)
        await h.exit_of(r.pid)
        os.close(r.pidfd)
        return joined

    async def go():
        async with Harness() as h:
            os.mkdir(cg)
            try:
                assert await in_cgroup(h)
                await asyncio.sleep(0.05)
                os.rmdir(cg)
                os.mkdir(cg)
                assert await in_cgroup(h)
            finally:
                await asyncio.sleep(0.05)
                os.rmdir(cg)
    asyncio.run(go())


# -- through a daemon, with and without spawners --------------------------------

@pytest.fixture(scope="module", params=[0, 1], ids=["in-process", "spawner"])
def nrmd(request):
    d = DaemonProcess("--hw", "emulated", "--spawners", str(request.param)).start()
    d.spawners = request.param
    yield d
    rc = d.stop()
    assert rc == 0, d.log()
    shutil.rmtree(d.rundir, ignore_errors=True)


def _containers(d):
    return json.loads(d.cli("list", "--json").stdout)


@pytest.mark.parametrize("cmd,status", [
    (["true"], 0), (["sh", "-c", "exit 3"], 3), (["sh", "-c", "kill -TERM $$"], 143)])
def test_exit_status(nrmd, cmd, status):
    assert nrmd.cli("run", BASIC, *cmd).returncode == status


def test_exec_failure_is_127_and_one_line(nrmd):
    r = nrmd.cli("run", BASIC, "/no/such/program")
    assert r.returncode == 127
    assert r.stderr.decode().count("\n") == 1 and b"No such file" in r.stderr


def test_a_huge_program_name_fails_cleanly_and_frees_the_slice(nrmd):
    """The error reply names the program: it must still fit the spawner's
    reply, or the launch would never answer and its slice never free."""
    r = nrmd.cli("run", BASIC, "/no/" + "x" * 20000, timeout=30)
    assert r.returncode == 127 and r.stderr.count(b"\n") == 1
    assert json.loads(nrmd.cli("list", "--json").stdout) == []
    assert nrmd.cli("run", BASIC, "true").returncode == 0


def test_status_names_the_spawners(nrmd):
    notes = json.loads(nrmd.cli("status", "--json").stdout)["runtime"]["notes"]
    assert ("1 spawner processes" in notes) == (nrmd.spawners == 1)
    assert len(spawner_pids(nrmd.proc.pid)) == nrmd.spawners


def test_ctrl_c_and_output(nrmd):
    check_ctrl_c_reaches_the_task(nrmd, BASIC)


def test_client_death_and_detach_kill(nrmd):
    check_client_death_kills_the_task(nrmd, BASIC)
    assert nrmd.cli("run", "-d", "--container", "bg", BASIC, "sleep", "600").returncode == 0
    k = nrmd.cli("kill", "bg")
    assert k.returncode == 0 and b"1 tasks" in k.stdout
    wait_for(lambda: not [c for c in _containers(nrmd) if c["id"] == "bg"])


@needs_root()
def test_task_is_in_its_cgroup_and_the_spawner_went_home(nrmd):
    r = nrmd.cli("run", BASIC, "cat", "/proc/self/cgroup")
    cpuset = [ln for ln in r.stdout.decode().splitlines() if ":cpuset:" in ln][0]
    assert "/nrm." in cpuset
    for pid in spawner_pids(nrmd.proc.pid):
        with open(f"/proc/{pid}/cgroup") as f:
            assert "/nrm." not in f.read()


def test_killed_spawner_is_replaced_and_its_task_keeps_its_status(tmp_path):
    d = DaemonProcess("--hw", "emulated", "--spawners", "1").start()
    go = tmp_path / "go"
    try:
        p = d.popen_cli("run", "--container", "c1", BASIC, "sh", "-c",
                        f"while [ ! -e {go} ]; do sleep 0.02; done; exit 7",
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        wait_for(lambda: [c for c in _containers(d) if c["id"] == "c1" and c["tasks"]])
        (old,) = spawner_pids(d.proc.pid)
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: old not in spawner_pids(d.proc.pid))
        go.touch()
        _, err = p.communicate(timeout=20)
        assert p.returncode == 7, err             # the daemon is the task's parent
        new = wait_for(lambda: spawner_pids(d.proc.pid))
        assert new != [old]
        assert d.cli("run", BASIC, "sh", "-c", "exit 5").returncode == 5
        assert "spawner 0" in d.log() and "died" in d.log()
    finally:
        assert d.stop() == 0


def test_stopped_or_killed_daemon_leaves_no_spawner():
    d = DaemonProcess("--hw", "emulated", "--spawners", "2").start()
    helpers = spawner_pids(d.proc.pid)
    assert len(helpers) == 2
    assert d.stop() == 0
    assert not any(_alive(p) for p in helpers)
    d = DaemonProcess("--hw", "emulated", "--spawners", "2").start()
    helpers = spawner_pids(d.proc.pid)
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in helpers) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not any(_alive(p) for p in helpers)      # PR_SET_PDEATHSIG
    DaemonProcess("--hw", "emulated", rundir=d.rundir).start().stop()   # clean up its cgroups


def test_env_list_encodes_as_fsencode_does_and_refuses_what_exec_cannot_take():
    env = {"PATH": "/usr/bin", "RAW": "\udcff", "EMPTY": "", "EQ": "a=b"}
    assert env_list(env) == [os.fsencode(k) + b"=" + os.fsencode(v) for k, v in env.items()]
    with pytest.raises(ValueError):
        env_list({"A=B": "x"})
    with pytest.raises(TypeError):
        env_list({"A": 3})


def test_env_list_and_argv_encoding_take_the_slow_path_for_what_the_fast_one_cannot_split():
    """A NUL inside an entry is left for exec (or the spawner request) to
    refuse, as before; a key with '=' raises even after good entries."""
    env = {"A": "x\0y", "B": "z"}
    assert env_list(env) == [b"A=x\0y", b"B=z"]
    with pytest.raises(ValueError):
        env_list({"GOOD": "1", "A=B": "x"})
    assert env_list({}) == []
    args = ["/bin/\udcff", "", b"raw", "--"]
    assert fs_encoded(args) == [os.fsencode(a) for a in args]
    assert fs_encoded(["a\0b", "c"]) == [b"a\0b", b"c"]
    assert fs_encoded(["", ""]) == [b"", b""] and fs_encoded([]) == []
    with pytest.raises(ValueError, match="embedded null byte"):
        encode_request(1, {"argv": ["a\0b"], "env": [], "cwd": "/", "capture": False})


IGNORING = ["sh", "-c", "trap '' INT QUIT HUP; exec \"$@\"", "sh"]


@pytest.mark.parametrize("spawners", [0, 1], ids=["in-process", "spawner"])
def test_signals_nrmd_ignores_reach_the_task(spawners):
    """nrmd started with `nrmd &` from a script or under nohup ignores
    SIGINT, SIGQUIT or SIGHUP; its tasks must not inherit that: a task
    with default dispositions dies of the client's Ctrl-C and of a hangup."""
    d = DaemonProcess("--hw", "emulated", "--spawners", str(spawners), wrapper=IGNORING).start()
    try:
        check_ctrl_c_reaches_the_task(d, BASIC)
        for sig in (signal.SIGINT, signal.SIGHUP):
            p = d.popen_cli("run", BASIC, "sh", "-c", "echo ready; exec sleep 60",
                            stdout=subprocess.PIPE)
            assert p.stdout.readline() == b"ready\n"
            p.send_signal(sig)
            p.communicate(timeout=10)
            assert p.returncode == 128 + sig, (sig, p.returncode)
        r = d.cli("run", BASIC, "sh", "-c", "grep -E '^Sig(Ign|Cgt)' /proc/self/status")
        ignored = int(r.stdout.split(b"SigIgn:\t")[1].split()[0], 16)
        # glibc reserves signals 32 and 33 (its own cancellation and set*id
        # broadcast: no sigaction can touch them, and every program's libc
        # takes them over); every signal a program can meet starts at default
        assert ignored & ~((1 << 31) | (1 << 32)) == 0, r.stdout
    finally:
        assert d.stop() == 0
