"""run: start a command in a (new or shared) container and stream it back."""

from nrm.containers import RunError
from nrm.daemon.upstream import ClientSink
from nrm.manifest import Manifest, ManifestError

NAME = "run"


def execute(daemon, req, msg) -> None:
    try:
        manifest = Manifest.from_dict(msg.manifest)
    except ManifestError as exc:
        raise RunError("manifest", str(exc)) from None
    except (TypeError, ValueError, KeyError) as exc:
        raise RunError("manifest", f"invalid manifest: {exc}") from None
    cm = daemon.containers
    sink = ClientSink(req, cm.resume, cm.client_gone)
    cm.run(req.peer, manifest, msg.argv, msg.env, msg.cwd, sink,
           container_name=msg.container, detach=msg.detach, output=msg.output and not msg.detach,
           wait=msg.wait, oversubscribe=msg.oversubscribe)
