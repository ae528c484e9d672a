"""nrm power: latest power sample and the node cap."""

from nrm.cli.common import add_json_flag, client, fmt_watts, show

NAME = "power"
HELP = "show the latest power sample and the power cap"


def add_arguments(p) -> None:
    add_json_flag(p)


def execute(args) -> int:
    return show(args, client(args).power(), render)


def render(data) -> None:
    sample = data.get("sample")
    label = data.get("backend") or "none"
    if data.get("emulated"):
        label += " (emulated)"
    print(f"hardware: {label}; cap: {fmt_watts(data.get('cap_w'))}")
    if not sample:
        print("no sample yet")
        return
    print(f"node: {fmt_watts(sample.get('node_power_w'))}")
    for pkg, p in sorted((sample.get("packages") or {}).items()):
        temp = p.get("temperature_c")
        print(f"package {pkg}: {fmt_watts(p.get('power_w'))}, "
              f"dram {fmt_watts(p.get('dram_power_w'))}, energy {p.get('energy_j', 0):.1f} J"
              + (f", {temp:.1f} C" if temp is not None else ""))
