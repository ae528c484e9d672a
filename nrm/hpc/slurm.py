"""Running `nrm run` inside Slurm job steps: one nrmd per node, one
container per step and node.

Rules (docs/slurm.md explains them for users):

Container name
    ``slurm-<SLURM_JOB_ID>.<SLURM_STEP_ID>`` (``.batch`` in a batch script
    outside any step). Every task of a step on one node asks for that name,
    so the daemon puts them in one container, the way MPI ranks under
    ``mpiexec`` share one; the epilog can find a job's leftovers by prefix.

Cpus the slice may use
    The client's own affinity, ``os.sched_getaffinity(0)``: inside a step
    Slurm confines the task to its cpus on this node (task/affinity binds
    it, task/cgroup puts it in a cpuset), and the client is such a task.
    The daemon cannot know it otherwise: the task is the client's child in
    Slurm's eyes, not the daemon's. When several tasks of a step run on one
    node and Slurm binds each to its own cpus, the first task to arrive
    sizes the container from its own binding; ``srun --cpu-bind=none``
    under task/cgroup gives every task the step's cpus on the node instead.

Slice size
    The manifest's ``app.slice.cpus`` when it fits in those cpus, else all
    of them. A manifest is written once and run at many scales; shrinking
    the slice to the allocation keeps `srun -c1 nrm run big.yml` working
    rather than failing with ``no_fit``, and a smaller request still gets
    exactly what it asked for.

PMI
    ``srun --mpi=pmi2`` hands each task a socket to slurmstepd in
    ``PMI_FD``. nrmd starts the application, so that descriptor never
    reaches it. :class:`PmiBridge` keeps the descriptor in the client and
    offers the application the same conversation over a loopback TCP port
    (``PMI_PORT``, which MPICH's PMI-1 client supports), answering the
    port handshake itself and relaying the rest byte for byte.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import select
import socket
import threading
from typing import Dict, List, Mapping, Optional

from nrm.manifest import Manifest

log = logging.getLogger("nrm.hpc.slurm")

CONTAINER_PREFIX = "slurm-"


def in_job(env: Optional[Mapping[str, str]] = None) -> bool:
    """True inside a Slurm allocation (a step or a batch script)."""
    env = os.environ if env is None else env
    return bool(env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID"))


def job_id(env: Optional[Mapping[str, str]] = None) -> Optional[str]:
    env = os.environ if env is None else env
    return env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID") or None


def step_id(env: Optional[Mapping[str, str]] = None) -> str:
    """The step id; ``batch`` in a batch script, which Slurm also calls the
    batch step but does not number."""
    env = os.environ if env is None else env
    return env.get("SLURM_STEP_ID") or env.get("SLURM_STEPID") or "batch"


def job_prefix(job: str) -> str:
    """What every container of ``job`` is named with (for the epilog)."""
    return f"{CONTAINER_PREFIX}{job}."


def default_container(env: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """``slurm-<job>.<step>``, or None outside Slurm."""
    job = job_id(env)
    if not job:
        return None
    return f"{job_prefix(job)}{step_id(env)}"


def step_cpus() -> List[int]:
    """The cpus this process may run on: inside a step, its share of the node."""
    return sorted(os.sched_getaffinity(0))


def slice_cpus(requested: int, allowed: int) -> int:
    """The slice size rule: the request when it fits, else the allocation."""
    return requested if requested <= allowed else allowed


def fit_manifest(manifest: Manifest, allowed: List[int]) -> Manifest:
    """``manifest`` with its slice sized by :func:`slice_cpus`."""
    cpus = slice_cpus(manifest.slice.cpus, len(allowed))
    if cpus == manifest.slice.cpus or cpus < 1:
        return manifest
    return dataclasses.replace(manifest, slice=dataclasses.replace(manifest.slice, cpus=cpus))


# ------------------------------------------------------------------ PMI ---

def _tcp_owner(local_port: int, peer_port: int) -> Optional[int]:
    """uid owning the loopback socket that connected to us, from
    /proc/net/tcp (its local port is our peer's port)."""
    want_local, want_remote = f"{peer_port:04X}", f"{local_port:04X}"
    try:
        with open("/proc/net/tcp") as f:
            next(f, None)
            for line in f:
                fields = line.split()
                if len(fields) < 8:
                    continue
                if (fields[1].split(":")[1] == want_local
                        and fields[2].split(":")[1] == want_remote):
                    return int(fields[7])
    except OSError:
        return None
    return None


class PmiBridge:
    """Relay a task's PMI-1 conversation from a loopback port to ``PMI_FD``.

    One connection at a time, any number in sequence (a shell script may
    run several MPI programs). Connections from other users are refused:
    the port is on loopback, where anyone could otherwise join the job's
    key-value space.
    """

    def __init__(self, fd: int, rank: str, size: str):
        self.fd = fd
        self.rank, self.size = rank, size
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4)
        self.port = self.listener.getsockname()[1]
        self.uid = os.getuid()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="pmi-bridge", daemon=True)

    @classmethod
    def from_env(cls, env: Optional[Mapping[str, str]] = None) -> Optional["PmiBridge"]:
        """A bridge when ``env`` carries a usable ``PMI_FD``, else None."""
        env = os.environ if env is None else env
        try:
            fd = int(env.get("PMI_FD", ""))
            os.fstat(fd)
        except (ValueError, OSError):
            return None
        return cls(fd, env.get("PMI_RANK", "0"), env.get("PMI_SIZE", "1"))

    def task_env(self, env: Mapping[str, str]) -> Dict[str, str]:
        """The application's environment: the port instead of the fd."""
        out = {k: v for k, v in env.items() if k != "PMI_FD"}
        out["PMI_PORT"] = f"127.0.0.1:{self.port}"
        out["PMI_ID"] = self.rank
        return out

    def start(self) -> "PmiBridge":
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self.listener.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([self.listener], [], [], 0.5)
                if not ready:
                    continue
                conn, peer = self.listener.accept()
            except (OSError, ValueError):
                return
            with conn:
                owner = _tcp_owner(self.port, peer[1])
                if owner != self.uid:
                    log.warning("PMI bridge: refused a connection from uid %s", owner)
                    continue
                try:
                    self._relay(conn)
                except OSError as exc:
                    log.debug("PMI bridge: %s", exc)

    def _handshake(self, first: bytes) -> bytes:
        """The reply to MPICH's port handshake (``cmd=initack``): who the
        process is, which PMI_FD clients learn from their environment."""
        if not first.startswith(b"cmd=initack"):
            return b""
        return (b"cmd=initack\n" + f"cmd=set size={self.size}\n".encode()
                + f"cmd=set rank={self.rank}\n".encode() + b"cmd=set debug=0\n")

    def _relay(self, conn: socket.socket) -> None:
        buf = b""
        while b"\n" not in buf:
            chunk = conn.recv(4096)
            if not chunk:
                return
            buf += chunk
        line, _, rest = buf.partition(b"\n")
        reply = self._handshake(line)
        if reply:
            conn.sendall(reply)
            pending = rest
        else:
            pending = buf
        if pending:
            _write_all(self.fd, pending)
        while not self._stop.is_set():
            ready, _, _ = select.select([conn, self.fd], [], [], 0.5)
            if conn in ready:
                data = conn.recv(65536)
                if not data:
                    return
                _write_all(self.fd, data)
            if self.fd in ready:
                data = os.read(self.fd, 65536)
                if not data:
                    return
                conn.sendall(data)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
