"""The clients that stream tasks, watched so that their tasks die with them.

A task started by ``nrm run`` without ``--detach`` lives as long as its
client: when the client vanishes (interrupted, killed, crashed), nothing
else would ever end the task (over tcp there is no client pid to watch).
Each client process is watched through one pidfd on the event loop, shared
by all of its tasks; the container manager owns a ``ClientWatch`` and hears
which tasks a dead client leaves behind.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Callable, Dict, Set

from nrm.containers.model import Task
from nrm.containers.processes import kill_group

log = logging.getLogger(__name__)

#: watched clients beyond which one left with no task is no longer kept
IDLE_CLIENT_WATCHES = 256


def client_gone(task: Task) -> None:
    """The client that streams this task vanished: kill the task."""
    if not task.detach and not task.finished and task.pid > 0:
        log.info("client of task %s is gone; killing it", task.id)
        kill_group(task.pid)


class ClientWatch:
    """Client pid -> (its pidfd, the ids of its tasks). ``exited(pid,
    task_ids)`` is called once per watched client that exits."""

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 exited: Callable[[int, Set[str]], None]):
        self.loop = loop
        self.exited = exited
        self.watched: Dict[int, tuple] = {}

    def watch(self, pid: int, task: Task) -> bool:
        """False when the client is gone already."""
        entry = self.watched.get(pid)
        if entry is None:
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                # gone while the launch was in flight (a spawner answers
                # later): nothing else would ever kill this task
                client_gone(task)
                return False
            except OSError:
                return True
            entry = (fd, set())
            self.watched[pid] = entry
            self.loop.add_reader(fd, self._on_exit, pid)
        entry[1].add(task.id)
        return True

    def unwatch(self, task: Task) -> None:
        """An idle client keeps its pidfd (a launch loop would otherwise
        open and register one per task) until it exits; past
        IDLE_CLIENT_WATCHES watches, a client going idle is dropped at once."""
        entry = self.watched.get(task.client_pid)
        if entry is None:
            return
        entry[1].discard(task.id)
        if not entry[1] and len(self.watched) > IDLE_CLIENT_WATCHES:
            self.loop.remove_reader(entry[0])
            os.close(entry[0])
            del self.watched[task.client_pid]

    def _on_exit(self, pid: int) -> None:
        fd, ids = self.watched.pop(pid)
        self.loop.remove_reader(fd)
        os.close(fd)
        self.exited(pid, ids)

    def close(self) -> None:
        for fd, _ in self.watched.values():
            self.loop.remove_reader(fd)
            os.close(fd)
        self.watched.clear()
