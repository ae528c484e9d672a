"""Logging set-up for nrmd: one line per event, text or JSON, and a
rate-limited logger for hot paths (a flood of bad messages must not become
a flood of log lines)."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Dict, Tuple


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"time": round(record.created, 6), "level": record.levelname.lower(),
               "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup(level: str = "info", fmt: str = "text", stream=None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class RateLimitedLog:
    """At most one line per (level, format) per ``interval`` seconds, with a
    count of what was suppressed in between."""

    def __init__(self, logger: logging.Logger, interval: float = 1.0):
        self.logger = logger
        self.interval = interval
        self._last: Dict[Tuple[int, str], Tuple[float, int]] = {}

    def log(self, level: int, fmt: str, *args, exc_info=False) -> None:
        now = time.monotonic()
        key = (level, fmt)
        last, suppressed = self._last.get(key, (0.0, 0))
        if now - last < self.interval:
            self._last[key] = (last, suppressed + 1)
            return
        self._last[key] = (now, 0)
        if suppressed:
            fmt = fmt + " (%d similar suppressed)"
            args = args + (suppressed,)
        self.logger.log(level, fmt, *args, exc_info=exc_info)

    def info(self, fmt, *args):
        self.log(logging.INFO, fmt, *args)

    def warning(self, fmt, *args):
        self.log(logging.WARNING, fmt, *args)

    def error(self, fmt, *args, exc_info=False):
        self.log(logging.ERROR, fmt, *args, exc_info=exc_info)
