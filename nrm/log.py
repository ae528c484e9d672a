"""Logging set-up for nrmd: one line per event, text or JSON, and a
rate-limited logger for hot paths (a flood of bad messages must not become
a flood of log lines)."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from typing import Dict, Hashable, Optional, Tuple


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
    """At most one line per key per ``interval`` seconds, with a count of
    what was suppressed in between, so that nothing is silently lost.

    Hot paths (a flood of bad messages, 5 ms sensor ticks, 20 ms thread
    placement) would otherwise flood the log with the same line. The key is
    the (level, format) pair unless the caller names one (a signal, a
    package: one line per thing that fails). Thread-safe: the sensor and
    placement threads log through it too."""

    def __init__(self, logger: logging.Logger, interval: float = 1.0):
        self.logger = logger
        self.interval = interval
        self._last: Dict[Hashable, Tuple[float, int]] = {}
        self._lock = threading.Lock()

    def log(self, level: int, fmt: str, *args, key: Optional[Hashable] = None,
            exc_info=False) -> None:
        now = time.monotonic()
        key = (level, fmt) if key is None else key
        with self._lock:
            last, suppressed = self._last.get(key, (-self.interval, 0))
            if now - last < self.interval:
                self._last[key] = (last, suppressed + 1)
                return
            self._last[key] = (now, 0)
        if suppressed:
            fmt = fmt + " (%d similar suppressed)"
            args = args + (suppressed,)
        self.logger.log(level, fmt, *args, exc_info=exc_info)

    def info(self, fmt, *args, key: Optional[Hashable] = None):
        self.log(logging.INFO, fmt, *args, key=key)

    def warning(self, fmt, *args, key: Optional[Hashable] = None):
        self.log(logging.WARNING, fmt, *args, key=key)

    def error(self, fmt, *args, key: Optional[Hashable] = None, exc_info=False):
        self.log(logging.ERROR, fmt, *args, key=key, exc_info=exc_info)
