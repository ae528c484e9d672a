"""Who may speak for a container on the downstream endpoint.

Downstream messages name the container they report for; the ZAP handler
gives each connection a kernel-verified "uid:gid:pid". A sender may speak
for a container only if it runs as the container's owner (or root) and is
one of the container's processes: in its cgroups, or a descendant of one of
its tasks (the affinity runtime has no cgroups).
"""

from __future__ import annotations

import time
from typing import Callable, List

#: answers kept per container; beyond, senders are checked every time
MAX_CACHED_SENDERS = 4096
#: a refusal is re-checked after this long: a task's first message can beat
#: the spawner's answer that makes its pid known
REFUSAL_TTL_S = 1.0


class SenderCheck:
    def __init__(self, container_pids: Callable[[object], List[int]]):
        self.container_pids = container_pids     # runtime.pids(handle)

    def owns(self, peer: str, container) -> bool:
        """Cached per peer string (fixed per connection): this runs for every
        downstream message, and parsing the peer each time was a visible
        part of the ingest path at high rates."""
        cache = container.extra.setdefault("senders", {})
        known = cache.get(peer)
        now = time.monotonic()
        if known is True or (known is not None and now < known):
            return known is True
        try:
            uid, _gid, pid = (int(x) for x in peer.split(":"))
        except ValueError:
            return False
        if uid != 0 and uid != container.uid:
            ok = False
        else:
            ok = pid in self.container_pids(container.handle) or descends_from(
                pid, [t.pid for t in container.tasks.values()])
        if len(cache) < MAX_CACHED_SENDERS:
            cache[peer] = True if ok else now + REFUSAL_TTL_S
        return ok


def descends_from(pid: int, ancestors: List[int]) -> bool:
    """Whether ``pid`` has one of ``ancestors`` up its parent chain (64 steps at most)."""
    seen = 0
    while pid > 1 and seen < 64:
        if pid in ancestors:
            return True
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
        seen += 1
    return False
