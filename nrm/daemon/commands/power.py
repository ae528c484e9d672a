"""power: the latest sensor sample and the node power cap."""

from nrm import protocol

NAME = "power"


def execute(daemon, req, msg) -> None:
    req.reply(protocol.Ack(data=daemon.power_state()))
