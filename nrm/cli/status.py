"""nrm status: the daemon's identity, runtime, hardware and counters."""

from nrm.cli.common import add_json_flag, client, show

NAME = "status"
HELP = "show daemon status and counters"


def add_arguments(p) -> None:
    add_json_flag(p)


def execute(args) -> int:
    return show(args, client(args).status(), render)


def render(s) -> None:
    rt = s["runtime"]
    hw = s.get("hardware") or {}
    print(f"nrmd {s['version']} (protocol {s['protocol']}) pid {s['pid']}, "
          f"up {s['uptime_s']:.0f} s, runtime dir {s['runtime_dir']}")
    print(f"runtime:   {rt['name']}" + ("" if rt["isolates_memory"] else " (no memory isolation)"))
    for note in rt.get("notes", []):
        print(f"           {note}")
    if hw:
        label = hw.get("backend", "?")
        if hw.get("emulated") and label != "emulated":
            label += " (emulated)"
        print(f"hardware:  {label}")
        for note in hw.get("notes", []) or hw.get("reasons", []) or []:
            print(f"           {note}")
    res = s["resources"]
    print(f"cpus:      {res['cpus']} ({len(res['free_cpus'])} free), NUMA nodes {res['nodes']}")
    t = s["tasks"]
    print(f"tasks:     {t['tasks_started']} started, {t['tasks_finished']} finished, "
          f"{t['spawn_failures']} failed to start; {s['containers']} containers running, "
          f"{s['waiting']} waiting")
    r = s["requests"]
    print(f"requests:  {r['requests']} received, {r['request_errors']} rejected")
    for endpoint, counts in sorted((s.get("downstream") or {}).items()):
        print(f"{endpoint + ':':11}" + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    for endpoint, why in sorted((s.get("downstream_failures") or {}).items()):
        print(f"{endpoint + ':':11}NOT LISTENING: {why}")
    missing = (s.get("c_parts") or {}).get("missing") or {}
    for part, why in sorted(missing.items()):
        hint = " (nrm build-interposer)" if part.startswith("pmpi-") else ""
        print(f"{'missing:':11}{part}: {why}{hint}")
    if s.get("power_cap_w") is not None:
        print(f"power cap: {s['power_cap_w']:.1f} W")
