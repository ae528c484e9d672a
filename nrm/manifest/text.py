"""Entry points: text (JSON or YAML) or a dict in, a validated manifest out;
files read without blocking on a FIFO."""

from __future__ import annotations

import json
import os
import select
import stat
import time
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from nrm.manifest.aci import _looks_aci, _parse_aci
from nrm.manifest.model import MAX_MANIFEST_BYTES, Manifest, ManifestError, _show
from nrm.manifest.native import _parse_nrm


# ------------------------------------------------------------ entry points ---

def _decode(data: Union[str, bytes], source: str) -> str:
    size = len(data.encode("utf-8", "surrogatepass")) if isinstance(data, str) else len(data)
    if size > MAX_MANIFEST_BYTES:
        raise ManifestError("%s: manifest is %d bytes, larger than the %d KiB limit"
                            % (source, size, MAX_MANIFEST_BYTES // 1024), source=source)
    if isinstance(data, bytes):
        try:
            return data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise ManifestError("%s: not UTF-8 text (byte %d)" % (source, e.start),
                                source=source)
    return data


class _DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _json_pairs(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    """json.loads keeps the last of repeated keys; a repeat is a mistake."""
    out: Dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _load_text(text: str, source: str) -> Any:
    stripped = text.lstrip()
    if not stripped:
        raise ManifestError("%s: empty manifest" % source, source=source)
    if stripped[0] in "{[":
        # JSON first: its error messages point at the real mistake, where
        # YAML's flow-style parser would complain about something vaguer.
        try:
            return json.loads(text, object_pairs_hook=_json_pairs)
        except _DuplicateKey as e:
            raise ManifestError("%s: invalid JSON: duplicate key %s" % (source, _show(e.key)),
                                source=source) from None
        except json.JSONDecodeError as e:
            json_error = "%s: invalid JSON at line %d, column %d: %s" % (
                source, e.lineno, e.colno, e.msg)
        except RecursionError:
            json_error = "%s: invalid JSON: nested too deeply" % source
        except ValueError as e:
            json_error = "%s: invalid JSON: %s" % (source, e)
        try:
            # Flow-style YAML ({name: x, ...}) also starts with a brace.
            return _yaml(text, source)
        except _YamlDuplicate:
            raise
        except ManifestError:
            raise ManifestError(json_error, source=source) from None
    return _yaml(text, source)


def _yaml(text: str, source: str) -> Any:
    # imported here: a JSON manifest, and every verb but run, never pays for PyYAML
    import yaml
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e)
        where = " at line %d, column %d" % (mark.line + 1, mark.column + 1) if mark else ""
        raise ManifestError("%s: invalid YAML%s: %s" % (source, where, problem),
                            source=source) from None
    except RecursionError:
        raise ManifestError("%s: invalid YAML: nested too deeply" % source,
                            source=source) from None
    except ValueError as e:
        raise ManifestError("%s: invalid YAML: %s" % (source, e), source=source) from None
    # The text parsed once already, so composing it again cannot fail.
    _yaml_duplicates(text, source)
    return data


class _YamlDuplicate(ManifestError):
    """Raised as is: the text is valid YAML, so no JSON message applies."""


def _yaml_duplicates(text: str, source: str) -> None:
    """Refuse repeated keys, which PyYAML resolves silently (last one wins).

    A second ``app:`` block is a typo the user must hear about. Composing
    builds only the node graph, no Python objects; shared (aliased) nodes
    are visited once.
    """
    import yaml
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    seen = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            keys = set()
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode) and k.tag != "tag:yaml.org,2002:merge":
                    if (k.tag, k.value) in keys:
                        raise _YamlDuplicate(
                            "%s: invalid YAML at line %d, column %d: duplicate key %s"
                            % (source, k.start_mark.line + 1, k.start_mark.column + 1,
                               _show(k.value)), source=source)
                    keys.add((k.tag, k.value))
                stack.append(k)
                stack.append(v)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)


def parse(text_or_dict: Union[str, bytes, Mapping[str, Any]], source: str = "<manifest>",
          base_dir: Optional[str] = None) -> Manifest:
    """Parse and validate a manifest in either format.

    The format is decided by content (``acKind`` or ``app.isolators`` means
    ACI), never by file extension. ``base_dir`` anchors a relative image path;
    :func:`load` passes the manifest's directory.
    """
    if isinstance(text_or_dict, Mapping):
        d: Any = text_or_dict
    elif isinstance(text_or_dict, (str, bytes)):
        d = _load_text(_decode(text_or_dict, source), source)
    else:
        raise ManifestError("%s: expected manifest text or a mapping, got %s"
                            % (source, type(text_or_dict).__name__), source=source)
    if not isinstance(d, Mapping):
        raise ManifestError("%s: the top level must be a mapping, got %s"
                            % (source, _show(d)), source=source)
    try:
        m = _parse_aci(d) if _looks_aci(d) else _parse_nrm(d, base_dir)
    except ManifestError as e:
        e.source = source
        raise
    except RecursionError:
        raise ManifestError("%s: nested too deeply" % source, source=source) from None
    return m


#: how long a manifest given as a pipe (`<(...)`) may take to arrive
PIPE_MANIFEST_TIMEOUT_S = 5.0


def _read_pipe(fd: int, source: str) -> bytes:
    """A pipe or FIFO, up to one byte past the limit: bounded in time too,
    since a FIFO with no writer (or a stuck one) never ends."""
    data = b""
    deadline = time.monotonic() + PIPE_MANIFEST_TIMEOUT_S
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while len(data) <= MAX_MANIFEST_BYTES:
        try:
            part = os.read(fd, MAX_MANIFEST_BYTES + 1 - len(data))
        except BlockingIOError:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                raise ManifestError("%s: no manifest arrived through this pipe in %.0f s"
                                    % (source, PIPE_MANIFEST_TIMEOUT_S), source=source) from None
            continue
        if not part:
            if data or time.monotonic() > deadline:
                break
            time.sleep(0.05)    # a FIFO whose writer has not opened it yet
            continue
        data += part
    if not data:
        raise ManifestError("%s: nothing was written to this FIFO in %.0f s"
                            % (source, PIPE_MANIFEST_TIMEOUT_S), source=source)
    return data


def load(path: Union[str, "os.PathLike[str]"], cwd: Optional[str] = None) -> Manifest:
    """Read and parse a manifest file.

    A relative ``path`` is resolved against ``cwd``, the directory the user
    typed the command in (the client's, not the daemon's), or the process's
    own working directory when none is given.
    """
    p = os.fspath(path)
    if not os.path.isabs(p):
        p = os.path.join(os.path.abspath(cwd) if cwd else os.getcwd(), p)
    p = os.path.normpath(p)
    try:
        # Non-blocking open: a FIFO nobody writes would block open() forever.
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with open(fd, "rb", buffering=0) as f:
            if stat.S_ISFIFO(os.fstat(fd).st_mode):
                data = _read_pipe(fd, p)
            else:
                os.set_blocking(fd, True)
                # Read one byte past the limit: enough to refuse, and never
                # swallow an endless file such as /dev/zero.
                data = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as e:
        reason = e.strerror or str(e)
        raise ManifestError("%s: cannot read manifest: %s" % (p, reason), source=p) from None
    return parse(data, source=p, base_dir=os.path.dirname(p))
