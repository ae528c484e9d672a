/*
 * nrm-spawner: nrmd's launch helper.
 *
 * nrmd starts a few of these (one per cpu, at most 4) and hands each task
 * launch to one of them over a SOCK_SEQPACKET socketpair; the wire format
 * is described, and encoded on the daemon's side, in nrm/containers/spawner.py.
 *
 * Why C: per launch, a Python helper spent ~80 us of its own CPU and had
 * to move itself into the task's cgroups and back (four migrations) so
 * that the child would be born inside its slice. Here the child places
 * itself - cgroup membership files, affinity, memory policy, scheduling
 * class, session, credentials, cwd - between clone and execve: the task is
 * inside its slice before it runs a single instruction of its own, and
 * this process never leaves home.
 *
 * The child is a vfork (CLONE_VM | CLONE_VFORK) on its own stack, made
 * with CLONE_PARENT: it is nrmd's child, not ours, so nrmd reaps it through
 * the pidfd we pass back. The child only makes system calls: it shares our
 * memory until it execs or exits.
 *
 * Usage: nrm-spawner FD PARENT_PID. Exits when the daemon closes its end
 * or dies (PR_SET_PDEATHSIG).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_close_range
#define SYS_close_range 436
#endif

#define PROTOCOL 4
#define MAGIC 0x4e524d53u /* "NRMS" */
#define CANCEL_MAGIC 0x4e524d43u /* "NRMC" */
#define MAX_MSG (1 << 16)
#define FLAG_CAPTURE 1u
#define FLAG_AFTER 2u	/* held until a predecessor exits: see hold() */
#define MAX_HELD 1024	/* nrmd promises at most 512 slices at once */
#define MAX_NODES 8192	/* bits in the memory policy's node mask */

enum { REPLY_HELLO = 0, REPLY_OK = 1, REPLY_ERR = 2, REPLY_REAP = 3 };
enum { STAGE_PLACE = 1, STAGE_EXEC = 2, STAGE_INVALID = 3, STAGE_OCCUPIED = 4,
       STAGE_CANCELLED = 5 };
/* what a failure names, for the daemon's message */
enum { WHAT_NONE = 0, WHAT_PROGRAM = 1, WHAT_CWD = 2 };

struct reply {
	uint32_t kind;
	int32_t pid;
	uint64_t id;
	int32_t stage, err, what, reserved;
	uint64_t start;		/* the task's start, in clock ticks since boot; 0 unknown */
};

/* USER_HZ, the unit of /proc/<pid>/stat's start time; 0 when odd */
static uint64_t clock_ticks;

/* CLOCK_BOOTTIME in clock ticks: the clock and unit of a process's start
 * time in /proc/<pid>/stat (the kernel rounds down the same way). */
static uint64_t boot_ticks(void)
{
	struct timespec ts;
	if (clock_ticks == 0 || clock_gettime(CLOCK_BOOTTIME, &ts) < 0)
		return 0;
	return (uint64_t)ts.tv_sec * clock_ticks +
	       (uint64_t)ts.tv_nsec / (1000000000u / clock_ticks);
}

/* what the child reports through its close-on-exec pipe when it fails */
struct failure {
	int32_t stage, err, what;
};

struct request {
	uint64_t id;
	int32_t uid, gid, policy, priority;
	uint32_t flags;
	uint32_t ngroups, ncpus, nmems, nargv, nexe, nenv, njoin, nafter;
	const int32_t *groups, *cpus, *mems;
	const char *cwd;
	/* FLAG_AFTER: the predecessor's pidfd and its cgroup's process list */
	int after_fd;
	const char *after_procs;
	char **argv, **exe, **env, **join;
	/* the storage the pointers above point into */
	char *buf;
	char **vec;
};

static int sock = -1;

static int send_reply(const struct reply *r, const int *fds, int nfds)
{
	struct iovec iov = { (void *)r, sizeof *r };
	union {
		char buf[CMSG_SPACE(3 * sizeof(int))];
		struct cmsghdr align;
	} u;
	struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1 };
	if (nfds > 0) {
		memset(&u, 0, sizeof u);
		msg.msg_control = u.buf;
		msg.msg_controllen = CMSG_SPACE(nfds * sizeof(int));
		struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN(nfds * sizeof(int));
		memcpy(CMSG_DATA(c), fds, nfds * sizeof(int));
	}
	for (;;) {
		if (sendmsg(sock, &msg, MSG_NOSIGNAL) >= 0)
			return 0;
		if (errno != EINTR)
			return -1;
	}
}

static int send_error(uint64_t id, int stage, int err, int what)
{
	struct reply r = { .kind = REPLY_ERR, .id = id, .stage = stage,
			   .err = err, .what = what };
	return send_reply(&r, NULL, 0);
}

/* -- decoding ------------------------------------------------------------ */

struct cursor {
	const char *p, *end;
};

static int take(struct cursor *c, void *out, size_t n)
{
	if ((size_t)(c->end - c->p) < n)
		return -1;
	memcpy(out, c->p, n);
	c->p += n;
	return 0;
}

static const int32_t *take_ints(struct cursor *c, uint32_t n)
{
	const int32_t *start = (const int32_t *)c->p;
	if (n > (size_t)(c->end - c->p) / sizeof(int32_t))
		return NULL;
	c->p += n * sizeof(int32_t);
	return start;
}

/* n NUL-terminated strings into vec[0..n-1], vec[n] = NULL */
static int take_strings(struct cursor *c, uint32_t n, char **vec)
{
	for (uint32_t i = 0; i < n; i++) {
		const char *nul = memchr(c->p, 0, c->end - c->p);
		if (nul == NULL)
			return -1;
		vec[i] = (char *)c->p;
		c->p = nul + 1;
	}
	vec[n] = NULL;
	return 0;
}

/* Takes ownership of buf (malloc'd, len bytes). The int arrays are read in
 * place: the daemon aligns them (the header is 64 bytes). */
static int decode(char *buf, size_t len, struct request *r)
{
	struct cursor c = { buf, buf + len };
	uint32_t magic;
	memset(r, 0, sizeof *r);
	r->buf = buf;
	r->after_fd = -1;
	if (take(&c, &magic, 4) || magic != MAGIC || take(&c, &r->flags, 4) ||
	    take(&c, &r->id, 8) || take(&c, &r->uid, 4) || take(&c, &r->gid, 4) ||
	    take(&c, &r->policy, 4) || take(&c, &r->priority, 4) ||
	    take(&c, &r->ngroups, 4) || take(&c, &r->ncpus, 4) ||
	    take(&c, &r->nmems, 4) || take(&c, &r->nargv, 4) ||
	    take(&c, &r->nexe, 4) || take(&c, &r->nenv, 4) ||
	    take(&c, &r->njoin, 4) || take(&c, &r->nafter, 4))
		return -1;
	if (r->nafter != ((r->flags & FLAG_AFTER) ? 1u : 0u))
		return -1;
	if (((uintptr_t)c.p & 3) != 0)
		return -1;
	if (!(r->groups = take_ints(&c, r->ngroups)) ||
	    !(r->cpus = take_ints(&c, r->ncpus)) ||
	    !(r->mems = take_ints(&c, r->nmems)))
		return -1;
	/* every string is at least its NUL: bound the counts by the length */
	size_t left = c.end - c.p;
	if (r->nargv == 0 || r->nexe == 0 || r->nargv > left || r->nexe > left ||
	    r->nenv > left || r->njoin > left ||
	    (size_t)r->nargv + r->nexe + r->nenv + r->njoin + r->nafter + 1 > left)
		return -1;
	r->vec = calloc((size_t)r->nargv + r->nexe + r->nenv + r->njoin + 4,
			sizeof(char *));
	if (r->vec == NULL)
		return -1;
	char *cwd[2], *after[2] = { NULL, NULL };
	r->argv = r->vec;
	r->exe = r->argv + r->nargv + 1;
	r->env = r->exe + r->nexe + 1;
	r->join = r->env + r->nenv + 1;
	if (take_strings(&c, 1, cwd) || take_strings(&c, r->nargv, r->argv) ||
	    take_strings(&c, r->nexe, r->exe) || take_strings(&c, r->nenv, r->env) ||
	    take_strings(&c, r->njoin, r->join) ||
	    take_strings(&c, r->nafter, after))
		return -1;
	r->cwd = cwd[0][0] ? cwd[0] : NULL;
	r->after_procs = after[0];
	return 0;
}

static void release(struct request *r)
{
	free(r->vec);
	free(r->buf);
	if (r->after_fd >= 0)
		close(r->after_fd);
	r->vec = NULL;
	r->buf = NULL;
	r->after_fd = -1;
}

/* -- the child, between vfork and execve ----------------------------------- */

static cpu_set_t cpus_buf;
static unsigned long mems_buf[MAX_NODES / (8 * sizeof(unsigned long))];

static void fail(int errpipe, int stage, int err, int what)
{
	struct failure f = { stage, err, what };
	ssize_t n = write(errpipe, &f, sizeof f);
	(void)n;
	_exit(127);
}

/* Never returns. Only system calls: the parent's memory is shared.
 * join_fds: the membership files, opened by the parent. */
static void child(const struct request *r, const int *join_fds, int devnull,
		  int out_w, int err_w, int errpipe)
{
	/* A task starts with every disposition at its default: an ignored
	 * one survives execve, and nrmd started from a script (`nrmd &`) or
	 * under nohup ignores SIGINT, SIGQUIT or SIGHUP, which would make the
	 * task deaf to the client's Ctrl-C. Before the mask opens. */
	struct sigaction dfl = { .sa_handler = SIG_DFL };
	for (int sig = 1; sig < NSIG; sig++)
		if (sig != SIGKILL && sig != SIGSTOP)
			sigaction(sig, &dfl, NULL);
	sigset_t none;
	sigemptyset(&none);
	syscall(SYS_rt_sigprocmask, SIG_SETMASK, &none, NULL, sizeof(uint64_t));
	for (uint32_t i = 0; i < r->njoin; i++)
		if (write(join_fds[i], "0", 1) != 1)
			fail(errpipe, STAGE_PLACE, errno, WHAT_NONE);
	if (r->ncpus && syscall(SYS_sched_setaffinity, 0, sizeof cpus_buf, &cpus_buf) < 0)
		fail(errpipe, STAGE_PLACE, errno, WHAT_NONE);
	if (r->nmems && syscall(SYS_set_mempolicy, 2 /* MPOL_BIND */, mems_buf,
				(unsigned long)MAX_NODES) < 0 && errno != ENOSYS)
		fail(errpipe, STAGE_PLACE, errno, WHAT_NONE);
	if (r->policy >= 0) {
		struct sched_param sp = { .sched_priority = r->priority };
		if (syscall(SYS_sched_setscheduler, 0, r->policy, &sp) < 0)
			fail(errpipe, STAGE_PLACE, errno, WHAT_NONE);
	}
	if (syscall(SYS_setsid) < 0)
		fail(errpipe, STAGE_EXEC, errno, WHAT_NONE);
	if (dup2(devnull, 0) < 0 || dup2(out_w, 1) < 0 || dup2(err_w, 2) < 0)
		fail(errpipe, STAGE_EXEC, errno, WHAT_NONE);
	if (r->gid >= 0) {
		if (syscall(SYS_setgroups, (size_t)r->ngroups, r->groups) < 0 ||
		    syscall(SYS_setresgid, r->gid, r->gid, r->gid) < 0)
			fail(errpipe, STAGE_EXEC, errno, WHAT_NONE);
	}
	if (r->uid >= 0 && syscall(SYS_setresuid, r->uid, r->uid, r->uid) < 0)
		fail(errpipe, STAGE_EXEC, errno, WHAT_NONE);
	/* as the user: the daemon's own access must not open a door */
	if (r->cwd != NULL && chdir(r->cwd) < 0)
		fail(errpipe, STAGE_EXEC, errno, WHAT_CWD);
	/* everything we hold is close-on-exec already; this is the guard */
	syscall(SYS_close_range, 3u, ~0u, 4u /* CLOSE_RANGE_CLOEXEC */);
	int saved = 0;
	for (uint32_t i = 0; i < r->nexe; i++) {
		execve(r->exe[i], r->argv, r->env);
		if (errno != ENOENT && errno != ENOTDIR && saved == 0)
			saved = errno;
	}
	fail(errpipe, STAGE_EXEC, saved ? saved : errno, WHAT_PROGRAM);
}

/* -- one launch ------------------------------------------------------------ */

struct child_args {
	const struct request *r;
	const int *join_fds;
	int out_w, err_w, errpipe;
};

static int devnull_fd = -1;

static int child_main(void *arg)
{
	const struct child_args *a = arg;
	child(a->r, a->join_fds, devnull_fd, a->out_w, a->err_w, a->errpipe);
	return 127;
}

/* The child's own stack: it shares our memory (CLONE_VM), and we are
 * suspended (CLONE_VFORK) until it execs or exits, so one suffices. */
static char child_stack[128 * 1024] __attribute__((aligned(16)));

/* A child that failed before exec is the daemon's zombie (CLONE_PARENT):
 * the daemon reaps it through this pidfd. */
static int send_reap(pid_t pid, int pidfd)
{
	struct reply r = { .kind = REPLY_REAP, .pid = pid };
	int rc = send_reply(&r, &pidfd, 1);
	close(pidfd);
	return rc;
}

/* Membership files stay open: containers' cgroups are pooled, the same few
 * paths recur, and an open fd saves the child a kernfs lookup, an open and
 * a close (~60 us per launch here). A cgroup removed since leaves a stale
 * fd (ENODEV): the launch is retried once with fresh opens. */
#define MEMBERSHIP_CACHE 64	/* also the most one request may name */
static struct {
	char *path;
	int fd;
} membership[MEMBERSHIP_CACHE];
static int memberships;

static void forget_memberships(void)
{
	for (int i = 0; i < memberships; i++) {
		free(membership[i].path);
		close(membership[i].fd);
	}
	memberships = 0;
}

static int membership_fd(const char *path)
{
	for (int i = 0; i < memberships; i++)
		if (strcmp(membership[i].path, path) == 0)
			return membership[i].fd;
	int fd = open(path, O_WRONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	char *copy = strdup(path);
	if (copy == NULL) {
		close(fd);
		errno = ENOMEM;
		return -1;
	}
	membership[memberships].path = copy;
	membership[memberships].fd = fd;
	memberships++;
	return fd;
}

static int build_masks(const struct request *r)
{
	CPU_ZERO(&cpus_buf);
	for (uint32_t i = 0; i < r->ncpus; i++) {
		if (r->cpus[i] < 0 || r->cpus[i] >= CPU_SETSIZE)
			return -1;
		CPU_SET(r->cpus[i], &cpus_buf);
	}
	memset(mems_buf, 0, sizeof mems_buf);
	for (uint32_t i = 0; i < r->nmems; i++) {
		unsigned n = (unsigned)r->mems[i];
		if (n >= MAX_NODES)
			return -1;
		mems_buf[n / (8 * sizeof(unsigned long))] |= 1ul << (n % (8 * sizeof(unsigned long)));
	}
	return 0;
}

static void close_all(int *fds, int n)
{
	for (int i = 0; i < n; i++)
		if (fds[i] >= 0)
			close(fds[i]);
}

/* returns -1 only when the daemon's socket failed */
static int launch(const struct request *r, int retry)
{
	int out[2] = { -1, -1 }, err[2] = { -1, -1 }, errpipe[2];
	int join_fds[MEMBERSHIP_CACHE];
	if (r->njoin > MEMBERSHIP_CACHE || build_masks(r) < 0)
		return send_error(r->id, STAGE_INVALID, EINVAL, WHAT_NONE);
	/* room for all of this request's files: none may close under us */
	if (memberships + r->njoin > MEMBERSHIP_CACHE)
		forget_memberships();
	for (uint32_t i = 0; i < r->njoin; i++)
		if ((join_fds[i] = membership_fd(r->join[i])) < 0)
			return send_error(r->id, STAGE_PLACE, errno, WHAT_NONE);
	if (r->flags & FLAG_CAPTURE) {
		if (pipe2(out, O_CLOEXEC) < 0)
			return send_error(r->id, STAGE_PLACE, errno, WHAT_NONE);
		if (pipe2(err, O_CLOEXEC) < 0) {
			int e = errno;
			close_all(out, 2);
			return send_error(r->id, STAGE_PLACE, e, WHAT_NONE);
		}
	}
	if (pipe2(errpipe, O_CLOEXEC) < 0) {
		int e = errno;
		close_all(out, 2);
		close_all(err, 2);
		return send_error(r->id, STAGE_PLACE, e, WHAT_NONE);
	}
	int out_w = out[1] >= 0 ? out[1] : devnull_fd;
	int err_w = err[1] >= 0 ? err[1] : devnull_fd;
	/* CLONE_PARENT: the task is nrmd's child, so nrmd reaps it through its
	 * pidfd, with no hop through us, and a spawner's death costs no task
	 * its exit status */
	struct child_args args = { r, join_fds, out_w, err_w, errpipe[1] };
	int pidfd = -1;
	/* the kernel stamps the child's start between these two reads: when
	 * they agree, that is its start time, and nrmd need not read /proc */
	uint64_t before = boot_ticks();
	pid_t pid = clone(child_main, child_stack + sizeof child_stack,
			  CLONE_VM | CLONE_VFORK | CLONE_PARENT | CLONE_PIDFD | SIGCHLD,
			  &args, &pidfd);
	int clone_errno = errno;
	uint64_t after = boot_ticks();
	close(errpipe[1]);
	if (out[1] >= 0)
		close(out[1]);
	if (err[1] >= 0)
		close(err[1]);
	if (pid < 0) {
		close(errpipe[0]);
		close(out[0]);
		close(err[0]);
		return send_error(r->id, STAGE_PLACE, clone_errno, WHAT_NONE);
	}
	struct failure f;
	ssize_t n;
	do
		n = read(errpipe[0], &f, sizeof f);
	while (n < 0 && errno == EINTR);
	close(errpipe[0]);
	if (n != 0) {
		int fds[2] = { out[0], err[0] };
		close_all(fds, 2);
		if (send_reap(pid, pidfd) < 0)
			return -1;
		if (n != sizeof f)
			return send_error(r->id, STAGE_EXEC, EIO, WHAT_NONE);
		if (retry && f.stage == STAGE_PLACE && (f.err == ENODEV || f.err == ENOENT)) {
			forget_memberships();
			return launch(r, 0);
		}
		return send_error(r->id, f.stage, f.err, f.what);
	}
	int fds[3] = { pidfd, out[0], err[0] };
	struct reply ok = { .kind = REPLY_OK, .id = r->id, .pid = pid,
			    .start = before == after ? before : 0 };
	int rc = send_reply(&ok, fds, out[0] >= 0 ? 3 : 1);
	close_all(fds, 3);
	return rc;
}

/* -- the loop --------------------------------------------------------------- */

/* A request: one message, or a memfd with it when it is too large (then
 * the message is one byte and the memfd comes last). *fd receives the
 * other descriptor a message may carry, a held request's predecessor
 * pidfd, or -1. NULL with *closed set when the daemon hung up. */
static char *receive(size_t *len, int *fd, int *closed)
{
	char *buf = malloc(MAX_MSG);
	union {
		char buf[CMSG_SPACE(2 * sizeof(int))];
		struct cmsghdr align;
	} u;
	struct iovec iov = { buf, MAX_MSG };
	struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1,
			      .msg_control = u.buf, .msg_controllen = sizeof u.buf };
	int fds[2] = { -1, -1 }, nfds = 0;
	*closed = 0;
	*fd = -1;
	if (buf == NULL)
		return NULL;
	ssize_t n;
	do
		n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
	while (n < 0 && errno == EINTR);
	if (n <= 0) {
		*closed = n == 0 || (errno != EAGAIN);
		free(buf);
		return NULL;
	}
	struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
	if (c != NULL && c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
		nfds = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
		if (nfds > 2)
			nfds = 2;
		memcpy(fds, CMSG_DATA(c), nfds * sizeof(int));
	}
	if (n != 1 || nfds == 0) {
		*fd = fds[0];
		if (nfds > 1)
			close(fds[1]);
		*len = (size_t)n;
		return buf;
	}
	int memfd = fds[nfds - 1];
	*fd = nfds > 1 ? fds[0] : -1;
	free(buf);
	struct stat st;
	buf = NULL;
	if (fstat(memfd, &st) == 0 && st.st_size > 0 && st.st_size < (1 << 30) &&
	    (buf = malloc(st.st_size)) != NULL) {
		if (pread(memfd, buf, st.st_size, 0) != st.st_size) {
			free(buf);
			buf = NULL;
		}
		*len = st.st_size;
	}
	close(memfd);
	if (buf == NULL && *fd >= 0) {
		close(*fd);
		*fd = -1;
	}
	return buf;
}

/* -- held requests ----------------------------------------------------------
 *
 * A request with FLAG_AFTER is the successor of a running task (nrmd
 * promised it that task's slice): it waits here, on the predecessor's pidfd,
 * and is launched the moment that task exits, with no round trip through
 * the daemon. The slice must be empty first: if the predecessor's cgroup
 * still holds a process (something it left behind, not yet killed by the
 * daemon), the request is answered STAGE_OCCUPIED and the daemon launches
 * it itself once it has emptied the slice. A cancel message takes a held
 * request back (STAGE_CANCELLED); one that was already launched is not
 * answered twice. */
static struct request held[MAX_HELD];
static int nheld;

static void unhold(int i)
{
	release(&held[i]);
	held[i] = held[--nheld];
}

/* 1 when the cgroup whose process list is at path holds no process; a
 * vanished cgroup holds none. An exited task is out of the list before its
 * pidfd is readable (the kernel leaves the cgroup before it notifies). */
static int cgroup_empty(const char *path)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return errno == ENOENT;
	char byte;
	ssize_t n;
	do
		n = read(fd, &byte, 1);
	while (n < 0 && errno == EINTR);
	close(fd);
	return n == 0;
}

/* returns -1 only when the daemon's socket failed */
static int fire(int i)
{
	struct request r = held[i];
	held[i] = held[--nheld];
	int rc;
	if (cgroup_empty(r.after_procs))
		rc = launch(&r, 1);
	else
		rc = send_error(r.id, STAGE_OCCUPIED, EBUSY, WHAT_NONE);
	release(&r);
	return rc;
}

static int cancel(const char *buf)
{
	uint64_t id;
	memcpy(&id, buf + 8, 8);
	for (int i = 0; i < nheld; i++)
		if (held[i].id == id) {
			unhold(i);
			return send_error(id, STAGE_CANCELLED, ECANCELED, WHAT_NONE);
		}
	return 0;	/* launched already: its answer went first */
}

/* returns -1 only when the daemon's socket failed */
static int serve(char *buf, size_t len, int fd)
{
	uint32_t magic = 0;
	if (len >= 4)
		memcpy(&magic, buf, 4);
	if (magic == CANCEL_MAGIC && len == 16) {
		if (fd >= 0)
			close(fd);
		int rc = cancel(buf);
		free(buf);
		return rc;
	}
	struct request r;
	int bad = decode(buf, len, &r) < 0;
	r.after_fd = fd;
	if (!bad && (r.flags & FLAG_AFTER) && (fd < 0 || nheld == MAX_HELD))
		bad = 1;
	if (bad) {
		uint64_t id = 0;
		if (len >= 16)
			memcpy(&id, buf + 8, 8);
		release(&r);
		return send_error(id, STAGE_INVALID, EINVAL, WHAT_NONE);
	}
	if (r.flags & FLAG_AFTER) {
		held[nheld++] = r;
		return 0;
	}
	if (fd >= 0) {
		close(fd);
		r.after_fd = -1;
	}
	int rc = launch(&r, 1);
	release(&r);
	return rc;
}

/* Wait for the daemon's socket, or for a held request's predecessor to
 * exit (then launch it). 1 when the socket is readable, 0 to wait again,
 * -1 when the daemon's socket failed. */
static int wait_event(void)
{
	if (nheld == 0)
		return 1;	/* block in recvmsg: one system call fewer */
	struct pollfd pfd[MAX_HELD + 1];
	pfd[0] = (struct pollfd){ .fd = sock, .events = POLLIN };
	for (int i = 0; i < nheld; i++)
		pfd[i + 1] = (struct pollfd){ .fd = held[i].after_fd, .events = POLLIN };
	int n = nheld;
	if (poll(pfd, n + 1, -1) < 0)
		return errno == EINTR ? 0 : -1;
	/* backwards: fire() moves the last held request into the freed place */
	for (int i = n - 1; i >= 0; i--)
		if (pfd[i + 1].revents && fire(i) < 0)
			return -1;
	return pfd[0].revents ? 1 : 0;
}

int main(int argc, char **argv)
{
	if (argc != 3)
		return 2;
	sock = atoi(argv[1]);
	prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
	if (getppid() != (pid_t)atoi(argv[2]))
		return 0;
	fcntl(sock, F_SETFD, FD_CLOEXEC);
	devnull_fd = open("/dev/null", O_RDWR | O_CLOEXEC);
	long hz = sysconf(_SC_CLK_TCK);
	if (hz > 0 && 1000000000 % hz == 0)
		clock_ticks = (uint64_t)hz;
	/* blocked here, unblocked in each child: a ^C meant for the tasks'
	 * terminal does not kill us, and nothing we ignore leaks into them */
	sigset_t set;
	sigemptyset(&set);
	sigaddset(&set, SIGINT);
	sigaddset(&set, SIGTERM);
	sigaddset(&set, SIGHUP);
	sigaddset(&set, SIGQUIT);
	sigprocmask(SIG_BLOCK, &set, NULL);
	if (devnull_fd < 0)
		return 3;
	struct reply hello = { .kind = REPLY_HELLO, .id = PROTOCOL, .pid = getpid() };
	if (send_reply(&hello, NULL, 0) < 0)
		return 0;
	for (;;) {
		int ready = wait_event();
		if (ready < 0)
			return 0;
		if (ready == 0)
			continue;
		size_t len = 0;
		int closed, fd;
		char *buf = receive(&len, &fd, &closed);
		if (closed)
			return 0;
		if (buf == NULL)
			return 3;	/* unreadable: the daemon fails what is in flight */
		if (serve(buf, len, fd) < 0)
			return 0;
	}
}
