"""``nrm pilot status DIR`` and ``nrm pilot report DIR``: a pilot seen from
outside, running or finished, from the files in its aux dir alone.

Why the journal and not a socket: a pilot in file mode listens on nothing,
a killed one answers nothing, and the journal is written every event-loop
turn, so it is as fresh as a status request would be. The journal is
replayed into a manager that runs nothing (the same code that resumes a
pilot), which gives QCG's ``status`` sections; a torn last line (a pilot
writing, or killed mid-write) is skipped. Whether the pilot still runs is
its journal's lock.

The report times every task from the journal: ``x`` (the pilot asked nrmd
to start it), ``st`` (nrmd saw its process start), ``e`` (its exit reached
the pilot), and the cores of its placement. QCG's report needs pandas,
scipy and plotly; this needs nothing, and matplotlib for ``--gantt`` only.
"""

from __future__ import annotations

import fcntl
import glob
import json
import os
from typing import Any, Dict, List, Optional, Tuple

from nrm.pilot import journal
from nrm.pilot.manager import Manager
from nrm.pilot.scheduler import Pool, PoolError


class InspectError(Exception):
    """The directory is not a pilot's, or its journal cannot be read."""


def find_aux(path: str) -> str:
    """The aux dir itself, or the newest ``.nrm-pilot-*`` in a wd."""
    path = os.path.abspath(path)
    if os.path.exists(os.path.join(path, journal.FILE)):
        return path
    found = glob.glob(os.path.join(path, ".nrm-pilot-*", journal.FILE))
    if not found:
        raise InspectError(f"{path}: no pilot here (neither {journal.FILE} nor a "
                           ".nrm-pilot-* directory holding one)")
    return os.path.dirname(max(found, key=os.path.getmtime))


def running(aux: str) -> bool:
    """A pilot holds its journal's lock while it runs."""
    try:
        fd = os.open(os.path.join(aux, journal.FILE), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def load(aux: str) -> Tuple[List[Dict[str, Any]], Manager]:
    records, _ = journal.read(os.path.join(aux, journal.FILE))
    head = records[0]
    try:
        pool = Pool([(n, c) for n, c in head["nodes"]], system_core=bool(head.get("system_core")))
    except (PoolError, KeyError, TypeError, ValueError) as exc:
        raise InspectError(f"{aux}: the journal's header is not usable: {exc}") from None
    manager = Manager(pool, head.get("wd") or aux)
    try:
        manager.replay(records[1:])
    except Exception as exc:           # a journal from another nrm version, edited by hand
        raise InspectError(f"{aux}: the journal cannot be replayed: "
                           f"{type(exc).__name__}: {exc}") from None
    return records, manager


def status(aux: str) -> Dict[str, Any]:
    """QCG's status sections, and the pilot's own state."""
    try:
        _, manager = load(aux)
    except journal.JournalError as exc:
        raise InspectError(str(exc)) from None
    out = manager.final_status()
    is_running = running(aux)
    out["Pilot"] = {"Dir": aux, "State": "running" if is_running else
                    "finished" if os.path.exists(os.path.join(aux, "final_status.json"))
                    else "stopped (killed? nrm pilot --resume finishes it)"}
    return out


def status_text(st: Dict[str, Any]) -> str:
    lines = []
    for section in ("Pilot", "Resources", "JobStats", "IterationStats"):
        lines.append(f"{section}:")
        for key, value in st[section].items():
            lines.append(f"  {key}: {value}")
    return "\n".join(lines) + "\n"


def task_times(records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per ended task: its cores (``node:core``), launch, start and end."""
    placed: Dict[int, List[str]] = {}
    launched: Dict[int, float] = {}
    out = []
    for r in records:
        kind = r.get("t")
        if kind == "p":
            placed[r["n"]] = [f"{node}:{c}" for node, cores in r["al"] for c in cores]
        elif kind == "x":
            launched[r["n"]] = r["now"]
        elif kind == "e" and r["n"] in launched and r.get("c") is not None:
            x = launched.pop(r["n"])
            start = r.get("st")
            out.append({"seq": r["n"], "cores": placed.get(r["n"], []), "launch": x,
                        "start": start if start is not None and start >= x else x,
                        "end": r["now"]})
    return out


def _quantiles(values: List[float]) -> Dict[str, Optional[float]]:
    if not values:
        return {"median_ms": None, "p95_ms": None, "max_ms": None}
    v = sorted(values)
    return {"median_ms": round(1e3 * v[len(v) // 2], 3),
            "p95_ms": round(1e3 * v[min(len(v) - 1, int(0.95 * len(v)))], 3),
            "max_ms": round(1e3 * v[-1], 3)}


def report(aux: str) -> Dict[str, Any]:
    try:
        records, manager = load(aux)
    except journal.JournalError as exc:
        raise InspectError(str(exc)) from None
    tasks = task_times(records)
    out: Dict[str, Any] = {"dir": aux, "tasks": len(tasks), "cores": manager.pool.total}
    if not tasks:
        return out
    first = min(t["launch"] for t in tasks)
    last = max(t["end"] for t in tasks)
    span = max(last - first, 1e-9)
    busy = sum((t["end"] - t["start"]) * max(1, len(t["cores"])) for t in tasks)
    out["makespan_s"] = round(span, 3)
    out["core_utilisation"] = round(busy / (manager.pool.total * span), 4)
    out["launch_to_start"] = _quantiles([t["start"] - t["launch"] for t in tasks])
    gaps = []
    by_core: Dict[str, List[Dict[str, Any]]] = {}
    for t in tasks:
        for core in t["cores"]:
            by_core.setdefault(core, []).append(t)
    for core_tasks in by_core.values():
        core_tasks.sort(key=lambda t: t["launch"])
        for a, b in zip(core_tasks, core_tasks[1:]):
            gaps.append(max(0.0, b["start"] - a["end"]))
    out["end_to_next_start"] = _quantiles(gaps)
    out["tasks_per_s"] = round(len(tasks) / span, 2)
    return out


def report_text(rep: Dict[str, Any]) -> str:
    lines = [f"{rep['dir']}: {rep['tasks']} tasks on {rep['cores']} cores"]
    if rep["tasks"]:
        lines.append(f"  makespan {rep['makespan_s']} s, {rep['tasks_per_s']} tasks/s, "
                     f"core utilisation {100 * rep['core_utilisation']:.1f} %")
        for key, label in (("launch_to_start", "launch to start"),
                           ("end_to_next_start", "end to next start (per core)")):
            q = rep[key]
            lines.append(f"  {label}: median {q['median_ms']} ms, p95 {q['p95_ms']} ms, "
                         f"max {q['max_ms']} ms")
    return "\n".join(lines) + "\n"


def gantt(aux: str, path: str) -> None:
    """One row per core, one bar per task (launch overhead lighter)."""
    try:
        import matplotlib
    except ImportError:
        raise InspectError("--gantt needs matplotlib (pip install 'nrm[plot]')") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    try:
        records, _ = load(aux)
    except journal.JournalError as exc:
        raise InspectError(str(exc)) from None
    tasks = task_times(records)
    if not tasks:
        raise InspectError(f"{aux}: no task has ended yet: nothing to draw")
    t0 = min(t["launch"] for t in tasks)
    cores = sorted({c for t in tasks for c in t["cores"]},
                   key=lambda c: (c.rsplit(":", 1)[0], int(c.rsplit(":", 1)[1])))
    row = {c: i for i, c in enumerate(cores)}
    fig, ax = plt.subplots(figsize=(10, max(2.0, 0.3 * len(cores) + 1)))
    for t in tasks:
        for c in t["cores"]:
            ax.barh(row[c], t["start"] - t["launch"], left=t["launch"] - t0,
                    color="#f0b27a", height=0.8)
            ax.barh(row[c], t["end"] - t["start"], left=t["start"] - t0,
                    color="#2e86c1", height=0.8)
    ax.set_yticks(range(len(cores)))
    ax.set_yticklabels(cores)
    ax.set_xlabel("seconds since the first launch")
    ax.set_title(f"{len(tasks)} tasks (orange: launch to start)")
    fig.tight_layout()
    try:
        fig.savefig(path)
    except (OSError, ValueError) as exc:
        raise InspectError(f"{path}: cannot write the chart: {exc}") from None
    finally:
        plt.close(fig)


def dumps(obj: Dict[str, Any]) -> str:
    return json.dumps(obj, indent=2) + "\n"
