/*
 * amqp.c - the AMQP transport: one owner thread holds the rabbitmq-c
 * connection; every other thread reaches it through a queue and an eventfd.
 *
 * Channels: CH_REQUEST consumes the shared request queue, CH_CONTROL this
 * instance's control queue, CH_PUBLISH sends replies, dead-letter copies
 * and plugin publishes in confirm mode.  A request whose settlement needs a
 * publish (a reply, a dead-letter copy) is acked only once the broker has
 * confirmed that publish, so a crash in between redelivers the request
 * rather than losing its result.  Plugin publishes are resent after a
 * reconnect until confirmed: at least once.
 *
 * Retry limits: quorum queues count deliveries (x-delivery-count); classic
 * queues do not, so retries are counted here per message fingerprint.
 *
 * Only this file includes <amqp.h>; no rabbitmq-c call touches the
 * connection outside the owner thread.
 */
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <amqp.h>
#include <amqp_ssl_socket.h>
#include <amqp_tcp_socket.h>

#include "amqp.h"
#include "config.h"
#include "log.h"
#include "sched.h"

#ifndef OCCAMY_VERSION
#define OCCAMY_VERSION "dev"
#endif

enum {
	CH_REQUEST = 1,
	CH_CONTROL = 2,
	CH_PUBLISH = 3,
};

#define HEADERS_MAX 256             /* more: the delivery is refused */
#define HEADER_VALUE_MAX 65536      /* bytes of one string header */
#define OUTQ_MAX 10000              /* plugin publishes queued or unconfirmed */
#define OUTQ_BYTES_MAX (64u << 20)
#define BACKOFF_MIN_MS 100
#define BACKOFF_MAX_MS 10000
#define STABLE_MS 5000              /* up this long: backoff starts over */
#define TURN_MAX_MS 500             /* so that a stop is prompt */
#define STOP_DRAIN_MS 2000
#define IO_TIMEOUT_S 5              /* connect, login and each RPC */
#define FRAMES_PER_TURN 256
#define REASON_MAX 256
#define PASSWORD_MAX 1024
#define RETRY_SLOTS 1024            /* classic queues: retries remembered */

/* A delivery as the scheduler receives it (base) plus what the transport
 * needs to settle it.  The rabbitmq-c message (properties, headers, body)
 * is taken over from the envelope as is: it is plain memory, and a
 * dead-letter copy needs the original properties. */
struct delivery {
	struct message base; /* first */
	struct transport *t;
	struct delivery *next; /* in t->settled or t->deferred */
	uint64_t generation;
	uint64_t tag;
	amqp_channel_t channel;
	int64_t delivery_count; /* earlier deliveries; -1 while unknown */
	amqp_message_t msg;
	struct occamy_header *items; /* base.headers; strings in the same block */

	/* The settlement, copied when settle() is called. */
	enum settle_outcome outcome;
	const char *handler_outcome; /* for the dead-letter copy */
	bool is_command;             /* x-occamy-command: answered by the daemon */
	char reason[REASON_MAX];
	void *reply;
	size_t reply_len;
	char content_type[128];
};

/* A plugin publish, deep-copied by transport_publish(). */
struct outgoing {
	struct outgoing *next;
	enum publish_kind kind;
	char *name;
	struct occamy_kv *headers;
	size_t nheaders;
	void *body;
	size_t len;
	size_t bytes;
};

enum pending_kind { PENDING_REPLY, PENDING_DEAD_LETTER, PENDING_PUBLISH };

/* A publish on CH_PUBLISH waiting for the broker's basic.ack/nack. */
struct pending {
	struct pending *next;
	uint64_t seq;
	enum pending_kind kind;
	struct delivery *d;
	struct outgoing *o;
};

struct transport {
	/* Settings, copied at transport_new(). */
	char *uri_buf;  /* amqp_parse_url() points into this */
	struct amqp_connection_info ci;
	char *uri_masked;
	char *password_file;
	char *tls_ca, *tls_cert, *tls_key;
	bool tls_verify_peer, tls_verify_hostname;
	unsigned heartbeat_s, prefetch, delivery_limit;
	bool quorum;
	char *request_queue, *request_exchange, *control_exchange;
	char *dl_exchange, *dl_queue;
	char *header_task_id, *header_handler;
	char connection_name[256];
	struct sched *sched;
	struct transport_hooks hooks;
	int wakefd;

	/* lock guards this block. */
	pthread_mutex_t lock;
	struct delivery *settled, **settled_tail; /* settle() -> owner */
	struct outgoing *out, **out_tail;         /* publish() -> owner */
	size_t out_count, out_bytes;              /* queued or unconfirmed */
	size_t outstanding;  /* deliveries handed out and not yet settled */
	bool stop;
	bool run_returned;   /* settle() frees directly from now on */
	bool free_requested; /* free when the last outstanding is settled */
	struct transport_stats stats;

	/* Owner thread only. */
	amqp_connection_state_t conn;
	bool connected;
	bool blocked;        /* connection.blocked: hold publishes */
	bool stopping;
	uint64_t stop_deadline_ns;
	uint64_t generation;
	uint64_t next_seq;   /* last publish sequence number on CH_PUBLISH */
	struct pending *confirms, **confirms_tail;
	struct delivery *deferred, **deferred_tail; /* need a publish; blocked */
	char control_queue[256];
	unsigned heartbeat_ms; /* negotiated */
	unsigned backoff_ms;
	unsigned failures;     /* consecutive failed attempts */
	uint64_t next_attempt_ns;
	uint64_t connected_since_ns;
	uint64_t rng;
	/* Classic queues carry no delivery count: retries of a message are
	 * counted here by fingerprint (direct-mapped, newest wins). */
	struct retry_slot {
		uint64_t fingerprint;
		uint32_t count;
	} retries[RETRY_SLOTS];
};

static void delivery_settle(struct message *m, const struct settlement *s);

static const struct message_ops delivery_ops = {
	.settle = delivery_settle,
};

/* ---- small helpers ---------------------------------------------------- */

static uint64_t
now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static amqp_bytes_t
bytes_of(const char *s)
{
	return amqp_cstring_bytes(s != NULL ? s : "");
}

static amqp_table_entry_t
entry_string(const char *key, const char *value)
{
	amqp_table_entry_t e;

	memset(&e, 0, sizeof(e));
	e.key = amqp_cstring_bytes(key);
	e.value.kind = AMQP_FIELD_KIND_UTF8;
	e.value.value.bytes = bytes_of(value);
	return e;
}

static amqp_table_entry_t
entry_bool(const char *key, bool value)
{
	amqp_table_entry_t e;

	memset(&e, 0, sizeof(e));
	e.key = amqp_cstring_bytes(key);
	e.value.kind = AMQP_FIELD_KIND_BOOLEAN;
	e.value.value.boolean = value;
	return e;
}

static amqp_table_entry_t
entry_int(const char *key, int64_t value)
{
	amqp_table_entry_t e;

	memset(&e, 0, sizeof(e));
	e.key = amqp_cstring_bytes(key);
	e.value.kind = AMQP_FIELD_KIND_I64;
	e.value.value.i64 = value;
	return e;
}

static bool
bytes_equal(amqp_bytes_t b, const char *s)
{
	size_t n = strlen(s);

	return b.len == n && (n == 0 || memcmp(b.bytes, s, n) == 0);
}

/* Why an RPC failed, as one line. */
static void
reply_describe(amqp_rpc_reply_t r, char *buf, size_t len)
{
	switch (r.reply_type) {
	case AMQP_RESPONSE_NORMAL:
		snprintf(buf, len, "ok");
		break;
	case AMQP_RESPONSE_NONE:
		snprintf(buf, len, "no reply (missing RPC reply type)");
		break;
	case AMQP_RESPONSE_LIBRARY_EXCEPTION:
		snprintf(buf, len, "%s", amqp_error_string2(r.library_error));
		break;
	case AMQP_RESPONSE_SERVER_EXCEPTION:
		if (r.reply.id == AMQP_CONNECTION_CLOSE_METHOD) {
			const amqp_connection_close_t *c = r.reply.decoded;
			snprintf(buf, len, "connection closed by the broker: %u %.*s",
				 c->reply_code, (int)c->reply_text.len,
				 (const char *)c->reply_text.bytes);
		} else if (r.reply.id == AMQP_CHANNEL_CLOSE_METHOD) {
			const amqp_channel_close_t *c = r.reply.decoded;
			snprintf(buf, len, "channel closed by the broker: %u %.*s",
				 c->reply_code, (int)c->reply_text.len,
				 (const char *)c->reply_text.bytes);
		} else {
			snprintf(buf, len, "unexpected broker method %s",
				 amqp_method_name(r.reply.id));
		}
		break;
	}
}

/* "amqp://user:secret@host/" -> "amqp://user:***@host/" */
static char *
uri_mask(const char *uri)
{
	const char *auth = strstr(uri, "://");
	const char *end, *at, *colon;
	char *out;

	if (auth == NULL)
		return xstrdup(uri);
	auth += 3;
	end = auth + strcspn(auth, "/?#");
	at = NULL;
	for (const char *p = auth; p < end; p++)
		if (*p == '@')
			at = p;
	if (at == NULL)
		return xstrdup(uri);
	colon = memchr(auth, ':', (size_t)(at - auth));
	if (colon == NULL)
		return xstrdup(uri);
	out = xmalloc(strlen(uri) + 4);
	sprintf(out, "%.*s***%s", (int)(colon + 1 - uri), uri, at);
	return out;
}

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

static void
wake(struct transport *t)
{
	uint64_t one = 1;

	/* EAGAIN means the counter is already non-zero: awake anyway. */
	(void)!write(t->wakefd, &one, sizeof(one));
}

#define STAT_ADD(t, field, n)                                                  \
	do {                                                                   \
		pthread_mutex_lock(&(t)->lock);                                \
		(t)->stats.field += (n);                                       \
		pthread_mutex_unlock(&(t)->lock);                              \
	} while (0)

/* ---- headers ---------------------------------------------------------- */

/* Flatten an AMQP table into d->items (one allocation).  Refuses what would
 * make us allocate without bound. */
static int
headers_convert(struct delivery *d, char *why, size_t whylen)
{
	const amqp_basic_properties_t *p = &d->msg.properties;
	const amqp_table_t *tbl = &p->headers;
	size_t n, size, i;
	struct occamy_header *items;
	char *s;

	if (!(p->_flags & AMQP_BASIC_HEADERS_FLAG) || tbl->num_entries <= 0)
		return 0;
	n = (size_t)tbl->num_entries;
	if (n > HEADERS_MAX) {
		snprintf(why, whylen, "too many headers (%zu > %d)", n, HEADERS_MAX);
		return -1;
	}
	size = n * sizeof(*items);
	for (i = 0; i < n; i++) {
		const amqp_table_entry_t *e = &tbl->entries[i];
		/* Keys are C strings to plugins: "task-id\0x" must not pass
		 * for "task-id". */
		if (e->key.len > 0 && memchr(e->key.bytes, '\0', e->key.len) != NULL) {
			snprintf(why, whylen, "header key with a NUL byte");
			return -1;
		}
		size += e->key.len + 1;
		if (e->value.kind == AMQP_FIELD_KIND_UTF8) {
			if (e->value.value.bytes.len > HEADER_VALUE_MAX) {
				snprintf(why, whylen,
					 "header '%.*s' too large (%zu > %d bytes)",
					 (int)e->key.len, (const char *)e->key.bytes,
					 e->value.value.bytes.len, HEADER_VALUE_MAX);
				return -1;
			}
			size += e->value.value.bytes.len + 1;
		}
	}

	items = xcalloc(1, size);
	s = (char *)(items + n);
	for (i = 0; i < n; i++) {
		const amqp_table_entry_t *e = &tbl->entries[i];
		const amqp_field_value_t *v = &e->value;
		struct occamy_header *h = &items[i];

		if (e->key.len > 0)
			memcpy(s, e->key.bytes, e->key.len);
		s[e->key.len] = '\0';
		h->key = s;
		s += e->key.len + 1;
		switch (v->kind) {
		case AMQP_FIELD_KIND_UTF8:
			if (v->value.bytes.len > 0)
				memcpy(s, v->value.bytes.bytes, v->value.bytes.len);
			s[v->value.bytes.len] = '\0';
			h->kind = OCCAMY_VALUE_STRING;
			h->str = s;
			h->len = v->value.bytes.len;
			s += v->value.bytes.len + 1;
			break;
		case AMQP_FIELD_KIND_BOOLEAN:
			h->kind = OCCAMY_VALUE_BOOL;
			h->i = v->value.boolean ? 1 : 0;
			break;
		case AMQP_FIELD_KIND_I8: h->kind = OCCAMY_VALUE_INT; h->i = v->value.i8; break;
		case AMQP_FIELD_KIND_U8: h->kind = OCCAMY_VALUE_INT; h->i = v->value.u8; break;
		case AMQP_FIELD_KIND_I16: h->kind = OCCAMY_VALUE_INT; h->i = v->value.i16; break;
		case AMQP_FIELD_KIND_U16: h->kind = OCCAMY_VALUE_INT; h->i = v->value.u16; break;
		case AMQP_FIELD_KIND_I32: h->kind = OCCAMY_VALUE_INT; h->i = v->value.i32; break;
		case AMQP_FIELD_KIND_U32: h->kind = OCCAMY_VALUE_INT; h->i = v->value.u32; break;
		case AMQP_FIELD_KIND_I64: h->kind = OCCAMY_VALUE_INT; h->i = v->value.i64; break;
		case AMQP_FIELD_KIND_U64:
		case AMQP_FIELD_KIND_TIMESTAMP:
			h->kind = OCCAMY_VALUE_INT;
			h->i = v->value.u64 > INT64_MAX ? INT64_MAX : (int64_t)v->value.u64;
			break;
		case AMQP_FIELD_KIND_F32: h->kind = OCCAMY_VALUE_FLOAT; h->f = v->value.f32; break;
		case AMQP_FIELD_KIND_F64: h->kind = OCCAMY_VALUE_FLOAT; h->f = v->value.f64; break;
		case AMQP_FIELD_KIND_DECIMAL: {
			/* The wire value is a signed long. */
			double f = (int32_t)v->value.decimal.value;
			for (unsigned k = 0; k < v->value.decimal.decimals; k++)
				f /= 10;
			h->kind = OCCAMY_VALUE_FLOAT;
			h->f = f;
			break;
		}
		default: /* tables, arrays, bytes, void */
			h->kind = OCCAMY_VALUE_OTHER;
			break;
		}
	}
	d->items = items;
	d->base.headers.items = items;
	d->base.headers.count = n;
	return 0;
}

/* ---- deliveries and settlements --------------------------------------- */

static void
delivery_free(struct delivery *d)
{
	/* Plain memory of this delivery: no connection state is touched, so
	 * this is safe on any thread. */
	amqp_destroy_message(&d->msg);
	free(d->items);
	free(d->reply);
	free(d);
}

static const char *
delivery_what(const struct delivery *d)
{
	return d->channel == CH_REQUEST ? "request" : "control message";
}

static bool
delivery_has(const struct delivery *d, amqp_flags_t flag, amqp_bytes_t b)
{
	return (d->msg.properties._flags & flag) && b.len > 0;
}

static void transport_destroy(struct transport *t);
static void outgoing_free(struct outgoing *o);

/* message_ops.settle: any thread.  Copy the settlement, queue the delivery
 * for the owner thread and wake it. */
static void
delivery_settle(struct message *m, const struct settlement *s)
{
	struct delivery *d = (struct delivery *)m;
	struct transport *t = d->t;
	bool destroy = false, late, first = false;

	d->outcome = s->outcome;
	snprintf(d->reason, sizeof(d->reason), "%s",
		 s->reason != NULL && s->reason[0] != '\0' ? s->reason : "no reason given");
	d->reply = s->reply;
	d->reply_len = s->reply != NULL ? s->reply_len : 0;
	snprintf(d->content_type, sizeof(d->content_type), "%s",
		 s->content_type != NULL ? s->content_type : "");

	pthread_mutex_lock(&t->lock);
	t->outstanding--;
	late = t->run_returned;
	if (late) {
		t->stats.stale_settlements++;
		destroy = t->free_requested && t->outstanding == 0;
	} else {
		/* The owner takes the whole list at once: only the first
		 * settlement into an empty list needs to wake it. */
		first = t->settled == NULL;
		d->next = NULL;
		*t->settled_tail = d;
		t->settled_tail = &d->next;
	}
	pthread_mutex_unlock(&t->lock);

	if (late) {
		/* The broker requeues it when the connection closes. */
		delivery_free(d);
		if (destroy)
			transport_destroy(t);
		return;
	}
	if (first)
		wake(t);
}

static void transport_lose(struct transport *t, bool clean, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

/* Returns false (and tears the connection down) if rc is an error. */
static bool
check_status(struct transport *t, int rc, const char *what)
{
	if (rc == AMQP_STATUS_OK)
		return true;
	transport_lose(t, false, "%s: %s", what, amqp_error_string2(rc));
	return false;
}

/* Returns false if the connection broke. */
static bool
delivery_ack(struct transport *t, struct delivery *d)
{
	return check_status(t, amqp_basic_ack(t->conn, d->channel, d->tag, 0), "basic.ack");
}

static void
delivery_reject(struct transport *t, struct delivery *d, bool requeue)
{
	if (!check_status(t, amqp_basic_reject(t->conn, d->channel, d->tag, requeue),
			  "basic.reject"))
		return;
	if (requeue)
		STAT_ADD(t, requeues, 1);
	else
		STAT_ADD(t, dead_letters, 1);
}

static void
confirm_expect(struct transport *t, enum pending_kind kind, struct delivery *d,
	       struct outgoing *o)
{
	struct pending *p = xcalloc(1, sizeof(*p));

	p->seq = ++t->next_seq;
	p->kind = kind;
	p->d = d;
	p->o = o;
	*t->confirms_tail = p;
	t->confirms_tail = &p->next;
}

/* Publish the result to reply_to; the ack waits for the confirm. */
static void
reply_publish(struct transport *t, struct delivery *d)
{
	const amqp_basic_properties_t *orig = &d->msg.properties;
	amqp_basic_properties_t p;
	amqp_bytes_t body = {d->reply_len, d->reply};
	int rc;

	memset(&p, 0, sizeof(p));
	p._flags = AMQP_BASIC_DELIVERY_MODE_FLAG;
	p.delivery_mode = AMQP_DELIVERY_PERSISTENT;
	if (delivery_has(d, AMQP_BASIC_CORRELATION_ID_FLAG, orig->correlation_id)) {
		p._flags |= AMQP_BASIC_CORRELATION_ID_FLAG;
		p.correlation_id = orig->correlation_id;
	}
	if (d->content_type[0] != '\0') {
		p._flags |= AMQP_BASIC_CONTENT_TYPE_FLAG;
		p.content_type = amqp_cstring_bytes(d->content_type);
	}
	if (body.bytes == NULL)
		body = amqp_empty_bytes;
	rc = amqp_basic_publish(t->conn, CH_PUBLISH, amqp_empty_bytes, orig->reply_to,
				0, 0, &p, body);
	if (!check_status(t, rc, "publishing a reply")) {
		STAT_ADD(t, stale_settlements, 1);
		delivery_free(d);
		return;
	}
	confirm_expect(t, PENDING_REPLY, d, NULL);
}

/* Publish a copy of the delivery to the dead-letter exchange with the reason
 * in its headers; the original is acked once the copy is confirmed. */
static void
dead_letter_publish(struct transport *t, struct delivery *d)
{
	const amqp_basic_properties_t *orig = &d->msg.properties;
	amqp_basic_properties_t p = *orig;
	const amqp_table_t *h = &orig->headers;
	int n = (orig->_flags & AMQP_BASIC_HEADERS_FLAG) ? h->num_entries : 0;
	amqp_table_entry_t *e = xcalloc((size_t)n + 2, sizeof(*e));
	int k = 0, rc;
	const char *queue = d->channel == CH_REQUEST ? t->request_queue : t->control_queue;

	for (int i = 0; i < n; i++) {
		if (bytes_equal(h->entries[i].key, "x-occamy-error") ||
		    bytes_equal(h->entries[i].key, "x-occamy-handler-outcome"))
			continue;
		e[k++] = h->entries[i];
	}
	e[k++] = entry_string("x-occamy-error", d->reason);
	e[k++] = entry_string("x-occamy-handler-outcome", d->handler_outcome);
	p.headers.entries = e;
	p.headers.num_entries = k;
	p._flags |= AMQP_BASIC_HEADERS_FLAG;
	/* As the broker does when it dead-letters: the copy must not expire;
	 * and a user-id not ours would make the broker close the channel. */
	p._flags &= ~(amqp_flags_t)(AMQP_BASIC_EXPIRATION_FLAG | AMQP_BASIC_USER_ID_FLAG);

	rc = amqp_basic_publish(t->conn, CH_PUBLISH, amqp_cstring_bytes(t->dl_exchange),
				amqp_cstring_bytes(queue), 0, 0, &p, d->msg.body);
	free(e);
	if (!check_status(t, rc, "publishing a dead letter")) {
		STAT_ADD(t, stale_settlements, 1);
		delivery_free(d);
		return;
	}
	confirm_expect(t, PENDING_DEAD_LETTER, d, NULL);
}

/* FNV-1a over what identifies a message well enough. */
static uint64_t
fingerprint_add(uint64_t h, amqp_bytes_t b)
{
	const unsigned char *p = b.bytes;

	for (size_t i = 0; i < b.len; i++)
		h = (h ^ p[i]) * 0x100000001b3u;
	return (h ^ 0xff) * 0x100000001b3u;
}

/* How many times a message on a classic queue has been retried here,
 * including this time. */
static uint32_t
retry_count_bump(struct transport *t, const struct delivery *d)
{
	const amqp_basic_properties_t *p = &d->msg.properties;
	uint64_t h = 0xcbf29ce484222325u;
	struct retry_slot *slot;

	if (p->_flags & AMQP_BASIC_MESSAGE_ID_FLAG)
		h = fingerprint_add(h, p->message_id);
	if (p->_flags & AMQP_BASIC_CORRELATION_ID_FLAG)
		h = fingerprint_add(h, p->correlation_id);
	h = fingerprint_add(h, d->msg.body);
	slot = &t->retries[h % RETRY_SLOTS];
	if (slot->fingerprint != h) {
		slot->fingerprint = h;
		slot->count = 0;
	}
	return ++slot->count;
}

static bool
settlement_needs_publish(const struct transport *t, const struct delivery *d)
{
	switch (d->outcome) {
	case SETTLE_ACK:
		return (d->channel == CH_REQUEST || d->is_command) &&
		       delivery_has(d, AMQP_BASIC_REPLY_TO_FLAG, d->msg.properties.reply_to);
	case SETTLE_REQUEUE:
		return false;
	case SETTLE_RETRY:
		return t->delivery_limit > 0 && d->delivery_count >= 0 &&
		       (uint64_t)d->delivery_count >= t->delivery_limit;
	case SETTLE_DEAD_LETTER:
		return true;
	}
	return false;
}

/* Owner thread: carry out one settlement.  Takes d. */
static void
settlement_perform(struct transport *t, struct delivery *d)
{
	if (!t->connected || d->generation != t->generation) {
		/* Its delivery tag died with an older connection; the broker
		 * has requeued the message already. */
		STAT_ADD(t, stale_settlements, 1);
		delivery_free(d);
		return;
	}
	if (d->outcome == SETTLE_RETRY && d->delivery_count < 0 && d->channel == CH_REQUEST &&
	    t->delivery_limit > 0) {
		/* Deliveries so far, as x-delivery-count would say. */
		d->delivery_count = retry_count_bump(t, d) - 1;
	}
	if (t->blocked && settlement_needs_publish(t, d)) {
		d->next = NULL;
		*t->deferred_tail = d;
		t->deferred_tail = &d->next;
		return;
	}

	switch (d->outcome) {
	case SETTLE_ACK:
		if (settlement_needs_publish(t, d)) {
			reply_publish(t, d);
			return;
		}
		if (delivery_ack(t, d))
			STAT_ADD(t, acks, 1);
		break;
	case SETTLE_REQUEUE:
		log_info("%s requeued: %s", delivery_what(d), d->reason);
		delivery_reject(t, d, true);
		break;
	case SETTLE_RETRY:
		if (settlement_needs_publish(t, d)) {
			log_warnx("%s dead-lettered after %" PRId64 " deliveries: %s",
				  delivery_what(d), d->delivery_count + 1, d->reason);
			d->handler_outcome = "retries-exhausted";
			dead_letter_publish(t, d);
			return;
		}
		log_info("%s requeued for retry: %s", delivery_what(d), d->reason);
		delivery_reject(t, d, true);
		break;
	case SETTLE_DEAD_LETTER:
		log_warnx("%s dead-lettered: %s", delivery_what(d), d->reason);
		if (d->handler_outcome == NULL)
			d->handler_outcome = "rejected";
		dead_letter_publish(t, d);
		return;
	}
	delivery_free(d);
}

/* The broker answered a publish of ours. */
static void
confirm_resolve(struct transport *t, struct pending *p, bool ok)
{
	struct delivery *d = p->d;
	struct outgoing *o = p->o;
	enum pending_kind kind = p->kind;

	free(p);
	switch (kind) {
	case PENDING_REPLY:
		if (ok) {
			STAT_ADD(t, replies, 1);
			if (delivery_ack(t, d))
				STAT_ADD(t, acks, 1);
		} else {
			log_warnx("the broker refused the reply to a request; requeueing it");
			delivery_reject(t, d, true);
		}
		delivery_free(d);
		break;
	case PENDING_DEAD_LETTER:
		if (ok) {
			if (delivery_ack(t, d))
				STAT_ADD(t, dead_letters, 1);
		} else {
			/* The queue's own x-dead-letter-exchange still catches
			 * it, only without our reason. */
			log_warnx("the broker refused a dead-letter copy; rejecting the original");
			delivery_reject(t, d, false);
		}
		delivery_free(d);
		break;
	case PENDING_PUBLISH:
		pthread_mutex_lock(&t->lock);
		t->out_count--;
		t->out_bytes -= o->bytes;
		if (ok)
			t->stats.publishes++;
		else
			t->stats.publish_failures++;
		pthread_mutex_unlock(&t->lock);
		if (!ok)
			log_warnx("the broker refused a %s publish",
				  o->kind == PUBLISH_REQUEST ? "request" : "control");
		outgoing_free(o);
		break;
	}
}

/* basic.ack / basic.nack on CH_PUBLISH.  Tags arrive in order; resolving may
 * tear the connection down, which empties the list. */
static void
confirm_received(struct transport *t, uint64_t tag, bool multiple, bool ok)
{
	struct pending **pp = &t->confirms, *p;

	if (multiple) {
		while ((p = t->confirms) != NULL && p->seq <= tag) {
			t->confirms = p->next;
			if (t->confirms == NULL)
				t->confirms_tail = &t->confirms;
			confirm_resolve(t, p, ok);
		}
		return;
	}
	for (; (p = *pp) != NULL && p->seq <= tag; pp = &p->next) {
		if (p->seq != tag)
			continue;
		*pp = p->next;
		if (*pp == NULL)
			t->confirms_tail = pp;
		confirm_resolve(t, p, ok);
		return;
	}
	log_debug("confirm for unknown publish %" PRIu64, tag);
}

/* ---- plugin publishes ------------------------------------------------- */

static void
outgoing_free(struct outgoing *o)
{
	/* Each header's key and value share one allocation. */
	for (size_t i = 0; i < o->nheaders; i++)
		free((char *)o->headers[i].key);
	free(o->name);
	free(o->headers);
	free(o->body);
	free(o);
}

static int
outgoing_publish(struct transport *t, struct outgoing *o)
{
	amqp_table_entry_t *e = xcalloc(o->nheaders + 2, sizeof(*e));
	amqp_basic_properties_t p;
	const char *exchange, *rkey = "", *own_key = NULL;
	int n = 0, rc;

	switch (o->kind) {
	case PUBLISH_REQUEST:
		exchange = t->request_exchange;
		rkey = t->request_queue;
		if (o->name != NULL)
			own_key = t->header_handler;
		break;
	case PUBLISH_CONTROL:
		exchange = t->control_exchange;
		if (o->name != NULL)
			own_key = t->header_task_id;
		break;
	case PUBLISH_HELP:
	default:
		exchange = t->control_exchange;
		if (o->name != NULL)
			own_key = t->header_handler;
		break;
	}
	if (own_key != NULL)
		e[n++] = entry_string(own_key, o->name);
	for (size_t i = 0; i < o->nheaders; i++) {
		const char *k = o->headers[i].key;
		/* Ours win; a help request must not look like a control
		 * message for a task. */
		if ((own_key != NULL && strcmp(k, own_key) == 0) ||
		    (o->kind == PUBLISH_HELP && strcmp(k, t->header_task_id) == 0))
			continue;
		e[n++] = entry_string(k, o->headers[i].value);
	}

	memset(&p, 0, sizeof(p));
	p._flags = AMQP_BASIC_DELIVERY_MODE_FLAG;
	p.delivery_mode = AMQP_DELIVERY_PERSISTENT;
	if (n > 0) {
		p._flags |= AMQP_BASIC_HEADERS_FLAG;
		p.headers.entries = e;
		p.headers.num_entries = n;
	}
	rc = amqp_basic_publish(t->conn, CH_PUBLISH, amqp_cstring_bytes(exchange),
				amqp_cstring_bytes(rkey), 0, 0, &p,
				(amqp_bytes_t){o->len, o->body});
	free(e);
	if (!check_status(t, rc, "publishing"))
		return -1;
	confirm_expect(t, PENDING_PUBLISH, NULL, o);
	return 0;
}

/* Put unsent or unconfirmed publishes back at the head of the queue, in
 * order, to go out again after a reconnect (at least once). */
static void
outgoing_requeue(struct transport *t, struct outgoing *first, struct outgoing **last_next)
{
	if (first == NULL)
		return;
	pthread_mutex_lock(&t->lock);
	*last_next = t->out;
	if (t->out == NULL)
		t->out_tail = last_next;
	t->out = first;
	pthread_mutex_unlock(&t->lock);
}

static void
outgoing_flush(struct transport *t)
{
	struct outgoing *list, *o;

	if (!t->connected || t->blocked)
		return;
	pthread_mutex_lock(&t->lock);
	list = t->out;
	t->out = NULL;
	t->out_tail = &t->out;
	pthread_mutex_unlock(&t->lock);

	while ((o = list) != NULL) {
		struct outgoing **tail;
		list = o->next;
		o->next = NULL;
		if (outgoing_publish(t, o) == 0)
			continue;
		/* The connection is gone: o and the rest wait for the next. */
		o->next = list;
		for (tail = &o->next; *tail != NULL; tail = &(*tail)->next)
			;
		outgoing_requeue(t, o, tail);
		return;
	}
}

/* ---- connection ------------------------------------------------------- */

static unsigned
jitter(struct transport *t, unsigned ms)
{
	/* xorshift64: spread reconnects of many instances. */
	t->rng ^= t->rng << 13;
	t->rng ^= t->rng >> 7;
	t->rng ^= t->rng << 17;
	return ms / 2 + (unsigned)(t->rng % (ms / 2 + 1));
}

/* Drop everything that belongs to the current connection and close it.
 * One path for every kind of loss. */
static void
connection_drop(struct transport *t, bool clean)
{
	struct pending *p;
	struct delivery *d;
	struct outgoing *back = NULL, **back_tail = &back;
	bool was_connected = t->connected;
	size_t stale = 0;

	t->connected = false;
	t->blocked = false;
	t->generation++;
	pthread_mutex_lock(&t->lock);
	t->stats.connected = false;
	pthread_mutex_unlock(&t->lock);

	while ((p = t->confirms) != NULL) {
		t->confirms = p->next;
		if (p->d != NULL) {
			delivery_free(p->d);
			stale++;
		} else {
			*back_tail = p->o;
			back_tail = &p->o->next;
			p->o->next = NULL;
		}
		free(p);
	}
	t->confirms_tail = &t->confirms;
	outgoing_requeue(t, back, back_tail);
	while ((d = t->deferred) != NULL) {
		t->deferred = d->next;
		delivery_free(d);
		stale++;
	}
	t->deferred_tail = &t->deferred;
	if (stale > 0)
		STAT_ADD(t, stale_settlements, stale);

	if (t->conn != NULL) {
		if (clean) {
			struct timeval tv = {1, 0};
			amqp_set_rpc_timeout(t->conn, &tv);
			(void)amqp_connection_close(t->conn, AMQP_REPLY_SUCCESS);
		}
		amqp_destroy_connection(t->conn);
		t->conn = NULL;
	}

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
static void
transport_lose(struct transport *t, bool clean, const char *fmt, ...)
{
	char why[512];
	va_list ap;
	uint64_t now = now_ns();

	if (!t->connected)
		return;
	va_start(ap, fmt);
	vsnprintf(why, sizeof(why), fmt, ap);
	va_end(ap);
	log_warnx("AMQP connection to %s lost: %s; reconnecting", t->uri_masked, why);
	if (now - t->connected_since_ns >= (uint64_t)STABLE_MS * 1000000u)
		t->backoff_ms = BACKOFF_MIN_MS;
	t->failures = 0;
	t->next_attempt_ns = now + (uint64_t)jitter(t, t->backoff_ms) * 1000000u;
	connection_drop(t, clean);
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

static int
topology_declare(struct transport *t, char *why, size_t whylen, bool *clean)
{
	amqp_connection_state_t c = t->conn;
	amqp_table_entry_t qargs[3], cargs[1], dargs[1];
	amqp_table_t qt = {0, qargs}, ct = {1, cargs}, dt = {1, dargs};
	const char *qtype = t->quorum ? "quorum" : "classic";
	amqp_queue_declare_ok_t *ok;
	char what[400];

	/* Dead letters: a fanout, so copies with any routing key (ours carry
	 * the source queue's name) and the broker's own land in one queue. */
	snprintf(what, sizeof(what), "declaring exchange '%s'", t->dl_exchange);
	amqp_exchange_declare(c, CH_PUBLISH, amqp_cstring_bytes(t->dl_exchange),
			      amqp_cstring_bytes("fanout"), 0, 1, 0, 0, amqp_empty_table);
	if (!rpc_ok(t, what, why, whylen, clean))
		return -1;
	dargs[0] = entry_string("x-queue-type", qtype);
	snprintf(what, sizeof(what), "declaring queue '%s'", t->dl_queue);
	amqp_queue_declare(c, CH_PUBLISH, amqp_cstring_bytes(t->dl_queue), 0, 1, 0, 0, dt);
	if (!rpc_ok(t, what, why, whylen, clean))
		return -1;
	snprintf(what, sizeof(what), "binding queue '%s'", t->dl_queue);
	amqp_queue_bind(c, CH_PUBLISH, amqp_cstring_bytes(t->dl_queue),
			amqp_cstring_bytes(t->dl_exchange), amqp_cstring_bytes(t->dl_queue),
			amqp_empty_table);
	if (!rpc_ok(t, what, why, whylen, clean))
		return -1;

	/* Requests: one durable queue shared by every instance. */
	snprintf(what, sizeof(what), "declaring exchange '%s'", t->request_exchange);
	amqp_exchange_declare(c, CH_PUBLISH, amqp_cstring_bytes(t->request_exchange),
			      amqp_cstring_bytes("direct"), 0, 1, 0, 0, amqp_empty_table);
	if (!rpc_ok(t, what, why, whylen, clean))
		return -1;
	qargs[qt.num_entries++] = entry_string("x-queue-type", qtype);
	qargs[qt.num_entries++] = entry_string("x-dead-letter-exchange", t->dl_exchange);
	if (t->quorum && t->delivery_limit > 0)
		qargs[qt.num_entries++] = entry_int("x-delivery-limit", t->delivery_limit);
	snprintf(what, sizeof(what), "declaring queue '%s'", t->request_queue);
	amqp_queue_declare(c, CH_PUBLISH, amqp_cstring_bytes(t->request_queue), 0, 1, 0, 0, qt);
	if (!rpc_ok(t, what, why, whylen, clean))
		return -1;
	snprintf(what, sizeof(what), "binding queue '%s'", t->request_queue);
	amqp_queue_bind(c, CH_PUBLISH, amqp_cstring_bytes(t->request_queue),
			amqp_cstring_bytes(t->request_exchange),
			amqp_cstring_bytes(t->request_queue), amqp_empty_table);
	if (!rpc_ok(t, what, why, whylen, clean))
		return -1;

	/* Control: a fanout into one private queue per instance, named by
	 * the broker so that instances never collide. */
	snprintf(what, sizeof(what), "declaring exchange '%s'", t->control_exchange);
	amqp_exchange_declare(c, CH_PUBLISH, amqp_cstring_bytes(t->control_exchange),
			      amqp_cstring_bytes("fanout"), 0, 1, 0, 0, amqp_empty_table);
	if (!rpc_ok(t, what, why, whylen, clean))
		return -1;
	cargs[0] = entry_string("x-dead-letter-exchange", t->dl_exchange);
	ok = amqp_queue_declare(c, CH_PUBLISH, amqp_empty_bytes, 0, 0, 1, 1, ct);
	if (!rpc_ok(t, "declaring the control queue", why, whylen, clean))
		return -1;
	snprintf(t->control_queue, sizeof(t->control_queue), "%.*s", (int)ok->queue.len,
		 (const char *)ok->queue.bytes);
	snprintf(what, sizeof(what), "binding queue '%s'", t->control_queue);
	amqp_queue_bind(c, CH_PUBLISH, amqp_cstring_bytes(t->control_queue),
			amqp_cstring_bytes(t->control_exchange), amqp_empty_bytes,
			amqp_empty_table);
	if (!rpc_ok(t, what, why, whylen, clean))
		return -1;
	return 0;
}

static int
login(struct transport *t, char *why, size_t whylen, bool *clean)
{
	amqp_table_entry_t caps[4], props[4];
	amqp_table_t props_table = {4, props};
	char password[PASSWORD_MAX];
	const char *pass = t->ci.password;
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

	r = amqp_login_with_properties(t->conn, t->ci.vhost, 0, AMQP_DEFAULT_FRAME_SIZE,
				       (int)t->heartbeat_s, &props_table,
				       AMQP_SASL_METHOD_PLAIN, t->ci.user, pass);
	if (pass == password)
		explicit_bzero(password, sizeof(password));
	if (r.reply_type != AMQP_RESPONSE_NORMAL) {
		char desc[300];
		reply_describe(r, desc, sizeof(desc));
		snprintf(why, whylen, "login as '%s': %s", t->ci.user, desc);
		*clean = false;
		return -1;
	}
	return 0;
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
	if (t->ci.ssl) {
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
	rc = amqp_socket_open_noblock(sock, t->ci.host, t->ci.port, &tv);
	if (rc != AMQP_STATUS_OK) {
		snprintf(why, whylen, "%s", amqp_error_string2(rc));
		return -1;
	}
	amqp_set_handshake_timeout(t->conn, &tv);
	amqp_set_rpc_timeout(t->conn, &tv);
	if (login(t, why, whylen, clean) < 0)
		return -1;
	*clean = true;

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
	amqp_basic_consume(t->conn, CH_REQUEST, amqp_cstring_bytes(t->request_queue),
			   amqp_cstring_bytes("occamyd-requests"), 0, 0, 0, amqp_empty_table);
	if (!rpc_ok(t, "consuming the request queue", why, whylen, clean))
		return -1;
	amqp_basic_consume(t->conn, CH_CONTROL, amqp_cstring_bytes(t->control_queue),
			   amqp_cstring_bytes("occamyd-control"), 0, 0, 1, amqp_empty_table);
	if (!rpc_ok(t, "consuming the control queue", why, whylen, clean))
		return -1;
	return 0;
}

static void
connection_attempt(struct transport *t)
{
	char why[512] = "";
	bool clean = false;
	uint64_t now;

	if (connection_open(t, why, sizeof(why), &clean) == 0) {
		t->connected = true;
		t->blocked = false;
		t->next_seq = 0;
		t->connected_since_ns = now_ns();
		t->heartbeat_ms = (unsigned)amqp_get_heartbeat(t->conn) * 1000u;
		if (t->failures > 0)
			log_info("connected to %s after %u failed attempts", t->uri_masked,
				 t->failures);
		else
			log_info("connected to %s", t->uri_masked);
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

	if (t->conn != NULL) {
		if (clean) {
			struct timeval tv = {1, 0};
			amqp_set_rpc_timeout(t->conn, &tv);
			(void)amqp_connection_close(t->conn, AMQP_REPLY_SUCCESS);
		}
		amqp_destroy_connection(t->conn);
		t->conn = NULL;
	}
	now = now_ns();
	t->failures++;
	/* Log the first failure and then every tenth, not every retry. */
	if (t->failures == 1 || t->failures % 10 == 0)
		log_warnx("cannot connect to %s: %s (attempt %u; retrying every %u s at most)",
			  t->uri_masked, why, t->failures, BACKOFF_MAX_MS / 1000);
	t->next_attempt_ns = now + (uint64_t)jitter(t, t->backoff_ms) * 1000000u;
	t->backoff_ms = t->backoff_ms * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : t->backoff_ms * 2;
}

/* ---- incoming --------------------------------------------------------- */

static void
delivery_accept(struct transport *t, amqp_envelope_t *env)
{
	struct delivery *d = xcalloc(1, sizeof(*d));
	char why[REASON_MAX];
	const struct occamy_header *dc, *cmd;

	d->t = t;
	d->generation = t->generation;
	d->tag = env->delivery_tag;
	d->channel = env->channel;
	d->delivery_count = -1;
	d->msg = env->message; /* take it over */
	memset(&env->message, 0, sizeof(env->message));
	amqp_destroy_envelope(env);

	d->base.ops = &delivery_ops;
	d->base.body = d->msg.body.bytes;
	d->base.len = d->msg.body.len;
	d->base.arrival_ns = now_ns();

	if (d->channel != CH_REQUEST && d->channel != CH_CONTROL) {
		log_warnx("delivery on unexpected channel %u; requeueing it", d->channel);
		delivery_reject(t, d, true);
		delivery_free(d);
		return;
	}
	if (d->channel == CH_REQUEST)
		STAT_ADD(t, deliveries, 1);
	else
		STAT_ADD(t, control_deliveries, 1);

	if (t->stopping) {
		delivery_reject(t, d, true);
		delivery_free(d);
		return;
	}
	if (headers_convert(d, why, sizeof(why)) < 0) {
		d->outcome = SETTLE_DEAD_LETTER;
		d->handler_outcome = "refused";
		snprintf(d->reason, sizeof(d->reason), "%s", why);
		settlement_perform(t, d);
		return;
	}
	if (d->channel == CH_CONTROL &&
	    (cmd = occamy_headers_find(&d->base.headers, COMMAND_HEADER)) != NULL) {
		/* For the daemon, not for a task: answer it here. */
		d->is_command = true;
		d->outcome = SETTLE_ACK;
		if (cmd->kind == OCCAMY_VALUE_STRING && strcmp(cmd->str, "status") == 0 &&
		    t->hooks.status != NULL)
			d->reply = t->hooks.status(t->hooks.ctx, &d->reply_len);
		else
			log_info("unknown command in control message ignored");
		settlement_perform(t, d);
		return;
	}
	if (t->quorum && d->channel == CH_REQUEST) {
		dc = occamy_headers_find(&d->base.headers, "x-delivery-count");
		d->delivery_count = dc != NULL && dc->kind == OCCAMY_VALUE_INT ? dc->i : 0;
	}

	pthread_mutex_lock(&t->lock);
	t->outstanding++;
	pthread_mutex_unlock(&t->lock);
	if (d->channel == CH_REQUEST)
		sched_submit_request(t->sched, &d->base);
	else
		sched_submit_control(t->sched, &d->base);
}

/* A method frame that is not a delivery. */
static void
frame_handle(struct transport *t)
{
	amqp_frame_t f;
	int rc = amqp_simple_wait_frame(t->conn, &f);

	if (!check_status(t, rc, "reading a frame"))
		return;
	if (f.frame_type != AMQP_FRAME_METHOD) {
		log_debug("ignoring a frame of type %u on channel %u", f.frame_type, f.channel);
		return;
	}
	switch (f.payload.method.id) {
	case AMQP_BASIC_ACK_METHOD: {
		const amqp_basic_ack_t *a = f.payload.method.decoded;
		if (f.channel == CH_PUBLISH)
			confirm_received(t, a->delivery_tag, a->multiple, true);
		break;
	}
	case AMQP_BASIC_NACK_METHOD: {
		const amqp_basic_nack_t *n = f.payload.method.decoded;
		if (f.channel == CH_PUBLISH)
			confirm_received(t, n->delivery_tag, n->multiple, false);
		break;
	}
	case AMQP_BASIC_RETURN_METHOD: {
		/* We never publish mandatory; drain the content anyway. */
		amqp_message_t m;
		amqp_rpc_reply_t r = amqp_read_message(t->conn, f.channel, &m, 0);
		if (r.reply_type == AMQP_RESPONSE_NORMAL)
			amqp_destroy_message(&m);
		else
			transport_lose(t, false, "reading a returned message");
		break;
	}
	case AMQP_BASIC_CANCEL_METHOD: {
		const amqp_basic_cancel_t *c = f.payload.method.decoded;
		transport_lose(t, true, "the broker cancelled consumer %.*s (queue deleted?)",
			       (int)c->consumer_tag.len, (const char *)c->consumer_tag.bytes);
		break;
	}
	case AMQP_CHANNEL_CLOSE_METHOD: {
		const amqp_channel_close_t *c = f.payload.method.decoded;
		amqp_channel_close_ok_t ok = {0};
		char why[300];

		snprintf(why, sizeof(why), "the broker closed channel %u: %u %.*s", f.channel,
			 c->reply_code, (int)c->reply_text.len, (const char *)c->reply_text.bytes);
		(void)amqp_send_method(t->conn, f.channel, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok);
		transport_lose(t, true, "%s", why);
		break;
	}
	case AMQP_CONNECTION_CLOSE_METHOD: {
		const amqp_connection_close_t *c = f.payload.method.decoded;
		amqp_connection_close_ok_t ok = {0};
		char why[300];

		snprintf(why, sizeof(why), "the broker closed the connection: %u %.*s",
			 c->reply_code, (int)c->reply_text.len, (const char *)c->reply_text.bytes);
		(void)amqp_send_method(t->conn, 0, AMQP_CONNECTION_CLOSE_OK_METHOD, &ok);
		transport_lose(t, false, "%s", why);
		break;
	}
	case AMQP_CONNECTION_BLOCKED_METHOD: {
		const amqp_connection_blocked_t *b = f.payload.method.decoded;
		log_warnx("the broker blocks publishing: %.*s", (int)b->reason.len,
			  (const char *)b->reason.bytes);
		t->blocked = true;
		break;
	}
	case AMQP_CONNECTION_UNBLOCKED_METHOD:
		log_info("the broker accepts publishing again");
		t->blocked = false;
		break;
	default:
		log_debug("ignoring %s on channel %u", amqp_method_name(f.payload.method.id),
			  f.channel);
		break;
	}
}

/* Everything the broker has sent us, without blocking; bounded per turn so
 * settlements are not starved. */
static void
frames_read(struct transport *t)
{
	for (int i = 0; i < FRAMES_PER_TURN && t->connected; i++) {
		struct timeval zero = {0, 0};
		amqp_envelope_t env;
		amqp_rpc_reply_t r;
		char why[300];

		amqp_maybe_release_buffers(t->conn);
		r = amqp_consume_message(t->conn, &env, &zero, 0);
		if (r.reply_type == AMQP_RESPONSE_NORMAL) {
			delivery_accept(t, &env);
			continue;
		}
		if (r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION) {
			if (r.library_error == AMQP_STATUS_TIMEOUT)
				return;
			if (r.library_error == AMQP_STATUS_UNEXPECTED_STATE) {
				frame_handle(t);
				continue;
			}
		}
		reply_describe(r, why, sizeof(why));
		transport_lose(t, false, "%s", why);
		return;
	}
}

/* ---- the owner loop --------------------------------------------------- */

static void
settlements_perform(struct transport *t)
{
	struct delivery *list, *d;

	/* Those held back by connection.blocked first, in order. */
	if (!t->blocked && t->deferred != NULL) {
		list = t->deferred;
		t->deferred = NULL;
		t->deferred_tail = &t->deferred;
		while ((d = list) != NULL) {
			list = d->next;
			settlement_perform(t, d);
		}
	}
	pthread_mutex_lock(&t->lock);
	list = t->settled;
	t->settled = NULL;
	t->settled_tail = &t->settled;
	pthread_mutex_unlock(&t->lock);
	while ((d = list) != NULL) {
		list = d->next;
		settlement_perform(t, d);
	}
}

static bool
drained(struct transport *t)
{
	bool idle;

	pthread_mutex_lock(&t->lock);
	idle = t->outstanding == 0 && t->settled == NULL && t->out == NULL;
	pthread_mutex_unlock(&t->lock);
	return idle && t->confirms == NULL && t->deferred == NULL;
}

static void
stop_begin(struct transport *t)
{
	t->stopping = true;
	t->stop_deadline_ns = now_ns() + (uint64_t)STOP_DRAIN_MS * 1000000u;
	if (!t->connected)
		return;
	/* No new work; what arrives before cancel-ok is requeued. */
	amqp_basic_cancel(t->conn, CH_REQUEST, amqp_cstring_bytes("occamyd-requests"));
	if (amqp_get_rpc_reply(t->conn).reply_type == AMQP_RESPONSE_NORMAL)
		amqp_basic_cancel(t->conn, CH_CONTROL, amqp_cstring_bytes("occamyd-control"));
	if (amqp_get_rpc_reply(t->conn).reply_type != AMQP_RESPONSE_NORMAL)
		transport_lose(t, false, "cancelling consumers for shutdown");
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
		uint64_t now = now_ns();
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
	struct delivery *late, *d;
	bool stop;

	for (;;) {
		pthread_mutex_lock(&t->lock);
		stop = t->stop;
		pthread_mutex_unlock(&t->lock);
		if (stop && !t->stopping)
			stop_begin(t);
		if (!t->connected && !t->stopping && now_ns() >= t->next_attempt_ns)
			connection_attempt(t);

		settlements_perform(t);
		outgoing_flush(t);
		if (t->connected)
			frames_read(t);
		if (t->stopping &&
		    (!t->connected || drained(t) || now_ns() >= t->stop_deadline_ns))
			break;
		if (t->conn != NULL)
			amqp_maybe_release_buffers(t->conn);
		if (t->hooks.turn != NULL)
			t->hooks.turn(t->hooks.ctx, t->connected);
		loop_wait(t);
	}

	if (t->connected) {
		connection_drop(t, true);
		log_info("AMQP connection to %s closed", t->uri_masked);
	}
	/* From now on settle() frees directly; the broker has requeued. */
	pthread_mutex_lock(&t->lock);
	t->run_returned = true;
	late = t->settled;
	t->settled = NULL;
	t->settled_tail = &t->settled;
	pthread_mutex_unlock(&t->lock);
	while ((d = late) != NULL) {
		late = d->next;
		STAT_ADD(t, stale_settlements, 1);
		delivery_free(d);
	}
	return 0;
}

/* ---- public ----------------------------------------------------------- */

int
transport_check_config(const struct config *cfg, char *why, size_t whylen)
{
	struct amqp_connection_info ci;
	char *buf = xstrdup(cfg->uri);
	struct stat st;
	int rc = 0;

	if (amqp_parse_url(buf, &ci) != AMQP_STATUS_OK) {
		/* Never echo it: it may hold the password. */
		snprintf(why, whylen, "%s: [amqp] key 'uri': cannot be parsed as "
			 "amqp[s]://user[:password]@host[:port]/[vhost]", cfg->file);
		rc = -1;
	} else if (cfg->password_file[0] != '\0') {
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
	free(buf);
	return rc;
}

struct transport *
transport_new(const struct config *cfg, struct sched *s, const struct transport_hooks *hooks)
{
	struct transport *t = xcalloc(1, sizeof(*t));
	char host[200];
	int rc;

	t->uri_buf = xstrdup(cfg->uri);
	t->uri_masked = uri_mask(cfg->uri);
	amqp_default_connection_info(&t->ci);
	rc = amqp_parse_url(t->uri_buf, &t->ci);
	if (rc != AMQP_STATUS_OK) {
		/* config.c validates the URI; this is a last resort. */
		log_warnx("cannot parse AMQP URI %s: %s", t->uri_masked, amqp_error_string2(rc));
		amqp_default_connection_info(&t->ci);
	}
	/* "amqp://host/" parses as the vhost "", which RabbitMQ cannot have;
	 * everyone writing it means the default vhost. */
	if (t->ci.vhost == NULL || t->ci.vhost[0] == '\0')
		t->ci.vhost = "/";
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
	t->quorum = cfg->queue_type != NULL && strcmp(cfg->queue_type, "quorum") == 0;
	t->request_queue = xstrdup(cfg->request_queue);
	t->request_exchange = xstrdup(cfg->request_exchange);
	t->control_exchange = xstrdup(cfg->control_exchange);
	t->dl_exchange = xstrdup(cfg->dead_letter_exchange);
	t->dl_queue = xstrdup(cfg->dead_letter_queue);
	t->header_task_id = xstrdup(cfg->header_task_id);
	t->header_handler = xstrdup(cfg->header_handler);
	if (gethostname(host, sizeof(host)) < 0)
		snprintf(host, sizeof(host), "unknown");
	host[sizeof(host) - 1] = '\0';
	snprintf(t->connection_name, sizeof(t->connection_name), "occamyd@%s:%ld", host,
		 (long)getpid());
	t->sched = s;
	if (hooks != NULL)
		t->hooks = *hooks;

	t->wakefd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (t->wakefd < 0)
		fatal("eventfd");
	pthread_mutex_init(&t->lock, NULL);
	t->settled_tail = &t->settled;
	t->out_tail = &t->out;
	t->confirms_tail = &t->confirms;
	t->deferred_tail = &t->deferred;
	t->backoff_ms = BACKOFF_MIN_MS;
	t->rng = now_ns() ^ ((uint64_t)getpid() << 32) ^ (uint64_t)(uintptr_t)t;
	if (t->rng == 0)
		t->rng = 1;
	return t;
}

void
transport_stop(struct transport *t)
{
	pthread_mutex_lock(&t->lock);
	t->stop = true;
	pthread_mutex_unlock(&t->lock);
	wake(t);
}

int
transport_publish(struct transport *t, enum publish_kind kind, const char *name,
		  const struct occamy_kv *headers, size_t nheaders, const void *body,
		  size_t len)
{
	struct outgoing *o;
	int ok;

	if (nheaders > HEADERS_MAX || (nheaders > 0 && headers == NULL) ||
	    (len > 0 && body == NULL))
		return -1;
	o = xcalloc(1, sizeof(*o));
	o->kind = kind;
	o->name = name != NULL ? xstrdup(name) : NULL;
	o->bytes = sizeof(*o) + len + (name != NULL ? strlen(name) : 0);
	if (nheaders > 0) {
		o->headers = xcalloc(nheaders, sizeof(*o->headers));
		for (size_t i = 0; i < nheaders; i++) {
			/* Key and value share one allocation. */
			const char *k = headers[i].key != NULL ? headers[i].key : "";
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
		*t->out_tail = o;
		t->out_tail = &o->next;
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

static void
transport_destroy(struct transport *t)
{
	struct outgoing *o;
	struct delivery *d;

	while ((d = t->settled) != NULL) {
		t->settled = d->next;
		delivery_free(d);
	}
	while ((o = t->out) != NULL) {
		t->out = o->next;
		outgoing_free(o);
	}
	close(t->wakefd);
	pthread_mutex_destroy(&t->lock);
	free(t->uri_buf);
	free(t->uri_masked);
	free(t->password_file);
	free(t->tls_ca);
	free(t->tls_cert);
	free(t->tls_key);
	free(t->request_queue);
	free(t->request_exchange);
	free(t->control_exchange);
	free(t->dl_exchange);
	free(t->dl_queue);
	free(t->header_task_id);
	free(t->header_handler);
	free(t);
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
