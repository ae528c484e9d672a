/*
 * In-wait throttling (COUNTDOWN-style) for the PMPI interposer.
 *
 * A rank that has waited `delay` inside a collective or blocking wait has
 * its core dropped to a low duty-cycle level until the call returns.  The
 * compute never runs slower, so it costs no time; only the spin of a
 * waiting rank is cut.  A daemon round trip is too slow for this (waits of
 * a millisecond), so the rank does it itself:
 *
 *   entry  arm a one-shot per-thread timer of `delay` (timer_create with
 *          SIGEV_THREAD_ID and a realtime signal);
 *   fire   the signal handler throttles: one pread and one pwrite of
 *          IA32_CLOCK_MODULATION through msr-safe (real hardware), or one
 *          clock read of the thread's cpu time (the emulated node, which
 *          bills that time at the throttled level's power);
 *   exit   disarm; if it fired, restore the register (only if nobody else
 *          changed it meanwhile) or add the throttled time to the rank's
 *          counter file.
 *
 * Arming costs two timer_settime calls (about a microsecond), so a call
 * site is armed only when one of its last eight waits exceeded `delay`
 * (per-thread history next to the call-site cache); short waits cost a
 * table lookup.  The environment nrmd gives the rank chooses the backend
 * (docs/libnrm.md, "In-wait throttling"):
 *
 *   NRM_INWAIT_DELAY     duration before throttling ("500us"); required
 *   NRM_INWAIT_LEVEL     duty-cycle level 1..15 of 16 (default 1)
 *   NRM_INWAIT_MSR_DIR   directory of N/msr_safe (real hardware: /dev/cpu)
 *   NRM_INWAIT_MSR_BITS  bits 4:0 of 0x19A to write (default 0x10 | level)
 *   NRM_INWAIT_COUNTERS  directory for the rank's counter file (emulated)
 *   NRM_INWAIT_SIGNAL    realtime signal number (default SIGRTMIN + 4)
 *
 * In msr mode only a thread whose affinity is one cpu throttles (checked
 * when its timer is made, and the cpu again in the handler): a rank free
 * to migrate could leave a cpu it left throttled under another rank.  A
 * child forked without exec does not throttle.  The handler is installed
 * with SA_RESTART, which does not restart poll, epoll_wait, nanosleep and
 * the like: a wait blocked in one returns EINTR once when its timer fires
 * (MPI progress loops retry).  A program that resets the signal to
 * SIG_DFL would be killed by a queued timer signal; NRM_INWAIT_SIGNAL
 * picks another one.
 *
 * Everything here is self-contained (no MPI), so that nrm build-interposer
 * and a unit test can use it as is.
 */
#ifndef NRM_INWAIT_H
#define NRM_INWAIT_H

#ifndef _GNU_SOURCE
#error "inwait.h needs _GNU_SOURCE defined before the first include (sched_getaffinity)"
#endif

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "nrm_internal.h"

#define NRM_IW_MSR 0x19A		/* IA32_CLOCK_MODULATION */
#define NRM_IW_MSR_MASK 0x1FULL		/* bit 4 enable, bits 3:0 level */
#define NRM_IW_MAX_CPUS 1024
/* Counter file: a 16-byte header, then one slot per thread. */
#define NRM_IW_MAGIC "NRMIW001"
#define NRM_IW_HEADER 16
#define NRM_IW_SLOTS 1024
#define NRM_IW_CHECK 0x6e726d2d69770a01ULL

enum { NRM_IW_OFF = 0, NRM_IW_KIND_MSR = 1, NRM_IW_KIND_COUNTERS = 2 };

/* ---- pure parts (unit tested) ------------------------------------------- */

/* Arm at a call site when any of its last eight waits exceeded the delay. */
static inline int nrm_iw_predict(uint8_t history)
{
	return history != 0;
}

static inline uint8_t nrm_iw_learn(uint8_t history, uint64_t wait_ns, uint64_t delay_ns)
{
	return (uint8_t)((history << 1) | (wait_ns > delay_ns ? 1 : 0));
}

/* One thread's cumulative throttled time, as the emulated node reads it
 * (little-endian on x86).  `check` lets the reader drop a torn slot. */
struct nrm_iw_record {
	uint64_t tid;
	uint64_t level;
	uint64_t cpu_ns;	/* the thread's cpu time while throttled */
	uint64_t wall_ns;	/* wall time while throttled */
	uint64_t waits;		/* throttled waits */
	uint64_t check;
};

static inline void nrm_iw_seal(struct nrm_iw_record *r)
{
	r->check = r->tid ^ r->level ^ r->cpu_ns ^ r->wall_ns ^ r->waits ^ NRM_IW_CHECK;
}

/* The value written to 0x19A: the original outside the mask, `bits` in it. */
static inline uint64_t nrm_iw_throttled(uint64_t original, uint64_t bits)
{
	return (original & ~NRM_IW_MSR_MASK) | (bits & NRM_IW_MSR_MASK);
}

/* ---- process state ------------------------------------------------------- */

static struct {
	int kind;
	uint64_t delay_ns;
	uint64_t level;
	uint64_t bits;
	int sig;
	int fd[NRM_IW_MAX_CPUS];	/* msr_safe per cpu, -1 when not ours */
	off_t off[NRM_IW_MAX_CPUS];
	int counters_fd;
	atomic_uint slots;
	atomic_int warned_unbound;
	pthread_key_t key;
} nrm_iw = { .kind = NRM_IW_OFF };

/* Initial-exec TLS: the signal handler reads it, and a general-dynamic
 * access may allocate.  The interposer is preloaded, so static TLS has it. */
struct nrm_iw_thread {
	int state;		/* 0 no timer yet, 1 timer ready, -1 unusable */
	timer_t timer;
	volatile sig_atomic_t armed;
	volatile sig_atomic_t fired;
	int cpu;		/* whose register the handler wrote, or -1 */
	uint64_t saved, written;
	uint64_t fire_cpu_ns, fire_wall_ns;
	int bound;		/* msr: the one cpu the thread may run on */
	int slot;
	struct nrm_iw_record rec;
};
static __thread struct nrm_iw_thread nrm_iw_t __attribute__((tls_model("initial-exec")));

static inline uint64_t nrm_iw_clock(clockid_t id)
{
	struct timespec ts;

	clock_gettime(id, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static void nrm_iw_warn(const char *what, const char *detail)
{
	fprintf(stderr, "nrm-pmpi: in-wait throttling off: %s%s%s\n", what,
		detail ? ": " : "", detail ? detail : "");
}

/* Async-signal-safe: raw syscalls and TLS only. */
static void nrm_iw_on_timer(int sig, siginfo_t *si, void *uc)
{
	struct nrm_iw_thread *t = &nrm_iw_t;
	int saved_errno = errno;
	unsigned cpu = 0;

	(void)sig;
	(void)uc;
	if (!t->armed || t->fired || si->si_code != SI_TIMER)
		goto out;
	t->fired = 1;
	if (nrm_iw.kind == NRM_IW_KIND_MSR) {
		uint64_t cur, val;
		int fd;

		/* Only a thread bound to one cpu throttles: one that migrated
		 * mid-wait would leave the old cpu slow under another rank. */
		if (syscall(SYS_getcpu, &cpu, NULL, NULL) != 0 || (int)cpu != t->bound)
			goto out;
		fd = nrm_iw.fd[cpu];
		if (fd < 0 || pread(fd, &cur, 8, nrm_iw.off[cpu]) != 8)
			goto out;
		val = nrm_iw_throttled(cur, nrm_iw.bits);
		if (pwrite(fd, &val, 8, nrm_iw.off[cpu]) != 8)
			goto out;
		t->saved = cur;
		t->written = val;
		t->cpu = (int)cpu;
	} else {
		t->fire_wall_ns = nrm_iw_clock(CLOCK_MONOTONIC);
		t->fire_cpu_ns = nrm_iw_clock(CLOCK_THREAD_CPUTIME_ID);
	}
out:
	errno = saved_errno;
}

static void nrm_iw_thread_exit(void *arg)
{
	(void)arg;
	if (nrm_iw_t.state == 1)
		timer_delete(nrm_iw_t.timer);
	nrm_iw_t.state = -1;
}

static void nrm_iw_close_all(void)
{
	for (int c = 0; c < NRM_IW_MAX_CPUS; c++) {
		if (nrm_iw.fd[c] >= 0)
			close(nrm_iw.fd[c]);
		nrm_iw.fd[c] = -1;
	}
	if (nrm_iw.counters_fd >= 0)
		close(nrm_iw.counters_fd);
	nrm_iw.counters_fd = -1;
}

/* A child forked without exec does not throttle: it has no timers, and
 * its threads' counter slots are its parent's (same file, same numbers). */
static void nrm_iw_after_fork(void)
{
	nrm_iw.kind = NRM_IW_OFF;
	nrm_iw_close_all();
	nrm_iw_t.armed = 0;
	nrm_iw_t.fired = 0;
	nrm_iw_t.state = -1;
}

/* The one cpu the calling thread may run on, or -1. */
static int nrm_iw_single_cpu(void)
{
	cpu_set_t set;
	int cpu = -1;

	if (sched_getaffinity(0, sizeof(set), &set) != 0 || CPU_COUNT(&set) != 1)
		return -1;
	for (int c = 0; c < CPU_SETSIZE && cpu < 0; c++)
		if (CPU_ISSET(c, &set))
			cpu = c;
	return cpu;
}

static int nrm_iw_thread_init(struct nrm_iw_thread *t)
{
	struct sigevent sev;

	if (t->state != 0)
		return t->state == 1;
	t->state = -1;
	if (nrm_iw.kind == NRM_IW_KIND_MSR) {
		t->bound = nrm_iw_single_cpu();
		if (t->bound < 0 || t->bound >= NRM_IW_MAX_CPUS || nrm_iw.fd[t->bound] < 0) {
			if (atomic_exchange(&nrm_iw.warned_unbound, 1) == 0)
				nrm_iw_warn("a thread not bound to one cpu with a writable "
					    "msr_safe does not throttle (bind ranks to cores)",
					    NULL);
			return 0;
		}
	}
	memset(&sev, 0, sizeof(sev));
	sev.sigev_notify = SIGEV_THREAD_ID;
	sev.sigev_signo = nrm_iw.sig;
#ifdef sigev_notify_thread_id
	sev.sigev_notify_thread_id = (pid_t)syscall(SYS_gettid);
#else
	sev._sigev_un._tid = (pid_t)syscall(SYS_gettid);
#endif
	if (timer_create(CLOCK_MONOTONIC, &sev, &t->timer) != 0)
		return 0;
	t->cpu = -1;
	t->slot = -1;
	if (nrm_iw.kind == NRM_IW_KIND_COUNTERS) {
		unsigned slot = atomic_fetch_add(&nrm_iw.slots, 1);

		if (slot >= NRM_IW_SLOTS) {
			timer_delete(t->timer);
			return 0;
		}
		t->slot = (int)slot;
		memset(&t->rec, 0, sizeof(t->rec));
		t->rec.tid = (uint64_t)syscall(SYS_gettid);
		t->rec.level = nrm_iw.level;
	}
	pthread_setspecific(nrm_iw.key, t);
	t->state = 1;
	return 1;
}

/* Call at a throttleable wait's entry; returns whether the timer is armed. */
static inline int nrm_iw_enter(void)
{
	struct nrm_iw_thread *t = &nrm_iw_t;
	struct itimerspec its;

	if (t->armed || (t->state != 1 && !nrm_iw_thread_init(t)))
		return 0;
	memset(&its, 0, sizeof(its));
	its.it_value.tv_sec = (time_t)(nrm_iw.delay_ns / 1000000000ULL);
	its.it_value.tv_nsec = (long)(nrm_iw.delay_ns % 1000000000ULL);
	t->fired = 0;
	t->armed = 1;
	atomic_signal_fence(memory_order_seq_cst);
	if (timer_settime(t->timer, 0, &its, NULL) != 0) {
		t->armed = 0;
		return 0;
	}
	return 1;
}

/* Call at the exit of a wait that nrm_iw_enter armed. */
static inline void nrm_iw_leave(void)
{
	static const struct itimerspec zero;
	struct nrm_iw_thread *t = &nrm_iw_t;

	/* A signal that arrives after this is a no-op in the handler. */
	t->armed = 0;
	atomic_signal_fence(memory_order_seq_cst);
	if (!t->fired) {
		timer_settime(t->timer, 0, &zero, NULL);
		return;
	}
	t->fired = 0;
	if (nrm_iw.kind == NRM_IW_KIND_MSR) {
		int cpu = t->cpu;
		uint64_t cur;

		t->cpu = -1;
		/* Put the original back unless someone (nrmd's policy) wrote
		 * the register since: then theirs is the value to keep. */
		if (cpu >= 0 && pread(nrm_iw.fd[cpu], &cur, 8, nrm_iw.off[cpu]) == 8 &&
		    cur == t->written)
			(void)!pwrite(nrm_iw.fd[cpu], &t->saved, 8, nrm_iw.off[cpu]);
		return;
	}
	if (t->slot < 0)
		return;
	/* The thread's cpu clock, then the wall clock: the handler read them
	 * in the other order, so the cpu time never exceeds the wall time. */
	uint64_t cpu_now = nrm_iw_clock(CLOCK_THREAD_CPUTIME_ID);
	uint64_t wall_now = nrm_iw_clock(CLOCK_MONOTONIC);

	t->rec.cpu_ns += cpu_now - t->fire_cpu_ns;
	t->rec.wall_ns += wall_now > t->fire_wall_ns ? wall_now - t->fire_wall_ns : 0;
	t->rec.waits++;
	nrm_iw_seal(&t->rec);
	(void)!pwrite(nrm_iw.counters_fd, &t->rec, sizeof(t->rec),
		      NRM_IW_HEADER + (off_t)t->slot * (off_t)sizeof(t->rec));
}

/* ---- set-up --------------------------------------------------------------- */

static int nrm_iw_open_msr(const char *dir)
{
	cpu_set_t set;
	int opened = 0;
	char path[4096];

	if (sched_getaffinity(0, sizeof(set), &set) != 0)
		CPU_ZERO(&set);
	for (int c = 0; c < NRM_IW_MAX_CPUS && c < CPU_SETSIZE; c++) {
		struct stat st;
		uint64_t v;
		int fd;

		if (!CPU_ISSET(c, &set))
			continue;
		snprintf(path, sizeof(path), "%s/%d/msr_safe", dir, c);
		fd = open(path, O_RDWR | O_CLOEXEC);
		if (fd < 0)
			continue;
		/* A regular file stands in for a device in tests: one 8-byte
		 * slot per register at 8 x register, as nrm.hw reads it. */
		nrm_iw.off[c] = (fstat(fd, &st) == 0 && S_ISREG(st.st_mode)) ?
			(off_t)NRM_IW_MSR * 8 : (off_t)NRM_IW_MSR;
		/* Writing back the value just read changes nothing, and
		 * fails now rather than in a wait when msr-safe's allowlist
		 * does not let 0x19A be written. */
		if (pread(fd, &v, 8, nrm_iw.off[c]) != 8 ||
		    pwrite(fd, &v, 8, nrm_iw.off[c]) != 8) {
			close(fd);
			continue;
		}
		nrm_iw.fd[c] = fd;
		opened++;
	}
	return opened;
}

static int nrm_iw_open_counters(const char *dir)
{
	char path[4096];
	char header[NRM_IW_HEADER] = NRM_IW_MAGIC;
	uint64_t slot = sizeof(struct nrm_iw_record);
	int fd;

	snprintf(path, sizeof(path), "%s/%ld", dir, (long)getpid());
	fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0644);
	if (fd < 0)
		return -1;
	memcpy(header + 8, &slot, 8);
	if (pwrite(fd, header, sizeof(header), 0) != (ssize_t)sizeof(header)) {
		close(fd);
		return -1;
	}
	return fd;
}

static int nrm_iw_signal_free(int sig)
{
	struct sigaction old;

	if (sigaction(sig, NULL, &old) != 0)
		return 0;
	if (old.sa_flags & SA_SIGINFO)
		return old.sa_sigaction == NULL || old.sa_sigaction == nrm_iw_on_timer;
	return old.sa_handler == SIG_DFL || old.sa_handler == SIG_IGN;
}

/* Read the environment; returns 1 when in-wait throttling is on. */
static int nrm_iw_init(void)
{
	const char *delay = getenv("NRM_INWAIT_DELAY");
	const char *level = getenv("NRM_INWAIT_LEVEL");
	const char *msr = getenv("NRM_INWAIT_MSR_DIR");
	const char *bits = getenv("NRM_INWAIT_MSR_BITS");
	const char *counters = getenv("NRM_INWAIT_COUNTERS");
	const char *sig = getenv("NRM_INWAIT_SIGNAL");
	struct sigaction sa;
	char *end;

	if (delay == NULL || *delay == '\0')
		return 0;
	for (int c = 0; c < NRM_IW_MAX_CPUS; c++)
		nrm_iw.fd[c] = -1;
	nrm_iw.counters_fd = -1;
	if (nrm_parse_duration_ns(delay, &nrm_iw.delay_ns) != 0 || nrm_iw.delay_ns == 0) {
		nrm_iw_warn("invalid NRM_INWAIT_DELAY (want e.g. 500us)", delay);
		return 0;
	}
	nrm_iw.level = 1;
	if (level && *level) {
		long v = strtol(level, &end, 10);

		if (*end != '\0' || v < 1 || v > 15) {
			nrm_iw_warn("NRM_INWAIT_LEVEL must be 1..15", level);
			return 0;
		}
		nrm_iw.level = (uint64_t)v;
	}
	nrm_iw.bits = 0x10 | nrm_iw.level;
	if (bits && *bits) {
		unsigned long v = strtoul(bits, &end, 0);

		if (*end != '\0' || (v & ~NRM_IW_MSR_MASK) || !(v & 0x10)) {
			nrm_iw_warn("NRM_INWAIT_MSR_BITS must set bit 4 and fit 0x1f", bits);
			return 0;
		}
		nrm_iw.bits = v;
	}
	nrm_iw.sig = SIGRTMIN + 4;
	if (sig && *sig) {
		long v = strtol(sig, &end, 10);

		if (*end != '\0' || v < SIGRTMIN || v > SIGRTMAX) {
			nrm_iw_warn("NRM_INWAIT_SIGNAL must be a realtime signal number", sig);
			return 0;
		}
		nrm_iw.sig = (int)v;
	}
	if (!nrm_iw_signal_free(nrm_iw.sig)) {
		nrm_iw_warn("the program handles NRM_INWAIT_SIGNAL's signal already", NULL);
		return 0;
	}
	if (msr && *msr) {
		if (nrm_iw_open_msr(msr) == 0) {
			nrm_iw_warn("no writable msr_safe for this process's cpus under", msr);
			return 0;
		}
		nrm_iw.kind = NRM_IW_KIND_MSR;
	} else if (counters && *counters) {
		nrm_iw.counters_fd = nrm_iw_open_counters(counters);
		if (nrm_iw.counters_fd < 0) {
			nrm_iw_warn("cannot create a counter file in", counters);
			return 0;
		}
		nrm_iw.kind = NRM_IW_KIND_COUNTERS;
	} else {
		nrm_iw_warn("neither NRM_INWAIT_MSR_DIR nor NRM_INWAIT_COUNTERS is set", NULL);
		return 0;
	}
	if (pthread_key_create(&nrm_iw.key, nrm_iw_thread_exit) != 0) {
		nrm_iw.kind = NRM_IW_OFF;
		nrm_iw_close_all();
		return 0;
	}
	pthread_atfork(NULL, NULL, nrm_iw_after_fork);
	memset(&sa, 0, sizeof(sa));
	sa.sa_sigaction = nrm_iw_on_timer;
	sa.sa_flags = SA_SIGINFO | SA_RESTART;
	sigemptyset(&sa.sa_mask);
	/* Installed for good: a timer signal still queued after the last
	 * disarm must never meet the default action (terminate). */
	if (sigaction(nrm_iw.sig, &sa, NULL) != 0) {
		nrm_iw.kind = NRM_IW_OFF;
		nrm_iw_close_all();
		return 0;
	}
	return 1;
}

/* MPI_Finalize: the calling thread's timer goes; the handler stays. */
static inline void nrm_iw_fini(void)
{
	if (nrm_iw_t.state == 1) {
		timer_delete(nrm_iw_t.timer);
		nrm_iw_t.state = -1;
	}
}

#endif
