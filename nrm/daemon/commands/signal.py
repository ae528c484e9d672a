"""signal: deliver a signal to a task's process group (Ctrl-C forwarding)."""

from nrm import protocol

NAME = "signal"


def execute(daemon, req, msg) -> None:
    daemon.containers.signal_task(req.peer, msg.task, msg.signum)
    req.reply(protocol.Ack())
