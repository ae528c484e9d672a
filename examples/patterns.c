/*
 * patterns: an MPI program whose ranks do unequal work between barriers,
 * following one of the imbalance patterns of benchmarks/power_oracle.py,
 * so that the power policies can be measured live against an oracle that
 * knows each phase's work in advance.
 *
 * Each phase, rank r computes units(pattern, phase, r) work units, then
 * calls MPI_Barrier.  One unit is -u floating-point loop iterations; the
 * critical rank of a phase has 1 unit (phase-varying's type B: 0.6).
 *
 * usage: patterns -p PATTERN [-n phases] [-u unit] [-s shift] [-S seed] [-W]
 *   -p P  static (rank 0: 1, the others 0.5), static4 (graded 1 .. 0.4),
 *         shifting (1 : 0.5, the critical rank moves every -s phases),
 *         phase-varying (type A 1 : 0.5 and type B 0.6 : 0.48 alternate,
 *         each ending at its own MPI_Barrier call site), noisy (static,
 *         each rank's work x U(0.85, 1.15) per phase), random-walk (starts
 *         graded, each share x U(0.9, 1.1) per phase within [0.2, 1]),
 *         balanced (1 for everyone)
 *   -n N  phases (default 30)
 *   -u U  work unit in loop iterations (default 60000000: ~100 ms here)
 *   -s N  shifting: phases between moves of the critical rank (default 10)
 *   -S X  seed of noisy and random-walk (default 1)
 *   -W    print the work table ("work phase=I rank=R units=X", rank 0) and
 *         exit without computing: the benchmark derives the oracle from it
 *
 * Rank 0 prints "patterns: pattern=P ranks=R phases=N unit=U time=Ts
 * checksum=S" at the end; time is from the first barrier to the last.
 */
#define _GNU_SOURCE
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static volatile double seed_value = 0.5, sink;

/* Out of line and ending in a volatile store: the compiler cannot move the
 * arithmetic across the barriers around the call. */
static __attribute__((noinline)) double work(double units, long unit)
{
	long n = (long)(units * (double)unit);
	double x = seed_value;

	for (long i = 0; i < n; i++)
		x = x * 0.999999 + 0.000001;
	sink = x;
	return x;
}

/* Two call sites of MPI_Barrier, kept apart (noipa: no merging of identical
 * functions), so that the interposer reports two phase types. */
static volatile int site_a, site_b;

static __attribute__((noinline, noipa)) void barrier_a(void)
{
	MPI_Barrier(MPI_COMM_WORLD);
	site_a++;
}

static __attribute__((noinline, noipa)) void barrier_b(void)
{
	MPI_Barrier(MPI_COMM_WORLD);
	site_b++;
}

/* splitmix64: the same numbers on every rank and every libc. */
static uint64_t rng_state;

static double uniform(double lo, double hi)
{
	uint64_t z = (rng_state += 0x9E3779B97F4A7C15ULL);

	z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
	z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
	z ^= z >> 31;
	return lo + (hi - lo) * (double)(z >> 11) / 9007199254740992.0;
}

static double graded(int r, int size)
{
	return size > 1 ? 1.0 - 0.6 * r / (size - 1) : 1.0;
}

/* The whole table, [phase * size + rank], so that every rank draws the
 * same random numbers in the same order. */
static int fill(const char *pattern, double *units, long phases, int size, long shift)
{
	for (long i = 0; i < phases; i++) {
		double *row = units + i * size;

		for (int r = 0; r < size; r++) {
			if (!strcmp(pattern, "static") || !strcmp(pattern, "noisy"))
				row[r] = r == 0 ? 1.0 : 0.5;
			else if (!strcmp(pattern, "static4"))
				row[r] = graded(r, size);
			else if (!strcmp(pattern, "shifting"))
				row[r] = r == (i / shift) % size ? 1.0 : 0.5;
			else if (!strcmp(pattern, "phase-varying"))
				row[r] = i % 2 == 0 ? (r == 0 ? 1.0 : 0.5) : (r == 0 ? 0.6 : 0.48);
			else if (!strcmp(pattern, "random-walk"))
				row[r] = i == 0 ? graded(r, size) : row[r - size];
			else if (!strcmp(pattern, "balanced"))
				row[r] = 1.0;
			else
				return -1;
		}
		if (!strcmp(pattern, "noisy"))
			for (int r = 0; r < size; r++)
				row[r] *= uniform(0.85, 1.15);
		if (!strcmp(pattern, "random-walk") && i > 0)
			for (int r = 0; r < size; r++) {
				double s = row[r] * uniform(0.9, 1.1);

				row[r] = s < 0.2 ? 0.2 : s > 1.0 ? 1.0 : s;
			}
	}
	return 0;
}

static void usage(void)
{
	fprintf(stderr, "usage: patterns -p static|static4|shifting|phase-varying|noisy|"
		"random-walk|balanced [-n phases] [-u unit] [-s shift] [-S seed] [-W]\n");
}

int main(int argc, char **argv)
{
	long phases = 30, unit = 60000000, shift = 10;
	unsigned long seed = 1;
	const char *pattern = NULL;
	double *units, checksum = 0, t0, t1;
	int rank, size, table = 0, opt;

	MPI_Init(&argc, &argv);
	MPI_Comm_rank(MPI_COMM_WORLD, &rank);
	MPI_Comm_size(MPI_COMM_WORLD, &size);
	while ((opt = getopt(argc, argv, "p:n:u:s:S:Wh")) != -1) {
		switch (opt) {
		case 'p':
			pattern = optarg;
			break;
		case 'n':
			phases = atol(optarg);
			break;
		case 'u':
			unit = atol(optarg);
			break;
		case 's':
			shift = atol(optarg);
			break;
		case 'S':
			seed = strtoul(optarg, NULL, 10);
			break;
		case 'W':
			table = 1;
			break;
		default:
			pattern = NULL;
			phases = -1;
		}
	}
	units = phases > 0 ? calloc((size_t)phases * (size_t)size, sizeof(*units)) : NULL;
	rng_state = seed;
	if (!pattern || phases < 1 || unit < 0 || shift < 1 || !units ||
	    fill(pattern, units, phases, size, shift) != 0) {
		if (rank == 0)
			usage();
		MPI_Finalize();
		return 2;
	}
	if (table) {
		for (long i = 0; rank == 0 && i < phases; i++)
			for (int r = 0; r < size; r++)
				printf("work phase=%ld rank=%d units=%.6f\n", i, r,
				       units[i * size + r]);
		MPI_Finalize();
		return 0;
	}

	MPI_Barrier(MPI_COMM_WORLD);
	t0 = MPI_Wtime();
	for (long i = 0; i < phases; i++) {
		checksum += work(units[i * size + rank], unit);
		if (i % 2 == 0)
			barrier_a();
		else
			barrier_b();
	}
	t1 = MPI_Wtime();
	if (rank == 0)
		printf("patterns: pattern=%s ranks=%d phases=%ld unit=%ld time=%.6fs "
		       "checksum=%.3f\n", pattern, size, phases, unit, t1 - t0, checksum);
	free(units);
	MPI_Finalize();
	return 0;
}
