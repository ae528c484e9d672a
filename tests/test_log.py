"""The one rate-limited logger (nrm.log.RateLimitedLog)."""

import logging
import threading

from nrm.log import RateLimitedLog


class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def logger():
    lg = logging.getLogger(f"nrm.test.{id(object())}")
    lg.propagate = False
    lg.setLevel(logging.DEBUG)
    h = Lines()
    lg.addHandler(h)
    return lg, h


def test_repeats_are_suppressed_and_counted_with_the_next_line():
    lg, h = logger()
    rl = RateLimitedLog(lg, interval=3600)
    for i in range(5):
        rl.warning("bad message %d", i)
    assert h.lines == ["bad message 0"]
    rl.interval = 0
    rl.warning("bad message %d", 5)
    assert h.lines == ["bad message 0", "bad message 5 (4 similar suppressed)"]


def test_keys_keep_distinct_failures_apart():
    lg, h = logger()
    rl = RateLimitedLog(lg, interval=3600)
    for pkg in (0, 1, 0, 1):
        rl.warning("temperature: %s", f"package {pkg}", key=f"temp{pkg}")
    rl.error("temperature: %s", "x")     # another level, another default key
    assert h.lines == ["temperature: package 0", "temperature: package 1", "temperature: x"]


def test_threads_share_one_limit():
    lg, h = logger()
    rl = RateLimitedLog(lg, interval=3600)
    threads = [threading.Thread(target=lambda: [rl.warning("tick") for _ in range(500)])
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert h.lines == ["tick"]
    rl.interval = 0
    rl.warning("tick")
    assert h.lines[-1] == "tick (1999 similar suppressed)"
