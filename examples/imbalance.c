/*
 * imbalance: an MPI program whose ranks do unequal work between barriers,
 * the textbook case for nrm's DDCM power policy.
 *
 * Each iteration, rank r computes (1 + imbalance * r) work units, then
 * calls MPI_Barrier.  Ranks with less work wait at the barrier; the
 * policy can slow their cores down without slowing the program.
 *
 * usage: imbalance [-n iterations] [-u unit] [-b imbalance] [-a] [-t]
 *   -n N  iterations (default 200)
 *   -u U  work unit, in floating-point loop iterations (default 100000,
 *         roughly 0.1-0.3 ms on current cores)
 *   -b X  imbalance (default 1.0).  Every rank's work 1 + X*r must be
 *         positive.  -b 1 with 2 ranks: rank 1 does twice the work of
 *         rank 0.  -b -0.5 with 2 ranks: rank 0 does twice the work of
 *         rank 1 (the policy demo).
 *   -a    print each rank's allowed cpus: "affinity rank=R cpus=C,C..."
 *   -t    print each rank's own timing of the loop, for checking what the
 *         PMPI interposer reports: "timing rank=R compute_ns=C total_ns=T"
 *         (compute: time in the work; total: the whole loop, barriers too)
 *
 * Rank 0 prints "imbalance: ranks=P iterations=N unit=U imbalance=X
 * time=Ts checksum=S" at the end.
 */
#define _GNU_SOURCE
#include <mpi.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static unsigned long long now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (unsigned long long)ts.tv_sec * 1000000000ULL + (unsigned long long)ts.tv_nsec;
}

static volatile double seed = 0.5, sink;

/* Out of line and ending in a volatile store, so that the compiler cannot
 * move the arithmetic across the clock reads around the call. */
static __attribute__((noinline)) double work(double units, long unit)
{
	long n = (long)(units * (double)unit);
	double x = seed;

	/* A dependency chain: the compiler cannot vectorize it away, and the
	 * time is proportional to n on any core speed. */
	for (long i = 0; i < n; i++)
		x = x * 0.999999 + 0.000001;
	sink = x;
	return x;
}

static void print_affinity(int rank)
{
	cpu_set_t set;
	char line[4096];
	size_t len = 0;

	if (sched_getaffinity(0, sizeof(set), &set) != 0)
		return;
	len += (size_t)snprintf(line, sizeof(line), "affinity rank=%d cpus=", rank);
	for (int c = 0; c < CPU_SETSIZE && len < sizeof(line) - 16; c++)
		if (CPU_ISSET(c, &set))
			len += (size_t)snprintf(line + len, sizeof(line) - len, "%s%d",
						line[len - 1] == '=' ? "" : ",", c);
	printf("%s\n", line);
	fflush(stdout);
}

static void usage(void)
{
	fprintf(stderr, "usage: imbalance [-n iterations] [-u unit] [-b imbalance] [-a] [-t]\n");
}

int main(int argc, char **argv)
{
	long iterations = 200, unit = 100000;
	double imbalance = 1.0, units, checksum = 0, t0, t1;
	unsigned long long start, compute = 0, c0;
	int rank, size, affinity = 0, timing = 0, opt;

	MPI_Init(&argc, &argv);
	MPI_Comm_rank(MPI_COMM_WORLD, &rank);
	MPI_Comm_size(MPI_COMM_WORLD, &size);
	while ((opt = getopt(argc, argv, "n:u:b:ath")) != -1) {
		switch (opt) {
		case 'n':
			iterations = atol(optarg);
			break;
		case 'u':
			unit = atol(optarg);
			break;
		case 'b':
			imbalance = atof(optarg);
			break;
		case 'a':
			affinity = 1;
			break;
		case 't':
			timing = 1;
			break;
		default:
			if (rank == 0)
				usage();
			MPI_Finalize();
			return 2;
		}
	}
	if (1.0 + imbalance * (size - 1) <= 0 || iterations < 0 || unit < 0) {
		if (rank == 0)
			fprintf(stderr, "imbalance: every rank's work 1 + %g*r must be positive\n",
				imbalance);
		MPI_Finalize();
		return 2;
	}
	if (affinity)
		print_affinity(rank);
	units = 1.0 + imbalance * rank;

	MPI_Barrier(MPI_COMM_WORLD);
	t0 = MPI_Wtime();
	start = now_ns();
	for (long i = 0; i < iterations; i++) {
		c0 = now_ns();
		checksum += work(units, unit);
		compute += now_ns() - c0;
		MPI_Barrier(MPI_COMM_WORLD);
	}
	t1 = MPI_Wtime();
	if (timing) {
		printf("timing rank=%d compute_ns=%llu total_ns=%llu\n", rank, compute,
		       now_ns() - start);
		fflush(stdout);
	}
	if (rank == 0)
		printf("imbalance: ranks=%d iterations=%ld unit=%ld imbalance=%g time=%.6fs "
		       "checksum=%.3f\n", size, iterations, unit, imbalance, t1 - t0, checksum);
	MPI_Finalize();
	return 0;
}
