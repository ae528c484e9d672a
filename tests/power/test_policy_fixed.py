"""FixedPolicy: settings chosen in advance, pinned per rank on the cpu it reports from."""

from __future__ import annotations

import pytest

from nrm.power.policy.container import DUTY_CYCLE, FREQUENCY, Decision
from nrm.power.policy.fixed import FixedPolicy

GHZ = 1e9
GRID = [1.0 * GHZ, 1.2 * GHZ, 1.4 * GHZ, 2.4 * GHZ]


def test_a_listed_rank_is_pinned_on_its_first_report_and_only_then():
    pol = FixedPolicy({1: {"level": 8, "frequency": None}}, cpus=[4, 5])
    assert pol.on_phase(0, 4) == []                       # rank 0 has no entry
    assert pol.on_phase(1, 5) == [Decision(5, DUTY_CYCLE, 16, 8, "fixed")]
    assert pol.on_phase(1, 5, 2, 0.1, 0.2, 7) == []       # nothing decided afterwards
    assert pol.settings() == {4: {"level": 16, "frequency": None},
                              5: {"level": 8, "frequency": None}}
    assert pol.stats["pinned"] == 1 and pol.stats["unlisted"] == 1
    assert pol.stats["messages"] == 3


@pytest.mark.parametrize("pin,expected", [
    # (pinned setting, decisions on cpu 1 of a 1.0-2.4 GHz grid)
    ({"level": 16, "frequency": 1.2 * GHZ},
     [Decision(1, FREQUENCY, 2.4 * GHZ, 1.2 * GHZ, "fixed")]),
    ({"level": 16, "frequency": 1.1 * GHZ},               # rounded up onto the grid
     [Decision(1, FREQUENCY, 2.4 * GHZ, 1.2 * GHZ, "fixed")]),
    ({"level": 12, "frequency": None}, [Decision(1, DUTY_CYCLE, 16, 12, "fixed")]),
    ({"level": 3, "frequency": 1.4 * GHZ},                # frequency first, as COMBINED
     [Decision(1, FREQUENCY, 2.4 * GHZ, 1.4 * GHZ, "fixed"),
      Decision(1, DUTY_CYCLE, 16, 3, "fixed")]),
    ({"level": 16, "frequency": 2.4 * GHZ}, []),          # full speed: nothing to write
    ({"level": 16, "frequency": 9 * GHZ}, []),            # above the grid: its top
])
def test_pinned_settings_table(pin, expected):
    pol = FixedPolicy({0: pin}, cpus=[1], frequencies=GRID)
    assert pol.on_phase(0, 1) == expected


def test_two_ranks_on_one_cpu_get_the_faster_setting():
    pol = FixedPolicy({0: {"level": 4, "frequency": None}, 1: {"level": 10, "frequency": None}},
                      cpus=[0])
    assert pol.on_phase(0, 0) == [Decision(0, DUTY_CYCLE, 16, 4, "fixed")]
    assert pol.on_phase(1, 0) == [Decision(0, DUTY_CYCLE, 4, 10, "fixed")]
    assert pol.stats["shared"] == 1
    assert pol.remove_source(1) == [Decision(0, DUTY_CYCLE, 10, 4, "remove")]
    assert pol.remove_source(0) == [Decision(0, DUTY_CYCLE, 4, 16, "remove")]


def test_a_rank_that_moves_releases_its_old_cpu():
    pol = FixedPolicy({0: {"level": 5, "frequency": None}}, cpus=[2, 3])
    pol.on_phase(0, 2)
    assert pol.on_phase(0, 3) == [Decision(2, DUTY_CYCLE, 5, 16, "fixed"),
                                  Decision(3, DUTY_CYCLE, 16, 5, "fixed")]


def test_foreign_cpus_are_never_written():
    pol = FixedPolicy({0: {"level": 1, "frequency": None}}, cpus=[2])
    assert pol.on_phase(0, 7) == []
    assert pol.stats["foreign_cpu"] == 1 and pol.settings()[2]["level"] == 16


def test_reset_puts_every_cpu_back_to_full_speed():
    pol = FixedPolicy({0: {"level": 2, "frequency": 1.0 * GHZ}}, cpus=[0, 1], frequencies=GRID)
    pol.on_phase(0, 0)
    assert pol.reset() == [Decision(0, FREQUENCY, 1.0 * GHZ, 2.4 * GHZ, "reset"),
                           Decision(0, DUTY_CYCLE, 2, 16, "reset")]
    assert pol.on_phase(0, 0) != []                       # pinned again by the next report


def test_a_frequency_without_a_grid_is_refused_and_bad_levels_too():
    with pytest.raises(ValueError, match="available frequencies"):
        FixedPolicy({0: {"level": 16, "frequency": 1.2 * GHZ}}, cpus=[0])
    with pytest.raises(ValueError, match="rank 3: level must be an integer 1..16"):
        FixedPolicy({3: {"level": 0, "frequency": None}}, cpus=[0])
    FixedPolicy({0: {"level": 8, "frequency": None}}, cpus=[0])   # levels need no grid
