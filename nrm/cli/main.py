"""`nrm`: the command-line client. One module per verb in this package, each
with NAME, HELP, ``add_arguments(parser)`` and ``execute(args) -> int``.

Every error is one line on stderr and a non-zero exit, never a traceback.

Only the chosen verb's module is imported: every `srun ... nrm run` step
pays for the CLI's imports, and pilot or campaign pull in asyncio, PyYAML
and more (benchmarks/cli_startup.py). VERBS names each verb's module and
help; ``nrm --help`` and a command line without a known verb import none.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys

from nrm import __version__

#: verb -> (module, help); each module's NAME and HELP say the same (tests/test_cli_imports.py)
VERBS = {
    "run": ("nrm.cli.run", "run a command inside a resource slice"),
    "list": ("nrm.cli.listing", "list containers"),
    "kill": ("nrm.cli.kill", "kill a container and all its tasks"),
    "listen": ("nrm.cli.listen", "print daemon events (power, containers, progress, "
                                 "decisions...)"),
    "status": ("nrm.cli.status", "show daemon status and counters"),
    "power": ("nrm.cli.power", "show the latest power sample and the power cap"),
    "setpower": ("nrm.cli.setpower", "set the node power cap in watts ('off' clears it; "
                                     "root or the power group)"),
    "report": ("nrm.cli.report", "show profiles of finished containers"),
    "keys": ("nrm.cli.keys", "show (and fence) or forget your task keys kept by nrmd"),
    "keygen": ("nrm.cli.keygen", "write a CurveZMQ keypair (FILE, mode 0600) and its public "
                                 "key (FILE.pub)"),
    "build-interposer": ("nrm.cli.build_interposer",
                         "build the PMPI interposer against an MPI compiler wrapper"),
    "pilot": ("nrm.cli.pilot", "run many small tasks from a QCG-PilotJob request file, "
                               "each in its own slice"),
    "campaign": ("nrm.cli.campaign", "run checkpointed sweeps of programs x policies x caps "
                                     "x repetitions"),
}

#: global options that take a value (the verb is the first word that is none of these)
_VALUED = ("--runtime-dir", "--timeout", "--uri", "--server-key", "--key")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def chosen_verb(argv) -> str:
    """The verb on a command line, or "" (none, or help asked for first)."""
    words = iter(argv)
    for word in words:
        if word in _VALUED:
            next(words, None)
        elif word.startswith("-"):
            if word in ("-h", "--help"):
                return ""
        else:
            return word if word in VERBS else ""
    return ""


def build_parser(verb: str = "") -> argparse.ArgumentParser:
    """The whole parser; with ``verb``, only that verb's module is imported
    (the others are listed with their help, without arguments)."""
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
    for name, (module_name, help_text) in VERBS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if name == verb:
            module = importlib.import_module(module_name)
            module.add_arguments(sp)
            sp.set_defaults(execute=module.execute)
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    verb = chosen_verb(argv)
    if verb == "pilot":
        from nrm.cli import early
        early.maybe_start(argv)     # its nrmd boots while the imports below run
    from nrm.client import NrmError
    args = build_parser(verb).parse_args(argv)
    try:
        return args.execute(args)
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
    except ValueError as exc:
        # a ManifestError (a ValueError) comes only from a verb that loaded
        # nrm.manifest: looked up, not imported, so the other verbs skip it
        manifest = sys.modules.get("nrm.manifest")
        if manifest is None or not isinstance(exc, manifest.ManifestError):
            raise
        print(f"nrm: manifest: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
