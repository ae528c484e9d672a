/*
 * inwait_probe: 2 ranks, rank 0 computes while rank 1 waits in a barrier,
 * and rank 0 looks at what the waiting rank's core register holds.
 *
 * Every barrier is called from one place (sync_point), so it is one call
 * site for the interposer's in-wait prediction: the first long wait only
 * teaches it, the later ones are throttled.
 *
 * usage: inwait_probe [-n iterations] [-u compute_us] [-f final_s] [-m msr_dir]
 *   -u U  rank 0 busy-computes U us before each barrier (default 5000)
 *   -f F  after the loop, rank 0 computes F more seconds before the last
 *         barrier (a rank killed meanwhile dies inside a throttled wait)
 *   -m D  before each barrier rank 0 reads IA32_CLOCK_MODULATION and
 *         IA32_PERF_CTL of rank 1's cpu from D/<cpu>/msr_safe (a regular
 *         file: 8 bytes at offset 8 x register) and prints
 *         "seen iter=I value=<0x19A> perf=<0x199>"
 * Prints "waiter cpu=C" (rank 1's cpu) first and "done" at the end.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <mpi.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void compute(double seconds)
{
	volatile double x = 0.5;
	double end = now_s() + seconds;

	while (now_s() < end)
		for (int i = 0; i < 1000; i++)
			x = x * 0.999999 + 0.000001;
}

static __attribute__((noinline)) void sync_point(void)
{
	MPI_Barrier(MPI_COMM_WORLD);
}

int main(int argc, char **argv)
{
	long iterations = 20, compute_us = 5000;
	double final_s = 0;
	const char *msr = NULL;
	int rank, size, opt, cpus[2];

	while ((opt = getopt(argc, argv, "n:u:f:m:")) != -1) {
		switch (opt) {
		case 'n': iterations = atol(optarg); break;
		case 'u': compute_us = atol(optarg); break;
		case 'f': final_s = atof(optarg); break;
		case 'm': msr = optarg; break;
		default:
			fprintf(stderr, "usage: inwait_probe [-n N] [-u us] [-f s] [-m dir]\n");
			return 2;
		}
	}
	MPI_Init(&argc, &argv);
	MPI_Comm_rank(MPI_COMM_WORLD, &rank);
	MPI_Comm_size(MPI_COMM_WORLD, &size);
	if (size != 2) {
		if (rank == 0)
			fprintf(stderr, "inwait_probe: needs 2 ranks\n");
		MPI_Finalize();
		return 2;
	}
	cpus[rank] = sched_getcpu();
	MPI_Allgather(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, cpus, 1, MPI_INT, MPI_COMM_WORLD);
	if (rank == 0) {
		printf("waiter cpu=%d\n", cpus[1]);
		fflush(stdout);
	}
	for (long i = 0; i <= iterations; i++) {
		int last = i == iterations;

		if (last && final_s <= 0)
			break;
		if (rank == 0) {
			compute(last ? final_s : (double)compute_us * 1e-6);
			if (msr) {
				char path[4096];
				uint64_t v = 0, p = 0;
				int fd;

				snprintf(path, sizeof(path), "%s/%d/msr_safe", msr, cpus[1]);
				fd = open(path, O_RDONLY);
				if (fd >= 0 && pread(fd, &v, 8, 8 * 0x19A) == 8 &&
				    pread(fd, &p, 8, 8 * 0x199) == 8)
					printf("seen iter=%ld value=%#llx perf=%#llx\n", i,
					       (unsigned long long)v, (unsigned long long)p);
				if (fd >= 0)
					close(fd);
				fflush(stdout);
			}
		}
		sync_point();
	}
	if (rank == 0)
		printf("done\n");
	MPI_Finalize();
	return 0;
}
