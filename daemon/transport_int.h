/*
 * transport_int.h - what the transport's files share: its constants, the
 * structures of one connection's life, and the functions that cross files.
 * Not for the rest of the daemon (transport.h is).
 *
 * Threads and the lock: one owner thread (transport_run) owns everything
 * under "Owner thread only" in struct transport, the rabbitmq-c connection
 * included, and is the only caller of every function below except
 * settlement_enqueue(), transport_publish() and the other public entry
 * points, which any thread may call.  t->lock guards the block under it and
 * is never held across a rabbitmq-c call or a call into the scheduler.
 *
 * Files: transport.c (the loop, public API, events), transport_conn.c
 * (login, topology, connection loss), transport_read.c (frames to
 * deliveries), transport_settle.c (settlements and confirms),
 * transport_publish.c (every publish), amqp_fields.c (pure conversions),
 * backoff.c (reconnect delays).
 */
#ifndef OCCAMY_TRANSPORT_INT_H
#define OCCAMY_TRANSPORT_INT_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/queue.h>
#include <time.h>

#include <amqp.h>

#include "ack_window.h"
#include "amqp_fields.h"
#include "backoff.h"
#include "clock.h"
#include "records.h"
#include "transport.h"
#include "scheduler.h"

#ifndef OCCAMY_VERSION
#define OCCAMY_VERSION "dev"
#endif

enum {
	CH_REQUEST = 1,
	CH_CONTROL = 2,
	CH_PUBLISH = 3,
};

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
#define RECONSUME_MS 1000           /* after the broker cancelled a consumer */

#define HEADER_ERROR "x-occamy-error"
#define HEADER_STATUS "x-occamy-status"
#define HEADER_OUTCOME "x-occamy-handler-outcome"
#define HEADER_ATTEMPTS "x-occamy-attempts"
#define HEADER_REQUEUES "x-occamy-requeues"
#define HEADER_REDELIVERIES "x-occamy-redeliveries"

/* A message being assembled from its frames (method, header, body), one
 * per channel: frames of different channels may interleave. */
struct incoming {
	enum { IN_IDLE, IN_HEADER, IN_BODY } state;
	bool is_return;        /* basic.return on CH_PUBLISH */
	uint64_t tag;          /* basic.deliver */
	bool redelivered;      /* basic.deliver */
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
	STAILQ_ENTRY(delivery) next; /* in t->settled or t->deferred */
	uint64_t generation;
	uint64_t tag;
	amqp_channel_t channel;
	uint64_t attempts;      /* failed attempts before this delivery */
	bool redelivered;       /* the broker's flag: lost with a connection before */
	int64_t redeliveries;   /* lost with a connection, all copies counted */
	int record_slot;        /* in state_dir's tasks file, or -1 */
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
	STAILQ_ENTRY(outgoing) next; /* in t->out or a resend list */
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
	STAILQ_ENTRY(pending) next; /* in t->confirms, by seq */
	uint64_t seq;
	enum pending_kind kind;
	bool returned;   /* basic.return came first: unroutable */
	struct delivery *d;
	struct outgoing *o;
};

STAILQ_HEAD(delivery_queue, delivery);
STAILQ_HEAD(outgoing_queue, outgoing);
STAILQ_HEAD(pending_queue, pending);

enum publish_result {
	PUB_SENT,    /* written; a confirm will follow */
	PUB_REFUSED, /* this message cannot be sent (why says why) */
	PUB_LOST,    /* the connection broke */
};

/* One broker node of [amqp] uri. */
struct broker_node {
	char *uri_buf;  /* amqp_parse_url() points into this */
	struct amqp_connection_info ci;
	char *masked;   /* for logs: the password as *** */
};

struct transport {
	/* Settings, copied at transport_new(). */
	struct broker_node *nodes;
	size_t nnodes;
	char *password_file;
	char *tls_ca, *tls_cert, *tls_key;
	bool tls_verify_peer, tls_verify_hostname;
	unsigned heartbeat_s, prefetch, delivery_limit, crash_limit;
	struct records *records; /* NULL: no record keeping */
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
	struct delivery_queue settled; /* settle() -> owner */
	struct outgoing_queue out;     /* publish() -> owner */
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
	/* Open delivery tags of CH_REQUEST and CH_CONTROL: acks decided in a
	 * loop turn go out at its end, several as one (acks_flush). */
	struct ack_window acks[CH_PUBLISH + 1];
	struct pending_queue confirms;  /* unconfirmed publishes, by seq */
	/* Slot workers of this turn's requests, woken after frames_read(). */
	struct sched_held_wakeups held;
	struct delivery_queue deferred; /* need a publish; blocked */
	unsigned heartbeat_ms; /* negotiated */
	struct backoff backoff;
	unsigned failures;     /* consecutive failed attempts */
	uint64_t next_attempt_ns;
	uint64_t connected_since_ns;
	size_t node;           /* of nodes[]: connected to, or to try next */
	uint64_t reconsume_ns; /* the broker cancelled a consumer: consume again then */
	bool reconsume[CH_PUBLISH + 1]; /* which consumers, by channel */
	uint64_t event_logged_ns[TRANSPORT_EVENTS_MAX]; /* by stats.events[] */
	uint64_t event_unlogged[TRANSPORT_EVENTS_MAX];
};

/* The topology, declared at every connect, as a table: each step an
 * exchange, a queue or a binding, in the order the broker needs them. */
enum declare_kind { DECLARE_EXCHANGE, DECLARE_QUEUE, DECLARE_BIND };

struct declare {
	enum declare_kind kind;
	const char *name;     /* the exchange or queue */
	const char *exchange; /* DECLARE_EXCHANGE: its type; DECLARE_BIND: the exchange */
	const char *key;      /* DECLARE_BIND: the binding key */
	bool durable;
	amqp_table_entry_t args[6];
	int nargs;
};

#define TOPOLOGY_MAX (10 + RETRY_STEPS_MAX)

struct topology {
	struct declare steps[TOPOLOGY_MAX];
	size_t n;
	char retry_names[RETRY_STEPS_MAX][300];
};

#define STAT_ADD(t, field, n)                                                  \
	do {                                                                   \
		pthread_mutex_lock(&(t)->lock);                                \
		(t)->stats.field += (n);                                       \
		pthread_mutex_unlock(&(t)->lock);                              \
	} while (0)

/* transport_settle.c: the scheduler's message_ops for a delivery. */
extern const struct message_ops delivery_ops;

/* transport.c */
void
wake(struct transport *t);
void
event_note(struct transport *t, const char *path, const char *what, const char *reason);
void
transport_destroy(struct transport *t);

/* transport_conn.c */
void
connection_drop(struct transport *t, bool clean);
void
transport_lose(struct transport *t, bool clean, const char *fmt, ...);
void
connection_attempt(struct transport *t);
void
consumers_cancel(struct transport *t);

void consumers_restart(struct transport *t);

/* transport_read.c */
void
delivery_accept(struct transport *t, amqp_channel_t channel, uint64_t tag, bool redelivered,
		amqp_message_t *msg);
void
frames_read(struct transport *t);

/* transport_settle.c */
void
delivery_free(struct delivery *d);
const char *
delivery_what(const struct delivery *d);
bool
delivery_has(const struct delivery *d, amqp_flags_t flag, amqp_bytes_t b);
bool
check_status(struct transport *t, int rc, const char *what);
void
acks_flush(struct transport *t);
void
delivery_reject(struct transport *t, struct delivery *d, bool requeue);
void
confirm_expect(struct transport *t, enum pending_kind kind, struct delivery *d,
	       struct outgoing *o);
void
settlement_carry_out(struct transport *t, struct delivery *d);
void
confirm_received(struct transport *t, uint64_t tag, bool multiple, bool ok);
void
return_received(struct transport *t, const struct incoming *in);
void
settlements_drain(struct transport *t);

/* transport_publish.c */
bool properties_fit(struct transport *t, const amqp_basic_properties_t *p, size_t headroom);
enum publish_result
publish_checked(struct transport *t, const char *exchange, amqp_bytes_t rkey, bool mandatory,
		const amqp_basic_properties_t *p, amqp_bytes_t body, char *why, size_t whylen);
void
dead_letter_publish(struct transport *t, struct delivery *d);
void
reply_publish(struct transport *t, struct delivery *d);
void
copy_publish(struct transport *t, struct delivery *d, bool retry);
void
outgoing_free(struct outgoing *o);
void
outgoing_requeue(struct transport *t, struct outgoing_queue *back);
void
outgoing_drop(struct transport *t, struct outgoing *o, const char *path, const char *reason);
void
outgoing_flush(struct transport *t);
int
outgoing_check(struct transport *t, const char *name, const struct occamy_kv *headers,
	       size_t nheaders, const void *body, size_t len, char *why, size_t whylen);

#endif /* OCCAMY_TRANSPORT_INT_H */
