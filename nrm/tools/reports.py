"""Run reports: summaries and plots of finished containers' profiles.

The daemon keeps, per finished container, the node power series over its
life and the power-policy decisions taken for it (see
``nrm.power.profiles.ProfileListener``). ``summary`` turns one profile into
the numbers people compare between runs; ``plot`` draws the series with the
decisions marked, so that a slowdown or an energy saving can be traced to
what the policy did and when.

matplotlib is an optional extra (``nrm[plot]``): it is large and only the
``--plot`` option needs it, so it is imported inside ``plot`` and its
absence is reported as a one-line error the CLI can print.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

MISSING_MATPLOTLIB = "nrm report --plot needs matplotlib: pip install 'nrm[plot]'"
MAX_PLOTS = 12            # containers per figure; beyond, the most recent ones


class PlotError(Exception):
    """Plotting is impossible; the message is shown to the user as is."""


def _series(report: dict) -> List[List[float]]:
    return [[float(t), float(w)] for t, w in (report.get("power_series") or [])
            if t is not None and w is not None]


def integrate(series: Sequence[Sequence[float]]) -> Optional[float]:
    """Energy (J) under a [[t, W], ...] series, trapezoid rule; None if < 2 points."""
    if len(series) < 2:
        return None
    return sum((t1 - t0) * (w0 + w1) / 2.0
               for (t0, w0), (t1, w1) in zip(series, series[1:]) if t1 > t0)


def summary(report: dict) -> Dict[str, object]:
    """The comparable numbers of one profile.

    Energy is node energy (packages plus DRAM) from the sensors' counters
    when the manifest asked for a profile (``energy_source`` "sensors");
    otherwise it is integrated from the sampled power series, which covers
    the whole node for the container's life and is marked "series" because
    it is an estimate at sensor-period resolution.
    """
    energy = report.get("energy") or {}
    duration = report.get("duration_s")
    joules = None
    source = None
    if energy.get("energy_j") is not None or energy.get("dram_energy_j") is not None:
        joules = (energy.get("energy_j") or 0.0) + (energy.get("dram_energy_j") or 0.0)
        source = "sensors"
    else:
        joules = integrate(_series(report))
        source = "series" if joules is not None else None
    average = energy.get("node_power_w")
    if average is None and joules is not None:
        span = energy.get("duration_s") or duration
        if source == "series":
            series = _series(report)
            span = series[-1][0] - series[0][0]
        average = joules / span if span else None
    policy = report.get("policy") or {}
    decisions = policy.get("decisions")
    if decisions is None:
        decisions = len([d for d in report.get("decisions") or [] if "cpu" in d])
    return {"container": report.get("container"), "name": report.get("name"),
            "duration_s": duration, "energy_j": joules, "energy_source": source,
            "average_power_w": average, "policy": policy.get("name") or "NONE",
            "decisions": decisions, "cpus": report.get("cpus")}


def plot(reports: List[dict], path: str) -> None:
    """Draw power over each container's life, decisions marked, into ``path``.

    One panel per container (the most recent ``MAX_PLOTS``), time relative
    to the container's first sample. Decisions are vertical lines over the
    full height of the panel and, for duty-cycle decisions, a step line of the
    lowest level any of its cpus was at, on a second axis.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotError(MISSING_MATPLOTLIB) from None
    if not reports:
        raise PlotError("no finished containers to plot")
    reports = list(reports)[-MAX_PLOTS:]
    # Figure + Agg canvas rather than pyplot: no global state, no GUI
    # backend selection, safe to call from any process.
    fig = Figure(figsize=(10, 2.8 * len(reports) + 0.6), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(reports), 1, squeeze=False)[:, 0]
    for ax, report in zip(axes, reports):
        _panel(ax, report)
    axes[-1].set_xlabel("seconds since the container's first sample")
    fig.tight_layout()
    try:
        fig.savefig(path, format="png")
    except OSError as exc:
        raise PlotError(f"cannot write {path}: {exc.strerror or exc}") from None


def _panel(ax, report: dict) -> None:
    s = summary(report)
    series = _series(report)
    energy = s["energy_j"]
    title = (f"{s['name']} ({s['container']}): {s['duration_s'] or 0:.1f} s, "
             + (f"{energy:.0f} J{'' if s['energy_source'] == 'sensors' else ' (est.)'}, "
                if energy is not None else "")
             + f"policy {s['policy']}, {s['decisions']} decisions")
    ax.set_title(title, fontsize=9, loc="left")
    ax.set_ylabel("node power (W)")
    ax.grid(True, alpha=0.3)
    if not series:
        ax.text(0.5, 0.5, "no power samples", transform=ax.transAxes, ha="center")
        return
    t0 = series[0][0]
    ax.plot([t - t0 for t, _ in series], [w for _, w in series], color="#2563eb", lw=1.2,
            label="node power")
    ax.set_ylim(bottom=0)
    decisions = [d for d in report.get("decisions") or []
                 if d.get("time") is not None and "cpu" in d]
    if not decisions:
        return
    times = [float(d["time"]) - t0 for d in decisions]
    ax.vlines(times, 0, 1, transform=ax.get_xaxis_transform(), colors="#dc2626", alpha=0.35,
              lw=0.8, label="policy decision")
    levels: Dict[object, float] = {}
    steps_t, steps_v = [], []
    for t, d in zip(times, decisions):
        if d.get("control") != "cpu.duty_cycle" or d.get("new") is None:
            continue
        levels[d.get("cpu")] = float(d["new"])
        steps_t.append(t)
        steps_v.append(min(levels.values()))
    if steps_t:
        twin = ax.twinx()
        end = series[-1][0] - t0
        twin.step(steps_t + [max(end, steps_t[-1])], steps_v + [steps_v[-1]], where="post",
                  color="#f59e0b", lw=1, label="lowest duty-cycle level")
        twin.set_ylim(0, 17)
        twin.set_ylabel("duty-cycle level")
    ax.legend(loc="lower left", fontsize=8)
