"""setpower: set or clear the node power cap (root or the power group)."""

from nrm import protocol
from nrm.containers.model import RunError

NAME = "setpower"


def execute(daemon, req, msg) -> None:
    if not daemon.may_set_power(req.peer):
        raise RunError("denied", "only root or members of the power group may set power caps")
    if msg.watts is not None and not 0 < msg.watts <= protocol.MAX_POWER_CAP_W:
        raise RunError("invalid", f"watts: expected a number in (0, "
                                  f"{protocol.MAX_POWER_CAP_W:.0f}], got {msg.watts!r}")
    req.reply(protocol.Ack(data=daemon.set_power_cap(msg.watts)))
