"""Talking to a real nrmd under fuzz: sockets, status, memory."""

from __future__ import annotations

import json
import os
import shutil

import zmq

from nrm import paths, protocol
from tests.nrmd import DaemonProcess

#: docs/protocol.md, "Error codes"
ERROR_CODES = {"malformed", "invalid", "version", "too_large", "manifest", "no_fit", "busy",
               "exec", "cwd", "sched", "denied", "not_found", "runtime", "hardware",
               "unavailable", "duplicate", "fenced", "keys_full", "internal"}


def start_daemon() -> DaemonProcess:
    return DaemonProcess("--hw", "emulated", "--sensor-period", "0.5").start()


def stop_daemon(d: DaemonProcess) -> None:
    rc = d.stop()
    log = d.log()
    shutil.rmtree(d.rundir, ignore_errors=True)
    assert rc == 0, log[-4000:]


def dealer(d: DaemonProcess) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.rcvhwm = sock.sndhwm = 100000
    sock.connect(paths.upstream_uri(d.rundir))
    return sock


def status(d: DaemonProcess, timeout: float = 10.0) -> dict:
    """A fresh connection each time, so a fuzzing socket's backlog cannot
    hide or delay the answer."""
    sock = dealer(d)
    try:
        sock.send(protocol.encode(protocol.Status(id=424242)))
        assert sock.poll(int(timeout * 1000)), "status not answered"
        reply = protocol.decode_reply(sock.recv())
        assert isinstance(reply, protocol.Ack) and reply.id == 424242, reply
        return reply.data
    finally:
        sock.close()


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def alive(d: DaemonProcess) -> None:
    assert d.proc.poll() is None, "nrmd died:\n" + d.log()[-4000:]
    data = status(d)
    assert data["pid"] == d.proc.pid


def downstream_counters(d: DaemonProcess) -> dict:
    data = status(d)["downstream"]
    return json.loads(json.dumps(data))


def rss_report(name: str, before: int, after: int, inputs: int) -> None:
    """Appended to $NRM_FUZZ_STATS's sibling file for the long run's report."""
    path = os.environ.get("NRM_FUZZ_STATS")
    if path:
        with open(path + ".rss", "a") as f:
            f.write(json.dumps({"target": name, "rss_before_kib": before,
                                "rss_after_kib": after, "inputs": inputs}) + "\n")
