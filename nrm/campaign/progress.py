"""The coordinator's messages: one line per run always, a bar on a terminal.

A batch job's log gets plain lines, one per finished run, nothing redrawn.
On a terminal the same lines scroll by and a bar stays under them
(runs finished, running, elapsed, an estimate of what is left from the
runs finished in this session), redrawn at most a few times a second.
"""

from __future__ import annotations

import shutil
import time
from typing import Optional, TextIO

PREFIX = "nrm campaign: "
REDRAW_S = 0.25


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """``say`` a line; ``begin(total)``, ``finished()`` per run, ``tick()``
    while waiting, ``end()``. ``bar`` None: a bar when ``out`` is a tty."""

    def __init__(self, out: TextIO, bar: Optional[bool] = None):
        self.out = out
        if bar is None:
            isatty = getattr(out, "isatty", None)
            bar = bool(isatty and isatty())
        self.bar = bar
        self.total = 0
        self.done = 0
        self.running = 0
        self.t0 = time.monotonic()
        self.shown = False
        self.last_draw = 0.0

    def say(self, text: str) -> None:
        self._clear()
        self.out.write(PREFIX + text + "\n")
        self._draw()
        self.out.flush()

    def begin(self, total: int) -> None:
        self.total, self.done, self.t0 = total, 0, time.monotonic()
        self._draw()

    def finished(self) -> None:
        self.done += 1

    def tick(self) -> None:
        if self.bar and time.monotonic() - self.last_draw >= REDRAW_S:
            self._clear()
            self._draw()
            self.out.flush()

    def end(self) -> None:
        self._clear()
        self.total = 0
        self.out.flush()

    def line(self) -> str:
        """The bar's text (for a terminal of ``width`` columns)."""
        width = shutil.get_terminal_size((80, 24)).columns
        elapsed = time.monotonic() - self.t0
        eta = ""
        if self.done and self.done < self.total:
            eta = f", ~{_clock(elapsed / self.done * (self.total - self.done))} left"
        running = f", {self.running} running" if self.running else ""
        tail = f" {self.done}/{self.total}{running}, {_clock(elapsed)}{eta}"
        cells = max(10, min(40, width - len(tail) - 4))
        filled = cells * self.done // max(self.total, 1)
        return ("[" + "#" * filled + "-" * (cells - filled) + "]" + tail)[:width - 1]

    def _draw(self) -> None:
        if not self.bar or not self.total:
            return
        self.out.write("\r" + self.line())
        self.shown = True
        self.last_draw = time.monotonic()

    def _clear(self) -> None:
        if self.shown:
            self.out.write("\r\x1b[K")
            self.shown = False
