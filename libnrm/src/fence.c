/*
 * nrm-pilot-fence RECORD COMMAND [ARG...]: one attempt of an nrm pilot task,
 * recorded so that a pilot killed meanwhile can be resumed exactly once
 * (nrm/pilot/attempts.py has the protocol; this is its fast path, the
 * `sh` wrapper there its fallback, with the same behaviour):
 *
 *   - RECORD is created with O_EXCL, holding this process's pid. When it
 *     exists already (a resumed pilot fenced the attempt), exit 75 without
 *     running anything.
 *   - COMMAND runs as a child (posix_spawnp: a vfork, no copy of this
 *     process), in the same process group, so that a kill of the group
 *     reaches both.
 *   - Its exit status is appended to RECORD ("128+N" for a signal, as a
 *     shell's $? says), and is this process's exit status.
 *
 * Why C: the shell's exec, its parse and its fork cost about half a
 * millisecond of cpu per task; this costs a small fraction of that
 * (docs/performance.md). Nothing but libc.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <spawn.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define FENCED 75
#define NOT_RUN 127

extern char **environ;

static void put(int fd, long value)
{
	char buf[32];
	int n = snprintf(buf, sizeof buf, "%ld\n", value);
	while (n > 0) {
		ssize_t w = write(fd, buf, (size_t)n);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return;
		n -= (int)w;
	}
}

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: nrm-pilot-fence RECORD COMMAND [ARG...]\n");
		return 2;
	}
	int fd = open(argv[1], O_WRONLY | O_CREAT | O_EXCL | O_APPEND | O_CLOEXEC, 0600);
	if (fd < 0) {
		if (errno != EEXIST)
			fprintf(stderr, "nrm-pilot-fence: %s: %s\n", argv[1], strerror(errno));
		return FENCED;
	}
	put(fd, (long)getpid());
	pid_t child;
	int err = posix_spawnp(&child, argv[2], NULL, NULL, argv + 2, environ);
	int rc;
	if (err != 0) {
		fprintf(stderr, "nrm-pilot-fence: %s: %s\n", argv[2], strerror(err));
		rc = NOT_RUN;
	} else {
		int status = 0;
		while (waitpid(child, &status, 0) < 0 && errno == EINTR)
			;
		rc = WIFEXITED(status) ? WEXITSTATUS(status)
		     : WIFSIGNALED(status) ? 128 + WTERMSIG(status) : NOT_RUN;
	}
	put(fd, rc);
	close(fd);
	return rc;
}
