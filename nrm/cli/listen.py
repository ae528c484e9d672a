"""nrm listen: follow the daemon's events."""

from __future__ import annotations

import json
import sys

from nrm.cli.common import client

NAME = "listen"
HELP = "print daemon events (power, containers, progress, decisions...)"


def add_arguments(p) -> None:
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--topic", "-t", action="append", default=[],
                   help="only this topic (repeatable): container, task, power, progress, "
                        "phase_context, performance, decision")
    p.add_argument("--count", "-n", type=int, default=0, help="stop after N events")


def execute(args) -> int:
    # the client stays referenced until closed: a collected one would close its
    # monitor before its socket, and libzmq blocks sending to a closed monitor
    conn = client(args)
    sock = conn.subscribe(args.topic or [""])
    seen = 0
    try:
        while not args.count or seen < args.count:
            topic, body = sock.recv_multipart()
            event = json.loads(body)
            topic = topic.decode()
            if args.json:
                print(json.dumps({"topic": topic, **event}), flush=True)
            else:
                fields = " ".join(f"{k}={json.dumps(v)}" for k, v in sorted(event.items()))
                print(f"{topic} {fields}", flush=True)
            seen += 1
    except KeyboardInterrupt:
        pass
    finally:
        sock.close(linger=0)
        conn.close()
    sys.stdout.flush()
    return 0
