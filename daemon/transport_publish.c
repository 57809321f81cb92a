/*
 * transport_publish.c - every publish: replies, error replies, dead-letter
 * copies, requeue and retry copies, plugin publishes.  Each one is sized
 * against the negotiated frame before a byte is written (rabbitmq-c writes
 * basic.publish before it finds out that the header frame does not fit,
 * which corrupts the stream): a publish that cannot be sent is an outcome
 * for its message, never a lost connection.  Owner thread, except
 * outgoing_check(), which transport_publish() runs on the caller's.
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

/* Do the properties p, encoded, fit in a header frame with headroom bytes
 * to spare?  A cheap upper bound first, so that the usual small reply or
 * copy is not encoded twice: 64 for the flags and fixed fields, 9 short
 * strings of at most 256, and per header its key, 16 for kinds and lengths
 * and a string's bytes; a table or an array is encoded to see. */
bool
properties_fit(struct transport *t, const amqp_basic_properties_t *p, size_t headroom)
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
	if (bound + headroom + HEADER_FRAME_OVERHEAD <= t->frame_max)
		return true;
	rc = amqp_encode_properties(AMQP_BASIC_CLASS, (void *)p,
				    (amqp_bytes_t){t->frame_max - HEADER_FRAME_OVERHEAD, t->scratch});
	return rc >= 0 && (size_t)rc + headroom + HEADER_FRAME_OVERHEAD <= t->frame_max;
}

/* The one way out.  PUB_REFUSED (and why) for a message that cannot be
 * sent as it is; nothing was written then. */
enum publish_result
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
	if (!properties_fit(t, p, 0)) {
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

/* The machine-readable kind of a final failure, for x-occamy-status: the
 * prefix of the scheduler's reason, or what the transport decided. */
static const char *
error_status(const struct delivery *d)
{
	static const char *const kinds[] = {"invalid_body", "invalid_headers", "invalid_task"};

	if (d->handler_outcome != NULL && strcmp(d->handler_outcome, "retries-exhausted") == 0)
		return "internal_error";
	if (d->handler_outcome != NULL && strcmp(d->handler_outcome, "crash-limit") == 0)
		return "crashed";
	if (strncmp(d->reason, "invalid_task: unknown handler", 29) == 0)
		return "unknown_handler";
	for (size_t i = 0; i < sizeof(kinds) / sizeof(kinds[0]); i++)
		if (strncmp(d->reason, kinds[i], strlen(kinds[i])) == 0)
			return kinds[i];
	if (d->handler_outcome != NULL && strcmp(d->handler_outcome, "refused") == 0)
		return "invalid_headers"; /* what the transport refused to forward */
	return "rejected";
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
void
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
	e = copy_properties(&d->msg.properties, extra, 3, &p);
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

/* A publish that d's settlement needed did not go out: refused (why), d
 * is dead-lettered saying what failed; lost, d went with its connection
 * and the broker has requeued the original. */
static void
publish_failed(struct transport *t, struct delivery *d, enum publish_result r,
	       const char *what, const char *why, const char *handler_outcome)
{
	if (r == PUB_LOST) {
		STAT_ADD(t, stale_settlements, 1);
		delivery_free(d);
		return;
	}
	snprintf(d->reason, sizeof(d->reason), "%s: %.200s", what, why);
	d->handler_outcome = handler_outcome;
	dead_letter_publish(t, d);
}

/* Publish the result to reply_to (mandatory: an unroutable reply comes
 * back as basic.return); the ack waits for the confirm. */
void
reply_publish(struct transport *t, struct delivery *d)
{
	const amqp_basic_properties_t *orig = &d->msg.properties;
	amqp_basic_properties_t p;
	amqp_bytes_t body = {d->reply_len, d->reply};
	enum publish_result r;
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
	r = publish_checked(t, "", orig->reply_to, true, &p, body, why, sizeof(why));
	if (r == PUB_SENT)
		confirm_expect(t, PENDING_REPLY, d, NULL);
	else
		publish_failed(t, d, r, "the reply cannot be sent", why, "reply-refused");
}

/* Requeue (retry false) or retry a request: publish a copy, then ack the
 * original when the copy is confirmed.  A retry carries the new attempt
 * count and goes through the delay queue of its step. */
void
copy_publish(struct transport *t, struct delivery *d, bool retry)
{
	amqp_basic_properties_t p;
	amqp_table_entry_t extra[2], *e;
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
	/* The crash guard's count goes on with the copy. */
	if (d->redeliveries > 0)
		extra[nextra++] = entry_int(HEADER_REDELIVERIES, d->redeliveries);
	e = copy_properties(&d->msg.properties, extra, nextra, &p);
	r = publish_checked(t, exchange, amqp_cstring_bytes(rkey), false, &p, d->msg.body, why,
			    sizeof(why));
	free(e);
	if (r == PUB_SENT) {
		event_note(t, retry ? "retry" : "requeue", delivery_what(d), d->reason);
		confirm_expect(t, PENDING_COPY, d, NULL);
		return;
	}
	/* Refused: delivery_accept() lets in only what a copy can carry. */
	publish_failed(t, d, r, "cannot be requeued", why, "refused");
}

void
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
void
outgoing_requeue(struct transport *t, struct outgoing_queue *back)
{
	if (STAILQ_EMPTY(back))
		return;
	pthread_mutex_lock(&t->lock);
	STAILQ_CONCAT(back, &t->out);
	STAILQ_CONCAT(&t->out, back);
	pthread_mutex_unlock(&t->lock);
}

/* Forget a publish that will not be sent. */
void
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

void
outgoing_flush(struct transport *t)
{
	struct outgoing_queue list = STAILQ_HEAD_INITIALIZER(list);
	struct outgoing *o;
	char why[REASON_MAX];

	if (!t->connected || t->blocked)
		return;
	pthread_mutex_lock(&t->lock);
	STAILQ_CONCAT(&list, &t->out);
	pthread_mutex_unlock(&t->lock);

	while ((o = STAILQ_FIRST(&list)) != NULL) {
		STAILQ_REMOVE_HEAD(&list, next);
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
		STAILQ_INSERT_HEAD(&list, o, next);
		outgoing_requeue(t, &list);
		return;
	}
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
int
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
