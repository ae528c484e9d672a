"""Ingest: real ZeroMQ sockets, protocol-v1 and seed-era senders, floods."""

import asyncio
import logging
import os
import threading

import msgspec
import pytest
import zmq

from nrm import protocol
from nrm.daemon.ingest import Ingest, SeedTranslator
from nrm.protocol import (DExit, DPerformance, DPhaseContext, DProgress, DStart,
                          MAX_DOWNSTREAM_BYTES, ProtocolError)


@pytest.fixture
def uris(tmp_path):
    return f"ipc://{tmp_path}/down", f"ipc://{tmp_path}/seed"


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def wait_for(predicate, what="condition"):
    for _ in range(2000):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


V1 = [
    DStart(container="c", task="t", app="a", pid=42),
    DProgress(container="c", task="t", app="a", payload=7),
    DPhaseContext(container="c", task="t", app="a", rank=1, cpu=3, phase=8, aggregation=4,
                  computetime=100, totaltime=150),
    DPerformance(container="c", task="t", app="a", event="instructions", payload=1e9,
                 interval=0.5),
    DExit(container="c", task="t", app="a"),
]


def test_v1_messages_reach_the_callback_in_order(uris):
    async def main():
        got = []
        ctx = zmq.Context()
        ingest = Ingest(ctx, uris[0], None, lambda m, p: got.append((m, p)))
        await ingest.start()
        push = ctx.socket(zmq.PUSH)
        push.connect(uris[0])
        for msg in V1:
            push.send(protocol.encode(msg))
        await wait_for(lambda: len(got) == len(V1), "messages")
        await ingest.stop()
        push.close(linger=0)
        ctx.term()
        return got, ingest.counters

    got, counters = run(main())
    assert [m for m, _ in got] == V1
    assert all(p is None for _, p in got)  # no ZAP handler here: no identity
    assert counters["downstream"]["received"] == counters["downstream"]["decoded"] == 5
    assert "seed" not in counters


def zap_handler(ctx, stop):
    """Answer like the daemon's handler: User-Id = uid:gid:pid of ipc peers."""
    sock = ctx.socket(zmq.REP)
    sock.bind("inproc://zeromq.zap.01")
    while not stop.is_set():
        if not sock.poll(50):
            continue
        version, request_id, _domain, address, _identity, _mechanism = sock.recv_multipart()[:6]
        text = address.decode()
        user = text.split(":", 1)[1] if text.startswith("localhost:") else ""
        sock.send_multipart([version, request_id, b"200", b"OK", user.encode(), b""])
    sock.close(linger=0)


def test_peer_identity_from_zap(uris):
    async def main():
        got = []
        ctx = zmq.Context()
        stop = threading.Event()
        thread = threading.Thread(target=zap_handler, args=(ctx, stop))
        thread.start()
        try:
            ingest = Ingest(ctx, uris[0], uris[1], lambda m, p: got.append((m, p)))
            await ingest.start()
            push = ctx.socket(zmq.PUSH)
            push.connect(uris[0])
            push.send(protocol.encode(V1[0]))
            await wait_for(lambda: got, "message")
            await ingest.stop()
            push.close(linger=0)
        finally:
            stop.set()
            thread.join()
            ctx.term()
        return got

    ((msg, peer),) = run(main())
    assert peer == f"{os.getuid()}:{os.getgid()}:{os.getpid()}"


class SeedClient:
    """A seed-era client as FACTS section 2 describes it: PUB connecting to
    the daemon's SUB, quoted numbers."""

    def __init__(self, ctx, uri):
        self.sock = ctx.socket(zmq.PUB)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.connect(uri)

    def send(self, **fields):
        self.sock.send(msgspec.json.encode(dict(type="application", **fields)))

    async def join(self, ingest):
        """PUB drops until the subscription arrives (the seed slept 1 s);
        send probes, which Ingest counts as unknown, until one is seen."""
        counters = ingest.counters["seed"]
        while counters["received"] == 0:
            self.send(event="threads", uuid="probe", payload={"min": "1"})
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        return dict(counters)


def test_seed_client_is_accepted(uris):
    async def main():
        got = []
        ctx = zmq.Context()
        ingest = Ingest(ctx, uris[0], uris[1], lambda m, p: got.append(m))
        await ingest.start()
        seed = SeedClient(ctx, uris[1])
        base = await seed.join(ingest)
        seed.send(event="start", container="box", uuid="app-1", progress=True, threads=None)
        seed.send(event="progress", payload="12", uuid="app-1")
        seed.send(event="phase_context", cpu="3", startcompute="1000", endcompute="1600",
                  startbarrier="1600", endbarrier="2000", uuid="app-1")
        seed.send(event="phase_context", cpu="3", aggregation="4", computetime="4000",
                  totaltime="9000", uuid="app-1")
        seed.send(event="exit", uuid="app-1")
        await wait_for(lambda: len(got) == 5, "seed messages")
        await ingest.stop()
        seed.sock.close(linger=0)
        ctx.term()
        return got, base, ingest.counters["seed"]

    got, base, counters = run(main())
    start, progress, ph1, ph2, exit_ = got
    assert start == DStart(container="box", task="app-1", app="app-1")
    assert progress == DProgress(container="box", task="app-1", app="app-1", payload=12)
    assert (ph1.cpu, ph1.aggregation, ph1.computetime, ph1.totaltime, ph1.phase) == (
        3, 1, 600, 1000, 1)
    assert (ph2.aggregation, ph2.computetime, ph2.totaltime, ph2.phase) == (4, 4000, 9000, 5)
    assert ph1.container == "box"
    assert exit_ == DExit(container="box", task="app-1", app="app-1")
    assert counters["decoded"] - base["decoded"] == 5
    assert counters["received"] - base["received"] == 5
    assert counters["dropped_unknown"] == base["dropped_unknown"] == base["received"]


GARBAGE = {
    "dropped_malformed": [b"", b"{", b"not json", b"[1,2]", b'{"v":1,"type":"progress",'
                          b'"payload":"many"}'],
    "dropped_unknown": [b'{"v":1,"type":"teleport"}', b'{"v":2,"type":"progress"}'],
    "dropped_oversize": [b'{"v":1,"type":"exit","app":"' + b"x" * MAX_DOWNSTREAM_BYTES + b'"}'],
}


def test_flood_of_garbage_and_valid_messages_exact_counters(uris, caplog):
    senders, rounds = 4, 300
    valid = protocol.encode(V1[1])
    garbage = [g for group in GARBAGE.values() for g in group]

    def sender(ctx):
        push = ctx.socket(zmq.PUSH)
        push.connect(uris[0])
        for _ in range(rounds):
            push.send(valid)
            for g in garbage:
                push.send(g)
        push.close()  # default linger: everything is delivered

    async def main():
        seen = [0]

        def on_message(msg, peer):
            seen[0] += msg.payload

        ctx = zmq.Context()
        ingest = Ingest(ctx, uris[0], None, on_message, batch=64, log_interval=3600)
        await ingest.start()
        threads = [threading.Thread(target=sender, args=(ctx,)) for _ in range(senders)]
        for t in threads:
            t.start()
        total = senders * rounds * (1 + len(garbage))
        await wait_for(lambda: ingest.counters["downstream"]["received"] == total, "flood")
        for t in threads:
            t.join()
        # Still alive and serving after the flood.
        push = ctx.socket(zmq.PUSH)
        push.connect(uris[0])
        push.send(protocol.encode(DProgress(payload=1000000)))
        await wait_for(lambda: seen[0] >= 1000000, "post-flood message")
        await ingest.stop()
        push.close(linger=0)
        ctx.term()
        return ingest.counters["downstream"], seen[0]

    with caplog.at_level(logging.WARNING, logger="nrm.daemon.ingest"):
        counters, seen = run(main())
    n = senders * rounds
    assert counters["received"] == n * (1 + len(garbage)) + 1
    assert counters["decoded"] == n + 1
    for name, group in GARBAGE.items():
        assert counters[name] == n * len(group), name
    assert counters["callback_errors"] == 0
    assert seen == n * 7 + 1000000
    # One line at the first drop, one summary at stop: the rest were merged.
    lines = [r for r in caplog.records if r.name == "nrm.daemon.ingest"]
    assert len(lines) == 2


def test_seed_flood_exact_counters(uris):
    async def main():
        got = []
        ctx = zmq.Context()
        ingest = Ingest(ctx, uris[0], uris[1], lambda m, p: got.append(m))
        await ingest.start()
        seed = SeedClient(ctx, uris[1])
        base = await seed.join(ingest)
        for i in range(2000):
            seed.send(event="progress", payload=str(i), uuid="u")
            seed.sock.send(b"\xff garbage")
            seed.send(event="phase_context", cpu="x", uuid="u")
        await wait_for(lambda: ingest.counters["seed"]["received"] - base["received"] == 6000,
                       "seed flood")
        await ingest.stop()
        seed.sock.close(linger=0)
        ctx.term()
        return got, base, ingest.counters["seed"]

    got, base, counters = run(main())
    assert sum(m.payload for m in got) == sum(range(2000))
    assert counters["decoded"] - base["decoded"] == 2000
    assert counters["dropped_malformed"] - base["dropped_malformed"] == 4000


def test_drain_yields_between_batches(uris):
    """A burst must not monopolize the loop: other tasks run between batches."""
    async def main():
        order = []
        ctx = zmq.Context()
        ingest = Ingest(ctx, uris[0], None, lambda m, p: order.append("m"), batch=10)
        await ingest.start()

        async def ticker():
            while order.count("m") < 500:
                order.append("t")
                await asyncio.sleep(0)

        task = asyncio.ensure_future(ticker())
        await asyncio.sleep(0)
        push = ctx.socket(zmq.PUSH)
        push.connect(uris[0])
        for _ in range(500):
            push.send(protocol.encode(V1[1]))
        await asyncio.wait_for(task, 30)
        await ingest.stop()
        push.close(linger=0)
        ctx.term()
        return order

    order = run(main())
    runs = "".join(order).split("t")
    assert max(len(r) for r in runs) <= 10
    assert order.count("m") == 500


def test_callback_errors_are_counted_not_fatal(uris):
    async def main():
        calls = []

        def on_message(msg, peer):
            calls.append(msg)
            if len(calls) == 1:
                raise RuntimeError("boom")

        ctx = zmq.Context()
        ingest = Ingest(ctx, uris[0], None, on_message)
        await ingest.start()
        push = ctx.socket(zmq.PUSH)
        push.connect(uris[0])
        push.send(protocol.encode(V1[0]))
        push.send(protocol.encode(V1[4]))
        await wait_for(lambda: len(calls) == 2, "both messages")
        await ingest.stop()
        await ingest.stop()  # idempotent
        push.close(linger=0)
        ctx.term()
        return ingest.counters["downstream"]

    counters = run(main())
    assert counters["callback_errors"] == 1 and counters["decoded"] == 2


def test_bind_failure_leaves_nothing_open(tmp_path):
    async def main():
        ctx = zmq.Context()
        ingest = Ingest(ctx, "bogus://nowhere", f"ipc://{tmp_path}/seed")
        with pytest.raises(zmq.ZMQError):
            await ingest.start()
        await ingest.stop()
        ctx.term()  # would hang if a socket had been left open

    run(main())


def test_a_squatted_seed_path_leaves_the_other_endpoint_serving(uris, caplog):
    """A directory another user planted where the seed-era socket goes makes
    that one endpoint fail, in one log line and in ``failures``; the
    protocol-v1 endpoint goes on serving."""
    seed_path = uris[1][len("ipc://"):]
    os.mkdir(seed_path)
    if os.geteuid() == 0:
        os.chown(seed_path, 65534, 65534)

    async def main():
        got = []
        ctx = zmq.Context()
        ingest = Ingest(ctx, uris[0], uris[1], lambda m, p: got.append(m))
        await ingest.start()
        push = ctx.socket(zmq.PUSH)
        push.connect(uris[0])
        push.send(protocol.encode(V1[0]))
        await wait_for(lambda: got, "a message on the v1 endpoint")
        await ingest.stop()
        push.close(linger=0)
        ctx.term()
        return ingest

    with caplog.at_level(logging.WARNING, logger="nrm.daemon.ingest"):
        ingest = run(main())
    assert list(ingest.failures) == ["seed"]
    assert "a directory of uid" in ingest.failures["seed"], ingest.failures
    assert list(ingest.endpoints) == ["downstream"]
    lines = [r for r in caplog.records if "seed endpoint off" in r.getMessage()]
    assert len(lines) == 1 and lines[0].exc_info is None
    assert os.path.isdir(seed_path)     # what was planted is left alone


@pytest.mark.parametrize("data, code", [
    (b'{"type":"application","event":"progress","payload":"-3","uuid":"u"}', "invalid"),
    (b'{"type":"application","event":"progress","payload":"1.5","uuid":"u"}', "invalid"),
    (b'{"type":"application","event":"progress","payload":true,"uuid":"u"}', "invalid"),
    (b'{"type":"application","event":"progress","payload":"1"}', "invalid"),
    (b'{"type":"application","event":"phase_context","cpu":"0","startcompute":"9",'
     b'"endcompute":"5","startbarrier":"5","endbarrier":"10","uuid":"u"}', "invalid"),
    (b'{"type":"container","event":"start"}', "unknown"),
    (b'{"type":"application","event":"threads","uuid":"u"}', "unknown"),
    (b'"just a string"', "malformed"),
])
def test_seed_translator_rejects(data, code):
    with pytest.raises(ProtocolError) as info:
        SeedTranslator().translate(data)
    assert info.value.code == code


def test_seed_translator_accepts_unquoted_numbers_and_bounds_memory():
    tr = SeedTranslator(bound=3)
    for i in range(10):
        tr.translate(msgspec.json.encode({"type": "application", "event": "start",
                                          "container": f"c{i}", "uuid": f"u{i}"}))
    msg = tr.translate(b'{"type":"application","event":"progress","payload":5,"uuid":"u9"}')
    assert msg == DProgress(container="c9", task="u9", app="u9", payload=5)
    old = tr.translate(b'{"type":"application","event":"progress","payload":5,"uuid":"u0"}')
    assert old.container == ""  # forgotten: the map is bounded
    assert len(tr._containers) == 3
