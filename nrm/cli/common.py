"""Small helpers shared by the verbs."""

from __future__ import annotations

import json
import sys
from typing import Callable

from nrm.client import Client


def client(args) -> Client:
    return Client(args.runtime_dir, timeout=args.timeout, uri=args.uri,
                  server_key=args.server_key, key=args.key)


def add_json_flag(p) -> None:
    p.add_argument("--json", action="store_true", help="print the daemon's answer as JSON")


def show(args, data, render: Callable[[object], None]) -> int:
    """A query verb's output: the daemon's answer as JSON with --json, else
    ``render``'s lines."""
    if args.json:
        dump_json(data)
    else:
        render(data)
    return 0


def dump_json(data) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")


def fmt_watts(value) -> str:
    return "-" if value is None else f"{value:.1f} W"
