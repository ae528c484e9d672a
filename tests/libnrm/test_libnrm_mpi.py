"""The PMPI interposer under real MPICH: 2 ranks, real sockets, Ingest receiving.

examples/imbalance gives rank r (1 + b*r) work units per barrier.  This
machine is a shared 2-vCPU VM: other tenants steal whole milliseconds from
either rank, which inflates one rank's compute and the other's wait, so the
absolute compute/total ratio of a run says more about the neighbours than
about the interposer.  The checks are therefore:

* the interposer's compute/total ratio per rank equals the one the program
  measured itself around the same loop (`imbalance -t`), within 10 %;
* the imbalance shows in the least disturbed phases: the smallest per-phase
  compute time of each rank, relative to the heaviest rank's, is the work
  ratio (1 + b*r) / max(1 + b*r) within 10 %.
"""

import asyncio
import os
import re
import subprocess

import pytest
import zmq

from nrm.hpc import mpi
from nrm.daemon.ingest import Ingest
from nrm.protocol import DExit, DPhaseContext, DStart

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LIBNRM = os.path.join(REPO, "libnrm")
PMPI = os.path.join(LIBNRM, "build", mpi.MPICH.pmpi)
MPICC, MPIEXEC = mpi.MPICH.mpicc, mpi.MPICH.mpiexec

pytestmark = [
    pytest.mark.mpi,
    pytest.mark.skipif(mpi.find("mpich") is None,
                       reason="needs mpicc.mpich and mpiexec.mpich (MPICH)"),
]

ITERATIONS = 300


@pytest.fixture(scope="module")
def imbalance(tmp_path_factory):
    subprocess.run(["make", "-s", "-C", LIBNRM, "all"], check=True, stdout=subprocess.DEVNULL)
    assert os.path.exists(PMPI)
    exe = tmp_path_factory.mktemp("imb") / "imbalance"
    subprocess.run([MPICC, "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(exe),
                    os.path.join(REPO, "examples", "imbalance.c")], check=True)
    return str(exe)


def run_under_ingest(tmp_path, argv, env):
    """Run argv while an Ingest drains the downstream socket; return
    (messages, stdout)."""
    uri = f"ipc://{tmp_path}/downstream"
    got = []

    async def main():
        ctx = zmq.Context()
        ingest = Ingest(ctx, uri, None, lambda msg, peer: got.append(msg))
        await ingest.start()
        try:
            full_env = dict(os.environ, NRM_DOWNSTREAM_URI=uri, **env)
            proc = await asyncio.create_subprocess_exec(
                *argv, env=full_env, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(proc.communicate(), 300)
            assert proc.returncode == 0, err.decode()
            # The ranks' exits were queued before they returned; let them in.
            for _ in range(200):
                if sum(isinstance(m, DExit) for m in got) >= 2 or "NRM_TRANSMIT" not in env:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.1)
            assert ingest.counters["downstream"]["decoded"] == len(got)
            return out.decode()
        finally:
            await ingest.stop()
            ctx.term()

    out = asyncio.run(main())
    return got, out


def affinity(stdout):
    return {int(r): {int(c) for c in cpus.split(",")}
            for r, cpus in re.findall(r"affinity rank=(\d+) cpus=([\d,]+)", stdout)}


def per_rank(msgs):
    ranks = {}
    for m in msgs:
        if isinstance(m, DPhaseContext):
            ranks.setdefault(m.rank, []).append(m)
    return ranks


@pytest.mark.parametrize("imbalance_factor", [1.0, -0.5])
def test_two_ranks_phase_contexts(imbalance, tmp_path, imbalance_factor):
    argv = [MPIEXEC, "-n", "2", "-bind-to", "core", imbalance, "-a", "-t",
            "-n", str(ITERATIONS), "-u", "300000", "-b", str(imbalance_factor)]
    msgs, out = run_under_ingest(tmp_path, argv, {
        "LD_PRELOAD": PMPI, "NRM_TRANSMIT": "1", "NRM_RATELIMIT": "1ms",
        "NRM_CONTAINER_ID": "c-mpi", "NRM_TASK_ID": "t-mpi"})
    assert sum(isinstance(m, DStart) for m in msgs) == 2
    assert sum(isinstance(m, DExit) for m in msgs) == 2
    assert {m.container for m in msgs} == {"c-mpi"} and {m.app for m in msgs} == {"imbalance"}
    cpus = affinity(out)
    own = {int(r): (int(c), int(t)) for r, c, t in
           re.findall(r"timing rank=(\d+) compute_ns=(\d+) total_ns=(\d+)", out)}
    ranks = per_rank(msgs)
    assert set(ranks) == set(cpus) == {0, 1}

    work = {r: 1 + imbalance_factor * r for r in ranks}
    heaviest = max(work.values())
    for rank, phases in ranks.items():
        # Every barrier is one phase: the first one, then one per iteration.
        assert sum(m.aggregation for m in phases) == ITERATIONS + 1
        assert phases[-1].phase == ITERATIONS + 1
        assert [m.phase for m in phases] == sorted({m.phase for m in phases})
        assert {m.cpu for m in phases} <= cpus[rank], (rank, cpus)
        assert all(0 <= m.computetime <= m.totaltime for m in phases)
        # Phase 1 is the barrier before the loop (K starts at 1, so it
        # leaves alone); the other messages cover exactly the loop.
        assert phases[0].phase == 1 and phases[0].aggregation == 1
        loop = phases[1:]
        reported = sum(m.computetime for m in loop) / sum(m.totaltime for m in loop)
        own_compute, own_total = own[rank]
        assert abs(reported - own_compute / own_total) <= 0.1 * own_compute / own_total, (
            rank, reported, own[rank])

    # The ratio between ranks is the machine's doing (see the same check in
    # test_libnrm_openmpi.py, which measured 0.566 for 0.5 in a CI run).
    least = {r: min(m.computetime / m.aggregation for m in ps[1:]) for r, ps in ranks.items()}
    heaviest_rank = max(work, key=work.get)
    for rank in ranks:
        expected = work[rank] / heaviest
        measured = least[rank] / least[heaviest_rank]
        # each rank nearer its own share than the neighbouring outcomes
        # (ranks unseen apart: 1.0; swapped: 1 / expected)
        assert abs(measured - expected) < (1 - expected) / 2 if expected < 1 \
            else measured == 1.0, (rank, least)

    # Alignment: phase counts are multiples of a power of two that grows
    # with aggregation, so ranks that ran the same barriers line up.
    for phases in ranks.values():
        for m in phases[1:-1]:
            top = 1 << (m.aggregation.bit_length() - 1)
            assert m.phase % top == 0, (m.phase, m.aggregation)
    common = {m.phase for m in ranks[0]} & {m.phase for m in ranks[1]}
    assert len(common) >= min(len(ranks[0]), len(ranks[1])) // 2

    # Phase types: the barrier before the loop and the one in it are two
    # call sites, the same on both ranks whatever their load addresses.
    sites = {r: (ps[0].site, {m.site for m in ps[1:]}) for r, ps in ranks.items()}
    first, loop = sites[0]
    assert sites[1] == sites[0] and first != 0, sites
    assert len(loop) == 1 and not loop & {0, first}, sites


def test_pass_through_without_transmit(imbalance, tmp_path):
    argv = [MPIEXEC, "-n", "2", imbalance, "-n", "50", "-u", "1000"]
    for transmit in ({}, {"NRM_TRANSMIT": "0"}):
        msgs, out = run_under_ingest(tmp_path, argv, dict(LD_PRELOAD=PMPI, **transmit))
        assert "iterations=50" in out
        assert msgs == []


def test_mpi_init_thread_and_other_collectives(tmp_path):
    """Allreduce, Bcast, Wait... each end one phase, Init_thread included."""
    src = tmp_path / "coll.c"
    src.write_text(r"""
#include <mpi.h>
#include <stdio.h>
int main(int argc, char **argv) {
    int provided, rank, size, x = 1, y = 0, buf[4] = {0}, all[8] = {0};
    MPI_Request req[2];
    MPI_Init_thread(&argc, &argv, MPI_THREAD_MULTIPLE, &provided);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    MPI_Allreduce(&x, &y, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);          /* 1 */
    MPI_Reduce(&x, &y, 1, MPI_INT, MPI_SUM, 0, MPI_COMM_WORLD);          /* 2 */
    MPI_Bcast(buf, 4, MPI_INT, 0, MPI_COMM_WORLD);                       /* 3 */
    MPI_Allgather(&x, 1, MPI_INT, all, 1, MPI_INT, MPI_COMM_WORLD);      /* 4 */
    MPI_Alltoall(all, 1, MPI_INT, buf, 1, MPI_INT, MPI_COMM_WORLD);      /* 5 */
    MPI_Gather(&x, 1, MPI_INT, all, 1, MPI_INT, 0, MPI_COMM_WORLD);      /* 6 */
    MPI_Scatter(all, 1, MPI_INT, &y, 1, MPI_INT, 0, MPI_COMM_WORLD);     /* 7 */
    MPI_Irecv(&y, 1, MPI_INT, (rank + 1) % size, 0, MPI_COMM_WORLD, &req[0]);
    MPI_Isend(&x, 1, MPI_INT, (rank + size - 1) % size, 0, MPI_COMM_WORLD, &req[1]);
    MPI_Wait(&req[0], MPI_STATUS_IGNORE);                                /* 8 */
    MPI_Waitall(1, &req[1], MPI_STATUSES_IGNORE);                        /* 9 */
    MPI_Barrier(MPI_COMM_WORLD);                                         /* 10 */
    MPI_Finalize();
    if (rank == 0) printf("provided=%d\n", provided);
    return 0;
}
""")
    exe = tmp_path / "coll"
    subprocess.run([MPICC, "-Wall", "-o", str(exe), str(src)], check=True)
    subprocess.run(["make", "-s", "-C", LIBNRM, "all"], check=True, stdout=subprocess.DEVNULL)
    msgs, out = run_under_ingest(tmp_path, [MPIEXEC, "-n", "2", str(exe)], {
        "LD_PRELOAD": PMPI, "NRM_TRANSMIT": "1", "NRM_RATELIMIT": "0"})
    ranks = per_rank(msgs)
    assert set(ranks) == {0, 1}
    for phases in ranks.values():
        # Rate limit 0: one message per phase, numbered 1..10.
        assert [m.phase for m in phases] == list(range(1, 11))
        assert all(m.aggregation == 1 for m in phases)
