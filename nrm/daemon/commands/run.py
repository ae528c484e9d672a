"""run: start a command in a (new or shared) container and stream it back."""

from nrm.containers.clients import client_gone
from nrm.containers.model import RunError
from nrm.protocol import encode
from nrm.daemon.keys import keyed
from nrm.daemon.upstream import ClientSink
from nrm.manifest import Manifest, ManifestError

NAME = "run"


_cache: dict = {}


def _manifest(data: dict) -> Manifest:
    """Validated manifests by content: launch storms repeat the same one.
    The daemon never mutates a manifest, so the cached model is shared."""
    key = encode(data)
    m = _cache.get(key)
    if m is None:
        m = Manifest.from_dict(data)
        if len(_cache) >= 64:
            _cache.clear()
        _cache[key] = m
    return m


def execute(daemon, req, msg) -> None:
    try:
        manifest = _manifest(msg.manifest)
    except ManifestError as exc:
        raise RunError("manifest", str(exc)) from None
    except (TypeError, ValueError, KeyError) as exc:
        raise RunError("manifest", f"invalid manifest: {exc}") from None
    cm = daemon.containers
    window = msg.window if msg.output and not msg.detach else 0
    if msg.key is None:
        sink = ClientSink(req, cm.resume, client_gone, send_started=msg.started, window=window)
    else:
        sink = keyed(daemon.keys, msg.key, req, cm.resume, client_gone,
                     send_started=msg.started, window=window)
    try:
        cm.run(req.peer, manifest, msg.argv, msg.env, msg.cwd, sink,
               container_name=msg.container, detach=msg.detach,
               output=msg.output and not msg.detach, wait=msg.wait,
               oversubscribe=msg.oversubscribe, cpus_allowed=msg.cpus_allowed)
    except RunError as exc:
        if msg.key is not None:
            daemon.keys.failed(req.peer.uid, msg.key, str(exc))
        raise
