"""forget: drop the requester's ended task keys (nrm/daemon/keys.py)."""

from nrm import protocol

NAME = "forget"


def execute(daemon, req, msg) -> None:
    n = daemon.keys.forget(req.peer.uid, msg.keys, msg.prefix)
    req.reply(protocol.Ack(data={"forgotten": n}))
