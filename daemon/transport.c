/*
 * transport.c - the AMQP transport's owner loop and public API: one owner
 * thread holds the rabbitmq-c connection; every other thread reaches it
 * through a queue and an eventfd.  Also the count and the rate-limited log
 * of requeues, retries, resends and drops.
 *
 * Channels: CH_REQUEST consumes the shared request queue, CH_CONTROL this
 * instance's control queue, CH_PUBLISH sends replies, dead-letter copies,
 * requeue and retry copies and plugin publishes in confirm mode.  A request
 * whose settlement needs a publish is acked only once the broker has
 * confirmed that publish, so a crash in between redelivers the request
 * rather than losing its result.
 *
 * The rule of the transport: a fault that belongs to one message is an outcome
 * for that message, never a lost connection.  Every publish goes through
 * publish_checked(), which sizes it against the negotiated frame before a
 * byte is written (rabbitmq-c writes basic.publish before it finds out that
 * the header frame does not fit, which corrupts the stream); a publish that
 * cannot be sent is refused with a reason.  Deliveries are assembled from
 * frames read without blocking, so a peer that stalls in the middle of a
 * message never stops the loop.  Only socket and protocol failures call
 * transport_lose().
 *
 * Requeues and retries never use basic.reject(requeue): that would count
 * against a quorum queue's x-delivery-limit and loop at the broker's speed.
 * A requeue republishes the request (to the tail of its queue) and acks the
 * original once the copy is confirmed; a retry does the same with the
 * attempt count in x-occamy-attempts, through a delay queue whose message
 * TTL dead-letters it back to the request queue.  So the retry limit holds
 * across the fleet and on every queue type, and x-delivery-limit counts only
 * deliveries lost with their connection (crashes).
 *
 * Only the transport's files (transport*.c, amqp_fields.c) include
 * <amqp.h>; no rabbitmq-c call touches the connection outside the owner
 * thread.  transport_int.h says what each file owns.
 */
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <unistd.h>

#include "config.h"
#include "log.h"
#include "transport_int.h"

void
wake(struct transport *t)
{
	uint64_t one = 1;

	/* EAGAIN means the counter is already non-zero: awake anyway. */
	(void)!write(t->wakefd, &one, sizeof(one));
}

/* Count one event of path ("requeue", "retry", "resend", "drop",
 * "dead-letter") by its reason, and log it at most once a second per path
 * and reason, with the number of events since the last line: a flood is a
 * count, not a log storm.  The reason's label is its text up to ": " (what
 * follows is a plugin's own message).  Owner thread. */
void
event_note(struct transport *t, const char *path, const char *what, const char *reason)
{
	struct transport_event *e = NULL;
	uint64_t now = clock_now_ns(), n;
	size_t klen = strcspn(reason, ":");
	char key[sizeof(e->reason)];
	unsigned i;

	snprintf(key, sizeof(key), "%.*s", (int)klen, reason);
	pthread_mutex_lock(&t->lock);
	for (i = 0; i < t->stats.nevents; i++) {
		e = &t->stats.events[i];
		if (strcmp(e->path, path) == 0 && strcmp(e->reason, key) == 0)
			break;
	}
	if (i == t->stats.nevents) {
		/* The last entry takes whatever does not fit. */
		if (i >= TRANSPORT_EVENTS_MAX - 1) {
			i = TRANSPORT_EVENTS_MAX - 1;
			snprintf(key, sizeof(key), "other");
		}
		if (i == t->stats.nevents) {
			t->stats.nevents++;
			e = &t->stats.events[i];
			snprintf(e->path, sizeof(e->path), "%s", i == TRANSPORT_EVENTS_MAX - 1 ? "any" : path);
			snprintf(e->reason, sizeof(e->reason), "%s", key);
		}
		e = &t->stats.events[i];
	}
	e->count++;
	pthread_mutex_unlock(&t->lock);

	n = ++t->event_unlogged[i];
	if (t->event_logged_ns[i] != 0 && now - t->event_logged_ns[i] < 1000000000u)
		return;
	t->event_logged_ns[i] = now;
	t->event_unlogged[i] = 0;
	log_msg(strcmp(path, "dead-letter") == 0 || strcmp(path, "drop") == 0 ? LOG_WARNING
									       : LOG_INFO,
		n == 1 ? "%s: %s: %s" : "%s: %s: %s (%" PRIu64 " times since the last line)",
		path, what, reason, n);
}

static bool
drained(struct transport *t)
{
	bool idle;

	pthread_mutex_lock(&t->lock);
	idle = t->outstanding == 0 && STAILQ_EMPTY(&t->settled) && STAILQ_EMPTY(&t->out);
	pthread_mutex_unlock(&t->lock);
	return idle && STAILQ_EMPTY(&t->confirms) && STAILQ_EMPTY(&t->deferred);
}

static void
stop_begin(struct transport *t)
{
	t->stopping = true;
	t->stop_deadline_ns = clock_now_ns() + (uint64_t)STOP_DRAIN_MS * 1000000u;
	if (t->consuming)
		consumers_cancel(t);
}

static bool
outgoing_queued(struct transport *t)
{
	bool any;

	pthread_mutex_lock(&t->lock);
	any = !STAILQ_EMPTY(&t->out);
	pthread_mutex_unlock(&t->lock);
	return any;
}

static void
loop_wait(struct transport *t)
{
	struct pollfd fds[2];
	int timeout = TURN_MAX_MS, nfds = 1;
	uint64_t buf;

	if (t->heartbeat_ms > 0 && t->connected && (int)(t->heartbeat_ms / 2) < timeout)
		timeout = (int)(t->heartbeat_ms / 2);
	/* The turn hook may need turns more often (the systemd watchdog). */
	if (t->hooks.turn_max_ms > 0 && (int)t->hooks.turn_max_ms < timeout)
		timeout = (int)t->hooks.turn_max_ms;
	if (!t->connected) {
		uint64_t now = clock_now_ns();
		/* Rounded up: no spinning through the last millisecond. */
		uint64_t left = t->next_attempt_ns > now ? t->next_attempt_ns - now : 0;
		uint64_t ms = (left + 999999u) / 1000000u;
		if (ms < (uint64_t)timeout)
			timeout = (int)ms;
	} else if (amqp_frames_enqueued(t->conn) || amqp_data_in_buffer(t->conn)) {
		timeout = 0;
	}
	fds[0] = (struct pollfd){.fd = t->wakefd, .events = POLLIN};
	if (t->connected) {
		fds[1] = (struct pollfd){.fd = amqp_get_sockfd(t->conn), .events = POLLIN};
		nfds = 2;
	}
	if (poll(fds, (nfds_t)nfds, timeout) < 0 && errno != EINTR)
		log_warn("poll");
	if (fds[0].revents & POLLIN)
		(void)!read(t->wakefd, &buf, sizeof(buf));
}

int
transport_run(struct transport *t)
{
	struct delivery_queue late = STAILQ_HEAD_INITIALIZER(late);
	struct delivery *d;
	struct outgoing *o;
	size_t dropped = 0;
	bool stop, quiesce;

	for (;;) {
		pthread_mutex_lock(&t->lock);
		stop = t->stop;
		quiesce = t->quiesce;
		pthread_mutex_unlock(&t->lock);
		if (quiesce && t->consuming)
			consumers_cancel(t);
		if (stop && !t->stopping)
			stop_begin(t);
		/* While stopping, connect again only for plugin publishes still
		 * to be sent, until the stop deadline. */
		if (!t->connected && clock_now_ns() >= t->next_attempt_ns &&
		    (!t->stopping ||
		     (outgoing_queued(t) && clock_now_ns() < t->stop_deadline_ns)))
			connection_attempt(t);

		if (t->connected && t->reconsume_ns != 0 && clock_now_ns() >= t->reconsume_ns)
			consumers_restart(t);
		settlements_drain(t);
		outgoing_flush(t);
		if (t->connected)
			frames_read(t);
		/* Every request of the turn handed out: now start them. */
		sched_wake_held(&t->held);
		acks_flush(t);
		if (t->stopping &&
		    ((!t->connected && !outgoing_queued(t)) || drained(t) ||
		     clock_now_ns() >= t->stop_deadline_ns))
			break;
		if (t->conn != NULL)
			amqp_maybe_release_buffers(t->conn);
		if (t->hooks.turn != NULL)
			t->hooks.turn(t->hooks.ctx, t->connected);
		loop_wait(t);
	}

	if (t->connected) {
		/* Ours alone: gone now rather than at x-expires. */
		amqp_queue_delete(t->conn, CH_PUBLISH, amqp_cstring_bytes(t->control_queue), 0, 0);
		(void)amqp_get_rpc_reply(t->conn);
		connection_drop(t, true);
		log_info("AMQP connection to %s closed", t->nodes[t->node].masked);
	}
	/* From now on settle() frees directly; the broker has requeued. */
	pthread_mutex_lock(&t->lock);
	t->run_returned = true;
	STAILQ_CONCAT(&late, &t->settled);
	while ((o = STAILQ_FIRST(&t->out)) != NULL) {
		STAILQ_REMOVE_HEAD(&t->out, next);
		t->out_count--;
		t->out_bytes -= o->bytes;
		t->stats.publish_failures++;
		outgoing_free(o);
		dropped++;
	}
	pthread_mutex_unlock(&t->lock);
	if (dropped > 0)
		log_warnx("%zu plugin publishes dropped at stop: the broker could not be "
			  "reached in time", dropped);
	pthread_mutex_lock(&t->lock);
	log_info("AMQP totals: %" PRIu64 " requests, %" PRIu64 " control messages, %" PRIu64
		 " acks, %" PRIu64 " requeues, %" PRIu64 " retries, %" PRIu64 " dead letters, %"
		 PRIu64 " reconnects",
		 t->stats.deliveries, t->stats.control_deliveries, t->stats.acks, t->stats.requeues,
		 t->stats.retries, t->stats.dead_letters, t->stats.reconnects);
	pthread_mutex_unlock(&t->lock);
	while ((d = STAILQ_FIRST(&late)) != NULL) {
		STAILQ_REMOVE_HEAD(&late, next);
		STAT_ADD(t, stale_settlements, 1);
		delivery_free(d);
	}
	return 0;
}

int
transport_check_config(const struct config *cfg, char *why, size_t whylen)
{
	struct amqp_connection_info ci;
	size_t n;
	char **v = config_uri_split(cfg->uri, &n);
	struct stat st;
	int rc = 0;

	for (size_t i = 0; i < n && rc == 0; i++) {
		if (amqp_parse_url(v[i], &ci) != AMQP_STATUS_OK) {
			/* Never echo it: it may hold the password. */
			snprintf(why, whylen, "%s: [amqp] key 'uri': URI %zu of %zu cannot be "
				 "parsed as amqp[s]://user[:password]@host[:port]/[vhost]",
				 cfg->file, i + 1, n);
			rc = -1;
		}
	}
	if (rc == 0 && n == 0) {
		snprintf(why, whylen, "%s: [amqp] key 'uri': no URI", cfg->file);
		rc = -1;
	}
	config_uri_split_free(v);
	if (rc == 0 && cfg->password_file[0] != '\0') {
		if (stat(cfg->password_file, &st) != 0 || access(cfg->password_file, R_OK) != 0) {
			snprintf(why, whylen, "%s: [amqp] key 'password_file': %s: %s", cfg->file,
				 cfg->password_file, strerror(errno));
			rc = -1;
		} else if (st.st_mode & (S_IRGRP | S_IROTH)) {
			/* Like ssh with its keys, but a warning: it still works. */
			log_warnx("password_file %s is readable by group or others (mode %03o); "
				  "chmod 600 it", cfg->password_file, (unsigned)(st.st_mode & 0777));
		}
	}
	return rc;
}

/* [amqp] uri: one node per URI (config.c has checked that each parses). */
static void
nodes_parse(struct transport *t, const char *uri)
{
	char **v = config_uri_split(uri, &t->nnodes);

	if (t->nnodes == 0) {
		config_uri_split_free(v);
		v = config_uri_split("amqp://guest@127.0.0.1:5672/", &t->nnodes);
	}
	t->nodes = xcalloc(t->nnodes, sizeof(*t->nodes));
	for (size_t i = 0; i < t->nnodes; i++) {
		struct broker_node *n = &t->nodes[i];
		int rc;

		n->uri_buf = xstrdup(v[i]);
		n->masked = uri_mask(v[i]);
		amqp_default_connection_info(&n->ci);
		rc = amqp_parse_url(n->uri_buf, &n->ci);
		if (rc != AMQP_STATUS_OK) {
			/* A last resort: config.c refuses it first. */
			log_warnx("cannot parse AMQP URI %s: %s", n->masked, amqp_error_string2(rc));
			amqp_default_connection_info(&n->ci);
		}
		/* "amqp://host/" parses as the vhost "", which RabbitMQ
		 * cannot have; everyone writing it means the default vhost. */
		if (n->ci.vhost == NULL || n->ci.vhost[0] == '\0')
			n->ci.vhost = "/";
	}
	config_uri_split_free(v);
}

struct transport *
transport_new(const struct config *cfg, struct sched *s, const struct transport_hooks *hooks)
{
	struct transport *t = xcalloc(1, sizeof(*t));
	char host[200];

	nodes_parse(t, cfg->uri);
	t->password_file = xstrdup(cfg->password_file);
	t->tls_ca = xstrdup(cfg->tls_ca);
	t->tls_cert = xstrdup(cfg->tls_cert);
	t->tls_key = xstrdup(cfg->tls_key);
	t->tls_verify_peer = cfg->tls_verify_peer;
	t->tls_verify_hostname = cfg->tls_verify_hostname;
	t->heartbeat_s = cfg->heartbeat_s;
	t->prefetch = cfg->prefetch > 0 ? cfg->prefetch : cfg->slots;
	if (t->prefetch == 0)
		t->prefetch = 1;
	if (t->prefetch > 65535)
		t->prefetch = 65535;
	t->delivery_limit = cfg->delivery_limit;
	t->crash_limit = cfg->crash_limit;
	t->quorum = cfg->queue_type != NULL && strcmp(cfg->queue_type, "quorum") == 0;
	t->request_queue = xstrdup(cfg->request_queue);
	t->request_exchange = xstrdup(cfg->request_exchange);
	t->control_exchange = xstrdup(cfg->control_exchange);
	t->dl_exchange = xstrdup(cfg->dead_letter_exchange);
	t->dl_queue = xstrdup(cfg->dead_letter_queue);
	t->header_task_id = xstrdup(cfg->header_task_id);
	t->header_handler = xstrdup(cfg->header_handler);
	/* Steps of doubling delays up to the cap, one delay queue each. */
	for (unsigned ms = cfg->retry_delay_ms; ms > 0 && t->retry_steps < RETRY_STEPS_MAX;) {
		unsigned next = ms > cfg->retry_delay_max_ms / 2 ? cfg->retry_delay_max_ms : ms * 2;
		t->retry_delay_ms[t->retry_steps++] = ms;
		if (ms >= cfg->retry_delay_max_ms)
			break;
		ms = next;
	}
	if (gethostname(host, sizeof(host)) < 0)
		snprintf(host, sizeof(host), "unknown");
	host[sizeof(host) - 1] = '\0';
	/* A fleet spreads across the nodes of a cluster. */
	t->node = config_uri_start(t->nnodes, host, (unsigned long)getpid());
	snprintf(t->connection_name, sizeof(t->connection_name), "occamyd@%s:%ld", host,
		 (long)getpid());
	t->consuming = true;
	t->sched = s;
	if (hooks != NULL)
		t->hooks = *hooks;

	t->wakefd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (t->wakefd < 0)
		fatal("eventfd");
	pthread_mutex_init(&t->lock, NULL);
	STAILQ_INIT(&t->settled);
	STAILQ_INIT(&t->out);
	STAILQ_INIT(&t->confirms);
	STAILQ_INIT(&t->deferred);
	backoff_init(&t->backoff, BACKOFF_MIN_MS, BACKOFF_MAX_MS,
		     clock_now_ns() ^ ((uint64_t)getpid() << 32) ^ (uint64_t)(uintptr_t)t);
	/* Stable for this process, unique across restarts and hosts. */
	snprintf(t->control_queue, sizeof(t->control_queue), "%.120s.%.64s.%ld.%04x",
		 t->control_exchange, host, (long)getpid(), (unsigned)(backoff_random(&t->backoff) & 0xffff));
	t->frame_max_shared = AMQP_DEFAULT_FRAME_SIZE; /* until connected */
	return t;
}

void
transport_set_records(struct transport *t, struct records *r)
{
	t->records = r;
}

/* Raise one of the loop's flags (t->lock) and wake the loop to act on it. */
static void
loop_flag_raise(struct transport *t, bool *flag)
{
	pthread_mutex_lock(&t->lock);
	*flag = true;
	pthread_mutex_unlock(&t->lock);
	wake(t);
}

void
transport_quiesce(struct transport *t)
{
	loop_flag_raise(t, &t->quiesce);
}

void
transport_stop(struct transport *t)
{
	loop_flag_raise(t, &t->stop);
}

int
transport_publish(struct transport *t, enum publish_kind kind, const char *name,
		  const struct occamy_kv *headers, size_t nheaders, const void *body,
		  size_t len)
{
	struct outgoing *o;
	char why[REASON_MAX];
	int ok;

	if (outgoing_check(t, name, headers, nheaders, body, len, why, sizeof(why)) < 0) {
		pthread_mutex_lock(&t->lock);
		t->stats.publish_refused++;
		pthread_mutex_unlock(&t->lock);
		log_warnx("plugin publish refused: %s", why);
		return -1;
	}
	o = xcalloc(1, sizeof(*o));
	o->kind = kind;
	o->name = name != NULL ? xstrdup(name) : NULL;
	o->bytes = sizeof(*o) + len + (name != NULL ? strlen(name) : 0);
	if (nheaders > 0) {
		o->headers = xcalloc(nheaders, sizeof(*o->headers));
		for (size_t i = 0; i < nheaders; i++) {
			/* Key and value share one allocation. */
			const char *k = headers[i].key;
			const char *v = headers[i].value != NULL ? headers[i].value : "";
			size_t kl = strlen(k), vl = strlen(v);
			char *kv = xmalloc(kl + vl + 2);
			memcpy(kv, k, kl + 1);
			memcpy(kv + kl + 1, v, vl + 1);
			o->headers[i].key = kv;
			o->headers[i].value = kv + kl + 1;
			o->bytes += kl + vl + 2;
		}
		o->nheaders = nheaders;
	}
	o->len = len;
	if (len > 0) {
		o->body = xmalloc(len);
		memcpy(o->body, body, len);
	}

	pthread_mutex_lock(&t->lock);
	ok = t->stats.connected && !t->stop && t->out_count < OUTQ_MAX &&
	     t->out_bytes + o->bytes <= OUTQ_BYTES_MAX;
	if (ok) {
		STAILQ_INSERT_TAIL(&t->out, o, next);
		t->out_count++;
		t->out_bytes += o->bytes;
	}
	pthread_mutex_unlock(&t->lock);
	if (!ok) {
		outgoing_free(o);
		return -1;
	}
	wake(t);
	return 0;
}

void
transport_get_stats(struct transport *t, struct transport_stats *out)
{
	pthread_mutex_lock(&t->lock);
	*out = t->stats;
	pthread_mutex_unlock(&t->lock);
}

void
transport_destroy(struct transport *t)
{
	struct outgoing *o;
	struct delivery *d;

	while ((d = STAILQ_FIRST(&t->settled)) != NULL) {
		STAILQ_REMOVE_HEAD(&t->settled, next);
		delivery_free(d);
	}
	while ((o = STAILQ_FIRST(&t->out)) != NULL) {
		STAILQ_REMOVE_HEAD(&t->out, next);
		outgoing_free(o);
	}
	close(t->wakefd);
	ack_window_free(&t->acks[CH_REQUEST]);
	ack_window_free(&t->acks[CH_CONTROL]);
	pthread_mutex_destroy(&t->lock);
	free(t->scratch);
	for (size_t i = 0; i < t->nnodes; i++) {
		explicit_bzero(t->nodes[i].uri_buf, strlen(t->nodes[i].uri_buf));
		free(t->nodes[i].uri_buf);
		free(t->nodes[i].masked);
	}
	FREE_ALL(t->nodes, t->password_file, t->tls_ca, t->tls_cert, t->tls_key,
		 t->request_queue, t->request_exchange, t->control_exchange, t->dl_exchange,
		 t->dl_queue, t->header_task_id, t->header_handler, t);
}

void
transport_free(struct transport *t)
{
	size_t out;

	if (t == NULL)
		return;
	/* A slot thread wedged in a plugin may still settle later: the last
	 * settlement frees the transport then. */
	pthread_mutex_lock(&t->lock);
	t->run_returned = true;
	t->free_requested = true;
	out = t->outstanding;
	pthread_mutex_unlock(&t->lock);
	if (out == 0)
		transport_destroy(t);
	else
		log_debug("%zu deliveries still out; the transport goes with the last", out);
}
