"""One campaign run on one node of a Slurm allocation, through that node's nrmd.

The coordinator starts this with ``srun --overlap -N1 -n1 -w NODE ...`` (one
step per run), because on a real cluster a node's nrmd listens on that node
only (an ipc socket in its runtime dir): the coordinator cannot reach it
from elsewhere, a step on the node can. The step does what ``nrm run``
does inside a job (the slice inside the step's cpus), plus what a campaign
needs that ``nrm run`` does not report: the node's power cap applied first,
and the run's exit status, code, signal and profile written as JSON.

    python -m nrm.campaign.noderun probe             # one JSON line: node, cap, version
    python -m nrm.campaign.noderun run REQUEST.json  # the run; result next to it
    python -m nrm.campaign.noderun kill CONTAINER    # gone when this returns 0
    python -m nrm.campaign.noderun setpower W|off

The request and the result are files in the campaign directory, which
(like the campaign's working directory) must be on a filesystem the nodes
share. The program's output is this step's output, which srun hands to
the coordinator's files. SIGTERM (srun forwards it when the coordinator
stops the run, or dies: its srun children get SIGTERM then) kills the task.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from typing import Any, Dict, Optional

from nrm.client import Client, DaemonUnavailable, NrmError
from nrm.hpc import slurm
from nrm.manifest import Manifest

RESULT = "result.json"
GONE_TIMEOUT_S = 10.0


def node_name() -> str:
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def _write_json(path: str, data: Any) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def probe() -> int:
    with Client() as c:
        st = c.status()
    print(json.dumps({"node": node_name(), "cap": st.get("power_cap_w"),
                      "version": st.get("version")}), flush=True)
    return 0


def _cap(text: str) -> Optional[float]:
    return None if text in ("off", "none", "null") else float(text)


def setpower(value: str) -> int:
    with Client() as c:
        c.setpower(_cap(value))
    return 0


def kill(container: str) -> int:
    """Kill ``container`` if it is there and wait until nrmd has let it go."""
    with Client() as c:
        if container in {x.get("id") for x in c.list()}:
            try:
                c.kill(container)
            except NrmError:
                pass
        deadline = time.monotonic() + GONE_TIMEOUT_S
        while container in {x.get("id") for x in c.list()}:
            if time.monotonic() > deadline:
                print(f"nrm campaign: {container} is still on {node_name()}", file=sys.stderr)
                return 1
            time.sleep(0.05)
    return 0


def run(request_path: str) -> int:
    with open(request_path) as f:
        req: Dict[str, Any] = json.load(f)
    result_path = os.path.join(os.path.dirname(request_path), RESULT)
    out: Dict[str, Any] = {"node": node_name()}
    stop = {"signal": None}

    def on_term(signum, _frame):
        stop["signal"] = signum

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_term)
    try:
        with Client() as c:
            st = c.status()
            out["nrmd_version"] = st.get("version")
            out["cap_before"] = st.get("power_cap_w")
            if "cap" in req and req["cap"] != st.get("power_cap_w"):
                c.setpower(req["cap"])
            cpus = slurm.step_cpus()
            manifest = slurm.fit_manifest(Manifest.from_dict(req["manifest"]), cpus)
            env = dict(os.environ, **req.get("env", {}))
            handle = c.start(manifest, req["argv"], container=req["container"], env=env,
                             cwd=req.get("cwd"), stdout=sys.stdout.buffer,
                             stderr=sys.stderr.buffer, cpus_allowed=cpus)
            killed_at = None
            while not handle.step(0.1):
                if stop["signal"] is not None and killed_at is None:
                    killed_at = time.monotonic()
                    try:
                        c.kill(req["container"])
                    except NrmError:
                        pass
            r = handle.result
            out.update(status=r.status, code=r.code, signal=r.signal, profile=r.profile,
                       cpus=r.cpus, killed=killed_at is not None)
    except DaemonUnavailable as exc:
        out.update(error=str(exc), error_code="lost")
    except NrmError as exc:
        out.update(error=f"{exc.code}: {exc}", error_code=exc.code)
    _write_json(result_path, out)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    verbs = {"probe": (probe, 0), "run": (run, 1), "kill": (kill, 1), "setpower": (setpower, 1)}
    if not argv or argv[0] not in verbs or len(argv) - 1 != verbs[argv[0]][1]:
        print("usage: python -m nrm.campaign.noderun probe|run REQUEST|kill NAME|setpower W",
              file=sys.stderr)
        return 2
    fn, _ = verbs[argv[0]]
    try:
        return fn(*argv[1:])
    except (NrmError, OSError, ValueError) as exc:
        print(f"nrm campaign on {node_name()}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
