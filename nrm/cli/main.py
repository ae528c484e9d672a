"""`nrm`: the command-line client. One module per verb in this package, each
with NAME, HELP, ``add_arguments(parser)`` and ``execute(args) -> int``.

Every error is one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import math
import sys

from nrm import __version__
from nrm.cli import (build_interposer, campaign, keygen, kill, listen, listing, pilot, power,
                     report, run, setpower, status)
from nrm.client import NrmError
from nrm.manifest import ManifestError

VERBS = (run, listing, kill, listen, status, power, setpower, report, keygen, build_interposer,
         pilot, campaign)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nrm", description="talk to the node's nrmd")
    p.add_argument("--version", action="version", version=f"nrm {__version__}")
    p.add_argument("--runtime-dir", help="where nrmd's sockets are (env NRM_RUNTIME_DIR)")
    p.add_argument("--timeout", type=_seconds, default=5.0, help="seconds to wait for a reply")
    p.add_argument("--uri", metavar="tcp://HOST:PORT",
                   help="a remote nrmd's TCP endpoint (env NRM_URI; default: the local nrmd)")
    p.add_argument("--server-key", metavar="FILE",
                   help="that nrmd's public key file (env NRM_CURVE_SERVER_KEY)")
    p.add_argument("--key", metavar="FILE",
                   help="your keypair file, from nrm keygen (env NRM_CURVE_KEY)")
    sub = p.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    for verb in VERBS:
        sp = sub.add_parser(verb.NAME, help=verb.HELP, description=verb.HELP)
        verb.add_arguments(sp)
        sp.set_defaults(execute=verb.execute)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.execute(args)
    except ManifestError as exc:
        print(f"nrm: manifest: {exc}", file=sys.stderr)
        return 1
    except NrmError as exc:
        print(f"nrm: {exc}", file=sys.stderr)
        return 127 if exc.code == "exec" else 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 1
    except OSError as exc:
        print(f"nrm: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
