#!/usr/bin/env python3
"""The power policies against an oracle, on a documented plant model (deterministic).

Why: on a shared 2-cpu VM the live runs of the imbalance demo are dominated
by noise (round order moves "savings" by +-40 %), so whether a policy change
helps cannot be read from them. This benchmark drives the real policy code
(``nrm.power.policy.ContainerPolicy``, with the daemon's settings) against a
plant built from the emulated node's own energy model, and compares what it
saves with the best any setting of the same knob could have saved.

Plant model (one package, one rank per cpu, ``N`` ranks):

* **Work.** Each phase ``i`` gives rank ``r`` an amount of work ``w[r][i]``
  in full-speed seconds (the pattern, below), times ``1 + U(-noise, noise)``
  plant noise (default 5 %), drawn per rank and phase from the seed before
  any policy runs, so that NONE, every policy and the oracle see the same
  work.
* **Speed.** A cpu at duty-cycle level ``L`` and frequency ``f`` runs at
  ``nrm.hw.emulated.cpu_speed(L, 16, f, fmax)`` (``L/16 * f/fmax``); the
  grid is the emulated node's ``frequencies_hz`` (1.0-2.4 GHz).
* **Barrier.** The phase lasts as long as the slowest rank's compute; the
  collective itself costs nothing. Every rank reports ``(c, t)`` for the
  phase (aggregation 1, its phase count), in an arrival order that varies.
* **Decision lag.** The decisions caused by phase ``i``'s reports land
  ``lag`` (default 0.4) x the duration of phase ``i`` into phase ``i+1``;
  until then each cpu runs at its old setting (the daemon writes a control
  after the gate fires, while the next phase already runs).
* **Energy.** ``nrm.hw.emulated.dynamic_power``: ``P = idle_w +
  sum dynamic_w * u * (f/fmax)^2`` with the emulated node's defaults
  (20 W + 10 W per cpu). MPICH busy-polls in the barrier and the CFS
  bandwidth limit throttles spin and compute alike, so a cpu is charged
  ``u = speed`` for the whole phase, waiting or not. Energy is integrated
  over each phase's segments (before and after the lag).
* **Phase types.** Each phase reports the call site of the collective
  that ends it (as the PMPI interposer does): ``phase-varying`` alternates
  two sites, every other pattern has one. With ``--lag 0`` the decision
  applies at the collective's exit (the interposer-side table the
  per-type rule is made for, modelled here only) and the policy covers
  one phase type; otherwise it covers the two a decision spans
  (``nrm.power.policies.PHASE_WINDOW``). ``--no-sites`` reports no type.

Patterns (40 phases; the critical rank's work is 50 ms unless said):
``static`` 2 ranks 1 : 0.5; ``static4`` 4 ranks 1 : .8 : .6 : .4;
``shifting`` 1 : 0.5, the critical rank swaps every 10 phases;
``phase-varying`` type A (50 ms, 1 : 0.5) and type B (30 ms, 1 : 0.8)
alternate; ``noisy`` 1 : 0.5 with +-15 % per rank per phase; ``random-walk``
4 ranks starting at 1 : .8 : .6 : .4, each rank's work times U(0.9, 1.1) per
phase within [0.2, 1] x 50 ms; ``balanced`` 1 : 1 (the control: nothing to
save beyond the plant noise, no slowdown allowed).

Oracle of a knob: each phase, each rank at the cheapest setting of that knob
(DDCM: levels at fmax; DVFS: frequencies at level 16; COMBINED: any pair)
whose speed covers ``w[r][i] / max_r w[r][i]``: every rank reaches the
collective just in time, known in advance, no lag, the phase as long as
NONE's. Savings are fractions of NONE's energy, ``slowdown`` the fraction of
NONE's run time lost; each is the median over the seeds (``slowdown_max``
the worst seed). ``fraction`` is the median of saving / oracle per seed.

In-wait throttling (COUNTDOWN-style, ``nrm.power.policy.inwait``): under
the policies that ``inwait.for_policy`` names, as the daemon runs them, a
waiting core drops to the contract's setting the contract's delay after it
reaches the collective (DDCM and COUNTDOWN: level 1 at its frequency;
DVFS: level 16 at the grid's lowest frequency; COMBINED: level 1 at the
lowest frequency), and is restored at the exit (the interposer acts in
microseconds: no actuation latency is modelled). ``COUNTDOWN`` is that
alone, measured against DDCM's oracle. ``--no-wait-throttle`` turns it off
for every policy (plant and policy alike), for comparison.

The policies run with the daemon's slowdown budget
(``nrm.power.policies.SLOWDOWN_BUDGET``, policy/budget.py);
``--slowdown-budget none`` runs them without it (the rules before the
budget), ``--slowdown-budget 0.02`` with another.

usage: python benchmarks/power_oracle.py [--json] [--seeds 10] [--phases 40]
       [--lag 0.4] [--noise 0.05] [--patterns static,noisy] [--policies DDCM]
       [--no-wait-throttle] [--slowdown-budget none|F] [--no-sites]
       python benchmarks/power_oracle.py --live [--json] [--rounds 5] [--phases 24] ...
       (the same patterns on the emulated node, with an ORACLE measured in the
       same run: benchmarks/power_oracle_live.py)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.dirname(os.path.abspath(__file__))]

from nrm.hw.emulated import DEFAULTS, cpu_speed, dynamic_power  # noqa: E402
from nrm.power import policies as daemon  # noqa: E402
from nrm.power.policy import ContainerPolicy, inwait  # noqa: E402
from nrm.power.policy.container import DEFAULT_DAMPER_S, DEFAULT_SLOWDOWN  # noqa: E402

LEVELS = 16
GRID = sorted(float(f) for f in DEFAULTS["frequencies_hz"])
FMAX = GRID[-1]
IDLE_W = float(DEFAULTS["idle_w"])
DYNAMIC_W = float(DEFAULTS["dynamic_w"])
PHASE_S = 0.05
KNOBS = ("DDCM", "DVFS", "COMBINED")
"""The knobs with an oracle."""

POLICIES = KNOBS + ("COUNTDOWN",)

ORACLE_OF = {"COUNTDOWN": "DDCM"}
"""In-wait throttling alone acts on the duty cycle: it is measured against DDCM's oracle."""

Work = List[List[float]]  # [phase][rank], full-speed seconds
Setting = Tuple[int, float]  # (level, frequency Hz)


def _static(shares: Sequence[float]) -> Callable[[int, random.Random], Work]:
    return lambda phases, rng: [[PHASE_S * s for s in shares] for _ in range(phases)]


def _shifting(phases: int, rng: random.Random) -> Work:
    return [[PHASE_S, PHASE_S / 2] if (i // 10) % 2 == 0 else [PHASE_S / 2, PHASE_S]
            for i in range(phases)]


def _phase_varying(phases: int, rng: random.Random) -> Work:
    return [[PHASE_S, PHASE_S * 0.5] if i % 2 == 0 else [0.03, 0.03 * 0.8]
            for i in range(phases)]


def _noisy(phases: int, rng: random.Random) -> Work:
    return [[PHASE_S * s * (1 + rng.uniform(-0.15, 0.15)) for s in (1.0, 0.5)]
            for _ in range(phases)]


def _random_walk(phases: int, rng: random.Random) -> Work:
    shares = [1.0, 0.8, 0.6, 0.4]
    out = []
    for _ in range(phases):
        out.append([PHASE_S * s for s in shares])
        shares = [min(1.0, max(0.2, s * rng.uniform(0.9, 1.1))) for s in shares]
    return out


PATTERNS: Dict[str, Callable[[int, random.Random], Work]] = {
    "static": _static((1.0, 0.5)),
    "static4": _static((1.0, 0.8, 0.6, 0.4)),
    "shifting": _shifting,
    "phase-varying": _phase_varying,
    "noisy": _noisy,
    "random-walk": _random_walk,
    "balanced": _static((1.0, 1.0)),
}


def make_work(pattern: str, phases: int, noise: float, seed: int) -> Work:
    rng = random.Random(f"{pattern}/{seed}")
    base = PATTERNS[pattern](phases, rng)
    return [[w * (1 + rng.uniform(-noise, noise)) for w in row] for row in base]


def speed(setting: Setting) -> float:
    return cpu_speed(setting[0], LEVELS, setting[1], FMAX)


def power(settings: Sequence[Setting]) -> float:
    """Package power with every cpu busy-polling at its setting (charged u = speed)."""
    return IDLE_W + dynamic_power(DYNAMIC_W, ((speed(s), s[1] / FMAX) for s in settings))


# -- the oracle ------------------------------------------------------------

def _candidates(knob: str) -> List[Setting]:
    if knob == "DDCM":
        return [(level, FMAX) for level in range(1, LEVELS + 1)]
    if knob == "DVFS":
        return [(LEVELS, hz) for hz in GRID]
    return [(level, hz) for level in range(1, LEVELS + 1) for hz in GRID]


def cheapest(knob: str, need: float) -> Setting:
    """The cheapest setting of ``knob`` whose speed covers ``need`` (or the fastest one)."""
    ok = [s for s in _candidates(knob) if speed(s) >= need - 1e-12]
    if not ok:
        return (LEVELS, FMAX)
    return min(ok, key=lambda s: (power([s]), -speed(s)))


def oracle_energy(knob: str, work: Work) -> float:
    energy = 0.0
    for row in work:
        t = max(row)
        energy += t * power([cheapest(knob, w / t) for w in row])
    return energy


# -- the closed loop -------------------------------------------------------

def site_of(pattern: str, phase: int) -> int:
    """The call site of the collective that ends ``phase`` (nonzero, as the interposer's)."""
    return 2 + phase % 2 if pattern == "phase-varying" else 1


def rank_energy(compute: float, t: float, switch: float, old: Setting, new: Setting,
                wait_throttle: Optional[inwait.WaitThrottle]) -> float:
    """Dynamic energy of one rank over a phase of length ``t``.

    It computes for ``compute`` seconds and busy-polls until ``t``; its
    setting changes from ``old`` to ``new`` at ``switch``. With
    ``wait_throttle`` (COUNTDOWN-style) the core drops to its duty-cycle
    level and its frequency (its current one when the setting has none)
    once it has waited its delay, and is
    restored at the collective's exit (at no cost: the interposer acts in
    microseconds).
    """
    throttle_at = t if wait_throttle is None else min(t, compute + wait_throttle.delay_s)
    cuts = sorted({0.0, min(switch, t), throttle_at, t})
    energy = 0.0
    for a, b in zip(cuts, cuts[1:]):
        setting = old if a < switch else new
        if a >= throttle_at:
            hz = wait_throttle.frequency_hz(GRID)
            setting = (min(wait_throttle.level, setting[0]),
                       setting[1] if hz is None else min(hz, setting[1]))
        energy += (b - a) * (power([setting]) - IDLE_W)
    return energy


def run_policy(name: str, work: Work, lag: float, cross_rank: bool = daemon.CROSS_RANK,
               sites: Callable[[int], int] = lambda i: 0, wait_throttle: bool = True,
               slowdown_budget: Optional[float] = daemon.SLOWDOWN_BUDGET,
               ) -> Tuple[float, float, dict]:
    """Drive ``ContainerPolicy(name)`` with the daemon's settings; returns (time, energy, stats).

    Waits are throttled as ``inwait.for_policy(name)`` says (policy and
    plant), unless ``wait_throttle`` is False.
    """
    ranks = list(range(len(work[0])))
    throttle = inwait.for_policy(name) if wait_throttle else None
    policy = ContainerPolicy(name, ranks, damper_s=DEFAULT_DAMPER_S, slowdown=DEFAULT_SLOWDOWN,
                             frequencies=GRID, levels=LEVELS,
                             warmup_phases=daemon.WARMUP_PHASES,
                             settle_rounds=daemon.SETTLE_ROUNDS, cross_rank=cross_rank,
                             phase_window=1 if lag == 0 else daemon.PHASE_WINDOW,
                             slowdown_budget=slowdown_budget, wait_throttle=throttle)

    def now() -> List[Setting]:
        view = policy.settings()
        return [(int(view[r]["level"]), float(view[r]["frequency"] or FMAX)) for r in ranks]

    old = new = now()
    previous_t = 0.0
    elapsed = energy = 0.0
    for i, row in enumerate(work):
        switch = lag * previous_t  # when the last firing's decisions land in this phase
        compute = []
        for r, w in enumerate(row):
            s_old, s_new = speed(old[r]), speed(new[r])
            if w <= switch * s_old:
                compute.append(w / s_old)
            else:
                compute.append(switch + (w - switch * s_old) / s_new)
        t = max(compute)
        energy += IDLE_W * t + sum(rank_energy(compute[r], t, switch, old[r], new[r],
                                               throttle) for r in ranks)
        elapsed += t
        previous_t = t
        order = ranks if i % 2 else ranks[::-1]
        for r in order:
            policy.on_phase(r, r, 1, compute[r], t, i + 1, sites(i))
        old, new = new, now()
    return elapsed, energy, dict(policy.stats)


def _median(values: List[float]) -> float:
    return statistics.median(values) if values else math.nan


def evaluate(patterns: Sequence[str], policies: Sequence[str], seeds: int, phases: int,
             lag: float, noise: float, typed: bool = True, wait_throttle: bool = True,
             slowdown_budget: Optional[float] = daemon.SLOWDOWN_BUDGET) -> List[dict]:
    results = []
    for pattern in patterns:
        per = {p: {"saving": [], "oracle": [], "fraction": [], "slowdown": [],
                   "resets": []} for p in policies}
        for seed in range(seeds):
            work = make_work(pattern, phases, noise, seed)
            base_t, base_e, _ = run_policy("NONE", work, lag)
            oracles = {k: 1 - oracle_energy(k, work) / base_e for k in KNOBS}
            sites = (lambda i, pat=pattern: site_of(pat, i)) if typed else (lambda i: 0)
            for p in policies:
                t, e, stats = run_policy(p, work, lag, sites=sites, wait_throttle=wait_throttle,
                                         slowdown_budget=slowdown_budget)
                saving = 1 - e / base_e
                oracle = oracles[ORACLE_OF.get(p, p)]
                per[p]["saving"].append(saving)
                per[p]["oracle"].append(oracle)
                per[p]["fraction"].append(saving / oracle if oracle > 1e-9 else math.nan)
                per[p]["slowdown"].append(t / base_t - 1)
                per[p]["resets"].append(stats["slowdown_resets"])
        for p in policies:
            d = per[p]
            fractions = [f for f in d["fraction"] if not math.isnan(f)]
            results.append({
                "pattern": pattern, "policy": p,
                "saving": round(_median(d["saving"]), 4),
                "oracle": round(_median(d["oracle"]), 4),
                "fraction": round(_median(fractions), 3) if fractions else None,
                "slowdown": round(_median(d["slowdown"]), 4),
                "slowdown_max": round(max(d["slowdown"]), 4),
                "resets": _median(d["resets"]),
            })
    return results


def table(results: List[dict]) -> str:
    lines = [f"{'pattern':14} {'policy':9} {'saving':>7} {'oracle':>7} {'frac':>6} "
             f"{'slowdown':>9} {'worst':>7} {'resets':>6}"]
    for r in results:
        frac = "-" if r["fraction"] is None else f"{r['fraction']:.2f}"
        lines.append(f"{r['pattern']:14} {r['policy']:9} {100 * r['saving']:6.1f}% "
                     f"{100 * r['oracle']:6.1f}% {frac:>6} {100 * r['slowdown']:+8.2f}% "
                     f"{100 * r['slowdown_max']:+6.2f}% {r['resets']:6.1f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    if "--live" in (sys.argv[1:] if argv is None else argv):
        import power_oracle_live
        return power_oracle_live.main(argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--phases", type=int, default=40)
    ap.add_argument("--lag", type=float, default=0.4, help="fraction of a phase")
    ap.add_argument("--noise", type=float, default=0.05, help="plant noise, +- fraction")
    ap.add_argument("--patterns", default=",".join(PATTERNS))
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--no-sites", action="store_true", help="report no phase type")
    ap.add_argument("--no-wait-throttle", action="store_true",
                    help="no in-wait throttling for any policy (by default the policies "
                         "inwait.for_policy names carry it, as the daemon runs them)")
    ap.add_argument("--slowdown-budget", default=str(daemon.SLOWDOWN_BUDGET),
                    help="the policies' slowdown budget, a fraction, or 'none' "
                         "(the rules before the budget)")
    args = ap.parse_args(argv)
    patterns = [p for p in args.patterns.split(",") if p]
    policies = [p.upper() for p in args.policies.split(",") if p]
    bad = [p for p in patterns if p not in PATTERNS] + [p for p in policies if p not in POLICIES]
    try:
        slowdown_budget = (None if args.slowdown_budget.lower() == "none"
                           else float(args.slowdown_budget))
    except ValueError:
        bad.append(f"--slowdown-budget {args.slowdown_budget}")
        slowdown_budget = None
    if slowdown_budget is not None and not (math.isfinite(slowdown_budget)
                                            and slowdown_budget >= 0):
        bad.append(f"--slowdown-budget {args.slowdown_budget}")
    if bad or args.seeds < 1 or args.phases < 2 or not 0 <= args.lag < 1 or args.noise < 0:
        print(f"power_oracle: bad arguments {bad or vars(args)}; patterns: "
              f"{', '.join(PATTERNS)}; policies: {', '.join(POLICIES)}", file=sys.stderr)
        return 2
    results = evaluate(patterns, policies, args.seeds, args.phases, args.lag, args.noise,
                       typed=not args.no_sites, wait_throttle=not args.no_wait_throttle,
                       slowdown_budget=slowdown_budget)
    if args.json:
        print(json.dumps({"plant": {"lag": args.lag, "noise": args.noise, "seeds": args.seeds,
                                    "phases": args.phases, "sites": not args.no_sites,
                                    "wait_throttle": None if args.no_wait_throttle else {
                                        p: {"delay_s": w.delay_s, "level": w.level,
                                            "frequency_hz": w.frequency_hz(GRID)}
                                        for p, w in sorted(inwait.SETTINGS.items())},
                                    "slowdown_budget": slowdown_budget,
                                    "settle_rounds": daemon.SETTLE_ROUNDS,
                                    "warmup_phases": daemon.WARMUP_PHASES},
                          "results": results}, indent=1))
    else:
        print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
