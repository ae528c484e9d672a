"""nrm campaign: checkpointed sweeps (run, status, table, summary, plot).

Exit status: 0 when every run is ok, 1 when some are not (the table is
still written), 2 when nothing could be run (a bad campaign file, a
directory another coordinator holds, finished runs with changed inputs),
130 after Ctrl-C.
"""

from __future__ import annotations

import os
import sys

from nrm.campaign import journal, runner, slurmrun, spec
from nrm.campaign import status as status_mod
from nrm.campaign import table as table_mod
from nrm.cli.common import dump_json

NAME = "campaign"
HELP = "run checkpointed sweeps of programs x policies x caps x repetitions"


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="campaign_verb", metavar="SUBCOMMAND")
    sub.required = True
    r = sub.add_parser("run", help="run (or continue) a campaign in DIR")
    r.add_argument("file", help="the campaign file (YAML)")
    r.add_argument("--dir", help="the results directory (default: campaign-NAME)")
    r.add_argument("--dry-run", action="store_true", help="list every run, start nothing")
    r.add_argument("--retry-failed", action="store_true", help="run failed runs again")
    r.add_argument("--nodes", default="auto", metavar="auto|local|N1,N2",
                   help="where runs go: auto (default) = every node of the Slurm allocation "
                        "this runs in, else this node; local = this node's nrmd only; "
                        "N1,N2 = those nodes of the allocation")
    changed = r.add_mutually_exclusive_group()
    changed.add_argument("--rerun-changed", dest="changed", action="store_const", const="rerun",
                         help="run again finished runs whose command/env/manifest changed")
    changed.add_argument("--keep-changed", dest="changed", action="store_const", const="keep",
                         help="keep the results of finished runs whose inputs changed")
    r.set_defaults(campaign_execute=_run)
    s = sub.add_parser("status", help="counts by outcome and per parameter value")
    s.add_argument("dir")
    s.add_argument("--json", action="store_true")
    s.set_defaults(campaign_execute=_status)
    t = sub.add_parser("table", help="one row per run, as CSV or Parquet")
    t.add_argument("dir")
    t.add_argument("-o", "--output", required=True, metavar="FILE.csv|FILE.parquet")
    t.add_argument("--attempts", choices=("last", "all"), default="last")
    t.set_defaults(campaign_execute=_table)
    m = sub.add_parser("summary", help="median and IQR per combination, ratios to NONE")
    m.add_argument("dir")
    m.add_argument("--json", action="store_true")
    m.set_defaults(campaign_execute=_summary)
    g = sub.add_parser("plot", help="energy (or --y) and time per parameter value, and "
                                    "energy against time, per policy")
    g.add_argument("dir")
    g.add_argument("-o", "--output", required=True, metavar="FILE.png")
    g.add_argument("--x", default="", help="parameter on the x axis (default: the first "
                                           "that is not --hue)")
    g.add_argument("--y", default="energy_j", help="column to plot (default energy_j)")
    g.add_argument("--hue", default="policy", help="one box colour per value of this")
    g.set_defaults(campaign_execute=_plot)


def _fail(message: str, code: int) -> int:
    print(f"nrm campaign: {message}", file=sys.stderr)
    return code


def _client_factory(args):
    """The CLI's client; when the user named a daemon, no private fallback."""
    from nrm.cli.common import client

    def make():
        return client(args)
    make.explicit = bool(args.runtime_dir or args.uri or os.environ.get("NRM_URI")
                         or os.environ.get("NRM_RUNTIME_DIR"))
    return make


def _run(args) -> int:
    try:
        camp = spec.load(args.file)
    except spec.CampaignError as exc:
        return _fail(str(exc), runner.EXIT_BAD)
    directory = args.dir or f"campaign-{camp.name}"
    if args.dry_run:
        return runner.dry_run(camp, directory)
    try:
        coord = slurmrun.coordinator(camp, directory, args.nodes, client=_client_factory(args),
                                     retry_failed=args.retry_failed, changed=args.changed)
        return coord.run()
    except journal.Busy as exc:
        return _fail(str(exc), runner.EXIT_BAD)
    except runner.ChangedInputs as exc:
        return _fail(str(exc), runner.EXIT_BAD)
    except journal.JournalError as exc:
        return _fail(str(exc), runner.EXIT_FAILED)


def _status(args) -> int:
    try:
        data = status_mod.collect(args.dir)
    except journal.JournalError as exc:
        return _fail(str(exc), 1)
    for w in data["warnings"]:
        print(f"nrm campaign: warning: {w}", file=sys.stderr)
    if args.json:
        dump_json(data)
    else:
        print("\n".join(status_mod.render(data)))
    return 0


def _table(args) -> int:
    try:
        n = table_mod.write(args.dir, args.output, args.attempts)
    except (table_mod.TableError, journal.JournalError) as exc:
        return _fail(str(exc), 1)
    except OSError as exc:
        return _fail(f"{args.output}: {exc.strerror or exc}", 1)
    print(f"{n} rows written to {args.output}", file=sys.stderr)
    return 0


def _summary(args) -> int:
    try:
        entries = table_mod.summary(args.dir)
    except (table_mod.TableError, journal.JournalError) as exc:
        return _fail(str(exc), 1)
    if args.json:
        dump_json(entries)
    else:
        print("\n".join(table_mod.render_summary(entries)))
    return 0


def _plot(args) -> int:
    try:
        table_mod.plot(args.dir, args.output, x=args.x, y=args.y, hue=args.hue)
    except (table_mod.TableError, journal.JournalError) as exc:
        return _fail(str(exc), 1)
    print(f"plot written to {args.output}", file=sys.stderr)
    return 0


def execute(args) -> int:
    return args.campaign_execute(args)
