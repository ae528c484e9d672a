"""COMBINED against the single knobs over whole closed-loop runs (the oracle benchmark's plant).

Per need, COMBINED's setting is never more expensive than either knob's
(test_policy_crossrank.py); this checks the claim that matters, over whole
runs with lag, noise and lateness: on every pattern and seed COMBINED saves
at least as much energy as DVFS and as DDCM, and loses no more time than DVFS.
"""

from __future__ import annotations

import os
import sys

import pytest

from tests.nrmd import REPO  # noqa: E402

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import power_oracle  # noqa: E402


@pytest.mark.parametrize("pattern", sorted(power_oracle.PATTERNS))
def test_combined_is_never_worse_than_either_knob_over_a_run(pattern):
    for seed in range(3):
        work = power_oracle.make_work(pattern, 40, 0.05, seed)
        sites = (lambda i: power_oracle.site_of(pattern, i))
        runs = {p: power_oracle.run_policy(p, work, 0.4, sites=sites)
                for p in ("DDCM", "DVFS", "COMBINED")}
        energy = {p: e for p, (_, e, _) in runs.items()}
        assert energy["COMBINED"] <= min(energy["DVFS"], energy["DDCM"]) * (1 + 1e-9), \
            (pattern, seed, energy)
        assert runs["COMBINED"][0] <= runs["DVFS"][0] * (1 + 1e-9), (pattern, seed)


def test_countdown_throttles_only_inside_the_wait():
    work = power_oracle.make_work("shifting", 40, 0.05, 0)
    base_t, base_e, _ = power_oracle.run_policy("NONE", work, 0.4)
    t, e, _ = power_oracle.run_policy("COUNTDOWN", work, 0.4)
    assert t == base_t                      # compute runs at full speed
    assert e < base_e * 0.9                 # the spin of the waiting rank is nearly free
