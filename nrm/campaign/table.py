"""Results out of a campaign directory: the table, the summary, the plot.

The table (CSV) needs nothing beyond the standard library, so it can be
written on a compute node with the base install. Parquet, the summary and
the plot need the analysis stack (``pip install 'nrm[campaign]'``: pandas,
pyarrow, matplotlib), imported here only inside the functions that use it.
"""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Any, Dict, List

from nrm.campaign import journal

MISSING = "nrm campaign {what} needs {lib}: pip install 'nrm[campaign]'"
FIXED = ("repetition", "run_id", "attempt", "node", "container", "start_utc", "duration_s",
         "outcome", "exit_code", "signal", "error", "energy_j", "energy_source",
         "avg_power_w", "cap_applied_w", "policy")
TAIL = ("nrm_version", "nrmd_version")


class TableError(Exception):
    """Shown to the user as is."""


def rows(directory: str, attempts: str = "last") -> List[Dict[str, Any]]:
    """One row per finished attempt (``all``) or per run, its last attempt
    (``last``), in the order they finished."""
    if not os.path.isdir(directory):
        raise TableError(f"{directory}: no such campaign directory")
    records, _ = journal.read(directory)
    finished = [r for r in records if r.get("e") == "finished"]
    if attempts == "last":
        last: Dict[str, dict] = {}
        for rec in finished:
            last.pop(rec["id"], None)     # re-insert: keep finishing order
            last[rec["id"]] = rec
        finished = list(last.values())
    out = []
    for rec in finished:
        row = dict(rec.get("row") or {})
        if not row:   # an attempt recorded interrupted after a coordinator died
            row = dict(rec.get("params") or {}, repetition=rec.get("repetition"),
                       run_id=rec["id"], attempt=rec.get("attempt"),
                       outcome=rec.get("outcome"), error=rec.get("error"))
        out.append(row)
    return out


def columns(directory: str, table: List[Dict[str, Any]]) -> List[str]:
    params: List[str] = []
    plan = journal.read_plan(directory)
    if plan:
        params = list(plan["parameters"])
    seen = set(params) | set(FIXED) | set(TAIL)
    extra: List[str] = []
    for row in table:
        for key in row:
            if key not in seen:
                seen.add(key)
                extra.append(key)
    return params + [c for c in FIXED if c not in params] + extra + list(TAIL)


def _cell(value: Any) -> Any:
    if isinstance(value, (list, dict)):
        return json.dumps(value, sort_keys=True)
    return "" if value is None else value


def write(directory: str, path: str, attempts: str = "last") -> int:
    """Write the table as CSV or Parquet (by ``path``'s suffix); row count."""
    table = rows(directory, attempts)
    cols = columns(directory, table)
    if path.endswith(".parquet"):
        pd = _pandas("table -o FILE.parquet")
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise TableError(MISSING.format(what="table -o FILE.parquet", lib="pyarrow")) \
                from None
        frame = pd.DataFrame([{c: _cell(r.get(c)) if isinstance(r.get(c), (list, dict))
                               else r.get(c) for c in cols} for r in table], columns=cols)
        for c in frame.columns:
            if frame[c].dtype == object:
                frame[c] = frame[c].map(lambda v: None if v is None else str(v))
        frame.to_parquet(path, index=False)
        return len(table)
    if not path.endswith(".csv"):
        raise TableError(f"{path}: expected a .csv or .parquet file name")
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in table:
            w.writerow([_cell(r.get(c)) for c in cols])
    return len(table)


def _pandas(what: str):
    try:
        import pandas
    except ImportError:
        raise TableError(MISSING.format(what=what, lib="pandas")) from None
    return pandas


def frame(directory: str, what: str):
    pd = _pandas(what)
    table = rows(directory, "last")
    if not table:
        raise TableError(f"{directory}: no finished runs yet")
    cols = columns(directory, table)
    df = pd.DataFrame([{c: r.get(c) for c in cols} for r in table], columns=cols)
    plan = journal.read_plan(directory)
    params = list(plan["parameters"]) if plan else []
    for p in params:
        df[p] = df[p].map(lambda v: json.dumps(v) if isinstance(v, (list, dict)) else v)
    return df, params


def summary(directory: str) -> List[Dict[str, Any]]:
    """Per combination over its ok repetitions: median and spread (IQR) of
    duration and energy, and the ratios of the medians to the ``policy:
    NONE`` combination with the same other parameters."""
    df, params = frame(directory, "summary")
    ok = df[df["outcome"] == journal.DONE]
    out: List[Dict[str, Any]] = []
    if ok.empty:
        return out
    keys = params or ["policy"]
    medians: Dict[tuple, Dict[str, Any]] = {}
    for key, group in ok.groupby(keys, sort=False, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        entry: Dict[str, Any] = dict(zip(keys, key))
        entry["runs"] = len(group)
        for col in ("duration_s", "energy_j"):
            values = group[col].dropna().astype(float)
            if len(values):
                entry[f"{col}_median"] = float(values.median())
                entry[f"{col}_iqr"] = float(values.quantile(0.75) - values.quantile(0.25))
            else:
                entry[f"{col}_median"] = entry[f"{col}_iqr"] = None
        medians[key] = entry
        out.append(entry)
    if "policy" in keys:
        at = keys.index("policy")
        for key, entry in medians.items():
            base = medians.get(key[:at] + ("NONE",) + key[at + 1:])
            for col, name in (("duration_s", "time_vs_none"), ("energy_j", "energy_vs_none")):
                a = entry.get(f"{col}_median")
                b = base.get(f"{col}_median") if base else None
                entry[name] = a / b if a is not None and b else None
    return out


def render_summary(entries: List[Dict[str, Any]]) -> List[str]:
    if not entries:
        return ["no ok runs yet"]
    keys = [k for k in entries[0] if k not in ("runs",) and not k.startswith(("duration_s",
                                                                             "energy_j"))
            and not k.endswith("_vs_none")]
    head = "  ".join(f"{k:>10}" for k in keys) + \
        f"  {'runs':>4}  {'time (s)':>9} {'IQR':>7} {'energy (J)':>11} {'IQR':>8}" \
        f"  {'time/NONE':>9} {'energy/NONE':>11}"
    lines = [head]

    def num(v, fmt):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    for e in entries:
        lines.append("  ".join(f"{str(e[k]):>10}" for k in keys)
                     + f"  {e['runs']:>4}  {num(e['duration_s_median'], '9.3f')} "
                     f"{num(e['duration_s_iqr'], '7.3f')} {num(e['energy_j_median'], '11.1f')} "
                     f"{num(e['energy_j_iqr'], '8.1f')}  {num(e.get('time_vs_none'), '9.3f')} "
                     f"{num(e.get('energy_vs_none'), '11.3f')}")
    return lines


def _boxes(ax, ok, x: str, xs, hue: str, hues, y: str) -> None:
    width = 0.8 / max(len(hues), 1)
    for j, h in enumerate(hues):
        data, pos = [], []
        for i, xv in enumerate(xs):
            sel = ok[ok[x].map(str) == xv]
            if hue != x:
                sel = sel[sel[hue].map(str) == h]
            values = sel[y].dropna().astype(float).tolist()
            if values:
                data.append(values)
                pos.append(i + (j - (len(hues) - 1) / 2) * width)
        if data:
            box = ax.boxplot(data, positions=pos, widths=width * 0.9, patch_artist=True,
                             manage_ticks=False)
            color = f"C{j % 10}"
            for patch in box["boxes"]:
                patch.set_facecolor(color)
                patch.set_alpha(0.6)
            ax.plot([], [], color=color, lw=8, alpha=0.6, label=h)
    ax.set_xticks(range(len(xs)))
    ax.set_xticklabels(xs)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.grid(True, axis="y", alpha=0.3)
    if hue != x:
        ax.legend(title=hue, fontsize=8)


def plot(directory: str, path: str, x: str = "", y: str = "energy_j",
         hue: str = "policy") -> None:
    """Three views of the ok runs: ``y`` (energy by default) and time as
    boxplots per value of ``x`` (default: the cap, else the first parameter
    that is not the policy), one box per ``hue`` value; then energy against
    time, one colour per ``hue`` value (a policy that saves energy by
    running longer shows up left-to-right, not down)."""
    df, params = frame(directory, "plot")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise TableError(MISSING.format(what="plot", lib="matplotlib")) from None
    ok = df[df["outcome"] == journal.DONE]
    if ok.empty:
        raise TableError(f"{directory}: no ok runs to plot")
    for column in (y, "duration_s"):
        if column not in ok.columns:
            raise TableError(f"--y {column}: no such column")
    if not x:
        x = next((p for p in params if p != hue), hue)
    for name in (x, hue):
        if name not in ok.columns:
            raise TableError(f"{name}: no such column (parameters: {', '.join(params)})")
    fig = Figure(figsize=(15, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    xs = list(dict.fromkeys(ok[x].map(str)))
    hues = list(dict.fromkeys(ok[hue].map(str))) if hue != x else [""]
    for ax, column in zip(axes[:2], (y, "duration_s")):
        _boxes(ax, ok, x, xs, hue, hues, column)
    scatter = axes[2]
    for j, h in enumerate(hues):
        sel = ok if hue == x else ok[ok[hue].map(str) == h]
        sel = sel[["duration_s", y]].dropna().astype(float)
        scatter.scatter(sel["duration_s"], sel[y], s=18, color=f"C{j % 10}", alpha=0.7,
                        label=h or None)
    scatter.set_xlabel("duration_s")
    scatter.tick_params(axis="x", labelrotation=30)
    scatter.set_ylabel(y)
    scatter.grid(True, alpha=0.3)
    if hue != x:
        scatter.legend(title=hue, fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(path, format="png")
    except OSError as exc:
        raise TableError(f"cannot write {path}: {exc.strerror or exc}") from None
