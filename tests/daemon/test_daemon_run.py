"""End to end through a real nrmd: `nrm run` semantics users rely on."""

import hashlib
import json
import os
import subprocess
import sys
import time

import pytest
import zmq

from nrm import paths, protocol
from tests.conftest import EXAMPLES, needs_root
from tests.nrmd import (DaemonProcess, check_client_death_kills_the_task,
                        check_ctrl_c_reaches_the_task, wait_for, wait_subscribed)

BASIC = os.path.join(EXAMPLES, "basic.yml")
PY = sys.executable


def containers(daemon):
    out = daemon.cli("list", "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.parametrize("cmd,status", [
    (["true"], 0),
    (["sh", "-c", "exit 3"], 3),
    (["sh", "-c", "kill -SEGV $$"], 139),
    (["sh", "-c", "kill -TERM $$"], 143),
])
def test_exit_status(daemon, cmd, status):
    r = daemon.cli("run", BASIC, *cmd)
    assert r.returncode == status, r.stderr


def test_exec_failure_is_one_line(daemon):
    r = daemon.cli("run", BASIC, "/no/such/program")
    assert r.returncode == 127
    err = r.stderr.decode()
    assert err.count("\n") == 1 and "No such file" in err and "Traceback" not in err


def test_output_is_byte_exact(daemon):
    script = "import sys; sys.stdout.buffer.write(bytes(range(256))*3); " \
             "sys.stderr.buffer.write(b'\\x00err-no-newline')"
    r = daemon.cli("run", BASIC, PY, "-c", script)
    assert r.returncode == 0
    assert r.stdout == bytes(range(256)) * 3
    assert r.stderr == b"\x00err-no-newline"


def test_large_output(daemon):
    script = ("import sys, hashlib, os\n"
              "data = b''.join(hashlib.sha256(str(i).encode()).digest() for i in range(200000))\n"
              "sys.stdout.buffer.write(data)\n")
    r = daemon.cli("run", BASIC, PY, "-c", script)
    expected = b"".join(hashlib.sha256(str(i).encode()).digest() for i in range(200000))
    assert r.returncode == 0
    assert len(r.stdout) == len(expected) and r.stdout == expected


def test_env_and_cwd_forwarded(daemon, tmp_path):
    r = daemon.cli("run", BASIC, "sh", "-c", 'printf "%s %s" "$FOO" "$(pwd)"',
                   env={"FOO": "bar baz"}, cwd=str(tmp_path))
    assert r.stdout.decode() == f"bar baz {tmp_path}"


def test_task_environment(daemon):
    r = daemon.cli("run", BASIC, "sh", "-c",
                   'echo "$NRM_CONTAINER_ID $ARGO_CONTAINER_UUID $AC_APP_NAME $NRM_DOWNSTREAM_URI"')
    cid, argo, name, uri = r.stdout.decode().split()
    assert cid == argo and name == "basic" and uri == paths.downstream_uri(daemon.rundir)


def test_ctrl_c_reaches_the_task(daemon):
    check_ctrl_c_reaches_the_task(daemon, BASIC)


def test_client_death_kills_task(daemon):
    check_client_death_kills_the_task(daemon, BASIC)


def _is_zombie(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_detach_list_and_kill(daemon):
    r = daemon.cli("run", "--detach", "--container", "bg", BASIC, "sleep", "600")
    assert r.returncode == 0
    cid, task = r.stdout.decode().split()
    assert cid == "bg"
    listed = [c for c in containers(daemon) if c["id"] == "bg"]
    assert listed and listed[0]["tasks"][0]["id"] == task
    k = daemon.cli("kill", "bg")
    assert k.returncode == 0 and b"1 tasks" in k.stdout
    wait_for(lambda: not [c for c in containers(daemon) if c["id"] == "bg"])
    assert daemon.cli("kill", "bg").returncode == 1


def test_listen_sees_task_events(daemon):
    p = daemon.popen_cli("listen", "--json", "--topic", "task", "-n", "2",
                         stdout=subprocess.PIPE)
    wait_subscribed(daemon, "task")
    assert daemon.cli("run", BASIC, "true").returncode == 0
    out, _ = p.communicate(timeout=10)
    events = [json.loads(line) for line in out.decode().splitlines()]
    assert [e["event"] for e in events] == ["start", "exit"]
    assert all(e["topic"] == "task" for e in events)


def test_container_sharing(daemon):
    script = "grep Cpus_allowed_list /proc/self/status; echo $NRM_CONTAINER_ID; sleep 1"
    procs = [daemon.popen_cli("run", "--container", "shared", BASIC, "sh", "-c", script,
                              stdout=subprocess.PIPE) for _ in range(2)]
    outs = [p.communicate(timeout=20)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs[0] == outs[1]
    assert outs[0].split()[-1] == "shared"


def test_slices_are_disjoint(daemon):
    script = "grep -E 'Cpus_allowed_list|Mems_allowed_list' /proc/self/status; sleep 1"
    procs = [daemon.popen_cli("run", BASIC, "sh", "-c", script, stdout=subprocess.PIPE)
             for _ in range(2)]
    outs = [p.communicate(timeout=20)[0].decode() for p in procs]
    cpus = [o.split("Cpus_allowed_list:")[1].split()[0] for o in outs]
    assert len(set(cpus)) == 2, outs
    assert all(o.split("Mems_allowed_list:")[1].split()[0] == "0" for o in outs)


@needs_root()
def test_task_is_in_its_cgroup_before_exec(daemon):
    r = daemon.cli("run", "-v", BASIC, "cat", "/proc/self/cgroup")
    lines = r.stdout.decode().splitlines()
    cpuset = [line for line in lines if ":cpuset:" in line][0]
    assert "/nrm." in cpuset
    status = daemon.cli("status", "--json")
    assert json.loads(status.stdout)["runtime"]["name"] == "cgroup"


def test_oversize_slice_rejected(daemon, tmp_path):
    m = tmp_path / "big.yml"
    m.write_text("name: big\napp:\n  slice: {cpus: 4096, mems: 1}\n")
    r = daemon.cli("run", str(m), "true")
    assert r.returncode == 1
    assert b"4096 cpus" in r.stderr and b"Traceback" not in r.stderr


def test_busy_slice_fails_or_waits(daemon, tmp_path):
    full = tmp_path / "full.yml"
    ncpus = json.loads(daemon.cli("status", "--json").stdout)["resources"]["cpus"]
    full.write_text(f"name: full\napp:\n  slice: {{cpus: {ncpus}, mems: 1}}\n")
    assert daemon.cli("run", "-d", "--container", "hog", str(full), "sleep", "600").returncode == 0
    r = daemon.cli("run", BASIC, "true")
    assert r.returncode == 1 and b"does not fit now" in r.stderr
    waiter = daemon.popen_cli("run", "--wait", BASIC, "echo", "ran", stdout=subprocess.PIPE)
    time.sleep(0.3)
    assert waiter.poll() is None
    assert daemon.cli("kill", "hog").returncode == 0
    out, _ = waiter.communicate(timeout=10)
    assert out == b"ran\n" and waiter.returncode == 0


def test_a_waiter_that_gives_up_is_never_run(daemon, tmp_path):
    full = tmp_path / "full.yml"
    ncpus = json.loads(daemon.cli("status", "--json").stdout)["resources"]["cpus"]
    full.write_text(f"name: full\napp:\n  slice: {{cpus: {ncpus}, mems: 1}}\n")
    assert daemon.cli("run", "-d", "--container", "hog2", str(full), "sleep", "600").returncode == 0
    marker = tmp_path / "ran"
    waiter = daemon.popen_cli("run", "--wait", BASIC, "touch", str(marker))
    wait_for(lambda: json.loads(daemon.cli("status", "--json").stdout)["waiting"] == 1)
    waiter.kill()
    waiter.wait()
    assert daemon.cli("kill", "hog2").returncode == 0
    wait_for(lambda: json.loads(daemon.cli("status", "--json").stdout)["waiting"] == 0)
    assert daemon.cli("run", BASIC, "true").returncode == 0     # the queue moved on
    assert not marker.exists()


def test_oversubscribe_on_request(daemon, tmp_path):
    full = tmp_path / "full.yml"
    ncpus = json.loads(daemon.cli("status", "--json").stdout)["resources"]["cpus"]
    full.write_text(f"name: full\napp:\n  slice: {{cpus: {ncpus}, mems: 1}}\n")
    assert daemon.cli("run", "-d", "--container", "hog2", str(full), "sleep", "600").returncode == 0
    try:
        r = daemon.cli("run", "--oversubscribe", BASIC, "echo", "shared")
        assert r.returncode == 0 and r.stdout == b"shared\n"
    finally:
        daemon.cli("kill", "hog2")


def test_manifest_errors_name_the_field(daemon, tmp_path):
    m = tmp_path / "bad.yml"
    m.write_text("name: bad\napp:\n  slice: {cpus: x, mems: 1}\n")
    r = daemon.cli("run", str(m), "true")
    assert r.returncode == 1
    assert b"app.slice.cpus" in r.stderr and b"'x'" in r.stderr


def test_relative_manifest_resolves_against_client_cwd(daemon):
    r = daemon.cli("run", "basic.yml", "true", cwd=EXAMPLES)
    assert r.returncode == 0, r.stderr


def test_garbage_on_the_upstream_socket(daemon):
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    s.connect(paths.upstream_uri(daemon.rundir))
    cases = [b"", b"\x00\xff\xfe", b"{}", b"[1,2,3]", b'{"type":"nope"}',
             b'{"type":"run","v":99}', b'{"type":"run","argv":"notalist"}',
             b'{"type":"kill","container":"nobody-here"}', b"x" * (2 << 20)]
    codes = []
    for payload in cases:
        s.send(payload)
        if s.poll(5000):
            codes.append(protocol.decode_reply(s.recv_multipart()[0]).code)
        else:
            codes.append(None)
    s.send_multipart([b"{}", b"extra frame"])
    assert s.poll(5000)
    codes.append(protocol.decode_reply(s.recv_multipart()[0]).code)
    s.close()
    assert codes[:8] == ["malformed", "malformed", "invalid", "invalid", "invalid", "version",
                         "invalid", "not_found"]
    # the oversized message exceeds the socket's max size: the connection is
    # dropped, so there is no reply; the daemon is fine
    assert codes[8] is None
    assert codes[9] == "malformed"
    assert daemon.cli("status").returncode == 0


@needs_root()
def test_task_runs_as_the_requesting_user(daemon, tmp_path):
    os.chmod(str(tmp_path), 0o755)
    r = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
         PY, "-m", "nrm.cli.main", "run", BASIC, "sh", "-c", "id -u; id -g"],
        capture_output=True, env=daemon.env, cwd="/tmp", timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [b"65534", b"65534"]


@needs_root()
def test_other_users_cannot_kill(daemon):
    assert daemon.cli("run", "-d", "--container", "rootjob", BASIC, "sleep", "600").returncode == 0
    try:
        r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                            PY, "-m", "nrm.cli.main", "kill", "rootjob"],
                           capture_output=True, env=daemon.env, cwd="/tmp", timeout=30)
        assert r.returncode == 1 and b"belongs to uid 0" in r.stderr
        listed = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                 PY, "-m", "nrm.cli.main", "list", "--json"],
                                capture_output=True, env=daemon.env, cwd="/tmp", timeout=30)
        assert json.loads(listed.stdout) == []
    finally:
        daemon.cli("kill", "rootjob")


def test_second_daemon_refuses(daemon):
    r = subprocess.run([PY, "-m", "nrm.daemon.main", "--runtime-dir", daemon.rundir,
                        "--seed-downstream", "none"], capture_output=True, timeout=30)
    assert r.returncode == 1
    assert f"another nrmd (pid {daemon.proc.pid}) is running" in r.stderr.decode()
    assert daemon.cli("status").returncode == 0


def test_sigterm_kills_tasks_and_cleans_up():
    d = DaemonProcess("--hw", "emulated").start()
    r = d.cli("run", "-d", BASIC, "sleep", "600")
    assert r.returncode == 0
    pid = containers(d)[0]["tasks"][0]["pid"]
    assert d.stop() == 0
    assert not os.path.exists(f"/proc/{pid}") or _is_zombie(pid)
    for name in ("upstream", "events", "downstream", "nrmd.pid"):
        assert not os.path.exists(os.path.join(d.rundir, name))


def test_no_daemon_is_a_clear_error(tmp_path):
    r = subprocess.run([PY, "-m", "nrm.cli.main", "--runtime-dir", str(tmp_path), "status"],
                       capture_output=True)
    assert r.returncode == 1
    assert r.stderr.decode().startswith("nrm: nrmd is not running")


def test_a_request_over_the_limit_says_so(daemon):
    """nrmd drops a peer that sends more than 1 MiB: the client tells the
    user what is too large and the limit, not that the connection was lost."""
    big = {f"BIG{i}": "x" * 100_000 for i in range(12)}
    r = daemon.cli("run", BASIC, "true", env=big)
    assert r.returncode != 0
    (line,) = r.stderr.decode().strip().splitlines()
    assert "request too large: 1.1 MiB" in line and "at most 1 MiB" in line, line
    assert daemon.cli("run", BASIC, "true").returncode == 0


@pytest.mark.parametrize("args, message", [
    (["--timeout", "0", "status"], b"expected a positive number of seconds"),
    (["--timeout", "-1", "status"], b"expected a positive number of seconds"),
    (["run", BASIC], b"no command given"),
    (["run", BASIC, ""], b"no command given"),
])
def test_cli_edges_are_one_clear_line(daemon, args, message):
    r = daemon.cli(*args)
    assert r.returncode != 0
    assert message in r.stderr and b"Traceback" not in r.stderr, r.stderr
    assert b"required: CMD, ARGS" not in r.stderr     # ARGS is optional


def test_an_unwritable_profile_path_is_refused_before_the_task_runs(daemon, tmp_path):
    marker = tmp_path / "ran"
    r = daemon.cli("run", "--profile-json", str(tmp_path / "missing" / "p.json"), BASIC,
                   "touch", str(marker))
    assert r.returncode == 1
    assert r.stderr.decode().strip().endswith("No such file or directory"), r.stderr
    assert not marker.exists()


def test_a_fifo_manifest_nobody_writes_is_an_error_not_a_hang(daemon, tmp_path):
    fifo = tmp_path / "manifest"
    os.mkfifo(fifo)
    r = daemon.cli("run", str(fifo), "true", timeout=30)
    assert r.returncode == 1
    (line,) = r.stderr.decode().strip().splitlines()
    assert "nothing was written to this FIFO" in line, line
    with open(BASIC, "rb") as f:    # through a pipe, as <(...) gives it
        r = daemon.cli("run", "/dev/stdin", "echo", "piped", input=f.read())
    assert r.returncode == 0 and r.stdout == b"piped\n", r.stderr


def test_a_client_that_pipelines_requests_gets_every_reply(daemon):
    """Output is bounded per connection by pausing tasks; a client that sends
    many requests before it reads gets every reply all the same (they wait
    in a bounded backlog), not only the first few the socket can hold."""
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.linger = 0
    s.rcvhwm = 4            # a slow reader: nothing piles up on this side
    s.connect(paths.upstream_uri(daemon.rundir))
    try:
        n = 600
        for i in range(n):
            s.send(protocol.encode(protocol.ListContainers(id=i + 1)))
        time.sleep(1.0)        # the replies pile up while nobody reads
        got = set()
        while len(got) < n and s.poll(10000):
            got.add(protocol.decode_reply(s.recv()).id)
        assert got == set(range(1, n + 1)), f"{n - len(got)} replies lost"
    finally:
        s.close()
