"""nrm pilot: run a QCG-PilotJob request file (or an nrm YAML workflow) on nrmd slices.

Options keep qcg-pm-service's names and meanings (docs/pilot.md). Exit
status: 0 when every job succeeded and no request was refused, 1 when some
job failed, was cancelled or omitted or a request was refused, 2 when the
file cannot be used or an option is not supported yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
import uuid

from nrm.cli import early
from nrm import paths
from nrm.client import AsyncClient, NrmError
from nrm.pilot import jobfile, journal, netapi, slurmres
from nrm.pilot.attempts import Attempts
from nrm.pilot.progress import Progress
from nrm.pilot.report import ReportWriter, write_final_status
from nrm.pilot.resume import resume
from nrm.pilot.runner import Runner
from nrm.pilot.netapi import NetServer
from nrm.pilot.service import ApiServer
from nrm.pilot.scheduler import Pool, PoolError, parse_nodes
from nrm.tools.localnrmd import LocalNrmd, NrmdDidNotStart
from nrm.transport.curve import CurveError, load_users

NAME = "pilot"
HELP = "run many small tasks from a QCG-PilotJob request file, each in its own slice"

#: qcg-pm-service options nrm pilot does not implement yet: refused by name
NOT_YET = {
    "--net-pub-port": "the PUB event socket",
    "--governor": "governor mode",
    "--parent": "governor mode", "--slurm-partition-nodes": "Slurm partitions",
    "--slurm-limit-nodes-range-begin": "Slurm node ranges",
    "--slurm-limit-nodes-range-end": "Slurm node ranges",
    "--slurm-resources-file": "Slurm resource files",
    "--enable-proc-stats": "process statistics", "--enable-rt-stats": "runtime statistics",
}


def add_arguments(p) -> None:
    p.add_argument("action", nargs="?", choices=("status", "report"),
                   help="status DIR: what a running or finished pilot is doing (its "
                        "aux dir, or a wd holding one); report DIR: per-task launch "
                        "overhead and core utilisation")
    p.add_argument("dir", nargs="?", metavar="DIR", help="the pilot's aux dir or wd")
    p.add_argument("--json", action="store_true", help="status/report as JSON")
    p.add_argument("--gantt", metavar="OUT.png",
                   help="report: also draw every task on its cores (needs matplotlib)")
    p.add_argument("--progress", choices=("auto", "bar", "lines", "none"), default="auto",
                   help="progress on stderr: a bar on a terminal (auto), plain lines "
                        "otherwise")
    p.add_argument("--file-path", "--file", dest="file_path", metavar="PATH",
                   help="the request file: a JSON list of requests, or YAML by its "
                        ".yml/.yaml name (default: qcg_pm_reqs.json)")
    p.add_argument("--wd", default=".", help="working directory of the pilot and default "
                                             "of its jobs (default: .)")
    p.add_argument("--nodes", metavar="[NAME:]CORES[,...]",
                   help="the pool of nodes and cores (default: this node's cpus); larger "
                        "than the machine runs oversubscribed")
    p.add_argument("--resources", choices=("auto", "local", "slurm"), default="auto",
                   help="where the pool comes from (auto: the Slurm allocation inside "
                        "one, without --nodes)")
    p.add_argument("--envschema", choices=("auto", "slurm"), default="auto",
                   help="also set SLURM_* variables in tasks (auto: inside a Slurm job)")
    p.add_argument("--report-format", choices=("json", "text"), default="json")
    p.add_argument("--report-file", metavar="PATH",
                   help="the jobs report, relative to --wd (default: jobs.report in the "
                        "pilot's directory .nrm-pilot-HOST.PID under --wd)")
    p.add_argument("--log", default="info", choices=("critical", "error", "warning", "info",
                                                     "debug", "notset"),
                   help="level of service.log")
    p.add_argument("--system-core", action="store_true",
                   help="keep one core of the first node for the pilot itself")
    p.add_argument("--nl-init-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="how long the node agents may take to start (Slurm allocation)")
    p.add_argument("--resume", metavar="AUXDIR",
                   help="finish the workflow of a killed pilot: its directory "
                        ".nrm-pilot-HOST.PID (the journal there has the requests)")
    p.add_argument("--api-socket", metavar="PATH",
                   help="serve QCG requests on this Unix socket instead of reading a file "
                        "(what nrm.pilot.qcg.LocalManager starts; its directory becomes 0700)")
    p.add_argument("--show-progress", action="store_true",
                   help="accepted for QCG compatibility: progress is shown (--progress)")
    p.add_argument("--disable-nl", action="store_true",
                   help="accepted for QCG compatibility: nrm has no node launchers")
    p.add_argument("--disable-pub", action="store_true",
                   help="accepted for QCG compatibility: nrm pilot publishes nothing yet")
    p.add_argument("--net", action="store_true",
                   help="serve the QCG API on TCP for nrm.pilot.qcg.Manager, from this or "
                        "another host: CurveZMQ, only keys the owner authorized (the "
                        "pilot's own client key in AUX/net, --net-keys); the address is "
                        "written to AUX/address (0600). No request file is read")
    p.add_argument("--net-port", type=int, metavar="PORT",
                   help="the TCP port (implies --net; default: a free one in "
                        "--net-port-min..--net-port-max)")
    p.add_argument("--net-port-min", type=int, metavar="PORT",
                   help=f"lowest port tried (implies --net; default {netapi.PORT_MIN})")
    p.add_argument("--net-port-max", type=int, metavar="PORT",
                   help=f"highest port tried (implies --net; default {netapi.PORT_MAX})")
    p.add_argument("--net-host", metavar="ADDR",
                   help="the interface address to listen on (implies --net; default: all "
                        "interfaces; the address file names this host)")
    p.add_argument("--net-keys", metavar="FILE",
                   help="more client keys to accept (implies --net): 'USER PUBLIC-KEY' "
                        "lines as nrmd's --curve-users, USER being you (nrm keygen)")
    for opt, what in NOT_YET.items():
        kwargs = {"action": "store_true"} if opt in ("--governor",
                                                     "--enable-proc-stats",
                                                     "--enable-rt-stats") else {}
        p.add_argument(opt, default=None, help=f"not supported yet ({what})", **kwargs)


def _fail(message: str, status: int = 2) -> int:
    print(f"nrm pilot: {message}", file=sys.stderr)
    return status


def _inspect(args) -> int:
    from nrm.pilot import view
    if not args.dir:
        return _fail(f"{args.action}: give the pilot's directory (nrm pilot {args.action} DIR)")
    try:
        aux = view.find_aux(args.dir)
        if args.action == "status":
            st = view.status(aux)
            sys.stdout.write(view.dumps(st) if args.json else view.status_text(st))
            return 0
        rep = view.report(aux)
        sys.stdout.write(view.dumps(rep) if args.json else view.report_text(rep))
        if args.gantt:
            view.gantt(aux, args.gantt)
        return 0
    except view.InspectError as exc:
        return _fail(f"{args.action}: {exc}")


def execute(args) -> int:
    if args.action:
        return _inspect(args)
    if args.dir:
        return _fail(f"unexpected argument {args.dir!r} (nrm pilot status|report DIR)")
    for opt in NOT_YET:
        if getattr(args, opt[2:].replace("-", "_"), None) not in (None, False):
            return _fail(f"{opt}: {NOT_YET[opt]} is not supported by nrm pilot yet "
                         "(docs/pilot.md)")
    net = _net_options(args)
    if isinstance(net, str):
        return _fail(net)
    if net is not None and args.file_path is not None:
        return _fail("--net serves requests from the API: no request file is read "
                     f"(give --net or --file-path {args.file_path}, not both)")
    if args.file_path is None:
        args.file_path = "qcg_pm_reqs.json"
    in_slurm = "SLURM_JOB_ID" in os.environ and not args.nodes
    across = args.resources == "slurm" or (args.resources == "auto" and in_slurm)
    if across and (args.resume or args.api_socket or net is not None):
        which = "--resume" if args.resume else "--api-socket" if args.api_socket else "--net"
        return _fail(f"{which} across a Slurm allocation is not supported by nrm pilot "
                     "yet; give --nodes to use this node alone (docs/pilot.md)")
    head = None
    if args.resume:
        aux = os.path.abspath(args.resume)
        try:
            records, intact = journal.read(os.path.join(aux, journal.FILE))
        except journal.JournalError as exc:
            return _fail(f"--resume: {exc}")
        head = records[0]
        parsed = jobfile.Parsed()
    elif args.api_socket or net is not None:
        parsed = jobfile.Parsed()
    else:
        try:
            parsed = jobfile.load(args.file_path)
        except jobfile.JobFileError as exc:
            return _fail(str(exc))
    try:
        if args.nodes:
            nodes = parse_nodes(args.nodes)
        elif head is not None:
            nodes = [(n, c) for n, c in head["nodes"]]
        elif across:
            nodes = slurmres.allocation(os.environ)
        else:
            nodes = [(socket.gethostname(), len(os.sched_getaffinity(0)))]
        system_core = args.system_core or bool(head and head.get("system_core"))
        if across:      # the Slurm mode's modules (CURVE, agents) only where it runs
            from nrm.pilot.allocation import NodePool as Pool_
        else:
            Pool_ = Pool
        pool = Pool_(nodes, system_core=system_core)
    except (PoolError, slurmres.SlurmResourcesError) as exc:
        return _fail(str(exc))
    if head is not None:
        wd = os.path.abspath(args.wd) if args.wd != "." else head["wd"]
        if args.report_file is None and head.get("report_file"):
            args.report_file = head["report_file"]
        args.report_format = head.get("report_format", args.report_format)
        try:
            log_journal = journal.Journal(os.path.join(aux, journal.FILE), truncate_to=intact)
        except journal.JournalError as exc:
            return _fail(f"--resume: {exc}")
    else:
        wd = os.path.abspath(args.wd)
        aux = os.path.join(wd, f".nrm-pilot-{socket.gethostname()}.{os.getpid()}")
        try:
            os.makedirs(aux, exist_ok=True)
            log_journal = journal.Journal(os.path.join(aux, journal.FILE))
        except OSError as exc:
            return _fail(f"{aux}: {exc.strerror or exc}")
        records = [{"t": "head", "v": journal.VERSION, "pilot": uuid.uuid4().hex[:10],
                    "nodes": nodes, "wd": wd, "system_core": args.system_core,
                    "report_file": args.report_file, "report_format": args.report_format}]
        log_journal.append(records[0])    # made durable with the requests, in one write
    report_path = (os.path.join(wd, args.report_file) if args.report_file
                   else os.path.join(aux, "jobs.report"))
    log = logging.getLogger("nrm.pilot")
    handler = logging.FileHandler(os.path.join(aux, "service.log"))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(args.log.upper())
    log.propagate = False
    for err in parsed.errors:
        print(f"nrm pilot: {args.file_path}: {err}", file=sys.stderr)
        log.error("%s", err)
    daemon = None
    try:
        runtime_dir = args.runtime_dir
        if across or args.uri:
            early.discard()
        else:       # booting since the process began, when none accepted there
            daemon = early.take(paths.runtime_dir(args.runtime_dir))
        if daemon is not None:
            daemon.wait_ready(10.0)
            log.info("no nrmd accepts a connection: started a private one in %s",
                     daemon.rundir)
        elif not across and not _nrmd_answers(args):
            if args.uri:
                return _fail(f"nrmd at {args.uri} does not answer", 1)
            daemon = LocalNrmd(log_level="warning", prefix="nrm-pilot-").start()
            log.info("no nrmd answers: started a private one in %s", daemon.rundir)
        if daemon is not None:
            runtime_dir = daemon.rundir
        status = asyncio.run(_run(args, parsed, pool, wd, aux, report_path, runtime_dir, log,
                                  log_journal, records, across, net))
    except NrmError as exc:             # nrmd refused what the pilot must ask (a claim)
        return _fail(f"nrmd: {exc}", 1)
    except netapi.NetError as exc:
        return _fail(f"--net: {exc}", 1)
    except NrmdDidNotStart as exc:
        return _fail(f"no nrmd answers and a private one did not start: "
                     f"{str(exc).splitlines()[0]}", 1)
    except Exception as exc:
        # an AllocationError comes only from the Slurm mode, which imported
        # its module: looked up, not imported, so a local pilot skips it
        allocation = sys.modules.get("nrm.pilot.allocation")
        if allocation is None or not isinstance(exc, allocation.AllocationError):
            raise
        return _fail(str(exc), 1)
    finally:
        log_journal.close()
        if daemon is not None:
            daemon.stop()
        log.removeHandler(handler)
        handler.close()
    return 1 if parsed.errors and status == 0 else status


def _net_options(args):
    """--net and the options implying it -> (host, ports, extra keys), None
    without --net, or the one-line refusal."""
    if not (args.net or any(v is not None for v in (
            args.net_port, args.net_port_min, args.net_port_max, args.net_host,
            args.net_keys))):
        return None
    try:
        ports = netapi.port_range(args.net_port, args.net_port_min, args.net_port_max)
    except netapi.NetError as exc:
        return str(exc)
    keys = []
    if args.net_keys:
        try:
            users = load_users(args.net_keys)
        except CurveError as exc:
            return f"--net-keys: {exc}"
        others = sorted({u.name for u in users.values() if u.uid != os.getuid()})
        if others:
            return (f"--net-keys: {args.net_keys}: the pilot runs every task as you, so "
                    f"it accepts only your keys (not {', '.join(others)})")
        keys = list(users)
    return args.net_host or "*", ports, keys


def _nrmd_answers(args) -> bool:
    async def probe():
        try:
            client = AsyncClient(args.runtime_dir, timeout=1.0, uri=args.uri,
                                 server_key=args.server_key, key=args.key)
        except NrmError:
            return False
        try:
            await client.status()
            return True
        except NrmError:
            return False
        finally:
            await client.close()
    return asyncio.run(probe())


@contextlib.asynccontextmanager
async def _local_runner(args, runtime_dir, pool, wd, aux, writer, log_journal, records):
    """One node through its nrmd, journaled so that --resume can finish it."""
    async with AsyncClient(runtime_dir, timeout=args.timeout, uri=args.uri,
                           server_key=args.server_key, key=args.key) as client:
        attempts = Attempts(aux, records[0]["pilot"])
        if attempts.use_keys(await client.status()):      # else every task under the fence
            log_journal.append({"t": "keys", "epoch": attempts.epoch})
        yield Runner(pool, wd, client, envschema=args.envschema, on_final=writer,
                     journal=log_journal, attempts=attempts)


async def _run(args, parsed, pool, wd, aux, report_path, runtime_dir, log,
               log_journal, records, across: bool = False, net=None) -> int:
    # a resumed pilot rewrites the report: the replay produces every entry again
    writer = ReportWriter(report_path, args.report_format, fresh=bool(args.resume))
    if across:
        from nrm.pilot.allocation import open_allocation
        opened = open_allocation(pool, wd, aux, envschema=args.envschema, on_final=writer,
                                 init_timeout=args.nl_init_timeout)
    else:
        opened = _local_runner(args, runtime_dir, pool, wd, aux, writer, log_journal, records)
    tcp = None
    try:
        async with opened as runner:
            writer.manager = runner.manager
            server = None
            if args.api_socket or net is not None:
                server = ApiServer(runner, os.path.abspath(args.api_socket)
                                   if args.api_socket else None, wd)
                runner.on_final = lambda item: (writer(item), server.notify())
                await server.start()
            if net is not None:
                host, ports, keys = net
                try:
                    tcp = NetServer(server.answer, aux, host, ports, keys)
                    uri = tcp.start()
                except (netapi.NetError, CurveError, OSError) as exc:
                    server.close()
                    raise netapi.NetError(str(exc)) from None
                print(f"nrm pilot: QCG API on {uri}: Manager('{aux}') here, or "
                      f"Manager('{uri}', {{'nrm_keys': '{aux}'}}) (docs/pilot.md)",
                      file=sys.stderr)
            if args.resume:
                counts = await resume(runner, records[1:])
                log.info("resumed from %s: %s", aux, counts)
                if not runner.manager.jobs and not any(r["t"] == "req" for r in records):
                    print(f"nrm pilot: --resume: {aux}: the journal holds no request (the pilot "
                          "ended before reading its file): nothing to finish", file=sys.stderr)
            progress = Progress(runner.manager, sys.stderr, args.progress)
            progress.start()
            if runner.oversubscribed:
                print(f"nrm pilot: warning: the pool has {pool.total} cores, this node lets "
                      f"the pilot use {len(runner.cpus)} cpus: tasks share cpus",
                      file=sys.stderr)
            for req in parsed.requests:
                response = runner.handle(req)
                log.info("request %d (%s): response %s", req.index, req.kind, response)
                if response["code"] != 0:
                    print(f"nrm pilot: {args.file_path}: request {req.index} ({req.kind}): "
                          f"{response['message']}", file=sys.stderr)
                if req.kind == "finish":
                    break
            if server is not None:              # the API's client says when it is over
                await server.finished.wait()
            # Without finishAfterAllTasksDone QCG ends once the file is read; nrm
            # waits for the submitted jobs anyway (docs/pilot.md): a pilot that
            # exits under its running tasks helps nobody. ``finish`` cancelled them.
            await runner.wait_done()
            await runner.forget_keys()
            progress.stop()
            if tcp is not None:
                tcp.close()
                tcp = None
            if server is not None:
                server.close()
            if runner._inflight:
                await asyncio.gather(*list(runner._inflight), return_exceptions=True)
    finally:
        if tcp is not None:      # also when the run fails: its ZAP thread must end
            tcp.close()
    writer.close()
    write_final_status(os.path.join(aux, "final_status.json"), runner.manager)
    outcome = runner.manager.outcome()
    summary = ", ".join(f"{n} {s}" for s, n in outcome.items() if n)
    print(f"nrm pilot: {len(runner.manager.jobs)} jobs: {summary or 'none'}; "
          f"report {report_path}", file=sys.stderr)
    bad = runner.rejected or any(n for s, n in outcome.items() if s != "SUCCEED")
    return 1 if bad else 0
