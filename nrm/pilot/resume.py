"""Resuming a killed pilot: replay its journal, then settle the tasks it
left placed but not ended (docs/pilot.md, "Resume").

Each such task's attempt is looked up (nrm/pilot/attempts.py): in its
file when it has one (it was launched with the fence: under an older nrmd,
or after nrmd refused its key with ``keys_full``), else with one ``claim``
of the task keys when nrmd has keys, which also fences the attempts nrmd
never saw, and in the attempt's file (which fences it too) for a key nrmd
does not know. An attempt that ended is adopted with its exit code; one still
running is adopted and watched until it ends (its key polled, or its
file); one that never ran (fenced now) or was interrupted without an exit
code runs again as the next attempt. So no task that finished starts
again, and none is lost.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Dict, List, Optional

from nrm.client import NrmError
from nrm.pilot.attempts import batches
from nrm.pilot.model import QUEUED, Task
from nrm.pilot.runner import Runner

log = logging.getLogger("nrm.pilot")

#: how often an adopted task's record is looked at
POLL_S = 0.05
#: how often nrmd is asked about adopted keyed tasks (one claim for all)
KEY_POLL_S = 0.1


async def resume(runner: Runner, records: List[Dict[str, Any]]) -> Dict[str, int]:
    """Replay ``records`` into the runner's manager and settle what was
    running; returns how many tasks were adopted done, adopted running,
    and run again."""
    manager, attempts = runner.manager, runner.attempts
    counts = {"adopted_done": 0, "adopted_running": 0, "again": 0}
    interrupted = manager.replay(records)
    states = await _claim(runner, interrupted, _last_epoch(records))
    watched: Dict[str, Task] = {}
    for task in interrupted:
        key = attempts.key(task.seq, task.attempt)
        state = states.get(key) or {"state": "unknown"}
        if state["state"] in ("unknown", "fenced"):   # not launched with its key
            _settle_file(runner, task)
        elif not _settle_key(runner, task, state):
            _adopt(runner, task, task.pid, attempts.container(task.seq, task.attempt))
            watched[key] = task
    for task in interrupted:
        if task.state == QUEUED:
            counts["again"] += 1
        elif task.final:
            counts["adopted_done"] += 1
        else:
            counts["adopted_running"] += 1
    if watched:
        fut = asyncio.ensure_future(_watch_keys(runner, watched))
        runner._inflight.add(fut)
        fut.add_done_callback(runner._inflight.discard)
    _skip_recorded_attempts(manager, attempts.used())
    runner.pump()
    return counts


def _last_epoch(records: List[Dict[str, Any]]) -> Optional[str]:
    """The key memory of nrmd the last pilot launched with (its journal's
    last ``keys`` record), None when it used the fence."""
    epoch = None
    for r in records:
        if r.get("t") == "keys":
            epoch = r.get("epoch")
    return epoch


async def _claim(runner: Runner, tasks: List[Task], epoch: Optional[str]) -> Dict[str, dict]:
    """The states of the tasks' keys, fencing the ones nrmd never saw;
    nothing when nrmd has no keys (all attempts then have files).

    An attempt that has a file is not claimed: only the fence writes one,
    and the pilot launches with the fence after nrmd refused the attempt's
    key, so that key never runs (and claiming it would take room that a
    pilot which fell back to the fence because nrmd was full lacks)."""
    attempts = runner.attempts
    if not attempts.keyed or not tasks:
        if epoch is not None and tasks:
            log.warning("the previous pilot launched with task keys, this nrmd keeps none: "
                        "tasks it left running that ended unheard run again")
        return {}
    used = attempts.used()
    keys = [attempts.key(t.seq, t.attempt) for t in tasks
            if f"{t.seq}.{t.attempt}" not in used]
    try:
        replies = [await runner.client.claim(batch) for batch in batches(keys)]
    except NrmError as exc:
        if exc.code != "keys_full":
            raise
        log.warning("%s: forgetting the keys of this pilot's ended attempts first", exc)
        await _forget_ended(runner, tasks)
        replies = [await runner.client.claim(batch) for batch in batches(keys)]
    states: Dict[str, dict] = {}
    for reply in replies:
        states.update(reply["keys"])
        if epoch is not None and reply.get("epoch") != epoch:
            log.warning("nrmd's task keys are not those the previous pilot launched with "
                        "(epoch %s, was %s: the node restarted?): a task it left running that "
                        "ended unheard runs again", reply.get("epoch"), epoch)
            epoch = None
    return states


async def _forget_ended(runner: Runner, interrupted: List[Task]) -> None:
    """nrmd forgets the keys of every attempt the journal records as ended
    (the records just read are in the file: a successor reads them too),
    never an interrupted one's, whose state is still to be claimed."""
    attempts = runner.attempts
    skip = {(t.seq, t.attempt) for t in interrupted}
    keys = [attempts.key(t.seq, a) for t in runner.manager.by_seq.values()
            for a in range(1, t.attempt + 1) if (t.seq, a) not in skip]
    for batch in batches(keys):
        await runner.client.forget(batch)


def _settle_file(runner: Runner, task: Task) -> None:
    """An attempt launched with the fence: its file says (and fences it)."""
    attempts = runner.attempts
    verdict, value = attempts.inspect(task.seq, task.attempt)
    if verdict == "done":
        _end(runner, task, value)
    elif verdict == "running":
        _adopt(runner, task, value, attempts.container(task.seq, task.attempt))
        fut = asyncio.ensure_future(_watch(runner, task))
        runner._inflight.add(fut)
        fut.add_done_callback(runner._inflight.discard)
    else:
        _again(runner, task)


def _settle_key(runner: Runner, task: Task, state: dict) -> bool:
    """An adopted keyed task's state: True once it is settled (ended or
    queued again), False while it runs."""
    kind = state["state"]
    if kind == "exited":
        if state.get("status") is None:
            task.message = task.message or ("its exit status is unknown: nrmd restarted "
                                            "and adopted it while it ran")
        _end(runner, task, state.get("status"))
    elif kind == "failed":
        _end(runner, task, None, state.get("message") or "nrmd refused the launch")
    elif kind in ("running", "pending"):
        task.pid = state.get("pid") or task.pid
        return False
    else:                           # lost, or (forgotten, fenced by this claim) never ran
        _again(runner, task)
    return True


def _adopt(runner: Runner, task: Task, pid: Optional[int], container: str) -> None:
    task.pid = pid
    task.handle = container
    if task.message == "canceled":
        runner._kill(task)


def _skip_recorded_attempts(manager, used) -> None:
    """A queued task's next attempt must not have a record already: after a
    machine crash the journal may lack the last placements (their records
    were written, not yet synced) while their attempt records exist."""
    for task in manager.by_seq.values():
        if task.state == QUEUED:
            while f"{task.seq}.{task.attempt + 1}" in used:
                task.attempt += 1


def _end(runner: Runner, task: Task, code: Optional[int], message: Optional[str] = None) -> None:
    canceled = task.message == "canceled"
    runner.manager.ended(task, code, time.time(), message=message or task.message,
                         canceled=canceled)


def _again(runner: Runner, task: Task) -> None:
    now = time.time()
    if task.message == "canceled":
        runner.manager.ended(task, None, now, message="canceled", canceled=True)
        return
    log.info("%s: attempt %d was lost with the previous pilot; running it again",
             task.name, task.attempt)
    runner.manager.requeue(task, now, f"attempt {task.attempt} lost with the pilot")


async def _watch(runner: Runner, task: Task) -> None:
    """An adopted task launched with the fence: wait for its exit code, or
    for its wrapper to die."""
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


async def _watch_keys(runner: Runner, tasks: Dict[str, Task]) -> None:
    """Adopted keyed tasks: one claim for all of them every KEY_POLL_S
    (a known key is only read), until each has ended."""
    while tasks:
        await asyncio.sleep(KEY_POLL_S)
        for batch in batches(list(tasks)):
            try:
                reply = await runner.client.claim(batch)
            except Exception as exc:         # nrmd restarting: ask again
                log.warning("asking nrmd about adopted tasks: %s", exc)
                break
            for key, state in reply["keys"].items():
                task = tasks.get(key)
                if task is not None and _settle_key(runner, task, state):
                    del tasks[key]
                    runner.ended_key(key)
        runner.pump()
