"""nrm run: launch a command in a slice and stream its output."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys

from nrm.hpc import slurm
from nrm.cli.common import client
from nrm.client import NrmError
from nrm.manifest import load

NAME = "run"
HELP = "run a command inside a resource slice"


def add_arguments(p) -> None:
    p.add_argument("--container", "-c", metavar="NAME",
                   help="join or create this container (how MPI ranks share one slice; "
                        "default under Slurm: slurm-JOB.STEP)")
    p.add_argument("--detach", "-d", action="store_true",
                   help="return once started; output is discarded, the task outlives nrm")
    p.add_argument("--wait", action="store_true", help="wait for cpus instead of failing")
    p.add_argument("--oversubscribe", action="store_true", help="share cpus with other slices")
    p.add_argument("--profile", action="store_true",
                   help="print the container's energy profile on stderr at exit")
    p.add_argument("--profile-json", metavar="FILE", help="write the profile as JSON to FILE")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="print container, task, cpus and exit status on stderr")
    p.add_argument("manifest", help="manifest file (JSON or YAML; ACI or nrm format)")
    p.add_argument("command", nargs="...", metavar="CMD [ARGS ...]")


def _print_profile(profile) -> None:
    out = sys.stderr
    out.write(f"nrm: profile of container {profile.get('container')}: "
              f"{profile.get('duration_s', 0):.3f} s\n")
    energy = profile.get("energy") or {}
    for key in ("energy_j", "package_energy_j", "dram_energy_j", "average_power_w"):
        if key in energy:
            out.write(f"nrm:   {key}: {json.dumps(energy[key])}\n")
    for key, value in sorted(profile.items()):
        if key not in ("container", "duration_s", "energy", "uid", "name", "cpus"):
            out.write(f"nrm:   {key}: {json.dumps(value)}\n")


def _check_writable(path: str) -> None:
    """The profile is written after the task ran: a path that cannot take it
    would lose it (and the task's status) then, so check before running."""
    try:
        with open(path, "a"):
            pass
    except OSError as exc:
        raise NrmError("usage", f"--profile-json {path}: {exc.strerror}") from None


def execute(args) -> int:
    argv = args.command
    if not argv or not argv[0]:
        raise NrmError("usage", "run: no command given (nrm run MANIFEST CMD [ARGS ...])")
    manifest = load(args.manifest, cwd=os.getcwd())
    if args.profile_json:
        _check_writable(args.profile_json)
    if args.profile or args.profile_json:
        manifest = dataclasses.replace(
            manifest, power=dataclasses.replace(manifest.power, profile=True))
    container, cpus_allowed, env, bridge = args.container, None, None, None
    if slurm.in_job():
        # Tasks of one step on one node share a container, inside the cpus
        # Slurm gave this task; see nrm.hpc.slurm for the rules.
        container = container or slurm.default_container()
        cpus_allowed = slurm.step_cpus()
        manifest = slurm.fit_manifest(manifest, cpus_allowed)
        bridge = None if args.detach else slurm.PmiBridge.from_env()
        if bridge is not None:
            env = bridge.task_env(os.environ)
            bridge.start()
    c = client(args)

    def started(result):
        if args.verbose:
            print(f"nrm: task {result.task} in container {result.container} "
                  f"on cpus {result.cpus} mems {result.mems} (pid {result.pid})",
                  file=sys.stderr, flush=True)
        if args.detach:
            print(f"{result.container} {result.task}", flush=True)

    run = c.start(manifest, argv, container=container, detach=args.detach, env=env,
                  stdout=sys.stdout.buffer, stderr=sys.stderr.buffer, wait=args.wait,
                  oversubscribe=args.oversubscribe, cpus_allowed=cpus_allowed,
                  on_started=started)
    interrupts = {"n": 0}

    def forward(signum, _frame):
        interrupts["n"] += 1
        run.signal(signal.SIGKILL if interrupts["n"] > 2 else signum)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)
    try:
        result = run.wait()
    finally:
        if bridge is not None:
            bridge.close()
    if args.detach:
        return 0
    if args.verbose:
        print(f"nrm: task {result.task} exited with status {result.status}", file=sys.stderr)
    if result.profile:
        if args.profile:
            _print_profile(result.profile)
        if args.profile_json:
            with open(args.profile_json, "w") as f:
                json.dump(result.profile, f, indent=2, sort_keys=True)
                f.write("\n")
    return result.status
