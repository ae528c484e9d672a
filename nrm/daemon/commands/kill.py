"""kill: kill every process of a container; the container then ends and its
run clients receive their exits (the kill client is answered at once)."""

from nrm import protocol

NAME = "kill"


def execute(daemon, req, msg) -> None:
    n = daemon.containers.kill(req.peer, msg.container)
    req.reply(protocol.Ack(data={"container": msg.container, "tasks": n}))
