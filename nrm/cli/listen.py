"""nrm listen: follow the daemon's events, until nrmd goes away."""

from __future__ import annotations

import json
import sys

from nrm.cli.common import client
from nrm.client import NrmError

NAME = "listen"
HELP = "print daemon events (power, containers, progress, decisions...)"


def add_arguments(p) -> None:
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--topic", "-t", action="append", default=[],
                   help="only this topic or topic prefix (repeatable): container, task, "
                        "power, progress, phase_context, performance, decision, daemon")
    p.add_argument("--count", "-n", type=int, default=0, help="stop after N events")


def execute(args) -> int:
    """Exits 0 after --count events or ^C, 1 when nrmd is lost (it died,
    stopped, or stopped answering heartbeats), 2 for an unknown topic."""
    # the client stays referenced until closed: a collected one would close its
    # monitor before its socket, and libzmq blocks sending to a closed monitor
    conn = client(args)
    try:
        events = conn.events(args.topic or [""])
    except NrmError as exc:
        if exc.code != "usage":
            raise
        conn.close()
        print(f"nrm listen: {exc}", file=sys.stderr)
        return 2
    seen = 0
    try:
        while not args.count or seen < args.count:
            topic, event = events.recv()
            if args.json:
                print(json.dumps({"topic": topic, **event}), flush=True)
            else:
                fields = " ".join(f"{k}={json.dumps(v)}" for k, v in sorted(event.items()))
                print(f"{topic} {fields}", flush=True)
            seen += 1
    except KeyboardInterrupt:
        pass
    finally:
        events.close()
        conn.close()
    sys.stdout.flush()
    return 0
