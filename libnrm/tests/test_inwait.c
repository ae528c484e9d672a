/*
 * In-wait throttling (src/inwait.h) without MPI: the pure parts, then a
 * real timer, signal and handler against a fake msr file of this thread's
 * cpu (a regular file: 0x19A at offset 8 x 0x19A), and a late signal that
 * must not throttle anything; a forked child and a thread free to migrate
 * never throttle.
 */
#define _GNU_SOURCE
#include "../src/inwait.h"

#include <sys/stat.h>
#include <sys/wait.h>

#include "check.h"

static uint64_t slot_of(const char *path)
{
	uint64_t v = 0;
	int fd = open(path, O_RDONLY);

	if (fd >= 0 && pread(fd, &v, 8, 8 * NRM_IW_MSR) != 8)
		v = 0;
	if (fd >= 0)
		close(fd);
	return v;
}

static void spin_until_fired(void)
{
	uint64_t end = nrm_iw_clock(CLOCK_MONOTONIC) + 2000000000ULL;

	while (!nrm_iw_t.fired && nrm_iw_clock(CLOCK_MONOTONIC) < end)
		;
}

static void *enter_once(void *arg)
{
	*(int *)arg = nrm_iw_enter();
	return NULL;
}

int main(void)
{
	char dir[] = "/tmp/nrm-inwait-XXXXXX";
	char path[4096];
	uint64_t original = 0x1234500, v;
	cpu_set_t one, all;
	int cpu, fd;

	/* prediction: any long wait among the last eight */
	CHECK(!nrm_iw_predict(0));
	CHECK(nrm_iw_learn(0, 600, 500) == 1);
	CHECK(nrm_iw_learn(1, 400, 500) == 2);
	CHECK(nrm_iw_predict(nrm_iw_learn(0x40, 1, 500)));	/* 7 waits ago */
	CHECK(!nrm_iw_predict(nrm_iw_learn(0x80, 1, 500)));	/* 8 waits ago: gone */
	/* the register: the bits outside 4:0 are kept */
	CHECK(nrm_iw_throttled(0x1234500, 0x11) == 0x1234511);
	CHECK(nrm_iw_throttled(0x1234517, 0x11) == 0x1234511);
	CHECK(nrm_iw_throttled(0, 0xff) == 0x1f);

	/* pin to one cpu and give it a fake register */
	CHECK(sched_getaffinity(0, sizeof(all), &all) == 0);
	cpu = sched_getcpu();
	CPU_ZERO(&one);
	CPU_SET(cpu, &one);
	CHECK(sched_setaffinity(0, sizeof(one), &one) == 0);
	CHECK(mkdtemp(dir) != NULL);
	snprintf(path, sizeof(path), "%s/%d", dir, cpu);
	CHECK(mkdir(path, 0700) == 0);
	snprintf(path, sizeof(path), "%s/%d/msr_safe", dir, cpu);
	fd = open(path, O_RDWR | O_CREAT, 0600);
	CHECK(fd >= 0 && pwrite(fd, &original, 8, 8 * NRM_IW_MSR) == 8);
	close(fd);
	setenv("NRM_INWAIT_DELAY", "100us", 1);
	setenv("NRM_INWAIT_MSR_DIR", dir, 1);
	CHECK(nrm_iw_init() == 1 && nrm_iw.kind == NRM_IW_KIND_MSR);

	/* a wait that outlasts the delay: throttled inside, restored at exit */
	CHECK(nrm_iw_enter() == 1);
	spin_until_fired();
	CHECK(nrm_iw_t.fired);
	CHECK(slot_of(path) == 0x1234511);
	nrm_iw_leave();
	CHECK(slot_of(path) == original);

	/* a wait shorter than the delay: never touched */
	CHECK(nrm_iw_enter() == 1);
	nrm_iw_leave();
	CHECK(!nrm_iw_t.fired && slot_of(path) == original);

	/* someone else (nrmd's policy) wrote the register during the wait:
	 * theirs stays */
	CHECK(nrm_iw_enter() == 1);
	spin_until_fired();
	v = 0x1234508 | 0x10;
	fd = open(path, O_WRONLY);
	CHECK(fd >= 0 && pwrite(fd, &v, 8, 8 * NRM_IW_MSR) == 8);
	close(fd);
	nrm_iw_leave();
	CHECK(slot_of(path) == v);
	fd = open(path, O_WRONLY);
	CHECK(fd >= 0 && pwrite(fd, &original, 8, 8 * NRM_IW_MSR) == 8);
	close(fd);

	/* a timer signal that arrives after the exit does nothing */
	CHECK(nrm_iw_enter() == 1);
	nrm_iw_t.armed = 0;		/* as the exit does first */
	{
		uint64_t end = nrm_iw_clock(CLOCK_MONOTONIC) + 5000000ULL;

		while (nrm_iw_clock(CLOCK_MONOTONIC) < end)
			;
	}
	CHECK(!nrm_iw_t.fired && slot_of(path) == original);

	/* a child forked without exec does not throttle, and has closed
	 * its copy of the device */
	{
		int fdc = nrm_iw.fd[cpu], status = -1;
		pid_t pid = fork();

		if (pid == 0)
			_exit(nrm_iw.kind == NRM_IW_OFF && nrm_iw_enter() == 0 &&
			      fcntl(fdc, F_GETFD) < 0 ? 0 : 1);
		CHECK(pid > 0 && waitpid(pid, &status, 0) == pid);
		CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
		CHECK(nrm_iw.kind == NRM_IW_KIND_MSR && fcntl(fdc, F_GETFD) >= 0);
	}

	/* a new thread's affinity must be one cpu: a thread that may migrate
	 * never arms */
	if (CPU_COUNT(&all) > 1) {
		pthread_t th;
		int armed = -1;

		CHECK(sched_setaffinity(0, sizeof(all), &all) == 0);
		CHECK(pthread_create(&th, NULL, enter_once, &armed) == 0);
		CHECK(pthread_join(th, NULL) == 0 && armed == 0);
		CHECK(atomic_load(&nrm_iw.warned_unbound) == 1);
	}

	unlink(path);
	snprintf(path, sizeof(path), "%s/%d", dir, cpu);
	rmdir(path);
	rmdir(dir);
	if (failures) {
		fprintf(stderr, "test_inwait: %d failure(s)\n", failures);
		return 1;
	}
	printf("test_inwait: ok\n");
	return 0;
}
