/*
 * config_keys.c - the [server], [amqp] and [metrics] keyword table: each
 * key's type, range and default, parsing one value into struct config, the
 * defaults, and config_free().  Pure; run by whichever thread loads a
 * config (the daemon's main thread, occamyctl).
 */
#include <ctype.h>
#include <errno.h>
#include <stdbool.h>
#include <stddef.h>
#include <strings.h>
#include <unistd.h>

#include "config_keys.h"

#ifndef OCCAMY_PLUGIN_DIR
#define OCCAMY_PLUGIN_DIR "/usr/local/lib/occamy/plugins"
#endif

enum key_type {
	K_UINT,
	K_BOOL,
	K_STR,
	K_ENUM,
	K_URI,    /* amqp:// or amqps:// */
	K_LISTEN, /* "" or HOST:PORT */
};

struct keyword {
	enum section sec;
	const char *name;
	enum key_type type;
	size_t off;
	unsigned long min, max;       /* K_UINT */
	const char *def;              /* parsed like a value; NULL: see defaults */
	const char *const *choices;   /* K_ENUM */
	bool nonempty;                /* K_STR */
};

static const char *const priorities[] = {"idle", "normal", NULL};
static const char *const queue_types[] = {"classic", "quorum", NULL};

#define F(field) offsetof(struct config, field)
#define UINT(s, n, lo, hi, d) {s, #n, K_UINT, F(n), lo, hi, d, NULL, false}
#define BOOL(s, n, d) {s, #n, K_BOOL, F(n), 0, 0, d, NULL, false}
#define STR(s, n, d, ne) {s, #n, K_STR, F(n), 0, 0, d, NULL, ne}
#define ENUM(s, n, d, c) {s, #n, K_ENUM, F(n), 0, 0, d, c, false}

static const struct keyword keywords[] = {
	/* slots has no static default (online CPUs) */
	UINT(SEC_SERVER, slots, 1, 1024, NULL),
	UINT(SEC_SERVER, expansion_period_ms, 1, 3600000, "1000"),
	/* and less than slots: config_check() */
	UINT(SEC_SERVER, expansion_slot_buffer, 0, 1023, "0"),
	UINT(SEC_SERVER, kill_timeout_ms, 1, 600000, "1000"),
	UINT(SEC_SERVER, shutdown_grace_s, 0, 86400, "30"),
	STR(SEC_SERVER, header_task_id, "task-id", true),
	STR(SEC_SERVER, header_handler, "handler", true),
	STR(SEC_SERVER, default_handler, "", false),
	UINT(SEC_SERVER, external_queue_max, 0, 1000000, "1024"),
	UINT(SEC_SERVER, external_ttl_s, 1, 86400, "60"),
	STR(SEC_SERVER, plugin_dir, OCCAMY_PLUGIN_DIR, true),
	ENUM(SEC_SERVER, helper_priority, "idle", priorities),
	STR(SEC_SERVER, state_dir, "/var/lib/occamy", true),
	UINT(SEC_SERVER, crash_limit, 0, 100, "2"),

	{SEC_AMQP, "uri", K_URI, F(uri), 0, 0, "amqp://guest@127.0.0.1:5672/", NULL, false},
	STR(SEC_AMQP, password_file, "", false),
	UINT(SEC_AMQP, heartbeat_s, 0, 3600, "30"),
	STR(SEC_AMQP, tls_ca, "", false),
	STR(SEC_AMQP, tls_cert, "", false),
	STR(SEC_AMQP, tls_key, "", false),
	BOOL(SEC_AMQP, tls_verify_peer, "yes"),
	BOOL(SEC_AMQP, tls_verify_hostname, "yes"),
	STR(SEC_AMQP, request_queue, "occamy.requests", true),
	STR(SEC_AMQP, request_exchange, "occamy.requests", true),
	STR(SEC_AMQP, control_exchange, "occamy.control", true),
	STR(SEC_AMQP, dead_letter_exchange, "occamy.dead", true),
	STR(SEC_AMQP, dead_letter_queue, "occamy.dead", true),
	ENUM(SEC_AMQP, queue_type, "classic", queue_types),
	UINT(SEC_AMQP, prefetch, 0, 65535, "0"),
	UINT(SEC_AMQP, delivery_limit, 0, 1000, "5"),
	UINT(SEC_AMQP, retry_delay_ms, 0, 3600000, "1000"),
	/* and at least retry_delay_ms: config_check() */
	UINT(SEC_AMQP, retry_delay_max_ms, 1, 86400000, "60000"),

	/* [metrics] keys drop the metrics_ prefix of their fields */
	{SEC_METRICS, "listen", K_LISTEN, F(metrics_listen), 0, 0, "", NULL, false},
	{SEC_METRICS, "window", K_UINT, F(metrics_window), 1, 1000, "10", NULL, false},
	{SEC_METRICS, "sample_s", K_UINT, F(metrics_sample_s), 1, 3600, "10", NULL, false},
};

#undef F
#undef UINT
#undef BOOL
#undef STR
#undef ENUM

const struct keyword *
keyword_find(enum section sec, const char *name)
{
	size_t i;

	for (i = 0; i < nitems(keywords); i++)
		if (keywords[i].sec == sec && strcmp(keywords[i].name, name) == 0)
			return &keywords[i];
	return NULL;
}

size_t
keyword_index(const struct keyword *k)
{
	return (size_t)(k - keywords);
}

size_t
keyword_count(void)
{
	return nitems(keywords);
}

static int
parse_uint(const char *v, unsigned long min, unsigned long max,
	   unsigned long *out, char *why, size_t whylen)
{
	unsigned long n;
	char *end;

	/* strtoul would accept blanks, a sign, and wrap "-1" around */
	if (v[0] == '-') {
		snprintf(why, whylen, "'%s' is negative; expected %lu..%lu",
			 v, min, max);
		return -1;
	}
	if (!isdigit((unsigned char)v[0])) {
		snprintf(why, whylen, "'%s' is not a decimal integer", v);
		return -1;
	}
	errno = 0;
	n = strtoul(v, &end, 10);
	if (*end != '\0') {
		snprintf(why, whylen, "'%s' is not a decimal integer", v);
		return -1;
	}
	if (errno == ERANGE || n < min || n > max) {
		snprintf(why, whylen, "%s is out of range %lu..%lu", v, min,
			 max);
		return -1;
	}
	*out = n;
	return 0;
}

static int
parse_bool(const char *v, bool *out)
{
	static const char *const yes[] = {"yes", "true", "on", "1"};
	static const char *const no[] = {"no", "false", "off", "0"};
	size_t i;

	for (i = 0; i < nitems(yes); i++) {
		if (strcasecmp(v, yes[i]) == 0) {
			*out = true;
			return 0;
		}
		if (strcasecmp(v, no[i]) == 0) {
			*out = false;
			return 0;
		}
	}
	return -1;
}

/* HOST:PORT, HOST non-empty ([...] for IPv6), PORT 1..65535. */
static int
listen_valid(const char *v)
{
	const char *colon = strrchr(v, ':');
	size_t hostlen, i;
	unsigned long port;
	char why[8];

	if (colon == NULL || colon == v)
		return 0;
	for (i = 0; v[i] != '\0'; i++)
		if (isspace((unsigned char)v[i]))
			return 0;
	hostlen = (size_t)(colon - v);
	if (v[0] == '[') {
		if (hostlen < 3 || colon[-1] != ']')
			return 0;
	} else if (memchr(v, ':', hostlen) != NULL)
		return 0; /* bare IPv6: ambiguous */
	if (strlen(colon + 1) > 5)
		return 0;
	return parse_uint(colon + 1, 1, 65535, &port, why, sizeof(why)) == 0;
}

int
keyword_set(const struct keyword *k, struct config *c, const char *v,
	    char *why, size_t whylen)
{
	void *field = (char *)c + k->off;
	unsigned long n;
	size_t i;
	bool b;

	switch (k->type) {
	case K_UINT:
		if (parse_uint(v, k->min, k->max, &n, why, whylen) == -1)
			return -1;
		*(unsigned *)field = (unsigned)n;
		return 0;
	case K_BOOL:
		if (parse_bool(v, &b) == -1) {
			snprintf(why, whylen,
				 "'%s' is not a boolean (yes/no, true/false, "
				 "on/off, 1/0)", v);
			return -1;
		}
		*(bool *)field = b;
		return 0;
	case K_STR:
		if (k->nonempty && *v == '\0') {
			snprintf(why, whylen, "must not be empty");
			return -1;
		}
		break;
	case K_ENUM:
		for (i = 0; k->choices[i] != NULL; i++)
			if (strcmp(v, k->choices[i]) == 0)
				break;
		if (k->choices[i] == NULL) {
			snprintf(why, whylen, "'%s' is not one of: %s, %s", v,
				 k->choices[0], k->choices[1]);
			return -1;
		}
		break;
	case K_URI:
		/* Never echoes the value: it may hold the password. */
		if (config_uri_check(v, why, whylen) == -1)
			return -1;
		break;
	case K_LISTEN:
		if (*v != '\0' && !listen_valid(v)) {
			snprintf(why, whylen,
				 "'%s' is not HOST:PORT (port 1..65535), "
				 "or empty for off", v);
			return -1;
		}
		break;
	}
	config_set_string(field, v);
	return 0;
}

void
config_defaults(struct config *c)
{
	char why[256];
	long ncpu;
	size_t i;

	for (i = 0; i < nitems(keywords); i++) {
		if (keywords[i].def == NULL)
			continue;
		if (keyword_set(&keywords[i], c, keywords[i].def, why,
				sizeof(why)) == -1) {
			fprintf(stderr, "occamyd: config: default of %s: %s\n",
				keywords[i].name, why);
			abort();
		}
	}
	ncpu = sysconf(_SC_NPROCESSORS_ONLN);
	if (ncpu < 1)
		ncpu = 1;
	if (ncpu > 1024)
		ncpu = 1024;
	c->slots = (unsigned)ncpu;
}

void
plugin_options_free(struct plugin_option *o, size_t n)
{
	size_t i;

	for (i = 0; i < n; i++) {
		free(o[i].key);
		free(o[i].value);
	}
	free(o);
}

void
config_free(struct config *c)
{
	struct plugin_config *pc;
	size_t i;

	if (c == NULL)
		return;
	for (i = 0; i < nitems(keywords); i++)
		if (keywords[i].type != K_UINT && keywords[i].type != K_BOOL)
			free(*(char **)((char *)c + keywords[i].off));
	for (i = 0; i < c->nplugins; i++) {
		pc = &c->plugins[i];
		plugin_options_free(pc->options, pc->noptions);
		free(pc->name);
		free(pc->path);
	}
	free(c->plugins);
	free(c->file);
	memset(c, 0, sizeof(*c));
}
