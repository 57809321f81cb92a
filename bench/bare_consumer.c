/*
 * bare_consumer.c - the baseline of the throughput benchmarks: the least a
 * rabbitmq-c consumer can do.  It consumes N messages from a queue with
 * manual acks at a given prefetch and acks each delivery (basic.ack, not
 * multiple) as soon as it arrives, on the one thread that owns the
 * connection.  Nothing is parsed, nothing is handed to another thread.
 *
 *   bare_consumer [-u URI] -q QUEUE [-p PREFETCH] [-n N] [-T IDLE_TIMEOUT_S]
 *
 *   -u URI      broker (default $OCCAMY_TEST_AMQP_URI, else amqp://guest:guest@127.0.0.1/)
 *   -q QUEUE    queue to consume (must exist)
 *   -p PREFETCH basic.qos prefetch count (default 1)
 *   -n N        messages to consume, then exit (default 1000)
 *   -T S        give up when no delivery came for S seconds (default 30)
 *
 * Prints one JSON line:
 *   {"consumed": N, "prefetch": P, "elapsed_s": S, "msg_per_s": R,
 *    "since_consume_ok_s": S0}
 * elapsed_s runs from the first delivery to the ack of the last one, and
 * msg_per_s = (N - 1) / elapsed_s: the drain rate, start-up excluded.
 * Exit status 1 if fewer than N arrived.  Standalone: rabbitmq-c only.
 */
#include <getopt.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

#include <amqp.h>
#include <amqp_tcp_socket.h>

#include "amqp_tool.h"

#define CH 1

static void
usage(void)
{
	fprintf(stderr, "usage: bare_consumer [-u URI] -q QUEUE [-p PREFETCH] [-n N] "
			"[-T IDLE_TIMEOUT_S]\n");
	exit(2);
}

int
main(int argc, char **argv)
{
	const char *uri = getenv("OCCAMY_TEST_AMQP_URI"), *queue = NULL;
	unsigned long prefetch = 1, n = 1000, got = 0;
	double idle_s = 30, t_ok, t_first = 0, t_last = 0, t_idle;
	amqp_connection_state_t c;
	int opt, rc;

	while ((opt = getopt(argc, argv, "u:q:p:n:T:h")) != -1) {
		switch (opt) {
		case 'u': uri = optarg; break;
		case 'q': queue = optarg; break;
		case 'p': prefetch = strtoul(optarg, NULL, 10); break;
		case 'n': n = strtoul(optarg, NULL, 10); break;
		case 'T': idle_s = strtod(optarg, NULL); break;
		default: usage();
		}
	}
	if (queue == NULL || optind != argc || prefetch > 65535 || n == 0)
		usage();
	c = connect_open(uri, CH);
	amqp_basic_qos(c, CH, 0, (uint16_t)prefetch, 0);
	rpc_check(c, "basic.qos");
	amqp_basic_consume(c, CH, amqp_cstring_bytes(queue), amqp_empty_bytes, 0, 0, 0,
			   amqp_empty_table);
	rpc_check(c, "basic.consume");
	t_ok = now_s();
	t_idle = t_ok;

	while (got < n) {
		struct timeval tv = {0, 200000};
		amqp_envelope_t env;
		amqp_rpc_reply_t r;

		amqp_maybe_release_buffers(c);
		r = amqp_consume_message(c, &env, &tv, 0);
		if (r.reply_type == AMQP_RESPONSE_NORMAL) {
			rc = amqp_basic_ack(c, env.channel, env.delivery_tag, 0);
			if (rc != AMQP_STATUS_OK)
				die("basic.ack: %s", amqp_error_string2(rc));
			amqp_destroy_envelope(&env);
			t_last = now_s();
			if (got++ == 0)
				t_first = t_last;
			t_idle = t_last;
			continue;
		}
		if (r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION &&
		    r.library_error == AMQP_STATUS_TIMEOUT) {
			if (now_s() - t_idle > idle_s)
				break;
			continue;
		}
		if (r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION &&
		    r.library_error == AMQP_STATUS_UNEXPECTED_STATE) {
			amqp_frame_t f;
			if (amqp_simple_wait_frame(c, &f) != AMQP_STATUS_OK)
				die("reading a frame");
			if (f.frame_type == AMQP_FRAME_METHOD &&
			    (f.payload.method.id == AMQP_CHANNEL_CLOSE_METHOD ||
			     f.payload.method.id == AMQP_CONNECTION_CLOSE_METHOD ||
			     f.payload.method.id == AMQP_BASIC_CANCEL_METHOD))
				die("the broker sent %s", amqp_method_name(f.payload.method.id));
			continue;
		}
		die("consuming: %s", r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION ?
					     amqp_error_string2(r.library_error) : "broker error");
	}

	amqp_channel_close(c, CH, AMQP_REPLY_SUCCESS);
	amqp_connection_close(c, AMQP_REPLY_SUCCESS);
	amqp_destroy_connection(c);

	printf("{\"consumed\": %lu, \"prefetch\": %lu, \"elapsed_s\": %.6f, "
	       "\"msg_per_s\": %.1f, \"since_consume_ok_s\": %.6f}\n",
	       got, prefetch, t_last - t_first,
	       got > 1 && t_last > t_first ? (double)(got - 1) / (t_last - t_first) : 0.0,
	       t_last - t_ok);
	if (got < n) {
		fprintf(stderr, "bare_consumer: %lu of %lu messages within the idle timeout\n",
			got, n);
		return 1;
	}
	return 0;
}
