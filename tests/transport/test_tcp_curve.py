"""TCP endpoints with CurveZMQ, end to end through a real nrmd.

Remote clients are real `nrm` processes (and raw zmq sockets for the clients
nrm itself would never build) on 127.0.0.1: an authorized key acts as the
Unix user the users file maps it to, anything else gets nothing.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile

import pytest
import zmq

from nrm import protocol

from nrm.transport import curve
from tests.conftest import EXAMPLES, needs_root
from nrm.tools.localnrmd import nrm_argv, nrmd_argv
from tests.nrmd import DaemonProcess, wait_for

BASIC = os.path.join(EXAMPLES, "basic.yml")
NOBODY_UID = 65534

pytestmark = needs_root()


def _free_port_pair() -> int:
    """PORT with PORT+1 also free (nrmd binds both)."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            if port >= 65534:
                continue
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return port
    raise RuntimeError("no free port pair")


@pytest.fixture(scope="module")
def keys():
    d = tempfile.mkdtemp(prefix="nrmk-", dir="/tmp")
    for name in ("server", "alice", "stranger"):
        curve.write_keypair(os.path.join(d, name))
    alice = curve.load_public_key(os.path.join(d, "alice.pub")).decode()
    with open(os.path.join(d, "users"), "w") as f:
        f.write(f"# remote users\n\nnobody {alice}\n")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def tcpd(keys):
    port = _free_port_pair()
    d = DaemonProcess("--hw", "emulated", "--sensor-period", "0.1", "--tcp", str(port),
                      "--curve-secret-key", os.path.join(keys, "server"),
                      "--curve-users", os.path.join(keys, "users")).start()
    d.port = port
    yield d
    rc = d.stop()
    assert rc == 0, d.log()
    shutil.rmtree(d.rundir, ignore_errors=True)


def remote_env(d, keys, key="alice"):
    return {"NRM_URI": f"tcp://127.0.0.1:{d.port}",
            "NRM_CURVE_SERVER_KEY": os.path.join(keys, "server.pub"),
            "NRM_CURVE_KEY": os.path.join(keys, key)}


def remote(d, keys, *args, key="alice", **kwargs):
    return d.cli(*args, env=remote_env(d, keys, key), cwd="/tmp", **kwargs)


def local_containers(d):
    out = d.cli("list", "--json")
    assert out.returncode == 0, out.stderr
    return {c["id"]: c for c in json.loads(out.stdout)}


def test_authorized_key_runs_as_mapped_user(tcpd, keys):
    r = remote(tcpd, keys, "run", BASIC, "sh", "-c", "id -u; printf err >&2; exit 3")
    assert r.returncode == 3, r.stderr
    assert r.stdout.decode().strip() == str(NOBODY_UID)
    assert r.stderr == b"err"
    assert "authenticated as nobody" in tcpd.log()


def test_output_streams_back_byte_exact(tcpd, keys):
    script = "import sys; sys.stdout.buffer.write(bytes(range(256)) * 1000)"
    r = remote(tcpd, keys, "run", BASIC, "python3", "-c", script)
    assert r.returncode == 0, r.stderr
    assert r.stdout == bytes(range(256)) * 1000


def test_listen_over_tcp_sees_events(tcpd, keys):
    r = remote(tcpd, keys, "listen", "--json", "--topic", "power", "-n", "2", timeout=30)
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stdout.decode().splitlines()]
    assert len(events) == 2 and all(e["topic"] == "power" for e in events)

    listener = tcpd.popen_cli("listen", "--json", "--topic", "task", "-n", "1",
                              env=remote_env(tcpd, keys), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)

    def task_seen():
        r = remote(tcpd, keys, "run", BASIC, "true")
        assert r.returncode == 0, r.stderr
        try:
            listener.wait(1.0)
        except subprocess.TimeoutExpired:
            return False
        return True

    try:
        # the subscription completes asynchronously: keep starting tasks until seen
        wait_for(task_seen, timeout=60)
        out, err = listener.communicate()
        assert listener.returncode == 0, err
        event = json.loads(out)
        assert event["topic"] == "task" and event["event"] in ("start", "exit")
    finally:
        if listener.poll() is None:
            listener.kill()
            print(listener.communicate())


def test_unknown_key_gets_no_service(tcpd, keys):
    before = set(local_containers(tcpd))
    r = remote(tcpd, keys, "run", BASIC, "touch", "/tmp/nrm-should-not-exist", key="stranger")
    err = r.stderr.decode()
    assert r.returncode == 1 and err.count("\n") == 1, err
    assert "refused this client's key" in err
    stranger = curve.load_public_key(os.path.join(keys, "stranger.pub")).decode()
    wait_for(lambda: f"key {stranger} is not in the users file" in tcpd.log())
    assert set(local_containers(tcpd)) == before


def test_wrong_server_key_is_a_clear_error(tcpd, keys):
    env = dict(remote_env(tcpd, keys), NRM_CURVE_SERVER_KEY=os.path.join(keys, "alice.pub"))
    r = tcpd.cli("status", env=env)
    assert r.returncode == 1
    assert "CURVE handshake" in r.stderr.decode() and r.stderr.count(b"\n") == 1


def test_missing_client_keys_one_line(tcpd, keys):
    env = remote_env(tcpd, keys)
    env["NRM_CURVE_KEY"] = ""
    r = tcpd.cli("list", env=env)
    assert r.returncode == 1 and r.stderr.count(b"\n") == 1
    assert b"NRM_CURVE_KEY" in r.stderr


@pytest.mark.parametrize("mechanism", ["NULL", "PLAIN"])
def test_plaintext_clients_rejected(tcpd, mechanism):
    before = _unauthenticated(tcpd)
    ctx = zmq.Context.instance()
    dealer = ctx.socket(zmq.DEALER)
    sub = ctx.socket(zmq.SUB)
    for s in (dealer, sub):
        s.linger = 0
        if mechanism == "PLAIN":
            s.plain_username, s.plain_password = b"nobody", b"secret"
    try:
        dealer.connect(f"tcp://127.0.0.1:{tcpd.port}")
        sub.connect(f"tcp://127.0.0.1:{tcpd.port + 1}")
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        dealer.send(protocol.encode(protocol.Status(id=1)))
        assert dealer.poll(1500) == 0
        assert sub.poll(1000) == 0      # power events flow every 0.1 s to real subscribers
    finally:
        dealer.close()
        sub.close()
    # the daemon sees the mechanism mismatch, or only the client hanging up on
    # it (counted for every connection; the log lines are rate-limited)
    wait_for(lambda: _unauthenticated(tcpd) > before)


def _unauthenticated(d):
    return json.loads(d.cli("status", "--json").stdout)["requests"]["unauthenticated"]


def test_garbage_on_the_port_is_harmless(tcpd, keys):
    for port in (tcpd.port, tcpd.port + 1):
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"\xff" + os.urandom(4096) + b"GET / HTTP/1.0\r\n\r\n")
    r = remote(tcpd, keys, "run", BASIC, "true")
    assert r.returncode == 0 and tcpd.proc.poll() is None, r.stderr


def test_default_bind_address_is_loopback(tcpd, keys):
    ss = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True, check=True).stdout
    listening = {line.split()[3] for line in ss.splitlines()}
    assert f"127.0.0.1:{tcpd.port}" in listening
    assert f"127.0.0.1:{tcpd.port + 1}" in listening
    assert not {f"0.0.0.0:{tcpd.port}", f"*:{tcpd.port}"} & listening
    status = json.loads(remote(tcpd, keys, "status", "--json").stdout)
    assert f"tcp://127.0.0.1:{tcpd.port}" in status["endpoints"]
    assert f"tcp://127.0.0.1:{tcpd.port + 1}" in status["endpoints"]


def test_remote_user_cannot_touch_others_containers(tcpd, keys):
    r = tcpd.cli("run", "--detach", "--container", "rootjob", BASIC, "sleep", "60")
    assert r.returncode == 0, r.stderr
    try:
        k = remote(tcpd, keys, "kill", "rootjob")
        assert k.returncode == 1 and b"belongs to uid 0" in k.stderr
        listed = json.loads(remote(tcpd, keys, "list", "--json").stdout)
        assert "rootjob" not in [c["id"] for c in listed]
        assert "rootjob" in local_containers(tcpd)
        p = remote(tcpd, keys, "setpower", "100")
        assert p.returncode == 1 and b"only root or members of the power group" in p.stderr
    finally:
        assert tcpd.cli("kill", "rootjob").returncode == 0


def test_remote_user_kills_own_container(tcpd, keys):
    r = remote(tcpd, keys, "run", "--detach", "--container", "nobodyjob", BASIC, "sleep", "60")
    assert r.returncode == 0, r.stderr
    assert local_containers(tcpd)["nobodyjob"]["uid"] == NOBODY_UID
    k = remote(tcpd, keys, "kill", "nobodyjob")
    assert k.returncode == 0, k.stderr
    wait_for(lambda: "nobodyjob" not in local_containers(tcpd))


def test_dead_remote_client_task_is_killed(tcpd, keys):
    """No pid to watch over TCP: the daemon's probe of the connection is
    what notices, even for a task that prints nothing."""
    client = tcpd.popen_cli("run", "--container", "orphan", BASIC, "sleep", "120",
                            env=remote_env(tcpd, keys), cwd="/tmp")
    try:
        wait_for(lambda: "orphan" in local_containers(tcpd))
    finally:
        client.send_signal(signal.SIGKILL)
        client.wait()
    wait_for(lambda: "orphan" not in local_containers(tcpd), timeout=20)
    assert "client of task" in tcpd.log()


# -- start-up refusals -------------------------------------------------------
def _nrmd(tmp_path, *args):
    rundir = tmp_path / "run"
    return subprocess.run(nrmd_argv() + ["--runtime-dir", str(rundir), "--hw", "emulated",
                                         "--seed-downstream", "none", *args],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)


def _bad_setup(tmp_path, keys, case):
    server, users = os.path.join(keys, "server"), os.path.join(keys, "users")
    bad = str(tmp_path / "bad")
    if case == "missing secret key":
        return ["--curve-secret-key", str(tmp_path / "nope"), "--curve-users", users], "nope"
    if case == "world-readable secret key":
        shutil.copy(server, bad)
        os.chmod(bad, 0o644)
        return ["--curve-secret-key", bad, "--curve-users", users], "chmod 600"
    if case == "garbage secret key":
        with open(os.open(bad, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write("secret-key = not-a-key\n")
        return ["--curve-secret-key", bad, "--curve-users", users], "Z85"
    if case == "mismatched keypair":
        other = curve.load_keypair(os.path.join(keys, "alice"))
        with open(os.open(bad, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write(f"public-key = {other.public.decode()}\n")
            f.write(f"secret-key = {curve.load_keypair(server).secret.decode()}\n")
        return ["--curve-secret-key", bad, "--curve-users", users], "does not match"
    if case == "public key given as secret":
        return ["--curve-secret-key", server + ".pub", "--curve-users", users], "no secret-key"
    if case == "unknown user":
        with open(bad, "w") as f:
            f.write(f"no-such-user-xyz {curve.load_public_key(server + '.pub').decode()}\n")
        return ["--curve-secret-key", server, "--curve-users", bad], "no local user"
    if case == "ill-formed users line":
        with open(bad, "w") as f:
            f.write("nobody\n")
        return ["--curve-secret-key", server, "--curve-users", bad], "USER PUBLIC-KEY"
    if case == "world-writable users file":
        shutil.copy(users, bad)
        os.chmod(bad, 0o666)
        return ["--curve-secret-key", server, "--curve-users", bad], "go-w"
    if case == "users file is a FIFO":
        os.mkfifo(bad, 0o600)   # opening it for reading would block nrmd's start
        return ["--curve-secret-key", server, "--curve-users", bad], "not a regular file"
    if case == "no keys at all":
        return [], "--curve-secret-key"
    raise AssertionError(case)


@pytest.mark.parametrize("case", [
    "missing secret key", "world-readable secret key", "garbage secret key",
    "mismatched keypair", "public key given as secret", "unknown user",
    "ill-formed users line", "world-writable users file", "users file is a FIFO",
    "no keys at all"])
def test_bad_key_files_refuse_start(tmp_path, keys, case):
    args, needle = _bad_setup(tmp_path, keys, case)
    r = _nrmd(tmp_path, "--tcp", str(_free_port_pair()), *args)
    assert r.returncode != 0
    assert r.stderr.count("\n") == 1 and needle in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_keys_without_tcp_refused(tmp_path, keys):
    r = _nrmd(tmp_path, "--curve-users", os.path.join(keys, "users"))
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "--tcp" in r.stderr


def test_port_in_use_refused(tmp_path, keys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = _nrmd(tmp_path, "--tcp", str(port),
                  "--curve-secret-key", os.path.join(keys, "server"),
                  "--curve-users", os.path.join(keys, "users"))
    assert r.returncode != 0 and "cannot open the upstream endpoints" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_keygen(tmp_path):
    path = tmp_path / "me"
    r = subprocess.run(nrm_argv() + ["keygen", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert os.stat(f"{path}.pub").st_mode & 0o777 == 0o644
    pair = curve.load_keypair(str(path))
    assert curve.load_public_key(f"{path}.pub") == pair.public
    assert pair.public.decode() in r.stdout
    again = subprocess.run(nrm_argv() + ["keygen", str(path)], capture_output=True, text=True)
    assert again.returncode == 1 and "already exists" in again.stderr
    assert curve.load_keypair(str(path)) == pair
    forced = subprocess.run(nrm_argv() + ["keygen", "--force", str(path)],
                            capture_output=True, text=True)
    assert forced.returncode == 0 and curve.load_keypair(str(path)) != pair
