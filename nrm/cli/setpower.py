"""nrm setpower: set or clear the node power cap."""

import argparse
import math

from nrm.cli.common import client, fmt_watts
from nrm.protocol import MAX_POWER_CAP_W

NAME = "setpower"
HELP = "set the node power cap in watts ('off' clears it; root or the power group)"


def _watts(text):
    if text.lower() in ("off", "none", "clear"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected watts or 'off', got {text!r}") from None
    if not math.isfinite(value) or not 0 < value <= MAX_POWER_CAP_W:
        raise argparse.ArgumentTypeError(
            f"expected watts in (0, {MAX_POWER_CAP_W:.0f}] or 'off', got {text!r}")
    return value


def add_arguments(p) -> None:
    p.add_argument("watts", type=_watts, metavar="WATTS|off")


def execute(args) -> int:
    data = client(args).setpower(args.watts)
    cap = data.get("cap_w")
    print(f"power cap: {fmt_watts(cap)}" if cap else "power cap cleared")
    return 0
