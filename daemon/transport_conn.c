/*
 * transport_conn.c - one connection's life: TCP or TLS, login with a
 * negotiated frame size, the topology (a table of declares), consuming, and
 * the one path every kind of loss takes (connection_drop).  Owner thread.
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

#include <amqp_ssl_socket.h>
#include <amqp_tcp_socket.h>

#include "config.h"
#include "log.h"
#include "transport_int.h"

/* The first line of path, without its newline. */
static int
password_read(const char *path, char *buf, size_t len, char *why, size_t whylen)
{
	FILE *f = fopen(path, "re");
	size_t n;

	if (f == NULL) {
		snprintf(why, whylen, "password_file %s: %s", path, strerror(errno));
		return -1;
	}

	if (fgets(buf, (int)len, f) == NULL) {
		snprintf(why, whylen, "password_file %s: empty", path);
		fclose(f);
		return -1;
	}
	fclose(f);
	n = strcspn(buf, "\r\n");
	buf[n] = '\0';
	return 0;
}

/* Close (politely if clean: the broker is still talking to us) and free
 * the rabbitmq-c connection. */
static void
connection_close(struct transport *t, bool clean)
{
	if (t->conn == NULL)
		return;
	if (clean) {
		struct timeval tv = {1, 0};
		amqp_set_rpc_timeout(t->conn, &tv);
		(void)amqp_connection_close(t->conn, AMQP_REPLY_SUCCESS);
	}
	amqp_destroy_connection(t->conn);
	t->conn = NULL;
}

/* Drop everything that belongs to the current connection and close it.
 * One path for every kind of loss. */
void
connection_drop(struct transport *t, bool clean)
{
	struct pending *p;
	struct delivery *d;
	struct outgoing_queue back = STAILQ_HEAD_INITIALIZER(back);
	bool was_connected = t->connected;
	size_t stale = 0;

	t->connected = false;
	t->blocked = false;
	t->reconsume_ns = 0;
	memset(t->reconsume, 0, sizeof(t->reconsume));
	t->generation++;
	ack_window_reset(&t->acks[CH_REQUEST]);
	ack_window_reset(&t->acks[CH_CONTROL]);
	pthread_mutex_lock(&t->lock);
	t->stats.connected = false;
	pthread_mutex_unlock(&t->lock);

	while ((p = STAILQ_FIRST(&t->confirms)) != NULL) {
		STAILQ_REMOVE_HEAD(&t->confirms, next);
		if (p->d != NULL) {
			/* A dead letter and its error reply share one. */
			if (--p->d->confirms_left == 0) {
				delivery_free(p->d);
				stale++;
			}
		} else if (p->o->sends >= RESENDS_MAX) {
			/* Lost with its connection every time: it may be
			 * what breaks it.  At least once, not for ever. */
			outgoing_drop(t, p->o, "resend", "unconfirmed after 3 sends");
		} else {
			event_note(t, "resend", "plugin publish", "connection lost before its confirm");
			STAILQ_INSERT_TAIL(&back, p->o, next);
		}
		free(p);
	}
	outgoing_requeue(t, &back);
	for (unsigned ch = 0; ch <= CH_PUBLISH; ch++) {
		if (t->in[ch].state != IN_IDLE)
			amqp_destroy_message(&t->in[ch].msg);
		memset(&t->in[ch], 0, sizeof(t->in[ch]));
	}
	while ((d = STAILQ_FIRST(&t->deferred)) != NULL) {
		STAILQ_REMOVE_HEAD(&t->deferred, next);
		delivery_free(d);
		stale++;
	}
	if (stale > 0)
		STAT_ADD(t, stale_settlements, stale);

	connection_close(t, clean);

	if (was_connected) {
		if (t->hooks.state != NULL)
			t->hooks.state(t->hooks.ctx, false);
		/* The broker requeues every unacked delivery of the old
		 * connection: whatever runs for them is wasted work. */
		if (t->sched != NULL)
			sched_cancel_requests(t->sched);
	}
}

/* Lost: log once, drop, and schedule a reconnect. */
static void node_next(struct transport *t);

void
transport_lose(struct transport *t, bool clean, const char *fmt, ...)
{
	char why[512];
	va_list ap;
	uint64_t now = clock_now_ns();

	if (!t->connected)
		return;
	va_start(ap, fmt);
	vsnprintf(why, sizeof(why), fmt, ap);
	va_end(ap);
	log_warnx("AMQP connection to %s lost: %s; reconnecting%s", t->nodes[t->node].masked,
		  why, t->nnodes > 1 ? " to the next node" : "");
	if (now - t->connected_since_ns >= (uint64_t)STABLE_MS * 1000000u)
		backoff_reset(&t->backoff);
	t->failures = 0;
	t->next_attempt_ns = now + (uint64_t)backoff_now(&t->backoff) * 1000000u;
	connection_drop(t, clean);
	node_next(t);
}

/* Fail over: the next node of [amqp] uri, round the list. */
static void
node_next(struct transport *t)
{
	if (t->nnodes > 1)
		t->node = (t->node + 1) % t->nnodes;
}

static bool
rpc_ok(struct transport *t, const char *what, char *why, size_t whylen, bool *clean)
{
	amqp_rpc_reply_t r = amqp_get_rpc_reply(t->conn);
	char desc[300];

	if (r.reply_type == AMQP_RESPONSE_NORMAL)
		return true;
	reply_describe(r, desc, sizeof(desc));
	snprintf(why, whylen, "%s: %s", what, desc);
	*clean = false;
	if (r.reply_type == AMQP_RESPONSE_SERVER_EXCEPTION) {
		if (r.reply.id == AMQP_CONNECTION_CLOSE_METHOD) {
			amqp_connection_close_ok_t ok = {0};
			(void)amqp_send_method(t->conn, 0, AMQP_CONNECTION_CLOSE_OK_METHOD, &ok);
		} else {
			*clean = true; /* only a channel died */
		}
	}
	return false;
}

static struct declare *
topology_add(struct topology *tp, enum declare_kind kind, const char *name,
	     const char *exchange, const char *key, bool durable)
{
	struct declare *d = &tp->steps[tp->n++];

	*d = (struct declare){.kind = kind, .name = name, .exchange = exchange, .key = key,
			      .durable = durable};
	return d;
}

static void
topology_plan(const struct transport *t, struct topology *tp)
{
	const char *qtype = t->quorum ? "quorum" : "classic";
	struct declare *d;

	tp->n = 0;
	/* Dead letters: a fanout, so copies with any routing key (ours carry
	 * the source queue's name) and the broker's own land in one queue. */
	topology_add(tp, DECLARE_EXCHANGE, t->dl_exchange, "fanout", NULL, true);
	d = topology_add(tp, DECLARE_QUEUE, t->dl_queue, NULL, NULL, true);
	d->args[d->nargs++] = entry_string("x-queue-type", qtype);
	topology_add(tp, DECLARE_BIND, t->dl_queue, t->dl_exchange, t->dl_queue, true);

	/* Requests: one durable queue shared by every instance. */
	topology_add(tp, DECLARE_EXCHANGE, t->request_exchange, "direct", NULL, true);
	d = topology_add(tp, DECLARE_QUEUE, t->request_queue, NULL, NULL, true);
	d->args[d->nargs++] = entry_string("x-queue-type", qtype);
	d->args[d->nargs++] = entry_string("x-dead-letter-exchange", t->dl_exchange);
	/* Our own requeues and retries are new copies, so on a quorum queue
	 * this counts only deliveries lost with their connection: a guard
	 * against a request that crashes every daemon it reaches. */
	if (t->quorum && t->delivery_limit > 0)
		d->args[d->nargs++] = entry_int("x-delivery-limit", t->delivery_limit);
	topology_add(tp, DECLARE_BIND, t->request_queue, t->request_exchange, t->request_queue,
		     true);

	/* Retries wait in a delay queue per step: no consumer, a message TTL,
	 * and dead-lettering back to the request queue. */
	for (unsigned k = 0; k < t->retry_steps; k++) {
		snprintf(tp->retry_names[k], sizeof(tp->retry_names[k]), "%s.retry.%u",
			 t->request_queue, t->retry_delay_ms[k]);
		d = topology_add(tp, DECLARE_QUEUE, tp->retry_names[k], NULL, NULL, true);
		d->args[d->nargs++] = entry_string("x-queue-type", qtype);
		d->args[d->nargs++] = entry_int("x-message-ttl", t->retry_delay_ms[k]);
		d->args[d->nargs++] = entry_string("x-dead-letter-exchange", t->request_exchange);
		d->args[d->nargs++] = entry_string("x-dead-letter-routing-key", t->request_queue);
		if (t->quorum) {
			/* A quorum queue dead-letters at most once unless
			 * told otherwise: a retry must not get lost. */
			d->args[d->nargs++] = entry_string("x-dead-letter-strategy", "at-least-once");
			d->args[d->nargs++] = entry_string("x-overflow", "reject-publish");
		}
	}

	/* Control: a fanout into one queue per instance.  Not exclusive and
	 * not auto-delete, so that it and its binding outlive a reconnect
	 * and nothing published meanwhile is lost; x-expires removes the
	 * queue of a daemon that is gone. */
	topology_add(tp, DECLARE_EXCHANGE, t->control_exchange, "fanout", NULL, true);
	d = topology_add(tp, DECLARE_QUEUE, t->control_queue, NULL, NULL, false);
	d->args[d->nargs++] = entry_string("x-dead-letter-exchange", t->dl_exchange);
	d->args[d->nargs++] = entry_int("x-expires", CONTROL_QUEUE_EXPIRES_MS);
	topology_add(tp, DECLARE_BIND, t->control_queue, t->control_exchange, "", true);
}

static int
topology_declare(struct transport *t, char *why, size_t whylen, bool *clean)
{
	static const char *const verb[] = {"declaring exchange", "declaring queue", "binding queue"};
	struct topology tp;
	char what[400];

	topology_plan(t, &tp);
	for (size_t i = 0; i < tp.n; i++) {
		const struct declare *d = &tp.steps[i];
		amqp_table_t args = {d->nargs, (amqp_table_entry_t *)d->args};

		switch (d->kind) {
		case DECLARE_EXCHANGE:
			amqp_exchange_declare(t->conn, CH_PUBLISH, amqp_cstring_bytes(d->name),
					      amqp_cstring_bytes(d->exchange), 0, d->durable, 0, 0,
					      amqp_empty_table);
			break;
		case DECLARE_QUEUE:
			amqp_queue_declare(t->conn, CH_PUBLISH, amqp_cstring_bytes(d->name), 0,
					   d->durable, 0, 0, args);
			break;
		case DECLARE_BIND:
			amqp_queue_bind(t->conn, CH_PUBLISH, amqp_cstring_bytes(d->name),
					amqp_cstring_bytes(d->exchange), amqp_cstring_bytes(d->key),
					amqp_empty_table);
			break;
		}
		snprintf(what, sizeof(what), "%s '%s'", verb[d->kind], d->name);
		if (!rpc_ok(t, what, why, whylen, clean))
			return -1;
	}
	return 0;
}

static int
login(struct transport *t, char *why, size_t whylen, bool *clean)
{
	amqp_table_entry_t caps[4], props[4];
	amqp_table_t props_table = {4, props};
	char password[PASSWORD_MAX];
	const char *pass = t->nodes[t->node].ci.password;
	amqp_rpc_reply_t r;

	if (t->password_file[0] != '\0') {
		if (password_read(t->password_file, password, sizeof(password), why,
				  whylen) < 0)
			return -1;
		pass = password;
	}
	caps[0] = entry_bool("consumer_cancel_notify", true);
	caps[1] = entry_bool("publisher_confirms", true);
	caps[2] = entry_bool("basic.nack", true);
	caps[3] = entry_bool("connection.blocked", true);
	props[0] = entry_string("connection_name", t->connection_name);
	props[1] = entry_string("product", "occamyd");
	props[2] = entry_string("version", OCCAMY_VERSION);
	memset(&props[3], 0, sizeof(props[3]));
	props[3].key = amqp_cstring_bytes("capabilities");
	props[3].value.kind = AMQP_FIELD_KIND_TABLE;
	props[3].value.value.table = (amqp_table_t){4, caps};

	r = amqp_login_with_properties(t->conn, t->nodes[t->node].ci.vhost, 0, FRAME_MAX_WANTED,
				       (int)t->heartbeat_s, &props_table,
				       AMQP_SASL_METHOD_PLAIN, t->nodes[t->node].ci.user, pass);
	if (pass == password)
		explicit_bzero(password, sizeof(password));
	if (r.reply_type != AMQP_RESPONSE_NORMAL) {
		char desc[300];
		reply_describe(r, desc, sizeof(desc));
		snprintf(why, whylen, "login as '%s': %s", t->nodes[t->node].ci.user, desc);
		*clean = false;
		return -1;
	}
	return 0;
}

/* basic.consume on the request (CH_REQUEST) or control (CH_CONTROL) queue. */
static int
consumer_start(struct transport *t, amqp_channel_t ch, char *why, size_t whylen, bool *clean)
{
	bool req = ch == CH_REQUEST;

	amqp_basic_consume(t->conn, ch, amqp_cstring_bytes(req ? t->request_queue : t->control_queue),
			   amqp_cstring_bytes(req ? "occamyd-requests" : "occamyd-control"), 0, 0, 0,
			   amqp_empty_table);
	return rpc_ok(t, req ? "consuming the request queue" : "consuming the control queue", why,
		      whylen, clean) ? 0 : -1;
}

static int
connection_open(struct transport *t, char *why, size_t whylen, bool *clean)
{
	struct timeval tv = {IO_TIMEOUT_S, 0};
	amqp_socket_t *sock;
	int rc;

	*clean = false;
	t->conn = amqp_new_connection();
	if (t->conn == NULL)
		fatalx("amqp_new_connection: out of memory");
	if (t->nodes[t->node].ci.ssl) {
		sock = amqp_ssl_socket_new(t->conn);
		if (sock == NULL) {
			snprintf(why, whylen, "cannot create a TLS socket");
			return -1;
		}
		amqp_ssl_socket_set_verify_peer(sock, t->tls_verify_peer);
		amqp_ssl_socket_set_verify_hostname(sock, t->tls_verify_hostname);
		if (t->tls_ca[0] != '\0' &&
		    (rc = amqp_ssl_socket_set_cacert(sock, t->tls_ca)) != AMQP_STATUS_OK) {
			snprintf(why, whylen, "tls_ca %s: %s", t->tls_ca,
				 amqp_error_string2(rc));
			return -1;
		}
		if (t->tls_cert[0] != '\0' &&
		    (rc = amqp_ssl_socket_set_key(sock, t->tls_cert, t->tls_key)) !=
			    AMQP_STATUS_OK) {
			snprintf(why, whylen, "tls_cert %s / tls_key %s: %s", t->tls_cert,
				 t->tls_key, amqp_error_string2(rc));
			return -1;
		}
	} else {
		sock = amqp_tcp_socket_new(t->conn);
		if (sock == NULL)
			fatalx("amqp_tcp_socket_new: out of memory");
	}
	rc = amqp_socket_open_noblock(sock, t->nodes[t->node].ci.host, t->nodes[t->node].ci.port, &tv);
	if (rc != AMQP_STATUS_OK) {
		snprintf(why, whylen, "%s", amqp_error_string2(rc));
		return -1;
	}
	amqp_set_handshake_timeout(t->conn, &tv);
	amqp_set_rpc_timeout(t->conn, &tv);
	if (login(t, why, whylen, clean) < 0)
		return -1;
	*clean = true;
	/* What we send stays within the negotiated frame (publish_checked);
	 * what we accept may be larger (FRAME_RECV_FACTOR). */
	t->frame_max = (unsigned)amqp_get_frame_max(t->conn);
	free(t->scratch);
	t->scratch = xmalloc(t->frame_max);
	rc = amqp_tune_connection(t->conn, amqp_get_channel_max(t->conn),
				  (int)(t->frame_max * FRAME_RECV_FACTOR), amqp_get_heartbeat(t->conn));
	if (rc != AMQP_STATUS_OK) {
		snprintf(why, whylen, "raising the receive frame size: %s", amqp_error_string2(rc));
		return -1;
	}
	pthread_mutex_lock(&t->lock);
	t->frame_max_shared = t->frame_max;
	t->stats.frame_max = t->frame_max;
	pthread_mutex_unlock(&t->lock);

	for (amqp_channel_t ch = CH_REQUEST; ch <= CH_PUBLISH; ch++) {
		amqp_channel_open(t->conn, ch);
		if (!rpc_ok(t, "opening a channel", why, whylen, clean))
			return -1;
	}
	if (topology_declare(t, why, whylen, clean) < 0)
		return -1;
	amqp_confirm_select(t->conn, CH_PUBLISH);
	if (!rpc_ok(t, "confirm.select", why, whylen, clean))
		return -1;
	/* The control channel stays unlimited: the scheduler settles control
	 * messages quickly, and a help request it stores must not hold back
	 * the control messages behind it. */
	amqp_basic_qos(t->conn, CH_REQUEST, 0, (uint16_t)t->prefetch, 0);
	if (!rpc_ok(t, "basic.qos", why, whylen, clean))
		return -1;
	if (!t->consuming)
		return 0; /* quiesced: connected only to settle and publish */
	if (consumer_start(t, CH_REQUEST, why, whylen, clean) < 0 ||
	    consumer_start(t, CH_CONTROL, why, whylen, clean) < 0)
		return -1;
	return 0;
}

void
connection_attempt(struct transport *t)
{
	char why[512] = "";
	bool clean = false;
	uint64_t now;

	if (connection_open(t, why, sizeof(why), &clean) == 0) {
		t->connected = true;
		t->blocked = false;
		t->next_seq = 0;
		t->connected_since_ns = clock_now_ns();
		t->heartbeat_ms = (unsigned)amqp_get_heartbeat(t->conn) * 1000u;
		if (t->failures > 0)
			log_info("connected to %s after %u failed attempts", t->nodes[t->node].masked,
				 t->failures);
		else
			log_info("connected to %s", t->nodes[t->node].masked);
		log_debug("AMQP heartbeat %u s, prefetch %u, control queue %s",
			  t->heartbeat_ms / 1000, t->prefetch, t->control_queue);
		t->failures = 0;
		pthread_mutex_lock(&t->lock);
		t->stats.connected = true;
		t->stats.reconnects += t->generation > 0;
		pthread_mutex_unlock(&t->lock);
		if (t->hooks.state != NULL)
			t->hooks.state(t->hooks.ctx, true);
		return;
	}

	connection_close(t, clean);
	now = clock_now_ns();
	t->failures++;
	/* Log the first failure at each node and then every tenth, not
	 * every retry. */
	if (t->failures <= t->nnodes || t->failures % 10 == 0)
		log_warnx("cannot connect to %s: %s (attempt %u; retrying every %u s at most%s)",
			  t->nodes[t->node].masked, why, t->failures, BACKOFF_MAX_MS / 1000,
			  t->nnodes > 1 ? ", at the next node" : "");
	t->next_attempt_ns = now + (uint64_t)backoff_next(&t->backoff) * 1000000u;
	node_next(t);
}

/* The broker cancelled a consumer (its queue was deleted, or a quorum
 * queue lost its leader): declare the topology again and consume again on
 * the same channel, so what runs keeps its delivery tags.  Once a
 * RECONSUME_MS at most. */
void
consumers_restart(struct transport *t)
{
	char why[512];
	bool clean = true;

	t->reconsume_ns = 0;
	if (!t->consuming)
		return;
	if (topology_declare(t, why, sizeof(why), &clean) == 0 &&
	    (!t->reconsume[CH_REQUEST] || consumer_start(t, CH_REQUEST, why, sizeof(why), &clean) == 0) &&
	    (!t->reconsume[CH_CONTROL] || consumer_start(t, CH_CONTROL, why, sizeof(why), &clean) == 0)) {
		log_info("consuming again after the broker cancelled a consumer");
		t->reconsume[CH_REQUEST] = t->reconsume[CH_CONTROL] = false;
		return;
	}
	transport_lose(t, clean, "consuming again: %s", why);
}

/* No new work: cancel both consumers; what arrives before cancel-ok goes
 * to the scheduler, which is shutting down and requeues it.  The
 * connection stays, to settle what runs. */
void
consumers_cancel(struct transport *t)
{
	t->consuming = false;
	if (!t->connected)
		return;
	amqp_basic_cancel(t->conn, CH_REQUEST, amqp_cstring_bytes("occamyd-requests"));
	if (amqp_get_rpc_reply(t->conn).reply_type == AMQP_RESPONSE_NORMAL)
		amqp_basic_cancel(t->conn, CH_CONTROL, amqp_cstring_bytes("occamyd-control"));
	if (amqp_get_rpc_reply(t->conn).reply_type != AMQP_RESPONSE_NORMAL)
		transport_lose(t, false, "cancelling consumers for shutdown");
	else
		log_info("consumers cancelled: no new requests");
}
