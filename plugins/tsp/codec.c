/*
 * codec.c - what the TSP plugin reads from and writes to the wire: the JSON
 * request and help bodies, the "tour" reports between master and
 * assistants, and a growable text buffer to write them with.
 *
 * The JSON reader is a small recursive-descent parser over (pointer, end):
 * no NUL terminator needed, nesting bounded, numbers bounded in length,
 * unknown keys skipped, every error says what it expected and where.
 */
#include <ctype.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tsp.h"

#define CODEC_MAX_DEPTH 32
#define CODEC_NUM_MAX 64 /* longest number token accepted */

void
tsp_buf_printf(struct tsp_buf *b, const char *fmt, ...)
{
	va_list ap;
	int n;

	for (;;) {
		va_start(ap, fmt);
		n = vsnprintf(b->p != NULL ? b->p + b->len : NULL, b->cap - b->len, fmt, ap);
		va_end(ap);
		if (n < 0)
			abort();
		if (b->p != NULL && (size_t)n < b->cap - b->len) {
			b->len += (size_t)n;
			return;
		}
		b->cap = b->cap * 2 + (size_t)n + 256;
		if ((b->p = realloc(b->p, b->cap)) == NULL)
			abort();
	}
}

void
tsp_buf_json_string(struct tsp_buf *b, const char *s)
{
	const unsigned char *u = (const unsigned char *)s;

	tsp_buf_printf(b, "\"");
	for (; *u != '\0'; u++) {
		if (*u == '"' || *u == '\\')
			tsp_buf_printf(b, "\\%c", *u);
		else if (*u < 0x20 || *u == 0x7f)
			tsp_buf_printf(b, "\\u%04x", *u);
		else
			tsp_buf_printf(b, "%c", *u);
	}
	tsp_buf_printf(b, "\"");
}

void
tsp_buf_free(struct tsp_buf *b)
{
	free(b->p);
	memset(b, 0, sizeof(*b));
}

int
tsp_id_ok(const char *s, size_t len)
{
	size_t i;

	if (len == 0 || len > TSP_ID_MAX)
		return 0;
	for (i = 0; i < len; i++)
		if ((unsigned char)s[i] <= ' ' || (unsigned char)s[i] >= 0x7f || s[i] == '"' ||
		    s[i] == '\\')
			return 0;
	return 1;
}

/* --- JSON reading --- */

struct jp {
	const char *start, *p, *end;
	char *err;
	size_t errlen;
	int failed;
};

static void jp_fail(struct jp *j, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void
jp_fail(struct jp *j, const char *fmt, ...)
{
	char what[160];
	va_list ap;

	if (j->failed)
		return;
	j->failed = 1;
	va_start(ap, fmt);
	vsnprintf(what, sizeof(what), fmt, ap);
	va_end(ap);
	snprintf(j->err, j->errlen, "JSON at byte %zu: %s", (size_t)(j->p - j->start), what);
}

static void
jp_ws(struct jp *j)
{
	while (j->p < j->end && (*j->p == ' ' || *j->p == '\t' || *j->p == '\n' || *j->p == '\r'))
		j->p++;
}

static int
jp_eat(struct jp *j, char c)
{
	jp_ws(j);
	if (j->p < j->end && *j->p == c) {
		j->p++;
		return 1;
	}
	return 0;
}

static int
jp_expect(struct jp *j, char c)
{
	if (jp_eat(j, c))
		return 0;
	jp_fail(j, "expected '%c'", c);
	return -1;
}

/* A string into out (at most outlen-1 bytes kept; longer is an error, or
 * with truncate set yields ""), or skipped when out is NULL.  Escapes are
 * decoded; \u beyond ASCII becomes '?' (names only). */
static int
jp_string_opt(struct jp *j, char *out, size_t outlen, int truncate)
{
	size_t n = 0;
	int cut = 0;
	char c;

	if (jp_expect(j, '"') == -1)
		return -1;
	while (j->p < j->end && *j->p != '"') {
		c = *j->p++;
		if ((unsigned char)c < 0x20) {
			jp_fail(j, "control character in a string");
			return -1;
		}
		if (c == '\\') {
			if (j->p >= j->end)
				break;
			c = *j->p++;
			switch (c) {
			case 'n': c = '\n'; break;
			case 't': c = '\t'; break;
			case 'r': c = '\r'; break;
			case 'b': c = '\b'; break;
			case 'f': c = '\f'; break;
			case '"': case '\\': case '/': break;
			case 'u': {
				unsigned v = 0;
				int k;
				for (k = 0; k < 4; k++) {
					if (j->p >= j->end || !isxdigit((unsigned char)*j->p)) {
						jp_fail(j, "bad \\u escape");
						return -1;
					}
					c = *j->p++;
					v = v * 16 + (unsigned)(isdigit((unsigned char)c)
									? c - '0'
									: (tolower((unsigned char)c) - 'a' + 10));
				}
				c = v > 0 && v < 0x80 ? (char)v : '?';
				break;
			}
			default:
				jp_fail(j, "bad escape");
				return -1;
			}
		}
		if (out != NULL && !cut) {
			if (n + 1 >= outlen) {
				if (!truncate) {
					jp_fail(j, "string longer than %zu bytes", outlen - 1);
					return -1;
				}
				cut = 1;
				continue;
			}
			out[n++] = c;
		}
	}
	if (j->p >= j->end) {
		jp_fail(j, "unterminated string");
		return -1;
	}
	j->p++;
	if (out != NULL)
		out[cut ? 0 : n] = '\0';
	return 0;
}

static int
jp_string(struct jp *j, char *out, size_t outlen)
{
	return jp_string_opt(j, out, outlen, 0);
}

/* A number token, copied out so strtod never runs past the body. */
static int
jp_number(struct jp *j, double *out)
{
	char tok[CODEC_NUM_MAX + 1], *end;
	size_t n = 0;

	jp_ws(j);
	while (j->p + n < j->end && n <= CODEC_NUM_MAX &&
	       (isdigit((unsigned char)j->p[n]) || j->p[n] == '-' || j->p[n] == '+' ||
		j->p[n] == '.' || j->p[n] == 'e' || j->p[n] == 'E'))
		n++;
	if (n == 0 || n > CODEC_NUM_MAX) {
		jp_fail(j, n == 0 ? "expected a number" : "number too long");
		return -1;
	}
	memcpy(tok, j->p, n);
	tok[n] = '\0';
	*out = strtod(tok, &end);
	if (*end != '\0' || !isfinite(*out)) {
		jp_fail(j, "bad number '%s'", tok);
		return -1;
	}
	j->p += n;
	return 0;
}

/* A non-negative integer up to max: a JSON number, or a string of digits
 * (seeds above 2^53 do not survive a double). */
static int
jp_uint(struct jp *j, uint64_t max, uint64_t *out)
{
	char s[24];
	double d;
	size_t i;
	uint64_t v = 0;

	jp_ws(j);
	if (j->p < j->end && *j->p == '"') {
		if (jp_string(j, s, sizeof(s)) == -1)
			return -1;
		for (i = 0; s[i] != '\0'; i++) {
			if (!isdigit((unsigned char)s[i]) || i >= 20 ||
			    v > (UINT64_MAX - (uint64_t)(s[i] - '0')) / 10) {
				jp_fail(j, "expected digits");
				return -1;
			}
			v = v * 10 + (uint64_t)(s[i] - '0');
		}
		if (i == 0 || v > max) {
			jp_fail(j, "expected an integer 0..%llu", (unsigned long long)max);
			return -1;
		}
		*out = v;
		return 0;
	}
	/* Plain digits parse exactly; anything else goes through strtod. */
	for (i = 0; j->p + i < j->end && isdigit((unsigned char)j->p[i]) && i < 20; i++)
		if (v > (UINT64_MAX - (uint64_t)(j->p[i] - '0')) / 10)
			break;
		else
			v = v * 10 + (uint64_t)(j->p[i] - '0');
	if (i > 0 && (j->p + i == j->end || strchr(".eE0123456789", j->p[i]) == NULL)) {
		if (v > max) {
			jp_fail(j, "expected an integer 0..%llu", (unsigned long long)max);
			return -1;
		}
		j->p += i;
		*out = v;
		return 0;
	}
	if (jp_number(j, &d) == -1)
		return -1;
	if (d < 0 || d != floor(d) || d > (double)max) {
		jp_fail(j, "expected an integer 0..%llu", (unsigned long long)max);
		return -1;
	}
	*out = (uint64_t)d;
	return 0;
}

static int
jp_skip(struct jp *j, int depth)
{
	double d;

	if (depth > CODEC_MAX_DEPTH) {
		jp_fail(j, "nested too deeply");
		return -1;
	}
	jp_ws(j);
	if (j->p >= j->end) {
		jp_fail(j, "unexpected end");
		return -1;
	}
	switch (*j->p) {
	case '"':
		return jp_string(j, NULL, 0);
	case '{':
		j->p++;
		if (jp_eat(j, '}'))
			return 0;
		do {
			if (jp_string(j, NULL, 0) == -1 || jp_expect(j, ':') == -1 ||
			    jp_skip(j, depth + 1) == -1)
				return -1;
		} while (jp_eat(j, ','));
		return jp_expect(j, '}');
	case '[':
		j->p++;
		if (jp_eat(j, ']'))
			return 0;
		do {
			if (jp_skip(j, depth + 1) == -1)
				return -1;
		} while (jp_eat(j, ','));
		return jp_expect(j, ']');
	default:
		if ((size_t)(j->end - j->p) >= 4 && memcmp(j->p, "true", 4) == 0)
			return j->p += 4, 0;
		if ((size_t)(j->end - j->p) >= 5 && memcmp(j->p, "false", 5) == 0)
			return j->p += 5, 0;
		if ((size_t)(j->end - j->p) >= 4 && memcmp(j->p, "null", 4) == 0)
			return j->p += 4, 0;
		return jp_number(j, &d);
	}
}

/* "coords": [[x, y], ...] into growing arrays, at most max_n pairs. */
static int
jp_coords(struct jp *j, int max_n, double **xs, double **ys, int *n)
{
	size_t cap = 0;

	if (*xs != NULL) {
		jp_fail(j, "\"coords\" given twice");
		return -1;
	}
	if (jp_expect(j, '[') == -1)
		return -1;
	*n = 0;
	if (jp_eat(j, ']'))
		return 0;
	do {
		if (*n >= max_n) {
			jp_fail(j, "more than %d cities", max_n);
			return -1;
		}
		if ((size_t)*n == cap) {
			cap = cap ? 2 * cap : 256;
			if ((*xs = realloc(*xs, cap * sizeof(double))) == NULL ||
			    (*ys = realloc(*ys, cap * sizeof(double))) == NULL)
				abort();
		}
		if (jp_expect(j, '[') == -1 || jp_number(j, &(*xs)[*n]) == -1 ||
		    jp_expect(j, ',') == -1 || jp_number(j, &(*ys)[*n]) == -1 ||
		    jp_expect(j, ']') == -1)
			return -1;
		(*n)++;
	} while (jp_eat(j, ','));
	return jp_expect(j, ']');
}

int
tsp_json_parse_request(struct tsp_json_request *r, const char *text, size_t len, int max_n,
		       char *err, size_t errlen)
{
	struct jp j = {text, text, text + len, err, errlen, 0};
	char key[32], name[TSP_NAME_MAX] = "", type[16] = "EUC_2D";
	double *xs = NULL, *ys = NULL;
	enum tsp_weight w;
	uint64_t v;
	int64_t optimum = -1;
	int n = 0, rc = -1;

	memset(r, 0, sizeof(*r));
	r->budget_ms = -1;
	r->deadline_ms = -1;
	r->min_assistants = -1;
	r->target_length = -1;
	if (jp_expect(&j, '{') == -1)
		goto out;
	if (!jp_eat(&j, '}')) {
		do {
			/* A key too long to be ours reads as "" and is skipped. */
			if (jp_string_opt(&j, key, sizeof(key), 1) == -1 ||
			    jp_expect(&j, ':') == -1)
				goto out;
			if (strcmp(key, "coords") == 0) {
				if (jp_coords(&j, max_n, &xs, &ys, &n) == -1)
					goto out;
			} else if (strcmp(key, "budget_ms") == 0) {
				if (jp_uint(&j, 86400000, &v) == -1)
					goto out;
				r->budget_ms = (int64_t)v;
			} else if (strcmp(key, "seed") == 0) {
				if (jp_uint(&j, UINT64_MAX, &r->seed) == -1)
					goto out;
				r->has_seed = 1;
			} else if (strcmp(key, "iterations") == 0) {
				if (jp_uint(&j, UINT64_MAX, &r->iterations) == -1)
					goto out;
			} else if (strcmp(key, "optimum") == 0) {
				if (jp_uint(&j, INT64_MAX, &v) == -1)
					goto out;
				optimum = (int64_t)v;
			} else if (strcmp(key, "min_assistants") == 0) {
				if (jp_uint(&j, TSP_ASSISTANTS_MAX, &v) == -1)
					goto out;
				r->min_assistants = (int64_t)v;
			} else if (strcmp(key, "target_length") == 0) {
				if (jp_uint(&j, INT64_MAX, &v) == -1)
					goto out;
				r->target_length = (int64_t)v;
			} else if (strcmp(key, "deadline_ms") == 0) {
				if (jp_uint(&j, INT64_MAX, &v) == -1)
					goto out;
				r->deadline_ms = (int64_t)v;
			} else if (strcmp(key, "type") == 0) {
				if (jp_string(&j, type, sizeof(type)) == -1)
					goto out;
			} else if (strcmp(key, "name") == 0) {
				if (jp_string(&j, name, sizeof(name)) == -1)
					goto out;
			} else if (strcmp(key, "master") == 0) {
				if (jp_string(&j, r->master, sizeof(r->master)) == -1)
					goto out;
				if (!tsp_id_ok(r->master, strlen(r->master))) {
					jp_fail(&j, "\"master\" is not a valid task ID");
					goto out;
				}
			} else if (jp_skip(&j, 1) == -1)
				goto out;
		} while (jp_eat(&j, ','));
		if (jp_expect(&j, '}') == -1)
			goto out;
	}
	jp_ws(&j);
	if (j.p != j.end) {
		jp_fail(&j, "trailing bytes after the object");
		goto out;
	}
	if (xs == NULL || n == 0) {
		snprintf(err, errlen, "JSON body needs \"coords\": [[x, y], ...] with 1..%d cities",
			 max_n);
		goto out;
	}
	if (tsp_weight_parse(type, &w) == -1) {
		snprintf(err, errlen, "\"type\" must be EUC_2D, CEIL_2D, ATT or GEO");
		goto out;
	}
	if (tsp_instance_init(&r->inst, name, w, n, xs, ys, err, errlen) == -1)
		goto out;
	if (optimum >= 0)
		r->inst.optimum = optimum;
	rc = 0;
out:
	free(xs);
	free(ys);
	return rc;
}

void
tsp_json_help(struct tsp_buf *b, const struct tsp_instance *in, const char *master,
	      int64_t deadline_ms, uint64_t seed)
{
	int i;

	tsp_buf_printf(b, "{\"master\":");
	tsp_buf_json_string(b, master);
	tsp_buf_printf(b, ",\"deadline_ms\":%lld,\"seed\":\"%llu\",\"type\":\"%s\",\"name\":",
		       (long long)deadline_ms, (unsigned long long)seed,
		       tsp_weight_name(in->type));
	tsp_buf_json_string(b, in->name);
	if (in->optimum >= 0)
		tsp_buf_printf(b, ",\"optimum\":%lld", (long long)in->optimum);
	tsp_buf_printf(b, ",\"coords\":[");
	/* %.17g round-trips every double exactly through strtod. */
	for (i = 0; i < in->n; i++)
		tsp_buf_printf(b, "%s[%.17g,%.17g]", i ? "," : "", in->x[i], in->y[i]);
	tsp_buf_printf(b, "]}");
}

/* --- tour reports --- */

void
tsp_report_format(struct tsp_buf *b, int n, const int *tour, int64_t len)
{
	int i;

	tsp_buf_printf(b, "tour %lld %d", (long long)len, n);
	for (i = 0; i < n; i++)
		tsp_buf_printf(b, " %d", tour[i]);
}

/* Read one unsigned decimal (at most 19 digits) after single spaces. */
static int
report_number(const char **p, const char *end, uint64_t *out)
{
	uint64_t v = 0;
	int digits = 0;

	while (*p < end && **p == ' ')
		(*p)++;
	while (*p < end && isdigit((unsigned char)**p)) {
		if (++digits > 19)
			return -1;
		v = v * 10 + (uint64_t)(**p - '0');
		(*p)++;
	}
	if (digits == 0 || (*p < end && **p != ' ' && **p != '\n'))
		return -1;
	*out = v;
	return 0;
}

int
tsp_report_parse(const char *text, size_t len, int n, int *tour, int64_t *claimed)
{
	const char *p = text, *end = text + len;
	uint64_t v;
	int i;

	if (len < 5 || memcmp(p, "tour ", 5) != 0)
		return -1;
	p += 5;
	if (report_number(&p, end, &v) == -1 || v > INT64_MAX)
		return -1;
	*claimed = (int64_t)v;
	if (report_number(&p, end, &v) == -1 || v != (uint64_t)n)
		return -1;
	for (i = 0; i < n; i++) {
		if (report_number(&p, end, &v) == -1 || v >= (uint64_t)n)
			return -1;
		tour[i] = (int)v;
	}
	while (p < end && (*p == ' ' || *p == '\n'))
		p++;
	return p == end ? 0 : -1;
}
