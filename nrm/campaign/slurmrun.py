"""A campaign spread over the nodes of a Slurm allocation.

Each run is one ``srun --overlap -N1 -n1 -w NODE`` step running
``nrm.campaign.noderun`` on that node, which goes through that node's nrmd:
on a real cluster a node's nrmd listens only on the node, so the
coordinator (on the first node, or where ``salloc`` was typed) could not
reach it any other way. At most one run per node at a time (node energy
and the node cap are node-wide); the nodes work in parallel.

Exactly once, as on one node: the ``started`` record (with the node) is
fsynced before the step starts. srun is started so that it gets SIGTERM
when the coordinator dies (``PR_SET_PDEATHSIG``); srun then cancels the
step, the node runner dies, its connection to nrmd closes and nrmd kills
the task. The next coordinator still runs ``noderun kill`` on the node of
every attempt left started, then records it interrupted and runs it again.

The cap is per node: the coordinator asks every node for its cap first
(one ``probe`` step over all nodes), writes them to ``DIR/cap.json``
before any run, has each run's step apply the run's cap on its node, and
sets each node used back at the end (after a kill -9: at the next run).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

from nrm.campaign import journal, noderun
from nrm.campaign.runner import (KILL_GRACE_S, STEP_S, Coordinator, Prepared,
                                 _cap_value, _fsync_json)
from nrm.campaign.spec import CAP, Run
from nrm.pilot import slurmres

PROBE_TIMEOUT_S = 60.0
#: a kill step's own start-up (srun, python, the client) on top of the task's grace
STEP_GRACE_S = 20.0
PR_SET_PDEATHSIG = 1


class AllocationError(journal.JournalError):
    """The allocation cannot be used; the message is one line."""


def in_allocation(env=os.environ) -> bool:
    """The coordinator of an allocation: a node list, not inside a step."""
    return bool(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")) \
        and not env.get("SLURM_STEP_ID") and shutil.which("srun") is not None


def allocation_nodes(env=os.environ, only: Optional[List[str]] = None) -> List[Tuple[str, int]]:
    try:
        nodes = slurmres.allocation(env)
    except slurmres.SlurmResourcesError as exc:
        raise AllocationError(str(exc)) from None
    if only:
        names = {n for n, _ in nodes}
        unknown = [n for n in only if n not in names]
        if unknown:
            raise AllocationError(f"--nodes: {', '.join(unknown)} not in the allocation "
                                  f"({', '.join(sorted(names))})")
        nodes = [(n, c) for n, c in nodes if n in only]
    return nodes


def _die_with_parent() -> None:
    """In srun's child side of fork: SIGTERM when the coordinator dies."""
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:       # died before prctl took effect
        os._exit(1)


def noderun_argv(*args: str) -> List[str]:
    return [sys.executable, "-m", "nrm.campaign.noderun", *args]


class Flight:
    """A run whose step is out on a node."""

    def __init__(self, p: Prepared, proc: subprocess.Popen, t0: float,
                 deadline: Optional[float]):
        self.p = p
        self.proc = proc
        self.t0 = t0
        self.deadline = deadline
        self.why: Optional[str] = None
        self.killer: Optional[subprocess.Popen] = None
        self.kill_deadline: Optional[float] = None


class SlurmCoordinator(Coordinator):
    """The coordinator for ``nodes`` [(name, cpus)] of the allocation."""

    def __init__(self, campaign, directory: str, nodes: List[Tuple[str, int]], **kwargs):
        super().__init__(campaign, directory, **kwargs)
        self.cpus = dict(nodes)
        self.nodes = [n for n, _ in nodes]
        self.info: Dict[str, dict] = {}
        self.caps: Dict[str, Any] = {}            # node -> cap now, as far as we know
        self.originals: Dict[str, Any] = {}
        self.ready_at: Dict[str, float] = {}
        self.flights: Dict[str, Flight] = {}

    def _where(self) -> str:
        return f" on {len(self.nodes)} nodes ({', '.join(self.nodes)})"

    def cap_of(self, node: str) -> Any:
        return self.caps.get(node)

    def nrmd_version(self, node: str) -> Any:
        return (self.info.get(node) or {}).get("version")

    def _srun(self, nodes: List[str], *args: str, cpus: Optional[int] = None) -> List[str]:
        argv = ["srun", "--overlap", "-N", str(len(nodes)), "--ntasks-per-node=1",
                "-w", ",".join(nodes), "--kill-on-bad-exit=0", "--mpi=none"]
        if cpus:
            argv.append(f"--cpus-per-task={cpus}")
        return argv + noderun_argv(*args)

    def _popen(self, argv: List[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=_die_with_parent, **kwargs)

    # -- the nodes' daemons -------------------------------------------------
    def _connect(self) -> None:
        """One probe step over every node: each node's nrmd answers with its
        cap and version; a node whose nrmd does not is left out, loudly."""
        try:
            r = subprocess.run(self._srun(self.nodes, "probe"), capture_output=True, text=True,
                               stdin=subprocess.DEVNULL, timeout=PROBE_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise AllocationError(f"srun probe of {', '.join(self.nodes)}: {exc}") from None
        for line in r.stdout.splitlines():
            try:
                info = json.loads(line)
            except ValueError:
                continue
            if isinstance(info, dict) and info.get("node") in self.cpus:
                self.info[info["node"]] = info
                self.caps[info["node"]] = info.get("cap")
        missing = [n for n in self.nodes if n not in self.info]
        if missing:
            why = " ".join(r.stderr.strip().splitlines()[-3:]) or f"srun exit {r.returncode}"
            self.say(f"no nrmd answers on {', '.join(missing)}: those nodes are left out "
                     f"({why})")
        self.nodes = [n for n in self.nodes if n in self.info]
        if not self.nodes:
            raise AllocationError("no node of the allocation has an nrmd that answers")
        self.nrmd_info = dict(self.info[self.nodes[0]])

    def _disconnect(self) -> None:
        pass

    def _warn_allocation(self) -> None:
        pass

    def _daemon_alive(self) -> bool:
        return bool(self.nodes)

    def _kill_on(self, node: str, container: str) -> subprocess.Popen:
        return self._popen(self._srun([node], "kill", container), stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE)

    def _recover(self, states: Dict[str, journal.RunState]) -> None:
        orphans = [st for st in states.values() if st.running is not None]
        killers = []
        for st in orphans:
            node, name = st.running.get("node"), st.running.get("container")
            if node in self.nodes and name:
                killers.append((node, name, self._kill_on(node, name)))
        for node, name, proc in killers:
            try:
                _, err = proc.communicate(timeout=KILL_GRACE_S + STEP_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
            if proc.returncode != 0:
                raise AllocationError(f"cannot make sure {name} is gone on {node}: "
                                      f"{err.decode(errors='replace').strip()[-300:]}")
        for st in orphans:
            self._record_orphan(st)

    # -- the caps, per node -------------------------------------------------
    def _restore_leftover_cap(self) -> None:
        path = self._cap_path()
        try:
            with open(path) as f:
                self.originals = dict(json.load(f)["nodes"])
            self.cap_touched = True
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise journal.JournalError(f"{path}: unreadable ({exc}); it holds the nodes' "
                                       "caps before the campaign: check and remove it") from None
        if CAP in self.camp.parameters:
            for node in self.nodes:
                self.originals.setdefault(node, self.caps.get(node))
            _fsync_json(path, {"nodes": self.originals})
            self.cap_touched = True

    def _restore_cap(self) -> None:
        if not self.cap_touched:
            return
        steps = []
        for node, original in self.originals.items():
            if node in self.nodes and self.caps.get(node) != original:
                value = "off" if original is None else f"{original:g}"
                steps.append((node, original, self._popen(
                    self._srun([node], "setpower", value), stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE)))
        failed = []
        for node, original, proc in steps:
            try:
                _, err = proc.communicate(timeout=PROBE_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
            if proc.returncode == 0:
                self.caps[node] = original
            else:
                failed.append(f"{node} ({err.decode(errors='replace').strip()[-200:]})")
        unreachable = [n for n in self.originals if n not in self.nodes]
        if failed or unreachable:
            self.say(f"could not restore the power cap of {', '.join(failed + unreachable)}; "
                     f"the next run in {self.dir} tries again")
            return
        try:
            os.unlink(self._cap_path())
        except FileNotFoundError:
            pass
        self.cap_touched = False
        if steps:
            self.say("node power caps restored (" + ", ".join(
                f"{n}: {'none' if o is None else f'{o:g} W'}" for n, o, _ in steps) + ")")

    # -- the runs ------------------------------------------------------------
    def _free_node(self, now: float) -> Optional[str]:
        for node in self.nodes:
            if node not in self.flights and self.ready_at.get(node, 0.0) <= now:
                return node
        return None

    def _run_todo(self, todo: List[Run], states: Dict[str, journal.RunState]) -> None:
        queue = list(todo)
        settle = self.camp.settle
        start = time.monotonic()
        for node in self.nodes:
            self.ready_at[node] = start + settle
        while (queue and not self.stopping and self.nodes) or self.flights:
            now = time.monotonic()
            while queue and not self.stopping:
                node = self._free_node(now)
                if node is None:
                    break
                self._launch(queue.pop(0), node, states)
            for node, flight in list(self.flights.items()):
                self._watch(node, flight, time.monotonic())
            self.progress.running = len(self.flights)
            self.progress.tick()
            time.sleep(STEP_S)
        if queue and not self.stopping and not self.nodes:
            self.say("no node left: stopping (rerun the same command to continue)")

    def _launch(self, run: Run, node: str, states: Dict[str, journal.RunState]) -> None:
        p = Prepared(self, run, states.get(run.id), node)
        if self.on_start is not None:
            self.on_start(run, p.attempt)
        request = {"manifest": p.manifest.to_dict(), "argv": p.argv, "env": p.run_env,
                   "cwd": self.camp.workdir, "container": p.container}
        if CAP in run.params:
            request["cap"] = _cap_value(run.params[CAP])
        req_path = os.path.join(p.rdir, "request.json")
        _fsync_json(req_path, request)
        try:
            os.unlink(os.path.join(p.rdir, noderun.RESULT))
        except FileNotFoundError:
            pass
        self.journal.append(p.started_record())
        p.row["start_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        with open(os.path.join(p.rdir, "stdout"), "wb") as out, \
                open(os.path.join(p.rdir, "stderr"), "wb") as err:
            proc = self._popen(self._srun([node], "run", req_path, cpus=self.cpus.get(node)),
                               stdout=out, stderr=err)
        now = time.monotonic()
        timeout = self.camp.timeout
        self.flights[node] = Flight(p, proc, now, None if timeout is None else now + timeout)

    def _watch(self, node: str, f: Flight, now: float) -> None:
        if f.proc.poll() is not None:
            if f.killer is not None and f.killer.poll() is None:
                f.killer.kill()
            if f.killer is not None:
                f.killer.wait()
            del self.flights[node]
            self.ready_at[node] = time.monotonic() + self.camp.settle
            self._land(node, f, now - f.t0)
            return
        if f.why is None and self.stopping:
            f.why = journal.INTERRUPTED
        elif f.why is None and f.deadline is not None and now >= f.deadline:
            f.why = "timeout"
        if f.why is not None and f.killer is None:
            f.killer = self._kill_on(node, f.p.container)
            f.kill_deadline = now + KILL_GRACE_S + STEP_GRACE_S
        elif f.kill_deadline is not None and now >= f.kill_deadline:
            f.proc.terminate()          # srun cancels the step
            f.kill_deadline = now + KILL_GRACE_S

    def _land(self, node: str, f: Flight, wall: float) -> None:
        p = f.p
        row = p.row
        try:
            with open(os.path.join(p.rdir, noderun.RESULT)) as fh:
                result = json.load(fh)
        except (OSError, ValueError):
            result = None
        profile = None
        if result is None:
            tail = _tail(os.path.join(p.rdir, "stderr"))
            row.update(outcome="lost", error=f"the step on {node} ended (srun status "
                                             f"{f.proc.returncode}) without a result: {tail}")
            if f.why is None:
                self.nodes.remove(node)
                self.say(f"{node} is left out from now on: {row['error']}")
        elif "error" in result:
            code = result.get("error_code")
            row.update(outcome="lost" if code == "lost" else "launch_error",
                       error=result["error"])
            if code == "lost":
                self.nodes.remove(node)
                self.say(f"{node}'s nrmd does not answer: that node is left out from now on")
        else:
            profile = result.get("profile")
            if "cap" in _request_of(p):
                self.caps[node] = _request_of(p)["cap"]
            row["nrmd_version"] = result.get("nrmd_version")
            self._outcome(row, result.get("status", 0), result.get("code"),
                          result.get("signal"), f.why)
        self._complete(p, profile, wall)


def _request_of(p: Prepared) -> dict:
    with open(os.path.join(p.rdir, "request.json")) as f:
        return json.load(f)


def _tail(path: str, chars: int = 300) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - chars))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return " ".join(text.split()) or "(no output)"


def coordinator(campaign, directory: str, nodes: str = "auto", env=os.environ,
                **kwargs) -> Coordinator:
    """The coordinator ``nodes`` asks for: ``auto`` (the allocation's nodes
    when this is an allocation's coordinator, else this node), ``local``
    (this node's nrmd only) or ``N1,N2`` (those nodes of the allocation)."""
    if nodes == "local" or (nodes == "auto" and not in_allocation(env)):
        return Coordinator(campaign, directory, **kwargs)
    only = None if nodes == "auto" else [n for n in nodes.split(",") if n]
    if shutil.which("srun") is None:
        raise AllocationError("--nodes: srun not found (run inside a Slurm allocation)")
    kwargs.pop("client", None)
    return SlurmCoordinator(campaign, directory, allocation_nodes(env, only), **kwargs)
