"""report: profiles of finished containers the requester owns."""

from nrm import protocol

NAME = "report"


def execute(daemon, req, msg) -> None:
    req.reply(protocol.Ack(data={"reports": daemon.reports(req.peer, msg.container)}))
