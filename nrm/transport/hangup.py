"""Hang up on nrmd only once it has read everything we sent.

libzmq (4.3, zeromq/libzmq#4660) loses data on the receiving side when a
sender closes its connection while the receiver's queue for it is full:
the hang-up makes the receiving engine stop polling the socket, and what
the kernel still holds for it is discarded.  A flooding application that
exits while nrmd is behind would lose its last messages, ``exit``
included.  zmq's linger does not help: it only waits until the data is in
the kernel, not until the peer has read it.

So a sender keeps a duplicate of its connection's descriptor across the
zmq close (the socket stays open, no hang-up yet), waits until the kernel
says the peer has consumed every byte (``SIOCOUTQ`` is 0), and only then
lets go.  libnrm's ``nrm_fini`` does the same in C.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import termios
import time
from typing import List

# SIOCOUTQ: bytes queued on a socket and not yet read by the peer (for a
# Unix stream socket, until the receiver consumes them).
SIOCOUTQ = termios.TIOCOUTQ


def ipc_path(uri: str) -> str:
    """The filesystem path of an ``ipc://`` endpoint, '' for any other."""
    if not uri.startswith("ipc://") or uri.startswith("ipc://@"):
        return ""
    return uri[len("ipc://"):]


def hold_connections(uri: str) -> List[int]:
    """Duplicates of this process's descriptors connected to ``uri``.

    Only ``ipc://`` paths are recognised; for anything else there is
    nothing to hold and the caller simply does not wait."""
    path = ipc_path(uri)
    if not path:
        return []
    wanted = {path, os.path.realpath(path)}
    held = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                continue
            sock = socket.socket(fileno=os.dup(int(name)))
        except OSError:
            continue
        try:
            if sock.family == socket.AF_UNIX and sock.getpeername() in wanted:
                held.append(sock.detach())
                continue
        except OSError:
            pass
        sock.close()
    return held


def any_unread(fds: List[int]) -> bool:
    """An fd whose queue cannot be read counts as read: never wait blind."""
    for fd in fds:
        try:
            if struct.unpack("i", fcntl.ioctl(fd, SIOCOUTQ, b"\0\0\0\0"))[0] > 0:
                return True
        except OSError:
            pass
    return False


def release_when_read(fds: List[int], deadline: float) -> None:
    """Wait (until ``deadline``, a ``time.monotonic()``) for the peer to
    read all that is queued on ``fds``, then close them."""
    pause = 0.0005
    try:
        while any_unread(fds) and time.monotonic() < deadline:
            time.sleep(pause)
            pause = min(pause * 2, 0.01)
    finally:
        for fd in fds:
            os.close(fd)
