"""Dependencies between jobs: who waits for whom, indexed by what they wait for.

A job waits for every name in its ``after`` list to end SUCCEED. Waiting
jobs are filed under each name they still wait for, with a count of unmet
dependencies: a job's end touches only the jobs filed under its name, never
the whole queue. A dependency that ends FAILED, CANCELED or OMITTED (or a
name nobody registered) makes the waiting job OMITTED, and that omission
spreads to its own dependants through the same index.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

from nrm.pilot.model import FINAL, OMITTED, SUCCEED, Job


class DependencyGraph:
    def __init__(self, state_of: Callable[[str], Optional[str]]):
        #: the state of a registered job, None for an unknown name
        self.state_of = state_of
        self.waiters: Dict[str, List[Job]] = {}
        self.unmet: Dict[Job, int] = {}

    def add(self, job: Job) -> str:
        """File a new job: "ready", "waiting", or OMITTED (a dependency is
        unknown or already ended without success)."""
        missing = 0
        for dep in dict.fromkeys(job.after):
            state = self.state_of(dep)
            if state == SUCCEED:
                continue
            if state is None or state in FINAL:
                self._forget(job)
                return OMITTED
            self.waiters.setdefault(dep, []).append(job)
            missing += 1
        if missing == 0:
            return "ready"
        self.unmet[job] = missing
        return "waiting"

    def _forget(self, job: Job) -> None:
        """Take a job out of the index (it was filed under earlier names)."""
        if self.unmet.pop(job, None) is None:
            for dep in job.after:
                lst = self.waiters.get(dep)
                if lst and job in lst:
                    lst.remove(job)

    def finished(self, name: str, state: str) -> Tuple[List[Job], List[Job]]:
        """A job ended: the jobs now ready, and those now OMITTED (all of
        them, transitively). The caller sets the omitted jobs' states."""
        ready: List[Job] = []
        omitted: List[Job] = []
        work = [(name, state)]
        while work:
            name, state = work.pop()
            for job in self.waiters.pop(name, ()):
                if job not in self.unmet:
                    continue                    # already omitted through another name
                if state == SUCCEED:
                    self.unmet[job] -= 1
                    if self.unmet[job] == 0:
                        del self.unmet[job]
                        ready.append(job)
                else:
                    del self.unmet[job]
                    omitted.append(job)
                    work.append((job.name, OMITTED))
        return ready, omitted

    def remove(self, job: Job) -> None:
        """A cancelled waiting job leaves the index."""
        self.unmet.pop(job, None)
