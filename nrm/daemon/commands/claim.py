"""claim: the states of the requester's task keys; unknown ones are fenced
(nrm/daemon/keys.py)."""

from nrm import protocol

NAME = "claim"


def execute(daemon, req, msg) -> None:
    states = daemon.keys.claim(req.peer.uid, msg.keys)
    req.reply(protocol.Ack(data={"epoch": daemon.keys.epoch, "keys": states}))
