"""The coordinator: runs a campaign's pending runs through nrm.client.

One run at a time on the node: node energy and the node power cap are
node-wide, so two runs side by side would share both and neither number
would mean anything.

Exactly once across crashes. Each run's ``started`` record is fsynced
before the launch, its ``finished`` record after its files are on disk.
Runs are never detached: if the coordinator dies (kill -9), its socket
closes and nrmd kills the task. The next coordinator finds the ``started``
without a ``finished``, makes sure the container is gone, records the
attempt ``interrupted`` and runs the combination again as the next attempt.

The power cap found at the start is written to ``DIR/cap.json`` before
the first change and put back at the end, on Ctrl-C, and by the next
coordinator after a kill -9.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import sys
import time
from typing import Any, Callable, Dict, List, Optional, TextIO

from nrm import __version__
from nrm.campaign import journal
from nrm.campaign.progress import Progress
from nrm.campaign.spec import CAP, POLICY, Campaign, Run
from nrm.client import Client, DaemonUnavailable, NrmError
from nrm.tools import reports

CAP_FILE = "cap.json"
FROZEN = "campaign.yml"
#: how long a killed task may take to report its exit before it counts as lost
KILL_GRACE_S = 10.0
STEP_S = 0.1

EXIT_OK, EXIT_FAILED, EXIT_BAD, EXIT_INTERRUPTED = 0, 1, 2, 130


class ChangedInputs(journal.JournalError):
    """Finished runs whose inputs (command, env, manifest) changed since."""


def signal_name(signum: Optional[int]) -> Optional[str]:
    if signum is None:
        return None
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"SIG{signum}"


def outcome_of(status: int, code: Optional[int], signum: Optional[int],
               ok_codes: List[int]) -> str:
    if signum is not None:
        return "signaled"
    if code is None:
        code = status
    return journal.DONE if code in ok_codes else "nonzero"


def read_metrics(text: str, metrics: Dict[str, str]) -> Dict[str, Any]:
    """The last match of each metric's regex (its group, if it has one),
    as a number when it reads as one; None when it never matched."""
    out: Dict[str, Any] = {}
    for name, regex in metrics.items():
        value = None
        for m in re.finditer(regex, text, re.MULTILINE):
            value = m.group(1) if m.re.groups else m.group(0)
        if value is not None:
            try:
                value = float(value)
            except ValueError:
                pass
        out[name] = value
    return out


def energy_of(profile: Optional[dict]) -> Dict[str, Any]:
    """Energy, its source and the average power from an exit profile.
    ``rapl``/``emulated`` come from the sensors' counters, ``series`` is
    integrated from the sampled node power (an estimate)."""
    if not profile:
        return {"energy_j": None, "energy_source": None, "avg_power_w": None}
    s = reports.summary(profile)
    source = s["energy_source"]
    if source == "sensors":
        source = "emulated" if (profile.get("energy") or {}).get("emulated") else "rapl"
    return {"energy_j": s["energy_j"], "energy_source": source,
            "avg_power_w": s["average_power_w"]}


def _fsync_json(path: str, data: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _cap_value(value: Any) -> Optional[float]:
    return None if value in (None, "off") else float(value)


class Prepared:
    """What one attempt of a run needs, worked out before its launch."""

    def __init__(self, coord: "Coordinator", run: Run, st: Optional[journal.RunState],
                 node: str):
        camp = coord.camp
        self.run = run
        self.node = node
        self.attempt = (st.attempts if st is not None else 0) + 1
        self.container = coord._container(run, self.attempt)
        self.rdir = os.path.join(coord.dir, "runs", run.id, f"a{self.attempt}")
        os.makedirs(self.rdir, exist_ok=True)
        self.manifest = camp.manifest_for(run, node)
        self.argv = camp.argv(run, node)
        self.run_env = camp.run_env(run, node)
        self.inputs = camp.inputs_hash(run, node)
        _fsync_json(os.path.join(self.rdir, "manifest.json"), self.manifest.to_dict())
        row: Dict[str, Any] = dict(run.params)
        row.update(repetition=run.repetition, run_id=run.id, attempt=self.attempt, node=node,
                   container=self.container, start_utc=None, duration_s=None, outcome=None,
                   exit_code=None, signal=None, error=None, energy_j=None, energy_source=None,
                   avg_power_w=None, cap_applied_w=_cap_value(run.params[CAP])
                   if CAP in run.params else coord.cap_of(node),
                   policy=run.params.get(POLICY, self.manifest.power.policy),
                   nrm_version=__version__, nrmd_version=coord.nrmd_version(node))
        row.update({m: None for m in camp.metrics})
        self.row = row

    def started_record(self) -> dict:
        return {"e": "started", "id": self.run.id, "attempt": self.attempt,
                "params": self.run.params, "repetition": self.run.repetition,
                "inputs": self.inputs, "node": self.node, "container": self.container,
                "t": time.time()}


class Coordinator:
    """Runs ``campaign`` in ``directory``; :meth:`run` returns the exit status.

    ``client`` is an open :class:`nrm.client.Client` or a callable making
    one (the CLI's, honouring --runtime-dir/--uri); ``changed`` says what to
    do with finished runs whose inputs changed: None (refuse), "rerun" or
    "keep". ``on_start(run, attempt)`` and ``on_end(row)`` are hooks for
    Python users."""

    def __init__(self, campaign: Campaign, directory: str, client: Any = None,
                 retry_failed: bool = False, changed: Optional[str] = None,
                 out: TextIO = sys.stderr,
                 on_start: Optional[Callable[[Run, int], None]] = None,
                 on_end: Optional[Callable[[dict], None]] = None,
                 bar: Optional[bool] = None):
        self.camp = campaign
        self.dir = os.path.abspath(directory)
        self.client_source = client
        self.retry_failed = retry_failed
        self.changed = changed
        self.out = out
        self.progress = Progress(out, bar)
        self.on_start = on_start
        self.on_end = on_end
        self.node = socket.gethostname()
        self.client: Optional[Client] = None
        self.local_nrmd = None
        self.journal: Optional[journal.Journal] = None
        self.stopping: Optional[int] = None
        self.cap_now: Any = None          # what the node's cap is, as far as we know
        self.cap_original: Any = None
        self.cap_touched = False
        self.nrmd_info: Dict[str, Any] = {}

    def say(self, text: str) -> None:
        self.progress.say(text)

    def cap_of(self, node: str) -> Any:
        """The node's power cap as far as this coordinator knows."""
        return self.cap_now

    def nrmd_version(self, node: str) -> Any:
        return self.nrmd_info.get("version")

    # -- the whole campaign -----------------------------------------------
    def run(self) -> int:
        os.makedirs(os.path.join(self.dir, "runs"), exist_ok=True)
        lock = journal.DirLock(self.dir).acquire()
        old_handlers = {}
        try:
            self.journal = journal.Journal(self.dir, warn=self.say)
            records, _ = journal.read(self.dir)
            states = journal.fold(records)
            runs = self.camp.runs()
            todo = self._todo(runs, states)
            self._freeze(runs)
            self._connect()
            self._recover(states)
            self._restore_leftover_cap()
            for sig in (signal.SIGINT, signal.SIGTERM):
                old_handlers[sig] = signal.signal(sig, self._on_signal)
            self._warn_allocation()
            finished = len(runs) - len(todo)
            self.say(f"{self.camp.name}: {len(runs)} runs, {finished} finished before, "
                     f"{len(todo)} to run in {self.dir}{self._where()}")
            self.progress.begin(len(todo))
            try:
                self._run_todo(todo, states)
            finally:
                self.progress.end()
            if self.stopping:
                return EXIT_INTERRUPTED
            records, _ = journal.read(self.dir)
            final = journal.fold(records)
            failed = sum(1 for r in runs if final.get(r.id) is None
                         or final[r.id].state != "done")
            self.say(f"{self.camp.name}: {len(runs) - failed} of {len(runs)} runs ok"
                     + (f", {failed} not ok (nrm campaign status {self.dir})" if failed else ""))
            return EXIT_OK if not failed else EXIT_FAILED
        finally:
            try:
                self._restore_cap()
            finally:
                for sig, handler in old_handlers.items():
                    signal.signal(sig, handler)
                if self.journal is not None:
                    self.journal.close()
                self._disconnect()
                lock.release()

    def _where(self) -> str:
        return ""

    def _run_todo(self, todo: List[Run], states: Dict[str, journal.RunState]) -> None:
        """One run at a time on this node, through its nrmd."""
        for run in todo:
            if self.stopping:
                break
            row = self._run_one(run, states.get(run.id))
            if row["outcome"] == "lost" and not self._daemon_alive():
                self.say("nrmd does not answer: stopping (rerun the same command to "
                         "continue once it is back)")
                break

    def _on_signal(self, signum, _frame) -> None:
        if self.stopping:
            return
        self.stopping = signum
        self.say(f"{signal_name(signum)}: stopping the running task")

    def _todo(self, runs: List[Run], states: Dict[str, journal.RunState]) -> List[Run]:
        todo, changed = [], []
        for run in runs:
            st = states.get(run.id)
            state = st.state if st is not None else "pending"
            node = (st.last.get("row") or {}).get("node") if st is not None \
                and st.last else None
            if state in ("done", "failed") and st.last.get("inputs") is not None \
                    and st.last.get("inputs") != self.camp.inputs_hash(run, node or self.node):
                if self.changed == "rerun":
                    todo.append(run)
                elif self.changed is None:
                    changed.append(run)
                continue
            if state in ("pending", "running") or (state == "failed" and self.retry_failed):
                todo.append(run)
        if changed:
            raise ChangedInputs(
                f"{len(changed)} finished runs were made with other inputs (command, env or "
                f"manifest changed), e.g. {changed[0].label()}: rerun them with "
                "--rerun-changed, or keep their results with --keep-changed")
        return todo

    def _freeze(self, runs: List[Run]) -> None:
        """The campaign file as run and the plan, for status and table."""
        with open(os.path.join(self.dir, FROZEN), "w") as f:
            f.write(self.camp.text)
        journal.write_plan(self.dir, runs)
        _fsync_json(os.path.join(self.dir, "campaign.json"),
                    dict(self.camp.to_json(), path=os.path.abspath(self.camp.path)))

    # -- the daemon ----------------------------------------------------------
    def _connect(self) -> None:
        """The client's nrmd (the node's); when none answers and none was
        named, a private one for the campaign's lifetime, like `make run`."""
        source = self.client_source
        if isinstance(source, Client):
            self.client = source
        else:
            try:
                self.client = source() if callable(source) else Client()
                self.nrmd_info = self.client.status()
            except DaemonUnavailable:
                if source is not None and getattr(source, "explicit", False):
                    raise
                from nrm.tools.localnrmd import LocalNrmd
                self.local_nrmd = LocalNrmd(prefix="nrm-campaign-").start()
                self.say(f"no nrmd answers: started a private one (pid {self.local_nrmd.pid}, "
                         f"log {self.local_nrmd.log_path})")
                self.client = Client(self.local_nrmd.rundir)
        if not self.nrmd_info:
            self.nrmd_info = self.client.status()
        self.cap_now = self.nrmd_info.get("power_cap_w")

    def _disconnect(self) -> None:
        if self.client is not None and not isinstance(self.client_source, Client):
            self.client.close()
        if self.local_nrmd is not None:
            self.local_nrmd.stop()
            shutil.rmtree(self.local_nrmd.rundir, ignore_errors=True)

    def _daemon_alive(self) -> bool:
        try:
            self.client.status()
            return True
        except NrmError:
            return False

    def _container(self, run: Run, attempt: int) -> str:
        return f"campaign-{self.camp.name}-{run.id}-a{attempt}"[:128]

    def _recover(self, states: Dict[str, journal.RunState]) -> None:
        """Attempts a dead coordinator left started: dead first, then
        recorded interrupted, so they run again as their next attempt."""
        orphans = [st for st in states.values() if st.running is not None]
        if not orphans:
            return
        names = {c.get("id") for c in self.client.list()}
        for st in orphans:
            rec = st.running
            name = rec.get("container")
            if name in names:
                self.say(f"killing {name}, left by a coordinator that died")
                try:
                    self.client.kill(name)
                except NrmError:
                    pass
                deadline = time.monotonic() + KILL_GRACE_S
                while time.monotonic() < deadline and name in {
                        c.get("id") for c in self.client.list()}:
                    time.sleep(0.05)
            self._record_orphan(st)

    def _record_orphan(self, st: journal.RunState) -> None:
        rec = st.running
        self.journal.append({"e": "finished", "id": st.id, "attempt": rec.get("attempt", 1),
                             "params": st.params, "repetition": st.repetition,
                             "outcome": journal.INTERRUPTED, "inputs": rec.get("inputs"),
                             "error": "the coordinator died during the run",
                             "t": time.time()})
        st.running = None
        st.last = {"outcome": journal.INTERRUPTED}
        where = f" on {rec['node']}" if rec.get("node") else ""
        self.say(f"{st.id} attempt {rec.get('attempt', 1)}{where} was interrupted by the "
                 "coordinator's death: it runs again")

    # -- the power cap -------------------------------------------------------
    def _cap_path(self) -> str:
        return os.path.join(self.dir, CAP_FILE)

    def _restore_leftover_cap(self) -> None:
        """A cap file means a coordinator changed the cap and died: what it
        found is the original, whatever the node has now."""
        try:
            with open(self._cap_path()) as f:
                self.cap_original = json.load(f)["original_cap_w"]
            self.cap_touched = True
        except FileNotFoundError:
            self.cap_original = self.cap_now
        except (OSError, ValueError, KeyError) as exc:
            raise journal.JournalError(f"{self._cap_path()}: unreadable ({exc}); it holds "
                                       "the node's cap before the campaign: check and "
                                       "remove it") from None

    def _set_cap(self, value: Any) -> None:
        watts = _cap_value(value)
        if watts == self.cap_now:
            return
        if not self.cap_touched:
            _fsync_json(self._cap_path(), {"original_cap_w": self.cap_original})
            self.cap_touched = True
        self.client.setpower(watts)
        self.cap_now = watts

    def _restore_cap(self) -> None:
        if not self.cap_touched or self.client is None:
            return
        try:
            if self.cap_now != self.cap_original:
                self.client.setpower(self.cap_original)
                self.cap_now = self.cap_original
            os.unlink(self._cap_path())
            self.cap_touched = False
            what = "none" if self.cap_original is None else f"{self.cap_original:g} W"
            self.say(f"node power cap restored ({what})")
        except (NrmError, OSError) as exc:
            self.say(f"could not restore the node power cap to {self.cap_original} ({exc}); "
                     f"the next run in {self.dir} tries again")

    def _warn_allocation(self) -> None:
        nodes = os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES")
        if nodes and nodes.isdigit() and int(nodes) > 1:
            self.say(f"inside a {nodes}-node Slurm allocation, every run goes to this node "
                     f"({self.node}) only (--nodes local, or a step of the allocation)")

    # -- one run -----------------------------------------------------------
    def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self.stopping and (left := end - time.monotonic()) > 0:
            time.sleep(min(left, 0.05))

    def _run_one(self, run: Run, st: Optional[journal.RunState]) -> dict:
        p = Prepared(self, run, st, self.node)
        row = p.row
        if self.on_start is not None:
            self.on_start(run, p.attempt)
        try:
            if CAP in run.params:
                self._set_cap(run.params[CAP])
        except NrmError as exc:
            row.update(outcome="launch_error", error=f"setpower: {exc}")
            return self._finish(p, None, started=False)
        self._sleep(self.camp.settle)
        if self.stopping:
            # stopped before the launch: nothing ran, nothing to record
            return dict(row, outcome=journal.INTERRUPTED)
        self.journal.append(p.started_record())
        row["start_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        profile = None
        t0 = time.monotonic()
        env = dict(os.environ, **p.run_env)
        with open(os.path.join(p.rdir, "stdout"), "wb") as out, \
                open(os.path.join(p.rdir, "stderr"), "wb") as err:
            try:
                result, why = self._execute(p.manifest, p.argv, env, p.container, out, err)
                profile = result.profile
                self._outcome(row, result.status, result.code, result.signal, why)
            except DaemonUnavailable as exc:
                row.update(outcome="lost", error=str(exc))
            except NrmError as exc:
                row.update(outcome="lost" if exc.code == "lost" else "launch_error",
                           error=f"{exc.code}: {exc}")
        return self._complete(p, profile, time.monotonic() - t0)

    def _outcome(self, row: dict, status: int, code: Optional[int], signum: Optional[int],
                 why: Optional[str]) -> None:
        """``why``: None, or "timeout"/"interrupted" when the coordinator
        killed the task."""
        row["exit_code"] = code
        row["signal"] = signal_name(signum)
        if why is not None:
            row["outcome"] = why
            row["error"] = (f"killed after the timeout of {self.camp.timeout:g} s"
                            if why == "timeout" else signal_name(self.stopping))
        else:
            row["outcome"] = outcome_of(status, code, signum, self.camp.ok_exit_codes)

    def _complete(self, p: Prepared, profile: Optional[dict], wall: float) -> dict:
        """The row from the profile and the output; the run's files, then its
        finished record."""
        row = p.row
        row["duration_s"] = (profile or {}).get("duration_s") or wall
        row.update(energy_of(profile))
        if self.camp.metrics:
            with open(os.path.join(p.rdir, "stdout"), "rb") as f:
                text = f.read().decode(errors="replace")
            row.update(read_metrics(text, self.camp.metrics))
        if profile is not None:
            _fsync_json(os.path.join(p.rdir, "profile.json"), profile)
        return self._finish(p, wall, started=True)

    def _execute(self, manifest, argv, env, container, out, err):
        """(RunResult, None) or (RunResult, "timeout"/"interrupted") when
        the coordinator killed the task."""
        run = self.client.start(manifest, argv, container=container, env=env,
                                cwd=self.camp.workdir, stdout=out, stderr=err)
        deadline = None if self.camp.timeout is None else time.monotonic() + self.camp.timeout
        why = None
        kill_deadline = None
        self.progress.running = 1
        while not run.step(STEP_S):
            self.progress.tick()
            now = time.monotonic()
            if why is None and self.stopping:
                why = journal.INTERRUPTED
            elif why is None and deadline is not None and now >= deadline:
                why = "timeout"
            if why is not None and kill_deadline is None:
                kill_deadline = now + KILL_GRACE_S
                self._kill(container)
            elif kill_deadline is not None and now >= kill_deadline:
                raise DaemonUnavailable(f"the task did not exit {KILL_GRACE_S:g} s after "
                                        "being killed")
        self.progress.running = 0
        return run.result, why

    def _kill(self, container: str) -> None:
        try:
            self.client.kill(container)
        except NrmError as exc:
            if exc.code not in ("unknown", "not_found", "invalid"):
                raise

    def _finish(self, p: Prepared, wall: Optional[float], started: bool) -> dict:
        row, run = p.row, p.run
        _fsync_json(os.path.join(p.rdir, "meta.json"), row)
        # the parameters are in the row and in the started record
        record = dict(e="finished", id=run.id, inputs=p.inputs,
                      t=time.time(), row=row, outcome=row["outcome"], attempt=row["attempt"],
                      repetition=run.repetition)
        if not started:
            # a run that never launched still needs a started record for folding
            self.journal.append(p.started_record())
        self.journal.append(record)
        self.progress.finished()
        self._progress(run, row)
        if self.on_end is not None:
            self.on_end(row)
        return row

    def _progress(self, run: Run, row: dict) -> None:
        outcome = row["outcome"]
        detail = ""
        if outcome == "nonzero":
            detail = f" (exit {row['exit_code']})"
        elif outcome == "signaled":
            detail = f" ({row['signal']})"
        elif row.get("error") and outcome != journal.DONE:
            detail = f" ({row['error']})"
        energy = ""
        if row.get("energy_j") is not None:
            energy = f", {row['energy_j']:.1f} J ({row['energy_source']})"
        took = f" in {row['duration_s']:.2f} s" if row.get("duration_s") is not None else ""
        attempt = f" attempt {row['attempt']}" if row["attempt"] > 1 else ""
        where = f" on {row['node']}" if self._where() else ""
        count = f"[{self.progress.done}/{self.progress.total}]"
        self.say(f"{count} {run.label()}{attempt}{where}: {outcome}{detail}{took}{energy}")


def dry_run(campaign: Campaign, directory: Optional[str], out: TextIO = sys.stdout) -> int:
    """Every run, with its state when DIR exists; nothing is started."""
    runs = campaign.runs()
    states: Dict[str, journal.RunState] = {}
    if directory and os.path.isdir(directory):
        states = journal.fold(journal.read(directory)[0])
    combos = len(runs) // max(campaign.repetitions, 1)
    out.write(f"{campaign.name}: {len(runs)} runs ({combos} combinations x "
              f"{campaign.repetitions} repetitions); nothing is started\n")
    for run in runs:
        st = states.get(run.id)
        state = st.state if st is not None else "pending"
        out.write(f"{run.id}  {state:8} {run.label()}  $ {shlex.join(campaign.argv(run))}\n")
    return EXIT_OK
