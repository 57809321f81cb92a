/*
 * occamyctl - occamy for people at a terminal: submit a request and print
 * its result, ask every daemon for its slots, or watch one refresh every
 * second.  Reads the broker settings from the same occamy.ini as occamyd.
 */
#include <errno.h>
#include <getopt.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sysexits.h>
#include <time.h>
#include <unistd.h>

#include <amqp.h>
#include <amqp_ssl_socket.h>
#include <amqp_tcp_socket.h>

#include "config.h"
#include "log.h"

#ifndef OCCAMY_CONFIG_PATH
#define OCCAMY_CONFIG_PATH CONFIG_DEFAULT_PATH
#endif

#define STATUS_COMMAND_HEADER "x-occamy-command"
#define HEADERS_MAX 32

struct ctl {
	struct config cfg;
	amqp_connection_state_t conn;
	char reply_queue[256];
	char correlation[64];
	const char *headers[HEADERS_MAX][2];
	size_t nheaders;
	double timeout_s;
	/* Of the last reply: an error reply says x-occamy-status. */
	char reply_status[64];
	char reply_error[512];
};

static void
usage(FILE *f)
{
	fprintf(f,
		"usage: occamyctl [-c FILE] [-t SECONDS] [-H KEY=VALUE]... COMMAND\n"
		"  submit HANDLER [FILE|-]  publish a request, wait for its reply, print it\n"
		"  status                   every daemon's slots (replies within -t, default 1 s)\n"
		"  top                      status of all daemons, refreshed every second\n"
		"  -c FILE  configuration (default %s)\n"
		"  -t SEC   how long to wait for replies (submit default 60)\n"
		"  -H K=V   add a header to the request (e.g. -H task-id=42)\n",
		OCCAMY_CONFIG_PATH);
}

static double
now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int
rpc_ok(amqp_rpc_reply_t r, const char *what)
{
	if (r.reply_type == AMQP_RESPONSE_NORMAL)
		return 0;
	if (r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION)
		fprintf(stderr, "occamyctl: %s: %s\n", what, amqp_error_string2(r.library_error));
	else
		fprintf(stderr, "occamyctl: %s: broker refused\n", what);
	return -1;
}

static int
read_password(const char *path, char *buf, size_t len)
{
	FILE *f = fopen(path, "r");

	if (f == NULL) {
		fprintf(stderr, "occamyctl: %s: %s\n", path, strerror(errno));
		return -1;
	}
	if (fgets(buf, (int)len, f) == NULL)
		buf[0] = '\0';
	fclose(f);
	buf[strcspn(buf, "\r\n")] = '\0';
	return 0;
}

/* Connect to one URI (number idx of n in [amqp] uri): log in, open the
 * channel, declare the reply queue and consume from it.  On failure
 * c->conn is destroyed and NULL. */
static int
ctl_connect_one(struct ctl *c, const char *uri, size_t idx, size_t n)
{
	struct amqp_connection_info ci;
	amqp_socket_t *sock;
	char *url = xstrdup(uri), password[512] = "";
	amqp_queue_declare_ok_t *q;
	int rc = -1;

	if (amqp_parse_url(url, &ci) != AMQP_STATUS_OK) {
		/* config_load() has checked it; never echo it (password) */
		if (n > 1)
			fprintf(stderr, "occamyctl: cannot parse URI %zu of %zu of uri in %s\n",
				idx + 1, n, c->cfg.file);
		else
			fprintf(stderr, "occamyctl: cannot parse uri in %s\n", c->cfg.file);
		goto out;
	}
	if (ci.vhost == NULL || ci.vhost[0] == '\0')
		ci.vhost = "/"; /* "amqp://host/" parses to the empty vhost */
	if (c->cfg.password_file[0] != '\0') {
		if (read_password(c->cfg.password_file, password, sizeof(password)) != 0)
			goto out;
		ci.password = password;
	}
	c->conn = amqp_new_connection();
	if (ci.ssl) {
		sock = amqp_ssl_socket_new(c->conn);
		if (sock == NULL)
			goto out;
		if (c->cfg.tls_ca[0] && amqp_ssl_socket_set_cacert(sock, c->cfg.tls_ca) != 0) {
			fprintf(stderr, "occamyctl: cannot load CA %s\n", c->cfg.tls_ca);
			goto out;
		}
		if (c->cfg.tls_cert[0] &&
		    amqp_ssl_socket_set_key(sock, c->cfg.tls_cert, c->cfg.tls_key) != 0) {
			fprintf(stderr, "occamyctl: cannot load client certificate\n");
			goto out;
		}
		amqp_ssl_socket_set_verify_peer(sock, c->cfg.tls_verify_peer);
		amqp_ssl_socket_set_verify_hostname(sock, c->cfg.tls_verify_hostname);
	} else {
		sock = amqp_tcp_socket_new(c->conn);
	}
	if (sock == NULL || amqp_socket_open(sock, ci.host, ci.port) != AMQP_STATUS_OK) {
		fprintf(stderr, "occamyctl: cannot connect to %s:%d\n", ci.host, ci.port);
		goto out;
	}
	if (rpc_ok(amqp_login(c->conn, ci.vhost, 0, 131072, 0, AMQP_SASL_METHOD_PLAIN,
			      ci.user, ci.password), "login") != 0)
		goto out;
	amqp_channel_open(c->conn, 1);
	if (rpc_ok(amqp_get_rpc_reply(c->conn), "channel") != 0)
		goto out;
	q = amqp_queue_declare(c->conn, 1, amqp_empty_bytes, 0, 0, 1, 1, amqp_empty_table);
	if (rpc_ok(amqp_get_rpc_reply(c->conn), "reply queue") != 0)
		goto out;
	snprintf(c->reply_queue, sizeof(c->reply_queue), "%.*s", (int)q->queue.len,
		 (const char *)q->queue.bytes);
	amqp_basic_consume(c->conn, 1, amqp_cstring_bytes(c->reply_queue), amqp_empty_bytes,
			   0, 1, 1, amqp_empty_table);
	if (rpc_ok(amqp_get_rpc_reply(c->conn), "consume") != 0)
		goto out;
	snprintf(c->correlation, sizeof(c->correlation), "ctl-%d-%ld", (int)getpid(),
		 (long)time(NULL));
	rc = 0;
out:
	if (rc != 0 && c->conn != NULL) {
		amqp_destroy_connection(c->conn);
		c->conn = NULL;
	}
	explicit_bzero(password, sizeof(password));
	explicit_bzero(url, strlen(url));
	free(url);
	return rc;
}

/* [amqp] uri may list several URIs (one per node of a cluster): try them
 * in order until one connects. */
static int
ctl_connect(struct ctl *c)
{
	size_t n, i;
	char **uris = config_uri_split(c->cfg.uri, &n);
	int rc = -1;

	for (i = 0; i < n && rc != 0; i++) {
		rc = ctl_connect_one(c, uris[i], i, n);
		if (rc != 0 && i + 1 < n)
			fprintf(stderr, "occamyctl: trying URI %zu of %zu\n", i + 2, n);
	}
	if (rc != 0 && n > 1)
		fprintf(stderr, "occamyctl: none of the %zu URIs in %s connected\n", n,
			c->cfg.file);
	config_uri_split_free(uris);
	return rc;
}

static int
publish(struct ctl *c, const char *exchange, const char *routing_key,
	amqp_table_entry_t *extra, size_t nextra, const void *body, size_t len)
{
	amqp_table_entry_t entries[HEADERS_MAX + 4];
	amqp_basic_properties_t p = {0};
	size_t n = 0, i;

	for (i = 0; i < nextra; i++)
		entries[n++] = extra[i];
	for (i = 0; i < c->nheaders && n < HEADERS_MAX + 4; i++) {
		entries[n].key = amqp_cstring_bytes(c->headers[i][0]);
		entries[n].value.kind = AMQP_FIELD_KIND_UTF8;
		entries[n].value.value.bytes = amqp_cstring_bytes(c->headers[i][1]);
		n++;
	}
	p._flags = AMQP_BASIC_HEADERS_FLAG | AMQP_BASIC_REPLY_TO_FLAG |
		   AMQP_BASIC_CORRELATION_ID_FLAG | AMQP_BASIC_DELIVERY_MODE_FLAG;
	p.headers.num_entries = (int)n;
	p.headers.entries = entries;
	p.reply_to = amqp_cstring_bytes(c->reply_queue);
	p.correlation_id = amqp_cstring_bytes(c->correlation);
	p.delivery_mode = 2;
	if (amqp_basic_publish(c->conn, 1, amqp_cstring_bytes(exchange),
			       amqp_cstring_bytes(routing_key), 0, 0, &p,
			       (amqp_bytes_t){.len = len, .bytes = (void *)body}) != AMQP_STATUS_OK) {
		fprintf(stderr, "occamyctl: publish failed\n");
		return -1;
	}
	return 0;
}

/* Keep what an error reply says (x-occamy-status, x-occamy-error). */
static void
reply_headers(struct ctl *c, const amqp_basic_properties_t *p)
{
	c->reply_status[0] = c->reply_error[0] = '\0';
	if (!(p->_flags & AMQP_BASIC_HEADERS_FLAG))
		return;
	for (int i = 0; i < p->headers.num_entries; i++) {
		const amqp_table_entry_t *e = &p->headers.entries[i];
		char *dst;
		size_t cap;

		if (e->value.kind != AMQP_FIELD_KIND_UTF8)
			continue;
		if (e->key.len == 15 && memcmp(e->key.bytes, "x-occamy-status", 15) == 0) {
			dst = c->reply_status;
			cap = sizeof(c->reply_status);
		} else if (e->key.len == 14 && memcmp(e->key.bytes, "x-occamy-error", 14) == 0) {
			dst = c->reply_error;
			cap = sizeof(c->reply_error);
		} else {
			continue;
		}
		snprintf(dst, cap, "%.*s", (int)e->value.value.bytes.len,
			 (const char *)e->value.value.bytes.bytes);
	}
}

/* sysexits(3) status for an error reply's x-occamy-status (occamyctl(1)). */
static int
error_exit_status(const char *status)
{
	if (strcmp(status, "invalid_body") == 0 || strcmp(status, "invalid_headers") == 0 ||
	    strcmp(status, "invalid_task") == 0 || strcmp(status, "rejected") == 0)
		return EX_DATAERR;
	if (strcmp(status, "unknown_handler") == 0)
		return EX_UNAVAILABLE;
	return EX_SOFTWARE; /* internal_error, and any kind added later */
}

/* Wait for one reply until deadline; 1 got one (body in *out), 0 timeout,
 * -1 error. */
static int
next_reply(struct ctl *c, double deadline, char **out, size_t *len)
{
	for (;;) {
		double left = deadline - now_s();
		struct timeval tv;
		amqp_envelope_t env;
		amqp_rpc_reply_t r;

		if (left <= 0)
			return 0;
		tv.tv_sec = (time_t)left;
		tv.tv_usec = (suseconds_t)((left - (double)tv.tv_sec) * 1e6);
		amqp_maybe_release_buffers(c->conn);
		r = amqp_consume_message(c->conn, &env, &tv, 0);
		if (r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION &&
		    r.library_error == AMQP_STATUS_TIMEOUT)
			return 0;
		if (r.reply_type != AMQP_RESPONSE_NORMAL)
			return rpc_ok(r, "waiting for reply");
		if (env.message.properties._flags & AMQP_BASIC_CORRELATION_ID_FLAG &&
		    env.message.properties.correlation_id.len == strlen(c->correlation) &&
		    memcmp(env.message.properties.correlation_id.bytes, c->correlation,
			   strlen(c->correlation)) == 0) {
			reply_headers(c, &env.message.properties);
			*len = env.message.body.len;
			*out = xmalloc(*len + 1);
			memcpy(*out, env.message.body.bytes, *len);
			(*out)[*len] = '\0';
			amqp_destroy_envelope(&env);
			return 1;
		}
		amqp_destroy_envelope(&env);
	}
}

static char *
read_all(FILE *f, size_t *len)
{
	size_t cap = 65536, n = 0, r;
	char *buf = xmalloc(cap);

	while ((r = fread(buf + n, 1, cap - n, f)) > 0) {
		n += r;
		if (n == cap)
			buf = xrealloc(buf, cap *= 2);
	}
	*len = n;
	return buf;
}

static int
cmd_submit(struct ctl *c, int argc, char **argv)
{
	amqp_table_entry_t h;
	char *body, *reply = NULL;
	size_t len, rlen;
	FILE *f = stdin;
	int got;

	if (argc < 2 || argc > 3) {
		usage(stderr);
		return EX_USAGE;
	}
	if (argc == 3 && strcmp(argv[2], "-") != 0 && (f = fopen(argv[2], "rb")) == NULL) {
		fprintf(stderr, "occamyctl: %s: %s\n", argv[2], strerror(errno));
		return EX_NOINPUT;
	}
	body = read_all(f, &len);
	if (f != stdin)
		fclose(f);
	if (ctl_connect(c) != 0) {
		free(body);
		return EX_UNAVAILABLE;
	}
	h.key = amqp_cstring_bytes(c->cfg.header_handler);
	h.value.kind = AMQP_FIELD_KIND_UTF8;
	h.value.value.bytes = amqp_cstring_bytes(argv[1]);
	if (publish(c, c->cfg.request_exchange, c->cfg.request_queue, &h, 1, body, len) != 0) {
		free(body);
		return EX_UNAVAILABLE;
	}
	free(body);
	got = next_reply(c, now_s() + c->timeout_s, &reply, &rlen);
	if (got <= 0) {
		if (got == 0)
			fprintf(stderr, "occamyctl: no reply within %.0f s\n", c->timeout_s);
		return EX_TEMPFAIL;
	}
	fwrite(reply, 1, rlen, stdout);
	if (rlen == 0 || reply[rlen - 1] != '\n')
		putchar('\n');
	free(reply);
	if (c->reply_status[0] != '\0') {
		fprintf(stderr, "occamyctl: request failed: %s: %s\n", c->reply_status,
			c->reply_error);
		return error_exit_status(c->reply_status);
	}
	return 0;
}

/* Counters of one daemon at the previous refresh of `top`, for rates. */
struct seen {
	char name[128];
	double t;
	unsigned long long requests, done, preemptions;
};

#define SEEN_MAX 64
static struct seen seen[SEEN_MAX]; /* main thread only: `top` state */
static unsigned nseen;

/* For `top`: a bar of coloured cells, one per slot, and the rates since the
 * last refresh, above the daemon's own text. */
static void
print_top_summary(const char *reply)
{
	char name[128];
	unsigned long long req, done, pre;
	const char *line;
	double now = now_s();
	unsigned i;

	if (sscanf(reply, "daemon %127s slots %*u protected %*u internal %*u external %*u "
		   "empty %*u stuck %*u draining %*u requests %llu done %llu preemptions %llu",
		   name, &req, &done, &pre) != 4)
		return;
	printf("\033[1m%s\033[0m  ", name);
	for (line = strstr(reply, "\nslot "); line != NULL; line = strstr(line + 1, "\nslot ")) {
		char status[16] = "";

		if (sscanf(line, "\nslot %*u %15s", status) != 1)
			continue;
		/* protected red, internal green, external blue, empty grey */
		printf("%s", strcmp(status, "protected") == 0 ? "\033[41m P \033[0m" :
			     strcmp(status, "internal") == 0 ? "\033[42m I \033[0m" :
			     strcmp(status, "external") == 0 ? "\033[44m E \033[0m" :
							      "\033[100m . \033[0m");
	}
	for (i = 0; i < nseen && strcmp(seen[i].name, name) != 0; i++)
		;
	if (i < nseen && now > seen[i].t)
		printf("  %.1f req/s, %.1f done/s, %.1f preemptions/s",
		       (double)(req - seen[i].requests) / (now - seen[i].t),
		       (double)(done - seen[i].done) / (now - seen[i].t),
		       (double)(pre - seen[i].preemptions) / (now - seen[i].t));
	putchar('\n');
	if (i == nseen) {
		if (nseen == SEEN_MAX)
			return;
		nseen++;
	}
	snprintf(seen[i].name, sizeof(seen[i].name), "%s", name);
	seen[i].t = now;
	seen[i].requests = req;
	seen[i].done = done;
	seen[i].preemptions = pre;
}

/* Ask every daemon; print their replies (plain text from occamyd). */
static int
ask_status(struct ctl *c, double wait_s, bool clear)
{
	amqp_table_entry_t h;
	char *reply;
	size_t rlen;
	double deadline = now_s() + wait_s;
	int n = 0, got;

	h.key = amqp_cstring_bytes(STATUS_COMMAND_HEADER);
	h.value.kind = AMQP_FIELD_KIND_UTF8;
	h.value.value.bytes = amqp_cstring_bytes("status");
	if (publish(c, c->cfg.control_exchange, "", &h, 1, "", 0) != 0)
		return -1;
	if (clear)
		printf("\033[H\033[2J");
	while ((got = next_reply(c, deadline, &reply, &rlen)) == 1) {
		if (clear)
			print_top_summary(reply);
		fwrite(reply, 1, rlen, stdout);
		putchar('\n');
		free(reply);
		n++;
	}
	if (got < 0)
		return -1;
	printf("%d daemon%s answered\n", n, n == 1 ? "" : "s");
	fflush(stdout);
	return n;
}

int
main(int argc, char **argv)
{
	struct ctl c = {.timeout_s = -1};
	const char *path = OCCAMY_CONFIG_PATH;
	char errs[4096] = "";
	int ch, rc;

	log_init(-1);
	while ((ch = getopt(argc, argv, "+c:ht:H:")) != -1) {
		switch (ch) {
		case 'c': path = optarg; break;
		case 't': c.timeout_s = atof(optarg); break;
		case 'H': {
			char *eq = strchr(optarg, '=');
			if (eq == NULL || c.nheaders == HEADERS_MAX) {
				usage(stderr);
				return EX_USAGE;
			}
			*eq = '\0';
			c.headers[c.nheaders][0] = optarg;
			c.headers[c.nheaders][1] = eq + 1;
			c.nheaders++;
			break;
		}
		case 'h': usage(stdout); return 0;
		default: usage(stderr); return EX_USAGE;
		}
	}
	argc -= optind;
	argv += optind;
	if (argc < 1) {
		usage(stderr);
		return EX_USAGE;
	}
	if (config_load(path, &c.cfg, errs, sizeof(errs)) != 0) {
		fprintf(stderr, "%s\n", errs);
		return EX_CONFIG;
	}
	if (strcmp(argv[0], "submit") == 0) {
		if (c.timeout_s < 0)
			c.timeout_s = 60;
		rc = cmd_submit(&c, argc, argv);
	} else if (strcmp(argv[0], "status") == 0 || strcmp(argv[0], "top") == 0) {
		bool top = argv[0][0] == 't';
		if (c.timeout_s < 0)
			c.timeout_s = top ? 0.8 : 1;
		if (ctl_connect(&c) != 0) {
			rc = EX_UNAVAILABLE;
		} else {
			do {
				double t0 = now_s();
				rc = ask_status(&c, c.timeout_s, top) < 0 ? EX_UNAVAILABLE : 0;
				if (top && rc == 0 && now_s() - t0 < 1)
					usleep((useconds_t)((1 - (now_s() - t0)) * 1e6));
			} while (top && rc == 0);
		}
	} else {
		usage(stderr);
		rc = EX_USAGE;
	}
	if (c.conn != NULL) {
		amqp_connection_close(c.conn, AMQP_REPLY_SUCCESS);
		amqp_destroy_connection(c.conn);
	}
	config_free(&c.cfg);
	return rc;
}
