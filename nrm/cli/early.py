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
import shutil
import signal
import socket
from typing import List, Optional

_daemon = None
_rundir: Optional[str] = None      # where maybe_start found no nrmd
_previous_sigterm = None


#: nrm's global options that take a value (nrm/cli/main.py)
GLOBAL_VALUED = frozenset({"--runtime-dir", "--timeout", "--uri", "--server-key", "--key"})
#: nrm pilot's options that take a value, and those that take none, that
#: a plain run may carry (nrm/cli/pilot.py; a test keeps both in step)
PILOT_VALUED = frozenset({"--gantt", "--progress", "--file-path", "--file", "--wd", "--nodes",
                          "--resources", "--envschema", "--report-format", "--report-file",
                          "--log", "--nl-init-timeout", "--resume"})
PILOT_FLAGS = frozenset({"--json", "--system-core", "--show-progress", "--disable-nl",
                         "--disable-pub"})


def _options(words: List[str]) -> Optional[dict]:
    """``nrm``'s argv -> the options that decide, or None when it is not a
    plain ``nrm pilot`` run. Any option not named in full here (an
    abbreviation argparse would expand, one that serves an API or that the
    pilot refuses) means None: decided later, as without this module."""
    seen: dict = {}
    verb = None
    it = iter(words)
    for word in it:
        name, eq, value = word.partition("=")
        if not word.startswith("-"):
            if verb is not None or word != "pilot":
                return None         # another verb, an action (status, report)
            verb = word
        elif verb is None and name in GLOBAL_VALUED or verb and name in PILOT_VALUED:
            seen[name] = value if eq else next(it, "")
        elif not (verb and name in PILOT_FLAGS and not eq):
            return None
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
    global _daemon, _rundir, _previous_sigterm
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
    rundir = paths.runtime_dir(opts.get("--runtime-dir") or None)
    if _accepts(rundir):
        return
    from nrm.tools.localnrmd import LocalNrmd
    try:
        _daemon = LocalNrmd(log_level="warning", prefix="nrm-pilot-").spawn()
    except OSError:
        return                      # started later, where its failure is reported
    _rundir = rundir
    atexit.register(discard)
    # a SIGTERM before the pilot takes it must not leave it behind
    _previous_sigterm = signal.signal(signal.SIGTERM, _terminated)


def _terminated(signum, frame):
    raise SystemExit(128 + signum)      # atexit stops the daemon


def take(rundir: str):
    """The daemon started early (its readiness not yet waited for), when
    the pilot's own look found no nrmd in the same ``rundir`` this module
    looked in; else None (and a daemon started here is discarded)."""
    global _daemon, _previous_sigterm
    if _daemon is None:
        return None
    if rundir != _rundir:
        discard()
        return None
    daemon, _daemon = _daemon, None
    if _previous_sigterm is not None:
        signal.signal(signal.SIGTERM, _previous_sigterm)
        _previous_sigterm = None
    return daemon


def discard() -> None:
    """Stop a daemon started here that the pilot did not take, and remove
    its runtime dir (it ran nothing)."""
    global _daemon, _previous_sigterm
    daemon, _daemon = _daemon, None
    if _previous_sigterm is not None:
        signal.signal(signal.SIGTERM, _previous_sigterm)
        _previous_sigterm = None
    if daemon is None:
        return
    try:
        daemon.stop()
    except Exception:       # exiting anyway: never a traceback for this
        pass
    shutil.rmtree(daemon.rundir, ignore_errors=True)
