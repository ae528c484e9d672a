"""Durable JSON-lines files: the one way nrm keeps records on disk.

The daemon's control journal (the originals of every control it wrote),
its state log (what runs where), and the campaign's and pilot's journals
all keep one JSON record per line, appended; a crash can cut only the last
line, which readers skip (``complete``). Files are replaced atomically
(``replace``: a crash leaves either version, never half of one). Nothing
here follows a symbolic link: a runtime or work dir may be reachable by
other users, and a planted link must not redirect a root daemon's write.

``durable`` says whether a write must survive a power loss (fsync of the
file, and of its directory after a rename) or only the process: the state
log lives on a tmpfs and has to outlive the daemon, not the machine.
"""

from __future__ import annotations

import fcntl
import os
import stat
from typing import Tuple

_NOFOLLOW = os.O_CLOEXEC | os.O_NOFOLLOW


class Locked(OSError):
    """Another process holds the lock; ``holder`` is what it wrote there."""

    def __init__(self, path: str, holder: str):
        super().__init__(11, f"{path} is held by {holder or 'another process'}")
        self.holder = holder


def hold(path: str, holder: str, mode: int = 0o644) -> int:
    """One writer at a time: an exclusive lock on ``path`` (never through a
    link), which names its holder in the file for whoever is refused. The
    lock goes with the returned fd: closed, or its process killed."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | _NOFOLLOW, mode)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = os.pread(fd, 256, 0).decode(errors="replace").strip()
        os.close(fd)
        raise Locked(path, other) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{holder}\n".encode(), 0)
    return fd


def open_append(path: str, mode: int = 0o600, readable: bool = False) -> int:
    """An fd that appends to ``path`` (created with ``mode``), never through a link."""
    flags = (os.O_RDWR if readable else os.O_WRONLY) | os.O_APPEND | os.O_CREAT | _NOFOLLOW
    return os.open(path, flags, mode)


def append(fd: int, data: bytes, durable: bool) -> None:
    """All of ``data`` at the end of the file, then fsync if ``durable``.
    One write takes it all but on a full disk or a signal (the state log
    appends a few records per task: no memoryview for them)."""
    if data:
        n = os.write(fd, data)
        if n <= 0:
            raise OSError(28, "short write")
        view = memoryview(data)[n:] if n < len(data) else None
        while view:
            n = os.write(fd, view)
            if n <= 0:
                raise OSError(28, "short write")
            view = view[n:]
    if durable:
        os.fdatasync(fd)        # the data and the size: all a reader needs


def cut_torn_tail(fd: int) -> int:
    """Truncate a last line that has no newline (a crash cut it); returns
    the bytes dropped, so that the next append starts a clean line."""
    size = os.fstat(fd).st_size
    if not size:
        return 0
    tail = os.pread(fd, min(size, 1 << 16), max(0, size - (1 << 16)))
    if tail.endswith(b"\n"):
        return 0
    cut = tail.rfind(b"\n")
    keep = size - len(tail) + cut + 1 if cut >= 0 else 0
    os.ftruncate(fd, keep)
    os.fsync(fd)
    return size - keep


def read(path: str) -> bytes:
    """The whole file; OSError if it is missing, a link, or not a regular
    file (opened non-blocking, so that a planted FIFO cannot hang the reader)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | _NOFOLLOW)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(22, "not a regular file")
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    finally:
        os.close(fd)


def complete(data: bytes) -> Tuple[bytes, int]:
    """(the complete lines, bytes of a torn last line left out)."""
    if not data or data.endswith(b"\n"):
        return data, 0
    cut = data.rfind(b"\n") + 1
    return data[:cut], len(data) - cut


def replace(path: str, data: bytes, durable: bool, mode: int = 0o600) -> None:
    """Make ``path`` hold ``data``, atomically: written to ``path.tmp``
    (whatever was there, a planted link included, is removed first), then
    renamed over ``path``."""
    tmp = path + ".tmp"
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, mode)
    try:
        append(fd, data, durable)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if durable:
        dfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
