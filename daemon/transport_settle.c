/*
 * transport_settle.c - settlements and publisher confirms.  Any thread
 * enqueues a settlement (settlement_enqueue); the owner thread carries it
 * out by the settlement policy (settle_policy, pure) and resolves the
 * broker's confirms of what it published for it.  A request is acked only
 * once every publish its settlement needs is confirmed.
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

static void settlement_enqueue(struct message *m, const struct settlement *s);

const struct message_ops delivery_ops = {
	.settle = settlement_enqueue,
};

void
delivery_free(struct delivery *d)
{
	/* Settled, or gone with its connection: out of hand.  Owner thread:
	 * other threads clear record_slot first (settlement_enqueue). */
	if (d->record_slot >= 0)
		records_end(d->t->records, d->record_slot);
	/* Plain memory of this delivery: no connection state is touched. */
	amqp_destroy_message(&d->msg);
	free(d->items);
	free(d->reply);
	free(d);
}

const char *
delivery_what(const struct delivery *d)
{
	return d->channel == CH_REQUEST ? "request" : "control message";
}

bool
delivery_has(const struct delivery *d, amqp_flags_t flag, amqp_bytes_t b)
{
	return (d->msg.properties._flags & flag) && b.len > 0;
}

/* message_ops.settle: any thread.  Copy the settlement, queue the delivery
 * for the owner thread and wake it. */
static void
settlement_enqueue(struct message *m, const struct settlement *s)
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
		first = STAILQ_EMPTY(&t->settled);
		STAILQ_INSERT_TAIL(&t->settled, d, next);
	}
	pthread_mutex_unlock(&t->lock);

	if (late) {
		/* The broker requeues it when the connection closes.  Its
		 * record is the owner's: records_close() clears them all. */
		d->record_slot = -1;
		delivery_free(d);
		if (destroy)
			transport_destroy(t);
		return;
	}
	if (first)
		wake(t);
}

/* Returns false (and tears the connection down) if rc is an error. */
bool
check_status(struct transport *t, int rc, const char *what)
{
	if (rc == AMQP_STATUS_OK)
		return true;
	transport_lose(t, false, "%s: %s", what, amqp_error_string2(rc));
	return false;
}

/* Returns false if the connection broke.  The ack itself goes out at the
 * end of the loop turn (acks_flush), with those of its neighbours. */
static bool
delivery_ack(struct transport *t, struct delivery *d)
{
	if (ack_window_mark(&t->acks[d->channel], d->tag))
		return true;
	return check_status(t, amqp_basic_ack(t->conn, d->channel, d->tag, 0), "basic.ack");
}

/* Owner thread, once a turn: the acks decided since the last one.  A
 * multiple ack covers only tags that are all settled (ack_window.h). */
void
acks_flush(struct transport *t)
{
	amqp_channel_t ch;

	for (ch = CH_REQUEST; ch <= CH_CONTROL && t->connected; ch++) {
		struct ack_send send[64];
		size_t n, i;

		while (t->connected &&
		       (n = ack_window_take(&t->acks[ch], send, sizeof(send) / sizeof(send[0]))) > 0)
			for (i = 0; i < n; i++)
				if (!check_status(t, amqp_basic_ack(t->conn, ch, send[i].tag,
								    send[i].multiple),
						  "basic.ack"))
					return;
	}
}

/* Only for control messages (their own queue) and for the last resort of a
 * request whose copy the broker refused; never a loop by itself. */
void
delivery_reject(struct transport *t, struct delivery *d, bool requeue)
{
	ack_window_close(&t->acks[d->channel], d->tag);
	if (!check_status(t, amqp_basic_reject(t->conn, d->channel, d->tag, requeue),
			  "basic.reject"))
		return;
	if (requeue)
		STAT_ADD(t, requeues, 1);
	else
		STAT_ADD(t, dead_letters, 1);
}

void
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
	STAILQ_INSERT_TAIL(&t->confirms, p, next);
}

/* The settlement policy, a pure function: what an outcome means on the
 * wire for one delivery.  is_request: from the request queue; wants_reply:
 * has reply_to (a request, or a command to the daemon); attempts: failed
 * ones before this delivery. */
enum settle_action
settle_policy(enum settle_outcome outcome, bool is_request, bool wants_reply,
	      uint64_t attempts, unsigned delivery_limit)
{
	switch (outcome) {
	case SETTLE_ACK:
		return wants_reply ? SETTLE_DO_REPLY : SETTLE_DO_ACK;
	case SETTLE_REQUEUE:
		/* A control message goes back to this daemon's own queue. */
		return is_request ? SETTLE_DO_REQUEUE_COPY : SETTLE_DO_REJECT_REQUEUE;
	case SETTLE_RETRY:
		if (!is_request || (delivery_limit > 0 && attempts + 1 >= delivery_limit))
			return SETTLE_DO_DEAD_LETTER;
		return SETTLE_DO_RETRY;
	case SETTLE_DEAD_LETTER:
		return SETTLE_DO_DEAD_LETTER;
	}
	return SETTLE_DO_DEAD_LETTER;
}

static enum settle_action
settlement_action(const struct transport *t, const struct delivery *d)
{
	bool wants_reply = (d->channel == CH_REQUEST || d->is_command) &&
			   delivery_has(d, AMQP_BASIC_REPLY_TO_FLAG, d->msg.properties.reply_to);

	return settle_policy(d->outcome, d->channel == CH_REQUEST, wants_reply, d->attempts,
			     t->delivery_limit);
}

/* A retry, or the dead letter of the last attempt. */
static void
retry_or_give_up(struct transport *t, struct delivery *d)
{
	if (settle_policy(SETTLE_RETRY, d->channel == CH_REQUEST, false, d->attempts,
			  t->delivery_limit) == SETTLE_DO_RETRY) {
		copy_publish(t, d, true);
		return;
	}
	if (d->channel == CH_REQUEST) {
		char reason[REASON_MAX];

		snprintf(reason, sizeof(reason), "%.200s (attempt %" PRIu64 " of %u)", d->reason,
			 d->attempts + 1, t->delivery_limit);
		memcpy(d->reason, reason, sizeof(d->reason));
		d->handler_outcome = "retries-exhausted";
	}
	dead_letter_publish(t, d);
}

/* Owner thread: carry out one settlement.  Takes d. */
void
settlement_carry_out(struct transport *t, struct delivery *d)
{
	enum settle_action act;

	if (!t->connected || d->generation != t->generation) {
		/* Its delivery tag died with an older connection; the broker
		 * has requeued the message already. */
		STAT_ADD(t, stale_settlements, 1);
		delivery_free(d);
		return;
	}
	act = settlement_action(t, d);
	if (t->blocked && act != SETTLE_DO_ACK && act != SETTLE_DO_REJECT_REQUEUE) {
		/* Needs a publish: wait for connection.unblocked. */
		STAILQ_INSERT_TAIL(&t->deferred, d, next);
		return;
	}
	switch (act) {
	case SETTLE_DO_ACK:
		if (delivery_ack(t, d))
			STAT_ADD(t, acks, 1);
		break;
	case SETTLE_DO_REPLY:
		reply_publish(t, d);
		return;
	case SETTLE_DO_REQUEUE_COPY:
		copy_publish(t, d, false);
		return;
	case SETTLE_DO_REJECT_REQUEUE:
		event_note(t, "requeue", delivery_what(d), d->reason);
		delivery_reject(t, d, true);
		break;
	case SETTLE_DO_RETRY:
	case SETTLE_DO_DEAD_LETTER:
		if (d->outcome == SETTLE_RETRY)
			retry_or_give_up(t, d);
		else
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
void
confirm_received(struct transport *t, uint64_t tag, bool multiple, bool ok)
{
	struct pending *p;

	if (multiple) {
		while ((p = STAILQ_FIRST(&t->confirms)) != NULL && p->seq <= tag) {
			STAILQ_REMOVE_HEAD(&t->confirms, next);
			confirm_resolve(t, p, ok);
		}
		return;
	}
	STAILQ_FOREACH(p, &t->confirms, next) {
		if (p->seq > tag)
			break;
		if (p->seq != tag)
			continue;
		STAILQ_REMOVE(&t->confirms, p, pending, next);
		confirm_resolve(t, p, ok);
		return;
	}
	log_debug("confirm for unknown publish %" PRIu64, tag);
}

/* basic.return of a reply: it precedes the confirm of that publish.  Only
 * replies are mandatory; the first unresolved one to the same queue with
 * the same correlation id is the one (two such in flight are alike). */
void
return_received(struct transport *t, const struct incoming *in)
{
	struct pending *p;
	const amqp_basic_properties_t *rp = &in->msg.properties;
	amqp_bytes_t cid = (rp->_flags & AMQP_BASIC_CORRELATION_ID_FLAG) ? rp->correlation_id
									 : amqp_empty_bytes;

	STAILQ_FOREACH(p, &t->confirms, next) {
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

void
settlements_drain(struct transport *t)
{
	struct delivery_queue list = STAILQ_HEAD_INITIALIZER(list);
	struct delivery *d;

	/* Those held back by connection.blocked first, in order; a
	 * settlement may be deferred again, onto the emptied list. */
	if (!t->blocked)
		STAILQ_CONCAT(&list, &t->deferred);
	pthread_mutex_lock(&t->lock);
	STAILQ_CONCAT(&list, &t->settled);
	pthread_mutex_unlock(&t->lock);
	while ((d = STAILQ_FIRST(&list)) != NULL) {
		STAILQ_REMOVE_HEAD(&list, next);
		settlement_carry_out(t, d);
	}
}
