"""The Python downstream client against a real PULL socket."""

import os
import subprocess
import sys
import threading

import pytest

from nrm.downstream import Client, parse_duration_ns
from nrm.protocol import DExit, DPhaseContext, DProgress, DStart, decode_downstream
from tests.receivers import drain_slowly

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def drain(sock, until_exit=True):
    msgs = []
    while True:
        if not sock.poll(10000):
            break
        msgs.append(decode_downstream(sock.recv()))
        if until_exit and isinstance(msgs[-1], DExit):
            break
    return msgs


@pytest.mark.parametrize("text, ns", [("10ms", 10_000_000), ("250us", 250_000), ("2s", 2 * 10**9),
                                      ("0.5ms", 500_000), ("1234", 1234), ("7ns", 7),
                                      ("0", 0), ("0.010000000s", 10_000_000)])
def test_parse_duration(text, ns):
    assert parse_duration_ns(text) == ns


@pytest.mark.parametrize("text", ["", "fast", "10 parsecs", "-1ms", "1h", "ms"])
def test_parse_duration_rejects(text):
    with pytest.raises(ValueError):
        parse_duration_ns(text)


def test_inactive_without_uri():
    c = Client("x", env={})
    assert not c.active
    assert c.progress(5) and c.phase_context(0, 1, 2) and c.flush()
    c.close()


def test_progress_accumulates_and_close_flushes(pull):
    sock, uri = pull
    env = {"NRM_DOWNSTREAM_URI": uri, "NRM_CONTAINER_ID": "c", "NRM_TASK_ID": "t",
           "NRM_RATELIMIT": "100s"}
    with Client("py-app", env=env) as c:
        assert c.active
        for i in range(1, 101):
            assert c.progress(i)
        assert c.phase_context(2, 300, 500, aggregation=2)
    assert not c.active
    msgs = drain(sock)
    assert isinstance(msgs[0], DStart) and msgs[0].pid == os.getpid()
    assert isinstance(msgs[-1], DExit)
    progress = [m for m in msgs if isinstance(m, DProgress)]
    assert sum(m.payload for m in progress) == 5050 and len(progress) == 2
    (phase,) = [m for m in msgs if isinstance(m, DPhaseContext)]
    assert (phase.cpu, phase.phase, phase.aggregation, phase.computetime) == (2, 2, 2, 300)
    assert {(m.container, m.task, m.app) for m in msgs} == {("c", "t", "py-app")}
    c.close()  # idempotent
    assert c.progress(1)


def test_threads_sum_exact(pull):
    sock, uri = pull
    c = Client("threads", uri=uri, ratelimit="1ms", env={})
    workers = [threading.Thread(target=lambda: [c.progress(2) for _ in range(5000)])
               for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    c.close()
    msgs = drain(sock)
    progress = [m for m in msgs if isinstance(m, DProgress)]
    assert sum(m.payload for m in progress) == 40000 and len(progress) < 20000


def test_forgotten_client_says_goodbye_at_exit(pull):
    """Two lines of user code, no close(): exit still arrives."""
    sock, uri = pull
    code = "from nrm.downstream import Client; c = Client('forgetful'); c.progress(3)"
    env = dict(os.environ, NRM_DOWNSTREAM_URI=uri, NRM_RATELIMIT="100s",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
    msgs = drain(sock)
    assert [type(m) for m in msgs] == [DStart, DProgress, DExit]
    assert msgs[1].payload == 3


def test_progress_example_script(pull):
    sock, uri = pull
    env = dict(os.environ, NRM_DOWNSTREAM_URI=uri,
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, os.path.join(REPO, "examples", "progress.py"),
                          "200", "10"], env=env, check=True, capture_output=True, text=True,
                         timeout=60).stdout
    assert "iterations=200" in out and "reporting=on" in out
    msgs = drain(sock)
    assert sum(m.payload for m in msgs if isinstance(m, DProgress)) == 200


FLOOD = """
import sys
from nrm.downstream import Client
c = Client("flood", ratelimit=0)
accepted = 0
while accepted < int(sys.argv[1]):  # as fast as the socket takes them
    accepted += c.phase_context(0, 1, 2)
c.close()
print(accepted)
"""


def test_flood_then_exit_loses_nothing_when_receiver_is_behind(slow_pull):
    """A sender that hangs up on a full receiver would lose the kernel's
    backlog, exit included; close() waits until it has been read."""
    sock, uri = slow_pull
    env = dict(os.environ, NRM_DOWNSTREAM_URI=uri, NRM_LINGER="60000",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", FLOOD, "4000"], env=env,
                            stdout=subprocess.PIPE, text=True)
    msgs = drain_slowly(sock, proc)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    phases = [m for m in msgs if isinstance(m, DPhaseContext)]
    assert len(phases) == int(out) == 4000
    assert all(a.phase < b.phase for a, b in zip(phases, phases[1:]))
