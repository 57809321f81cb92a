/*
 * amqp_tool.h - what the benchmark's standalone rabbitmq-c programs
 * (bare_consumer.c, publisher.c) share: a monotonic clock in seconds, die(),
 * and rpc_check() for the reply of a synchronous AMQP method.  Header-only,
 * rabbitmq-c only: the baselines stay free of occamy's code.
 */
#ifndef OCCAMY_BENCH_AMQP_TOOL_H
#define OCCAMY_BENCH_AMQP_TOOL_H

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <amqp.h>
#include <amqp_tcp_socket.h>

static inline double
now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* "PROGRAM: message" on stderr, exit status 1. */
static inline void __attribute__((noreturn, format(printf, 1, 2)))
die(const char *fmt, ...)
{
	va_list ap;

	fprintf(stderr, "%s: ", program_invocation_short_name);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	exit(1);
}

/* Dies unless the last synchronous method on c succeeded. */
static inline void
rpc_check(amqp_connection_state_t c, const char *what)
{
	amqp_rpc_reply_t r = amqp_get_rpc_reply(c);

	switch (r.reply_type) {
	case AMQP_RESPONSE_NORMAL:
		return;
	case AMQP_RESPONSE_LIBRARY_EXCEPTION:
		die("%s: %s", what, amqp_error_string2(r.library_error));
	case AMQP_RESPONSE_SERVER_EXCEPTION:
		if (r.reply.id == AMQP_CHANNEL_CLOSE_METHOD) {
			amqp_channel_close_t *m = r.reply.decoded;
			die("%s: channel closed: %u %.*s", what, m->reply_code,
			    (int)m->reply_text.len, (char *)m->reply_text.bytes);
		}
		if (r.reply.id == AMQP_CONNECTION_CLOSE_METHOD) {
			amqp_connection_close_t *m = r.reply.decoded;
			die("%s: connection closed: %u %.*s", what, m->reply_code,
			    (int)m->reply_text.len, (char *)m->reply_text.bytes);
		}
		die("%s: unexpected method %s", what, amqp_method_name(r.reply.id));
	default:
		die("%s: no reply", what);
	}
}

/* A logged-in connection to uri (NULL or empty: the local guest) with
 * channel ch open; dies on any failure. */
static inline amqp_connection_state_t
connect_open(const char *uri, amqp_channel_t ch)
{
	struct amqp_connection_info ci;
	amqp_connection_state_t c;
	amqp_socket_t *sock;
	amqp_rpc_reply_t r;
	char *uri_buf;
	int rc;

	if (uri == NULL || uri[0] == '\0')
		uri = "amqp://guest:guest@127.0.0.1/";
	uri_buf = strdup(uri); /* ci points into it until the login */
	amqp_default_connection_info(&ci);
	if (uri_buf == NULL || amqp_parse_url(uri_buf, &ci) != AMQP_STATUS_OK)
		die("cannot parse URI %s", uri);
	if (ci.vhost == NULL || ci.vhost[0] == '\0')
		ci.vhost = "/";
	c = amqp_new_connection();
	if ((sock = amqp_tcp_socket_new(c)) == NULL)
		die("amqp_tcp_socket_new failed");
	if ((rc = amqp_socket_open(sock, ci.host, ci.port)) != AMQP_STATUS_OK)
		die("connecting to %s:%d: %s", ci.host, ci.port, amqp_error_string2(rc));
	r = amqp_login(c, ci.vhost, 0, AMQP_DEFAULT_FRAME_SIZE, 0, AMQP_SASL_METHOD_PLAIN,
		       ci.user, ci.password);
	if (r.reply_type != AMQP_RESPONSE_NORMAL)
		die("login failed");
	free(uri_buf);
	amqp_channel_open(c, ch);
	rpc_check(c, "channel.open");
	return c;
}

#endif /* OCCAMY_BENCH_AMQP_TOOL_H */
