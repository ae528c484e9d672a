"""status: what this daemon is, runs on, and has done."""

from nrm import protocol

NAME = "status"


def execute(daemon, req, msg) -> None:
    req.reply(protocol.Ack(data=daemon.status()))
