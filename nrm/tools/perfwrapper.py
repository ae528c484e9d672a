"""nrm-perfwrapper: count a task's events with `perf stat -I` and report
them downstream as `performance` messages.

The daemon wraps a task with this when its manifest sets `perfwrapper`.
perf runs the command and writes one interval line per period to a pipe we
read (`--log-fd`), so the task's own stdout and stderr are untouched except
for a single line when counting is degraded: hardware `instructions`
unsupported (VMs, containers) falls back to the software `task-clock`
event; no perf at all runs the task uncounted. Either way the task runs and
its exit status is returned.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from typing import List, Optional, Tuple

from nrm.downstream import Client

DEFAULT_EVENT = "instructions"
FALLBACK_EVENT = "task-clock"


def parse_line(line: str) -> Optional[Tuple[float, float, str]]:
    """`perf stat -x, -I` line -> (time s, value, event); None when not counted."""
    fields = line.strip().split(",")
    if len(fields) < 4:
        return None
    try:
        return float(fields[0]), float(fields[1]), fields[3]
    except ValueError:          # "<not counted>", "<not supported>", headers
        return None


def hardware_counts(perf: str, event: str) -> bool:
    r = subprocess.run([perf, "stat", "-x,", "-e", event, "true"], capture_output=True,
                       text=True)
    return r.returncode == 0 and "<not supported>" not in r.stderr


def note(text: str) -> None:
    sys.stderr.write(f"nrm-perfwrapper: {text}\n")
    sys.stderr.flush()


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="nrm-perfwrapper", description=__doc__.split("\n\n")[0])
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between reports")
    ap.add_argument("--event", default=DEFAULT_EVENT, help="perf event to count")
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("no command given")
    perf = shutil.which("perf")
    if perf is None:
        note("perf not found; running the task without counting")
        os.execvp(command[0], command)
    event = args.event
    if not hardware_counts(perf, event):
        note(f"event '{event}' cannot be counted here; counting '{FALLBACK_EVENT}' "
             "(software) instead")
        event = FALLBACK_EVENT
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen(
        [perf, "stat", "-x,", "-I", str(max(10, int(args.interval * 1000))),
         "--log-fd", str(write_fd), "-e", event, "--"] + command, pass_fds=(write_fd,))
    os.close(write_fd)
    last = 0.0
    with Client("perfwrapper") as client, os.fdopen(read_fd) as lines:
        for line in lines:
            parsed = parse_line(line)
            if parsed is None:
                continue
            t, value, name = parsed
            client.performance(name, value, t - last)
            last = t
    status = proc.wait()
    return 128 - status if status < 0 else status


if __name__ == "__main__":
    sys.exit(main())
