#!/usr/bin/env python3
"""Downstream ingest throughput: Ingest (decode + callback) vs a raw PULL loop.

Several sender processes PUSH valid protocol-v1 progress messages as fast as
they can; the receiver counts what it got until every sender is done and
the socket has gone quiet.  The baseline is the cheapest possible receiver,
a pyzmq PULL with non-blocking receives and no decoding, measured in the
same run on the same messages, so the ratio does not depend on the
machine's mood.  Senders block at the high-water mark (PUSH), so loss is
expected to be zero; it is measured, not assumed.

usage: python benchmarks/ingest.py [--senders 4] [--messages 200000] [--repeat 3]
"ingest" is the daemon's configuration: a ZAP handler sets User-Id and
Ingest reads it per message.  A variant with no ZAP handler (every lookup
fails) is printed next to it.

Prints one JSON object.
"""

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time

import zmq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nrm import protocol  # noqa: E402
from nrm.daemon.ingest import Ingest  # noqa: E402
from nrm.protocol import DProgress  # noqa: E402


def sender(uri, count, go):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.connect(uri)
    data = protocol.encode(DProgress(container="c" * 8, task="t" * 8, app="bench", payload=1))
    go.wait()
    send = sock.send
    for _ in range(count):
        send(data)
    sock.close()  # default linger: all delivered before exit
    ctx.term()


def start_senders(uri, senders, per_sender):
    go = multiprocessing.Event()
    procs = [multiprocessing.Process(target=sender, args=(uri, per_sender, go))
             for _ in range(senders)]
    for p in procs:
        p.start()
    return procs, go


def raw_run(uri, senders, per_sender):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.RCVHWM, 100000)
    sock.bind(uri)
    procs, go = start_senders(uri, senders, per_sender)
    expected = senders * per_sender
    got = 0
    time.sleep(0.3)  # let the senders connect
    go.set()
    t0 = None
    while got < expected:
        if not sock.poll(2000):
            break
        if t0 is None:
            t0 = time.perf_counter()
        while True:
            try:
                sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            got += 1
    elapsed = time.perf_counter() - t0
    for p in procs:
        p.join()
    sock.close(linger=0)
    ctx.term()
    return got, elapsed


def zap_handler(ctx, stop):
    """Like the daemon's: User-Id = the ipc peer's uid:gid:pid."""
    sock = ctx.socket(zmq.REP)
    sock.bind("inproc://zeromq.zap.01")
    while not stop.is_set():
        if sock.poll(50):
            version, rid, _dom, address = sock.recv_multipart()[:4]
            text = address.decode()
            user = text.split(":", 1)[1] if text.startswith("localhost:") else ""
            sock.send_multipart([version, rid, b"200", b"OK", user.encode(), b""])
    sock.close(linger=0)


def ingest_run(uri, senders, per_sender, zap=True):
    counted = [0]

    def on_message(msg, peer):
        counted[0] += msg.payload

    async def main():
        ctx = zmq.Context()
        stop = threading.Event()
        zap_thread = threading.Thread(target=zap_handler, args=(ctx, stop))
        if zap:
            zap_thread.start()
        ingest = Ingest(ctx, uri, None, on_message)
        await ingest.start()
        procs, go = start_senders(uri, senders, per_sender)
        await asyncio.sleep(0.3)
        go.set()
        expected = senders * per_sender
        c = ingest.counters["downstream"]
        while c["received"] == 0:
            await asyncio.sleep(0.0005)
        t0 = time.perf_counter()
        last, idle = -1, 0
        while c["received"] < expected and idle < 400:
            await asyncio.sleep(0.005)
            idle = idle + 1 if c["received"] == last else 0
            last = c["received"]
        elapsed = time.perf_counter() - t0
        await asyncio.get_running_loop().run_in_executor(None, lambda: [p.join() for p in procs])
        await ingest.stop()
        stop.set()
        if zap:
            zap_thread.join()
        ctx.term()
        return c["decoded"], counted[0], elapsed

    return asyncio.run(main())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--senders", type=int, default=4)
    ap.add_argument("--messages", type=int, default=200000, help="total per run")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    per_sender = args.messages // args.senders
    expected = per_sender * args.senders
    tmp = tempfile.mkdtemp(prefix="nrm-bench-ingest-")
    raw, full, nozap, loss = [], [], [], []
    for i in range(args.repeat):
        got, el = raw_run(f"ipc://{tmp}/raw{i}", args.senders, per_sender)
        raw.append(got / el)
        loss.append(expected - got)
        for n, (zap, out) in enumerate(((True, full), (False, nozap))):
            decoded, payload, el = ingest_run(f"ipc://{tmp}/ing{i}-{n}", args.senders,
                                              per_sender, zap)
            out.append(decoded / el)
            loss.append(expected - decoded)
            assert payload == decoded
    med = statistics.median
    result = {
        "benchmark": "ingest",
        "senders": args.senders, "messages_per_run": expected, "repeat": args.repeat,
        "raw_pull_msgs_per_s": round(med(raw)),
        "ingest_msgs_per_s": round(med(full)),
        "ingest_without_zap_msgs_per_s": round(med(nozap)),
        "ingest_vs_raw": round(med(full) / med(raw), 3),
        "lost_messages_total": sum(loss),
        "target": {"ingest_msgs_per_s": 200000, "ingest_vs_raw": 0.25},
    }
    result["meets_target"] = (result["ingest_msgs_per_s"] >= 200000
                              and result["ingest_vs_raw"] >= 0.25)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
