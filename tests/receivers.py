"""Downstream receivers for the senders' tests: a PULL that keeps nrmd's
receive mark, and one that is always behind, as nrmd is under a flood.

The slow one's queue is tiny and it reads slowly, so a sender that floods
it and exits hangs up while the queue is full: the case where libzmq 4.3
loses what the kernel still holds (zeromq/libzmq#4660) unless the sender
waits for its data to be read (nrm/transport/hangup.py, libnrm's nrm_fini).
"""

import contextlib
import time

import zmq

from nrm.daemon.ingest import RCVHWM
from nrm.protocol import DExit, decode_downstream

SLOW_RCVHWM = 10


@contextlib.contextmanager
def pull_socket(directory, rcvhwm=RCVHWM):
    """A bound PULL and its uri; by default with the mark nrmd's ingest uses."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.RCVHWM, rcvhwm)
    uri = f"ipc://{directory}/downstream"
    sock.bind(uri)
    try:
        yield sock, uri
    finally:
        sock.close(linger=0)
        ctx.term()


def drain_slowly(sock, sender, timeout=60.0, every=10, pause=0.002):
    """Messages up to ``sender``'s exit message, pausing ``pause`` s every
    ``every``; fails once the sender process is gone and 2 s pass without
    that exit."""
    msgs = []
    deadline = time.monotonic() + timeout
    quiet_since = None
    while time.monotonic() < deadline:
        if not sock.poll(100):
            if sender.poll() is None:
                continue
            quiet_since = quiet_since or time.monotonic()
            if time.monotonic() - quiet_since > 2:
                break
            continue
        quiet_since = None
        msgs.append(decode_downstream(sock.recv()))
        if isinstance(msgs[-1], DExit):
            return msgs
        if len(msgs) % every == 0:
            time.sleep(pause)
    raise AssertionError(f"no exit after {len(msgs)} messages, last {msgs[-3:]}")
