"""Small process operations shared by the container wing and the daemon's
restart reconciliation: killing a task's process group, reaping, probing,
reopening a pipe through /proc.

Each task leads its own process group, so killing "a task and what it
forked" is one killpg. Every caller wants the same answer to a group that
is gone already or not ours (nothing to do, nothing to report): that rule
lives here once.
"""

from __future__ import annotations

import os
import signal


def kill_group(pgid: int) -> None:
    """SIGKILL a process group; one that is gone or not ours is left alone."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def reap(pid: int) -> None:
    """Kill a task whose group was just killed (it may have left its group)
    and wait for it; an adopted task is not our child."""
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError, PermissionError):
        pass


def alive(pid: int) -> bool:
    """Whether a process exists (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def reopen_pipe(pid: int, fd: int) -> int:
    """A new read end of the pipe a process writes to, or -1."""
    path = f"/proc/{pid}/fd/{fd}"
    try:
        if not os.readlink(path).startswith("pipe:"):
            return -1
        return os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return -1
