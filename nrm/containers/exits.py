"""Task exits, watched through pidfds held in one epoll set.

A launch storm registers and drops one pidfd per task. Through asyncio's
add_reader/remove_reader each pair costs ~7 us of Python bookkeeping (a
Handle, a selector key, dict updates both ways) around ~2 us of epoll_ctl.
Here the pidfds live in their own epoll set, which the loop watches as one
reader: a pair costs the two epoll_ctl calls and a dict update, and exits
that arrive together are handled in one callback.

A callback may be called for a pidfd whose process has not exited (the fd
number was closed and reused within one batch): it must check, as
``waitpid(WNOHANG)`` does.
"""

from __future__ import annotations

import asyncio
import logging
import select
from typing import Callable, Dict, Tuple

from nrm.log import RateLimitedLog

log = logging.getLogger(__name__)
rl_log = RateLimitedLog(log, 10.0)

BATCH = 256


class ExitWatch:
    """Owns the epoll set of task pidfds and the callback per pidfd; the
    event loop sees it as one reader."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._epoll = select.epoll()
        self._watched: Dict[int, Tuple[Callable, tuple]] = {}
        loop.add_reader(self._epoll.fileno(), self._ready)

    def add(self, pidfd: int, callback: Callable, *args) -> None:
        self._epoll.register(pidfd, select.EPOLLIN)
        self._watched[pidfd] = (callback, args)

    def remove(self, pidfd: int) -> None:
        """Before the pidfd is closed: epoll forgets a closed fd only once
        every duplicate of it is closed too."""
        if self._watched.pop(pidfd, None) is not None:
            self._epoll.unregister(pidfd)

    def __len__(self) -> int:
        return len(self._watched)

    def __contains__(self, pidfd: int) -> bool:
        return pidfd in self._watched

    def _ready(self) -> None:
        for fd, _events in self._epoll.poll(0, BATCH):
            entry = self._watched.get(fd)
            if entry is None:
                continue    # removed by an earlier callback of this batch
            callback, args = entry
            try:
                callback(*args)
            except Exception:
                rl_log.error("exit handler failed", exc_info=True)

    def close(self) -> None:
        if self._epoll.closed:
            return
        try:
            self.loop.remove_reader(self._epoll.fileno())
        except (ValueError, OSError, RuntimeError):
            pass
        self._epoll.close()
        self._watched.clear()
