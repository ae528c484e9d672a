/*
 * In-wait throttling's frequency form (src/inwait.h, NRM_INWAIT_PERF_CTL)
 * without MPI: a real timer, signal and handler against a fake msr file of
 * this thread's cpu (a regular file: one 8-byte slot per register at 8 x
 * register).  Each case runs in a child of its own, since the interposer
 * reads its environment once per process:
 *
 *   dvfs      level 16 + a ratio: 0x199 slowed in the wait and restored,
 *             0x19A (its neighbour) never changed; a value someone else
 *             wrote into 0x199 during the wait is kept; a core already
 *             slower is not raised;
 *   combined  level 1 + a ratio: both written and both restored, each by
 *             its own rule (one changed by someone else, the other not);
 *   refused   msr_safe that refuses writes (/dev/full): the frequency form
 *             is off with one warning line and nothing is throttled;
 *   nothing   level 16 without a ratio: off, 0x19A untouched;
 *   counters  level 16 is a level the emulated backend takes.
 */
#define _GNU_SOURCE
#include "../src/inwait.h"

#include <sys/stat.h>
#include <sys/wait.h>

#include "check.h"

#define MOD_ORIGINAL 0x1234500ULL		/* modulation off, other bits set */
#define PERF_ORIGINAL 0x100001A05ULL		/* ratio 0x1A, bits 32 and 2:0 set */

static char dir[] = "/tmp/nrm-inwait-freq-XXXXXX";
static char path[8192];
static int cpu;

static uint64_t get(uint32_t reg)
{
	uint64_t v = 0;
	int fd = open(path, O_RDONLY);

	if (fd >= 0 && pread(fd, &v, 8, 8 * (off_t)reg) != 8)
		v = 0;
	if (fd >= 0)
		close(fd);
	return v;
}

static void set(uint32_t reg, uint64_t v)
{
	int fd = open(path, O_WRONLY);

	CHECK(fd >= 0 && pwrite(fd, &v, 8, 8 * (off_t)reg) == 8);
	if (fd >= 0)
		close(fd);
}

static void reset(void)
{
	set(NRM_IW_MSR, MOD_ORIGINAL);
	set(NRM_IW_PERF, PERF_ORIGINAL);
}

static void spin_until_fired(void)
{
	uint64_t end = nrm_iw_clock(CLOCK_MONOTONIC) + 2000000000ULL;

	while (!nrm_iw_t.fired && nrm_iw_clock(CLOCK_MONOTONIC) < end)
		;
}

static int stderr_lines(const char *file)
{
	char buf[4096];
	int n = 0, fd = open(file, O_RDONLY);
	ssize_t r;

	if (fd < 0)
		return -1;
	while ((r = read(fd, buf, sizeof(buf))) > 0)
		for (ssize_t i = 0; i < r; i++)
			n += buf[i] == '\n';
	close(fd);
	return n;
}

static void env(const char *level, const char *perf, const char *msr, const char *counters)
{
	unsetenv("NRM_INWAIT_LEVEL");
	unsetenv("NRM_INWAIT_PERF_CTL");
	unsetenv("NRM_INWAIT_MSR_DIR");
	unsetenv("NRM_INWAIT_MSR_BITS");
	unsetenv("NRM_INWAIT_COUNTERS");
	setenv("NRM_INWAIT_DELAY", "100us", 1);
	if (level)
		setenv("NRM_INWAIT_LEVEL", level, 1);
	if (perf)
		setenv("NRM_INWAIT_PERF_CTL", perf, 1);
	if (msr)
		setenv("NRM_INWAIT_MSR_DIR", msr, 1);
	if (counters)
		setenv("NRM_INWAIT_COUNTERS", counters, 1);
}

static void case_dvfs(void)
{
	uint64_t slow = (PERF_ORIGINAL & ~0xFF00ULL) | 0x0800;

	CHECK(nrm_iw_slowed(PERF_ORIGINAL, 0x0800) == slow);
	CHECK(nrm_iw_slowed(0xFFFF, 0x1234) == 0x12FF);
	env("16", "0x0800", dir, NULL);
	CHECK(nrm_iw_init() == 1 && nrm_iw.kind == NRM_IW_KIND_MSR);
	CHECK(!nrm_iw.mod && nrm_iw.perf);

	/* a long wait: the ratio drops inside, 0x19A stays, both as before after */
	CHECK(nrm_iw_enter() == 1);
	spin_until_fired();
	CHECK(nrm_iw_t.fired);
	CHECK(get(NRM_IW_PERF) == slow);
	CHECK(get(NRM_IW_MSR) == MOD_ORIGINAL);
	nrm_iw_leave();
	CHECK(get(NRM_IW_PERF) == PERF_ORIGINAL);
	CHECK(get(NRM_IW_MSR) == MOD_ORIGINAL);

	/* a short wait: nothing written */
	CHECK(nrm_iw_enter() == 1);
	nrm_iw_leave();
	CHECK(get(NRM_IW_PERF) == PERF_ORIGINAL);

	/* the cpufreq driver (or nrmd's policy) set a ratio during the wait:
	 * theirs stays */
	CHECK(nrm_iw_enter() == 1);
	spin_until_fired();
	CHECK(get(NRM_IW_PERF) == slow);
	set(NRM_IW_PERF, (PERF_ORIGINAL & ~0xFF00ULL) | 0x1000);
	nrm_iw_leave();
	CHECK(get(NRM_IW_PERF) == ((PERF_ORIGINAL & ~0xFF00ULL) | 0x1000));
	CHECK(get(NRM_IW_MSR) == MOD_ORIGINAL);

	/* a core already at or below the in-wait ratio is never raised */
	set(NRM_IW_PERF, 0x0700);
	CHECK(nrm_iw_enter() == 1);
	spin_until_fired();
	CHECK(nrm_iw_t.fired && get(NRM_IW_PERF) == 0x0700);
	nrm_iw_leave();
	CHECK(get(NRM_IW_PERF) == 0x0700);
}

static void case_combined(void)
{
	uint64_t slow = (PERF_ORIGINAL & ~0xFF00ULL) | 0x0C00;
	uint64_t theirs = MOD_ORIGINAL | 0x18;

	env("1", "0x0C00", dir, NULL);
	CHECK(nrm_iw_init() == 1 && nrm_iw.mod && nrm_iw.perf);
	CHECK(nrm_iw_enter() == 1);
	spin_until_fired();
	CHECK(get(NRM_IW_PERF) == slow);
	CHECK(get(NRM_IW_MSR) == (MOD_ORIGINAL | 0x11));
	nrm_iw_leave();
	CHECK(get(NRM_IW_PERF) == PERF_ORIGINAL);
	CHECK(get(NRM_IW_MSR) == MOD_ORIGINAL);

	/* each register by its own rule: 0x19A rewritten by someone else
	 * keeps theirs, 0x199 still ours goes back */
	CHECK(nrm_iw_enter() == 1);
	spin_until_fired();
	set(NRM_IW_MSR, theirs);
	nrm_iw_leave();
	CHECK(get(NRM_IW_MSR) == theirs);
	CHECK(get(NRM_IW_PERF) == PERF_ORIGINAL);
}

static void case_refused(const char *level)
{
	char full[4096], link[8192];

	/* a character device whose writes fail: msr-safe refusing them */
	snprintf(full, sizeof(full), "%s-full", dir);
	snprintf(link, sizeof(link), "%s/%d", full, cpu);
	CHECK(mkdir(full, 0700) == 0 || errno == EEXIST);
	CHECK(mkdir(link, 0700) == 0 || errno == EEXIST);
	snprintf(link, sizeof(link), "%s/%d/msr_safe", full, cpu);
	unlink(link);
	CHECK(symlink("/dev/full", link) == 0);
	env(level, "0x0800", full, NULL);
	CHECK(nrm_iw_init() == 0 && nrm_iw.kind == NRM_IW_OFF);
	unlink(link);
	snprintf(link, sizeof(link), "%s/%d", full, cpu);
	rmdir(link);
	rmdir(full);
}

static void case_nothing(void)
{
	env("16", NULL, dir, NULL);
	CHECK(nrm_iw_init() == 0 && nrm_iw.kind == NRM_IW_OFF);
	CHECK(get(NRM_IW_MSR) == MOD_ORIGINAL && get(NRM_IW_PERF) == PERF_ORIGINAL);
}

static void case_counters(void)
{
	char counters[4096];

	snprintf(counters, sizeof(counters), "%s-counters", dir);
	CHECK(mkdir(counters, 0700) == 0);
	env("16", "0x0800", NULL, counters);
	CHECK(nrm_iw_init() == 1 && nrm_iw.kind == NRM_IW_KIND_COUNTERS);
	CHECK(nrm_iw.level == 16);
	CHECK(nrm_iw_enter() == 1);
	spin_until_fired();
	nrm_iw_leave();
	CHECK(nrm_iw_t.rec.waits == 1 && nrm_iw_t.rec.level == 16);
	snprintf(path, sizeof(path), "%s/%ld", counters, (long)getpid());
	unlink(path);
	rmdir(counters);
}

/* Run one case in a child with stderr in a file; returns its stderr's lines. */
static int run(void (*fn)(void), void (*fn_level)(const char *), const char *arg)
{
	char err[4096];
	pid_t pid;
	int status = -1, lines;

	snprintf(err, sizeof(err), "%s-stderr", dir);
	pid = fork();
	if (pid == 0) {
		int fd = open(err, O_WRONLY | O_CREAT | O_TRUNC, 0600);

		dup2(fd, 2);
		close(fd);
		if (fn)
			fn();
		else
			fn_level(arg);
		_exit(failures ? 1 : 0);
	}
	CHECK(pid > 0 && waitpid(pid, &status, 0) == pid);
	if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
		fprintf(stderr, "child status %#x\n", status);
	CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
	lines = stderr_lines(err);
	if (failures || (WIFEXITED(status) && WEXITSTATUS(status) != 0)) {
		char cmd[4200];

		snprintf(cmd, sizeof(cmd), "cat %s >&2", err);
		(void)!system(cmd);
	}
	unlink(err);
	reset();
	return lines;
}

int main(void)
{
	cpu_set_t one;
	int fd;

	cpu = sched_getcpu();
	CPU_ZERO(&one);
	CPU_SET(cpu, &one);
	CHECK(sched_setaffinity(0, sizeof(one), &one) == 0);
	CHECK(mkdtemp(dir) != NULL);
	snprintf(path, sizeof(path), "%s/%d", dir, cpu);
	CHECK(mkdir(path, 0700) == 0);
	snprintf(path, sizeof(path), "%s/%d/msr_safe", dir, cpu);
	fd = open(path, O_RDWR | O_CREAT, 0600);
	CHECK(fd >= 0 && ftruncate(fd, 0x2000 * 8) == 0);
	close(fd);
	reset();

	CHECK(run(case_dvfs, NULL, NULL) == 0);
	CHECK(run(case_combined, NULL, NULL) == 0);
	/* one line: the frequency form's; nothing else to throttle */
	CHECK(run(NULL, case_refused, "16") == 1);
	/* 0x19A refused too (level 1 on /dev/full): off, one line */
	CHECK(run(NULL, case_refused, "1") == 1);
	CHECK(run(case_nothing, NULL, NULL) == 1);
	CHECK(run(case_counters, NULL, NULL) == 0);

	unlink(path);
	snprintf(path, sizeof(path), "%s/%d", dir, cpu);
	rmdir(path);
	rmdir(dir);
	if (failures) {
		fprintf(stderr, "test_inwait_freq: %d failure(s)\n", failures);
		return 1;
	}
	printf("test_inwait_freq: ok\n");
	return 0;
}
