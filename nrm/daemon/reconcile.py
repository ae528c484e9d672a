"""After a crash: find what the previous nrmd left running, then adopt or kill it.

Runs at start, after the hardware layer has restored every control the
predecessor wrote and before any request is served. Nothing is ever started
again: a task either keeps running (adopt) or dies (kill); a record whose
pid now belongs to another process (different start time) is ignored.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Dict, List

from nrm.containers.manager import ContainerManager
from nrm.containers.model import RunError
from nrm.containers.processes import kill_group
from nrm.daemon.statelog import ContainerRecord
from nrm.manifest import Manifest, ManifestError

log = logging.getLogger(__name__)

MODES = ("kill", "adopt")


def reconcile(mode: str, previous: Dict[str, ContainerRecord], runtime,
              containers: ContainerManager) -> Dict[str, int]:
    """Returns counts: containers adopted, tasks adopted, processes killed."""
    out = {"containers_adopted": 0, "tasks_adopted": 0, "killed": 0}
    killed: set = set()
    for rec in previous.values():
        live = [t for t in rec.tasks.values() if t.alive()]
        members = sorted(set(runtime.stale_pids(rec.cgroups)) | {t.pid for t in live})
        if not live and not members:
            continue
        if mode == "adopt" and live and _adopt(rec, live, members, containers):
            out["containers_adopted"] += 1
            out["tasks_adopted"] += len(live)
            continue
        killed.update(_kill(live, members))
    killed.update(runtime.reap_stale())
    out["killed"] = len(killed)
    if out["containers_adopted"]:
        log.warning("adopted %d containers (%d tasks) left by a previous nrmd",
                    out["containers_adopted"], out["tasks_adopted"])
    if out["killed"]:
        log.warning("killed %d processes left by a previous nrmd", out["killed"])
    return out


def _adopt(rec: ContainerRecord, live, members: List[int],
           containers: ContainerManager) -> bool:
    try:
        manifest = Manifest.from_dict(rec.manifest)
        containers.adopt(rec.id, rec.uid, manifest, rec.cpus, rec.mems, rec.shared,
                         [(t.id, t.pid, t.argv) for t in live], members)
    except (ManifestError, RunError) as exc:
        log.warning("cannot adopt container %s (%s); killing it instead", rec.id, exc)
        return False
    return True


def _kill(live, members: List[int]) -> List[int]:
    """Tasks lead their own process groups: the groups go with them."""
    groups = {t.pid for t in live}
    targets = set(members) | set(_group_members(groups))
    killed = []
    for pgid in groups:
        kill_group(pgid)
    for pid in sorted(targets):
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except ProcessLookupError:
            pass
    return killed


def _group_members(groups) -> List[int]:
    """Processes whose process group is one of ``groups`` (a /proc scan,
    once per restart)."""
    if not groups:
        return []
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                pgid = int(f.read().rsplit(b")", 1)[1].split()[2])
        except (OSError, ValueError, IndexError):
            continue
        if pgid in groups:
            out.append(int(name))
    return out
