"""nrm keys: read or forget your task keys (docs/protocol.md, "Task keys").

Why a verb: a pilot killed and never resumed leaves its keys in nrmd
(nrmd keeps them until their owner forgets them, at most 16384 per user);
``nrm keys forget --prefix PILOT.`` (or ``--all``) frees them. Never those
of a pilot still to be resumed: its resume reads which tasks ended from
them, and takes a forgotten key for a launch that never ran (the task runs
again); nrmd cannot tell such a pilot from a finished one, so this verb
says so on stderr whenever it forgets by prefix. ``nrm keys show KEY...``
claims the keys, which fences the unknown ones: a launch with one of them
is refused afterwards.
"""

import json
import sys

from nrm.cli.common import client

NAME = "keys"
HELP = "show (and fence) or forget your task keys kept by nrmd"


def add_arguments(p) -> None:
    p.add_argument("action", choices=("show", "forget"))
    p.add_argument("names", nargs="*", metavar="KEY")
    p.add_argument("--prefix", help="forget: every ended key that starts with PREFIX")
    p.add_argument("--all", action="store_true", help="forget: every ended key of yours")


def execute(args) -> int:
    c = client(args)
    if args.action == "show":
        if args.prefix or args.all:
            print("nrm keys: show takes keys, not --prefix or --all", file=sys.stderr)
            return 2
        print(json.dumps(c.claim(args.names), indent=2))
        return 0
    prefix = "" if args.all else args.prefix
    if prefix is None and not args.names:
        print("nrm keys: forget needs KEY..., --prefix PREFIX or --all", file=sys.stderr)
        return 2
    if prefix is not None:
        print("nrm keys: forgetting keys a killed pilot still needs makes its resume run "
              "their finished tasks again: forget only those of finished pilots",
              file=sys.stderr)
    print(f"forgot {c.forget(args.names, prefix)} keys")
    return 0
