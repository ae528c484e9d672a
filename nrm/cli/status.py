"""nrm status: the daemon's identity, runtime, hardware and counters."""

from nrm.cli.common import add_json_flag, client, show

NAME = "status"
HELP = "show daemon status and counters"


def add_arguments(p) -> None:
    add_json_flag(p)


def execute(args) -> int:
    return show(args, client(args).status(), render)


def _label(name: str) -> str:
    """A line's heading, padded to the common column, never touching its value."""
    return f"{name + ':':<10} "


def render(s) -> None:
    """The lines a person reads; every health problem ``--json`` reports
    (failed endpoints, an incomplete state log, refused control writes,
    what a restart found) has a line here too."""
    rt = s["runtime"]
    hw = s.get("hardware") or {}
    print(f"nrmd {s['version']} (protocol {s['protocol']}) pid {s['pid']}, "
          f"up {s['uptime_s']:.0f} s, runtime dir {s['runtime_dir']}")
    print(_label("runtime") + rt["name"]
          + ("" if rt["isolates_memory"] else " (no memory isolation)"))
    indent = " " * len(_label("runtime"))
    for note in rt.get("notes", []):
        print(f"{indent}{note}")
    if hw:
        label = hw.get("backend", "?")
        if hw.get("emulated") and label != "emulated":
            label += " (emulated)"
        print(_label("hardware") + label)
        for note in hw.get("notes", []) or hw.get("reasons", []) or []:
            print(f"{indent}{note}")
    res = s["resources"]
    print(_label("cpus") + f"{res['cpus']} ({len(res['free_cpus'])} free), "
          f"NUMA nodes {res['nodes']}")
    t = s["tasks"]
    print(_label("tasks") + f"{t['tasks_started']} started, {t['tasks_finished']} finished, "
          f"{t['spawn_failures']} failed to start; {s['containers']} containers running, "
          f"{s['waiting']} waiting")
    r = s["requests"]
    print(_label("requests") + f"{r['requests']} received, {r['request_errors']} rejected")
    for endpoint, counts in sorted((s.get("downstream") or {}).items()):
        print(_label(endpoint) + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    for endpoint, why in sorted((s.get("downstream_failures") or {}).items()):
        print(_label(endpoint) + f"NOT LISTENING: {why}")
    missing = (s.get("c_parts") or {}).get("missing") or {}
    for part, why in sorted(missing.items()):
        hint = " (nrm build-interposer)" if part.startswith("pmpi-") else ""
        print(_label("missing") + f"{part}: {why}{hint}")
    _render_health(s)


def _render_health(s) -> None:
    restart = s.get("restart") or {}
    if restart:
        found = [f"{restart.get(key, 0)} {what}" for key, what in (
            ("containers_adopted", "containers adopted"), ("tasks_adopted", "tasks adopted"),
            ("killed", "processes killed")) if restart.get(key)]
        print(_label("restart") + f"--on-restart {restart.get('on_restart', '?')}; "
              + (", ".join(found) + " (left by a previous nrmd)" if found
                 else "nothing left by a previous nrmd"))
        state_log = restart.get("state_log") or {}
        if state_log and not state_log.get("complete", True):
            print(_label("state log") + f"INCOMPLETE: {state_log.get('write_errors')} writes to "
                  f"{state_log.get('path')} failed; after a crash the next nrmd would miss "
                  "tasks started since")
    keys = s.get("keys") or {}
    if keys.get("keys") or keys.get("write_errors"):
        print(_label("task keys") + f"{keys['keys']} kept for {keys.get('users', 0)} users "
              f"(at most {keys.get('max_per_user')} each; forget those of finished clients)"
              + (f"; {keys['write_errors']} writes to {keys.get('path')} failed"
                 if keys.get("write_errors") else ""))
    refused = (s.get("policy") or {}).get("write_errors")
    if refused:
        print(_label("policy") + f"{refused} control writes refused (no room to journal "
              "the original)")
    if s.get("power_cap_w") is not None:
        restored = restart.get("power_cap_restored_w") is not None
        print(_label("power cap") + f"{s['power_cap_w']:.1f} W"
              + (" (put back after the previous nrmd's crash)" if restored else ""))
