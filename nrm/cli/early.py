"""`nrm pilot`'s private nrmd, started before the CLI's imports.

A pilot that finds no nrmd starts its own, and both processes spend their
first 0.2-0.3 s importing Python modules. Started here, from the raw command
line, nrmd boots while the pilot imports and reads its job file instead of
after (docs/performance.md, "nrm pilot"). Only the plain case starts early:
a request file or a resume on this node (``--nodes`` given or no Slurm
allocation around), no ``--uri``, no ``--resources slurm``, no help asked
for, and no socket accepting connections in the runtime dir the client
would use. Everything else, and the check that an nrmd which accepts really
answers, is decided later as before (nrm/cli/pilot.py); a daemon started
here that the pilot does not take is stopped when the process exits.

Nothing heavy is imported here: ``nrm.paths`` and ``nrm.tools.localnrmd``
need only the standard library.
"""

from __future__ import annotations

import atexit
import os
import socket
from typing import List, Optional

_daemon = None


#: pilot options that take no value
_FLAGS = frozenset({"--json", "--system-core", "--show-progress", "--disable-nl",
                    "--disable-pub"})
#: options after which the pilot serves an API or refuses to run: not a
#: request file's short run
_SERVES = ("--net", "--api-socket", "--governor", "--parent", "--slurm-", "--enable-")


def _options(words: List[str]) -> Optional[dict]:
    """``nrm``'s argv -> the options that decide, or None when it is not a
    plain ``nrm pilot`` run."""
    seen: dict = {}
    verb = None
    it = iter(words)
    for word in it:
        name, eq, value = word.partition("=")
        if word in ("-h", "--help", "--version"):
            return None
        if not word.startswith("-"):
            if verb is not None or word != "pilot":
                return None         # another verb, an action (status, report)
            verb = word
        elif verb is not None and name.startswith(_SERVES):
            return None
        elif verb is None or name not in _FLAGS:
            seen[name] = value if eq else next(it, "")
    return seen if verb == "pilot" else None


def _accepts(rundir: str) -> bool:
    path = os.path.join(rundir, "upstream")
    if not os.path.exists(path):
        return False
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def maybe_start(words: List[str]) -> None:
    """Start the private nrmd now if the pilot will surely want one."""
    global _daemon
    opts = _options(words)
    if opts is None or "--uri" in opts or os.environ.get("NRM_URI"):
        return
    if opts.get("--resources") == "slurm":
        return
    if "SLURM_JOB_ID" in os.environ and not opts.get("--nodes"):
        return
    path = opts.get("--file-path") or opts.get("--file") or "qcg_pm_reqs.json"
    if "--resume" not in opts and not os.path.isfile(path):
        return                      # the pilot fails on it before it needs nrmd
    from nrm import paths
    if _accepts(paths.runtime_dir(opts.get("--runtime-dir") or None)):
        return
    from nrm.tools.localnrmd import LocalNrmd
    try:
        _daemon = LocalNrmd(log_level="warning", prefix="nrm-pilot-").spawn()
    except OSError:
        return                      # started later, where its failure is reported
    atexit.register(_stop_untaken)


def take():
    """The daemon started early (its readiness not yet waited for), or None."""
    global _daemon
    daemon, _daemon = _daemon, None
    return daemon


def _stop_untaken() -> None:
    daemon = take()
    if daemon is not None:
        try:
            daemon.stop()
        except Exception:       # exiting anyway: never a traceback for this
            pass
