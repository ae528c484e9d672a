"""``nrm campaign status``: counts by state, outcome and parameter value.

Reads only DIR (the journal and the plan the last coordinator wrote), never
takes the lock: it works while a coordinator runs and after one was killed
mid-write.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any, Dict, List

from nrm.campaign import journal
from nrm.campaign.spec import canonical

STATES = ("done", "failed", "running", "pending")


def collect(directory: str) -> Dict[str, Any]:
    if not os.path.isdir(directory):
        raise journal.JournalError(f"{directory}: no such campaign directory")
    records, warnings = journal.read(directory)
    runs = journal.fold(records)
    plan = journal.read_plan(directory)
    if plan is None:
        plan = [{"id": r.id, "params": r.params, "repetition": r.repetition}
                for r in runs.values()]
    planned = set()
    states: Counter = Counter()
    outcomes: Counter = Counter()
    per_value: Dict[str, Dict[str, Counter]] = {}
    for entry in plan:
        rid = entry["id"]
        planned.add(rid)
        st = runs.get(rid)
        state = st.state if st is not None else "pending"
        states[state] += 1
        if st is not None and st.last is not None and state != "pending":
            outcomes[st.last.get("outcome")] += 1
        for name, value in entry["params"].items():
            key = value if isinstance(value, str) else canonical(value)
            per_value.setdefault(name, {}).setdefault(key, Counter())[state] += 1
    outside = sum(1 for rid in runs if rid not in planned)
    attempts = sum(st.attempts for st in runs.values())
    return {"directory": directory, "total": len(plan), "states": dict(states),
            "outcomes": dict(outcomes), "attempts": attempts, "outside_plan": outside,
            "per_value": {n: {v: dict(c) for v, c in vals.items()}
                          for n, vals in per_value.items()},
            "warnings": warnings}


def render(data: Dict[str, Any]) -> List[str]:
    s = data["states"]
    lines = [f"{data['directory']}: {data['total']} runs: "
             + ", ".join(f"{s.get(k, 0)} {k}" for k in STATES)
             + f" ({data['attempts']} attempts)"]
    if data["outcomes"]:
        lines.append("  outcomes: " + ", ".join(f"{k} {v}" for k, v in
                                                sorted(data["outcomes"].items())))
    if data["outside_plan"]:
        lines.append(f"  {data['outside_plan']} runs in the journal are outside the "
                     "current sweep (kept, not counted above)")
    for name, values in data["per_value"].items():
        lines.append(f"  {name}:")
        for value, counts in values.items():
            total = sum(counts.values())
            lines.append(f"    {value:>12}  {counts.get('done', 0)}/{total} done"
                         + "".join(f", {counts[k]} {k}" for k in ("failed", "running")
                                   if counts.get(k)))
    return lines
