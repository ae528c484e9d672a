"""Each launch of a task (an attempt) leaves two files, so a resumed pilot
knows what its killed predecessor's launches did.

Why: a pilot killed with ``kill -9`` cannot hear its tasks' exits, and
nrm.client cannot reattach to another client's run stream (nrmd keeps only
a few finished containers' profiles, without their exit codes). So tasks run
detached from the pilot's connection (nrmd does not kill them with it), and
a small ``sh`` wrapper, the task's own process, records the attempt:

* ``runs/SEQ.ATTEMPT.started``: created with O_EXCL (``set -C``) before the
  command runs, holding the wrapper's pid. A resumed pilot that finds no
  such file creates it itself ("fenced"): a launch still in flight then
  finds it taken and exits 75 without running the command, so an attempt
  either ran or never will, never both.
* ``runs/SEQ.ATTEMPT.done``: the command's exit code, written after it
  ends. A task that ended while no pilot listened is adopted with it.

A started attempt whose wrapper still lives is adopted and watched until
its ``done`` file appears; one whose wrapper died without it (killed with
the node's nrmd) runs again as the next attempt.
"""

from __future__ import annotations

import errno
import os
import shutil
from typing import Dict, List, Optional, Tuple

FENCED = "fenced"
#: the wrapper's exit status when its attempt was fenced (never ran)
FENCED_STATUS = 75

#: $1 started file, $2 done file, then the command
WRAPPER = ('set -C; s=$1; d=$2; shift 2; { echo $$ > "$s"; } 2>/dev/null || exit 75; '
           'set +C; "$@"; rc=$?; echo $rc > "$d"; exit $rc')


class LaunchError(Exception):
    """The task's command cannot be executed: the task fails, naming why."""


class Attempts:
    def __init__(self, aux: str, pilot_id: str):
        self.dir = os.path.join(aux, "runs")
        os.makedirs(self.dir, exist_ok=True)
        self.pilot_id = pilot_id
        self._which: Dict[Tuple[str, Optional[str]], bool] = {}

    def paths(self, seq: int, attempt: int) -> Tuple[str, str]:
        base = os.path.join(self.dir, f"{seq}.{attempt}")
        return base + ".started", base + ".done"

    def container(self, seq: int, attempt: int) -> str:
        """nrmd's container name for an attempt: unique per pilot and attempt."""
        return f"nrm-pilot-{self.pilot_id}-{seq}-{attempt}"

    def wrap(self, seq: int, attempt: int, argv: List[str], path: Optional[str],
             cwd: str) -> List[str]:
        """The wrapped command. Raises LaunchError when the command cannot be
        executed: the wrapper's shell would only say 127, nrmd says why."""
        prog = argv[0]
        if "/" in prog:
            if not os.access(os.path.join(cwd, prog), os.X_OK):
                raise LaunchError(f"cannot execute {prog!r}: "
                                  + os.strerror(errno.EACCES if os.path.exists(
                                      os.path.join(cwd, prog)) else errno.ENOENT))
        elif not self._on_path(prog, path):
            raise LaunchError(f"cannot execute {prog!r}: {os.strerror(errno.ENOENT)}")
        started, done = self.paths(seq, attempt)
        return ["/bin/sh", "-c", WRAPPER, "nrm-pilot-task", started, done] + list(argv)

    def _on_path(self, prog: str, path: Optional[str]) -> bool:
        key = (prog, path)
        found = self._which.get(key)
        if found is None:
            found = self._which[key] = shutil.which(prog, path=path) is not None
        return found

    def exit_code(self, seq: int, attempt: int) -> Optional[int]:
        """The recorded exit code, None while there is none."""
        try:
            with open(self.paths(seq, attempt)[1]) as f:
                text = f.read().strip()
        except OSError:
            return None
        return int(text) if text.lstrip("-").isdigit() else None

    def inspect(self, seq: int, attempt: int) -> Tuple[str, Optional[int]]:
        """What became of an attempt the journal saw placed but not ended:
        ("done", code), ("running", pid) or ("lost", None) (never ran, or
        died unrecorded: run it again)."""
        code = self.exit_code(seq, attempt)
        if code is not None:
            return "done", code
        started, _ = self.paths(seq, attempt)
        try:
            fd = os.open(started, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            os.write(fd, FENCED.encode())
            os.close(fd)
            return "lost", None                 # fenced: the launch will not run it
        try:
            with open(started) as f:
                text = f.read().strip()
        except OSError:
            text = ""
        if text.isdigit() and self.alive(int(text), started):
            return "running", int(text)
        code = self.exit_code(seq, attempt)     # it may have ended meanwhile
        return ("done", code) if code is not None else ("lost", None)

    @staticmethod
    def alive(pid: int, started: str) -> bool:
        """The wrapper still runs: the pid lives and is that wrapper (its
        command line names its started file, so a reused pid does not count)."""
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return started.encode() in f.read()
        except OSError:
            return False
