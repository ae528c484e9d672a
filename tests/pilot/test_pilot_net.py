"""nrm pilot --net: a QCG script drives a real pilot over TCP (CurveZMQ),
against a real nrmd; keys the owner did not authorize are refused, bad input
is answered with an error, and the pilot keeps serving through all of it."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import socket
import subprocess
import sys
import textwrap

import pytest
import zmq

from nrm.pilot import qcg
from nrm.transport import curve
from tests.nrmd import REPO, DaemonProcess, wait_for

# QCG's own style: Manager(address) on a running service; only the imports change
QCG_SCRIPT = textwrap.dedent('''
    import sys
    from qcg.pilotjob.api.manager import Manager
    from qcg.pilotjob.api.job import Jobs

    manager = Manager(sys.argv[1])
    print('resources:', manager.resources())
    jobs = Jobs().add(script='echo "job ${it}"', stdout='job.out.${it}', iteration=3)
    jobs.add(name='sum', exec='/bin/sh', args=['-c', 'cat job.out.* > all.out'],
             after=jobs.job_names()[0])
    ids = manager.submit(jobs)
    print('states:', sorted(manager.wait4(ids).items()))
    print('status:', manager.status('sum')['jobs']['sum']['data']['status'])
    info = manager.info_parsed(ids, withChilds=True)
    print('iterations:', info[ids[0]].iterations['finished'])
    manager.finish()
''')
IMPORTS = {"from qcg.pilotjob.api.manager import Manager": "from nrm.pilot.qcg import Manager",
           "from qcg.pilotjob.api.job import Jobs": "from nrm.pilot.qcg import Jobs"}


@pytest.fixture(scope="module")
def nrmd():
    with DaemonProcess() as d:
        yield d


@contextlib.contextmanager
def net_pilot(nrmd, tmp_path, *args):
    """A ``--net`` pilot on loopback: (process, aux dir, address)."""
    wd = tmp_path / "wd"
    proc = nrmd.popen_cli("pilot", "--net", "--net-host", "127.0.0.1", "--nodes", "2",
                          "--wd", str(wd), *args, stderr=subprocess.PIPE, text=True)
    try:
        def address():
            if proc.poll() is not None:
                raise AssertionError(f"the pilot exited: {proc.stderr.read()}")
            found = glob.glob(str(wd / ".nrm-pilot-*" / "address"))
            return found and found[0]
        path = wait_for(address, timeout=60)
        with open(path) as f:
            yield proc, os.path.dirname(path), f.read().strip()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def finished(proc) -> str:
    proc.wait(timeout=60)
    err = proc.stderr.read()
    assert proc.returncode == 0, err
    return err


def test_a_qcg_script_drives_a_net_pilot_over_tcp(nrmd, tmp_path):
    script = QCG_SCRIPT
    for old, new in IMPORTS.items():
        script = script.replace(old, new)
    (tmp_path / "script.py").write_text(script)
    with net_pilot(nrmd, tmp_path) as (proc, aux, uri):
        assert uri.startswith("tcp://127.0.0.1:")
        modes = {name: os.stat(os.path.join(aux, name)).st_mode & 0o777
                 for name in ("address", "net", "net/server.key", "net/client.key")}
        assert modes == {"address": 0o600, "net": 0o700, "net/server.key": 0o600,
                         "net/client.key": 0o600}
        r = subprocess.run([sys.executable, str(tmp_path / "script.py"), uri],
                           capture_output=True, text=True, timeout=120, cwd=REPO,
                           env=dict(os.environ, NRM_PILOT_KEYS=aux))
        assert r.returncode == 0, r.stderr
        err = finished(proc)
    assert "resources: {'total_nodes': 1, 'total_cores': 2" in r.stdout
    assert "states: [('job-" in r.stdout and "('sum', 'SUCCEED')" in r.stdout
    assert "status: SUCCEED" in r.stdout and "iterations: 3" in r.stdout
    assert (tmp_path / "wd" / "all.out").read_text().split("\n")[:3] == [
        f"job {i}" for i in range(3)]
    assert "2 jobs: 2 SUCCEED" in err
    assert not os.path.exists(os.path.join(aux, "address"))   # a finished pilot has none


def _req(uri: str, aux: str) -> zmq.Socket:
    """A plain REQ socket, as QCG's own client has, with the owner's key."""
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.linger = 0
    sock.rcvtimeo = 30000
    curve.make_client(sock, curve.ClientConfig(
        uri=uri, server_public=curve.load_public_key(os.path.join(aux, "net/server.key.pub")),
        keys=curve.load_keypair(os.path.join(aux, "net/client.key"))))
    sock.connect(uri)
    return sock


def test_unauthorized_keys_and_bad_input_are_refused_and_the_pilot_serves_on(nrmd, tmp_path):
    mine = curve.write_keypair(str(tmp_path / "mine.key"))
    stranger = str(tmp_path / "stranger.key")
    curve.write_keypair(stranger)
    users = tmp_path / "users"
    users.write_text(f"{pwd.getpwuid(os.getuid()).pw_name} {mine.public.decode()}\n")
    with net_pilot(nrmd, tmp_path, "--net-keys", str(users)) as (proc, aux, uri):
        server_pub = os.path.join(aux, "net", "server.key.pub")
        with pytest.raises(qcg.ConnectionError, match="refused our key"):
            qcg.Manager(uri, {"server_key": server_pub, "client_key": stranger})
        with pytest.raises(qcg.ConnectionError, match="handshake"):
            qcg.Manager(uri, {"server_key": stranger + ".pub",
                              "client_key": os.path.join(aux, "net", "client.key")})
        with pytest.raises(qcg.ConnectionError, match="needs the pilot's keys"):
            qcg.Manager(uri, {})
        # not ZMTP at all: the connection is dropped, nothing else happens
        host, port = uri[len("tcp://"):].rsplit(":", 1)
        with socket.create_connection((host, int(port))) as raw:
            raw.sendall(b"GET / HTTP/1.0\r\n\r\n" + b"\x00" * 4096)
        # QCG's framing (REQ) with the owner's key: an error answer for each bad input
        req = _req(uri, aux)
        for bad, says in [(b"not json", "not JSON"), (b"\xff\xfe", "not JSON"),
                          (b"[" * 100000, "not JSON"), (b"[1]", "expected an object"),
                          (b'{"request": "nope"}', "unknown request type"),
                          (b'{"request": "nrmWait", "timeout": "x"}', "timeout"),
                          (b'{"request": "nrmWait", "jobNames": [[1]]}', "jobNames"),
                          (b'{"request": "submit", "jobs": [{"name": 3}]}', "")]:
            req.send(bad)
            answer = json.loads(req.recv())
            assert answer["code"] == 1 and says in answer["message"], (bad[:20], answer)
        req.close()
        # the key the owner listed, given as files; the pilot still serves
        manager = qcg.Manager(uri, {"server_key": server_pub,
                                    "client_key": str(tmp_path / "mine.key")})
        ids = manager.submit(qcg.Jobs().add(name="ok", exec="true"))
        assert manager.wait4(ids) == {"ok": "SUCCEED"}
        manager.cleanup()
        # the aux dir alone (its address file and keys) is an address too
        manager = qcg.Manager(aux)
        assert manager.resources()["total_cores"] == 2
        manager.finish()
        err = finished(proc)
    assert "1 jobs: 1 SUCCEED" in err


@pytest.mark.parametrize("args, says", [
    (["--net-pub-port", "5556"], "--net-pub-port: the PUB event socket is not supported"),
    (["--net", "--file-path", "x.json"], "no request file is read"),
    (["--net-port-min", "3000", "--net-port-max", "2000"], "above --net-port-max"),
    (["--net-port", "70000"], "a port is 1-65535"),
])
def test_net_options_refused_in_one_line(tmp_path, args, says):
    r = subprocess.run([sys.executable, "-m", "nrm.cli.main", "pilot", "--wd", str(tmp_path),
                        *args], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 2 and says in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_net_keys_of_another_user_are_refused(tmp_path):
    key = curve.write_keypair(str(tmp_path / "k.key"))
    other = "nobody" if os.getuid() != 65534 else "root"
    users = tmp_path / "users"
    users.write_text(f"{other} {key.public.decode()}\n")
    r = subprocess.run([sys.executable, "-m", "nrm.cli.main", "pilot", "--net-keys",
                        str(users), "--wd", str(tmp_path)], capture_output=True, text=True,
                       timeout=60, cwd=REPO)
    assert r.returncode == 2 and "accepts only your keys" in r.stderr, r.stderr


def test_a_wait_ends_with_an_error_when_the_pilot_dies(nrmd, tmp_path):
    with net_pilot(nrmd, tmp_path) as (proc, aux, uri):
        manager = qcg.Manager(aux)
        manager.submit(qcg.Jobs().add(name="long", exec="sleep", args=["60"]))
        proc.kill()                        # mid-wait: the connection drops under it
        with pytest.raises(qcg.ConnectionError, match="connection lost"):
            manager.wait4("long")
        manager.cleanup()
