/*
 * In-wait throttling (COUNTDOWN-style) for the PMPI interposer.
 *
 * A rank that has waited `delay` inside a collective or blocking wait has
 * its core dropped to a low duty-cycle level, its frequency to a low ratio,
 * or both, until the call returns.  The
 * compute never runs slower, so it costs no time; only the spin of a
 * waiting rank is cut.  A daemon round trip is too slow for this (waits of
 * a millisecond), so the rank does it itself:
 *
 *   entry  arm a one-shot per-thread timer of `delay` (timer_create with
 *          SIGEV_THREAD_ID and a realtime signal);
 *   fire   the signal handler throttles: one pread and one pwrite of
 *          IA32_CLOCK_MODULATION (0x19A, the duty cycle) and/or of
 *          IA32_PERF_CTL (0x199, the target ratio) through msr-safe (real
 *          hardware), or one clock read of the thread's cpu time (the
 *          emulated node, which bills that time at the throttled
 *          setting's power);
 *   exit   disarm; if it fired, restore each register written (only if
 *          nobody else changed it meanwhile) or add the throttled time to
 *          the rank's counter file.
 *
 * Arming costs two timer_settime calls (about a microsecond), so a call
 * site is armed only when one of its last eight waits exceeded `delay`
 * (per-thread history next to the call-site cache); short waits cost a
 * table lookup.  The environment nrmd gives the rank chooses the backend
 * (docs/libnrm.md, "In-wait throttling"):
 *
 *   NRM_INWAIT_DELAY     duration before throttling ("500us"); required
 *   NRM_INWAIT_LEVEL     duty-cycle level 1..16 of 16 (default 1); 16 leaves
 *                        the duty cycle as it is (0x19A never touched)
 *   NRM_INWAIT_PERF_CTL  bits 15:8 of 0x199 to write, the target ratio
 *                        ("0x0800": ratio 8), never raising the current
 *                        one; unset: the frequency stays
 *   NRM_INWAIT_MSR_DIR   directory of N/msr_safe (real hardware: /dev/cpu)
 *   NRM_INWAIT_MSR_BITS  bits 4:0 of 0x19A to write (default 0x10 | level;
 *                        only with a level below 16)
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
#define NRM_IW_PERF 0x199		/* IA32_PERF_CTL */
#define NRM_IW_PERF_MASK 0xFF00ULL	/* bits 15:8 target ratio */
#define NRM_IW_LEVELS 16		/* level 16: duty cycle unchanged */
#define NRM_IW_MAX_CPUS 1024
/* Counter file: a 16-byte header, then one slot per thread. */
#define NRM_IW_MAGIC "NRMIW001"
#define NRM_IW_HEADER 16
#define NRM_IW_SLOTS 1024
#define NRM_IW_CHECK 0x6e726d2d69770a01ULL

enum { NRM_IW_OFF = 0, NRM_IW_KIND_MSR = 1, NRM_IW_KIND_COUNTERS = 2 };
/* Which registers a thread's handler wrote (nrm_iw_thread.did). */
enum { NRM_IW_DID_MOD = 1, NRM_IW_DID_PERF = 2 };

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

/* The value written to 0x199: the original outside bits 15:8, `bits` in them. */
static inline uint64_t nrm_iw_slowed(uint64_t original, uint64_t bits)
{
	return (original & ~NRM_IW_PERF_MASK) | (bits & NRM_IW_PERF_MASK);
}

/* ---- process state ------------------------------------------------------- */

static struct {
	int kind;
	uint64_t delay_ns;
	uint64_t level;
	uint64_t bits;
	uint64_t perf_bits;
	int mod;			/* write 0x19A (a level below 16) */
	int perf;			/* write 0x199 (NRM_INWAIT_PERF_CTL) */
	int sig;
	int fd[NRM_IW_MAX_CPUS];	/* msr_safe per cpu, -1 when not ours */
	off_t off[NRM_IW_MAX_CPUS];	/* of 0x19A */
	off_t perf_off[NRM_IW_MAX_CPUS];	/* of 0x199 */
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
	int cpu;		/* whose registers the handler wrote, or -1 */
	int did;		/* NRM_IW_DID_*: which ones */
	uint64_t saved, written;	/* 0x19A */
	uint64_t perf_saved, perf_written;	/* 0x199 */
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
		int fd, did = 0;

		/* Only a thread bound to one cpu throttles: one that migrated
		 * mid-wait would leave the old cpu slow under another rank. */
		if (syscall(SYS_getcpu, &cpu, NULL, NULL) != 0 || (int)cpu != t->bound)
			goto out;
		fd = nrm_iw.fd[cpu];
		if (fd < 0)
			goto out;
		if (nrm_iw.mod && pread(fd, &cur, 8, nrm_iw.off[cpu]) == 8) {
			val = nrm_iw_throttled(cur, nrm_iw.bits);
			if (pwrite(fd, &val, 8, nrm_iw.off[cpu]) == 8) {
				t->saved = cur;
				t->written = val;
				did |= NRM_IW_DID_MOD;
			}
		}
		/* The in-wait ratio never raises the core's: one already at or
		 * below it is left alone. */
		if (nrm_iw.perf && pread(fd, &cur, 8, nrm_iw.perf_off[cpu]) == 8 &&
		    (cur & NRM_IW_PERF_MASK) > nrm_iw.perf_bits) {
			val = nrm_iw_slowed(cur, nrm_iw.perf_bits);
			if (pwrite(fd, &val, 8, nrm_iw.perf_off[cpu]) == 8) {
				t->perf_saved = cur;
				t->perf_written = val;
				did |= NRM_IW_DID_PERF;
			}
		}
		if (did) {
			t->did = did;
			t->cpu = (int)cpu;
		}
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
	t->did = 0;
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
		int cpu = t->cpu, did = t->did;
		uint64_t cur;

		t->cpu = -1;
		t->did = 0;
		if (cpu < 0)
			return;
		/* Put each original back unless someone (nrmd's policy, the
		 * cpufreq driver) wrote the register since: then theirs is the
		 * value to keep. */
		if ((did & NRM_IW_DID_MOD) &&
		    pread(nrm_iw.fd[cpu], &cur, 8, nrm_iw.off[cpu]) == 8 && cur == t->written)
			(void)!pwrite(nrm_iw.fd[cpu], &t->saved, 8, nrm_iw.off[cpu]);
		if ((did & NRM_IW_DID_PERF) &&
		    pread(nrm_iw.fd[cpu], &cur, 8, nrm_iw.perf_off[cpu]) == 8 &&
		    cur == t->perf_written)
			(void)!pwrite(nrm_iw.fd[cpu], &t->perf_saved, 8, nrm_iw.perf_off[cpu]);
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

/* Writing back the value just read changes nothing, and fails now rather
 * than in a wait when msr-safe's allowlist does not let `off` be written. */
static int nrm_iw_writable(int fd, off_t off)
{
	uint64_t v;

	return pread(fd, &v, 8, off) == 8 && pwrite(fd, &v, 8, off) == 8;
}

/* Open msr_safe of this process's cpus: those where every register the
 * setting writes can be written back.  A cpu that refuses 0x199 turns the
 * frequency form off for the process (one warning): with a level below 16
 * the duty cycle goes on alone, else nothing is left to throttle. */
static int nrm_iw_open_msr(const char *dir)
{
	cpu_set_t set;
	int opened = 0, perf_refused = 0;
	char path[4096];

	if (sched_getaffinity(0, sizeof(set), &set) != 0)
		CPU_ZERO(&set);
	for (int c = 0; c < NRM_IW_MAX_CPUS && c < CPU_SETSIZE; c++) {
		struct stat st;
		off_t stride;
		int fd;

		if (!CPU_ISSET(c, &set))
			continue;
		snprintf(path, sizeof(path), "%s/%d/msr_safe", dir, c);
		fd = open(path, O_RDWR | O_CLOEXEC);
		if (fd < 0)
			continue;
		/* A regular file stands in for a device in tests: one 8-byte
		 * slot per register at 8 x register, as nrm.hw reads it. */
		stride = (fstat(fd, &st) == 0 && S_ISREG(st.st_mode)) ? 8 : 1;
		nrm_iw.off[c] = (off_t)NRM_IW_MSR * stride;
		nrm_iw.perf_off[c] = (off_t)NRM_IW_PERF * stride;
		if (nrm_iw.mod && !nrm_iw_writable(fd, nrm_iw.off[c])) {
			close(fd);
			continue;
		}
		if (nrm_iw.perf && !nrm_iw_writable(fd, nrm_iw.perf_off[c])) {
			perf_refused++;
			if (!nrm_iw.mod) {
				close(fd);
				continue;
			}
		}
		nrm_iw.fd[c] = fd;
		opened++;
	}
	if (nrm_iw.perf && perf_refused) {
		nrm_iw.perf = 0;
		fprintf(stderr, "nrm-pmpi: in-wait frequency off: msr_safe under %s refuses "
			"writes of IA32_PERF_CTL (0x199; msr-safe allowlist mask 0xFF00)%s\n",
			dir, nrm_iw.mod ? "; the duty cycle alone is throttled" : "");
		if (!nrm_iw.mod) {
			nrm_iw_close_all();
			return -1;
		}
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
	const char *perf = getenv("NRM_INWAIT_PERF_CTL");
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

		if (*end != '\0' || v < 1 || v > NRM_IW_LEVELS) {
			nrm_iw_warn("NRM_INWAIT_LEVEL must be 1..16 (16: duty cycle unchanged)",
				    level);
			return 0;
		}
		nrm_iw.level = (uint64_t)v;
	}
	nrm_iw.mod = nrm_iw.level < NRM_IW_LEVELS;
	nrm_iw.bits = 0x10 | nrm_iw.level;
	if (perf && *perf) {
		unsigned long v = strtoul(perf, &end, 0);

		if (*end != '\0' || v == 0 || (v & ~NRM_IW_PERF_MASK)) {
			nrm_iw_warn("NRM_INWAIT_PERF_CTL must be a ratio in bits 15:8 "
				    "(e.g. 0x0800)", perf);
			return 0;
		}
		nrm_iw.perf_bits = v;
		nrm_iw.perf = 1;
	}
	if (nrm_iw.mod && bits && *bits) {
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
		int opened;

		if (!nrm_iw.mod && !nrm_iw.perf) {
			nrm_iw_warn("NRM_INWAIT_LEVEL=16 (duty cycle unchanged) without "
				    "NRM_INWAIT_PERF_CTL leaves nothing to throttle", NULL);
			return 0;
		}
		opened = nrm_iw_open_msr(msr);
		if (opened == 0)
			nrm_iw_warn("no writable msr_safe for this process's cpus under", msr);
		if (opened <= 0)
			return 0;
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
