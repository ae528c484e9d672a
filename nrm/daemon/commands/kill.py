"""kill: kill every process of a container; the container then ends and its
run clients receive their exits (the kill client is answered at once).

A batch task is killed by its name; after a restart that adopted it, the
name is known only to its key (nrm/daemon/keys.py ``adopted_names``)."""

from nrm import protocol
from nrm.containers.model import RunError

NAME = "kill"


def execute(daemon, req, msg) -> None:
    try:
        n = daemon.containers.kill(req.peer, msg.container)
    except RunError as exc:
        found = daemon.keys.adopted_names.get(msg.container) if exc.code == "not_found" else None
        if found is None:
            raise
        n = daemon.containers.kill_task(req.peer, found, msg.container)
    req.reply(protocol.Ack(data={"container": msg.container, "tasks": n}))
