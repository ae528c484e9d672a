"""How far a pilot is, on stderr: a bar on a terminal, plain lines otherwise.

A pilot runs thousands of tasks: a line per task would drown a batch job's
log, so without a terminal a line is written each time another tenth of
the tasks is final (and at the end); on a terminal one bar (final/total,
running, elapsed, an estimate of what is left) is redrawn a few times a
second. Both read the manager's counters on a timer: nothing per task.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from typing import Optional, TextIO

from nrm.pilot.manager import Manager

PREFIX = "nrm pilot: "
REDRAW_S = 0.25
LINE_CHECK_S = 1.0


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    def __init__(self, manager: Manager, out: TextIO, mode: str = "auto"):
        self.manager = manager
        self.out = out
        if mode == "auto":
            isatty = getattr(out, "isatty", None)
            mode = "bar" if isatty and isatty() else "lines"
        self.mode = mode
        self.t0 = time.monotonic()
        self.next_tenth = 1
        self.shown = False
        self._task: Optional[asyncio.Task] = None

    def counts(self):
        m = self.manager
        return m.final_tasks, len(m.by_seq), len(m.running) - m.committed()

    def text(self) -> str:
        done, total, running = self.counts()
        elapsed = time.monotonic() - self.t0
        eta = ""
        if 0 < done < total:
            eta = f", ~{_clock(elapsed / done * (total - done))} left"
        return f"{done}/{total} tasks final, {running} running, {_clock(elapsed)}{eta}"

    def bar(self) -> str:
        done, total, _ = self.counts()
        width = shutil.get_terminal_size((80, 24)).columns
        tail = " " + self.text()
        cells = max(10, min(40, width - len(tail) - 4))
        filled = cells * done // max(total, 1)
        return ("[" + "#" * filled + "-" * (cells - filled) + "]" + tail)[:width - 1]

    def update(self) -> None:
        if self.mode == "bar":
            self.out.write("\r\x1b[K" + self.bar())
            self.shown = True
            self.out.flush()
        elif self.mode == "lines":
            done, total, _ = self.counts()
            if total and done * 10 >= self.next_tenth * total and done < total:
                self.next_tenth = done * 10 // total + 1
                self.out.write(PREFIX + self.text() + "\n")
                self.out.flush()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(REDRAW_S if self.mode == "bar" else LINE_CHECK_S)
            self.update()

    def start(self) -> None:
        if self.mode != "none":
            self._task = asyncio.ensure_future(self._loop())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self.shown:
            self.out.write("\r\x1b[K")
            self.shown = False
            self.out.flush()
        elif self.mode == "lines" and self.counts()[1]:
            self.out.write(PREFIX + self.text() + "\n")     # the last tenth
            self.out.flush()
