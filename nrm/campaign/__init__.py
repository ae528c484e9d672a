"""Campaigns: checkpointed sweeps of programs x policies x caps x repetitions.

``nrm campaign run FILE --dir DIR`` is the usual way in (docs/campaign.md).
From Python::

    from nrm.campaign import load
    load("campaign.yml").run("results")          # same as the CLI, exit status back

Users who write their own loop (execo's ParamSweeper role) share the same
journal and lock through :class:`Sweep`::

    sweep = Sweep("results", [{"n": n} for n in (1, 2, 4)], repetitions=3)
    while (run := sweep.next()) is not None:
        try:
            value = measure(**run.params)
        except Exception as exc:
            sweep.failed(run, str(exc))
        else:
            sweep.done(run, {"value": value})
    sweep.close()
"""

from __future__ import annotations

import os
import time
from typing import Any, Dict, Iterable, List, Optional

from nrm.campaign import journal
from nrm.campaign.spec import Campaign, CampaignError, Run, run_id
from nrm.campaign.spec import load as _load_spec

__all__ = ["Campaign", "CampaignError", "Run", "Sweep", "load"]


def _run(self: Campaign, directory: str, nodes: str = "auto", **kwargs) -> int:
    from nrm.campaign.slurmrun import coordinator
    return coordinator(self, directory, nodes, **kwargs).run()


Campaign.run = _run  # type: ignore[attr-defined]


def load(path: str) -> Campaign:
    """A validated campaign file (:class:`CampaignError` otherwise)."""
    return _load_spec(path)


class Sweep:
    """A checkpointed iterator over combinations for a loop of one's own.

    Holds DIR's lock for its lifetime. Attempts left started by a process
    that died are recorded interrupted and come back first; finished ones
    (done or failed) never come back, except failed ones with
    ``retry_failed``. Combinations are any JSON-able dicts."""

    def __init__(self, directory: str, combinations: Iterable[Dict[str, Any]],
                 repetitions: int = 1, retry_failed: bool = False):
        self.dir = os.path.abspath(directory)
        os.makedirs(self.dir, exist_ok=True)
        self.lock = journal.DirLock(self.dir).acquire()
        try:
            self.journal = journal.Journal(self.dir)
            self.states = journal.fold(journal.read(self.dir)[0])
            combos = list(combinations)
            self.runs: List[Run] = [Run(run_id(c, r), dict(c), r)
                                    for r in range(repetitions) for c in combos]
            journal.write_plan(self.dir, self.runs)
            for st in self.states.values():
                if st.running is not None:
                    self._finish(st.id, st.params, st.repetition, st.attempts,
                                 journal.INTERRUPTED, {"error": "its process died"})
            wanted = ("pending", "failed") if retry_failed else ("pending",)
            self._todo = [r for r in self.runs if self._state(r.id) in wanted]
            self._attempt: Dict[str, int] = {}
        except BaseException:
            self.lock.release()
            raise

    def _state(self, rid: str) -> str:
        st = self.states.get(rid)
        return st.state if st is not None else "pending"

    def _finish(self, rid, params, repetition, attempt, outcome, row) -> None:
        rec = {"e": "finished", "id": rid, "attempt": attempt, "params": params,
               "repetition": repetition, "outcome": outcome, "t": time.time(),
               "row": dict(params, repetition=repetition, run_id=rid, attempt=attempt,
                           outcome=outcome, **row)}
        self.journal.append(rec)
        journal.apply(self.states, rec)

    def remaining(self) -> List[Run]:
        return list(self._todo)

    def next(self) -> Optional[Run]:
        """The next combination to run (recorded started), or None."""
        if not self._todo:
            return None
        run = self._todo.pop(0)
        st = self.states.get(run.id)
        attempt = (st.attempts if st is not None else 0) + 1
        self._attempt[run.id] = attempt
        rec = {"e": "started", "id": run.id, "attempt": attempt, "params": run.params,
               "repetition": run.repetition, "t": time.time()}
        self.journal.append(rec)
        journal.apply(self.states, rec)
        return run

    def done(self, run: Run, result: Optional[Dict[str, Any]] = None) -> None:
        self._finish(run.id, run.params, run.repetition, self._attempt.pop(run.id, 1),
                     journal.DONE, dict(result or {}))

    def failed(self, run: Run, error: str = "", outcome: str = "nonzero") -> None:
        """Persisted: a failed combination stays failed until ``retry_failed``."""
        if outcome not in journal.FAILED:
            raise ValueError(f"outcome {outcome!r}: expected one of {journal.FAILED}")
        self._finish(run.id, run.params, run.repetition, self._attempt.pop(run.id, 1),
                     outcome, {"error": error})

    def cancel(self, run: Run) -> None:
        """Back to the front of the queue; the attempt is recorded interrupted."""
        self._finish(run.id, run.params, run.repetition, self._attempt.pop(run.id, 1),
                     journal.INTERRUPTED, {"error": "cancelled"})
        self._todo.insert(0, run)

    def close(self) -> None:
        self.journal.close()
        self.lock.release()

    def __enter__(self) -> "Sweep":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
