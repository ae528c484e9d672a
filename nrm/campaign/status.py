"""``nrm campaign status``: counts by state, outcome and parameter value.

Reads only DIR (the journal and the plan the last coordinator wrote), never
takes the lock: it works while a coordinator runs and after one was killed
mid-write. It decodes only the few fields it counts (journal.read_brief)
and the plan's value indexes, so a 100 000-run campaign answers in well
under a second (benchmarks/campaign.py).
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any, Dict, List, Tuple

from nrm.campaign import journal
from nrm.campaign.spec import canonical

STATES = ("done", "failed", "running", "pending")


def _states(records) -> Dict[str, Tuple[str, str, int]]:
    """run id -> (state, last outcome, attempts). Attempts only grow, so
    each run's last record says it all."""
    last = {rec.id: rec for rec in records if rec.id is not None}
    done, interrupted = journal.DONE, journal.INTERRUPTED
    out: Dict[str, Tuple[str, str, int]] = {}
    for rid, rec in last.items():
        if rec.e == "started":
            out[rid] = ("running", "", rec.attempt)
        else:
            o = rec.outcome or ""
            out[rid] = ("done" if o == done else "pending" if o == interrupted else "failed",
                        o, rec.attempt)
    return out


def collect(directory: str) -> Dict[str, Any]:
    if not os.path.isdir(directory):
        raise journal.JournalError(f"{directory}: no such campaign directory")
    records, warnings = journal.read_brief(directory)
    runs = _states(records)
    plan = journal.read_plan(directory) or {"parameters": {}, "runs": []}
    names = list(plan["parameters"])
    rows = plan["runs"]
    pending = ("pending", "", 0)
    per_run = [runs.get(row[0], pending) for row in rows]
    state_of = [st for st, _, _ in per_run]
    states = Counter(state_of)
    outcomes = Counter(o for st, o, _ in per_run if st in ("done", "failed"))
    per_value: Dict[str, Dict[str, Dict[str, int]]] = {}
    for k, name in enumerate(names):
        counts: Dict[int, Dict[str, int]] = {}
        for (i, st), n in Counter(zip((row[2 + k] for row in rows), state_of)).items():
            counts.setdefault(i, {})[st] = n
        values = plan["parameters"][name]
        per_value[name] = {(v if isinstance(v, str) else canonical(v)): counts[i]
                           for i, v in enumerate(values) if i in counts}
    planned = {row[0] for row in rows}
    outside = sum(1 for rid in runs if rid not in planned)
    attempts = sum(a for _, _, a in runs.values())
    return {"directory": directory, "total": len(rows), "states": dict(states),
            "outcomes": dict(outcomes), "attempts": attempts, "outside_plan": outside,
            "per_value": per_value, "warnings": warnings}


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
