"""A real Slurm on one host, for tests: munged, slurmctld and one slurmd per
fake node, everything (keys, sockets, state, spool, logs, pid files) under a
temporary directory so nothing touches the system's Slurm or munge.

The Debian build of Slurm lets several slurmd run on one host when each is
started with ``-N NAME`` and its node line has its own ``Port``; every fake
node declares the host's real cpus, so a step's affinity on either node is a
subset of the same machine.

Runnable by hand for debugging::

    .venv/bin/python -m tests.slurm_cluster     # start, print env, wait for ^C
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from typing import Dict, List, Optional, Sequence

from tests.nrmd import DaemonProcess

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "srun", "sinfo", "scontrol")


class SlurmUnavailable(Exception):
    """Slurm cannot run here; the message says why (with log tails)."""


def _sbin(name: str) -> Optional[str]:
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return shutil.which(name, path=path)


def _free_ports(n: int) -> List[int]:
    """Ports the kernel hands out now; a clash later is possible but rare."""
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return "(no log)"


class SlurmCluster:
    """``nodes`` fake nodes named n1, n2... on this host.

    ``prolog``/``epilog``/``task_prolog`` are script paths written into
    slurm.conf (None: not configured).
    """

    def __init__(self, nodes: int = 2, base: Optional[str] = None,
                 task_plugin: str = "task/affinity", prolog: Optional[str] = None,
                 epilog: Optional[str] = None, task_prolog: Optional[str] = None):
        self.names = [f"n{i + 1}" for i in range(nodes)]
        self.dir = base or tempfile.mkdtemp(prefix="nrm-slurm-", dir="/tmp")
        os.chmod(self.dir, 0o755)
        self.conf = os.path.join(self.dir, "slurm.conf")
        self.munge_socket = os.path.join(self.dir, "munge", "munge.socket")
        self.task_plugin = task_plugin
        self.prolog, self.epilog, self.task_prolog = prolog, epilog, task_prolog
        self.procs: Dict[str, subprocess.Popen] = {}
        self.cpus = os.cpu_count() or 1

    # -- configuration ---------------------------------------------------------
    def _write_conf(self) -> None:
        ctld_port, *node_ports = _free_ports(1 + len(self.names))
        host = socket.gethostname().split(".")[0]
        d = self.dir
        lines = [
            "ClusterName=nrmtest",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={d}/state",
            f"SlurmdSpoolDir={d}/spool/%n",
            f"SlurmctldPidFile={d}/slurmctld.pid",
            f"SlurmdPidFile={d}/slurmd-%n.pid",
            f"SlurmctldLogFile={d}/slurmctld.log",
            f"SlurmdLogFile={d}/slurmd-%n.log",
            f"PlugStackConfig={d}/plugstack.conf",
            "ProctrackType=proctrack/linuxproc",
            f"TaskPlugin={self.task_plugin}",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "MpiDefault=none",
            "ReturnToService=2",
            "SchedulerType=sched/builtin",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "MailProg=/bin/true",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=30",
            "InactiveLimit=0",
            "KillWait=2",
            "MessageTimeout=10",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
        ]
        if self.prolog:
            lines.append(f"Prolog={self.prolog}")
        if self.epilog:
            lines.append(f"Epilog={self.epilog}")
        if self.task_prolog:
            lines.append(f"TaskProlog={self.task_prolog}")
        for name, port in zip(self.names, node_ports):
            lines.append(f"NodeName={name} NodeHostname=localhost NodeAddr=127.0.0.1 "
                         f"Port={port} CPUs={self.cpus} State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes={','.join(self.names)} Default=YES "
                     "MaxTime=INFINITE State=UP OverSubscribe=NO")
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n")
        open(os.path.join(d, "plugstack.conf"), "w").close()
        for sub in ("state", "munge"):
            os.makedirs(os.path.join(d, sub), mode=0o700, exist_ok=True)
        for name in self.names:
            os.makedirs(os.path.join(d, "spool", name), exist_ok=True)

    @property
    def env(self) -> Dict[str, str]:
        """Environment for srun/sinfo/scontrol (and the scripts they run)."""
        env = dict(os.environ, SLURM_CONF=self.conf)
        for var in ("SLURM_JOB_ID", "SLURM_JOBID", "SLURM_STEP_ID", "SLURMD_NODENAME",
                    "NRM_RUNTIME_DIR"):
            env.pop(var, None)
        return env

    # -- processes -------------------------------------------------------------
    def _spawn(self, key: str, argv: Sequence[str]) -> None:
        log = open(os.path.join(self.dir, f"{key}.out"), "ab")
        try:
            self.procs[key] = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT,
                                               env=self.env, cwd=self.dir,
                                               start_new_session=True)
        finally:
            log.close()

    def _fail(self, what: str) -> None:
        tails = [f"--- {os.path.basename(p)}:\n{_tail(p)}" for p in self.logs()]
        self.stop()
        raise SlurmUnavailable(f"{what} (in {self.dir})\n" + "\n".join(tails))

    def logs(self) -> List[str]:
        names = ["munged.log", "munged.out", "slurmctld.log", "slurmctld.out"]
        for n in self.names:
            names += [f"slurmd-{n}.log", f"slurmd-{n}.out"]
        return [os.path.join(self.dir, n) for n in names
                if os.path.exists(os.path.join(self.dir, n))]

    def _start_munge(self) -> None:
        mdir = os.path.join(self.dir, "munge")
        key = os.path.join(mdir, "munge.key")
        r = subprocess.run([_sbin("mungekey"), "--create", f"--keyfile={key}"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise SlurmUnavailable(f"mungekey failed: {r.stderr.strip()}")
        os.chmod(key, 0o600)
        self._spawn("munged", [_sbin("munged"), "--foreground", "--force",
                               f"--socket={self.munge_socket}", f"--key-file={key}",
                               f"--log-file={self.dir}/munged.log",
                               f"--pid-file={mdir}/munged.pid",
                               f"--seed-file={mdir}/munged.seed"])
        deadline = time.monotonic() + 5
        while not os.path.exists(self.munge_socket):
            if self.procs["munged"].poll() is not None or time.monotonic() > deadline:
                self._fail("munged did not start")
            time.sleep(0.02)

    def start(self, timeout: float = 15.0) -> "SlurmCluster":
        missing = [name for name in DAEMONS if _sbin(name) is None]
        if missing:
            raise SlurmUnavailable("not installed: " + ", ".join(missing)
                                   + " (apt-get install slurm-wlm munge)")
        if os.geteuid() != 0:
            raise SlurmUnavailable("a private Slurm needs root (SlurmUser=root, slurmd)")
        self._write_conf()
        self._start_munge()
        self._spawn("slurmctld", [_sbin("slurmctld"), "-D", "-i", "-f", self.conf])
        for name in self.names:
            self._spawn(f"slurmd-{name}", [_sbin("slurmd"), "-D", "-N", name, "-f", self.conf])
        self.wait_idle(timeout)
        return self

    def node_states(self) -> Dict[str, str]:
        r = subprocess.run([_sbin("sinfo"), "-h", "-N", "-o", "%N %T"], capture_output=True,
                           text=True, env=self.env, timeout=10)
        states = {}
        for line in r.stdout.splitlines():
            parts = line.split()
            if len(parts) == 2:
                states[parts[0]] = parts[1]
        return states

    def wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        states: Dict[str, str] = {}
        while time.monotonic() < deadline:
            for key, proc in self.procs.items():
                if proc.poll() is not None:
                    self._fail(f"{key} exited with status {proc.returncode}")
            try:
                states = self.node_states()
            except subprocess.TimeoutExpired:
                states = {}
            if states and all(states.get(n) == "idle" for n in self.names):
                return
            time.sleep(0.1)
        self._fail(f"nodes not idle after {timeout:g} s: {states or 'no answer from sinfo'}")

    def srun(self, *args: str, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
        env = dict(self.env, **kwargs.pop("env", {}))
        return subprocess.run([_sbin("srun")] + list(args), capture_output=True, text=True,
                              timeout=timeout, env=env, cwd=kwargs.pop("cwd", self.dir),
                              **kwargs)

    def stop(self) -> None:
        """Daemons first (slurmd, slurmctld), munge last: they need it to say
        goodbye."""
        order = [k for k in self.procs if k.startswith("slurmd")] + ["slurmctld", "munged"]
        for key in order:
            proc = self.procs.get(key)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def node_daemons(base: str, names: Sequence[str], *extra: str):
    """One nrmd per fake node under ``base`` (``--node-name``), stopped at the end."""
    daemons: Dict[str, "NodeDaemon"] = {}
    try:
        for name in names:
            daemons[name] = NodeDaemon(name, base, *extra).start()
        yield daemons
    finally:
        for d in daemons.values():
            d.stop()


def task_prolog_to_node_nrmd(path: str, base: str) -> str:
    """A TaskProlog that points each task at its node's nrmd (``BASE/NODE``),
    as a site's node configuration would."""
    with open(path, "w") as f:
        f.write(f"#!/bin/sh\necho export NRM_RUNTIME_DIR={base}/$SLURMD_NODENAME\n")
    os.chmod(path, 0o755)
    return path


def started_or_skip(cluster: "SlurmCluster", timeout: float = 15.0) -> "SlurmCluster":
    """``cluster`` started, or the calling test skipped with the reason (no
    Slurm here, or it cannot start): tests of the Slurm paths need a real one."""
    import pytest
    try:
        return cluster.start(timeout=timeout)
    except SlurmUnavailable as exc:
        shutil.rmtree(cluster.dir, ignore_errors=True)
        pytest.skip(f"cannot start a local Slurm: {exc}")


class NodeDaemon(DaemonProcess):
    """The nrmd of one fake node: ``--runtime-dir BASE --node-name NAME``,
    so its sockets are in ``BASE/NAME`` as on a host running several slurmd."""

    def __init__(self, name: str, base: str, *extra: str):
        super().__init__("--node-name", name, "--seed-downstream", "none", *extra, rundir=base)
        self.name = name
        self.base = base
        self.node_dir = os.path.join(base, name)
        self.log_path = os.path.join(base, f"nrmd-{name}.log")
        self.env["NRM_RUNTIME_DIR"] = self.node_dir

    def ping(self, timeout: float = 1.0) -> bool:
        # DaemonProcess pings its rundir (the base here); look one level down.
        base, self.rundir = self.rundir, self.node_dir
        try:
            return super().ping(timeout)
        finally:
            self.rundir = base


if __name__ == "__main__":
    import signal

    signal.signal(signal.SIGTERM, signal.default_int_handler)
    c = SlurmCluster()
    try:
        c.start()
        print(f"export SLURM_CONF={c.conf}", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        c.stop()
