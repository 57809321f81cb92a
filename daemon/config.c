/*
 * config.c - reading occamy.ini: inih's line reader and our mirror of its
 * rules, sections and [plugin NAME] keys, the rules that span keys, and
 * the "FILE:LINE:" error list of config_load().  The keyword table and the
 * defaults are in config_keys.c.  Run by whichever thread loads a config
 * (the daemon's main thread, occamyctl).
 */
#include <ctype.h>
#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <ini.h>

#include "config.h"
#include "config_keys.h"

static const char *const section_names[] = {
	[SEC_SERVER] = "server",
	[SEC_AMQP] = "amqp",
	[SEC_METRICS] = "metrics",
};

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
	int *key_lines;       /* per keyword: line that set it, 0 if none */

	struct error *errs;
	size_t nerrs;
};

/* Record "FILE:LINE: PREFIXreason" ("FILE: ..." for line 0). */
static void
error_add(struct parse *p, int line, const char *prefix, const char *fmt,
	  va_list ap)
{
	struct error *e;
	char *reason;

	if (vasprintf(&reason, fmt, ap) == -1)
		config_out_of_memory();
	p->errs = config_xreallocarray(p->errs, p->nerrs + 1, sizeof(*p->errs));
	e = &p->errs[p->nerrs];
	e->line = line;
	e->seq = p->nerrs++;
	if (line > 0 && asprintf(&e->msg, "%s:%d: %s%s", p->c->file, line,
				 prefix, reason) == -1)
		config_out_of_memory();
	if (line <= 0 &&
	    asprintf(&e->msg, "%s: %s%s", p->c->file, prefix, reason) == -1)
		config_out_of_memory();
	free(reason);
}

static void conf_error(struct parse *, int, const char *, ...)
    __attribute__((format(printf, 3, 4)));

static void
conf_error(struct parse *p, int line, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	error_add(p, line, "", fmt, ap);
	va_end(ap);
}

static void key_error(struct parse *, int, const char *, const char *,
		      const char *, ...) __attribute__((format(printf, 5, 6)));

/* "FILE:LINE: [section] key 'K': reason" */
static void
key_error(struct parse *p, int line, const char *sec, const char *key,
	  const char *fmt, ...)
{
	va_list ap;
	char *prefix;

	if (asprintf(&prefix, "[%s] key '%s': ", sec, key) == -1)
		config_out_of_memory();
	va_start(ap, fmt);
	error_add(p, line, prefix, fmt, ap);
	va_end(ap);
	free(prefix);
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
	c->plugins = config_xreallocarray(c->plugins, c->nplugins + 1,
				   sizeof(*c->plugins));
	p->path_lines = config_xreallocarray(p->path_lines, c->nplugins + 1,
				      sizeof(*p->path_lines));
	pc = &c->plugins[c->nplugins];
	memset(pc, 0, sizeof(*pc));
	pc->name = config_xstrdup(name);
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
	p->secname = config_xstrdup(name);
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
		config_set_string(&pc->path, value);
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
	pc->options = config_xreallocarray(pc->options, pc->noptions + 1,
				    sizeof(*pc->options));
	o = &pc->options[pc->noptions++];
	o->key = config_xstrdup(name);
	o->value = config_xstrdup(value);
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
	idx = keyword_index(k);
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
	return p->key_lines[keyword_index(keyword_find(sec, name))];
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
	free(p->key_lines);
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
	out->file = config_xstrdup(path);
	config_defaults(out);
	p.c = out;

	if ((p.fp = fopen(path, "r")) == NULL) {
		snprintf(errbuf, errlen, "%s: cannot open: %s", path,
			 strerror(errno));
		config_free(out);
		return -1;
	}
	p.key_lines = config_xreallocarray(NULL, keyword_count(),
					   sizeof(*p.key_lines));
	memset(p.key_lines, 0, keyword_count() * sizeof(*p.key_lines));
	rc = ini_parse_stream(conf_read_line, &p, conf_handler, &p);
	fclose(p.fp);
	if (rc == -2)
		config_out_of_memory();
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
