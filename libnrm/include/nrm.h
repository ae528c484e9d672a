/*
 * libnrm: report application progress and phase timings to the node
 * resource manager (nrm).  See docs/libnrm.md for the full description.
 *
 * The library is inactive when NRM_DOWNSTREAM_URI is not set in the
 * environment: every call then returns 0 and does nothing, so an
 * instrumented program runs unchanged outside nrm.
 *
 * Thread safety: every call may be made from any thread; calls on one
 * context are serialized by a mutex inside the library.  No call ever
 * blocks the application on the daemon, except nrm_fini, which waits at
 * most NRM_LINGER (default 1 s) for its last messages to leave.
 */
#ifndef NRM_H
#define NRM_H

#include <time.h>

#ifdef __cplusplus
extern "C" {
#endif

#define NRM_VERSION_MAJOR 1
#define NRM_VERSION_MINOR 0

/*
 * Programs of the seed era allocate this structure themselves
 * (`struct nrm_context ctxt; nrm_init(&ctxt, "app");`), so its size and
 * member names are kept exactly as they were.  The members are private to
 * the library: `context` now holds the library's own state, `socket` the
 * ZeroMQ socket, `time` the last progress send, `acc` the progress
 * accumulated since then.
 */
struct nrm_context {
	void *context;
	void *socket;
	char *container_uuid;
	char *app_uuid;
	struct timespec time;
	unsigned long acc;
};

/*
 * Connect to $NRM_DOWNSTREAM_URI and announce the program under `app_name`.
 * The context may be uninitialized memory.  Returns 0 (also when inactive)
 * or -1 with errno set; a context whose init failed is inactive.
 */
int nrm_init(struct nrm_context *ctxt, const char *app_name);

/*
 * Send the progress accumulated by rate limiting and the exit message,
 * then release everything.  Waits at most NRM_LINGER for delivery.
 */
int nrm_fini(struct nrm_context *ctxt);

/*
 * Add `progress` to the application's progress counter.  At most one
 * message per NRM_RATELIMIT period leaves; calls in between accumulate, so
 * the daemon's total always equals the sum of the calls.
 */
int nrm_send_progress(struct nrm_context *ctxt, unsigned long progress);

/*
 * Seed-era call: one phase that computed from startCompute to endCompute
 * and waited from startBarrier to endBarrier (ns, any common clock) on
 * `cpu`.  Sent as one phase_context with aggregation 1.
 */
int nrm_send_phase_context(struct nrm_context *ctxt, int cpu,
			   unsigned long long startCompute,
			   unsigned long long endCompute,
			   unsigned long long startBarrier,
			   unsigned long long endBarrier);

/*
 * `aggregation` phases ended on `cpu`, computing `computetime` ns and
 * lasting `totaltime` ns in total; `phase` is the caller's cumulative
 * phase count after them, `rank` its MPI rank (or -1).  Not rate limited:
 * the caller aggregates (the PMPI interposer does).
 */
int nrm_send_phase_aggregate(struct nrm_context *ctxt, int rank, int cpu,
			     unsigned long long phase,
			     unsigned long aggregation,
			     unsigned long long computetime,
			     unsigned long long totaltime);

/*
 * The same, for phases of one type: `site` identifies the call site of
 * the collective that ended them (0: unknown or mixed, the field is then
 * omitted); the same collective must give every rank the same value.
 */
int nrm_send_phase_typed(struct nrm_context *ctxt, int rank, int cpu,
			 unsigned long long phase,
			 unsigned long aggregation,
			 unsigned long long computetime,
			 unsigned long long totaltime,
			 unsigned long long site);

/*
 * A performance counter reading: `payload` occurrences of `event` (for
 * example "instructions") over `interval` seconds.
 */
int nrm_send_performance(struct nrm_context *ctxt, const char *event,
			 double payload, double interval);

/*
 * Send accumulated progress now, ignoring the rate limit (for programs
 * that report rarely and then pause for a long time).
 */
int nrm_flush(struct nrm_context *ctxt);

/* 1 when the context talks to a daemon, 0 when inactive. */
int nrm_is_active(const struct nrm_context *ctxt);

/*
 * Heap-allocated contexts for language bindings (Fortran) that cannot
 * size the structure; free with nrm_ctxt_delete after nrm_fini.
 */
struct nrm_context *nrm_ctxt_create(void);
void nrm_ctxt_delete(struct nrm_context *ctxt);

#ifdef __cplusplus
}
#endif

#endif /* NRM_H */
