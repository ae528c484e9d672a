"""Resuming a killed pilot: replay its journal, then settle the tasks it
left placed but not ended (docs/pilot.md, "Resume").

Each such task's attempt is looked up in its files (nrm/pilot/attempts.py):
an attempt that ended is adopted with its exit code; one still running is
adopted and watched until it ends; one that never ran (fenced now) or died
unrecorded runs again as the next attempt. So no task that finished starts
again, and none is lost.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Dict, List

from nrm.pilot.model import QUEUED, Task
from nrm.pilot.runner import Runner

log = logging.getLogger("nrm.pilot")

#: how often an adopted task's record is looked at
POLL_S = 0.05


def resume(runner: Runner, records: List[Dict[str, Any]]) -> Dict[str, int]:
    """Replay ``records`` into the runner's manager and settle what was
    running; returns how many tasks were adopted done, adopted running,
    and run again."""
    manager, attempts = runner.manager, runner.attempts
    counts = {"adopted_done": 0, "adopted_running": 0, "again": 0}
    for task in manager.replay(records):
        verdict, value = attempts.inspect(task.seq, task.attempt)
        if verdict == "done":
            counts["adopted_done"] += 1
            _end(runner, task, value)
        elif verdict == "running":
            counts["adopted_running"] += 1
            task.pid = value
            task.handle = attempts.container(task.seq, task.attempt)
            if task.message == "canceled":
                runner._kill(task)
            fut = asyncio.ensure_future(_watch(runner, task))
            runner._inflight.add(fut)
            fut.add_done_callback(runner._inflight.discard)
        else:
            counts["again"] += 1
            _again(runner, task)
    _skip_recorded_attempts(manager, attempts.used())
    runner.pump()
    return counts


def _skip_recorded_attempts(manager, used) -> None:
    """A queued task's next attempt must not have a record already: after a
    machine crash the journal may lack the last placements (their records
    were written, not yet synced) while their attempt records exist."""
    for task in manager.by_seq.values():
        if task.state == QUEUED:
            while f"{task.seq}.{task.attempt + 1}" in used:
                task.attempt += 1


def _end(runner: Runner, task: Task, code: int) -> None:
    canceled = task.message == "canceled"
    runner.manager.ended(task, code, time.time(), message=task.message, canceled=canceled)


def _again(runner: Runner, task: Task) -> None:
    now = time.time()
    if task.message == "canceled":
        runner.manager.ended(task, None, now, message="canceled", canceled=True)
        return
    log.info("%s: attempt %d was lost with the previous pilot; running it again",
             task.name, task.attempt)
    runner.manager.requeue(task, now, f"attempt {task.attempt} lost with the pilot")


async def _watch(runner: Runner, task: Task) -> None:
    """An adopted task: wait for its exit code, or for its wrapper to die."""
    attempts = runner.attempts
    record = attempts.path(task.seq, task.attempt)
    while True:
        code = attempts.exit_code(task.seq, task.attempt)
        if code is not None:
            _end(runner, task, code)
            break
        if not attempts.alive(task.pid, record):
            code = attempts.exit_code(task.seq, task.attempt)
            if code is not None:
                _end(runner, task, code)
            else:
                _again(runner, task)
            break
        await asyncio.sleep(POLL_S)
    runner.pump()
