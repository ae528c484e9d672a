/*
 * Cost of one intercepted MPI_Barrier: run with 1 rank, where the barrier
 * itself is nearly free, so the interposer's per-call overhead is what a
 * with/without comparison shows.
 * usage: barrier_bench [calls]   prints "ns_per_call=X"
 */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

int main(int argc, char **argv)
{
	long calls;
	struct timespec a, b;
	double ns;

	MPI_Init(&argc, &argv);
	calls = argc > 1 ? atol(argv[1]) : 2000000;
	MPI_Barrier(MPI_COMM_WORLD);
	clock_gettime(CLOCK_MONOTONIC, &a);
	for (long i = 0; i < calls; i++)
		MPI_Barrier(MPI_COMM_WORLD);
	clock_gettime(CLOCK_MONOTONIC, &b);
	ns = ((double)(b.tv_sec - a.tv_sec) * 1e9 + (double)(b.tv_nsec - a.tv_nsec)) / (double)calls;
	printf("ns_per_call=%.2f\n", ns);
	MPI_Finalize();
	return 0;
}
