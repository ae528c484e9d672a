"""Small helpers shared by the verbs."""

from __future__ import annotations

import json
import sys

from nrm.client import Client


def client(args) -> Client:
    return Client(args.runtime_dir, timeout=args.timeout, uri=args.uri,
                  server_key=args.server_key, key=args.key)


def dump_json(data) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")


def fmt_watts(value) -> str:
    return "-" if value is None else f"{value:.1f} W"
