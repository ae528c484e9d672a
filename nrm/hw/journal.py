"""Crash-safe record of the original value of every control nrm changed.

A daemon killed while it has cores clock-modulated would leave the node
slow for the next user. So the original of a control is appended here and
fsynced before the first hardware write, and removed once put back; the
next daemon restores whatever is left. One JSON object per line: an append
is a single small write, and a line torn by a crash is simply skipped.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from typing import Any, Dict, Iterable, List, Tuple

from nrm import jsonlines
from nrm.hw.registry import HardwareError

log = logging.getLogger(__name__)


class Journal:
    """Owns the file of saved control originals: append before a write,
    drop once restored, read back by the next daemon."""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()

    def load(self) -> List[Dict[str, Any]]:
        """Entries in append order; the first entry of a (backend, name, index) wins."""
        try:
            lines = jsonlines.read(self.path).decode().splitlines()
        except FileNotFoundError:
            return []
        except OSError as e:
            log.error("cannot read control journal %s: %s (a link, or not a regular "
                      "file, is ignored)", self.path, e.strerror or e)
            return []
        except UnicodeDecodeError as e:
            log.error("cannot read control journal %s: %s", self.path, e)
            return []
        entries: List[Dict[str, Any]] = []
        seen = set()
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                e = json.loads(line)
                key = (e["backend"], e["name"], e["index"])
            except (ValueError, KeyError, TypeError):
                log.warning("control journal %s line %d is damaged (torn write?): skipped",
                            self.path, n)
                continue
            if key in seen:
                continue
            seen.add(key)
            entries.append(e)
        return entries

    def append(self, entry: Dict[str, Any]) -> None:
        line = (json.dumps(entry, sort_keys=True) + "\n").encode()
        with self._lock:
            fd = -1
            try:
                parent = os.path.dirname(self.path)
                if parent:
                    os.makedirs(parent, mode=0o700, exist_ok=True)
                fd = jsonlines.open_append(self.path)
                jsonlines.append(fd, line, durable=True)
            except OSError as e:
                raise HardwareError(
                    f"cannot journal the original of {entry.get('name')}[{entry.get('index')}] "
                    f"in {self.path}: {e.strerror or e}; refusing the write because an "
                    f"unjournaled change could leave the node throttled after a crash") from None
            finally:
                if fd >= 0:
                    os.close(fd)

    def drop(self, backend: str, keys: Iterable[Tuple[str, int]]) -> None:
        gone = {(backend, n, i) for n, i in keys}
        with self._lock:
            remaining = [e for e in self.load()
                         if (e.get("backend"), e.get("name"), e.get("index")) not in gone]
            self._rewrite_locked(remaining)

    def rewrite(self, entries: List[Dict[str, Any]]) -> None:
        with self._lock:
            self._rewrite_locked(entries)

    def _rewrite_locked(self, entries: List[Dict[str, Any]]) -> None:
        """Replace the file atomically: a crash leaves either version, never half."""
        if not entries:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            except OSError as e:
                raise HardwareError(f"cannot clear control journal {self.path}: "
                                    f"{e.strerror or e}") from None
            return
        data = "".join(json.dumps(e, sort_keys=True) + "\n" for e in entries).encode()
        try:
            jsonlines.replace(self.path, data, durable=True)
        except OSError as e:
            raise HardwareError(f"cannot rewrite control journal {self.path}: "
                                f"{e.strerror or e}") from None
