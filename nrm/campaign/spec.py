"""The campaign file: parsed, validated, and expanded into runs.

Everything here is pure (no daemon, no state): a campaign file is checked
whole before anything runs, and every error names the file, the line and
the key path (``parameters.policy[2]``), so that a typo costs one edit,
not a half-finished sweep.

A run is one combination of parameter values plus a repetition number.
Its id is a hash of the canonical JSON of both (sorted keys, no spaces):
stable across processes, ``PYTHONHASHSEED`` and the order keys were
written in, and defined for any JSON value (lists of cpus too).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import re
import string
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Dict, List, Optional, Tuple

import yaml

from nrm import durations
from nrm.manifest import POWER_POLICIES, Manifest, ManifestError, load as load_manifest

#: parameter names with a meaning of their own
POLICY, CAP = "policy", "cap_w"
#: placeholders every string may use besides the parameters
BUILTIN_PLACEHOLDERS = ("repetition", "node")
KEYS = ("name", "manifest", "command", "parameters", "exclude", "include", "repetitions",
        "timeout", "ok_exit_codes", "metrics", "env", "set", "settle", "cwd")
MAX_FILE_BYTES = 1 << 20
_LONG_DURATION = re.compile(r"(%s)\s*(m|min|h)" % durations.NUMBER)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class CampaignError(ValueError):
    """A campaign file that cannot be used; ``str`` is the one line to show."""


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def digest(value: Any, length: int = 12) -> str:
    return hashlib.sha256(canonical(value).encode()).hexdigest()[:length]


def run_id(params: Dict[str, Any], repetition: int) -> str:
    return digest({"params": params, "repetition": repetition})


def parse_seconds(value: Any) -> float:
    """A duration in seconds: nrm's grammar (ns/us/ms/s, bare = s) plus
    minutes and hours (``10m``, ``1.5h``), which a sweep's timeout needs."""
    if isinstance(value, str):
        m = _LONG_DURATION.fullmatch(value.strip())
        if m:
            scale = 3600 if m.group(2) == "h" else 60
            secs = Decimal(m.group(1)) * scale
            if secs < 0:
                raise ValueError(durations.EXPECTED)
            return float(secs)
    return float(durations.seconds(value))


# ------------------------------------------------------------ the file ---

class _Source:
    """The file's text and where each key path starts, for messages."""

    def __init__(self, path: str, text: str):
        self.path = path
        self.lines: Dict[str, int] = {}
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f":{mark.line + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise CampaignError(f"{path}{where}: not valid YAML: {problem}") from None
        if node is not None:
            self._walk(node, "")

    def _walk(self, node, path: str) -> None:
        self.lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key, value in node.value:
                name = key.value if isinstance(key, yaml.ScalarNode) else "?"
                sub = f"{path}.{name}" if path else name
                if name in seen:
                    raise CampaignError(f"{self.path}:{key.start_mark.line + 1}: {sub}: "
                                        "duplicate key")
                seen.add(name)
                self.lines[sub] = key.start_mark.line + 1
                self._walk(value, sub)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._walk(item, f"{path}[{i}]")

    def error(self, path: str, message: str) -> CampaignError:
        probe = path
        while probe not in self.lines and probe:
            probe = re.sub(r"(\.[^.\[]*|\[\d+\])$", "", probe)
        line = self.lines.get(probe)
        where = f"{self.path}:{line}" if line else self.path
        return CampaignError(f"{where}: {path}: {message}" if path else f"{where}: {message}")


def _show(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _json_value(value: Any, path: str, src: _Source) -> Any:
    """YAML may hand us dates or sets; runs are keyed by JSON, so refuse them."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise src.error(path, f"expected a finite number, got {_show(value)}")
        return value
    if isinstance(value, list):
        return [_json_value(v, f"{path}[{i}]", src) for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise src.error(path, f"keys must be strings, got {_show(k)}")
            out[k] = _json_value(v, f"{path}.{k}", src)
        return out
    raise src.error(path, f"expected a JSON value (number, string, list, mapping), "
                          f"got {type(value).__name__}")


def _as_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(_as_text(v) for v in value)
    if value is None:
        return ""
    if isinstance(value, dict):
        return canonical(value)
    return str(value)


def substitute(text: str, values: Dict[str, Any]) -> Any:
    """``text`` with its placeholders filled. A string that is exactly one
    placeholder becomes that value itself (a list stays a list, 2 stays 2),
    which lets a parameter set a typed manifest field."""
    fields = list(string.Formatter().parse(text))
    if len(fields) == 1 and fields[0][0] == "" and fields[0][1] and not fields[0][2] \
            and fields[0][1] in values:
        return values[fields[0][1]]
    out = []
    for literal, name, _spec, _conv in fields:
        out.append(literal)
        if name is not None:
            out.append(_as_text(values[name]))
    return "".join(out)


def _check_placeholders(text: str, path: str, known: Tuple[str, ...], src: _Source) -> None:
    try:
        fields = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise src.error(path, f"bad placeholder syntax in {_show(text)} ({exc})") from None
    for _literal, name, spec, conv in fields:
        if name is None:
            continue
        if spec or conv or not _NAME.fullmatch(name):
            raise src.error(path, f"placeholder {{{name}}} must be a plain name "
                                  "(no format spec, index or conversion)")
        if name not in known:
            raise src.error(path, f"placeholder {{{name}}} names no parameter "
                                  f"(known: {', '.join(known)})")


# ---------------------------------------------------------------- model ---

@dataclass(frozen=True)
class Run:
    """One run of the sweep: its parameters, repetition and stable id."""
    id: str
    params: Dict[str, Any]
    repetition: int

    @property
    def values(self) -> Dict[str, Any]:
        return dict(self.params, repetition=self.repetition)

    def label(self) -> str:
        return " ".join(f"{k}={_as_text(v)}" for k, v in self.params.items()) \
            + f" rep={self.repetition}"


@dataclass
class Campaign:
    """A validated campaign file; ``runs()`` is the space in run order."""
    path: str
    name: str
    manifest: str
    command: List[str]
    parameters: Dict[str, List[Any]]
    exclude: List[Dict[str, Any]] = field(default_factory=list)
    include: List[Dict[str, Any]] = field(default_factory=list)
    repetitions: int = 1
    timeout: Optional[float] = None
    ok_exit_codes: List[int] = field(default_factory=lambda: [0])
    metrics: Dict[str, str] = field(default_factory=dict)
    env: Dict[str, str] = field(default_factory=dict)
    set: Dict[str, Any] = field(default_factory=dict)
    settle: float = 0.0
    cwd: str = "."
    text: str = ""
    _manifests: Dict[str, Manifest] = field(default_factory=dict, repr=False)

    @property
    def base_dir(self) -> str:
        return os.path.dirname(os.path.abspath(self.path))

    @property
    def workdir(self) -> str:
        return os.path.normpath(os.path.join(self.base_dir, self.cwd))

    # -- the space --------------------------------------------------------
    def combinations(self) -> List[Dict[str, Any]]:
        """The product in file order, minus ``exclude``, plus ``include``
        (a partial include is expanded over the parameters it leaves out);
        each combination once."""
        names = list(self.parameters)
        out: List[Dict[str, Any]] = []
        seen = set()

        def add(combo: Dict[str, Any]) -> None:
            key = canonical(combo)
            if key not in seen:
                seen.add(key)
                out.append(combo)

        excluded = [{k: canonical(v) for k, v in ex.items()} for ex in self.exclude]
        for values in itertools.product(*(self.parameters[n] for n in names)):
            combo = dict(zip(names, values))
            if any(all(canonical(combo[k]) == v for k, v in ex.items()) for ex in excluded):
                continue
            add(combo)
        for inc in self.include:
            rest = [n for n in names if n not in inc]
            for values in itertools.product(*(self.parameters[n] for n in rest)):
                combo = dict(inc, **dict(zip(rest, values)))
                add({n: combo[n] for n in names})
        return out

    def runs(self) -> List[Run]:
        """Repetitions outermost: each round runs every combination once, so
        the machine's drift spreads over all combinations alike."""
        combos = self.combinations()
        return [Run(run_id(c, r), c, r) for r in range(self.repetitions) for c in combos]

    # -- what one run executes ---------------------------------------------
    def argv(self, run: Run, node: str = "") -> List[str]:
        values = dict(run.values, node=node)
        return [_as_text(substitute(a, values)) for a in self.command]

    def run_env(self, run: Run, node: str = "") -> Dict[str, str]:
        values = dict(run.values, node=node)
        return {k: _as_text(substitute(v, values)) for k, v in self.env.items()}

    def manifest_for(self, run: Run, node: str = "") -> Manifest:
        """The base manifest with ``set`` and the known parameters applied;
        the energy profile is always on (it is what the rows are made of)."""
        values = dict(run.values, node=node)
        path = _as_text(substitute(self.manifest, values))
        overrides = {k: substitute(v, values) if isinstance(v, str) else v
                     for k, v in self.set.items()}
        if POLICY in run.params:
            overrides["app.power.policy"] = run.params[POLICY]
        overrides["app.power.profile"] = True
        key = canonical([path, overrides])
        cached = self._manifests.get(key)
        if cached is None:
            cached = self._build_manifest(path, overrides)
            self._manifests[key] = cached
        return cached

    def _build_manifest(self, path: str, overrides: Dict[str, Any]) -> Manifest:
        full = os.path.join(self.base_dir, path)
        base = load_manifest(full, cwd=self.base_dir)
        d = base.to_dict()
        for dotted, value in overrides.items():
            node = d
            parts = dotted.split(".")
            for part in parts[:-1]:
                if not isinstance(node.get(part), dict):
                    node[part] = {}
                node = node[part]
            node[parts[-1]] = value
        return Manifest.from_dict(d)

    def inputs_hash(self, run: Run, node: str = "") -> str:
        """What the run's result depends on: a finished run whose inputs
        changed is reported, never silently reused."""
        return digest({"argv": self.argv(run, node), "env": self.run_env(run, node),
                       "manifest": self.manifest_for(run, node).to_dict(),
                       "cwd": self.workdir}, 16)

    def to_json(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("text", "_manifests"):
            d.pop(k, None)
        return d


# ------------------------------------------------------------ validation ---

def _require(d: dict, key: str, src: _Source) -> Any:
    if key not in d:
        raise src.error("", f"missing key {key!r}")
    return d[key]


def _string(value: Any, path: str, src: _Source) -> str:
    if not isinstance(value, str) or not value:
        raise src.error(path, f"expected a non-empty string, got {_show(value)}")
    return value


def _mapping(value: Any, path: str, src: _Source) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise src.error(path, f"expected a mapping, got {_show(value)}")
    return value


def _list(value: Any, path: str, src: _Source) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise src.error(path, f"expected a list, got {_show(value)}")
    return value


def _duration(value: Any, path: str, src: _Source) -> float:
    try:
        return parse_seconds(value)
    except ValueError:
        raise src.error(path, f"expected a duration (10s, 500ms, 10m, 1h), "
                              f"got {_show(value)}") from None


def _check_known(name: str, values: List[Any], path: str, src: _Source) -> List[Any]:
    out = []
    for i, v in enumerate(values):
        p = f"{path}[{i}]"
        if name == POLICY:
            if not isinstance(v, str) or v.upper() not in POWER_POLICIES:
                raise src.error(p, f"unknown power policy {_show(v)} "
                                   f"(known: {', '.join(POWER_POLICIES)})")
            v = v.upper()
        elif name == CAP:
            # YAML 1.1 reads a bare off as false
            if v is False or v is None or (isinstance(v, str)
                                           and v.strip().lower() in ("off", "none")):
                v = "off"
            elif isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                raise src.error(p, f"expected a power cap in watts (> 0) or off, "
                                   f"got {_show(v)}")
        out.append(v)
    return out


def _restriction(items: list, key: str, params: Dict[str, List[Any]], src: _Source,
                 known: bool = True) -> List[Dict[str, Any]]:
    out = []
    for i, item in enumerate(items):
        path = f"{key}[{i}]"
        item = _mapping(item, path, src)
        if not item:
            raise src.error(path, "expected a mapping naming at least one parameter")
        for name, value in item.items():
            if name not in params:
                raise src.error(f"{path}.{name}", f"names no parameter "
                                                  f"(parameters: {', '.join(params)})")
            if name in (POLICY, CAP):
                value = _check_known(name, [value], f"{path}.{name}", src)[0]
            item[name] = value
        out.append(item)
    return out


def parse(text: str, path: str = "<campaign>", check_files: bool = True) -> Campaign:
    """A :class:`Campaign` from the file's text, or :class:`CampaignError`."""
    src = _Source(path, text)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:  # pragma: no cover - compose already parsed it
        raise CampaignError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise src.error("", "expected a mapping of campaign keys (name, manifest, command, ...)")
    raw = _json_value(raw, "", src)
    for key in raw:
        if key not in KEYS:
            raise src.error(key, f"unknown key (known: {', '.join(KEYS)})")
    name = _string(_require(raw, "name", src), "name", src)
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise src.error("name", f"expected letters, digits, '.', '_' or '-', got {_show(name)}")
    manifest = _string(_require(raw, "manifest", src), "manifest", src)
    command = _list(_require(raw, "command", src), "command", src)
    if not command:
        raise src.error("command", "expected a non-empty list of strings")
    for i, arg in enumerate(command):
        if isinstance(arg, (int, float)) and not isinstance(arg, bool):
            command[i] = str(arg)
        elif not isinstance(arg, str):
            raise src.error(f"command[{i}]", f"expected a string, got {_show(arg)}")
    params_raw = _mapping(raw.get("parameters"), "parameters", src)
    params: Dict[str, List[Any]] = {}
    for pname, values in params_raw.items():
        p = f"parameters.{pname}"
        if not _NAME.fullmatch(pname):
            raise src.error(p, "a parameter name is letters, digits and '_' (a placeholder)")
        if pname in BUILTIN_PLACEHOLDERS:
            raise src.error(p, f"{pname!r} is reserved (repetitions: N gives {{repetition}})")
        values = values if isinstance(values, list) else None
        if values is None:
            raise src.error(p, "expected a list of values")
        if not values:
            raise src.error(p, "empty list of values (the sweep would be empty)")
        params[pname] = _check_known(pname, values, p, src)
    known = tuple(params) + BUILTIN_PLACEHOLDERS
    exclude = _restriction(_list(raw.get("exclude"), "exclude", src), "exclude", params, src)
    include = _restriction(_list(raw.get("include"), "include", src), "include", params, src)
    reps = raw.get("repetitions", 1)
    if isinstance(reps, bool) or not isinstance(reps, int) or reps < 1:
        raise src.error("repetitions", f"expected a positive integer, got {_show(reps)}")
    timeout = raw.get("timeout")
    timeout = None if timeout is None else _duration(timeout, "timeout", src)
    if timeout is not None and timeout <= 0:
        raise src.error("timeout", "expected a positive duration")
    codes = _list(raw.get("ok_exit_codes", [0]), "ok_exit_codes", src)
    for i, c in enumerate(codes):
        if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c <= 255:
            raise src.error(f"ok_exit_codes[{i}]", f"expected an exit code 0..255, got {_show(c)}")
    metrics = _mapping(raw.get("metrics"), "metrics", src)
    for mname, regex in metrics.items():
        p = f"metrics.{mname}"
        if not _NAME.fullmatch(mname) or mname in params:
            raise src.error(p, "a metric name is letters, digits and '_', not a parameter's")
        try:
            if re.compile(_string(regex, p, src)).groups > 1:
                raise src.error(p, "at most one capture group (the value)")
        except re.error as exc:
            raise src.error(p, f"bad regular expression: {exc}") from None
    env = _mapping(raw.get("env"), "env", src)
    for k, v in list(env.items()):
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            env[k] = v = str(v)
        if not isinstance(v, str):
            raise src.error(f"env.{k}", f"expected a string, got {_show(v)}")
    sets = _mapping(raw.get("set"), "set", src)
    for k in sets:
        if not re.fullmatch(r"(name|app(\.[A-Za-z_]+)+)", k):
            raise src.error(f"set.{k}", "expected a manifest field path (app.slice.cpus, ...)")
    settle = _duration(raw.get("settle", 0), "settle", src)
    cwd = _string(raw.get("cwd", "."), "cwd", src)
    _check_placeholders(manifest, "manifest", known, src)
    for i, arg in enumerate(command):
        _check_placeholders(arg, f"command[{i}]", known, src)
    for k, v in env.items():
        _check_placeholders(v, f"env.{k}", known, src)
    for k, v in sets.items():
        if isinstance(v, str):
            _check_placeholders(v, f"set.{k}", known, src)
    camp = Campaign(path=path, name=name, manifest=manifest, command=command,
                    parameters=params, exclude=exclude, include=include, repetitions=reps,
                    timeout=timeout, ok_exit_codes=codes, metrics=metrics, env=env, set=sets,
                    settle=settle, cwd=cwd, text=text)
    if check_files:
        _check_manifests(camp, src)
    return camp


def _check_manifests(camp: Campaign, src: _Source) -> None:
    """Every distinct manifest the sweep will run is built now: a missing
    file or a bad ``set`` value fails before the first run, not at the 40th."""
    seen = set()
    for combo in camp.combinations():
        probe = Run("", combo, 0)
        key = canonical([substitute(camp.manifest, dict(probe.values, node="")),
                         {k: substitute(v, dict(probe.values, node="")) if isinstance(v, str)
                          else v for k, v in camp.set.items()}, combo.get(POLICY)])
        if key in seen:
            continue
        seen.add(key)
        try:
            camp.manifest_for(probe)
        except ManifestError as exc:
            where = "manifest" if exc.field is None else "set"
            raise src.error(where, f"{exc}") from None
        except OSError as exc:
            raise src.error("manifest", f"{exc.strerror or exc}: {exc.filename}") from None


def load(path: str, check_files: bool = True) -> Campaign:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise CampaignError(f"{path}: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_BYTES:
        raise CampaignError(f"{path}: larger than {MAX_FILE_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise CampaignError(f"{path}: not UTF-8 text") from None
    return parse(text, path, check_files)
