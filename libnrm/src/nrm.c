/*
 * libnrm: the downstream client of nrm, protocol v1.
 *
 * One PUSH socket connected to $NRM_DOWNSTREAM_URI; one JSON object per
 * message.  PUSH (rather than the seed's PUB) queues messages while the
 * connection is still being made, so no slow-joiner sleep is needed and
 * the first messages are not lost.  Every send is non-blocking: a daemon
 * that is slow or gone costs the application a failed send, never a stall.
 */
#define _GNU_SOURCE
#include "nrm.h"
#include "nrm_internal.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>
#include <linux/sockios.h>
#include <zmq.h>

#define NRM_DEFAULT_RATELIMIT_NS 10000000ULL
#define NRM_DEFAULT_LINGER_MS 1000
/* Rate-limited progress plus aggregated phases stay far below this; the
 * bound only matters when the daemon is gone, and then it caps memory. */
#define NRM_SNDHWM 1000
#define NRM_FIELD_MAX 256
#define NRM_MSG_MAX 2048
#define NRM_HELD_MAX 8

struct nrm_state {
	pthread_mutex_t lock;
	void *zctx;
	void *sock;
	uint64_t ratelimit_ns;
	int linger_ms;
	int rank;
	unsigned long long phases;
	/* "container":"..","task":"..","app":".." shared by every message */
	char ids[3 * (NRM_FIELD_MAX + 16)];
	char container[NRM_FIELD_MAX];
	char app[NRM_FIELD_MAX];
	char ipc_path[sizeof(((struct sockaddr_un *)0)->sun_path)];
};

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

int nrm_parse_duration_ns(const char *text, uint64_t *out)
{
	char *end;
	double value, scale = 1.0;

	if (text == NULL || *text == '\0')
		return -1;
	errno = 0;
	value = strtod(text, &end);
	if (errno != 0 || end == text || value < 0)
		return -1;
	while (*end == ' ')
		end++;
	if (*end == '\0' || strcmp(end, "ns") == 0)
		scale = 1.0;
	else if (strcmp(end, "us") == 0)
		scale = 1e3;
	else if (strcmp(end, "ms") == 0)
		scale = 1e6;
	else if (strcmp(end, "s") == 0)
		scale = 1e9;
	else
		return -1;
	value *= scale;
	if (value > 1e18)
		return -1;
	*out = (uint64_t)(value + 0.5);
	return 0;
}

uint64_t nrm_ratelimit_from_env(void)
{
	const char *text = getenv("NRM_RATELIMIT");
	uint64_t ns;

	if (text == NULL || *text == '\0')
		return NRM_DEFAULT_RATELIMIT_NS;
	if (nrm_parse_duration_ns(text, &ns) != 0) {
		/* A silently ignored typo would look like a daemon bug. */
		fprintf(stderr, "libnrm: ignoring invalid NRM_RATELIMIT=%s (want e.g. 10ms)\n",
			text);
		return NRM_DEFAULT_RATELIMIT_NS;
	}
	return ns;
}

/*
 * Copy `src` as JSON string content.  Bytes outside printable ASCII are
 * replaced or escaped so that no environment value can break the message
 * or make it invalid UTF-8; the output is cut at a character boundary.
 */
static void json_escape(char *dst, size_t cap, const char *src)
{
	size_t n = 0;

	if (src == NULL)
		src = "";
	for (; *src != '\0'; src++) {
		unsigned char c = (unsigned char)*src;
		char tmp[8];
		size_t len;

		if (c == '"' || c == '\\') {
			tmp[0] = '\\';
			tmp[1] = (char)c;
			len = 2;
		} else if (c < 0x20) {
			snprintf(tmp, sizeof(tmp), "\\u%04x", c);
			len = 6;
		} else if (c >= 0x7f) {
			tmp[0] = '?';
			len = 1;
		} else {
			tmp[0] = (char)c;
			len = 1;
		}
		if (n + len >= cap)
			break;
		memcpy(dst + n, tmp, len);
		n += len;
	}
	dst[n] = '\0';
}

static int rank_from_env(void)
{
	static const char *const names[] = {
		"PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID", NULL
	};

	for (int i = 0; names[i] != NULL; i++) {
		const char *v = getenv(names[i]);

		if (v != NULL && *v != '\0')
			return atoi(v);
	}
	return -1;
}

static int env_int(const char *name, int dflt)
{
	const char *v = getenv(name);

	if (v == NULL || *v == '\0')
		return dflt;
	return atoi(v);
}

static inline struct nrm_state *state_of(const struct nrm_context *ctxt)
{
	return ctxt == NULL ? NULL : (struct nrm_state *)ctxt->context;
}

static int send_locked(struct nrm_state *st, const char *buf, int len, int flags)
{
	if (len < 0 || len >= NRM_MSG_MAX) {
		errno = EMSGSIZE;
		return -1;
	}
	if (zmq_send(st->sock, buf, (size_t)len, flags) < 0)
		return -1;
	return 0;
}

static int send_progress_locked(struct nrm_context *ctxt, struct nrm_state *st,
				uint64_t now, int flags)
{
	char buf[NRM_MSG_MAX];
	int len;

	len = snprintf(buf, sizeof(buf), "{\"v\":1,\"type\":\"progress\",%s,\"payload\":%lu}",
		       st->ids, ctxt->acc);
	if (send_locked(st, buf, len, flags) != 0)
		return -1;	/* keep the accumulator: the next send carries it */
	ctxt->acc = 0;
	ctxt->time.tv_sec = (time_t)(now / 1000000000ULL);
	ctxt->time.tv_nsec = (long)(now % 1000000000ULL);
	return 0;
}

/*
 * Hang up only once the daemon has read everything.  libzmq 4.3
 * (zeromq/libzmq#4660) drops what the kernel still holds for a receiver
 * whose queue is full when the sender closes: the hang-up stops the
 * receiving engine from reading the rest, so the last messages of a
 * flooding application (its exit included) would be lost.  Linger only
 * waits until the data is in the kernel.  So nrm_fini keeps duplicates
 * of its connections to the daemon's ipc path across zmq_close (no
 * hang-up yet) and releases them once SIOCOUTQ says the peer consumed
 * every byte, or the linger bound has passed.  nrm/transport/hangup.py does the
 * same for Python senders.
 */
static int hold_connections(const char *path, int *held, int max)
{
	struct sockaddr_un peer;
	struct dirent *entry;
	socklen_t len;
	DIR *dir;
	int n = 0, fd;

	if (*path == '\0' || (dir = opendir("/proc/self/fd")) == NULL)
		return 0;
	while (n < max && (entry = readdir(dir)) != NULL) {
		fd = atoi(entry->d_name);
		if (entry->d_name[0] == '.' || fd == dirfd(dir))
			continue;
		len = sizeof(peer);
		if (getpeername(fd, (struct sockaddr *)&peer, &len) != 0 ||
		    peer.sun_family != AF_UNIX || len <= offsetof(struct sockaddr_un, sun_path) ||
		    strncmp(peer.sun_path, path, sizeof(peer.sun_path)) != 0)
			continue;
		fd = fcntl(fd, F_DUPFD_CLOEXEC, 3);
		if (fd >= 0)
			held[n++] = fd;
	}
	closedir(dir);
	return n;
}

/* An fd whose queue cannot be read counts as read: never wait blind. */
static int any_unread(const int *held, int n)
{
	int i, unread;

	for (i = 0; i < n; i++)
		if (ioctl(held[i], SIOCOUTQ, &unread) == 0 && unread > 0)
			return 1;
	return 0;
}

static void release_when_read(int *held, int n, uint64_t deadline_ns)
{
	struct timespec pause = { 0, 500000 };
	int i;

	while (any_unread(held, n) && now_ns() < deadline_ns) {
		nanosleep(&pause, NULL);
		if (pause.tv_nsec < 10000000)
			pause.tv_nsec *= 2;
	}
	for (i = 0; i < n; i++)
		close(held[i]);
}

static void destroy_state(struct nrm_state *st)
{
	if (st->sock != NULL) {
		zmq_setsockopt(st->sock, ZMQ_LINGER, &st->linger_ms, sizeof(st->linger_ms));
		zmq_close(st->sock);
	}
	if (st->zctx != NULL)
		zmq_ctx_term(st->zctx);
	pthread_mutex_destroy(&st->lock);
	free(st);
}

int nrm_init(struct nrm_context *ctxt, const char *app_name)
{
	const char *uri = getenv("NRM_DOWNSTREAM_URI");
	const char *container, *task;
	struct nrm_state *st;
	char task_esc[NRM_FIELD_MAX];
	char buf[NRM_MSG_MAX];
	int hwm = NRM_SNDHWM, len, saved;

	if (ctxt == NULL) {
		errno = EINVAL;
		return -1;
	}
	memset(ctxt, 0, sizeof(*ctxt));
	if (uri == NULL || *uri == '\0')
		return 0;

	st = calloc(1, sizeof(*st));
	if (st == NULL)
		return -1;
	pthread_mutex_init(&st->lock, NULL);
	st->ratelimit_ns = nrm_ratelimit_from_env();
	st->linger_ms = env_int("NRM_LINGER", NRM_DEFAULT_LINGER_MS);
	if (st->linger_ms < 0)
		st->linger_ms = NRM_DEFAULT_LINGER_MS;
	st->rank = rank_from_env();
	if (strncmp(uri, "ipc://", 6) == 0 && uri[6] != '@')
		snprintf(st->ipc_path, sizeof(st->ipc_path), "%s", uri + 6);

	container = getenv("NRM_CONTAINER_ID");
	if (container == NULL)
		container = getenv("ARGO_CONTAINER_UUID");
	task = getenv("NRM_TASK_ID");
	json_escape(st->container, sizeof(st->container), container);
	json_escape(task_esc, sizeof(task_esc), task);
	json_escape(st->app, sizeof(st->app), app_name);
	snprintf(st->ids, sizeof(st->ids), "\"container\":\"%s\",\"task\":\"%s\",\"app\":\"%s\"",
		 st->container, task_esc, st->app);

	st->zctx = zmq_ctx_new();
	if (st->zctx == NULL)
		goto fail;
	st->sock = zmq_socket(st->zctx, ZMQ_PUSH);
	if (st->sock == NULL)
		goto fail;
	if (zmq_setsockopt(st->sock, ZMQ_SNDHWM, &hwm, sizeof(hwm)) != 0 ||
	    zmq_setsockopt(st->sock, ZMQ_LINGER, &st->linger_ms, sizeof(st->linger_ms)) != 0 ||
	    zmq_connect(st->sock, uri) != 0)
		goto fail;

	ctxt->context = st;
	ctxt->socket = st->sock;
	ctxt->container_uuid = st->container;
	ctxt->app_uuid = st->app;

	len = snprintf(buf, sizeof(buf), "{\"v\":1,\"type\":\"start\",%s,\"pid\":%ld}",
		       st->ids, (long)getpid());
	pthread_mutex_lock(&st->lock);
	send_locked(st, buf, len, ZMQ_DONTWAIT);
	pthread_mutex_unlock(&st->lock);
	return 0;

fail:
	saved = errno;
	destroy_state(st);
	memset(ctxt, 0, sizeof(*ctxt));
	errno = saved;
	return -1;
}

int nrm_send_progress(struct nrm_context *ctxt, unsigned long progress)
{
	struct nrm_state *st = state_of(ctxt);
	uint64_t now, last;
	int rc = 0;

	if (st == NULL)
		return 0;
	pthread_mutex_lock(&st->lock);
	ctxt->acc += progress;
	now = now_ns();
	last = (uint64_t)ctxt->time.tv_sec * 1000000000ULL + (uint64_t)ctxt->time.tv_nsec;
	if (last == 0 || now - last >= st->ratelimit_ns)
		rc = send_progress_locked(ctxt, st, now, ZMQ_DONTWAIT);
	pthread_mutex_unlock(&st->lock);
	return rc;
}

int nrm_flush(struct nrm_context *ctxt)
{
	struct nrm_state *st = state_of(ctxt);
	int rc = 0;

	if (st == NULL)
		return 0;
	pthread_mutex_lock(&st->lock);
	if (ctxt->acc != 0)
		rc = send_progress_locked(ctxt, st, now_ns(), ZMQ_DONTWAIT);
	pthread_mutex_unlock(&st->lock);
	return rc;
}

int nrm_send_phase_aggregate(struct nrm_context *ctxt, int rank, int cpu,
			     unsigned long long phase, unsigned long aggregation,
			     unsigned long long computetime, unsigned long long totaltime)
{
	return nrm_send_phase_typed(ctxt, rank, cpu, phase, aggregation, computetime,
				    totaltime, 0);
}

int nrm_send_phase_typed(struct nrm_context *ctxt, int rank, int cpu,
			 unsigned long long phase, unsigned long aggregation,
			 unsigned long long computetime, unsigned long long totaltime,
			 unsigned long long site)
{
	struct nrm_state *st = state_of(ctxt);
	char buf[NRM_MSG_MAX];
	char typed[40] = "";
	int len, rc;

	if (st == NULL)
		return 0;
	/* The daemon's field is a signed 64-bit integer; older daemons ignore it. */
	if (site != 0)
		snprintf(typed, sizeof(typed), ",\"site\":%llu", site & 0x7fffffffffffffffULL);
	len = snprintf(buf, sizeof(buf),
		       "{\"v\":1,\"type\":\"phase_context\",%s,\"rank\":%d,\"cpu\":%d,"
		       "\"phase\":%llu,\"aggregation\":%lu,\"computetime\":%llu,"
		       "\"totaltime\":%llu%s}",
		       st->ids, rank, cpu, phase, aggregation, computetime, totaltime, typed);
	pthread_mutex_lock(&st->lock);
	rc = send_locked(st, buf, len, ZMQ_DONTWAIT);
	pthread_mutex_unlock(&st->lock);
	return rc;
}

int nrm_send_phase_context(struct nrm_context *ctxt, int cpu,
			   unsigned long long startCompute, unsigned long long endCompute,
			   unsigned long long startBarrier, unsigned long long endBarrier)
{
	struct nrm_state *st = state_of(ctxt);
	unsigned long long phase, compute, total;

	(void)startBarrier;
	if (st == NULL)
		return 0;
	compute = endCompute >= startCompute ? endCompute - startCompute : 0;
	total = endBarrier >= startCompute ? endBarrier - startCompute : 0;
	pthread_mutex_lock(&st->lock);
	phase = ++st->phases;
	pthread_mutex_unlock(&st->lock);
	return nrm_send_phase_aggregate(ctxt, st->rank, cpu, phase, 1, compute, total);
}

int nrm_send_performance(struct nrm_context *ctxt, const char *event,
			 double payload, double interval)
{
	struct nrm_state *st = state_of(ctxt);
	char ev[NRM_FIELD_MAX];
	char buf[NRM_MSG_MAX];
	int len, rc;

	if (st == NULL)
		return 0;
	json_escape(ev, sizeof(ev), event);
	/* %.17g round-trips a double; JSON has no inf/nan, so clamp them. */
	if (!(payload == payload) || payload > 1e308 || payload < -1e308)
		payload = 0;
	if (!(interval == interval) || interval > 1e308 || interval < -1e308)
		interval = 0;
	len = snprintf(buf, sizeof(buf),
		       "{\"v\":1,\"type\":\"performance\",%s,\"event\":\"%s\","
		       "\"payload\":%.17g,\"interval\":%.17g}",
		       st->ids, ev, payload, interval);
	pthread_mutex_lock(&st->lock);
	rc = send_locked(st, buf, len, ZMQ_DONTWAIT);
	pthread_mutex_unlock(&st->lock);
	return rc;
}

int nrm_fini(struct nrm_context *ctxt)
{
	struct nrm_state *st = state_of(ctxt);
	char buf[NRM_MSG_MAX];
	int len, rc = 0, held, fds[NRM_HELD_MAX];
	uint64_t deadline;

	if (st == NULL)
		return 0;
	deadline = now_ns() + (uint64_t)st->linger_ms * 1000000ULL;
	pthread_mutex_lock(&st->lock);
	/* The last messages are the ones the daemon must not miss: wait for
	 * queue space, but never longer than the linger bound. */
	zmq_setsockopt(st->sock, ZMQ_SNDTIMEO, &st->linger_ms, sizeof(st->linger_ms));
	if (ctxt->acc != 0 && send_progress_locked(ctxt, st, now_ns(), 0) != 0)
		rc = -1;
	len = snprintf(buf, sizeof(buf), "{\"v\":1,\"type\":\"exit\",%s}", st->ids);
	if (send_locked(st, buf, len, 0) != 0)
		rc = -1;
	pthread_mutex_unlock(&st->lock);
	held = hold_connections(st->ipc_path, fds, NRM_HELD_MAX);
	destroy_state(st);
	release_when_read(fds, held, deadline);
	memset(ctxt, 0, sizeof(*ctxt));
	return rc;
}

int nrm_is_active(const struct nrm_context *ctxt)
{
	return state_of(ctxt) != NULL;
}

struct nrm_context *nrm_ctxt_create(void)
{
	return calloc(1, sizeof(struct nrm_context));
}

void nrm_ctxt_delete(struct nrm_context *ctxt)
{
	free(ctxt);
}
