"""A real nrmd's ROUTER under random and mutated requests.

Every well-framed request must get exactly one final reply (``error`` with
a documented code, ``ack``, or a run's ``exit``) carrying the id the
daemon could read from it (0 when it could not decode one), a
``run_batch`` an ``error`` or ``exits`` naming each of its tasks once; the daemon
stays up, ``status`` answers, and its RSS stays bounded after many inputs.
Runs with fuzzed manifests really start containers (running /bin/true);
once they are gone no container and no hardware control may remain.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import random

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nrm import manifest, protocol
from tests.nrmd import wait_for
from tests.fuzz import live
from tests.fuzz.common import EXAMPLES, FUZZ_DAEMON, count, messages, random_message
from tests.fuzz.manifests import mutated_manifests
from tests.fuzz.samples import REQUEST_KEYS, REQUESTS

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="runs /bin/true in slices: needs root")

FINAL = (protocol.Error, protocol.Ack, protocol.Exit)
#: RSS growth allowed over the volume run (after a warm-up of the same inputs)
RSS_BOUND_KIB = 24 * 1024


@pytest.fixture(scope="module")
def nrmd():
    d = live.start_daemon()
    yield d
    # Leave no cap behind (the fuzzer sends setpower), then stop cleanly.
    sock = live.dealer(d)
    sock.send(protocol.encode(protocol.SetPower(id=1, watts=None)))
    sock.poll(5000)
    sock.close()
    live.stop_daemon(d)


@pytest.fixture(scope="module")
def sock(nrmd):
    s = live.dealer(nrmd)
    yield s
    s.close()


#: run_batch ids the harness gives (above any the samples use) -> tasks
_batch_ids = itertools.count(1 << 40)
_batch_sizes: dict = {}


def _expected_id(frames):
    """The id of the final reply the daemon owes for ``frames`` (None: a
    credit, which has no reply), and the frames to really send (runs are
    made harmless first)."""
    if len(frames) != 1:
        return 0, frames, False
    try:
        msg = protocol.decode_request(frames[0])
    except protocol.ProtocolError:
        return 0, frames, False
    if isinstance(msg, protocol.Run):
        # Everything else stays fuzzed; what runs, as root, is /bin/true.
        msg = msgspec.structs.replace(msg, argv=["/bin/true"], env={}, detach=False,
                                      output=True)
        frames = [protocol.encode(msg)]
    if isinstance(msg, protocol.RunBatch):
        # Its own id: the exits of its tasks are counted against it.
        tasks = [msgspec.structs.replace(t, argv=["/bin/true"], env={}) for t in msg.tasks]
        msg = msgspec.structs.replace(msg, id=next(_batch_ids), env={}, tasks=tasks)
        frames = [protocol.encode(msg)]
        _batch_sizes[msg.id] = len(tasks)
    if isinstance(msg, protocol.Credit):
        return None, frames, True
    return msg.id, frames, True


def _exchange(sock, batch, timeout_s: float = 10.0):
    expected = collections.Counter()
    refused = 0
    for frames in batch:
        rid, frames, ok = _expected_id(frames)
        refused += not ok
        if rid is not None:
            expected[rid] += 1
        sock.send_multipart(frames)
    got = collections.Counter()
    errors = 0
    owed = sum(expected.values())
    while sum(got.values()) < owed:
        assert sock.poll(int(timeout_s * 1000)), (
            f"{owed - sum(got.values())} of {owed} requests unanswered; sent {batch!r}"[:3000])
        reply_frames = sock.recv_multipart()
        reply = protocol.decode_reply(reply_frames[0])
        if isinstance(reply, protocol.Output):
            assert len(reply_frames) == 2
            continue
        assert len(reply_frames) == 1
        if isinstance(reply, protocol.Error):
            assert reply.code in live.ERROR_CODES, reply
            # "internal" is an exception a command did not expect: a bug.
            assert reply.code != "internal", reply
            assert reply.message
            errors += 1
        if isinstance(reply, protocol.Exits):
            left = _batch_sizes[reply.id] - len(reply.exits)
            assert left >= 0, f"more exits than tasks: {reply!r}"[:3000]
            _batch_sizes[reply.id] = left
            if not left:
                del _batch_sizes[reply.id]
                got[reply.id] += 1
        elif isinstance(reply, FINAL):
            _batch_sizes.pop(reply.id, None)    # a batch refused whole
            got[reply.id] += 1
        elif isinstance(reply, protocol.Started):
            count("upstream.daemon.runs_started")
    assert got == expected
    assert not sock.poll(50), "a reply more than owed"
    return refused, errors


def frames_strategy():
    one = messages(REQUESTS, REQUEST_KEYS).map(lambda m: [m])
    several = st.lists(st.one_of(messages(REQUESTS, REQUEST_KEYS), st.binary(max_size=64)),
                       min_size=2, max_size=4)
    return st.lists(st.one_of(one, one, one, several), min_size=1, max_size=12)


@FUZZ_DAEMON
@given(frames_strategy())
def test_every_request_answered(nrmd, batch):
    # A socket per example: a failing one must not leave replies behind.
    sock = live.dealer(nrmd)
    try:
        refused, _ = _exchange(sock, batch)
    finally:
        sock.close()
    count("upstream.daemon.hypothesis", len(batch), refused)
    live.alive(nrmd)


@st.composite
def runs(draw):
    """Run requests whose manifest is fuzzed: raw (as a hostile client would
    send it) or canonical (what nrm.client sends once the file parsed)."""
    doc = draw(mutated_manifests())
    try:
        doc = manifest.parse(doc).to_dict() if draw(st.booleans()) else doc
    except manifest.ManifestError:
        pass
    run = {"type": "run", "v": 1, "id": draw(st.integers(1, 10 ** 6)), "manifest": doc,
           "argv": ["/bin/true"], "container": draw(st.sampled_from([None, "fz1", "fz2"])),
           "wait": draw(st.booleans()), "oversubscribe": draw(st.booleans())}
    return [json.dumps(run).encode()]


@FUZZ_DAEMON
@given(st.lists(runs(), min_size=1, max_size=6))
def test_runs_with_fuzzed_manifests(nrmd, batch):
    """Containers really start with fuzzed settings (scheduler, power policy,
    monitoring...); each run ends in exit or an error, and no control stays
    written once they are gone."""
    sock = live.dealer(nrmd)
    try:
        # A power cap (other tests send setpower) legitimately holds a
        # control written; clear it so any control left is the runs' doing.
        _exchange(sock, [[protocol.encode(protocol.SetPower(id=1))]])
        _, errors = _exchange(sock, batch)
    finally:
        sock.close()
    count("upstream.daemon.runs", len(batch), errors)
    wait_for(lambda: not live.status(nrmd)["saved_controls"]
             and not live.status(nrmd)["containers"], timeout=20)
    live.alive(nrmd)


def test_oversize_request_refused_or_dropped(nrmd, sock):
    """Over MAX_REQUEST_BYTES: a too_large error; over the socket's
    maxmsgsize: libzmq drops the connection, and the client reconnects."""
    big = b'{"type":"status","v":1,"id":9,"pad":"' + b"x" * protocol.MAX_REQUEST_BYTES + b'"}'
    sock.send(big)
    assert sock.poll(10000)
    reply = protocol.decode_reply(sock.recv())
    assert isinstance(reply, protocol.Error) and reply.code == "too_large"
    other = live.dealer(nrmd)
    try:
        other.send(b"x" * (protocol.MAX_REQUEST_BYTES + 100000))
        other.send(protocol.encode(protocol.Status(id=3)))
        reply = wait_for(lambda: other.poll(200) and protocol.decode_reply(other.recv()),
                         timeout=15)
        assert reply.id == 3
    finally:
        other.close()
    count("upstream.daemon.oversize", 2, 2)
    live.alive(nrmd)


def test_memory_bounded_under_volume(nrmd, sock):
    """Many inputs, pipelined: RSS after a warm-up vs after the volume."""
    rng = random.Random(7)
    n = max(2000, EXAMPLES * 20)

    def batch(size):
        return [[random_message(rng, REQUESTS)] if rng.random() < 0.9
                else [random_message(rng, REQUESTS), b""] for _ in range(size)]

    for _ in range(5):
        _exchange(sock, batch(200))
    before = live.rss_kib(nrmd.proc.pid)
    refused = 0
    for _ in range(n // 200):
        refused += _exchange(sock, batch(200))[0]
    after = live.rss_kib(nrmd.proc.pid)
    count("upstream.daemon.volume", n // 200 * 200, refused)
    live.rss_report("upstream", before, after, n)
    live.alive(nrmd)
    assert after - before < RSS_BOUND_KIB, (before, after)


def test_dead_client_mid_request(nrmd):
    """Requests whose sender vanished before the reply: nothing to answer."""
    for _ in range(20):
        s = live.dealer(nrmd)
        s.send(protocol.encode(protocol.Status(id=1)))
        s.send(b"[" * 3000)
        s.close()
    count("upstream.daemon.vanished", 40, 20)
    live.alive(nrmd)


@pytest.mark.parametrize("data", [
    b'{"type":"run","v":1,"manifest":{"a":' + b"[" * 5000 + b"]" * 5000 + b"}}",
    b'{"type":"run","v":1,"id":5,"argv":["\xf4"]}'])
def test_found_inputs_answered(nrmd, sock, data):
    """Regression (tests/fuzz): these went unanswered (RecursionError,
    UnicodeDecodeError escaped the decoder)."""
    sock.send(data)
    assert sock.poll(10000)
    reply = protocol.decode_reply(sock.recv())
    assert isinstance(reply, protocol.Error) and reply.code == "malformed", reply
    count("upstream.daemon.regression", 1, 1)
    live.alive(nrmd)
