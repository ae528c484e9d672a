"""QCG-PilotJob request files and nrm's YAML workflow files, validated.

A request file is a JSON list of requests (``{"request": "submit", ...}``),
read in order. nrm also reads YAML: the same list, or the workflow shorthand
``{jobs: [...]}`` (one submit request of those jobs). Both formats accept one
nrm extension per job, ``nrm: {manifest: PATH, power: POLICY}``: the slice
manifest the job's tasks run under (its cpu count is replaced by the
scheduler's grant) and the container power policy (docs/pilot.md).

Why validate everything up front, strictly: QCG silently accepts a misspelt
key such as ``dependancies`` and runs the job without its dependency. Here an
unknown key is an error with a "did you mean" hint, and a bad request is
refused whole with ONE line naming the request (1-based index), the job and
the field; the other requests still run (QCG's semantics).

The pure part: nothing here touches the clock, the scheduler or a daemon.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import sys
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Dict, List, Optional, Tuple

from nrm.hpc import mpi
from nrm.manifest import POWER_POLICIES

#: every request type of QCG-PilotJob's file interface (user-facing ones)
REQUEST_TYPES = ("submit", "listJobs", "jobStatus", "jobInfo", "cancelJob", "removeJob",
                 "resourcesInfo", "control", "finish", "status")
CONTROL_COMMANDS = ("finishAfterAllTasksDone",)
JOB_KEYS = ("name", "execution", "resources", "iteration", "dependencies", "nrm")
EXECUTION_KEYS = ("exec", "args", "script", "env", "wd", "stdin", "stdout", "stderr",
                  "modules", "venv", "model", "model_opts")
RESOURCES_KEYS = ("numCores", "numNodes")
COUNT_KEYS = ("exact", "min", "max", "scheduler")
SCHEDULER_KEYS = ("name", "params")
ITER_SCHEDULERS = ("maximum-iters", "split-into")
ITERATION_KEYS = ("start", "stop", "values")
DEPENDENCY_KEYS = ("after",)
NRM_KEYS = ("manifest", "power")
MODEL_OPTS_KEYS = ("mpirun", "mpirun_args", "srun_args")
#: execution models (models.py); MODELS_NOT_YET are refused by name
MODELS = ("default", "threads", "openmpi", "intelmpi", "srunmpi")
MODELS_NOT_YET: Tuple[str, ...] = ()
#: extra keys each request type takes besides ``request``
REQUEST_KEYS = {
    "submit": ("jobs",), "listJobs": (), "jobStatus": ("jobNames",),
    "jobInfo": ("jobNames", "withChilds"), "cancelJob": ("jobNames",),
    "removeJob": ("jobNames",), "resourcesInfo": (), "control": ("command",),
    "finish": (), "status": (),
}
MAX_FILE_BYTES = 64 << 20


class JobFileError(Exception):
    """The whole file is unusable (unreadable, bad JSON/YAML, not a list)."""


class RequestError(ValueError):
    """One request is malformed: nothing of it runs."""

    def __init__(self, index: int, kind: str, message: str, job: Optional[str] = None,
                 where: str = ""):
        self.index, self.kind, self.job, self.where = index, kind, job, where
        self.reason = message
        super().__init__(str(self))

    def __str__(self) -> str:
        head = f"request {self.index}" + (f" ({self.kind})" if self.kind else "")
        if self.job is not None:
            head += f", job {self.job!r}"
        return f"{head}: {self.where + ': ' if self.where else ''}{self.reason}"


class _Bad(ValueError):
    """Raised deep in a job description; the caller adds request and job."""

    def __init__(self, where: str, message: str):
        super().__init__(message)
        self.where = where


# ------------------------------------------------------------------ model ---

#: the parsed descriptions are frozen, and slotted where Python allows it
#: (3.10+): a pilot holds one per job, 10 000s of them
_FROZEN: Dict[str, Any] = {"frozen": True}
if sys.version_info >= (3, 10):
    _FROZEN["slots"] = True


@dataclass(**_FROZEN)
class IterScheduler:
    name: str                  # maximum-iters | split-into
    params: Dict[str, Any] = field(default_factory=dict)


@dataclass(**_FROZEN)
class Count:
    """numCores or numNodes: exact, or a min/max range (as many as free)."""
    exact: Optional[int] = None
    min: Optional[int] = None
    max: Optional[int] = None
    scheduler: Optional[IterScheduler] = None

    @property
    def lowest(self) -> int:
        return self.exact if self.exact is not None else (self.min or 1)

    @property
    def highest(self) -> Optional[int]:
        return self.exact if self.exact is not None else self.max


@dataclass(**_FROZEN)
class Execution:
    exec: Optional[str] = None
    args: Tuple[str, ...] = ()
    script: Optional[str] = None
    env: Dict[str, str] = field(default_factory=dict)
    wd: Optional[str] = None
    stdin: Optional[str] = None
    stdout: Optional[str] = None
    stderr: Optional[str] = None
    modules: Tuple[str, ...] = ()
    venv: Optional[str] = None
    model: str = "default"
    model_opts: Dict[str, Any] = field(default_factory=dict)


@dataclass(**_FROZEN)
class Iteration:
    start: int = 0
    stop: int = 0
    values: Optional[Tuple[Any, ...]] = None

    @property
    def count(self) -> int:
        return len(self.values) if self.values is not None else self.stop - self.start

    def indexes(self) -> range:
        return range(0, len(self.values)) if self.values is not None \
            else range(self.start, self.stop)

    def value(self, index: int) -> Any:
        return self.values[index] if self.values is not None else index


@dataclass(**_FROZEN)
class NrmOptions:
    manifest: Optional[str] = None     # absolute path
    power: Optional[str] = None        # a manifest power policy


@dataclass(**_FROZEN)
class JobSpec:
    name: str
    execution: Execution
    cores: Optional[Count] = None
    nodes: Optional[Count] = None
    iteration: Optional[Iteration] = None
    after: Tuple[str, ...] = ()
    nrm: NrmOptions = field(default_factory=NrmOptions)
    #: what jobs.report repeats of the description as given (execution and
    #: resources): the rest of it is not held for every job
    raw: Dict[str, Any] = field(default_factory=dict, compare=False)


NO_NRM_OPTIONS = NrmOptions()
#: the keys of a job description that jobs.report repeats as given
REPORTED_KEYS = ("execution", "resources")
#: the empty env and model_opts, one read-only mapping for every job
_NONE: Any = MappingProxyType({})


@dataclass(frozen=True)
class Request:
    index: int                 # 1-based position in the file
    kind: str
    jobs: Tuple[JobSpec, ...] = ()
    names: Tuple[str, ...] = ()
    with_childs: bool = False
    command: Optional[str] = None
    #: the request as given and the directory its paths are relative to:
    #: what the resume journal keeps, to parse it again
    raw: Any = field(default=None, compare=False)
    base_dir: str = field(default=".", compare=False)


@dataclass
class Parsed:
    """A file's requests: the valid ones, and one error per refused one."""
    requests: List[Request] = field(default_factory=list)
    errors: List[RequestError] = field(default_factory=list)


# ---------------------------------------------------------------- helpers ---

def _hint(key: str, allowed: Tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" (expected one of: {', '.join(allowed)})"


def _keys(d: Any, where: str, allowed: Tuple[str, ...], what: str = "an object") -> Dict:
    if not isinstance(d, dict):
        raise _Bad(where, f"expected {what}, got {_show(d)}")
    for key in d:
        if key not in allowed:
            inner = f"{where}.{key}" if where else str(key)
            raise _Bad(inner, f"unknown key{_hint(str(key), allowed)}")
    return d


def _show(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def _str(value: Any, where: str, empty: bool = False) -> str:
    if not isinstance(value, str) or (not empty and not value):
        raise _Bad(where, f"expected a{'' if empty else ' non-empty'} string, got {_show(value)}")
    return value


def _opt_str(d: Dict, key: str, where: str) -> Optional[str]:
    return None if d.get(key) is None else _str(d[key], f"{where}.{key}")


def _int(value: Any, where: str, lowest: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Bad(where, f"expected an integer, got {_show(value)}")
    if lowest is not None and value < lowest:
        raise _Bad(where, f"must be at least {lowest}, got {value}")
    return value


def _str_list(value: Any, where: str, allow_str: bool = False) -> Tuple[str, ...]:
    if allow_str and isinstance(value, str):
        return (value,)
    if not isinstance(value, list):
        raise _Bad(where, f"expected a list of strings, got {_show(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise _Bad(f"{where}[{i}]", f"expected a string, got {_show(item)}")
    return tuple(value)


# --------------------------------------------------------------- the job ---

def _execution(d: Any) -> Execution:
    d = _keys(d, "execution", EXECUTION_KEYS)
    exe, script = _opt_str(d, "exec", "execution"), d.get("script")
    if script is not None:
        _str(script, "execution.script")
    if exe is None and script is None:
        raise _Bad("execution", "neither exec nor script is given")
    if exe is not None and script is not None:
        raise _Bad("execution", "exec and script exclude each other")
    args: Tuple[str, ...] = ()
    if d.get("args") is not None:
        if script is not None:
            raise _Bad("execution.args", "args go with exec, not with script")
        args = _str_list(d["args"], "execution.args")
    env = {} if d.get("env") is None else d["env"]
    if not isinstance(env, dict):
        raise _Bad("execution.env", f"expected an object of strings, got {_show(env)}")
    for k, v in env.items():
        if not isinstance(v, str):
            raise _Bad(f"execution.env.{k}", f"expected a string, got {_show(v)}")
    model = d.get("model") or "default"
    if model in MODELS_NOT_YET:
        raise _Bad("execution.model", f"{model!r} is not supported by nrm pilot yet "
                                      "(docs/pilot.md); use 'default' with an mpirun script")
    if model == "intelmpi" and mpi.intel_missing():
        raise _Bad("execution.model", f"'intelmpi': {mpi.intel_missing()}; use openmpi or "
                   "srunmpi")
    if model not in MODELS:
        raise _Bad("execution.model", f"unknown model {_show(model)}"
                   f"{_hint(str(model), MODELS + MODELS_NOT_YET)}")
    opts = _keys({} if d.get("model_opts") is None else d["model_opts"],
                 "execution.model_opts", MODEL_OPTS_KEYS)
    modules: Tuple[str, ...] = ()
    if d.get("modules") is not None:
        modules = _str_list(d["modules"], "execution.modules", allow_str=True)
    return Execution(
        exec=exe, args=args, script=script, env=dict(env) if env else _NONE,
        wd=_opt_str(d, "wd", "execution"),
        stdin=_opt_str(d, "stdin", "execution"), stdout=_opt_str(d, "stdout", "execution"),
        stderr=_opt_str(d, "stderr", "execution"), modules=modules,
        venv=_opt_str(d, "venv", "execution"), model=model,
        model_opts=dict(opts) if opts else _NONE)


def _count(value: Any, where: str) -> Count:
    if isinstance(value, int) and not isinstance(value, bool):
        return Count(exact=_int(value, where, 1))
    d = _keys(value, where, COUNT_KEYS, "an object with exact or min/max (or an integer)")
    exact = None if d.get("exact") is None else _int(d["exact"], f"{where}.exact", 1)
    lo = None if d.get("min") is None else _int(d["min"], f"{where}.min", 1)
    hi = None if d.get("max") is None else _int(d["max"], f"{where}.max", 1)
    sched = None
    if d.get("scheduler") is not None:
        s = _keys(d["scheduler"], f"{where}.scheduler", SCHEDULER_KEYS)
        name = _str(s.get("name"), f"{where}.scheduler.name")
        if name not in ITER_SCHEDULERS:
            raise _Bad(f"{where}.scheduler.name",
                       f"unknown scheduler {name!r}{_hint(name, ITER_SCHEDULERS)}")
        params = {} if s.get("params") is None else s["params"]
        if not isinstance(params, dict):
            raise _Bad(f"{where}.scheduler.params", f"expected an object, got {_show(params)}")
        if name == "split-into" and params.get("parts") is not None:
            _int(params["parts"], f"{where}.scheduler.params.parts", 1)
        if name == "maximum-iters" and hi is not None:
            raise _Bad(f"{where}.max", "max does not go with the maximum-iters scheduler")
        sched = IterScheduler(name, dict(params))
    if exact is not None and (lo is not None or hi is not None or sched is not None):
        raise _Bad(where, "exact excludes min, max and scheduler")
    if exact is None and lo is None and hi is None:
        raise _Bad(where, "give exact, or min and/or max")
    if lo is not None and hi is not None and lo > hi:
        raise _Bad(where, f"min {lo} is larger than max {hi}")
    return Count(exact, lo, hi, sched)


def _iteration(value: Any) -> Iteration:
    if isinstance(value, int) and not isinstance(value, bool):
        return Iteration(0, _int(value, "iteration", 1))
    d = _keys(value, "iteration", ITERATION_KEYS)
    has_stop, has_values = d.get("stop") is not None, d.get("values") is not None
    if has_stop == has_values:
        raise _Bad("iteration", "give either stop or values")
    if has_values:
        if "start" in d:
            raise _Bad("iteration.start", "start does not go with values")
        if not isinstance(d["values"], list) or not d["values"]:
            raise _Bad("iteration.values", f"expected a non-empty list, got {_show(d['values'])}")
        return Iteration(values=tuple(d["values"]))
    start = _int(d.get("start", 0), "iteration.start")
    stop = _int(d["stop"], "iteration.stop")
    if start >= stop:
        raise _Bad("iteration", f"start {start} must be below stop {stop}")
    return Iteration(start, stop)


def _nrm_options(value: Any, base_dir: str) -> NrmOptions:
    d = _keys(value, "nrm", NRM_KEYS)
    manifest = _opt_str(d, "manifest", "nrm")
    if manifest is not None:
        manifest = os.path.normpath(os.path.join(base_dir, manifest))
        if not os.path.isfile(manifest):
            raise _Bad("nrm.manifest", f"{manifest}: no such file")
    power = _opt_str(d, "power", "nrm")
    if power is not None and power.upper() not in POWER_POLICIES:
        raise _Bad("nrm.power", f"unknown power policy {power!r}"
                   f"{_hint(power.upper(), POWER_POLICIES)}")
    return NrmOptions(manifest, None if power is None else power.upper())


def parse_job(d: Any, base_dir: str = ".") -> JobSpec:
    """One job description; raises _Bad naming the field."""
    d = _keys(d, "", JOB_KEYS, "a job description object")
    name = _str(d.get("name"), "name")
    if "execution" not in d:
        raise _Bad("execution", "missing (every job needs exec or script)")
    execution = _execution(d["execution"])
    res = _keys({} if d.get("resources") is None else d["resources"], "resources",
                RESOURCES_KEYS)
    cores = None if res.get("numCores") is None else _count(res["numCores"],
                                                            "resources.numCores")
    nodes = None if res.get("numNodes") is None else _count(res["numNodes"],
                                                            "resources.numNodes")
    iteration = None if d.get("iteration") is None else _iteration(d["iteration"])
    for what, c in (("numCores", cores), ("numNodes", nodes)):
        if c is not None and c.scheduler is not None and iteration is None:
            raise _Bad(f"resources.{what}.scheduler", "an iteration scheduler needs iteration")
    after: Tuple[str, ...] = ()
    if d.get("dependencies") is not None:
        deps = _keys(d["dependencies"], "dependencies", DEPENDENCY_KEYS)
        after = () if deps.get("after") is None else _str_list(deps["after"],
                                                               "dependencies.after")
    nrm = NO_NRM_OPTIONS if d.get("nrm") is None else _nrm_options(d["nrm"], base_dir)
    return JobSpec(name, execution, cores, nodes, iteration, after, nrm,
                   raw={k: d[k] for k in REPORTED_KEYS if k in d})


# ----------------------------------------------------------- the request ---

def parse_request(index: int, req: Any, base_dir: str = ".") -> Request:
    """One request; raises RequestError (one line, naming what is wrong)."""
    parsed = _parse_request(index, req, base_dir)
    return dataclasses.replace(parsed, raw=req, base_dir=base_dir)


def _parse_request(index: int, req: Any, base_dir: str) -> Request:
    if not isinstance(req, dict):
        raise RequestError(index, "", f"expected an object with a \"request\" key, "
                                      f"got {_show(req)}")
    kind = req.get("request")
    if not isinstance(kind, str) or kind not in REQUEST_TYPES:
        hint = _hint(kind, REQUEST_TYPES) if isinstance(kind, str) else ""
        raise RequestError(index, "", f"request: unknown request type {_show(kind)}{hint}")
    allowed = ("request",) + REQUEST_KEYS[kind]
    try:
        _keys(req, "", allowed)
    except _Bad as exc:
        raise RequestError(index, kind, str(exc), where=exc.where) from None
    if kind == "submit":
        jobs = req.get("jobs")
        if not isinstance(jobs, list) or not jobs:
            raise RequestError(index, kind, f"expected a non-empty list, got {_show(jobs)}",
                               where="jobs")
        specs = []
        for i, job in enumerate(jobs):
            label = job.get("name") if isinstance(job, dict) and isinstance(
                job.get("name"), str) else f"#{i + 1}"
            try:
                specs.append(parse_job(job, base_dir))
            except _Bad as exc:
                raise RequestError(index, kind, str(exc), job=label, where=exc.where) from None
        seen = set()
        for spec in specs:
            if spec.name in seen:
                raise RequestError(index, kind, "the name is given twice in this request",
                                   job=spec.name, where="name")
            seen.add(spec.name)
        return Request(index, kind, jobs=tuple(specs))
    if kind in ("jobStatus", "jobInfo", "cancelJob", "removeJob"):
        try:
            names = _str_list(req.get("jobNames"), "jobNames", allow_str=True)
            if not names:
                raise _Bad("jobNames", "expected at least one job name")
            childs = req.get("withChilds", False)
            if not isinstance(childs, bool):
                raise _Bad("withChilds", f"expected true or false, got {_show(childs)}")
        except _Bad as exc:
            raise RequestError(index, kind, str(exc), where=exc.where) from None
        return Request(index, kind, names=names, with_childs=childs)
    if kind == "control":
        cmd = req.get("command")
        if cmd not in CONTROL_COMMANDS:
            hint = _hint(cmd, CONTROL_COMMANDS) if isinstance(cmd, str) else ""
            raise RequestError(index, kind, f"unknown command {_show(cmd)}{hint}",
                               where="command")
        return Request(index, kind, command=cmd)
    return Request(index, kind)


def parse_requests(items: Any, source: str = "<requests>", base_dir: str = ".") -> Parsed:
    if not isinstance(items, list):
        raise JobFileError(f"{source}: expected a list of requests, got {_show(items)[:20]}")
    out = Parsed()
    for i, req in enumerate(items, start=1):
        try:
            out.requests.append(parse_request(i, req, base_dir))
        except RequestError as exc:
            out.errors.append(exc)
    return out


def _yaml_items(text: str, source: str) -> Any:
    import yaml
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise JobFileError(f"{source}: {problem}{line}") from None
    if isinstance(data, dict):
        if set(data) != {"jobs"}:
            extra = sorted(str(k) for k in set(data) - {"jobs"})
            raise JobFileError(f"{source}: a workflow mapping has only the key 'jobs'"
                               + (f" (unknown: {', '.join(extra)})" if extra else ""))
        return [{"request": "submit", "jobs": data["jobs"]},
                {"request": "control", "command": "finishAfterAllTasksDone"}]
    return data


def decode(text: str, source: str, yaml_format: bool = False) -> Any:
    if yaml_format:
        return _yaml_items(text, source)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise JobFileError(f"{source}: not valid JSON at line {exc.lineno} "
                           f"column {exc.colno}: {exc.msg}") from None


def load(path: str) -> Parsed:
    """Read a request file (JSON, or YAML by its .yml/.yaml name)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise JobFileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_BYTES:
        raise JobFileError(f"{path}: larger than {MAX_FILE_BYTES >> 20} MiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JobFileError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    items = decode(text, path, path.endswith((".yml", ".yaml")))
    return parse_requests(items, path, os.path.dirname(os.path.abspath(path)))
