"""A process holding many connections to nrmd, each streaming one flooding
task, for the output budget tests (tests/daemon/test_output_budget.py).

    python -m tests.daemon.flood_clients {nrm|raw} CONNECTIONS LINES OUTDIR

Each connection runs ``seq 1 LINES`` once the file OUTDIR/go exists.
``nrm``: one nrm.client.Client per connection (which credits what it
reads); ``raw``: a bare DEALER that sends the run request without a window
and never credits (an older client). The process prints "ready" once every
task has started (the test stops it, then creates the file), reads every
stream round robin into OUTDIR/N, and exits 0 when every run has exited
with status 0.
"""

import os
import sys

import zmq

from nrm import paths, protocol
from nrm.client import Client
from nrm.manifest import load

BASIC = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "basic.yml")


def with_nrm_clients(n, argv, outdir):
    manifest = load(BASIC)
    runs = []
    for i in range(n):
        out = open(os.path.join(outdir, str(i)), "wb")
        runs.append((Client(), out))
    runs = [(c, c.start(manifest, argv, stdout=out, oversubscribe=True), out)
            for c, out in runs]
    for _, run, _ in runs:
        while not run.result.task:
            run.step(0.1)
    print("ready", flush=True)
    status = 0
    while runs:
        left = []
        for client, run, out in runs:
            if run.step(0.01):
                out.close()
                client.close()
                status |= run.result.status
            else:
                left.append((client, run, out))
        runs = left
    return status


def with_raw_sockets(n, argv, outdir):
    manifest = load(BASIC).to_dict()
    ctx = zmq.Context.instance()
    socks = {}
    uri = paths.upstream_uri(paths.runtime_dir(None))
    for i in range(n):
        s = ctx.socket(zmq.DEALER)
        s.linger = 0
        s.connect(uri)
        s.send(protocol.encode(protocol.Run(id=1, manifest=manifest, argv=argv, cwd="/",
                                            oversubscribe=True, env=dict(os.environ))))
        socks[s] = (i, open(os.path.join(outdir, str(i)), "wb"))
    for s in socks:
        assert isinstance(protocol.decode_reply(s.recv()), protocol.Started)
    print("ready", flush=True)
    poller = zmq.Poller()
    for s in socks:
        poller.register(s, zmq.POLLIN)
    status = 0
    while socks:
        for s, _ in poller.poll(1000):
            frames = s.recv_multipart()
            reply = protocol.decode_reply(frames[0])
            i, out = socks[s]
            if isinstance(reply, protocol.Output):
                out.write(frames[1])
            elif isinstance(reply, (protocol.Exit, protocol.Error)):
                status |= reply.status if isinstance(reply, protocol.Exit) else 1
                out.close()
                poller.unregister(s)
                s.close()
                del socks[s]
    return status


def main():
    kind, n, lines, outdir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    argv = ["sh", "-c", 'while [ ! -e "$0" ]; do sleep 0.05; done; exec seq 1 "$1"',
            os.path.join(outdir, "go"), str(lines)]
    run = with_nrm_clients if kind == "nrm" else with_raw_sockets
    sys.exit(1 if run(n, argv, outdir) else 0)


if __name__ == "__main__":
    main()
