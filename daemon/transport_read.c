/*
 * transport_read.c - from frames to deliveries: frames are read without
 * blocking and assembled per channel across loop turns, so a peer that
 * stalls in the middle of a message never stops the loop; a delivery goes
 * to the scheduler, or is refused here if no copy of it could be sent.
 * Owner thread.
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

/* What identifies a request across copies and redeliveries: its
 * message id, or a hash of its body (its length and at most its first
 * FINGERPRINT_BODY_MAX bytes: this runs for every request on the owner
 * thread), correlation id, handler and task id. */
#define FINGERPRINT_BODY_MAX 65536
static void
fingerprint_of(const struct delivery *d, const char *handler, const char *task_id, char *out,
	       size_t len)
{
	const amqp_basic_properties_t *p = &d->msg.properties;
	uint64_t h = 0xcbf29ce484222325u;
	const unsigned char *b;

	if ((p->_flags & AMQP_BASIC_MESSAGE_ID_FLAG) && p->message_id.len > 0 &&
	    p->message_id.len < len) {
		snprintf(out, len, "%.*s", (int)p->message_id.len, (const char *)p->message_id.bytes);
		return;
	}
	b = d->msg.body.bytes;
	h = (h ^ d->msg.body.len) * 0x100000001b3u;
	for (size_t i = 0; i < d->msg.body.len && i < FINGERPRINT_BODY_MAX; i++)
		h = (h ^ b[i]) * 0x100000001b3u;
	if (p->_flags & AMQP_BASIC_CORRELATION_ID_FLAG) {
		b = p->correlation_id.bytes;
		for (size_t i = 0; i < p->correlation_id.len; i++)
			h = (h ^ b[i]) * 0x100000001b3u;
	}
	for (const char *c = handler; *c != '\0'; c++)
		h = (h ^ (unsigned char)*c) * 0x100000001b3u;
	h = (h ^ 0xff) * 0x100000001b3u;
	for (const char *c = task_id; *c != '\0'; c++)
		h = (h ^ (unsigned char)*c) * 0x100000001b3u;
	snprintf(out, len, "fnv-%016" PRIx64, h);
}

static const char *
header_text(const struct delivery *d, const char *key)
{
	const struct occamy_header *h = occamy_headers_find(&d->base.headers, key);

	return h != NULL && h->kind == OCCAMY_VALUE_STRING ? h->str : "";
}

/* The crash guard: on how many daemons was this request in flight when
 * they crashed or lost their connection?  The count travels with the
 * request (x-occamy-redeliveries, plus a quorum queue's x-delivery-count,
 * or a classic queue's redelivered flag).  At crash_limit it is
 * dead-lettered instead of run again.  A classic queue says only
 * "redelivered", so a new loss is written into a copy, which runs when it
 * comes back.  Returns true if it settled d. */
static bool
crash_guard(struct transport *t, struct delivery *d)
{
	const struct occamy_header *h = occamy_headers_find(&d->base.headers, HEADER_REDELIVERIES);
	int64_t lost = h != NULL && h->kind == OCCAMY_VALUE_INT && h->i > 0 ? h->i : 0;
	bool new_loss = false;

	if (t->quorum) {
		h = occamy_headers_find(&d->base.headers, "x-delivery-count");
		if (h != NULL && h->kind == OCCAMY_VALUE_INT && h->i > 0)
			lost += h->i;
	} else if (d->redelivered) {
		lost++;
		new_loss = true;
	}
	d->redeliveries = lost;
	if (t->crash_limit > 0 && lost >= t->crash_limit) {
		d->outcome = SETTLE_DEAD_LETTER;
		d->handler_outcome = "crash-limit";
		snprintf(d->reason, sizeof(d->reason),
			 "crashed %" PRId64 " servers: in flight on %" PRId64
			 " daemons that crashed or lost their connection (crash_limit %u)",
			 lost, lost, t->crash_limit);
		settlement_carry_out(t, d);
		return true;
	}
	if (new_loss && t->crash_limit > 0) {
		d->outcome = SETTLE_REQUEUE;
		snprintf(d->reason, sizeof(d->reason), "redelivered: lost with a connection");
		settlement_carry_out(t, d);
		return true;
	}
	return false;
}

/* Record keeping: the request is in hand from now until it is settled. */
static void
record_begin(struct transport *t, struct delivery *d)
{
	struct record_info ri;

	if (t->records == NULL)
		return;
	memset(&ri, 0, sizeof(ri));
	snprintf(ri.handler, sizeof(ri.handler), "%s", header_text(d, t->header_handler));
	snprintf(ri.task_id, sizeof(ri.task_id), "%s", header_text(d, t->header_task_id));
	fingerprint_of(d, ri.handler, ri.task_id, ri.fingerprint, sizeof(ri.fingerprint));
	ri.started_ms = clock_wall_ms();
	ri.redeliveries = d->redeliveries;
	d->record_slot = records_begin(t->records, &ri);
}

void
delivery_accept(struct transport *t, amqp_channel_t channel, uint64_t tag, bool redelivered,
		amqp_message_t *msg)
{
	struct delivery *d = xcalloc(1, sizeof(*d));
	char why[REASON_MAX];
	const struct occamy_header *h, *cmd;

	d->t = t;
	d->generation = t->generation;
	d->tag = tag;
	d->channel = channel;
	d->redelivered = redelivered;
	d->record_slot = -1;
	d->msg = *msg; /* take it over */
	memset(msg, 0, sizeof(*msg));

	d->base.ops = &delivery_ops;
	d->base.body = d->msg.body.bytes;
	d->base.len = d->msg.body.len;
	d->base.arrival_ns = clock_now_ns();
	/* Not opened (an out-of-order tag, never seen): acked alone. */
	(void)ack_window_open(&t->acks[channel], tag);

	if (d->channel == CH_REQUEST)
		STAT_ADD(t, deliveries, 1);
	else
		STAT_ADD(t, control_deliveries, 1);

	if (!properties_fit(t, &d->msg.properties, COPY_HEADROOM)) {
		/* Every outcome but an ack needs a copy: refuse it now,
		 * while a trimmed dead-letter copy can still say why. */
		d->outcome = SETTLE_DEAD_LETTER;
		d->handler_outcome = "refused";
		snprintf(d->reason, sizeof(d->reason),
			 "headers too large: a copy would not fit in the %u-byte frame",
			 t->frame_max);
		settlement_carry_out(t, d);
		return;
	}
	if (headers_flatten(&d->msg.properties, &d->items, &d->base.headers.count, why,
			    sizeof(why)) < 0) {
		d->outcome = SETTLE_DEAD_LETTER;
		d->handler_outcome = "refused";
		snprintf(d->reason, sizeof(d->reason), "%s", why);
		settlement_carry_out(t, d);
		return;
	}
	d->base.headers.items = d->items;
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
		settlement_carry_out(t, d);
		return;
	}
	if (d->channel == CH_REQUEST &&
	    (h = occamy_headers_find(&d->base.headers, HEADER_ATTEMPTS)) != NULL &&
	    h->kind == OCCAMY_VALUE_INT && h->i > 0)
		d->attempts = (uint64_t)h->i;
	if (d->channel == CH_REQUEST) {
		if (crash_guard(t, d))
			return;
		record_begin(t, d);
	}

	pthread_mutex_lock(&t->lock);
	t->outstanding++;
	pthread_mutex_unlock(&t->lock);
	if (d->channel == CH_REQUEST)
		sched_submit_request_held(t->sched, &d->base, &t->held);
	else
		sched_submit_control(t->sched, &d->base);
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
	delivery_accept(t, ch, in->tag, in->redelivered, &msg);
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
		/* Not a silent stop: consume again soon, on the same channel. */
		if (f->channel == CH_REQUEST || f->channel == CH_CONTROL) {
			t->reconsume[f->channel] = true;
			if (t->reconsume_ns == 0)
				t->reconsume_ns = clock_now_ns() + (uint64_t)RECONSUME_MS * 1000000u;
		}
		event_note(t, "reconsume", "consumer cancelled by the broker",
			   f->channel == CH_REQUEST ? "request queue" : "control queue");
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
			in->redelivered = dm->redelivered;
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
void
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
