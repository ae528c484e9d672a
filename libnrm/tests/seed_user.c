/*
 * Written the way programs of the seed era were: the caller allocates the
 * context on its stack and uses only the four historical calls.  It must
 * keep compiling and linking against nrm.h unchanged.
 */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <nrm.h>

static unsigned long long ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000000000ULL + ts.tv_nsec;
}

int main(int argc, char **argv)
{
	struct nrm_context ctxt;
	int i, iterations = argc > 1 ? atoi(argv[1]) : 100;
	unsigned long long sc, ec, sb, eb;
	volatile double x = 0;

	nrm_init(&ctxt, "seed-user");
	for (i = 0; i < iterations; i++) {
		int j;

		sc = ns();
		for (j = 0; j < 1000; j++)
			x += j * 0.5;
		ec = ns();
		sb = ec;
		eb = ns();
		nrm_send_progress(&ctxt, 1);
		if (i % 10 == 0)
			nrm_send_phase_context(&ctxt, 0, sc, ec, sb, eb);
	}
	nrm_fini(&ctxt);
	printf("seed-user done %d\n", iterations);
	return 0;
}
