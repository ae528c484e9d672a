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
import stat
import threading
from typing import Any, Dict, Iterable, List, Tuple

from nrm.hw.registry import HardwareError

log = logging.getLogger(__name__)


def _unlink_if_present(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class Journal:
    """Owns the file of saved control originals: append before a write,
    drop once restored, read back by the next daemon."""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()

    def load(self) -> List[Dict[str, Any]]:
        """Entries in append order; the first entry of a (backend, name, index) wins."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return []
        except OSError as e:
            log.error("cannot read control journal %s: %s", self.path, e.strerror)
            return []
        if not stat.S_ISREG(st.st_mode):
            log.error("control journal %s is not a regular file: ignored", self.path)
            return []
        try:
            with os.fdopen(os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW),
                           encoding="utf-8") as f:
                lines = f.read().splitlines()
        except (OSError, UnicodeDecodeError) as e:
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
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
                             | os.O_NOFOLLOW, 0o600)
                if os.write(fd, line) != len(line):
                    raise OSError(0, "short write")
                os.fsync(fd)
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
        tmp = self.path + ".tmp"
        data = "".join(json.dumps(e, sort_keys=True) + "\n" for e in entries).encode()
        try:
            _unlink_if_present(tmp)   # whatever is there, a planted link included
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                         0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            dfd = os.open(os.path.dirname(self.path) or ".", os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as e:
            raise HardwareError(f"cannot rewrite control journal {self.path}: "
                                f"{e.strerror or e}") from None
