"""list: the containers the requester may see (all of them for root)."""

from nrm import protocol

NAME = "list"


def execute(daemon, req, msg) -> None:
    containers = [c.to_dict() for c in daemon.containers.visible(req.peer)]
    req.reply(protocol.Ack(data={"containers": containers}))
