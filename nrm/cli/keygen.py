"""nrm keygen: create a CurveZMQ keypair for nrm's TCP endpoints.

The secret half never leaves the file it is created in (mode 0600 from the
first byte); the public half goes to FILE.pub, which is what a user hands
to the admin (for nrmd's users file) or the admin hands to users (nrmd's
server key).
"""

from __future__ import annotations

from nrm.transport import curve
from nrm.client import ConfigError

NAME = "keygen"
HELP = "write a CurveZMQ keypair (FILE, mode 0600) and its public key (FILE.pub)"


def add_arguments(p) -> None:
    p.add_argument("file", metavar="FILE")
    p.add_argument("--force", "-f", action="store_true", help="replace an existing FILE")


def execute(args) -> int:
    try:
        keys = curve.write_keypair(args.file, force=args.force)
    except curve.CurveError as exc:
        raise ConfigError(str(exc)) from None
    print(f"{args.file}: keypair; {args.file}.pub: public key {keys.public.decode()}")
    return 0
