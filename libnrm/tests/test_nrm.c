/*
 * Unit tests of libnrm against a real ZeroMQ socket: the test binds the
 * PULL end itself, so `make check` needs nothing but libzmq.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zmq.h>

#include "nrm.h"
#include "../src/nrm_internal.h"

#include "check.h"

static char uri[256];

/* Next message as a NUL-terminated string, or NULL after 5 s of silence. */
static char *recv_msg(void *pull, char *buf, size_t cap)
{
	zmq_pollitem_t item = { pull, 0, ZMQ_POLLIN, 0 };
	int n;

	if (zmq_poll(&item, 1, 5000) != 1)
		return NULL;
	n = zmq_recv(pull, buf, cap - 1, 0);
	if (n < 0)
		return NULL;
	buf[(size_t)n < cap - 1 ? (size_t)n : cap - 1] = '\0';
	return buf;
}

static unsigned long field_ul(const char *msg, const char *key)
{
	char pat[64];
	const char *p;

	snprintf(pat, sizeof(pat), "\"%s\":", key);
	p = strstr(msg, pat);
	return p ? strtoul(p + strlen(pat), NULL, 10) : (unsigned long)-1;
}

static void test_durations(void)
{
	uint64_t ns;

	CHECK(nrm_parse_duration_ns("10ms", &ns) == 0 && ns == 10000000ULL);
	CHECK(nrm_parse_duration_ns("250us", &ns) == 0 && ns == 250000ULL);
	CHECK(nrm_parse_duration_ns("2s", &ns) == 0 && ns == 2000000000ULL);
	CHECK(nrm_parse_duration_ns("0.5ms", &ns) == 0 && ns == 500000ULL);
	CHECK(nrm_parse_duration_ns("1234", &ns) == 0 && ns == 1234ULL);
	CHECK(nrm_parse_duration_ns("7ns", &ns) == 0 && ns == 7ULL);
	CHECK(nrm_parse_duration_ns("0", &ns) == 0 && ns == 0ULL);
	CHECK(nrm_parse_duration_ns("", &ns) != 0);
	CHECK(nrm_parse_duration_ns("fast", &ns) != 0);
	CHECK(nrm_parse_duration_ns("10 parsecs", &ns) != 0);
	CHECK(nrm_parse_duration_ns("-1ms", &ns) != 0);
}

static void test_inactive(void)
{
	struct nrm_context ctxt;

	memset(&ctxt, 0xa5, sizeof(ctxt));	/* callers pass stack garbage */
	unsetenv("NRM_DOWNSTREAM_URI");
	CHECK(nrm_init(&ctxt, "inactive") == 0);
	CHECK(!nrm_is_active(&ctxt));
	CHECK(nrm_send_progress(&ctxt, 5) == 0);
	CHECK(nrm_send_phase_context(&ctxt, 0, 1, 2, 2, 3) == 0);
	CHECK(nrm_send_phase_aggregate(&ctxt, 0, 0, 1, 1, 1, 2) == 0);
	CHECK(nrm_send_performance(&ctxt, "instructions", 1.0, 1.0) == 0);
	CHECK(nrm_flush(&ctxt) == 0);
	CHECK(nrm_fini(&ctxt) == 0);
}

/* Everything one context sends, in order, including nrm_fini's flush. */
static void test_messages(void *zctx)
{
	struct nrm_context ctxt;
	void *pull = zmq_socket(zctx, ZMQ_PULL);
	char buf[4096];
	char *m;
	unsigned long sum = 0, got = 0;
	int progress_msgs = 0, calls = 1000;

	CHECK(zmq_bind(pull, uri) == 0);
	setenv("NRM_DOWNSTREAM_URI", uri, 1);
	setenv("NRM_CONTAINER_ID", "c-1", 1);
	setenv("NRM_TASK_ID", "t\"1", 1);
	setenv("NRM_RATELIMIT", "100s", 1);	/* long: only the first call sends */

	CHECK(nrm_init(&ctxt, "app\\name") == 0);
	CHECK(nrm_is_active(&ctxt));
	for (int i = 1; i <= calls; i++) {
		CHECK(nrm_send_progress(&ctxt, (unsigned long)i) == 0);
		sum += (unsigned long)i;
	}
	CHECK(nrm_send_phase_context(&ctxt, 1, 100, 300, 300, 400) == 0);
	CHECK(nrm_send_phase_aggregate(&ctxt, 3, 1, 8, 4, 1000, 2000) == 0);
	CHECK(nrm_send_performance(&ctxt, "instructions", 1.5e9, 0.25) == 0);
	CHECK(nrm_fini(&ctxt) == 0);
	CHECK(!nrm_is_active(&ctxt));

	m = recv_msg(pull, buf, sizeof(buf));
	CHECK(m && strstr(m, "\"type\":\"start\""));
	CHECK(m && strstr(m, "\"v\":1"));
	CHECK(m && strstr(m, "\"container\":\"c-1\""));
	CHECK(m && strstr(m, "\"task\":\"t\\\"1\""));
	CHECK(m && strstr(m, "\"app\":\"app\\\\name\""));
	CHECK(m && field_ul(m, "pid") == (unsigned long)getpid());
	/* Rate-limited progress is held back until nrm_fini, so it arrives
	 * after the phase messages; exit must come last. */
	int phases = 0, perf = 0, exits = 0;

	while (!exits && (m = recv_msg(pull, buf, sizeof(buf)))) {
		if (strstr(m, "\"type\":\"progress\"")) {
			got += field_ul(m, "payload");
			progress_msgs++;
		} else if (strstr(m, "\"type\":\"phase_context\"") && phases++ == 0) {
			CHECK(field_ul(m, "computetime") == 200 && field_ul(m, "totaltime") == 300);
			CHECK(field_ul(m, "aggregation") == 1 && field_ul(m, "phase") == 1);
		} else if (strstr(m, "\"type\":\"phase_context\"")) {
			CHECK(field_ul(m, "rank") == 3 && field_ul(m, "phase") == 8);
			CHECK(field_ul(m, "aggregation") == 4 && field_ul(m, "totaltime") == 2000);
		} else if (strstr(m, "\"type\":\"performance\"")) {
			CHECK(strstr(m, "\"payload\":1500000000") != NULL);
			perf++;
		} else if (strstr(m, "\"type\":\"exit\"")) {
			exits++;
		} else {
			CHECK(!"unexpected message");
		}
	}
	CHECK(got == sum);
	CHECK(progress_msgs == 2);	/* the first call, then fini's flush */
	CHECK(phases == 2 && perf == 1 && exits == 1);
	zmq_close(pull);
}

/* A program may start before the daemon listens: PUSH queues meanwhile. */
static void test_connect_before_bind(void *zctx)
{
	struct nrm_context ctxt;
	char late[300];
	char buf[4096];
	void *pull;
	char *m;

	snprintf(late, sizeof(late), "%s-late", uri);
	setenv("NRM_DOWNSTREAM_URI", late, 1);
	setenv("NRM_RATELIMIT", "0", 1);
	CHECK(nrm_init(&ctxt, "early") == 0);
	CHECK(nrm_send_progress(&ctxt, 42) == 0);
	pull = zmq_socket(zctx, ZMQ_PULL);
	CHECK(zmq_bind(pull, late) == 0);
	CHECK(nrm_fini(&ctxt) == 0);
	m = recv_msg(pull, buf, sizeof(buf));
	CHECK(m && strstr(m, "\"type\":\"start\""));
	m = recv_msg(pull, buf, sizeof(buf));
	CHECK(m && field_ul(m, "payload") == 42);
	m = recv_msg(pull, buf, sizeof(buf));
	CHECK(m && strstr(m, "\"type\":\"exit\""));
	zmq_close(pull);
	unlink(late + strlen("ipc://"));
}

/* Nobody listens and the queue fills: calls fail fast, fini is bounded. */
static void test_no_daemon(void)
{
	struct nrm_context ctxt;
	char gone[300];
	int failed = 0;

	snprintf(gone, sizeof(gone), "%s-nobody", uri);
	setenv("NRM_DOWNSTREAM_URI", gone, 1);
	setenv("NRM_RATELIMIT", "0", 1);
	setenv("NRM_LINGER", "50", 1);
	CHECK(nrm_init(&ctxt, "alone") == 0);
	for (int i = 0; i < 5000; i++)
		if (nrm_send_progress(&ctxt, 1) != 0) {
			CHECK(errno == EAGAIN);
			failed++;
		}
	CHECK(failed > 0);	/* the high-water mark held */
	CHECK(ctxt.acc > 0);	/* and unsent progress was kept, not lost */
	nrm_fini(&ctxt);
	unsetenv("NRM_LINGER");
}

int main(void)
{
	void *zctx = zmq_ctx_new();

	snprintf(uri, sizeof(uri), "ipc:///tmp/nrm-test-libnrm-%ld", (long)getpid());
	test_durations();
	test_inactive();
	test_messages(zctx);
	test_connect_before_bind(zctx);
	test_no_daemon();
	zmq_ctx_term(zctx);
	unlink(uri + strlen("ipc://"));
	if (failures) {
		fprintf(stderr, "test_nrm: %d failure(s)\n", failures);
		return 1;
	}
	printf("test_nrm: ok\n");
	return 0;
}
