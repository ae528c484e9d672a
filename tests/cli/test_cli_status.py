"""`nrm status` without --json: what a person reads says what --json says
about the daemon's health."""

from nrm.cli.status import render


def _status(**changes):
    s = {
        "version": "0", "protocol": 1, "pid": 1, "uptime_s": 5.0, "runtime_dir": "/run/nrm",
        "runtime": {"name": "cgroup", "isolates_memory": True, "notes": []},
        "hardware": {"backend": "emulated", "emulated": True},
        "resources": {"cpus": 2, "free_cpus": [0, 1], "nodes": [0]},
        "tasks": {"tasks_started": 0, "tasks_finished": 0, "spawn_failures": 0},
        "containers": 0, "waiting": 0, "requests": {"requests": 1, "request_errors": 0},
        "downstream": {"downstream": {"callback_errors": 0, "received": 3},
                       "seed": {"received": 0}},
        "downstream_failures": {}, "policy": {"write_errors": 0}, "power_cap_w": None,
        "c_parts": {"missing": {}},
        "restart": {"on_restart": "kill", "containers_adopted": 0, "tasks_adopted": 0,
                    "killed": 0, "state_log": {"path": "/run/nrm/state.log",
                                               "write_errors": 0, "complete": True}},
    }
    s.update(changes)
    return s


def _lines(capsys, status) -> list:
    render(status)
    return capsys.readouterr().out.splitlines()


def test_every_heading_is_followed_by_a_space(capsys):
    lines = _lines(capsys, _status())
    assert "downstream: callback_errors 0, received 3" in lines
    assert "seed:      received 0" in lines
    assert "restart:   --on-restart kill; nothing left by a previous nrmd" in lines


def test_health_problems_are_shown(capsys):
    restart = {"on_restart": "adopt", "containers_adopted": 1, "tasks_adopted": 2, "killed": 3,
               "power_cap_restored_w": 150.0,
               "state_log": {"path": "/run/nrm/state.log", "write_errors": 4,
                             "complete": False}}
    out = "\n".join(_lines(capsys, _status(
        restart=restart, downstream_failures={"seed": "cannot bind ipc:///x: in use"},
        policy={"write_errors": 5}, power_cap_w=150.0)))
    assert ("restart:   --on-restart adopt; 1 containers adopted, 2 tasks adopted, "
            "3 processes killed (left by a previous nrmd)") in out
    assert "state log: INCOMPLETE: 4 writes to /run/nrm/state.log failed" in out
    assert "seed:      NOT LISTENING: cannot bind ipc:///x: in use" in out
    assert "policy:    5 control writes refused" in out
    assert "power cap: 150.0 W (put back after the previous nrmd's crash)" in out
