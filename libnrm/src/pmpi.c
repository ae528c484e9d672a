/*
 * libnrm-pmpi.so: an MPI profiling-interface (PMPI) interposer, loaded with
 * LD_PRELOAD, that reports per-rank phase timings to nrm.
 *
 * A phase ends at every blocking collective or wait.  Its compute time runs
 * from the return of the previous one to the entry of this one, its total
 * time to the return of this one; the difference is time spent waiting for
 * other ranks, which is what the power policy exploits.  Phases are
 * aggregated and sent at aligned phase counts (see phase.h).
 *
 * Each phase carries its type: a hash of the call site of the collective
 * that ended it (its return address as an offset into the calling object,
 * so that ranks with different load addresses agree), which lets the
 * daemon predict each phase type's need.
 *
 * With NRM_INWAIT_DELAY set the same wrappers also throttle the core of a
 * rank that waits (inwait.h): a call site whose recent waits exceeded the
 * delay arms a timer at entry, and the core is restored at exit.
 *
 * With neither NRM_TRANSMIT (unset or 0, or no NRM_DOWNSTREAM_URI) nor
 * in-wait throttling every wrapper is one predictable branch in front of
 * the PMPI call: no clock reads.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <mpi.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "inwait.h"
#include "nrm.h"
#include "nrm_internal.h"
#include "phase.h"

#if defined(MPI_VERSION) && MPI_VERSION >= 3
#define NRM_MPI_CONST const
#else
#define NRM_MPI_CONST
#endif

static struct {
	int active;		/* on or in-wait throttling: the wrappers do work */
	int on;			/* transmitting phase contexts */
	int inwait;
	int rank;
	int locked;		/* MPI_THREAD_MULTIPLE: collectives may race */
	pthread_mutex_t lock;
	uint64_t last_exit_ns;	/* return of the previous collective */
	uint64_t compute_start_ns;	/* same, or after the send it made */
	struct nrm_phase_agg agg;
	struct nrm_context ctxt;
} g = { .lock = PTHREAD_MUTEX_INITIALIZER };

static inline uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static void emit(const struct nrm_phase_msg *m)
{
	nrm_send_phase_typed(&g.ctxt, g.rank, m->cpu, m->phase, (unsigned long)m->aggregation,
			     m->compute_ns, m->total_ns, m->site);
}

#define SITE_CACHE 16

struct site {
	const void *ret;
	uint64_t id;
	uint8_t waits;		/* in-wait: bit i set when the i-th last wait was long */
};

/*
 * The phase type of a collective called from `ret`: FNV-1a over the
 * calling object's name and the offset of `ret` in it, 48 bits, never 0.
 * dladdr() takes a lock and a search, so the last few sites are cached
 * (a program has few collective call sites), with each site's recent
 * wait history for the in-wait prediction.
 */
static struct site *site_of(const void *ret)
{
	static __thread struct site cache[SITE_CACHE];
	struct site *s = &cache[((uintptr_t)ret >> 2) % SITE_CACHE];
	uint64_t h = 1469598103934665603ULL;
	uintptr_t offset = (uintptr_t)ret;
	Dl_info info;

	if (s->ret == ret && s->id != 0)
		return s;
	if (dladdr(ret, &info) != 0 && info.dli_fbase != NULL) {
		const char *name = info.dli_fname ? strrchr(info.dli_fname, '/') : NULL;

		name = name ? name + 1 : (info.dli_fname ? info.dli_fname : "");
		for (; *name; name++)
			h = (h ^ (unsigned char)*name) * 1099511628211ULL;
		offset -= (uintptr_t)info.dli_fbase;
	}
	for (unsigned i = 0; i < sizeof(offset); i++)
		h = (h ^ ((offset >> (8 * i)) & 0xff)) * 1099511628211ULL;
	s->ret = ret;
	s->id = (h & 0xffffffffffffULL) | 1;
	s->waits = 0;
	return s;
}

/* A wait at `s` entered at `entered` returned; `armed`: nrm_iw_enter armed it. */
static void phase_end(uint64_t entered, struct site *s, int armed)
{
	struct nrm_phase_msg out[2];
	uint64_t left = now_ns();
	uint64_t site = s->id;
	int cpu;
	int count;

	if (armed)
		nrm_iw_leave();
	if (g.inwait)
		s->waits = nrm_iw_learn(s->waits, left - entered, nrm_iw.delay_ns);
	if (!g.on)
		return;
	cpu = sched_getcpu();
	if (g.locked)
		pthread_mutex_lock(&g.lock);
	/* Under MPI_THREAD_MULTIPLE another thread's phase may have ended in
	 * between; clamp rather than report a negative compute time. */
	count = nrm_phase_end_at(&g.agg,
				 entered > g.compute_start_ns ? entered - g.compute_start_ns : 0,
				 left > g.last_exit_ns ? left - g.last_exit_ns : 0,
				 cpu, left, site, out);
	g.last_exit_ns = left;
	g.compute_start_ns = left;
	if (g.locked)
		pthread_mutex_unlock(&g.lock);
	if (count == 0)
		return;
	for (int i = 0; i < count; i++)
		emit(&out[i]);
	/* A send wakes libzmq's I/O thread, which on a busy or bound core can
	 * take the cpu for a while: count that as overhead (in the total, not
	 * in compute), or the policy would take it for application work. */
	if (g.locked)
		pthread_mutex_lock(&g.lock);
	g.compute_start_ns = now_ns();
	if (g.locked)
		pthread_mutex_unlock(&g.lock);
}

static int transmit_requested(void)
{
	const char *t = getenv("NRM_TRANSMIT");

	return t != NULL && *t != '\0' && strcmp(t, "0") != 0;
}

static void start(int provided)
{
	const char *name;

	g.inwait = nrm_iw_init();
	g.active = g.inwait;
	if (!transmit_requested())
		return;
	name = getenv("NRM_APP_NAME");
	if (name == NULL || *name == '\0')
		name = program_invocation_short_name;
	PMPI_Comm_rank(MPI_COMM_WORLD, &g.rank);
	if (nrm_init(&g.ctxt, name) != 0 || !nrm_is_active(&g.ctxt))
		return;
	nrm_phase_init(&g.agg, nrm_ratelimit_from_env());
	g.locked = provided == MPI_THREAD_MULTIPLE;
	g.last_exit_ns = now_ns();
	g.compute_start_ns = g.last_exit_ns;
	g.on = 1;
	g.active = 1;
}

int MPI_Init(int *argc, char ***argv)
{
	int rc = PMPI_Init(argc, argv);

	if (rc == MPI_SUCCESS)
		start(MPI_THREAD_SINGLE);
	return rc;
}

int MPI_Init_thread(int *argc, char ***argv, int required, int *provided)
{
	int rc = PMPI_Init_thread(argc, argv, required, provided);

	if (rc == MPI_SUCCESS)
		start(*provided);
	return rc;
}

int MPI_Finalize(void)
{
	struct nrm_phase_msg m;

	if (g.inwait) {
		g.inwait = 0;
		nrm_iw_fini();
	}
	g.active = 0;
	if (g.on) {
		g.on = 0;
		if (nrm_phase_flush(&g.agg, &m))
			emit(&m);
		/* Before PMPI_Finalize: a rank that dies inside it has still
		 * told the daemon it is done. */
		nrm_fini(&g.ctxt);
	}
	return PMPI_Finalize();
}

#define NRM_PHASE(pcall)                                                \
	do {                                                            \
		struct site *site_;                                     \
		uint64_t entered_;                                      \
		int armed_ = 0;                                         \
		int rc_;                                                \
		if (!g.active)                                          \
			return pcall;                                   \
		entered_ = now_ns();                                    \
		site_ = site_of(__builtin_return_address(0));           \
		if (g.inwait && nrm_iw_predict(site_->waits))           \
			armed_ = nrm_iw_enter();                        \
		rc_ = pcall;                                            \
		phase_end(entered_, site_, armed_);                     \
		return rc_;                                             \
	} while (0)

int MPI_Barrier(MPI_Comm comm)
{
	NRM_PHASE(PMPI_Barrier(comm));
}

int MPI_Bcast(void *buf, int count, MPI_Datatype type, int root, MPI_Comm comm)
{
	NRM_PHASE(PMPI_Bcast(buf, count, type, root, comm));
}

int MPI_Reduce(NRM_MPI_CONST void *sbuf, void *rbuf, int count, MPI_Datatype type,
	       MPI_Op op, int root, MPI_Comm comm)
{
	NRM_PHASE(PMPI_Reduce(sbuf, rbuf, count, type, op, root, comm));
}

int MPI_Allreduce(NRM_MPI_CONST void *sbuf, void *rbuf, int count, MPI_Datatype type,
		  MPI_Op op, MPI_Comm comm)
{
	NRM_PHASE(PMPI_Allreduce(sbuf, rbuf, count, type, op, comm));
}

int MPI_Reduce_scatter(NRM_MPI_CONST void *sbuf, void *rbuf, NRM_MPI_CONST int rcounts[],
		       MPI_Datatype type, MPI_Op op, MPI_Comm comm)
{
	NRM_PHASE(PMPI_Reduce_scatter(sbuf, rbuf, rcounts, type, op, comm));
}

int MPI_Gather(NRM_MPI_CONST void *sbuf, int scount, MPI_Datatype stype, void *rbuf,
	       int rcount, MPI_Datatype rtype, int root, MPI_Comm comm)
{
	NRM_PHASE(PMPI_Gather(sbuf, scount, stype, rbuf, rcount, rtype, root, comm));
}

int MPI_Gatherv(NRM_MPI_CONST void *sbuf, int scount, MPI_Datatype stype, void *rbuf,
		NRM_MPI_CONST int rcounts[], NRM_MPI_CONST int displs[], MPI_Datatype rtype,
		int root, MPI_Comm comm)
{
	NRM_PHASE(PMPI_Gatherv(sbuf, scount, stype, rbuf, rcounts, displs, rtype, root, comm));
}

int MPI_Scatter(NRM_MPI_CONST void *sbuf, int scount, MPI_Datatype stype, void *rbuf,
		int rcount, MPI_Datatype rtype, int root, MPI_Comm comm)
{
	NRM_PHASE(PMPI_Scatter(sbuf, scount, stype, rbuf, rcount, rtype, root, comm));
}

int MPI_Scatterv(NRM_MPI_CONST void *sbuf, NRM_MPI_CONST int scounts[],
		 NRM_MPI_CONST int displs[], MPI_Datatype stype, void *rbuf, int rcount,
		 MPI_Datatype rtype, int root, MPI_Comm comm)
{
	NRM_PHASE(PMPI_Scatterv(sbuf, scounts, displs, stype, rbuf, rcount, rtype, root, comm));
}

int MPI_Allgather(NRM_MPI_CONST void *sbuf, int scount, MPI_Datatype stype, void *rbuf,
		  int rcount, MPI_Datatype rtype, MPI_Comm comm)
{
	NRM_PHASE(PMPI_Allgather(sbuf, scount, stype, rbuf, rcount, rtype, comm));
}

int MPI_Allgatherv(NRM_MPI_CONST void *sbuf, int scount, MPI_Datatype stype, void *rbuf,
		   NRM_MPI_CONST int rcounts[], NRM_MPI_CONST int displs[], MPI_Datatype rtype,
		   MPI_Comm comm)
{
	NRM_PHASE(PMPI_Allgatherv(sbuf, scount, stype, rbuf, rcounts, displs, rtype, comm));
}

int MPI_Alltoall(NRM_MPI_CONST void *sbuf, int scount, MPI_Datatype stype, void *rbuf,
		 int rcount, MPI_Datatype rtype, MPI_Comm comm)
{
	NRM_PHASE(PMPI_Alltoall(sbuf, scount, stype, rbuf, rcount, rtype, comm));
}

int MPI_Alltoallv(NRM_MPI_CONST void *sbuf, NRM_MPI_CONST int scounts[],
		  NRM_MPI_CONST int sdispls[], MPI_Datatype stype, void *rbuf,
		  NRM_MPI_CONST int rcounts[], NRM_MPI_CONST int rdispls[], MPI_Datatype rtype,
		  MPI_Comm comm)
{
	NRM_PHASE(PMPI_Alltoallv(sbuf, scounts, sdispls, stype, rbuf, rcounts, rdispls, rtype,
				 comm));
}

int MPI_Wait(MPI_Request *request, MPI_Status *status)
{
	NRM_PHASE(PMPI_Wait(request, status));
}

int MPI_Waitall(int count, MPI_Request requests[], MPI_Status statuses[])
{
	NRM_PHASE(PMPI_Waitall(count, requests, statuses));
}
