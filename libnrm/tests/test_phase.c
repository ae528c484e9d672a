/*
 * The interposer's aggregation rule (src/phase.h) driven by made-up
 * clocks, so that alignment and rate limiting are checked exactly.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "../src/phase.h"

#include "check.h"

#define MAXMSG 100000

struct run {
	struct nrm_phase_msg msg[MAXMSG];
	uint64_t sent_at[MAXMSG];
	uint64_t k[MAXMSG];	/* K when the message left */
	int count;
};

static uint64_t lcg = 12345;

static uint64_t jitter(uint64_t span)
{
	lcg = lcg * 6364136223846793005ULL + 1442695040888963407ULL;
	return span ? (lcg >> 33) % span : 0;
}

/* `phases` phases of `compute` + `wait` ns (plus up to `noise` ns). */
static void drive(struct run *r, uint64_t period, int phases, uint64_t compute, uint64_t wait,
		  uint64_t noise, uint64_t *sum_compute, uint64_t *sum_total)
{
	struct nrm_phase_agg a;
	struct nrm_phase_msg out[2];
	uint64_t now = 1000;

	nrm_phase_init(&a, period);
	r->count = 0;
	*sum_compute = *sum_total = 0;
	for (int i = 0; i < phases; i++) {
		uint64_t c = compute + jitter(noise), w = wait;
		int n;

		now += c + w;
		*sum_compute += c;
		*sum_total += c + w;
		n = nrm_phase_end(&a, c, c + w, 0, now, out);
		for (int j = 0; j < n && r->count < MAXMSG; j++) {
			r->sent_at[r->count] = now;
			r->k[r->count] = a.k;
			r->msg[r->count++] = out[j];
		}
	}
	if (nrm_phase_flush(&a, &out[0]) && r->count < MAXMSG) {
		r->sent_at[r->count] = now;
		r->k[r->count] = a.k;
		r->msg[r->count++] = out[0];
	}
}

static int contains(const struct run *r, uint64_t phase)
{
	for (int i = 0; i < r->count; i++)
		if (r->msg[i].phase == phase)
			return 1;
	return 0;
}

static struct run ra, rb;

static void test_no_ratelimit(void)
{
	uint64_t sc, st;

	drive(&ra, 0, 50, 100, 10, 0, &sc, &st);
	CHECK(ra.count == 50);
	for (int i = 0; i < ra.count; i++)
		CHECK(ra.msg[i].phase == (uint64_t)i + 1 && ra.msg[i].aggregation == 1);
}

static void test_ratelimit_and_totals(void)
{
	uint64_t period = 1000000, sc, st, got_c = 0, got_t = 0, got_n = 0;
	uint64_t prev = 0;

	drive(&ra, period, 100000, 900, 100, 200, &sc, &st);
	for (int i = 0; i < ra.count; i++) {
		got_c += ra.msg[i].compute_ns;
		got_t += ra.msg[i].total_ns;
		got_n += ra.msg[i].aggregation;
		CHECK(ra.msg[i].phase - prev == ra.msg[i].aggregation);
		prev = ra.msg[i].phase;
		/* at most one message per period (the final flush excepted) */
		if (i > 0 && i < ra.count - 1)
			CHECK(ra.sent_at[i] - ra.sent_at[i - 1] >= period);
	}
	CHECK(got_c == sc && got_t == st && got_n == 100000);
	CHECK((uint64_t)ra.count <= st / period + 2);
	CHECK(ra.count > 10);	/* and it does not starve either */
}

/* Every aligned send is at a multiple of a power of two K that only grows. */
static void test_alignment(void)
{
	uint64_t sc, st, common = 0, aligned_a = 0;

	drive(&ra, 1000000, 20000, 2000, 1000, 500, &sc, &st);
	for (int i = 0; i < ra.count - 1; i++) {
		CHECK((ra.k[i] & (ra.k[i] - 1)) == 0);
		CHECK(ra.msg[i].phase % ra.k[i] == 0);
		if (i > 0)
			CHECK(ra.k[i] >= ra.k[i - 1]);
	}
	CHECK(ra.k[ra.count - 1] > 1);	/* the rule did have to aggregate */
	/* Rank b: same collectives, different compute, same phase lengths. */
	lcg = 999;
	drive(&rb, 1000000, 20000, 1200, 1800, 500, &sc, &st);
	for (int i = 0; i < ra.count - 1; i++) {
		aligned_a++;
		common += (uint64_t)contains(&rb, ra.msg[i].phase);
	}
	CHECK(aligned_a > 0 && common * 2 >= aligned_a);
	/* aggregation < 2K at send, so phase is a multiple of its top bit */
	for (int i = 1; i < ra.count - 1; i++) {
		uint64_t ag = ra.msg[i].aggregation, top = 1;

		while (top * 2 <= ag)
			top *= 2;
		CHECK(ra.msg[i].phase % top == 0);
	}
}

static void test_cpu_change(void)
{
	struct nrm_phase_agg g;
	struct nrm_phase_msg out[2];
	int n;

	nrm_phase_init(&g, 1000000);
	n = nrm_phase_end(&g, 10, 20, 3, 100, out);	/* phase 1: sends, K=1 */
	CHECK(n == 1 && out[0].cpu == 3 && out[0].phase == 1);
	n = nrm_phase_end(&g, 10, 20, 3, 200, out);	/* too soon: K=2 */
	CHECK(n == 0);
	n = nrm_phase_end(&g, 10, 20, 5, 300, out);	/* migrated: flush cpu 3 */
	CHECK(n == 1 && out[0].cpu == 3 && out[0].aggregation == 1 && out[0].phase == 2);
	n = nrm_phase_end(&g, 10, 20, 5, 400, out);
	CHECK(n == 0);
	CHECK(nrm_phase_flush(&g, &out[0]) == 1);
	CHECK(out[0].cpu == 5 && out[0].aggregation == 2 && out[0].phase == 4);
	CHECK(out[0].compute_ns == 20 && out[0].total_ns == 40);
	CHECK(nrm_phase_flush(&g, &out[0]) == 0);
}

/* One type per message when the phases agree; 0 when an aggregate mixes types. */
static void test_site(void)
{
	struct nrm_phase_agg g;
	struct nrm_phase_msg out[2];
	int n;

	nrm_phase_init(&g, 0);
	n = nrm_phase_end_at(&g, 10, 20, 0, 100, 7, out);
	CHECK(n == 1 && out[0].site == 7);
	n = nrm_phase_end_at(&g, 10, 20, 0, 200, 9, out);
	CHECK(n == 1 && out[0].site == 9);
	nrm_phase_init(&g, 1000000);
	n = nrm_phase_end_at(&g, 10, 20, 0, 100, 7, out);	/* K=1: sends */
	n = nrm_phase_end_at(&g, 10, 20, 0, 200, 7, out);	/* too soon: K=2 */
	n = nrm_phase_end_at(&g, 10, 20, 0, 300, 9, out);
	CHECK(n == 0);
	n = nrm_phase_end_at(&g, 10, 20, 0, 2000000, 9, out);
	CHECK(n == 1 && out[0].aggregation == 3 && out[0].site == 0);
	n = nrm_phase_end(&g, 10, 20, 0, 9000000, out);	/* K=2, one pending */
	n = nrm_phase_end(&g, 10, 20, 0, 9000001, out);
	CHECK(n == 1 && out[0].aggregation == 2 && out[0].site == 0);
}

int main(void)
{
	test_site();
	test_no_ratelimit();
	test_ratelimit_and_totals();
	test_alignment();
	test_cpu_change();
	if (failures) {
		fprintf(stderr, "test_phase: %d failure(s)\n", failures);
		return 1;
	}
	printf("test_phase: ok\n");
	return 0;
}
