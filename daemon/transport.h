/*
 * amqp.h - the AMQP transport: the one thread that owns the rabbitmq-c
 * connection, turns deliveries into struct message for the scheduler and
 * carries settlements and publishes from other threads back to the broker.
 *
 * The rule: every outgoing publish (reply, dead-letter copy, requeue or
 * retry copy, plugin publish, status answer) is checked and sized before it
 * is queued or written.  A publish that cannot be sent is an outcome for
 * its message, with a reason (refused at transport_publish(), or the
 * request dead-lettered); it never drops the connection.  Only socket and
 * protocol failures do.
 */
#ifndef OCCAMY_AMQP_H
#define OCCAMY_AMQP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <occamy/plugin.h>

#include "scheduler.h" /* enum settle_outcome */

struct config;
struct sched;
struct transport;

enum publish_kind {
	PUBLISH_REQUEST, /* to request_exchange, routing key request_queue; name = handler */
	PUBLISH_CONTROL, /* to control_exchange; name = task ID */
	PUBLISH_HELP,    /* to control_exchange without task ID; name = handler */
};

/* A control message with this header is a command to the daemon itself. */
#define COMMAND_HEADER "x-occamy-command"

struct transport_hooks {
	void *ctx;
	/* Called from the owner thread once per loop turn (at least every
	 * half heartbeat); healthy = connected and heartbeats fine.  main.c
	 * pings the systemd watchdog from here. */
	void (*turn)(void *ctx, bool healthy);
	/* Longest wait between turns (0: the transport's own default). */
	unsigned turn_max_ms;
	/* Connection state changed (for STATUS= and logs). */
	void (*state)(void *ctx, bool connected);
	/* Text answering a control message with x-occamy-command: status
	 * (occamyctl status); malloc()ed, or NULL.  Owner thread. */
	char *(*status)(void *ctx, size_t *len);
};

/* Requeue, retry and resend events, counted by path and reason. */
#define TRANSPORT_EVENTS_MAX 32
struct transport_event {
	char path[16];   /* "requeue", "retry", "resend" */
	char reason[64]; /* the settlement's reason, cut */
	uint64_t count;
};

struct transport_stats {
	bool connected;
	uint64_t reconnects;
	uint64_t deliveries;        /* requests received */
	uint64_t control_deliveries;
	uint64_t acks, requeues, retries, dead_letters;
	uint64_t replies;           /* results published to reply_to */
	uint64_t error_replies;     /* error replies beside dead letters, confirmed */
	uint64_t replies_unroutable; /* returned: result dead-lettered */
	uint64_t replies_refused;   /* nacked by the broker */
	uint64_t publishes;         /* plugin publishes confirmed */
	uint64_t publish_failures;  /* nacked, or dropped after RESENDS_MAX */
	uint64_t publish_refused;   /* refused before sending: cannot be encoded */
	uint64_t stale_settlements; /* dropped: from an older connection */
	unsigned frame_max;         /* negotiated */
	unsigned nevents;
	struct transport_event events[TRANSPORT_EVENTS_MAX];
};

/* What a settlement outcome means on the wire (settle_policy()). */
enum settle_action {
	SETTLE_DO_ACK,            /* basic.ack */
	SETTLE_DO_REPLY,          /* the result to reply_to, confirmed, then ack */
	SETTLE_DO_REQUEUE_COPY,   /* a copy to the request queue's tail, then ack */
	SETTLE_DO_REJECT_REQUEUE, /* basic.reject(requeue): a control message */
	SETTLE_DO_RETRY,          /* a copy through the delay queue, then ack */
	SETTLE_DO_DEAD_LETTER,    /* a copy (+ error reply) to the dead letters, then ack */
};

/* Pure: the action for one delivery.  is_request: from the request queue;
 * wants_reply: it has reply_to (a request, or a command to the daemon);
 * attempts: failed attempts before this delivery. */
enum settle_action settle_policy(enum settle_outcome outcome, bool is_request,
				 bool wants_reply, uint64_t attempts, unsigned delivery_limit);

/* Checks what config.c cannot: the URI parses, the password file can be
 * read (warns if others may read it too).  -1 with why on error. */
int transport_check_config(const struct config *cfg, char *why, size_t whylen);

/* Reads the [amqp] and header settings of cfg (copied; cfg may go away). */
struct transport *transport_new(const struct config *cfg, struct sched *s,
				const struct transport_hooks *hooks);

/* The owner loop: connect, declare, consume, reconnect with backoff, until
 * transport_stop().  Run it on its own thread.  Returns 0. */
int transport_run(struct transport *t);

/* Thread-safe: ask the loop to return after flushing pending settlements
 * (bounded by a short timeout). */
void transport_stop(struct transport *t);

struct records;
/* Before transport_run(): keep a record of every request in hand there
 * (records.h); NULL: none. */
void transport_set_records(struct transport *t, struct records *r);

/* Thread-safe: cancel the consumers (nothing new arrives) but keep the
 * connection, so that running requests are still settled on it.  The first
 * step of a graceful stop. */
void transport_quiesce(struct transport *t);

/* Thread-safe.  Copies everything; returns 0 if queued, -1 (logged) if not
 * connected, the outgoing queue is full, or the message cannot be sent at
 * all: a header key over 255 bytes, a header table that does not fit in
 * the negotiated frame, a body over 128 MiB. */
int transport_publish(struct transport *t, enum publish_kind kind, const char *name,
		      const struct occamy_kv *headers, size_t nheaders,
		      const void *body, size_t len);

void transport_get_stats(struct transport *t, struct transport_stats *out);

/* After transport_run() has returned. */
void transport_free(struct transport *t);

#endif /* OCCAMY_AMQP_H */
