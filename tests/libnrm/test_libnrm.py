"""libnrm against real sockets: C programs send, Python receives and decodes.

The C library is built with its own Makefile (``make -C libnrm``); these
tests run its C unit tests and then check, from the receiving side, what
programs written against the library actually put on the wire.
"""

import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
import zmq

from nrm.hpc import mpi
from nrm.protocol import DExit, DPhaseContext, DProgress, DStart, decode_downstream
from tests.receivers import drain_slowly

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LIBNRM = os.path.join(REPO, "libnrm")
BUILD = os.path.join(LIBNRM, "build")

pytestmark = pytest.mark.skipif(
    shutil.which("cc") is None or shutil.which("make") is None
    or subprocess.run(["pkg-config", "--exists", "libzmq"]).returncode != 0,
    reason="needs cc, make and libzmq (pkg-config libzmq)")


@pytest.fixture(scope="module")
def built():
    subprocess.run(["make", "-s", "-C", LIBNRM, "all", "tests"], check=True,
                   stdout=subprocess.DEVNULL)
    return BUILD


def run_and_collect(sock, uri, argv, exits=1, env=None, timeout=60):
    """Run ``argv`` with nrm's environment, receiving while it runs (as the
    daemon does: a receiver that waits would make a fast sender drop);
    return (decoded msgs, stdout)."""
    full_env = dict(os.environ, NRM_DOWNSTREAM_URI=uri, NRM_CONTAINER_ID="c1",
                    NRM_TASK_ID="t1")
    full_env.update(env or {})
    proc = subprocess.Popen(argv, env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    msgs = []
    deadline = time.monotonic() + timeout
    while sum(isinstance(m, DExit) for m in msgs) < exits:
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"missing messages after {msgs[-3:]}, sender: "
                                 f"{proc.wait()} {proc.communicate()}")
        if sock.poll(100):
            msgs.append(decode_downstream(sock.recv()))
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return msgs, out


def test_make_check(built):
    proc = subprocess.run(["make", "-s", "-C", LIBNRM, "check"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "test_nrm: ok" in proc.stdout and "test_phase: ok" in proc.stdout


def test_threads_progress_sum_is_exact_under_rate_limit(built, pull):
    sock, uri = pull
    threads, calls, payload = 4, 20000, 3
    msgs, out = run_and_collect(sock, uri, [f"{built}/sender", str(threads), str(calls),
                                            str(payload)], env={"NRM_RATELIMIT": "10ms"})
    progress = [m for m in msgs if isinstance(m, DProgress)]
    assert isinstance(msgs[0], DStart) and isinstance(msgs[-1], DExit)
    assert sum(m.payload for m in progress) == threads * calls * payload == int(out)
    assert 1 <= len(progress) < threads * calls
    assert all(m.container == "c1" and m.task == "t1" and m.app == "sender" for m in msgs)


def test_progress_without_rate_limit_still_exact(built, pull):
    sock, uri = pull
    msgs, _ = run_and_collect(sock, uri, [f"{built}/sender", "2", "3000", "1"],
                              env={"NRM_RATELIMIT": "0"})
    progress = [m for m in msgs if isinstance(m, DProgress)]
    assert sum(m.payload for m in progress) == 6000
    assert len(progress) > 1


def test_flood_then_exit_loses_nothing_when_receiver_is_behind(built, slow_pull):
    """nrm_fini must not hang up before a full receiver has read its
    backlog (libzmq drops it), or the exit and the tail of the sum vanish."""
    sock, uri = slow_pull
    env = dict(os.environ, NRM_DOWNSTREAM_URI=uri, NRM_RATELIMIT="0", NRM_LINGER="60000")
    proc = subprocess.Popen([f"{built}/sender", "2", "200000", "1"], env=env,
                            stdout=subprocess.PIPE, text=True)
    msgs = drain_slowly(sock, proc)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert sum(m.payload for m in msgs if isinstance(m, DProgress)) == 400000 == int(out)


def test_seed_era_program_compiles_unchanged_and_reports(built, pull, tmp_path):
    """The seed-era usage: caller-allocated context, historical calls only."""
    exe = tmp_path / "seed_user"
    subprocess.run(["cc", "-Wall", "-Wextra", "-Werror", "-std=c99", "-D_POSIX_C_SOURCE=200809L",
                    f"-I{LIBNRM}/include", "-o", str(exe),
                    f"{LIBNRM}/tests/seed_user.c", f"-L{built}", f"-Wl,-rpath,{built}", "-lnrm"],
                   check=True)
    sock, uri = pull
    msgs, out = run_and_collect(sock, uri, [str(exe), "50"])
    assert out.strip() == "seed-user done 50"
    assert sum(m.payload for m in msgs if isinstance(m, DProgress)) == 50
    phases = [m for m in msgs if isinstance(m, DPhaseContext)]
    assert [m.phase for m in phases] == [1, 2, 3, 4, 5]
    assert all(m.aggregation == 1 and 0 < m.computetime <= m.totaltime for m in phases)
    assert msgs[0].pid > 0 and msgs[0].app == "seed-user"


def test_seed_struct_layout_is_unchanged(built, tmp_path):
    """Callers allocate the struct: its size and offsets must not move."""
    src = tmp_path / "layout.c"
    src.write_text(textwrap.dedent("""\
        #include <stddef.h>
        #include <stdio.h>
        #include <nrm.h>
        struct seed_nrm_context { void *context; void *socket; char *container_uuid;
                                  char *app_uuid; struct timespec time; unsigned long acc; };
        #define SAME(f) (offsetof(struct nrm_context, f) == offsetof(struct seed_nrm_context, f))
        int main(void) {
            int ok = sizeof(struct nrm_context) == sizeof(struct seed_nrm_context)
                && SAME(context) && SAME(socket) && SAME(container_uuid) && SAME(app_uuid)
                && SAME(time) && SAME(acc);
            printf("%s\\n", ok ? "same" : "different");
            return !ok;
        }
        """))
    subprocess.run(["cc", f"-I{LIBNRM}/include", "-o", str(tmp_path / "layout"), str(src)],
                   check=True)
    assert subprocess.run([str(tmp_path / "layout")], capture_output=True,
                          text=True).stdout.strip() == "same"


def test_inactive_without_uri(built):
    env = {k: v for k, v in os.environ.items() if k != "NRM_DOWNSTREAM_URI"}
    proc = subprocess.run([f"{built}/seed_user", "20"], env=env, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0 and proc.stdout.strip() == "seed-user done 20"


def test_start_before_daemon_binds_loses_nothing(built, tmp_path):
    """No slow-joiner sleep and no loss: PUSH queues until the bind."""
    uri = f"ipc://{tmp_path}/late"
    env = dict(os.environ, NRM_DOWNSTREAM_URI=uri, NRM_RATELIMIT="0")
    proc = subprocess.Popen([f"{built}/sender", "1", "200", "1"], env=env,
                            stdout=subprocess.PIPE)
    # The sender may well finish before anyone listens; nrm_fini lingers 1 s.
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.bind(uri)
    try:
        msgs = []
        while not msgs or not isinstance(msgs[-1], DExit):
            if not sock.poll(10000):
                break
            msgs.append(decode_downstream(sock.recv()))
        proc.wait(timeout=30)
        # Whatever arrived arrived complete and in order; if the bind beat
        # the 1 s linger, which it does unless the machine stalls, all of it.
        assert msgs and isinstance(msgs[0], DStart) and isinstance(msgs[-1], DExit)
        assert sum(m.payload for m in msgs if isinstance(m, DProgress)) == 200
    finally:
        sock.close(linger=0)
        ctx.term()


@pytest.mark.skipif(shutil.which("gfortran") is None, reason="needs gfortran")
def test_fortran_bindings(built, pull):
    assert os.path.exists(f"{built}/test_fortran")
    sock, uri = pull
    msgs, out = run_and_collect(sock, uri, [f"{built}/test_fortran"])
    assert out.strip() == "fortran ok"
    assert sum(m.payload for m in msgs if isinstance(m, DProgress)) == 200 + 5_000_000_000
    (phase,) = [m for m in msgs if isinstance(m, DPhaseContext)]
    assert (phase.computetime, phase.totaltime, phase.cpu) == (300, 900, 0)
    assert msgs[0].app == "fortran-app"


def test_install_and_pkg_config(built, tmp_path):
    prefix = tmp_path / "prefix"
    subprocess.run(["make", "-s", "-C", LIBNRM, "install", f"PREFIX={prefix}"], check=True,
                   stdout=subprocess.DEVNULL)
    for rel in ("include/nrm.h", "include/downstream_api.h", "lib/libnrm.so",
                "lib/pkgconfig/nrm.pc"):
        assert (prefix / rel).exists(), rel
    if shutil.which(mpi.MPICH.mpicc):       # the Makefile's default MPICC
        assert (prefix / "lib" / mpi.MPICH.pmpi).exists()
    env = dict(os.environ, PKG_CONFIG_PATH=str(prefix / "lib/pkgconfig"))
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "nrm"], env=env,
                           capture_output=True, text=True, check=True).stdout.split()
    assert f"-I{prefix}/include" in flags and "-lnrm" in flags
    exe = tmp_path / "progress"
    subprocess.run(["cc", "-Wall", "-Wextra", "-o", str(exe),
                    os.path.join(REPO, "examples", "progress.c")] + flags, check=True)
    env = {k: v for k, v in os.environ.items() if k != "NRM_DOWNSTREAM_URI"}
    proc = subprocess.run([str(exe), "5"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
