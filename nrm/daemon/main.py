"""nrmd: options, logging, signals; the wiring lives in nrm.daemon.core."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import resource
import stat
import sys
from typing import Optional

from nrm import __version__, log as nrmlog, paths

from nrm.containers.runtimes import KINDS
from nrm.daemon.core import Config, Daemon, StartupError
from nrm.daemon.reconcile import MODES as RESTART_MODES
from nrm.transport import curve

log = logging.getLogger("nrmd")

FEW_FDS = 8192      # below this, nrmd warns: about 8 fds per task at worst


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="nrmd", description="nrm node daemon")
    p.add_argument("--version", action="version", version=f"nrmd {__version__}")
    p.add_argument("--runtime-dir", help="sockets, journal and lock (default: /run/nrm as root, "
                   "else $XDG_RUNTIME_DIR/nrm or /tmp/nrm-UID; env NRM_RUNTIME_DIR)")
    p.add_argument("--node-name", help="key the runtime dir by this node name "
                   "(<runtime dir>/<name>), for hosts running several slurmd")
    p.add_argument("--runtime", choices=KINDS, default="auto",
                   help="how slices are enforced (default: cgroup when writable, else affinity)")
    p.add_argument("--hw", choices=("auto", "linux", "emulated"), default="auto",
                   help="hardware backend (default: linux when RAPL is readable)")
    p.add_argument("--hw-root", default="/", help="root under which every hardware path resolves")
    p.add_argument("--topology", choices=("auto", "sysfs", "hwloc"), default="auto",
                   help="where the cpu/core/package/NUMA topology comes from (default: hwloc's "
                        "lstopo when installed and --hw-root is /, else sysfs)")
    p.add_argument("--topology-xml", metavar="FILE",
                   help="read the topology from this hwloc XML file (lstopo --of xml FILE)")
    p.add_argument("--sensor-period", type=float, default=1.0, metavar="SECONDS",
                   help="sensor sampling period (default 1 s; sustains 5 ms)")
    p.add_argument("--pmpi-lib", help="PMPI interposer to preload for every task (default: "
                   "the one matching the task's MPI launcher, found next to nrm)")
    p.add_argument("--seed-downstream", default=paths.SEED_DOWNSTREAM_URI, metavar="URI",
                   help="seed-era downstream SUB endpoint, 'none' to disable "
                        f"(default {paths.SEED_DOWNSTREAM_URI})")
    p.add_argument("--http", metavar="HOST:PORT",
                   help="serve /metrics, /api/v1/state and the dashboard (off by default)")
    p.add_argument("--power-group", help="Unix group whose members may set power caps")
    p.add_argument("--tcp", metavar="[HOST:]PORT",
                   help="also serve requests on tcp PORT and events on PORT+1, CURVE only "
                        f"(host default {curve.DEFAULT_HOST}; off by default)")
    p.add_argument("--curve-secret-key", metavar="FILE",
                   help="nrmd's keypair file for --tcp (nrm keygen; mode 0600)")
    p.add_argument("--curve-users", metavar="FILE",
                   help="authorized client keys for --tcp: 'USER PUBLIC-KEY' per line")
    p.add_argument("--spawners", type=int, metavar="N",
                   help="spawner helper processes that launch tasks (default: one per "
                        "usable cpu, at most 4; 0: launch from the daemon itself)")
    p.add_argument("--on-restart", choices=RESTART_MODES, default="kill",
                   help="tasks a crashed nrmd left running: kill them (default) or adopt "
                        "them (they keep their slices; exit status unknown)")
    p.add_argument("--emulated", action="append", default=[], metavar="KEY=VALUE",
                   help="emulated-node model parameter (repeatable)")
    p.add_argument("--ready-fd", type=int, metavar="FD",
                   help="write one byte to this inherited file descriptor (a pipe) and close "
                        "it once nrmd serves requests")
    p.add_argument("--daemon-cpus", default="follow", metavar="follow|all|CPULIST",
                   help="where nrmd's own threads run: follow (default) moves them to the cpu "
                        "whose ranks wait most, or to cpus no container uses; all leaves them "
                        "to the kernel; a list (0-1) pins them (housekeeping cores)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.add_argument("--log-format", default="text", choices=("text", "json"))
    return p.parse_args(argv)


def _emulated_options(pairs):
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise StartupError(f"--emulated expects KEY=VALUE, got {pair!r}")
        try:
            out[key] = float(value)
        except ValueError:
            out[key] = value
    return out


def _rundir(args) -> str:
    base = args.runtime_dir or os.environ.get("NRM_RUNTIME_DIR") or paths.default_runtime_dir()
    return os.path.join(base, args.node_name) if args.node_name else base


def _daemon_cpus(text: str):
    """--daemon-cpus, checked now: cpus nrmd may not use are a startup error."""
    from nrm.daemon.affinity import parse_daemon_cpus
    try:
        cpus = parse_daemon_cpus(text)
    except ValueError as exc:
        raise StartupError(str(exc)) from None
    outside = (cpus or frozenset()) - os.sched_getaffinity(0)
    if outside:
        from nrm.hw.topology import format_cpulist
        raise StartupError(f"--daemon-cpus {text}: cpus {format_cpulist(outside)} are not "
                           "in nrmd's affinity mask")
    return cpus


def _ready_fd(fd: Optional[int]) -> Optional[int]:
    """--ready-fd, checked now: a descriptor that is not open is a startup
    error, not a silent wait for whoever started nrmd."""
    if fd is None:
        return None
    try:
        st = os.fstat(fd)
    except (OSError, OverflowError):
        raise StartupError(f"--ready-fd {fd}: not an open file descriptor") from None
    if fd < 3 or not stat.S_ISFIFO(st.st_mode):
        raise StartupError(f"--ready-fd {fd}: not a pipe (stdin, stdout and stderr are not)")
    os.set_inheritable(fd, False)       # tasks must not hold the starter's pipe open
    return fd


def _raise_nofile() -> None:
    """Each task holds a pidfd and two pipes in nrmd and each container a few
    cgroup fds: 1000 tasks need ~8000 fds, far above the usual soft limit of
    1024, so take all the hard limit allows and say so."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            with open("/proc/sys/fs/nr_open") as f:
                target = int(f.read())
        except (OSError, ValueError):
            target = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            log.info("open files limit raised from %d to %d", soft, target)
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open files limit from %d to %d: %s", soft, target,
                        exc)
    else:
        log.info("open files limit: %d", soft)
    if soft != resource.RLIM_INFINITY and soft < FEW_FDS:
        log.warning("open files limit %d allows only about %d tasks at once", soft, soft // 8)


async def _serve(config: Config) -> int:
    daemon = Daemon(config)
    try:
        await daemon.start()
    except StartupError as exc:
        log.error("%s", exc)
        await daemon.stop()
        return 1
    try:
        await daemon.run_until_stopped()
    finally:
        await daemon.stop()
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    nrmlog.setup(args.log_level, args.log_format)
    tcp = None      # checked first: a bad key file is the only line the admin sees
    if args.tcp or args.curve_secret_key or args.curve_users:
        if not args.tcp:
            log.error("--curve-secret-key and --curve-users only make sense with --tcp")
            return 2
        try:
            tcp = curve.server_config(args.tcp, args.curve_secret_key, args.curve_users)
        except curve.CurveError as exc:
            log.error("%s", exc)
            return 2
    _raise_nofile()
    try:
        config = Config(
            runtime_dir=_rundir(args), runtime=args.runtime, hw=args.hw,
            hw_root=args.hw_root, sensor_period=args.sensor_period, pmpi_lib=args.pmpi_lib,
            seed_downstream=None if args.seed_downstream == "none" else args.seed_downstream,
            http=args.http, power_group=args.power_group, on_restart=args.on_restart,
            emulated=_emulated_options(args.emulated), tcp=tcp, spawners=args.spawners,
            ready_fd=_ready_fd(args.ready_fd), daemon_cpus=_daemon_cpus(args.daemon_cpus))
    except StartupError as exc:
        log.error("%s", exc)
        return 2
    if config.spawners is not None and not 0 <= config.spawners <= 256:
        log.error("--spawners must be between 0 and 256")
        return 2
    if config.sensor_period <= 0:
        log.error("--sensor-period must be positive")
        return 2
    from nrm.hw import topology
    topology.configure(args.topology, args.topology_xml)
    try:
        code = asyncio.run(_serve(config))
    except KeyboardInterrupt:
        code = 0
    _exit_now(code)
    return code     # not reached


def _exit_now(code: int) -> None:
    """Exit without the interpreter's finalization (module teardown and a
    collection of every object: 20-40 ms that a private nrmd's starter
    waits for at each stop). Everything a stop must do is done by now:
    controls restored, journals and logs closed, sockets destroyed."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
