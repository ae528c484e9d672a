"""QCG-PilotJob's Python API on nrm pilot: a QCG script changes only its imports.

    from nrm.pilot.qcg import LocalManager, Jobs      # was qcg.pilotjob.api.*
    manager = LocalManager(["--nodes", "4"])
    ids = manager.submit(Jobs().add(script="echo ${it}", stdout="out.${it}", iteration=4))
    manager.wait4all()
    print(manager.info_parsed(ids, withChilds=True))
    manager.finish()

Same classes, signatures and return shapes as QCG 0.14.2 (docs/pilot.md,
"Python API"). :class:`LocalManager` starts ``nrm pilot --api-socket`` as a
subprocess (as real QCG forks one): the pilot survives a crash of the
script's interpreter state no better or worse than QCG's, keeps its own
event loop off the script's thread, and the script's GIL never slows its
launches. They talk over a Unix socket in a 0700 directory, answered only
for the same user (nrm/pilot/service.py). Waits are answered by the pilot
when the jobs end (no polling). :class:`Manager` also reaches a pilot
started with ``--net`` from another host, over CurveZMQ with the keys the
pilot wrote for its owner (nrm/pilot/netapi.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from typing import Any, Dict, List, Optional, Tuple, Union

from nrm.pilot import jobfile, netapi
from nrm.pilot.model import FINAL, STATE_CODES

Names = Union[str, List[str]]
_HOST_PORT = re.compile(r"^[\w.-]+:\d+$")         # QCG's address without its tcp://


# ------------------------------------------------------------------ errors ---

class QCGPJMAError(Exception):
    """Base of the API's errors."""


class InternalError(QCGPJMAError):
    pass


class InvalidJobDescriptionError(QCGPJMAError):
    pass


class JobNotDefinedError(QCGPJMAError):
    pass


class ConnectionError(QCGPJMAError):      # noqa: A001 (QCG's name)
    """The pilot refused a request (any non-zero response code), or cannot
    be reached."""


class WrongArgumentsError(QCGPJMAError):
    pass


class FileError(QCGPJMAError):
    pass


class ServiceError(QCGPJMAError):
    pass


class TimeoutElapsed(Exception):
    pass


# -------------------------------------------------------------------- jobs ---

_EXECUTION = ("exec", "script", "args", "stdin", "stdout", "stderr", "wd", "modules", "venv",
              "model", "model_opts", "env")
_SIMPLE = _EXECUTION + ("name", "numCores", "numNodes", "wt", "iteration", "after")


def _count(value: Any) -> Any:
    if isinstance(value, dict) and isinstance(value.get("scheduler"), str):
        return dict(value, scheduler={"name": value["scheduler"]})
    return value


def _standard(attrs: Dict[str, Any]) -> Dict[str, Any]:
    """QCG's simple format -> the request file's job description."""
    unknown = sorted(set(attrs) - set(_SIMPLE))
    if unknown:
        raise InvalidJobDescriptionError(f"unknown job attribute(s): {', '.join(unknown)}")
    job: Dict[str, Any] = {"name": attrs.get("name") or f"job-{uuid.uuid4().hex[:10]}"}
    ex = {k: attrs[k] for k in _EXECUTION if attrs.get(k) is not None}
    if isinstance(ex.get("args"), str):
        ex["args"] = [ex["args"]]
    if "args" in ex:
        ex["args"] = [str(a) for a in ex["args"]]
    job["execution"] = ex
    res = {k: _count(attrs[k]) for k in ("numCores", "numNodes") if attrs.get(k) is not None}
    if res:
        job["resources"] = res
    it = attrs.get("iteration")
    if it is not None:
        job["iteration"] = {"values": list(it)} if isinstance(it, (list, tuple)) else it
    after = attrs.get("after")
    if after:
        job["dependencies"] = {"after": [after] if isinstance(after, str) else list(after)}
    return job


class Jobs:
    """A group of job descriptions to submit; methods that add chain."""

    def __init__(self):
        self._jobs: Dict[str, Dict[str, Any]] = {}

    def _add(self, job: Dict[str, Any]) -> "Jobs":
        name = job.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidJobDescriptionError("a job needs a name")
        if name in self._jobs:
            raise InvalidJobDescriptionError(f"job {name} already in the group")
        try:
            jobfile.parse_job(job)
        except ValueError as exc:
            where = getattr(exc, "where", "")
            raise InvalidJobDescriptionError(f"job {name}: {where + ': ' if where else ''}"
                                             f"{exc}") from None
        self._jobs[name] = job
        return self

    def add(self, job_attrs: Optional[Dict[str, Any]] = None, **kw_attrs) -> "Jobs":
        """A job in QCG's simple format (``exec``/``script``, ``numCores``,
        ``iteration``, ``after``, ...). ``wt`` is accepted and ignored."""
        attrs = dict(job_attrs or {}, **kw_attrs)
        attrs.pop("wt", None)
        return self._add(_standard(attrs))

    def add_std(self, job_attrs: Optional[Dict[str, Any]] = None, **kw_attrs) -> "Jobs":
        """A job in the request file's (standard) format."""
        return self._add(dict(job_attrs or {}, **kw_attrs))

    def remove(self, name: str) -> "Jobs":
        if name not in self._jobs:
            raise JobNotDefinedError(f"job {name} not in the group")
        del self._jobs[name]
        return self

    def clear(self) -> int:
        n = len(self._jobs)
        self._jobs.clear()
        return n

    def job_names(self) -> List[str]:
        return list(self._jobs)

    def ordered_job_names(self) -> List[str]:
        return list(self._jobs)

    def jobs(self) -> List[Dict[str, Any]]:
        return list(self._jobs.values())

    def ordered_jobs(self) -> List[Dict[str, Any]]:
        return list(self._jobs.values())

    def load_from_file(self, file_path: str) -> "Jobs":
        try:
            with open(file_path) as f:
                data = json.load(f)
        except (OSError, ValueError) as exc:
            raise FileError(f"{file_path}: {exc}") from None
        if not isinstance(data, list):
            raise FileError(f"{file_path}: expected a list of job descriptions")
        for job in data:
            self.add_std(job)
        return self

    def save_to_file(self, file_path: str) -> None:
        try:
            with open(file_path, "w") as f:
                json.dump(self.ordered_jobs(), f, indent=2)
        except OSError as exc:
            raise FileError(f"{file_path}: {exc}") from None


# ----------------------------------------------------------------- jobinfo ---

_ALLOC = re.compile(r"([^,\[]+)\[([\d:]*)\]")


def _rtime(text: Optional[str]) -> Optional[timedelta]:
    if not text:
        return None
    h, m, s = text.split(":")
    return timedelta(hours=int(h), minutes=int(m), seconds=float(s))


class JobInfo:
    """A job's (or one iteration's) information, parsed from ``info``."""

    def __init__(self):
        self.name: Optional[str] = None
        self.status: Optional[str] = None
        self.nodes: Optional[Dict[str, List[str]]] = None
        self.total_cores: Optional[int] = None
        self.wdir: Optional[str] = None
        self.time: Optional[timedelta] = None
        self.iteration: Optional[int] = None
        self.iterations: Optional[Dict[str, int]] = None
        self.childs: List["JobInfo"] = []
        self.history: List[Tuple[str, str]] = []
        self.messages: Optional[str] = None
        self.exit_code: Optional[int] = None

    def _runtime(self, runtime: Dict[str, Any]) -> None:
        if not runtime:
            return
        self.nodes = {n: [c for c in cores.split(":") if c]
                      for n, cores in _ALLOC.findall(runtime.get("allocation", ""))}
        self.total_cores = sum(len(c) for c in self.nodes.values())
        self.wdir = runtime.get("wd")
        self.time = _rtime(runtime.get("rtime"))
        self.exit_code = runtime.get("exit_code")

    @staticmethod
    def from_job(info: Dict[str, Any]) -> "JobInfo":
        ji = JobInfo()
        ji.name = info.get("jobName")
        ji.status = info.get("status")
        ji.messages = info.get("messages")
        for line in (info.get("history") or "").splitlines():
            if ": " in line:
                stamp, state = line.rsplit(": ", 1)
                ji.history.append((state, stamp))
        ji._runtime(info.get("runtime") or {})
        ji.iterations = info.get("iterations")
        ji.childs = [JobInfo.from_child(ji.name, c) for c in info.get("childs") or []]
        return ji

    @staticmethod
    def from_child(job_name: str, child: Dict[str, Any]) -> "JobInfo":
        ji = JobInfo()
        ji.iteration = child.get("iteration")
        ji.name = f"{job_name}:{ji.iteration}"
        ji.status = child.get("state")
        ji.messages = child.get("messages")
        ji._runtime(child.get("runtime") or {})
        return ji

    def __str__(self) -> str:
        return (f"{self.name} ({self.status}) nodes {self.nodes} cores {self.total_cores} "
                f"time {self.time}")

    __repr__ = __str__


# ----------------------------------------------------------------- manager ---

def _names(names: Names) -> List[str]:
    if isinstance(names, str):
        return [names]
    if isinstance(names, Jobs):
        return names.job_names()
    return list(names)


class Manager:
    """A running pilot's API. ``address``:

    * ``tcp://HOST:PORT`` (or QCG's ``HOST:PORT``): a pilot started with
      ``--net``, over CurveZMQ. The keys: ``cfg["nrm_keys"]`` or
      ``$NRM_PILOT_KEYS`` (the pilot's aux dir), or ``cfg["server_key"]`` and
      ``cfg["client_key"]`` (files); ``cfg["connect_timeout"]`` (10 s);
    * the pilot's aux dir: its ``address`` file and keys, as above;
    * ``ipc://PATH`` or a path: the Unix socket of ``--api-socket``.

    Default: ``$NRM_PILOT_API``, then QCG's ``$QCG_PM_ZMQ_ADDRESS``."""

    def __init__(self, address: Optional[str] = None, cfg: Optional[Dict[str, Any]] = None):
        self.cfg = dict(cfg or {})
        address = (address or os.environ.get("NRM_PILOT_API")
                   or os.environ.get("QCG_PM_ZMQ_ADDRESS"))
        if not address:
            raise ConnectionError("no pilot address: give one, or set NRM_PILOT_API")
        self._sock: Optional[socket.socket] = None
        self._file = None
        self._net = None
        near = None
        if os.path.isdir(address):              # an aux dir: its address file and keys
            near = address
            try:
                address = netapi.read_address(address)
            except netapi.NetError as exc:
                raise ConnectionError(str(exc)) from None
        bare = _HOST_PORT.match(address) and not os.path.exists(address)
        if address.startswith("tcp://") or bare:
            self.address = address if address.startswith("tcp://") else f"tcp://{address}"
            self._connect_net(near)
            return
        self.address = address[len("ipc://"):] if address.startswith("ipc://") else address
        self._connect()

    def _connect_net(self, near: Optional[str]) -> None:
        try:
            keys = netapi.find_keys(self.cfg, near)
            self._net = netapi.NetClient(
                self.address, keys,
                float(self.cfg.get("connect_timeout", netapi.CONNECT_TIMEOUT)))
        except netapi.NetError as exc:
            raise ConnectionError(str(exc)) from None

    def _connect(self) -> None:
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(self.address)
        except OSError as exc:
            raise ConnectionError(f"pilot at {self.address}: {exc.strerror or exc}") from None
        self._sock = sock
        self._file = sock.makefile("rwb")

    def _exchange(self, payload: bytes) -> bytes:
        if self._net is not None:
            try:
                return self._net.request(payload)
            except netapi.NetError as exc:
                raise ConnectionError(str(exc)) from None
        if self._file is None:
            raise ConnectionError("the manager is finished")
        try:
            self._file.write(payload + b"\n")
            self._file.flush()
            line = self._file.readline()
        except OSError as exc:
            raise ConnectionError(f"pilot at {self.address}: {exc.strerror or exc}") from None
        if not line:
            raise ConnectionError(f"pilot at {self.address} closed the connection")
        return line

    def send_request(self, request: Dict[str, Any]) -> Dict[str, Any]:
        """One request; its response's ``data``. ConnectionError when refused."""
        if self._file is None and self._net is None:
            raise ConnectionError("the manager is finished")
        response = json.loads(self._exchange(json.dumps(request).encode()))
        if response.get("code") != 0:
            raise ConnectionError(response.get("message") or "request refused")
        return response.get("data") or {}

    # ------------------------------------------------------------ QCG API ---
    def resources(self) -> Dict[str, int]:
        return self.send_request({"request": "resourcesInfo"})

    def submit(self, jobs: Jobs) -> List[str]:
        return self.send_request({"request": "submit", "jobs": jobs.ordered_jobs()})["jobs"]

    def list(self) -> Dict[str, Dict[str, Any]]:
        return self.send_request({"request": "listJobs"}).get("jobs", {})

    def status(self, names: Names) -> Dict[str, Any]:
        return self.send_request({"request": "jobStatus", "jobNames": _names(names)})

    def info(self, names: Names, withChilds: bool = False, **kwargs) -> Dict[str, Any]:
        return self.send_request({"request": "jobInfo", "jobNames": _names(names),
                                  "withChilds": bool(withChilds or kwargs.get("with_childs"))})

    def info_parsed(self, names: Names, **kwargs) -> Dict[str, JobInfo]:
        data = self.info(names, **kwargs)
        return {name: JobInfo.from_job(entry.get("data") or {"jobName": name})
                for name, entry in data.get("jobs", {}).items()}

    def remove(self, names: Names) -> None:
        self.send_request({"request": "removeJob", "jobNames": _names(names)})

    def cancel(self, names: Names) -> None:
        self.send_request({"request": "cancelJob", "jobNames": _names(names)})

    def system_status(self) -> Dict[str, Any]:
        return self.send_request({"request": "status"})

    def _wait(self, names: List[str], any_: bool, timeout: Optional[float]) -> Dict[str, Any]:
        return self.send_request({"request": "nrmWait", "jobNames": names, "any": any_,
                                  "timeout": timeout})

    def wait4(self, names: Names, timeout: Optional[float] = None) -> Dict[str, str]:
        names = _names(names)
        data = self._wait(names, False, timeout)
        if data.get("timeout"):
            raise TimeoutElapsed(f"the jobs did not finish in {timeout} s")
        return {n: s for n, s in data["jobs"].items()}

    def wait4all(self, timeout_secs: Optional[float] = None) -> None:
        if self._wait([], False, timeout_secs).get("timeout"):
            raise TimeoutElapsed(f"the jobs did not finish in {timeout_secs} s")

    def wait4_any_job_finish(self, timeout_secs: Optional[float] = None
                             ) -> Tuple[Optional[str], Optional[str]]:
        """The first unfinished job (at the call) that finishes."""
        pending = [n for n, e in self.list().items() if e.get("status") not in FINAL]
        if not pending:
            return None, None
        data = self._wait(pending, True, timeout_secs)
        if data.get("timeout"):
            return None, None
        for name, state in data["jobs"].items():
            if state in FINAL:
                return name, state
        return None, None

    @staticmethod
    def is_status_finished(status: Union[str, int]) -> bool:
        if isinstance(status, int):
            return status in {STATE_CODES[s] for s in FINAL}
        return status in FINAL

    def finish(self) -> None:
        try:
            self.send_request({"request": "finish"})
        finally:
            self.cleanup()

    def cleanup(self) -> None:
        if self._net is not None:
            self._net.close()
            self._net = None
        if self._file is not None:
            try:
                self._file.close()
                self._sock.close()
            except OSError:
                pass
            self._file = None


class LocalManager(Manager):
    """Starts ``nrm pilot`` with ``server_args`` (its command-line options,
    e.g. ``["--nodes", "4", "--wd", "out"]``) as a subprocess, then talks to it."""

    def __init__(self, server_args: Optional[List[str]] = None,
                 cfg: Optional[Dict[str, Any]] = None):
        cfg = dict(cfg or {})
        self._dir = tempfile.mkdtemp(prefix="nrm-pilot-api-")      # 0700
        path = os.path.join(self._dir, "sock")
        argv = [sys.executable, "-m", "nrm.cli.main", "pilot", "--api-socket", path]
        self.process = subprocess.Popen(argv + [str(a) for a in server_args or []])
        deadline = time.monotonic() + float(cfg.get("init_timeout", 300))
        while not os.path.exists(path):
            if self.process.poll() is not None:
                shutil.rmtree(self._dir, ignore_errors=True)
                raise ServiceError(f"nrm pilot exited with status {self.process.returncode} "
                                   "before it served the API")
            if time.monotonic() > deadline:
                self.kill_manager_process()
                raise ServiceError("nrm pilot did not serve the API in time")
            time.sleep(0.01)
        super().__init__(path, cfg)

    def finish(self) -> None:
        try:
            super().finish()
        except ConnectionError:
            pass
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.kill_manager_process()
        shutil.rmtree(self._dir, ignore_errors=True)

    def kill_manager_process(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait()
