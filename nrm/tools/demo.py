"""`make run`: a newcomer's first look at nrm, on an embedded default.

Starts nrmd on a private runtime dir, runs example tasks in slices through
`nrm run` (each task's cpus, output and exit status), shows `nrm status`,
then compares power policies on the MPI imbalance example when MPICH and
libnrm are available, and stops the daemon cleanly.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
EXAMPLES = os.path.join(REPO, "examples")


def say(text: str = "") -> None:
    print(text, flush=True)


class Session:
    def __init__(self):
        self.rundir = tempfile.mkdtemp(prefix="nrm-demo-")
        self.env = dict(os.environ, NRM_RUNTIME_DIR=self.rundir)
        self.daemon = None

    def start(self) -> None:
        log = open(os.path.join(self.rundir, "nrmd.log"), "wb")
        self.daemon = subprocess.Popen(
            [sys.executable, "-m", "nrm.daemon.main", "--runtime-dir", self.rundir,
             "--seed-downstream", "ipc://" + os.path.join(self.rundir, "seed"),
             "--sensor-period", "0.05"],
            stdout=log, stderr=subprocess.STDOUT, env=self.env)
        sock = os.path.join(self.rundir, "upstream")
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            if self.daemon.poll() is not None or time.monotonic() > deadline:
                say(open(os.path.join(self.rundir, "nrmd.log")).read())
                raise SystemExit("nrmd did not start")
            time.sleep(0.02)
        say(f"$ nrmd --runtime-dir {self.rundir} &   # pid {self.daemon.pid}")

    def nrm(self, *args: str, show: bool = True,
            cwd: str = EXAMPLES) -> subprocess.CompletedProcess:
        if show:
            say("$ nrm " + " ".join(shlex.quote(a) for a in args))
        r = subprocess.run([sys.executable, "-m", "nrm.cli.main"] + list(args), env=self.env,
                           cwd=cwd, capture_output=True)
        if show:
            out = r.stdout.decode(errors="replace")
            err = r.stderr.decode(errors="replace")
            if out:
                sys.stdout.write(out if out.endswith("\n") else out + "\n")
            if err:
                sys.stdout.write("".join("  " + line for line in err.splitlines(True)))
            say(f"  -> exit status {r.returncode}")
        return r

    def stop(self) -> None:
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.send_signal(signal.SIGTERM)
            rc = self.daemon.wait(10)
            say(f"$ kill -TERM {self.daemon.pid}   # nrmd exited with {rc}")
        shutil.rmtree(self.rundir, ignore_errors=True)


def slices_demo(s: Session) -> None:
    say("\n== Tasks in resource slices ==")
    s.nrm("run", "-v", "basic.yml", "sh", "-c",
          "grep -E 'Cpus_allowed_list|Mems_allowed_list' /proc/self/status")
    s.nrm("run", "-v", "basic.json", "sh", "-c", "echo seed-era ACI manifest; exit 3")
    s.nrm("run", "-v", "basic.yml", "sh", "-c", "kill -SEGV $$")
    say("\n# two tasks at once get disjoint cpus:")
    procs = [subprocess.Popen(
        [sys.executable, "-m", "nrm.cli.main", "run", "basic.yml", "sh", "-c",
         "sleep 0.3; grep Cpus_allowed_list /proc/self/status"],
        env=s.env, cwd=EXAMPLES, stdout=subprocess.PIPE) for _ in range(2)]
    for i, p in enumerate(procs):
        out = p.communicate()[0].decode().strip()
        say(f"  task {i}: {out}  (exit {p.returncode})")
    say()
    s.nrm("status")


def power_demo(s: Session) -> None:
    from nrm.tools.powerdemo import run_comparison
    say("\n== Power policies on an imbalanced MPI program ==")
    run_comparison(s)


def main() -> int:
    s = Session()
    try:
        s.start()
        slices_demo(s)
        power_demo(s)
    finally:
        s.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
