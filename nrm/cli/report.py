"""nrm report: profiles of finished containers."""

from __future__ import annotations

import sys

from nrm.cli.common import add_json_flag, client, dump_json

NAME = "report"
HELP = "show profiles of finished containers"


def add_arguments(p) -> None:
    p.add_argument("container", nargs="?")
    add_json_flag(p)
    p.add_argument("--plot", metavar="FILE.png",
                   help="plot power over the container's life (needs the 'plot' extra)")


def _fmt(value, fmt: str, suffix: str) -> str:
    return "-" if value is None else f"{value:{fmt}}{suffix}"


def execute(args) -> int:
    from nrm.tools.reports import PlotError, summary
    reports = client(args).report(args.container)
    if args.json:
        dump_json(reports)
        return 0
    if args.plot:
        from nrm.tools.reports import plot
        try:
            plot(reports, args.plot)
        except PlotError as exc:
            print(f"nrm: {exc}", file=sys.stderr)
            return 1
    if not reports:
        print("no finished containers with profiles")
        return 0
    print(f"{'CONTAINER':14} {'NAME':16} {'DURATION':>10} {'ENERGY':>11} {'AVG POWER':>10} "
          f"{'POLICY':8} {'DECISIONS':>9}")
    for r in reports:
        s = summary(r)
        # "~": integrated from the sampled power series, not from energy counters.
        approx = "~" if s["energy_source"] == "series" else ""
        energy = _fmt(s["energy_j"], ".1f", " J")
        print(f"{str(s['container']):14} {str(s['name'])[:16]:16} "
              f"{_fmt(s['duration_s'], '.2f', 's'):>10} "
              f"{(approx + energy) if s['energy_j'] is not None else '-':>11} "
              f"{_fmt(s['average_power_w'], '.1f', ' W'):>10} "
              f"{str(s['policy'])[:8]:8} {s['decisions']:>9}")
    if args.plot:
        print(f"plot written to {args.plot}")
    return 0
