/*
 * amqp.c - the AMQP transport: one owner thread holds the rabbitmq-c
 * connection; every other thread reaches it through a queue and an eventfd.
 *
 * Channels: CH_REQUEST consumes the shared request queue, CH_CONTROL this
 * instance's control queue, CH_PUBLISH sends replies, dead-letter copies,
 * requeue and retry copies and plugin publishes in confirm mode.  A request
 * whose settlement needs a publish is acked only once the broker has
 * confirmed that publish, so a crash in between redelivers the request
 * rather than losing its result.
 *
 * The rule of this file: a fault that belongs to one message is an outcome
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
#define SHORTSTR_MAX 255            /* AMQP short strings: keys, names */
#define OUTQ_MAX 10000              /* plugin publishes queued or unconfirmed */
#define OUTQ_BYTES_MAX (64u << 20)
#define RESENDS_MAX 3               /* a plugin publish lost this often: dropped */
#define BACKOFF_MIN_MS 100
#define BACKOFF_MAX_MS 10000
#define STABLE_MS 5000              /* up this long: backoff starts over */
#define TURN_MAX_MS 500             /* so that a stop is prompt */
#define STOP_DRAIN_MS 2000
#define IO_TIMEOUT_S 5              /* connect, login and each RPC */
#define FRAMES_PER_TURN 1024         /* a message is 3 frames or more */
#define REASON_MAX 256
#define PASSWORD_MAX 1024
/* Asked for at login; the broker's frame_max (RabbitMQ: 128 KiB by
 * default) caps it. */
#define FRAME_MAX_WANTED (4u << 20)
/* RabbitMQ 3.10 may send a header frame a little over the negotiated size
 * (its own x-delivery-count or x-death added to a full one): accept frames
 * up to twice the negotiated size, so such a delivery can still be
 * dead-lettered instead of making the queue unconsumable. */
#define FRAME_RECV_FACTOR 2
/* frame header 7, frame end 1, class + weight + body size 12 */
#define HEADER_FRAME_OVERHEAD 20
#define FRAME_OVERHEAD 8
/* RabbitMQ 3.10's default max_message_size. */
#define BODY_MAX (128u << 20)
/* What our own headers may add to a copy of a received message. */
#define COPY_HEADROOM 1024
/* Idle control queues (their daemon gone) are deleted after this. */
#define CONTROL_QUEUE_EXPIRES_MS 120000
#define RETRY_STEPS_MAX 16

#define HEADER_ERROR "x-occamy-error"
#define HEADER_STATUS "x-occamy-status"
#define HEADER_OUTCOME "x-occamy-handler-outcome"
#define HEADER_ATTEMPTS "x-occamy-attempts"
#define HEADER_REQUEUES "x-occamy-requeues"

/* A message being assembled from its frames (method, header, body), one
 * per channel: frames of different channels may interleave. */
struct incoming {
	enum { IN_IDLE, IN_HEADER, IN_BODY } state;
	bool is_return;        /* basic.return on CH_PUBLISH */
	uint64_t tag;          /* basic.deliver */
	uint16_t return_code;  /* basic.return */
	char routing_key[SHORTSTR_MAX + 1];
	amqp_message_t msg;    /* properties in msg.pool, body malloc()ed */
	size_t body_got;
};

/* A delivery as the scheduler receives it (base) plus what the transport
 * needs to settle it.  The message (properties, headers, body) is plain
 * memory assembled by the owner loop; a copy needs the original
 * properties. */
struct delivery {
	struct message base; /* first */
	struct transport *t;
	struct delivery *next; /* in t->settled or t->deferred */
	uint64_t generation;
	uint64_t tag;
	amqp_channel_t channel;
	uint64_t attempts;      /* failed attempts before this delivery */
	amqp_message_t msg;
	struct occamy_header *items; /* base.headers; strings in the same block */

	/* The settlement, copied when settle() is called. */
	enum settle_outcome outcome;
	const char *handler_outcome; /* for the dead-letter copy */
	bool is_command;             /* x-occamy-command: answered by the daemon */
	bool dead_letter_result;     /* the copy carries the result, not the request */
	bool dead_letter_refused;    /* the broker nacked the dead-letter copy */
	unsigned confirms_left;      /* pending publishes that name this delivery */
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
	unsigned sends; /* how often it went out unconfirmed */
};

enum pending_kind {
	PENDING_REPLY,       /* ack the request when confirmed */
	PENDING_DEAD_LETTER, /* ack the request when confirmed */
	PENDING_ERROR_REPLY, /* beside a dead letter: both confirmed, then ack */
	PENDING_COPY,        /* a requeue or retry copy: ack the original */
	PENDING_PUBLISH,     /* a plugin's */
};

/* A publish on CH_PUBLISH waiting for the broker's basic.ack/nack. */
struct pending {
	struct pending *next;
	uint64_t seq;
	enum pending_kind kind;
	bool returned;   /* basic.return came first: unroutable */
	struct delivery *d;
	struct outgoing *o;
};

enum publish_result {
	PUB_SENT,    /* written; a confirm will follow */
	PUB_REFUSED, /* this message cannot be sent (why says why) */
	PUB_LOST,    /* the connection broke */
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
	char control_queue[256]; /* stable for the life of the process */
	unsigned retry_delay_ms[RETRY_STEPS_MAX]; /* step k: the k+1-th retry */
	unsigned retry_steps;
	struct sched *sched;
	struct transport_hooks hooks;
	int wakefd;

	/* lock guards this block. */
	pthread_mutex_t lock;
	struct delivery *settled, **settled_tail; /* settle() -> owner */
	struct outgoing *out, **out_tail;         /* publish() -> owner */
	size_t out_count, out_bytes;              /* queued or unconfirmed */
	size_t outstanding;  /* deliveries handed out and not yet settled */
	unsigned frame_max_shared; /* negotiated, for transport_publish() */
	bool stop;
	bool quiesce;        /* cancel the consumers, keep the connection */
	bool run_returned;   /* settle() frees directly from now on */
	bool free_requested; /* free when the last outstanding is settled */
	struct transport_stats stats;

	/* Owner thread only. */
	amqp_connection_state_t conn;
	bool connected;
	bool blocked;        /* connection.blocked: hold publishes */
	bool stopping;
	bool consuming;      /* false once quiesced: no basic.consume again */
	uint64_t stop_deadline_ns;
	uint64_t generation;
	uint64_t next_seq;   /* last publish sequence number on CH_PUBLISH */
	unsigned frame_max;  /* negotiated */
	void *scratch;       /* frame_max bytes, to size a header frame */
	struct incoming in[CH_PUBLISH + 1];
	struct pending *confirms, **confirms_tail;
	struct delivery *deferred, **deferred_tail; /* need a publish; blocked */
	unsigned heartbeat_ms; /* negotiated */
	unsigned backoff_ms;
	unsigned failures;     /* consecutive failed attempts */
	uint64_t next_attempt_ns;
	uint64_t connected_since_ns;
	uint64_t rng;
	uint64_t event_logged_ns[TRANSPORT_EVENTS_MAX]; /* by stats.events[] */
	uint64_t event_unlogged[TRANSPORT_EVENTS_MAX];
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

/* ---- events: requeues, retries, resends -------------------------------- */

/* Count one event of path ("requeue", "retry", "resend", "drop",
 * "dead-letter") by its reason, and log it at most once a second per path
 * and reason, with the number of events since the last line: a flood is a
 * count, not a log storm.  The reason's label is its text up to ": " (what
 * follows is a plugin's own message).  Owner thread. */
static void
event_note(struct transport *t, const char *path, const char *what, const char *reason)
{
	struct transport_event *e = NULL;
	uint64_t now = now_ns(), n;
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

/* Only for control messages (their own queue) and for the last resort of a
 * request whose copy the broker refused; never a loop by itself. */
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
	if (d != NULL)
		d->confirms_left++;
	*t->confirms_tail = p;
	t->confirms_tail = &p->next;
}

/* ---- publishing: every publish is sized before a byte is written ------- */

static bool
table_keys_fit(const amqp_table_t *tbl, char *why, size_t whylen)
{
	for (int i = 0; i < tbl->num_entries; i++) {
		/* rabbitmq-c would cut the length to 8 bits and the broker
		 * would close the connection (541). */
		if (tbl->entries[i].key.len > SHORTSTR_MAX) {
			snprintf(why, whylen, "header key of %zu bytes (at most %d)",
				 tbl->entries[i].key.len, SHORTSTR_MAX);
			return false;
		}
	}
	return true;
}

/* Write basic.publish, its header frame and its body frames, with body
 * frames cut at the negotiated size (the library would cut them at our
 * larger receive size). */
static int
publish_in_frames(struct transport *t, const char *exchange, amqp_bytes_t rkey,
		  bool mandatory, const amqp_basic_properties_t *p, amqp_bytes_t body)
{
	amqp_basic_publish_t m = {
		.exchange = amqp_cstring_bytes(exchange),
		.routing_key = rkey,
		.mandatory = mandatory,
	};
	size_t chunk = t->frame_max - FRAME_OVERHEAD;
	amqp_frame_t f;
	int rc;

	rc = amqp_send_method(t->conn, CH_PUBLISH, AMQP_BASIC_PUBLISH_METHOD, &m);
	if (rc != AMQP_STATUS_OK)
		return rc;
	memset(&f, 0, sizeof(f));
	f.frame_type = AMQP_FRAME_HEADER;
	f.channel = CH_PUBLISH;
	f.payload.properties.class_id = AMQP_BASIC_CLASS;
	f.payload.properties.body_size = body.len;
	f.payload.properties.decoded = (void *)p;
	rc = amqp_send_frame(t->conn, &f);
	for (size_t off = 0; rc == AMQP_STATUS_OK && off < body.len; off += chunk) {
		f.frame_type = AMQP_FRAME_BODY;
		f.payload.body_fragment.bytes = (char *)body.bytes + off;
		f.payload.body_fragment.len = body.len - off < chunk ? body.len - off : chunk;
		rc = amqp_send_frame(t->conn, &f);
	}
	return rc;
}

/* The one way out.  PUB_REFUSED (and why) for a message that cannot be
 * sent as it is; nothing was written then. */
static enum publish_result
publish_checked(struct transport *t, const char *exchange, amqp_bytes_t rkey, bool mandatory,
		const amqp_basic_properties_t *p, amqp_bytes_t body, char *why, size_t whylen)
{
	int rc;

	if (strlen(exchange) > SHORTSTR_MAX || rkey.len > SHORTSTR_MAX) {
		snprintf(why, whylen, "exchange or routing key over %d bytes", SHORTSTR_MAX);
		return PUB_REFUSED;
	}
	if (body.len > BODY_MAX) {
		snprintf(why, whylen, "body of %zu bytes (at most %u)", body.len, BODY_MAX);
		return PUB_REFUSED;
	}
	if ((p->_flags & AMQP_BASIC_HEADERS_FLAG) && !table_keys_fit(&p->headers, why, whylen))
		return PUB_REFUSED;
	rc = amqp_encode_properties(AMQP_BASIC_CLASS, (void *)p,
				    (amqp_bytes_t){t->frame_max - HEADER_FRAME_OVERHEAD, t->scratch});
	if (rc < 0) {
		snprintf(why, whylen, "headers do not fit in the %u-byte frame", t->frame_max);
		return PUB_REFUSED;
	}
	if (body.len <= t->frame_max - FRAME_OVERHEAD)
		rc = amqp_basic_publish(t->conn, CH_PUBLISH, amqp_cstring_bytes(exchange), rkey,
					mandatory, 0, p, body);
	else
		rc = publish_in_frames(t, exchange, rkey, mandatory, p, body);
	if (!check_status(t, rc, "publishing"))
		return PUB_LOST;
	return PUB_SENT;
}

/* The properties of a copy of d: its own, without the headers that extra
 * replaces and without x-delivery-count (the copy is a new message), then
 * extra.  *p points into the returned array (free it) and into d. */
static amqp_table_entry_t *
copy_properties(const struct delivery *d, const amqp_table_entry_t *extra, int nextra,
		amqp_basic_properties_t *p)
{
	const amqp_basic_properties_t *orig = &d->msg.properties;
	const amqp_table_t *h = &orig->headers;
	int n = (orig->_flags & AMQP_BASIC_HEADERS_FLAG) ? h->num_entries : 0;
	amqp_table_entry_t *e = xcalloc((size_t)(n + nextra) + 1, sizeof(*e));
	int k = 0;

	*p = *orig;
	for (int i = 0; i < n; i++) {
		bool replaced = h->entries[i].key.len == 16 &&
				memcmp(h->entries[i].key.bytes, "x-delivery-count", 16) == 0;
		for (int j = 0; j < nextra && !replaced; j++)
			replaced = h->entries[i].key.len == extra[j].key.len &&
				   memcmp(h->entries[i].key.bytes, extra[j].key.bytes,
					  extra[j].key.len) == 0;
		if (!replaced)
			e[k++] = h->entries[i];
	}
	for (int j = 0; j < nextra; j++)
		e[k++] = extra[j];
	p->headers.entries = e;
	p->headers.num_entries = k;
	if (k > 0)
		p->_flags |= AMQP_BASIC_HEADERS_FLAG;
	else
		p->_flags &= ~(amqp_flags_t)AMQP_BASIC_HEADERS_FLAG;
	/* A user-id not ours would make the broker close the channel. */
	p->_flags &= ~(amqp_flags_t)AMQP_BASIC_USER_ID_FLAG;
	return e;
}

/* Leave out of a copy's headers the original ones that can be large
 * (strings over 1 KiB, tables, arrays, bytes) or, if all is true, every
 * original one; the last nours entries are ours and stay.  Returns how many
 * went. */
static int
headers_trim(amqp_basic_properties_t *p, int nours, bool all)
{
	amqp_table_entry_t *e = p->headers.entries;
	int n = p->headers.num_entries, k = 0, dropped = 0;

	for (int i = 0; i < n; i++) {
		const amqp_field_value_t *v = &e[i].value;
		bool ours = i >= n - nours;
		bool large = v->kind == AMQP_FIELD_KIND_TABLE || v->kind == AMQP_FIELD_KIND_ARRAY ||
			     ((v->kind == AMQP_FIELD_KIND_UTF8 || v->kind == AMQP_FIELD_KIND_BYTES) &&
			      v->value.bytes.len > 1024);
		if (!ours && (all || large)) {
			dropped++;
			continue;
		}
		e[k++] = e[i];
	}
	p->headers.num_entries = k;
	return dropped;
}

static void retry_or_give_up(struct transport *t, struct delivery *d);

/* The machine-readable kind of a final failure, for x-occamy-status: the
 * prefix of the scheduler's reason, or what the transport decided. */
static const char *
error_status(const struct delivery *d)
{
	static const char *const kinds[] = {"invalid_body", "invalid_headers", "invalid_task"};

	if (d->handler_outcome != NULL && strcmp(d->handler_outcome, "retries-exhausted") == 0)
		return "internal_error";
	if (strncmp(d->reason, "invalid_task: unknown handler", 29) == 0)
		return "unknown_handler";
	for (size_t i = 0; i < sizeof(kinds) / sizeof(kinds[0]); i++)
		if (strncmp(d->reason, kinds[i], strlen(kinds[i])) == 0)
			return kinds[i];
	if (d->handler_outcome != NULL && strcmp(d->handler_outcome, "refused") == 0)
		return "invalid_headers"; /* what the transport refused to forward */
	return "rejected";
}

/* Length of the valid UTF-8 sequence at s, 0 if there is none. */
static size_t
utf8_len(const unsigned char *s)
{
	size_t n = s[0] >= 0xf0 && s[0] <= 0xf4 ? 4 : s[0] >= 0xe0 ? 3 : s[0] >= 0xc2 ? 2 : 0;

	/* No overlong forms, surrogates or code points past U+10FFFF. */
	if (s[0] >= 0xf5 || (s[0] == 0xe0 && s[1] < 0xa0) || (s[0] == 0xed && s[1] >= 0xa0) ||
	    (s[0] == 0xf0 && s[1] < 0x90) || (s[0] == 0xf4 && s[1] >= 0x90))
		return 0;
	for (size_t i = 1; i < n; i++)
		if ((s[i] & 0xc0) != 0x80)
			return 0;
	return n;
}

/* s as the inside of a JSON string: valid UTF-8 whatever s holds (a
 * plugin's message, a header's bytes), invalid bytes as U+FFFD. */
static void
json_escape(char *out, size_t cap, const char *s)
{
	const unsigned char *p = (const unsigned char *)s;
	size_t n = 0, k;

	while (*p != '\0' && n + 8 < cap) {
		if (*p == '"' || *p == '\\') {
			out[n++] = '\\';
			out[n++] = (char)*p++;
		} else if (*p < 0x20) {
			n += (size_t)snprintf(out + n, cap - n, "\\u%04x", *p++);
		} else if (*p < 0x80) {
			out[n++] = (char)*p++;
		} else if ((k = utf8_len(p)) > 0) {
			memcpy(out + n, p, k);
			n += k;
			p += k;
		} else {
			n += (size_t)snprintf(out + n, cap - n, "\\ufffd");
			p++;
		}
	}
	out[n] = '\0';
}

/* A request with reply_to that is dead-lettered also answers its client:
 * one error reply, beside the dead-letter copy; the original is acked when
 * both are confirmed.  Not when the reply path itself failed. */
static void
error_reply_publish(struct transport *t, struct delivery *d)
{
	const amqp_basic_properties_t *orig = &d->msg.properties;
	const char *status = error_status(d);
	char reason[2 * REASON_MAX], body[3 * REASON_MAX], why[REASON_MAX];
	amqp_table_entry_t h[2];
	amqp_basic_properties_t p;
	int n;

	if (d->channel != CH_REQUEST || d->dead_letter_result ||
	    !delivery_has(d, AMQP_BASIC_REPLY_TO_FLAG, orig->reply_to))
		return;
	json_escape(reason, sizeof(reason), d->reason);
	n = snprintf(body, sizeof(body), "{\"status\":\"%s\",\"error\":\"%s\"}", status, reason);
	h[0] = entry_string(HEADER_STATUS, status);
	h[1] = entry_string(HEADER_ERROR, d->reason);
	memset(&p, 0, sizeof(p));
	p._flags = AMQP_BASIC_DELIVERY_MODE_FLAG | AMQP_BASIC_HEADERS_FLAG |
		   AMQP_BASIC_CONTENT_TYPE_FLAG;
	p.delivery_mode = AMQP_DELIVERY_PERSISTENT;
	p.headers = (amqp_table_t){2, h};
	p.content_type = amqp_cstring_bytes("application/json");
	if (delivery_has(d, AMQP_BASIC_CORRELATION_ID_FLAG, orig->correlation_id)) {
		p._flags |= AMQP_BASIC_CORRELATION_ID_FLAG;
		p.correlation_id = orig->correlation_id;
	}
	switch (publish_checked(t, "", orig->reply_to, false, &p,
				(amqp_bytes_t){(size_t)n, body}, why, sizeof(why))) {
	case PUB_SENT:
		confirm_expect(t, PENDING_ERROR_REPLY, d, NULL);
		break;
	case PUB_REFUSED:
		event_note(t, "drop", "error reply", why);
		break;
	case PUB_LOST:
		break; /* the dead letter's pending goes with the connection */
	}
}

/* Publish a copy of the delivery (or, with dead_letter_result, its result)
 * to the dead-letter exchange with the reason in its headers; the original
 * is acked once the copy is confirmed.  A copy that does not fit in a frame
 * loses its large headers, then all of its own, and says so. */
static void
dead_letter_publish(struct transport *t, struct delivery *d)
{
	amqp_basic_properties_t p;
	amqp_table_entry_t extra[3], *e;
	amqp_bytes_t body = d->msg.body;
	const char *queue = d->channel == CH_REQUEST ? t->request_queue : t->control_queue;
	char why[REASON_MAX], reason[REASON_MAX + 64];
	enum publish_result r;
	int dropped = 0;

	if (d->dead_letter_result)
		body = d->reply != NULL ? (amqp_bytes_t){d->reply_len, d->reply} : amqp_empty_bytes;
	if (d->handler_outcome == NULL)
		d->handler_outcome = "rejected";
	extra[0] = entry_string(HEADER_STATUS, error_status(d));
	extra[1] = entry_string(HEADER_OUTCOME, d->handler_outcome);
	extra[2] = entry_string(HEADER_ERROR, d->reason);
	e = copy_properties(d, extra, 3, &p);
	/* As the broker does when it dead-letters: the copy must not expire. */
	p._flags &= ~(amqp_flags_t)AMQP_BASIC_EXPIRATION_FLAG;
	for (int step = 0;; step++) {
		r = publish_checked(t, t->dl_exchange, amqp_cstring_bytes(queue), false, &p, body,
				    why, sizeof(why));
		if (r != PUB_REFUSED || step == 2)
			break;
		dropped += headers_trim(&p, 3, step == 1);
		snprintf(reason, sizeof(reason), "%.150s; %d header%s left out of this copy (%.80s)",
			 d->reason, dropped, dropped == 1 ? "" : "s", why);
		p.headers.entries[p.headers.num_entries - 1] = entry_string(HEADER_ERROR, reason);
	}
	free(e);
	switch (r) {
	case PUB_SENT:
		event_note(t, "dead-letter", delivery_what(d), d->reason);
		confirm_expect(t, PENDING_DEAD_LETTER, d, NULL);
		error_reply_publish(t, d);
		return;
	case PUB_REFUSED:
		/* Only a result too large for any message gets here; the
		 * queue's own x-dead-letter-exchange still takes the request. */
		log_warnx("%s dead-lettered without our reason (%s): %s", delivery_what(d), why,
			  d->reason);
		delivery_reject(t, d, false);
		break;
	case PUB_LOST:
		STAT_ADD(t, stale_settlements, 1);
		break;
	}
	delivery_free(d);
}

/* Publish the result to reply_to (mandatory: an unroutable reply comes
 * back as basic.return); the ack waits for the confirm. */
static void
reply_publish(struct transport *t, struct delivery *d)
{
	const amqp_basic_properties_t *orig = &d->msg.properties;
	amqp_basic_properties_t p;
	amqp_bytes_t body = {d->reply_len, d->reply};
	char why[REASON_MAX];

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
	switch (publish_checked(t, "", orig->reply_to, true, &p, body, why, sizeof(why))) {
	case PUB_SENT:
		confirm_expect(t, PENDING_REPLY, d, NULL);
		return;
	case PUB_REFUSED:
		snprintf(d->reason, sizeof(d->reason), "the reply cannot be sent: %.200s", why);
		d->handler_outcome = "reply-refused";
		dead_letter_publish(t, d);
		return;
	case PUB_LOST:
		STAT_ADD(t, stale_settlements, 1);
		delivery_free(d);
		return;
	}
}

/* Requeue (retry false) or retry a request: publish a copy, then ack the
 * original when the copy is confirmed.  A retry carries the new attempt
 * count and goes through the delay queue of its step. */
static void
copy_publish(struct transport *t, struct delivery *d, bool retry)
{
	amqp_basic_properties_t p;
	amqp_table_entry_t extra[1], *e;
	const char *exchange = t->request_exchange;
	char rkey[300], why[REASON_MAX];
	enum publish_result r;
	int nextra = 0;

	snprintf(rkey, sizeof(rkey), "%s", t->request_queue);
	if (!retry) {
		/* The redelivered flag of a copy is false: say it here. */
		const struct occamy_header *h = occamy_headers_find(&d->base.headers,
								    HEADER_REQUEUES);
		int64_t n = h != NULL && h->kind == OCCAMY_VALUE_INT && h->i > 0 ? h->i : 0;
		extra[nextra++] = entry_int(HEADER_REQUEUES, n + 1);
	} else {
		uint64_t n = d->attempts + 1;
		extra[nextra++] = entry_int(HEADER_ATTEMPTS, (int64_t)n);
		if (t->retry_steps > 0) {
			unsigned k = n - 1 < t->retry_steps ? (unsigned)(n - 1) : t->retry_steps - 1;
			exchange = "";
			snprintf(rkey, sizeof(rkey), "%s.retry.%u", t->request_queue,
				 t->retry_delay_ms[k]);
		}
	}
	e = copy_properties(d, extra, nextra, &p);
	r = publish_checked(t, exchange, amqp_cstring_bytes(rkey), false, &p, d->msg.body, why,
			    sizeof(why));
	free(e);
	switch (r) {
	case PUB_SENT:
		event_note(t, retry ? "retry" : "requeue", delivery_what(d), d->reason);
		confirm_expect(t, PENDING_COPY, d, NULL);
		return;
	case PUB_REFUSED:
		/* delivery_accept() lets in only what a copy can carry. */
		snprintf(d->reason, sizeof(d->reason), "cannot be requeued: %.200s", why);
		d->handler_outcome = "refused";
		dead_letter_publish(t, d);
		return;
	case PUB_LOST:
		STAT_ADD(t, stale_settlements, 1);
		delivery_free(d);
		return;
	}
}

/* An internal error (or a refused reply): retry while attempts are left,
 * else dead-letter. */
static void
retry_or_give_up(struct transport *t, struct delivery *d)
{
	if (t->delivery_limit > 0 && d->attempts + 1 >= t->delivery_limit) {
		char reason[REASON_MAX];

		snprintf(reason, sizeof(reason), "%.200s (attempt %" PRIu64 " of %u)", d->reason,
			 d->attempts + 1, t->delivery_limit);
		memcpy(d->reason, reason, sizeof(d->reason));
		d->handler_outcome = "retries-exhausted";
		dead_letter_publish(t, d);
		return;
	}
	copy_publish(t, d, true);
}

static bool
settlement_needs_publish(const struct delivery *d)
{
	switch (d->outcome) {
	case SETTLE_ACK:
		return (d->channel == CH_REQUEST || d->is_command) &&
		       delivery_has(d, AMQP_BASIC_REPLY_TO_FLAG, d->msg.properties.reply_to);
	case SETTLE_REQUEUE:
		return d->channel == CH_REQUEST;
	case SETTLE_RETRY:
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
	if (t->blocked && settlement_needs_publish(d)) {
		d->next = NULL;
		*t->deferred_tail = d;
		t->deferred_tail = &d->next;
		return;
	}

	switch (d->outcome) {
	case SETTLE_ACK:
		if (settlement_needs_publish(d)) {
			reply_publish(t, d);
			return;
		}
		if (delivery_ack(t, d))
			STAT_ADD(t, acks, 1);
		break;
	case SETTLE_REQUEUE:
		if (d->channel == CH_REQUEST) {
			copy_publish(t, d, false);
			return;
		}
		/* A control message goes back to this daemon's own queue. */
		event_note(t, "requeue", delivery_what(d), d->reason);
		delivery_reject(t, d, true);
		break;
	case SETTLE_RETRY:
		if (d->channel == CH_REQUEST) {
			retry_or_give_up(t, d);
			return;
		}
		dead_letter_publish(t, d);
		return;
	case SETTLE_DEAD_LETTER:
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
	bool returned = p->returned;

	free(p);
	if (d != NULL && kind != PENDING_DEAD_LETTER && kind != PENDING_ERROR_REPLY)
		d->confirms_left--;
	switch (kind) {
	case PENDING_REPLY:
		if (ok && !returned) {
			STAT_ADD(t, replies, 1);
			if (delivery_ack(t, d))
				STAT_ADD(t, acks, 1);
			break;
		}
		if (ok) {
			/* Confirmed but routed nowhere: keep the result. */
			STAT_ADD(t, replies_unroutable, 1);
			snprintf(d->reason, sizeof(d->reason), "reply_to unroutable: %.*s",
				 (int)d->msg.properties.reply_to.len,
				 (const char *)d->msg.properties.reply_to.bytes);
			d->handler_outcome = "reply-unroutable";
		} else {
			STAT_ADD(t, replies_refused, 1);
			snprintf(d->reason, sizeof(d->reason), "reply refused by the broker");
			d->handler_outcome = "reply-refused";
		}
		d->dead_letter_result = true;
		if (ok)
			dead_letter_publish(t, d);
		else
			retry_or_give_up(t, d);
		return;
	case PENDING_DEAD_LETTER:
	case PENDING_ERROR_REPLY:
		if (kind == PENDING_DEAD_LETTER && !ok)
			d->dead_letter_refused = true;
		if (kind == PENDING_ERROR_REPLY) {
			if (ok)
				STAT_ADD(t, error_replies, 1);
			else
				event_note(t, "drop", "error reply", "refused by the broker");
		}
		if (--d->confirms_left > 0)
			return; /* the other one is still out */
		if (!d->dead_letter_refused) {
			if (delivery_ack(t, d))
				STAT_ADD(t, dead_letters, 1);
		} else {
			/* The queue's own x-dead-letter-exchange still catches
			 * it, only without our reason. */
			log_warnx("the broker refused a dead-letter copy; rejecting the original");
			delivery_reject(t, d, false);
		}
		break;
	case PENDING_COPY:
		if (ok) {
			if (delivery_ack(t, d)) {
				if (d->outcome == SETTLE_REQUEUE)
					STAT_ADD(t, requeues, 1);
				else
					STAT_ADD(t, retries, 1);
			}
		} else {
			/* The request queue refused the copy (full, or a
			 * leader election): let the broker keep the original.
			 * It comes back once, to this or another daemon. */
			event_note(t, "requeue", "request", "copy refused by the broker");
			delivery_reject(t, d, true);
		}
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
		return;
	}
	delivery_free(d);
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

/* basic.return of a reply: it precedes the confirm of that publish.  Only
 * replies are mandatory; the first unresolved one to the same queue with
 * the same correlation id is the one (two such in flight are alike). */
static void
return_received(struct transport *t, const struct incoming *in)
{
	const amqp_basic_properties_t *rp = &in->msg.properties;
	amqp_bytes_t cid = (rp->_flags & AMQP_BASIC_CORRELATION_ID_FLAG) ? rp->correlation_id
									 : amqp_empty_bytes;

	for (struct pending *p = t->confirms; p != NULL; p = p->next) {
		const amqp_basic_properties_t *op;
		amqp_bytes_t ocid;

		if (p->kind != PENDING_REPLY || p->returned)
			continue;
		op = &p->d->msg.properties;
		ocid = (op->_flags & AMQP_BASIC_CORRELATION_ID_FLAG) ? op->correlation_id
								    : amqp_empty_bytes;
		if (!bytes_equal(op->reply_to, in->routing_key) || ocid.len != cid.len ||
		    (cid.len > 0 && memcmp(ocid.bytes, cid.bytes, cid.len) != 0))
			continue;
		log_warnx("reply to %s returned by the broker (%u): the result goes to the "
			  "dead-letter queue", in->routing_key, in->return_code);
		p->returned = true;
		return;
	}
	log_debug("basic.return for no reply of ours (routing key %s)", in->routing_key);
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

/* Where a plugin publish goes, and the header that carries its name. */
static const char *
outgoing_route(const struct transport *t, const struct outgoing *o, const char **rkey)
{
	*rkey = "";
	switch (o->kind) {
	case PUBLISH_REQUEST:
		*rkey = t->request_queue;
		return t->header_handler;
	case PUBLISH_CONTROL:
		return t->header_task_id;
	case PUBLISH_HELP:
	default:
		return t->header_handler;
	}
}

static enum publish_result
outgoing_publish(struct transport *t, struct outgoing *o, char *why, size_t whylen)
{
	amqp_table_entry_t *e = xcalloc(o->nheaders + 2, sizeof(*e));
	amqp_basic_properties_t p;
	const char *exchange, *rkey, *own_key;
	enum publish_result r;
	int n = 0;

	own_key = outgoing_route(t, o, &rkey);
	exchange = o->kind == PUBLISH_REQUEST ? t->request_exchange : t->control_exchange;
	if (o->name == NULL)
		own_key = NULL;
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
	r = publish_checked(t, exchange, amqp_cstring_bytes(rkey), false, &p,
			    (amqp_bytes_t){o->len, o->body}, why, whylen);
	free(e);
	if (r == PUB_SENT) {
		o->sends++;
		confirm_expect(t, PENDING_PUBLISH, NULL, o);
	}
	return r;
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

/* Forget a publish that will not be sent. */
static void
outgoing_drop(struct transport *t, struct outgoing *o, const char *path, const char *reason)
{
	pthread_mutex_lock(&t->lock);
	t->out_count--;
	t->out_bytes -= o->bytes;
	t->stats.publish_failures++;
	pthread_mutex_unlock(&t->lock);
	event_note(t, path, "plugin publish dropped", reason);
	outgoing_free(o);
}

static void
outgoing_flush(struct transport *t)
{
	struct outgoing *list, *o;
	char why[REASON_MAX];

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
		switch (outgoing_publish(t, o, why, sizeof(why))) {
		case PUB_SENT:
			continue;
		case PUB_REFUSED:
			/* transport_publish() checked it against the frame
			 * size of its time; the broker may offer less now. */
			outgoing_drop(t, o, "drop", why);
			continue;
		case PUB_LOST:
			break;
		}
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
			*back_tail = p->o;
			back_tail = &p->o->next;
			p->o->next = NULL;
		}
		free(p);
	}
	t->confirms_tail = &t->confirms;
	outgoing_requeue(t, back, back_tail);
	for (unsigned ch = 0; ch <= CH_PUBLISH; ch++) {
		if (t->in[ch].state != IN_IDLE)
			amqp_destroy_message(&t->in[ch].msg);
		memset(&t->in[ch], 0, sizeof(t->in[ch]));
	}
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
	amqp_table_entry_t qargs[3], cargs[2], dargs[1];
	amqp_table_t qt = {0, qargs}, ct = {2, cargs}, dt = {1, dargs};
	const char *qtype = t->quorum ? "quorum" : "classic";
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
	/* Our own requeues and retries are new copies, so on a quorum queue
	 * this counts only deliveries lost with their connection: a guard
	 * against a request that crashes every daemon it reaches. */
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

	/* Retries wait in a delay queue per step: no consumer, a message TTL,
	 * and dead-lettering back to the request queue. */
	for (unsigned k = 0; k < t->retry_steps; k++) {
		amqp_table_entry_t rargs[6];
		amqp_table_t rt = {0, rargs};
		char name[300];

		snprintf(name, sizeof(name), "%s.retry.%u", t->request_queue, t->retry_delay_ms[k]);
		rargs[rt.num_entries++] = entry_string("x-queue-type", qtype);
		rargs[rt.num_entries++] = entry_int("x-message-ttl", t->retry_delay_ms[k]);
		rargs[rt.num_entries++] = entry_string("x-dead-letter-exchange", t->request_exchange);
		rargs[rt.num_entries++] =
			entry_string("x-dead-letter-routing-key", t->request_queue);
		if (t->quorum) {
			/* A quorum queue dead-letters at most once unless
			 * told otherwise: a retry must not get lost. */
			rargs[rt.num_entries++] =
				entry_string("x-dead-letter-strategy", "at-least-once");
			rargs[rt.num_entries++] = entry_string("x-overflow", "reject-publish");
		}
		snprintf(what, sizeof(what), "declaring queue '%s'", name);
		amqp_queue_declare(c, CH_PUBLISH, amqp_cstring_bytes(name), 0, 1, 0, 0, rt);
		if (!rpc_ok(t, what, why, whylen, clean))
			return -1;
	}

	/* Control: a fanout into one queue per instance.  Not exclusive and
	 * not auto-delete, so that it and its binding outlive a reconnect
	 * and nothing published meanwhile is lost; x-expires removes the
	 * queue of a daemon that is gone. */
	snprintf(what, sizeof(what), "declaring exchange '%s'", t->control_exchange);
	amqp_exchange_declare(c, CH_PUBLISH, amqp_cstring_bytes(t->control_exchange),
			      amqp_cstring_bytes("fanout"), 0, 1, 0, 0, amqp_empty_table);
	if (!rpc_ok(t, what, why, whylen, clean))
		return -1;
	cargs[0] = entry_string("x-dead-letter-exchange", t->dl_exchange);
	cargs[1] = entry_int("x-expires", CONTROL_QUEUE_EXPIRES_MS);
	snprintf(what, sizeof(what), "declaring queue '%s'", t->control_queue);
	amqp_queue_declare(c, CH_PUBLISH, amqp_cstring_bytes(t->control_queue), 0, 0, 0, 0, ct);
	if (!rpc_ok(t, what, why, whylen, clean))
		return -1;
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

	r = amqp_login_with_properties(t->conn, t->ci.vhost, 0, FRAME_MAX_WANTED,
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
	amqp_basic_consume(t->conn, CH_REQUEST, amqp_cstring_bytes(t->request_queue),
			   amqp_cstring_bytes("occamyd-requests"), 0, 0, 0, amqp_empty_table);
	if (!rpc_ok(t, "consuming the request queue", why, whylen, clean))
		return -1;
	amqp_basic_consume(t->conn, CH_CONTROL, amqp_cstring_bytes(t->control_queue),
			   amqp_cstring_bytes("occamyd-control"), 0, 0, 0, amqp_empty_table);
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

/* Could a copy of these properties, with our headers added, still be sent?
 * A cheap bound first: most messages are far from the frame size. */
static bool
properties_copyable(struct transport *t, const amqp_basic_properties_t *p)
{
	size_t bound = 64 + 9 * 256;
	const amqp_table_t *h = &p->headers;
	int rc;

	if (p->_flags & AMQP_BASIC_HEADERS_FLAG) {
		for (int i = 0; i < h->num_entries; i++) {
			const amqp_field_value_t *v = &h->entries[i].value;
			bound += 16 + h->entries[i].key.len;
			if (v->kind == AMQP_FIELD_KIND_UTF8 || v->kind == AMQP_FIELD_KIND_BYTES)
				bound += v->value.bytes.len;
			else if (v->kind == AMQP_FIELD_KIND_TABLE || v->kind == AMQP_FIELD_KIND_ARRAY)
				bound += t->frame_max; /* unknown: encode to see */
		}
	}
	if (bound + COPY_HEADROOM + HEADER_FRAME_OVERHEAD <= t->frame_max)
		return true;
	rc = amqp_encode_properties(AMQP_BASIC_CLASS, (void *)p,
				    (amqp_bytes_t){t->frame_max - HEADER_FRAME_OVERHEAD, t->scratch});
	return rc >= 0 && (size_t)rc + COPY_HEADROOM + HEADER_FRAME_OVERHEAD <= t->frame_max;
}

static void
delivery_accept(struct transport *t, amqp_channel_t channel, uint64_t tag, amqp_message_t *msg)
{
	struct delivery *d = xcalloc(1, sizeof(*d));
	char why[REASON_MAX];
	const struct occamy_header *h, *cmd;

	d->t = t;
	d->generation = t->generation;
	d->tag = tag;
	d->channel = channel;
	d->msg = *msg; /* take it over */
	memset(msg, 0, sizeof(*msg));

	d->base.ops = &delivery_ops;
	d->base.body = d->msg.body.bytes;
	d->base.len = d->msg.body.len;
	d->base.arrival_ns = now_ns();

	if (d->channel == CH_REQUEST)
		STAT_ADD(t, deliveries, 1);
	else
		STAT_ADD(t, control_deliveries, 1);

	if (!properties_copyable(t, &d->msg.properties)) {
		/* Every outcome but an ack needs a copy: refuse it now,
		 * while a trimmed dead-letter copy can still say why. */
		d->outcome = SETTLE_DEAD_LETTER;
		d->handler_outcome = "refused";
		snprintf(d->reason, sizeof(d->reason),
			 "headers too large: a copy would not fit in the %u-byte frame",
			 t->frame_max);
		settlement_perform(t, d);
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
	if (d->channel == CH_REQUEST &&
	    (h = occamy_headers_find(&d->base.headers, HEADER_ATTEMPTS)) != NULL &&
	    h->kind == OCCAMY_VALUE_INT && h->i > 0)
		d->attempts = (uint64_t)h->i;

	pthread_mutex_lock(&t->lock);
	t->outstanding++;
	pthread_mutex_unlock(&t->lock);
	if (d->channel == CH_REQUEST)
		sched_submit_request(t->sched, &d->base);
	else
		sched_submit_control(t->sched, &d->base);
}

static void
bytes_clone(amqp_pool_t *pool, amqp_bytes_t *b)
{
	amqp_bytes_t src = *b;

	if (src.len == 0) {
		*b = amqp_empty_bytes;
		return;
	}
	amqp_pool_alloc_bytes(pool, src.len, b);
	if (b->bytes == NULL)
		fatalx("out of memory");
	memcpy(b->bytes, src.bytes, src.len);
}

/* Frames live in the library's channel pools until the next release: what
 * a message keeps is copied into its own pool at once. */
static void
properties_clone(const amqp_basic_properties_t *src, amqp_message_t *m)
{
	amqp_basic_properties_t *p = &m->properties;
	amqp_flags_t f = src->_flags;

	memset(p, 0, sizeof(*p));
	p->_flags = f;
	p->delivery_mode = src->delivery_mode;
	p->priority = src->priority;
	p->timestamp = src->timestamp;
#define CLONE(field, flag)                                                     \
	if (f & (flag)) {                                                      \
		p->field = src->field;                                         \
		bytes_clone(&m->pool, &p->field);                              \
	}
	CLONE(content_type, AMQP_BASIC_CONTENT_TYPE_FLAG);
	CLONE(content_encoding, AMQP_BASIC_CONTENT_ENCODING_FLAG);
	CLONE(correlation_id, AMQP_BASIC_CORRELATION_ID_FLAG);
	CLONE(reply_to, AMQP_BASIC_REPLY_TO_FLAG);
	CLONE(expiration, AMQP_BASIC_EXPIRATION_FLAG);
	CLONE(message_id, AMQP_BASIC_MESSAGE_ID_FLAG);
	CLONE(type, AMQP_BASIC_TYPE_FLAG);
	CLONE(user_id, AMQP_BASIC_USER_ID_FLAG);
	CLONE(app_id, AMQP_BASIC_APP_ID_FLAG);
	CLONE(cluster_id, AMQP_BASIC_CLUSTER_ID_FLAG);
#undef CLONE
	if ((f & AMQP_BASIC_HEADERS_FLAG) &&
	    amqp_table_clone(&src->headers, &p->headers, &m->pool) != AMQP_STATUS_OK)
		fatalx("out of memory");
}

/* The last frame of a message on channel ch is in. */
static void
incoming_complete(struct transport *t, amqp_channel_t ch)
{
	struct incoming *in = &t->in[ch];
	amqp_message_t msg = in->msg;

	memset(&in->msg, 0, sizeof(in->msg));
	in->state = IN_IDLE;
	if (in->is_return) {
		in->msg = msg;
		return_received(t, in);
		amqp_destroy_message(&in->msg);
		memset(in, 0, sizeof(*in));
		return;
	}
	delivery_accept(t, ch, in->tag, &msg);
}

/* A method frame that is not basic.deliver or basic.return. */
static void
method_handle(struct transport *t, const amqp_frame_t *f)
{
	switch (f->payload.method.id) {
	case AMQP_BASIC_ACK_METHOD: {
		const amqp_basic_ack_t *a = f->payload.method.decoded;
		if (f->channel == CH_PUBLISH)
			confirm_received(t, a->delivery_tag, a->multiple, true);
		break;
	}
	case AMQP_BASIC_NACK_METHOD: {
		const amqp_basic_nack_t *n = f->payload.method.decoded;
		if (f->channel == CH_PUBLISH)
			confirm_received(t, n->delivery_tag, n->multiple, false);
		break;
	}
	case AMQP_BASIC_CANCEL_METHOD: {
		const amqp_basic_cancel_t *c = f->payload.method.decoded;
		transport_lose(t, true, "the broker cancelled consumer %.*s (queue deleted?)",
			       (int)c->consumer_tag.len, (const char *)c->consumer_tag.bytes);
		break;
	}
	case AMQP_CHANNEL_CLOSE_METHOD: {
		const amqp_channel_close_t *c = f->payload.method.decoded;
		amqp_channel_close_ok_t ok = {0};
		char why[300];

		snprintf(why, sizeof(why), "the broker closed channel %u: %u %.*s", f->channel,
			 c->reply_code, (int)c->reply_text.len, (const char *)c->reply_text.bytes);
		(void)amqp_send_method(t->conn, f->channel, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok);
		transport_lose(t, true, "%s", why);
		break;
	}
	case AMQP_CONNECTION_CLOSE_METHOD: {
		const amqp_connection_close_t *c = f->payload.method.decoded;
		amqp_connection_close_ok_t ok = {0};
		char why[300];

		snprintf(why, sizeof(why), "the broker closed the connection: %u %.*s",
			 c->reply_code, (int)c->reply_text.len, (const char *)c->reply_text.bytes);
		(void)amqp_send_method(t->conn, 0, AMQP_CONNECTION_CLOSE_OK_METHOD, &ok);
		transport_lose(t, false, "%s", why);
		break;
	}
	case AMQP_CONNECTION_BLOCKED_METHOD: {
		const amqp_connection_blocked_t *b = f->payload.method.decoded;
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
		log_debug("ignoring %s on channel %u", amqp_method_name(f->payload.method.id),
			  f->channel);
		break;
	}
}

/* One frame: deliveries and returns are assembled across frames (and loop
 * turns), anything else is handled at once. */
static void
frame_handle(struct transport *t, const amqp_frame_t *f)
{
	struct incoming *in;

	if (f->frame_type == AMQP_FRAME_HEARTBEAT)
		return;
	if (f->channel > CH_PUBLISH) {
		transport_lose(t, false, "a frame on unknown channel %u", f->channel);
		return;
	}
	in = &t->in[f->channel];
	switch (f->frame_type) {
	case AMQP_FRAME_METHOD:
		if (in->state != IN_IDLE) {
			transport_lose(t, false, "a method frame inside a message on channel %u",
				       f->channel);
			return;
		}
		if (f->payload.method.id == AMQP_BASIC_DELIVER_METHOD &&
		    (f->channel == CH_REQUEST || f->channel == CH_CONTROL)) {
			const amqp_basic_deliver_t *dm = f->payload.method.decoded;
			in->tag = dm->delivery_tag;
		} else if (f->payload.method.id == AMQP_BASIC_RETURN_METHOD) {
			const amqp_basic_return_t *rm = f->payload.method.decoded;
			in->is_return = true;
			in->return_code = rm->reply_code;
			snprintf(in->routing_key, sizeof(in->routing_key), "%.*s",
				 (int)rm->routing_key.len, (const char *)rm->routing_key.bytes);
		} else {
			method_handle(t, f);
			return;
		}
		init_amqp_pool(&in->msg.pool, 4096);
		in->state = IN_HEADER;
		return;
	case AMQP_FRAME_HEADER: {
		uint64_t size = f->payload.properties.body_size;

		if (in->state != IN_HEADER || size > BODY_MAX) {
			/* The broker sends nothing larger than its
			 * max_message_size (128 MiB by default). */
			transport_lose(t, false, "unexpected content header on channel %u (%" PRIu64
				       " bytes)", f->channel, size);
			return;
		}
		properties_clone(f->payload.properties.decoded, &in->msg);
		in->msg.body = size > 0 ? amqp_bytes_malloc((size_t)size) : amqp_empty_bytes;
		if (size > 0 && in->msg.body.bytes == NULL)
			fatalx("out of memory");
		in->body_got = 0;
		in->state = IN_BODY;
		if (size == 0)
			incoming_complete(t, f->channel);
		return;
	}
	case AMQP_FRAME_BODY: {
		amqp_bytes_t frag = f->payload.body_fragment;

		if (in->state != IN_BODY || frag.len > in->msg.body.len - in->body_got) {
			transport_lose(t, false, "unexpected content body on channel %u",
				       f->channel);
			return;
		}
		memcpy((char *)in->msg.body.bytes + in->body_got, frag.bytes, frag.len);
		in->body_got += frag.len;
		if (in->body_got == in->msg.body.len)
			incoming_complete(t, f->channel);
		return;
	}
	default:
		log_debug("ignoring a frame of type %u on channel %u", f->frame_type, f->channel);
		return;
	}
}

/* Whatever frames have arrived, without blocking: a message cut in the
 * middle waits for its next frame in t->in, not in a read.  Bounded per
 * turn so settlements are not starved. */
static void
frames_read(struct transport *t)
{
	for (int i = 0; i < FRAMES_PER_TURN && t->connected; i++) {
		struct timeval zero = {0, 0};
		amqp_frame_t f;
		int rc;

		amqp_maybe_release_buffers(t->conn);
		rc = amqp_simple_wait_frame_noblock(t->conn, &f, &zero);
		if (rc == AMQP_STATUS_TIMEOUT)
			return;
		if (rc != AMQP_STATUS_OK) {
			transport_lose(t, false, "reading a frame: %s", amqp_error_string2(rc));
			return;
		}
		frame_handle(t, &f);
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

/* No new work: cancel both consumers; what arrives before cancel-ok goes
 * to the scheduler, which is shutting down and requeues it.  The
 * connection stays, to settle what runs. */
static void
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

static void
stop_begin(struct transport *t)
{
	t->stopping = true;
	t->stop_deadline_ns = now_ns() + (uint64_t)STOP_DRAIN_MS * 1000000u;
	if (t->consuming)
		consumers_cancel(t);
}

static bool
outgoing_queued(struct transport *t)
{
	bool any;

	pthread_mutex_lock(&t->lock);
	any = t->out != NULL;
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
		if (!t->connected && now_ns() >= t->next_attempt_ns &&
		    (!t->stopping ||
		     (outgoing_queued(t) && now_ns() < t->stop_deadline_ns)))
			connection_attempt(t);

		settlements_perform(t);
		outgoing_flush(t);
		if (t->connected)
			frames_read(t);
		if (t->stopping &&
		    ((!t->connected && !outgoing_queued(t)) || drained(t) ||
		     now_ns() >= t->stop_deadline_ns))
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
		log_info("AMQP connection to %s closed", t->uri_masked);
	}
	/* From now on settle() frees directly; the broker has requeued. */
	pthread_mutex_lock(&t->lock);
	t->run_returned = true;
	late = t->settled;
	t->settled = NULL;
	t->settled_tail = &t->settled;
	while ((o = t->out) != NULL) {
		t->out = o->next;
		t->out_count--;
		t->out_bytes -= o->bytes;
		t->stats.publish_failures++;
		outgoing_free(o);
		dropped++;
	}
	t->out_tail = &t->out;
	pthread_mutex_unlock(&t->lock);
	if (dropped > 0)
		log_warnx("%zu plugin publishes dropped at stop: the broker could not be "
			  "reached in time", dropped);
	pthread_mutex_lock(&t->lock);
	log_info("AMQP totals: %" PRIu64 " requests, %" PRIu64 " acks, %" PRIu64 " requeues, %"
		 PRIu64 " retries, %" PRIu64 " dead letters, %" PRIu64 " reconnects",
		 t->stats.deliveries, t->stats.acks, t->stats.requeues, t->stats.retries,
		 t->stats.dead_letters, t->stats.reconnects);
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
	t->settled_tail = &t->settled;
	t->out_tail = &t->out;
	t->confirms_tail = &t->confirms;
	t->deferred_tail = &t->deferred;
	t->backoff_ms = BACKOFF_MIN_MS;
	t->rng = now_ns() ^ ((uint64_t)getpid() << 32) ^ (uint64_t)(uintptr_t)t;
	if (t->rng == 0)
		t->rng = 1;
	/* Stable for this process, unique across restarts and hosts. */
	snprintf(t->control_queue, sizeof(t->control_queue), "%.120s.%.64s.%ld.%04x",
		 t->control_exchange, host, (long)getpid(), (unsigned)(t->rng & 0xffff));
	t->frame_max_shared = AMQP_DEFAULT_FRAME_SIZE; /* until connected */
	return t;
}

void
transport_quiesce(struct transport *t)
{
	pthread_mutex_lock(&t->lock);
	t->quiesce = true;
	pthread_mutex_unlock(&t->lock);
	wake(t);
}

void
transport_stop(struct transport *t)
{
	pthread_mutex_lock(&t->lock);
	t->stop = true;
	pthread_mutex_unlock(&t->lock);
	wake(t);
}

/* What a plugin publish would put in its header frame: flags, delivery
 * mode, and a table of string entries (1 + key + 'S' + 4 + value each). */
static size_t
outgoing_header_size(const char *name, const struct occamy_kv *headers, size_t nheaders)
{
	size_t size = HEADER_FRAME_OVERHEAD + 2 + 1 + 4;

	if (name != NULL)
		size += 6 + 64 + strlen(name); /* our header, its key at most 64 */
	for (size_t i = 0; i < nheaders; i++)
		size += 6 + strlen(headers[i].key != NULL ? headers[i].key : "") +
			strlen(headers[i].value != NULL ? headers[i].value : "");
	return size;
}

/* Refuse what can never be sent, here, in the caller's thread: the plugin
 * learns it from the -1 and nothing reaches the wire. */
static int
outgoing_check(struct transport *t, const char *name, const struct occamy_kv *headers,
	       size_t nheaders, const void *body, size_t len, char *why, size_t whylen)
{
	unsigned frame_max;
	size_t size;

	if (nheaders > HEADERS_MAX || (nheaders > 0 && headers == NULL) ||
	    (len > 0 && body == NULL)) {
		snprintf(why, whylen, "bad arguments (%zu headers)", nheaders);
		return -1;
	}
	for (size_t i = 0; i < nheaders; i++) {
		size_t kl = headers[i].key != NULL ? strlen(headers[i].key) : 0;
		if (kl == 0 || kl > SHORTSTR_MAX) {
			snprintf(why, whylen, "header key of %zu bytes (1 to %d)", kl, SHORTSTR_MAX);
			return -1;
		}
	}
	if (len > BODY_MAX) {
		snprintf(why, whylen, "body of %zu bytes (at most %u)", len, BODY_MAX);
		return -1;
	}
	pthread_mutex_lock(&t->lock);
	frame_max = t->frame_max_shared;
	pthread_mutex_unlock(&t->lock);
	size = outgoing_header_size(name, headers, nheaders);
	if (size > frame_max) {
		snprintf(why, whylen, "headers of about %zu bytes do not fit in the %u-byte frame",
			 size, frame_max);
		return -1;
	}
	return 0;
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
	free(t->scratch);
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
