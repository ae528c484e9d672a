/*
 * progress: report application progress to nrm through libnrm.
 *
 * Each iteration does a little work and reports one unit of progress;
 * libnrm rate-limits what leaves (NRM_RATELIMIT), so calling it in a tight
 * loop is fine.  Outside nrm (no NRM_DOWNSTREAM_URI) it runs unchanged.
 *
 * usage: progress [iterations [unit]]   (defaults: 1000 iterations,
 *        unit 100000 loop steps of work per iteration)
 * build: make -C examples progress   (or: cc progress.c $(pkg-config --cflags --libs nrm))
 */
#include <stdio.h>
#include <stdlib.h>

#include <nrm.h>

static volatile double seed = 0.5;

int main(int argc, char **argv)
{
	long iterations = argc > 1 ? atol(argv[1]) : 1000;
	long unit = argc > 2 ? atol(argv[2]) : 100000;
	struct nrm_context ctxt;
	double x = seed;

	if (nrm_init(&ctxt, "progress") != 0)
		perror("progress: nrm_init (continuing without nrm)");
	for (long i = 0; i < iterations; i++) {
		for (long j = 0; j < unit; j++)
			x = x * 0.999999 + 0.000001;
		nrm_send_progress(&ctxt, 1);
	}
	nrm_fini(&ctxt);
	printf("progress: iterations=%ld checksum=%.3f reporting=%s\n", iterations, x,
	       getenv("NRM_DOWNSTREAM_URI") ? "on" : "off");
	return 0;
}
