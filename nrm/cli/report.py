"""nrm report: profiles of finished containers."""

from __future__ import annotations

from nrm.cli.common import client, dump_json

NAME = "report"
HELP = "show profiles of finished containers"


def add_arguments(p) -> None:
    p.add_argument("container", nargs="?")
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", metavar="FILE.png",
                   help="plot power over the container's life (needs the 'plot' extra)")


def execute(args) -> int:
    reports = client(args).report(args.container)
    if args.json:
        dump_json(reports)
        return 0
    if args.plot:
        from nrm.reporting import plot
        plot(reports, args.plot)
    if not reports:
        print("no finished containers with profiles")
        return 0
    print(f"{'CONTAINER':14} {'NAME':16} {'DURATION':>10} {'ENERGY':>10} {'AVG POWER':>10}")
    for r in reports:
        e = r.get("energy") or {}
        energy = e.get("energy_j")
        avg = e.get("average_power_w")
        print(f"{r['container']:14} {str(r.get('name'))[:16]:16} {r['duration_s']:>9.2f}s "
              f"{(f'{energy:.1f} J' if energy is not None else '-'):>10} "
              f"{(f'{avg:.1f} W' if avg is not None else '-'):>10}")
    return 0
