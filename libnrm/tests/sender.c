/*
 * Progress from several threads at once, for the pytest side: the daemon
 * must see exactly the sum of all calls whatever the rate limit.
 * usage: sender THREADS CALLS_PER_THREAD PAYLOAD
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

#include "nrm.h"

static struct nrm_context ctxt;
static long calls;
static unsigned long payload;

static void *worker(void *arg)
{
	(void)arg;
	for (long i = 0; i < calls; i++)
		nrm_send_progress(&ctxt, payload);
	return NULL;
}

int main(int argc, char **argv)
{
	int threads = argc > 1 ? atoi(argv[1]) : 4;
	pthread_t tid[64];

	calls = argc > 2 ? atol(argv[2]) : 10000;
	payload = argc > 3 ? strtoul(argv[3], NULL, 10) : 1;
	if (threads < 1 || threads > 64)
		return 2;
	if (nrm_init(&ctxt, "sender") != 0) {
		perror("nrm_init");
		return 1;
	}
	for (int t = 0; t < threads; t++)
		pthread_create(&tid[t], NULL, worker, NULL);
	for (int t = 0; t < threads; t++)
		pthread_join(tid[t], NULL);
	if (nrm_fini(&ctxt) != 0) {
		perror("nrm_fini");
		return 1;
	}
	printf("%lu\n", (unsigned long)threads * (unsigned long)calls * payload);
	return 0;
}
