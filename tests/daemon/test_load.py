"""Issue #7 at full scale: 1000 tasks alive together, 10 listeners and a
downstream flood at once, against a real nrmd started with a soft fd limit
of 1024.  The scenario lives in benchmarks/load.py (which also prints the
timings); this test asserts only what must hold whatever the machine's
speed: counts, exactness, and the memory bound."""

from __future__ import annotations

import collections
import json

import pytest

from benchmarks import load

TASKS, LISTENERS, SENDERS = 1000, 10, 3
# The target; measured peaks are 48-50 MB (docs/reliability.md).  Before
# the senders waited to be read, the receive mark had to be 10000 and the same
# scenario peaked at 64-118 MB; before that, 158 MB and growing.
RSS_CEILING_KB = 60 * 1024


@pytest.fixture(scope="module")
def raw():
    return load.run_scenario(tasks=TASKS, listeners=LISTENERS, senders=SENDERS, hold=1.0,
                             idle_probes=200, nofile=1024)


def test_daemon_survives_and_raised_its_fd_limit(raw):
    assert raw["daemon_rc"] == 0, raw["daemon_log"][-3000:]
    assert "Traceback" not in raw["daemon_log"], raw["daemon_log"][-3000:]
    soft, _hard = raw["daemon_nofile"]
    assert soft > 1024
    assert "open files limit raised from 1024" in raw["daemon_log"]


def test_every_task_started_and_exited_zero_exactly_once(raw):
    assert len(raw["started"]) == TASKS
    assert len(set(raw["started"])) == TASKS
    assert raw["alive_peak"] >= TASKS            # all alive together
    errors = [r for r in raw["results"] if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    assert sorted(r.task for r in raw["results"]) == sorted(raw["started"])
    assert all(r.status == 0 and r.code == 0 for r in raw["results"])
    tasks = raw["status"]["tasks"]
    total = TASKS + SENDERS + 1                  # gate tasks, flood senders, keeper
    assert tasks["tasks_started"] == tasks["tasks_finished"] == total
    assert tasks["spawn_failures"] == 0
    assert raw["status"]["containers"] == 0
    assert raw["keeper_status"] == 0


def test_every_listener_got_every_task_event(raw):
    gate = set(raw["started"])
    assert len(raw["listeners_out"]) == LISTENERS
    for out in raw["listeners_out"]:
        exits = collections.Counter(t for t in out["task_exits"] if t in gate)
        starts = collections.Counter(t for t in out["task_starts"] if t in gate)
        assert set(exits) == gate and set(exits.values()) == {1}
        assert set(starts) == gate and set(starts.values()) == {1}
        assert out["container_exits"] >= TASKS + 1
        assert out["counts"].get("progress", 0) > 0


def test_listeners_see_each_flood_senders_exact_progress_total(raw):
    """Progress events are coalesced, but their totals are exact."""
    reports = [json.loads(b) for b in raw["flood_reports"]]
    expected = {r["task"]: r["progress_calls"] for r in reports}
    assert len(expected) == SENDERS
    for out in raw["listeners_out"]:
        assert out["progress_totals"] == expected


def test_daemon_answered_every_request(raw):
    for phase in ("idle", "loaded"):
        assert raw[phase]["failed"] == {}, phase
        assert raw[phase]["rtts"]["status"] and raw[phase]["rtts"]["list"], phase
    assert raw["loaded"]["largest_list"] >= TASKS   # a list saw them all


def test_downstream_counters_are_exact(raw):
    floods = [r for r in raw["flood_results"] if not isinstance(r, BaseException)]
    assert len(floods) == SENDERS and all(r.status == 0 for r in floods), raw["flood_results"]
    reports = [json.loads(b) for b in raw["flood_reports"]]
    assert len(reports) == SENDERS
    accepted = sum(r["progress_ok"] + r["phase_ok"] + 2 for r in reports)   # + start, exit
    down = raw["status"]["downstream"]
    assert down["downstream"]["received"] == down["downstream"]["decoded"] == accepted
    assert all(v == 0 for k, v in down["downstream"].items()
               if k.startswith("dropped") or k == "callback_errors"), down
    assert all(v == 0 for v in down["rejected"].values()), down
    # a flood, not a trickle: how large depends on the machine (27 506 to
    # well over 30 000 seen for 3 senders); the counts being exact is the point
    assert accepted > 1000 * SENDERS


def _peak_kb(raw) -> int:
    return max([s["VmHWM"] for s in raw["samples"]] + [raw["final_footprint"]["VmHWM"]])


def test_memory_stays_bounded(raw):
    """Queued downstream messages are what costs: the receive mark per
    sender bounds them, and must be low for the target to hold."""
    assert _peak_kb(raw) < RSS_CEILING_KB, f"nrmd peak RSS {_peak_kb(raw)} kB"


def test_fds_mattered_and_none_leak(raw):
    assert max(s["fds"] for s in raw["samples"]) > 1024        # the raised limit mattered
    # nothing per task is left behind (pooled cgroups keep a bounded few)
    assert raw["final_footprint"]["fds"] < raw["idle_footprint"]["fds"] + TASKS // 2
