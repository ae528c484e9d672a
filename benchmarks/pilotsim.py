"""The pilot's manager with no processes: what the pilot benchmarks share.

Placing, starting and ending tasks in the bare ``nrm.pilot.manager.Manager``
measures its own cost (scheduling, state, history) apart from any launch.
"""

from __future__ import annotations


def drain(mgr, batch_ends: bool = False) -> None:
    """Run every queued task to success at fixed times. ``batch_ends``: start a
    whole placement before ending any of it (as many nodes ending together do);
    otherwise each task ends as soon as it starts (a chain frees its successor
    at once)."""
    while True:
        placed = mgr.placements(1.0)
        if not placed:
            return
        for task, _ in placed:
            mgr.started(task, 1.0)
            if not batch_ends:
                mgr.ended(task, 0, 2.0)
        if batch_ends:
            for task, _ in placed:
                mgr.ended(task, 0, 2.0)
