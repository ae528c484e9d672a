/*
 * Phase aggregation of the PMPI interposer, kept free of MPI and of clocks
 * so that a unit test can drive it with made-up timings.
 *
 * Messages leave only at cumulative phase counts that are multiples of K,
 * a power of two that starts at 1 and doubles whenever a message would
 * leave sooner than one rate-limit period after the previous one.  Ranks
 * that go through the same collectives therefore report at phase counts
 * that line up (every multiple of a larger K is a multiple of a smaller
 * one), which is what lets the daemon compare ranks phase by phase.
 */
#ifndef NRM_PHASE_H
#define NRM_PHASE_H

#include <stdint.h>

struct nrm_phase_agg {
	uint64_t period_ns;	/* rate limit; 0 sends every phase */
	uint64_t k;		/* power of two, only grows */
	uint64_t phases;	/* cumulative phases ended, sent or pending */
	uint64_t last_send_ns;	/* 0 before the first aligned send */
	uint64_t n;		/* phases in the pending aggregate */
	uint64_t compute_ns;
	uint64_t total_ns;
	int cpu;		/* cpu of the pending aggregate */
	uint64_t site;		/* phase type of the pending aggregate, 0: mixed */
};

struct nrm_phase_msg {
	uint64_t phase;
	uint64_t aggregation;
	uint64_t compute_ns;
	uint64_t total_ns;
	int cpu;
	uint64_t site;		/* the call site every phase ended at, or 0 */
};

static inline void nrm_phase_init(struct nrm_phase_agg *a, uint64_t period_ns)
{
	a->period_ns = period_ns;
	a->k = 1;
	a->phases = 0;
	a->last_send_ns = 0;
	a->n = 0;
	a->compute_ns = 0;
	a->total_ns = 0;
	a->cpu = -1;
	a->site = 0;
}

static inline void nrm_phase_take(struct nrm_phase_agg *a, struct nrm_phase_msg *m)
{
	m->phase = a->phases;
	m->aggregation = a->n;
	m->compute_ns = a->compute_ns;
	m->total_ns = a->total_ns;
	m->cpu = a->cpu;
	m->site = a->site;
	a->n = 0;
	a->compute_ns = 0;
	a->total_ns = 0;
}

/*
 * One phase, of type `site` (0: unknown), ended on `cpu` at time `now`.  Fills out[] with the messages to
 * send (0, 1, or 2 when a cpu change forces the old aggregate out first)
 * and returns their count.  A cpu-change flush is not rate limited and
 * does not move the rate-limit clock: migrations are rare, and mixing two
 * cpus in one aggregate would credit one core with another's timings.
 */
static inline int nrm_phase_end_at(struct nrm_phase_agg *a, uint64_t compute_ns,
				   uint64_t total_ns, int cpu, uint64_t now, uint64_t site,
				   struct nrm_phase_msg out[2])
{
	int count = 0;

	if (a->n > 0 && cpu != a->cpu)
		nrm_phase_take(a, &out[count++]);
	/* An aggregate of phases that ended at different sites has no type. */
	a->site = (a->n == 0 || a->site == site) ? site : 0;
	a->n++;
	a->compute_ns += compute_ns;
	a->total_ns += total_ns;
	a->cpu = cpu;
	a->phases++;
	if ((a->phases & (a->k - 1)) != 0)
		return count;
	if (a->last_send_ns == 0 || now - a->last_send_ns >= a->period_ns) {
		nrm_phase_take(a, &out[count++]);
		a->last_send_ns = now;
	} else if (a->k < (UINT64_C(1) << 62)) {
		a->k <<= 1;
	}
	return count;
}

/* A phase of unknown type. */
static inline int nrm_phase_end(struct nrm_phase_agg *a, uint64_t compute_ns,
				uint64_t total_ns, int cpu, uint64_t now,
				struct nrm_phase_msg out[2])
{
	return nrm_phase_end_at(a, compute_ns, total_ns, cpu, now, 0, out);
}

/* Whatever is pending, aligned or not (MPI_Finalize). */
static inline int nrm_phase_flush(struct nrm_phase_agg *a, struct nrm_phase_msg *m)
{
	if (a->n == 0)
		return 0;
	nrm_phase_take(a, m);
	return 1;
}

#endif
