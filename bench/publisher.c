/*
 * publisher.c - pre-load a queue for the throughput benchmarks: publish N
 * messages as fast as the broker confirms them, so that every message is
 * on the broker (and on disk, if persistent) before a consumer starts.
 *
 *   publisher -u URI -e EXCHANGE -k ROUTING_KEY -n N
 *             [-H key=value]... [-b BODY] [-B BATCH] [-t] [-m]
 *
 *   -u URI       broker (default $OCCAMY_TEST_AMQP_URI, else amqp://guest:guest@127.0.0.1/)
 *   -e EXCHANGE  exchange ("" = the default exchange, the routing key is then a queue)
 *   -k KEY       routing key
 *   -n N         messages to publish (default 1000)
 *   -H key=value a string header (repeatable), e.g. -H handler=noop
 *   -b BODY      body (default empty)
 *   -B BATCH     publisher confirms are awaited every BATCH messages (default 2000)
 *   -t           transient (delivery_mode 1); default persistent (delivery_mode 2)
 *   -m           mandatory: an unroutable message is an error
 *
 * The exchange and queue must exist (the benchmark declares them as their
 * consumer expects).  Prints one JSON line:
 *   {"published": N, "elapsed_s": S, "msg_per_s": R, "persistent": true}
 * Exit status 0 only if the broker confirmed every message (no nack, no
 * return).  Standalone: rabbitmq-c only, no daemon code.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <amqp.h>
#include <amqp_tcp_socket.h>

#include "amqp_tool.h"

#define HEADERS_MAX 32
#define CH 1

struct confirm_state {
	uint64_t confirmed; /* highest sequence number acked or nacked, in order */
	uint64_t nacked;
	uint64_t returned;
};

/* Read frames until every publish up to seq is confirmed. */
static void
confirms_wait(amqp_connection_state_t c, struct confirm_state *st, uint64_t seq)
{
	while (st->confirmed < seq) {
		amqp_frame_t f;
		int rc;

		amqp_maybe_release_buffers(c);
		rc = amqp_simple_wait_frame(c, &f);
		if (rc != AMQP_STATUS_OK)
			die("waiting for confirms: %s", amqp_error_string2(rc));
		if (f.frame_type != AMQP_FRAME_METHOD)
			continue;
		switch (f.payload.method.id) {
		case AMQP_BASIC_ACK_METHOD: {
			amqp_basic_ack_t *a = f.payload.method.decoded;
			/* Confirms come in order: "multiple" or not, everything
			 * up to this tag that was not nacked is acked. */
			if (a->delivery_tag > st->confirmed)
				st->confirmed = a->delivery_tag;
			break;
		}
		case AMQP_BASIC_NACK_METHOD: {
			amqp_basic_nack_t *n = f.payload.method.decoded;
			st->nacked += n->multiple ? n->delivery_tag - st->confirmed : 1;
			if (n->delivery_tag > st->confirmed)
				st->confirmed = n->delivery_tag;
			break;
		}
		case AMQP_BASIC_RETURN_METHOD: {
			amqp_message_t m;
			amqp_rpc_reply_t r = amqp_read_message(c, f.channel, &m, 0);
			if (r.reply_type != AMQP_RESPONSE_NORMAL)
				die("reading a returned message");
			amqp_destroy_message(&m);
			st->returned++;
			break;
		}
		case AMQP_CHANNEL_CLOSE_METHOD: {
			amqp_channel_close_t *m = f.payload.method.decoded;
			die("channel closed by the broker: %u %.*s", m->reply_code,
			    (int)m->reply_text.len, (char *)m->reply_text.bytes);
		}
		case AMQP_CONNECTION_CLOSE_METHOD: {
			amqp_connection_close_t *m = f.payload.method.decoded;
			die("connection closed by the broker: %u %.*s", m->reply_code,
			    (int)m->reply_text.len, (char *)m->reply_text.bytes);
		}
		default:
			break;
		}
	}
}

static void
usage(void)
{
	fprintf(stderr, "usage: publisher [-u URI] [-e EXCHANGE] -k ROUTING_KEY [-n N] "
			"[-H key=value]... [-b BODY] [-B BATCH] [-t] [-m]\n");
	exit(2);
}

int
main(int argc, char **argv)
{
	const char *uri = getenv("OCCAMY_TEST_AMQP_URI");
	const char *exchange = "", *rkey = NULL, *body = "";
	unsigned long n = 1000, batch = 2000;
	bool persistent = true, mandatory = false;
	amqp_table_entry_t headers[HEADERS_MAX];
	int nheaders = 0, opt, rc;
	amqp_connection_state_t c;
	amqp_basic_properties_t props;
	struct confirm_state st = {0};
	double t0, t1;
	uint64_t seq = 0;

	while ((opt = getopt(argc, argv, "u:e:k:n:H:b:B:tmh")) != -1) {
		switch (opt) {
		case 'u': uri = optarg; break;
		case 'e': exchange = optarg; break;
		case 'k': rkey = optarg; break;
		case 'n': n = strtoul(optarg, NULL, 10); break;
		case 'b': body = optarg; break;
		case 'B': batch = strtoul(optarg, NULL, 10); break;
		case 't': persistent = false; break;
		case 'm': mandatory = true; break;
		case 'H': {
			char *eq = strchr(optarg, '=');
			if (eq == NULL || nheaders == HEADERS_MAX)
				usage();
			*eq = '\0';
			memset(&headers[nheaders], 0, sizeof(headers[nheaders]));
			headers[nheaders].key = amqp_cstring_bytes(optarg);
			headers[nheaders].value.kind = AMQP_FIELD_KIND_UTF8;
			headers[nheaders].value.value.bytes = amqp_cstring_bytes(eq + 1);
			nheaders++;
			break;
		}
		default: usage();
		}
	}
	if (rkey == NULL || optind != argc || batch == 0)
		usage();
	c = connect_open(uri, CH);
	amqp_confirm_select(c, CH);
	rpc_check(c, "confirm.select");

	memset(&props, 0, sizeof(props));
	props._flags = AMQP_BASIC_DELIVERY_MODE_FLAG;
	props.delivery_mode = persistent ? AMQP_DELIVERY_PERSISTENT : AMQP_DELIVERY_NONPERSISTENT;
	if (nheaders > 0) {
		props._flags |= AMQP_BASIC_HEADERS_FLAG;
		props.headers.num_entries = nheaders;
		props.headers.entries = headers;
	}

	t0 = now_s();
	for (unsigned long i = 0; i < n; i++) {
		rc = amqp_basic_publish(c, CH, amqp_cstring_bytes(exchange),
					amqp_cstring_bytes(rkey), mandatory, 0, &props,
					amqp_cstring_bytes(body));
		if (rc != AMQP_STATUS_OK)
			die("basic.publish: %s", amqp_error_string2(rc));
		seq++;
		/* Keep up to two batches in flight: wait for the previous one
		 * while this one is on the wire. */
		if (seq % batch == 0 && seq > batch)
			confirms_wait(c, &st, seq - batch);
	}
	confirms_wait(c, &st, seq);
	t1 = now_s();

	amqp_channel_close(c, CH, AMQP_REPLY_SUCCESS);
	amqp_connection_close(c, AMQP_REPLY_SUCCESS);
	amqp_destroy_connection(c);

	printf("{\"published\": %lu, \"elapsed_s\": %.6f, \"msg_per_s\": %.1f, "
	       "\"persistent\": %s, \"nacked\": %" PRIu64 ", \"returned\": %" PRIu64 "}\n",
	       n, t1 - t0, (t1 - t0) > 0 ? (double)n / (t1 - t0) : 0.0,
	       persistent ? "true" : "false", st.nacked, st.returned);
	if (st.nacked > 0 || st.returned > 0) {
		fprintf(stderr, "publisher: %" PRIu64 " nacked, %" PRIu64 " returned\n",
			st.nacked, st.returned);
		return 1;
	}
	return 0;
}
