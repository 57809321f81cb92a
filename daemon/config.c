/*
 * config.c - owns occamy.ini: the keyword table, the defaults, and turning
 * inih's callbacks into a struct config or a list of "FILE:LINE:" errors.
 */
#include <ctype.h>
#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include <ini.h>

#include "config.h"

#ifndef OCCAMY_PLUGIN_DIR
#define OCCAMY_PLUGIN_DIR "/usr/local/lib/occamy/plugins"
#endif

#define nitems(a) (sizeof(a) / sizeof((a)[0]))

enum section {
	SEC_NONE,    /* before the first header */
	SEC_SERVER,
	SEC_AMQP,
	SEC_METRICS,
	SEC_PLUGIN,
	SEC_IGNORED, /* a bad header: already reported, skip its keys */
};

static const char *const section_names[] = {
	[SEC_SERVER] = "server",
	[SEC_AMQP] = "amqp",
	[SEC_METRICS] = "metrics",
};

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

/* What the reader made of the line inih is about to process. */
enum line_kind {
	LINE_BLANK,        /* blank, comment, or replaced (too long) */
	LINE_HEADER,
	LINE_KEY,
	LINE_CONTINUATION, /* inih will hand it over as more of the last key */
	LINE_BAD,          /* inih will reject it without calling us */
};

struct error {
	int line; /* 0: about the whole file */
	size_t seq;
	char *msg;
};

struct parse {
	struct config *c;
	FILE *fp;
	char *buf;
	size_t bufsz;
	int read_errno;

	int lineno;          /* of the line inih is processing */
	enum line_kind kind;
	int after_key;       /* inih's prev_name: a key since the last header */

	enum section sec;
	char *secname;       /* as written between the brackets */
	size_t plugin;       /* index into c->plugins when sec == SEC_PLUGIN */
	int *path_lines;     /* per plugin: line of its path key, 0 if none */
	int section_lines[nitems(section_names)];
	int key_lines[nitems(keywords)];

	struct error *errs;
	size_t nerrs;
};

static _Noreturn void
out_of_memory(void)
{
	fputs("occamyd: config: out of memory\n", stderr);
	abort();
}

static void *
xreallocarray(void *p, size_t n, size_t size)
{
	if (size != 0 && n > SIZE_MAX / size)
		out_of_memory();
	p = realloc(p, n * size);
	if (p == NULL && n * size != 0)
		out_of_memory();
	return p;
}

static char *
xstrdup(const char *s)
{
	char *d = strdup(s);

	if (d == NULL)
		out_of_memory();
	return d;
}

static void conf_error(struct parse *, int, const char *, ...)
    __attribute__((format(printf, 3, 4)));

static void
conf_error(struct parse *p, int line, const char *fmt, ...)
{
	struct error *e;
	va_list ap;
	char *reason;

	va_start(ap, fmt);
	if (vasprintf(&reason, fmt, ap) == -1)
		out_of_memory();
	va_end(ap);

	p->errs = xreallocarray(p->errs, p->nerrs + 1, sizeof(*p->errs));
	e = &p->errs[p->nerrs];
	e->line = line;
	e->seq = p->nerrs++;
	if (line > 0 &&
	    asprintf(&e->msg, "%s:%d: %s", p->c->file, line, reason) == -1)
		out_of_memory();
	if (line <= 0 && asprintf(&e->msg, "%s: %s", p->c->file, reason) == -1)
		out_of_memory();
	free(reason);
}

static void key_error(struct parse *, int, const char *, const char *,
		      const char *, ...) __attribute__((format(printf, 5, 6)));

/* "FILE:LINE: [section] key 'K': reason" */
static void
key_error(struct parse *p, int line, const char *sec, const char *key,
	  const char *fmt, ...)
{
	va_list ap;
	char *reason;

	va_start(ap, fmt);
	if (vasprintf(&reason, fmt, ap) == -1)
		out_of_memory();
	va_end(ap);
	conf_error(p, line, "[%s] key '%s': %s", sec, key, reason);
	free(reason);
}

static const struct keyword *
keyword_find(enum section sec, const char *name)
{
	size_t i;

	for (i = 0; i < nitems(keywords); i++)
		if (keywords[i].sec == sec && strcmp(keywords[i].name, name) == 0)
			return &keywords[i];
	return NULL;
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

static void
set_string(char **field, const char *v)
{
	free(*field);
	*field = xstrdup(v);
}

/* Parse v into the field of k.  Returns 0, or -1 with a reason in why. */
static int
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
	set_string(field, v);
	return 0;
}

static void
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

static int
plugin_name_valid(const char *s)
{
	if (*s == '\0')
		return 0;
	for (; *s != '\0'; s++)
		if (!isalnum((unsigned char)*s) && *s != '_' && *s != '-')
			return 0;
	return 1;
}

static void
plugin_section(struct parse *p, const char *name)
{
	struct config *c = p->c;
	struct plugin_config *pc;
	size_t i;

	if (!plugin_name_valid(name)) {
		conf_error(p, p->lineno,
			   "[%s]: bad plugin name '%s' (letters, digits, "
			   "'_' and '-')", p->secname, name);
		return;
	}
	for (i = 0; i < c->nplugins; i++) {
		if (strcmp(c->plugins[i].name, name) == 0) {
			conf_error(p, p->lineno,
				   "[%s]: duplicate section (first on line %d)",
				   p->secname, c->plugins[i].line);
			return;
		}
	}
	c->plugins = xreallocarray(c->plugins, c->nplugins + 1,
				   sizeof(*c->plugins));
	p->path_lines = xreallocarray(p->path_lines, c->nplugins + 1,
				      sizeof(*p->path_lines));
	pc = &c->plugins[c->nplugins];
	memset(pc, 0, sizeof(*pc));
	pc->name = xstrdup(name);
	pc->line = p->lineno;
	p->path_lines[c->nplugins] = 0;
	p->plugin = c->nplugins++;
	p->sec = SEC_PLUGIN;
}

/* A "[name]" line: settle which section the following keys go to. */
static void
section_begin(struct parse *p, const char *name)
{
	size_t i;

	free(p->secname);
	p->secname = xstrdup(name);
	p->sec = SEC_IGNORED;

	if (strncmp(name, "plugin", 6) == 0 &&
	    (name[6] == ' ' || name[6] == '\t' || name[6] == '\0')) {
		name += 6;
		while (*name == ' ' || *name == '\t')
			name++;
		if (*name == '\0')
			conf_error(p, p->lineno,
				   "[%s]: missing plugin name: use [plugin NAME]",
				   p->secname);
		else
			plugin_section(p, name);
		return;
	}
	for (i = 0; i < nitems(section_names); i++) {
		if (section_names[i] == NULL || strcmp(name, section_names[i]) != 0)
			continue;
		if (p->section_lines[i] != 0) {
			conf_error(p, p->lineno,
				   "[%s]: duplicate section (first on line %d)",
				   name, p->section_lines[i]);
			return;
		}
		p->section_lines[i] = p->lineno;
		p->sec = (enum section)i;
		return;
	}
	conf_error(p, p->lineno,
		   "[%s]: unknown section (expected server, amqp, metrics "
		   "or plugin NAME)", name);
}

/* inih's inline-comment rule: ';' after a blank starts a comment. */
static char *
find_chars_or_comment(char *s, const char *chars)
{
	int was_space = 0;

	while (*s != '\0' && strchr(chars, *s) == NULL &&
	       !(was_space && *s == ';')) {
		was_space = isspace((unsigned char)*s);
		s++;
	}
	return s;
}

/*
 * Classify the line the way inih r55 (as Debian builds it: multi-line values
 * and inline ';' comments on, handler without line numbers) is about to.
 * Section headers and malformed lines never reach our handler, so they are
 * dealt with here; key lines are left to conf_handler().
 */
static void
line_classify(struct parse *p)
{
	char *line = p->buf, *start, *end;

	if (p->lineno == 1 && strncmp(line, "\xEF\xBB\xBF", 3) == 0)
		line += 3;
	start = line;
	while (isspace((unsigned char)*start))
		start++;
	end = start + strlen(start);
	while (end > start && isspace((unsigned char)end[-1]))
		*--end = '\0';

	if (*start == '\0' || *start == ';' || *start == '#') {
		p->kind = LINE_BLANK;
	} else if (p->after_key && start > p->buf) {
		p->kind = LINE_CONTINUATION;
	} else if (*start == '[') {
		end = find_chars_or_comment(start + 1, "]");
		if (*end != ']') {
			conf_error(p, p->lineno, "section header without ']'");
			/* its keys would only add errors about the wrong section */
			p->sec = SEC_IGNORED;
			p->kind = LINE_BAD;
			return;
		}
		*end = '\0';
		p->kind = LINE_HEADER;
		p->after_key = 0;
		section_begin(p, start + 1);
	} else {
		end = find_chars_or_comment(start, "=:");
		if (*end != '=' && *end != ':') {
			conf_error(p, p->lineno,
				   "expected 'key = value', '[section]' or a "
				   "comment");
			p->kind = LINE_BAD;
			return;
		}
		p->kind = LINE_KEY;
		p->after_key = 1;
	}
}

/*
 * inih's line reader.  We read whole lines ourselves so that the handler
 * knows the line number, and so that a line longer than inih's buffer is an
 * error rather than silently split into a bogus second line.
 */
static char *
conf_read_line(char *str, int num, void *stream)
{
	struct parse *p = stream;
	ssize_t n;
	size_t len;

	n = getline(&p->buf, &p->bufsz, p->fp);
	if (n == -1) {
		if (ferror(p->fp))
			p->read_errno = errno;
		return NULL;
	}
	p->lineno++;
	len = (size_t)n;
	if (len > 0 && p->buf[len - 1] == '\n')
		len--;

	if (memchr(p->buf, '\0', (size_t)n) != NULL) {
		conf_error(p, p->lineno, "line contains a NUL byte");
		goto blank;
	}
	/*
	 * inih's buffer holds num - 1 characters.  Keep the newline: newer
	 * inih versions take a full buffer without one for a cut line and
	 * read on to discard its rest, which would swallow our next line.
	 */
	if (num < 3 || len > (size_t)num - 2) {
		conf_error(p, p->lineno,
			   "line too long (%zu characters, at most %d)", len,
			   num < 3 ? 0 : num - 2);
		goto blank;
	}
	memcpy(str, p->buf, (size_t)n + 1);
	line_classify(p);
	return str;

blank:
	/* An empty line keeps inih's line count in step with ours. */
	p->kind = LINE_BLANK;
	str[0] = '\n';
	str[1] = '\0';
	return str;
}

static int
plugin_key(struct parse *p, const char *name, const char *value)
{
	struct plugin_config *pc = &p->c->plugins[p->plugin];
	struct plugin_option *o;
	size_t i;

	if (strcmp(name, "path") == 0) {
		if (p->path_lines[p->plugin] != 0) {
			key_error(p, p->lineno, p->secname, name,
				  "duplicate key (first set on line %d)",
				  p->path_lines[p->plugin]);
			return 0;
		}
		p->path_lines[p->plugin] = p->lineno;
		if (*value == '\0') {
			key_error(p, p->lineno, p->secname, name,
				  "must not be empty");
			return 0;
		}
		set_string(&pc->path, value);
		return 1;
	}
	for (i = 0; i < pc->noptions; i++) {
		if (strcmp(pc->options[i].key, name) == 0) {
			key_error(p, p->lineno, p->secname, name,
				  "duplicate key (first set on line %d)",
				  pc->options[i].line);
			return 0;
		}
	}
	pc->options = xreallocarray(pc->options, pc->noptions + 1,
				    sizeof(*pc->options));
	o = &pc->options[pc->noptions++];
	o->key = xstrdup(name);
	o->value = xstrdup(value);
	o->line = p->lineno;
	return 1;
}

/* inih calls this for every key line and continuation line. */
static int
conf_handler(void *user, const char *section, const char *name,
	     const char *value)
{
	struct parse *p = user;
	const struct keyword *k;
	char why[512];
	size_t idx;

	(void)section; /* ours is the same, and never truncated */

	if (p->kind == LINE_CONTINUATION) {
		if (p->sec == SEC_NONE || p->sec == SEC_IGNORED)
			return 0; /* its key was reported */
		key_error(p, p->lineno, p->secname, name,
			  "indented line would continue its value; multi-line "
			  "values are not supported (unindent the line)");
		return 0;
	}
	switch (p->sec) {
	case SEC_NONE:
		conf_error(p, p->lineno, "key '%s': outside of any section",
			   name);
		return 0;
	case SEC_IGNORED:
		return 0;
	case SEC_PLUGIN:
		return plugin_key(p, name, value);
	default:
		break;
	}

	k = keyword_find(p->sec, name);
	if (k == NULL) {
		key_error(p, p->lineno, p->secname, name, "unknown key");
		return 0;
	}
	idx = (size_t)(k - keywords);
	if (p->key_lines[idx] != 0) {
		key_error(p, p->lineno, p->secname, name,
			  "duplicate key (first set on line %d)",
			  p->key_lines[idx]);
		return 0;
	}
	p->key_lines[idx] = p->lineno;
	if (keyword_set(k, p->c, value, why, sizeof(why)) == -1) {
		key_error(p, p->lineno, p->secname, name, "%s", why);
		return 0;
	}
	return 1;
}

static int
key_line(const struct parse *p, enum section sec, const char *name)
{
	return p->key_lines[keyword_find(sec, name) - keywords];
}

/* Rules that span keys, once the whole file is read. */
static void
config_check(struct parse *p)
{
	const struct config *c = p->c;
	size_t i;

	if (c->expansion_slot_buffer >= c->slots)
		key_error(p, key_line(p, SEC_SERVER, "expansion_slot_buffer"),
			  "server", "expansion_slot_buffer",
			  "%u must be less than slots (%u)",
			  c->expansion_slot_buffer, c->slots);
	if (c->retry_delay_max_ms < c->retry_delay_ms)
		key_error(p, key_line(p, SEC_AMQP, "retry_delay_max_ms"), "amqp",
			  "retry_delay_max_ms", "%u must be at least retry_delay_ms (%u)",
			  c->retry_delay_max_ms, c->retry_delay_ms);
	if ((*c->tls_cert == '\0') != (*c->tls_key == '\0')) {
		const char *set = *c->tls_cert ? "tls_cert" : "tls_key";
		const char *unset = *c->tls_cert ? "tls_key" : "tls_cert";

		key_error(p, key_line(p, SEC_AMQP, set), "amqp", set,
			  "set without %s", unset);
	}
	for (i = 0; i < c->nplugins; i++)
		if (p->path_lines[i] == 0)
			conf_error(p, c->plugins[i].line,
				   "[plugin %s] key 'path': missing; every "
				   "plugin needs one", c->plugins[i].name);
	if (*c->default_handler != '\0') {
		for (i = 0; i < c->nplugins; i++)
			if (strcmp(c->plugins[i].name, c->default_handler) == 0)
				break;
		if (i == c->nplugins)
			key_error(p, key_line(p, SEC_SERVER, "default_handler"), "server",
				  "default_handler", "'%s' names no [plugin] section",
				  c->default_handler);
	}
}

static int
error_cmp(const void *a, const void *b)
{
	const struct error *x = a, *y = b;

	if (x->line != y->line)
		return x->line < y->line ? -1 : 1;
	return x->seq < y->seq ? -1 : x->seq > y->seq;
}

/* One error per line, in file order; the buffer may cut the list short. */
static void
errors_write(struct parse *p, char *errbuf, size_t errlen)
{
	size_t i, used = 0;
	int n;

	if (p->nerrs == 0)
		return;
	qsort(p->errs, p->nerrs, sizeof(*p->errs), error_cmp);
	for (i = 0; i < p->nerrs && used < errlen; i++) {
		n = snprintf(errbuf + used, errlen - used, "%s%s",
			     i > 0 ? "\n" : "", p->errs[i].msg);
		if (n < 0)
			break;
		used += (size_t)n;
	}
}

static void
parse_free(struct parse *p)
{
	size_t i;

	for (i = 0; i < p->nerrs; i++)
		free(p->errs[i].msg);
	free(p->errs);
	free(p->buf);
	free(p->secname);
	free(p->path_lines);
}

int
config_load(const char *path, struct config *out, char *errbuf, size_t errlen)
{
	struct parse p;
	int rc, ret;

	memset(out, 0, sizeof(*out));
	memset(&p, 0, sizeof(p));
	if (errlen > 0)
		errbuf[0] = '\0';
	out->file = xstrdup(path);
	config_defaults(out);
	p.c = out;

	if ((p.fp = fopen(path, "r")) == NULL) {
		snprintf(errbuf, errlen, "%s: cannot open: %s", path,
			 strerror(errno));
		config_free(out);
		return -1;
	}
	rc = ini_parse_stream(conf_read_line, &p, conf_handler, &p);
	fclose(p.fp);
	if (rc == -2)
		out_of_memory();
	if (p.read_errno != 0)
		conf_error(&p, 0, "cannot read: %s", strerror(p.read_errno));
	else if (rc != 0 && p.nerrs == 0)
		/* inih saw something our mirror of its rules did not */
		conf_error(&p, rc, "syntax error");
	if (p.read_errno == 0)
		config_check(&p);

	ret = p.nerrs > 0 ? -1 : 0;
	errors_write(&p, errbuf, errlen);
	parse_free(&p);
	if (ret == -1)
		config_free(out);
	return ret;
}

void
config_free(struct config *c)
{
	struct plugin_config *pc;
	size_t i, j;

	if (c == NULL)
		return;
	for (i = 0; i < nitems(keywords); i++)
		if (keywords[i].type != K_UINT && keywords[i].type != K_BOOL)
			free(*(char **)((char *)c + keywords[i].off));
	for (i = 0; i < c->nplugins; i++) {
		pc = &c->plugins[i];
		for (j = 0; j < pc->noptions; j++) {
			free(pc->options[j].key);
			free(pc->options[j].value);
		}
		free(pc->options);
		free(pc->name);
		free(pc->path);
	}
	free(c->plugins);
	free(c->file);
	memset(c, 0, sizeof(*c));
}
