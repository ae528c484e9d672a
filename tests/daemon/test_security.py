"""Who may do what: permissions on the runtime dir, and downstream senders
that lie about their container."""

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time

import pytest

from nrm import protocol
from nrm.downstream import Client as Reporter
from tests.conftest import EXAMPLES, needs_root
from tests.nrmd import DaemonProcess, wait_for, wait_subscribed

BASIC = os.path.join(EXAMPLES, "basic.yml")
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def _downstream(daemon):
    return json.loads(daemon.cli("status", "--json").stdout)["downstream"]


@needs_root()
def test_runtime_dir_permissions(daemon):
    r = daemon.rundir
    assert _mode(r) == 0o755
    wait_for(lambda: os.path.exists(os.path.join(r, "seed")))    # bound by the ingest task
    # every user submits work and reports progress: identity comes from the
    # kernel (SO_PEERCRED via ZAP), not from who may open the socket
    for name in ("upstream", "events", "downstream", "seed"):
        assert _mode(os.path.join(r, name)) == 0o666, name
    assert _mode(os.path.join(r, "nrmd.pid")) == 0o644
    assert _mode(os.path.join(r, "state.log")) == 0o600


@needs_root()
def test_an_unprivileged_task_reports_downstream(daemon):
    """A root daemon's downstream socket must take a user's libnrm program."""
    where = tempfile.mkdtemp(prefix="nrmt-user-")
    os.chmod(where, 0o755)
    exe = os.path.join(where, "progress")
    lib = os.path.join(sys.prefix, "lib")
    subprocess.run(["cc", "-o", str(exe), os.path.join(EXAMPLES, "progress.c"),
                    "-I" + os.path.join(sys.prefix, "include"), "-L" + lib, "-lnrm",
                    "-Wl,-rpath," + lib], check=True)
    listen = daemon.popen_cli("listen", "--json", "--topic", "progress", "-n", "1",
                              stdout=subprocess.PIPE)
    wait_subscribed(daemon, "progress")
    r = subprocess.run(NOBODY + [sys.executable, "-m", "nrm.cli.main", "run", BASIC,
                                 str(exe), "300", "200000"],
                       env=dict(daemon.env, PYTHONPATH=os.getcwd()), cwd="/",
                       capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr
    out, _ = listen.communicate(timeout=10)
    assert json.loads(out)["topic"] == "progress"
    assert _downstream(daemon)["rejected"]["foreign_sender"] == 0
    shutil.rmtree(where)


def test_a_process_cannot_speak_for_another_container(daemon):
    """Claiming a container id is not enough: the sender must be one of its
    processes (checked through the kernel-reported pid)."""
    p = daemon.popen_cli("run", "--container", "victim", BASIC, "sleep", "30")
    try:
        wait_for(lambda: any(c["id"] == "victim" for c in json.loads(
            daemon.cli("list", "--json").stdout)))
        before = _downstream(daemon)["rejected"]["foreign_sender"]
        liar = Reporter("liar", uri=protocol_uri(daemon), container="victim", task="x",
                        ratelimit=0)
        for _ in range(10):
            liar.phase_context(0, 1, 2)
        liar.close()
        wait_for(lambda: _downstream(daemon)["rejected"]["foreign_sender"] >= before + 12)
        time.sleep(0.2)
        # start, 10 phase contexts, exit: all refused
        assert _downstream(daemon)["rejected"]["foreign_sender"] == before + 12
    finally:
        daemon.cli("kill", "victim")
        p.wait(timeout=10)


def protocol_uri(daemon):
    from nrm import paths
    assert protocol.PROTOCOL_VERSION
    return paths.downstream_uri(daemon.rundir)


def test_container_names_are_plain(daemon):
    for bad in ("../x", "a/b", "x" * 129, "-rf", ".hidden", "sp ace", "new\nline"):
        r = daemon.cli("run", f"--container={bad}", BASIC, "true")
        assert r.returncode != 0 and b"container name" in r.stderr, bad
    assert daemon.cli("run", "--container", "slurm-12.0", BASIC, "true").returncode == 0


def test_downstream_integers_wider_than_64_bits_are_malformed(daemon):
    import zmq
    from nrm import paths
    before = _downstream(daemon)["downstream"]["dropped_malformed"]
    sock = zmq.Context.instance().socket(zmq.PUSH)
    sock.linger = 1000
    sock.connect(paths.downstream_uri(daemon.rundir))
    sock.send(b'{"type":"phase_context","container":"c","cpu":' + b"9" * 30 + b"}")
    sock.close()
    wait_for(lambda: _downstream(daemon)["downstream"]["dropped_malformed"] == before + 1)


class _FakeNrmd:
    """A ROUTER on ``<rundir>/upstream`` that counts what reaches it: an
    impostor's view of a client."""

    def __init__(self, rundir, owner):
        import zmq
        os.makedirs(rundir, exist_ok=True)
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        self.sock.bind("ipc://" + os.path.join(rundir, "upstream"))
        for path in (rundir, os.path.join(rundir, "upstream")):
            os.chown(path, owner, owner)
            os.chmod(path, 0o777 if path.endswith("upstream") else 0o755)

    def received(self) -> bool:
        import zmq
        return bool(self.sock.poll(500, zmq.POLLIN))

    def close(self):
        self.sock.close()
        self.ctx.term()


def _client(argv, uid=None, **env):
    clean = {k: v for k, v in os.environ.items()
             if k not in ("XDG_RUNTIME_DIR", "NRM_RUNTIME_DIR", "SLURMD_NODENAME")}
    clean.update(env, PYTHONPATH=os.getcwd())
    prefix = [] if uid is None else ["setpriv", f"--reuid={uid}", f"--regid={uid}",
                                     "--clear-groups"]
    return subprocess.run(prefix + [sys.executable, "-m", "nrm.cli.main", "--timeout", "2"]
                          + argv, env=clean, cwd="/", capture_output=True, text=True,
                          timeout=30)


@needs_root()
def test_a_runtime_dir_owned_by_another_user_is_refused(tmp_path):
    """Another user's dir could hold an impostor that would receive the
    caller's environment: the client says why in one line and sends nothing."""
    rundir = str(tmp_path / "theirs")
    os.chmod(tmp_path, 0o755)
    fake = _FakeNrmd(rundir, 65534)
    try:
        r = _client(["--runtime-dir", rundir, "run", BASIC, "true"], SECRET="s3cret")
        assert r.returncode != 0
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1, r.stderr
        assert "refusing" in lines[0] and "uid 65534" in lines[0], lines[0]
        assert not fake.received()
    finally:
        fake.close()


@needs_root()
def test_a_squatted_tmp_runtime_dir_is_refused_and_an_own_one_is_used():
    """Without XDG_RUNTIME_DIR a client falls back to /tmp/nrm-<uid>, which
    any user can create first. As uid 1 (daemon): refused when nobody made
    it, used when uid 1 did."""
    if os.path.exists("/run/nrm/upstream"):
        pytest.skip("a system nrmd serves /run/nrm: clients prefer it")
    uid = 1
    rundir = f"/tmp/nrm-{uid}"
    shutil.rmtree(rundir, ignore_errors=True)
    fake = _FakeNrmd(rundir, 65534)
    try:
        r = _client(["status"], uid=uid)
        assert r.returncode != 0
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "refusing" in r.stderr and rundir in r.stderr, r.stderr
        assert not fake.received()
    finally:
        fake.close()
        shutil.rmtree(rundir, ignore_errors=True)
    fake = _FakeNrmd(rundir, uid)
    try:
        r = _client(["status"], uid=uid)
        assert fake.received(), r.stderr
    finally:
        fake.close()
        shutil.rmtree(rundir, ignore_errors=True)


def _rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


FLOOD_BYTES = 64 << 20


def test_stopped_clients_cannot_grow_nrmd(tmp_path):
    """Two clients stopped under a flood of output: nrmd's queue per
    connection is bounded in bytes, so its RSS stays small while the tasks
    block on their pipes; once the clients continue, every byte arrives."""
    d = DaemonProcess("--hw", "emulated").start()
    try:
        clients = []
        for i in range(2):
            out = open(tmp_path / f"out{i}", "wb")
            p = d.popen_cli("run", BASIC, "sh", "-c", f"yes line | head -c {FLOOD_BYTES}",
                            stdout=out)
            clients.append((p, out))
        for i, (p, _) in enumerate(clients):
            wait_for(lambda: os.path.getsize(tmp_path / f"out{i}") > 0)
            p.send_signal(signal.SIGSTOP)
        peak = 0.0
        for _ in range(30):      # the flood, paused or not, for three seconds
            peak = max(peak, _rss_mb(d.proc.pid))
            time.sleep(0.1)
        for p, _ in clients:
            p.send_signal(signal.SIGCONT)
        for i, (p, out) in enumerate(clients):
            assert p.wait(timeout=120) == 0
            out.close()
            assert os.path.getsize(tmp_path / f"out{i}") == FLOOD_BYTES
            with open(tmp_path / f"out{i}", "rb") as f:
                assert f.read() == (b"line\n" * (FLOOD_BYTES // 5 + 1))[:FLOOD_BYTES]
        assert peak < 60, f"nrmd grew to {peak:.0f} MB"
    finally:
        d.stop()
        shutil.rmtree(d.rundir, ignore_errors=True)


@needs_root()
def test_a_squatted_seed_path_is_reported_and_downstream_still_works(tmp_path):
    """Any user can create the seed-era path before nrmd starts: nrmd says
    so in one log line and in `nrm status`, and the current downstream
    endpoint keeps serving."""
    os.chmod(tmp_path, 0o755)
    squat = tmp_path / "seed"
    squat.mkdir()
    os.chown(squat, 65534, 65534)
    d = DaemonProcess("--hw", "emulated")
    d.seed_uri = f"ipc://{squat}"
    d.start()
    try:
        wait_for(lambda: "endpoint off" in d.log())
        status = json.loads(d.cli("status", "--json").stdout)
        assert "seed" in status["downstream_failures"], status["downstream_failures"]
        assert "downstream" in status["downstream"]
        plain = d.cli("status").stdout.decode()
        assert "seed:" in plain and "NOT LISTENING" in plain, plain
        assert "Traceback" not in d.log()
        assert len([line for line in d.log().splitlines() if "endpoint off" in line]) == 1
        import zmq
        sock = zmq.Context.instance().socket(zmq.PUSH)   # the current endpoint serves
        sock.linger = 1000
        sock.connect(protocol_uri(d))
        sock.send(b"not json")
        sock.close()
        wait_for(lambda: _downstream(d)["downstream"]["dropped_malformed"] == 1)
    finally:
        d.stop()
        shutil.rmtree(d.rundir, ignore_errors=True)


@needs_root()
def test_command_lines_are_seen_by_their_owner_and_root_only(daemon):
    """Events reach every listener, so they carry no argv (as the HTTP state);
    `nrm list` shows a task's argv to its owner and to root."""
    env = dict(daemon.env, PYTHONPATH=os.getcwd())
    listen = subprocess.Popen(NOBODY + [sys.executable, "-m", "nrm.cli.main", "listen", "--json",
                                        "--topic", "task", "-n", "1"],
                              env=env, cwd="/", stdout=subprocess.PIPE)
    wait_subscribed(daemon, "task")
    p = daemon.popen_cli("run", "--container", "secretive", BASIC, "sleep", "601",
                         stdout=subprocess.PIPE)
    try:
        out, _ = listen.communicate(timeout=10)
        (event,) = [json.loads(line) for line in out.decode().splitlines()]
        assert event["event"] == "start" and "argv" not in event, event
        assert not any("601" in str(v) for k, v in event.items() if k not in ("pid", "time"))

        def tasks(prefix):
            r = subprocess.run(prefix + [sys.executable, "-m", "nrm.cli.main", "list", "--json"],
                               env=env, cwd="/", capture_output=True, timeout=30)
            return [t for c in json.loads(r.stdout) if c["id"] == "secretive" for t in c["tasks"]]
        wait_for(lambda: tasks([]))
        assert tasks([])[0]["argv"] == ["sleep", "601"]
        assert tasks(NOBODY) == []
    finally:
        daemon.cli("kill", "secretive")
        p.wait(timeout=10)


@needs_root()
def test_a_client_prefers_the_system_daemon():
    """Where a system nrmd serves, an unprivileged client without
    NRM_RUNTIME_DIR talks to it, not to a /tmp/nrm-<uid> someone made."""
    uid = 1
    system = tempfile.mkdtemp(prefix="nrmt-system-")
    os.chmod(system, 0o755)
    own = f"/tmp/nrm-{uid}"
    shutil.rmtree(own, ignore_errors=True)
    fakes = [_FakeNrmd(str(system), 0), _FakeNrmd(own, uid)]
    try:
        code = ("from nrm import paths; paths.SYSTEM_RUNTIME_DIR = %r; "
                "print(paths.runtime_dir())" % str(system))
        clean = {k: v for k, v in os.environ.items()
                 if k not in ("XDG_RUNTIME_DIR", "NRM_RUNTIME_DIR", "SLURMD_NODENAME")}
        r = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                            sys.executable, "-c", code], env=dict(clean, PYTHONPATH=os.getcwd()),
                           cwd="/", capture_output=True, text=True, timeout=30)
        assert r.stdout.strip() == str(system), r.stderr
    finally:
        for fake in fakes:
            fake.close()
        shutil.rmtree(own, ignore_errors=True)
        shutil.rmtree(system, ignore_errors=True)
