"""A real nrmd's two downstream endpoints flooded with random messages.

The counters in ``status`` must match what was sent exactly: every message
received, the decodable ones decoded (and, naming no container of this
daemon, rejected as ``unknown_container``), the others dropped; no
callback error, the daemon alive and its RSS bounded.
"""

from __future__ import annotations

import random

import pytest
import zmq
from hypothesis import given
from hypothesis import strategies as st

from nrm import paths, protocol
from nrm.daemon.ingest import SeedTranslator
from tests.nrmd import wait_for
from tests.fuzz import live
from tests.fuzz.common import EXAMPLES, FUZZ_DAEMON, count, messages, random_message
from tests.fuzz.samples import DOWNSTREAM, DOWNSTREAM_KEYS, SEED, SEED_KEYS

RSS_BOUND_KIB = 24 * 1024
_PROBE = b'{"type":"application","event":"exit","uuid":"probe"}'


@pytest.fixture(scope="module")
def nrmd():
    d = live.start_daemon()
    yield d
    live.stop_daemon(d)


@pytest.fixture(scope="module")
def senders(nrmd):
    ctx = zmq.Context.instance()
    push = ctx.socket(zmq.PUSH)
    push.linger = 0
    push.sndhwm = 100000
    push.connect(paths.downstream_uri(nrmd.rundir))
    pub = ctx.socket(zmq.PUB)
    pub.linger = 0
    pub.sndhwm = 100000
    pub.connect(nrmd.seed_uri)

    # PUB drops until the subscription arrives: probe until one lands.
    def landed():
        pub.send(_PROBE)
        return live.downstream_counters(nrmd)["seed"]["received"] > 0

    wait_for(landed, timeout=15, interval=0.1)
    yield push, pub
    push.close()
    pub.close()


def _decodes(decode, data: bytes) -> bool:
    try:
        decode(data)
    except protocol.ProtocolError:
        return False
    return True


def _flood(nrmd, push, pub, v1, seed):
    """Send, then wait until the daemon has counted all of it; compare."""
    before = live.downstream_counters(nrmd)
    for data in v1:
        push.send(data)
    for data in seed:
        pub.send(data)
    ok_v1 = sum(_decodes(protocol.decode_downstream, d) for d in v1)
    # Whether a seed message decodes does not depend on the translator's
    # state (only what it decodes to does), so a fresh one predicts it.
    ok_seed = sum(_decodes(SeedTranslator().translate, d) for d in seed)
    want = {"downstream": (len(v1), ok_v1), "seed": (len(seed), ok_seed)}

    def delta():
        now = live.downstream_counters(nrmd)
        return now, {ep: now[ep]["received"] - before[ep]["received"] for ep in want}

    wait_for(lambda: all(delta()[1][ep] >= want[ep][0] for ep in want), timeout=20,
             interval=0.05)
    now, _ = delta()
    for ep, (received, decoded) in want.items():
        c, b = now[ep], before[ep]
        got = {k: c[k] - b[k] for k in c}
        assert got["received"] == received, (ep, got)
        assert got["decoded"] == decoded, (ep, got)
        dropped = got["dropped_malformed"] + got["dropped_unknown"] + got["dropped_oversize"]
        assert dropped == received - decoded, (ep, got)
        assert got["callback_errors"] == 0, (ep, got)
    rejected = (now["rejected"].get("unknown_container", 0)
                - before["rejected"].get("unknown_container", 0))
    assert rejected == ok_v1 + ok_seed
    return len(v1) - ok_v1, len(seed) - ok_seed


@FUZZ_DAEMON
@given(st.lists(messages(DOWNSTREAM, DOWNSTREAM_KEYS), max_size=15),
       st.lists(messages(SEED, SEED_KEYS), max_size=15))
def test_counters_exact(nrmd, senders, v1, seed):
    bad_v1, bad_seed = _flood(nrmd, *senders, v1, seed)
    count("downstream.daemon.hypothesis", len(v1), bad_v1)
    count("seed.daemon.hypothesis", len(seed), bad_seed)
    live.alive(nrmd)


def test_nesting_does_not_kill_the_seed_endpoint(nrmd, senders):
    """Regression (tests/fuzz): 4000 brackets used to end the seed drain task."""
    _flood(nrmd, *senders, [b"[" * 4000], [b"[" * 4000, b"{\"a\":" * 2000])
    _flood(nrmd, *senders, [], [_PROBE])
    count("seed.daemon.regression", 3, 3)


def test_memory_bounded_under_flood(nrmd, senders):
    rng = random.Random(11)
    n = max(4000, EXAMPLES * 40)

    def batch(size):
        return ([random_message(rng, DOWNSTREAM) for _ in range(size)],
                [random_message(rng, SEED) for _ in range(size)])

    for _ in range(3):
        _flood(nrmd, *senders, *batch(500))
    before = live.rss_kib(nrmd.proc.pid)
    bad = [0, 0]
    for _ in range(n // 1000):
        b1, b2 = _flood(nrmd, *senders, *batch(500))
        bad[0] += b1
        bad[1] += b2
    after = live.rss_kib(nrmd.proc.pid)
    count("downstream.daemon.volume", n // 1000 * 500, bad[0])
    count("seed.daemon.volume", n // 1000 * 500, bad[1])
    live.rss_report("downstream+seed", before, after, n // 1000 * 1000)
    live.alive(nrmd)
    assert after - before < RSS_BOUND_KIB, (before, after)
