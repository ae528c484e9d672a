"""run_batch: many keyed, detached launches in one request, answered by a
stream of ``exits`` (docs/protocol.md "Batches"; the slots that order
them: nrm/containers/batches.py; the replies: nrm/daemon/batch.py).

A malformed request is refused whole, before anything is queued; a task
that cannot be launched (its key fenced or taken, its name in use, its
program or cwd missing) is reported in ``exits`` with ``error``."""

import dataclasses

from nrm import protocol
from nrm.containers.model import CONTAINER_NAME, RunError, check_no_nul
from nrm.containers.spawner import BaseEnv, SplitEnv
from nrm.daemon.batch import BatchReply, BatchTaskSink
from nrm.daemon.commands.run import _manifest
from nrm.daemon.keys import check_key
from nrm.manifest import ManifestError

NAME = "run_batch"

#: (id of a template, cpus) -> (the template, its manifest for that many
#: cpus): the same object for every request of a stream, which a task must
#: share to join its slot's container (compared by identity first)
_sized: dict = {}


def _check(msg) -> None:
    check_no_nul((), msg.env, None)
    keys, names = set(), set()
    for i, t in enumerate(msg.tasks):
        where = f"tasks[{i}]"
        check_key(t.key, f"{where}.key")
        if not CONTAINER_NAME.fullmatch(t.container):
            raise RunError("invalid", f"{where}.container: {t.container[:64]!r}: use 1 to 128 "
                           "letters, digits and . _ - : @ +, not starting with . or -")
        if not t.argv:
            raise RunError("invalid", f"{where}.argv: no command given")
        check_no_nul(t.argv, t.env, t.cwd, f"{where}.")
        if not t.cpus or min(t.cpus) < 0 or len(set(t.cpus)) != len(t.cpus):
            raise RunError("invalid", f"{where}.cpus: {t.cpus[:16]} is not a list of "
                           "distinct cpu numbers")
        if t.key in keys:
            raise RunError("invalid", f"{where}.key: {t.key!r} named twice in the request")
        if t.container in names:
            raise RunError("invalid", f"{where}.container: {t.container!r} named twice in "
                           "the request")
        keys.add(t.key)
        names.add(t.container)


def _sized_manifest(template, n: int):
    entry = _sized.get((id(template), n))
    if entry is None or entry[0] is not template:
        if len(_sized) >= 256:
            _sized.clear()
        entry = _sized[(id(template), n)] = (template, dataclasses.replace(
            template, slice=dataclasses.replace(template.slice, cpus=n)))
    return entry[1]


def execute(daemon, req, msg) -> None:
    try:
        template = _manifest(msg.manifest)
    except ManifestError as exc:
        raise RunError("manifest", str(exc)) from None
    except (TypeError, ValueError, KeyError) as exc:
        raise RunError("manifest", f"invalid manifest: {exc}") from None
    _check(msg)
    cm, registry = daemon.containers, daemon.keys
    uid = req.peer.uid
    reply = BatchReply(req, registry, daemon.loop)
    if not msg.tasks:
        req.reply(protocol.Exits())
        return
    manifests = {}
    base = BaseEnv(msg.env)     # encoded once, not per task
    tasks = []
    for t in msg.tasks:
        name, key = t.container, t.key
        try:
            registry.launching(uid, key, flush=False)
        except RunError as exc:
            reply.add(protocol.BatchExit(key=key, container=name, error=f"{exc.code}: {exc}"))
            continue
        sink = BatchTaskSink(reply, key, name, uid)
        if cm.batch_name_taken(name):
            sink.failed("busy", f"container {name} exists")
            continue
        cpus = tuple(t.cpus)
        n = len(cpus)
        manifest = manifests.get(n)
        if manifest is None:
            manifest = manifests[n] = _sized_manifest(template, n)
        registry.withdraw[(uid, key)] = (
            lambda name=name: cm.batch_withdraw(name, "claimed before it started"))
        tasks.append((manifest, t.argv, SplitEnv(base, t.env), t.cwd, name, cpus, sink))
    registry.flush()    # every key on file before any launch is handed on
    cm.run_batch(req.peer, tasks, msg.oversubscribe)
