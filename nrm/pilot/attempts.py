"""What a resumed pilot learns about the launches its killed predecessor
left in flight (an attempt: one launch of a task), and how.

Why: a pilot killed with ``kill -9`` cannot hear its tasks' exits, so its
tasks run detached from its connection (nrmd does not kill them with it),
and its successor must know, for each attempt the journal saw placed and
not ended, (a) whether it ran, and (b) its exit code. Two ways:

**Task keys** (when nrmd has them: nrm/daemon/keys.py, docs/protocol.md,
"Task keys"). Each launch carries the key ``PILOT.SEQ.ATTEMPT``; nrmd keeps
its state for this uid after the pilot is gone. The successor's ``claim``
answers each key's state and fences the keys nrmd never saw, so a launch
still in flight from the dead pilot is refused and never runs: an attempt
either ran or never will. An attempt that ``exited`` is adopted with its
exit code; one ``running`` (or still ``pending``) is adopted and its key
polled until it ends; one ``lost`` (killed with nrmd, dropped while
queued) or never seen runs again as the next attempt. The task runs as
itself: no process is added. The pilot uses keys only when nrmd's status
says ``exact`` (a crash of nrmd leaves no task of an unrecorded launch
alive: cgroup runtime, ``--on-restart kill``); the keys' ``epoch`` goes to
the journal, so that a successor can tell nrmd's memory was lost (a
reboot) and say so.

**The fence** (an older nrmd, or one that is not ``exact``). A small
wrapper is the task's own process (``nrm-pilot-fence``,
libnrm/src/fence.c, built with nrm; a ``sh`` script with the same
behaviour where it is missing) and records the attempt in ONE file,
``runs/SEQ.ATTEMPT``:

* its first line, the wrapper's pid, is written when the wrapper creates
  the file with O_EXCL (``set -C``) before the command runs. A resumed
  pilot that finds no such file creates it itself ("fenced"): a launch
  still in flight then finds it taken and exits 75 without running the
  command. (The C wrapper spawns the command with a vfork: a shell's
  exec, parse and fork cost several times more cpu per task.)
* its second line, the command's exit code, is appended after it ends. A
  task that ended while no pilot listened is adopted with it.

A started attempt whose wrapper still lives is adopted and watched until
its exit code appears; one whose wrapper died without it (killed with the
node's nrmd) runs again as the next attempt. The extra process costs
0.6-0.8 ms of cpu per task (docs/performance.md, "nrm pilot").

A successor looks at an attempt's key first when nrmd has keys, and at its
file when the key is unknown (the attempt was launched with the fence).
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from typing import Dict, Iterator, List, Optional, Set, Tuple

from nrm import paths, protocol

FENCED = "fenced"
#: the wrapper's exit status when its attempt was fenced (never ran)
FENCED_STATUS = 75
#: how long an empty record may wait for its wrapper's pid
EMPTY_WAIT_S = 1.0

#: $1 the attempt's record, then the command
WRAPPER = ('set -C; r=$1; shift; { echo $$ > "$r"; } 2>/dev/null || exit 75; '
           'set +C; "$@"; rc=$?; echo $rc >> "$r"; exit $rc')


def find_fence() -> Optional[str]:
    """nrm-pilot-fence, installed next to nrm-spawner (``<prefix>/libexec/nrm``)
    or in this checkout's build; None when it was not built."""
    candidates = [os.path.join(os.path.dirname(d), "libexec", "nrm", "nrm-pilot-fence")
                  for d in paths.lib_dirs()]
    candidates.append(os.path.join(paths.checkout_build(), "nrm-pilot-fence"))
    for path in candidates:
        if os.access(path, os.X_OK):
            return path
    return None


def batches(keys: List[str]) -> Iterator[List[str]]:
    """``keys`` cut into the requests nrmd takes (MAX_KEYS_PER_REQUEST each)."""
    step = protocol.MAX_KEYS_PER_REQUEST
    for i in range(0, len(keys), step):
        yield keys[i:i + step]


class LaunchError(Exception):
    """The task's command cannot be executed: the task fails, naming why."""


class Attempts:
    def __init__(self, aux: str, pilot_id: str):
        self.dir = os.path.join(aux, "runs")
        os.makedirs(self.dir, exist_ok=True)
        self.pilot_id = pilot_id
        self._which: Dict[Tuple[str, Optional[str]], bool] = {}
        #: the C wrapper; None: the sh one
        self.fence = find_fence()
        #: launches carry task keys (nrmd said it keeps them exactly)
        self.keyed = False
        #: nrmd's key memory, as its status named it
        self.epoch: Optional[str] = None

    def use_keys(self, status: dict) -> bool:
        """Launch with keys when nrmd's ``status`` says it has them and they
        are exact after a crash of nrmd (docstring above); True if so."""
        info = status.get("keys") or {}
        self.keyed = "keys" in (status.get("features") or ()) and info.get("exact") is True
        self.epoch = str(info.get("epoch")) if self.keyed else None
        return self.keyed

    def key(self, seq: int, attempt: int) -> str:
        """nrmd's task key for an attempt: unique per pilot and attempt."""
        return f"{self.pilot_id}.{seq}.{attempt}"

    @property
    def key_prefix(self) -> str:
        return f"{self.pilot_id}."

    def path(self, seq: int, attempt: int) -> str:
        return os.path.join(self.dir, f"{seq}.{attempt}")

    def used(self) -> Set[str]:
        """The attempts that have a record (``SEQ.ATTEMPT``), in one listing."""
        try:
            return set(os.listdir(self.dir))
        except OSError:
            return set()

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
        record = self.path(seq, attempt)
        if self.fence is not None:
            return [self.fence, record] + list(argv)
        return ["/bin/sh", "-c", WRAPPER, "nrm-pilot-task", record] + list(argv)

    def _on_path(self, prog: str, path: Optional[str]) -> bool:
        key = (prog, path)
        found = self._which.get(key)
        if found is None:
            found = self._which[key] = shutil.which(prog, path=path) is not None
        return found

    def _read(self, seq: int, attempt: int) -> Optional[List[str]]:
        try:
            with open(self.path(seq, attempt)) as f:
                return f.read().split("\n")
        except OSError:
            return None

    def exit_code(self, seq: int, attempt: int) -> Optional[int]:
        """The recorded exit code, None while there is none."""
        lines = self._read(seq, attempt)
        if lines is None or len(lines) < 2:
            return None
        text = lines[1].strip()
        return int(text) if text.lstrip("-").isdigit() else None

    def inspect(self, seq: int, attempt: int) -> Tuple[str, Optional[int]]:
        """What became of an attempt the journal saw placed but not ended:
        ("done", code), ("running", pid) or ("lost", None) (never ran, or
        died unrecorded: run it again)."""
        record = self.path(seq, attempt)
        try:
            fd = os.open(record, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            os.write(fd, FENCED.encode())
            os.close(fd)
            return "lost", None                 # fenced: the launch will not run it
        code = self.exit_code(seq, attempt)
        if code is not None:
            return "done", code
        text = self._pid_line(seq, attempt)
        if text.isdigit() and self.alive(int(text), record):
            return "running", int(text)
        code = self.exit_code(seq, attempt)     # it may have ended meanwhile
        return ("done", code) if code is not None else ("lost", None)

    def _pid_line(self, seq: int, attempt: int) -> str:
        """The record's first line. An empty record is a wrapper between
        creating it and writing its pid: wait for the pid (a wrapper killed
        right there leaves it empty for good)."""
        deadline = time.monotonic() + EMPTY_WAIT_S
        while True:
            lines = self._read(seq, attempt) or [""]
            if lines[0] or time.monotonic() > deadline:
                return lines[0].strip()
            time.sleep(0.01)

    @staticmethod
    def alive(pid: int, record: str) -> bool:
        """The wrapper still runs: the pid lives and is that wrapper (its
        command line names its record, so a reused pid does not count)."""
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return record.encode() in f.read()
        except OSError:
            return False
