/*
 * fixture.h - the skeleton the test plugins share: allocation that aborts,
 * the clocks, decimal numbers in bodies, the task ID header (named by
 * host->header_task_id), unknown options, text results, task_info and the
 * descriptor.
 * Header-only (static inline), so each plugin stays one .c file built with
 * the public header alone.  Any thread.
 */
#ifndef OCCAMY_TEST_FIXTURE_H
#define OCCAMY_TEST_FIXTURE_H

#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <occamy/plugin.h>

/* Durations in bodies: anything longer than a day is a typo. */
#define FIXTURE_MAX_MS 86400000ULL
/* Task IDs from the header: at most this many bytes. */
#define FIXTURE_ID_MAX 255

/* The descriptor, version 1.0; the rest are designated initialisers. */
#define FIXTURE_PLUGIN(plugin_name, ...)                                       \
	const struct occamy_plugin occamy_plugin = {                           \
		OCCAMY_PLUGIN_HEADER,                                          \
		.name = plugin_name,                                           \
		.version = "1.0",                                              \
		__VA_ARGS__                                                    \
	}

/* The four callbacks every plugin has, named PREFIX_task_new, _run, _info
 * and _destroy, for FIXTURE_PLUGIN. */
#define FIXTURE_TASK_CALLBACKS(prefix)                                         \
	.task_new = prefix##_task_new, .task_run = prefix##_task_run,          \
	.task_info = prefix##_task_info, .task_destroy = prefix##_task_destroy

/* PREFIX_task_destroy for a task struct that owns nothing but its id. */
#define FIXTURE_TASK_DESTROY_ID(prefix, type)                                  \
	static void prefix##_task_destroy(void *task)                          \
	{                                                                      \
		type *t = task;                                                \
		free(t->id);                                                   \
		free(t);                                                       \
	}

static inline void *
fixture_calloc(size_t size)
{
	void *p = calloc(1, size);

	if (p == NULL)
		abort();
	return p;
}

static inline char *
fixture_strdup(const char *s)
{
	char *d = strdup(s);

	if (d == NULL)
		abort();
	return d;
}

static inline uint64_t
fixture_now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static inline int64_t
fixture_wall_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Sleep ms in full, deaf to everything but the clock (never
 * host->sleep_ms: a cancel cannot cut it short). */
static inline void
fixture_nap_ms(uint64_t ms)
{
	struct timespec left = {(time_t)(ms / 1000), (long)(ms % 1000) * 1000000L};

	while (nanosleep(&left, &left) == -1 && errno == EINTR)
		;
}

static inline int
fixture_is_blank(char c)
{
	return c == ' ' || c == '\t' || c == '\r' || c == '\n';
}

/* len less the blanks at the end of s. */
static inline size_t
fixture_trim_end(const char *s, size_t len)
{
	while (len > 0 && fixture_is_blank(s[len - 1]))
		len--;
	return len;
}

/* An unsigned decimal at s[*i], 1 to 19 digits (so it cannot overflow);
 * *i moves past it.  Returns 0, or -1. */
static inline int
fixture_parse_u64(const char *s, size_t len, size_t *i, uint64_t *out)
{
	size_t digits = 0;
	uint64_t v = 0;

	for (; *i < len && s[*i] >= '0' && s[*i] <= '9'; (*i)++) {
		if (++digits > 19)
			return -1;
		v = v * 10 + (uint64_t)(s[*i] - '0');
	}
	*out = v;
	return digits > 0 ? 0 : -1;
}

/* A body that is one decimal number 0..max, blanks around it allowed. */
static inline int
fixture_parse_ms(const char *s, size_t len, uint64_t max, uint64_t *out)
{
	size_t i = 0;
	uint64_t v;

	while (i < len && fixture_is_blank(s[i]))
		i++;
	if (fixture_parse_u64(s, len, &i, &v) == -1)
		return -1;
	while (i < len && fixture_is_blank(s[i]))
		i++;
	if (i != len || v > max)
		return -1;
	*out = v;
	return 0;
}

/* A body of milliseconds, 0..FIXTURE_MAX_MS: 0, or -1 with the reason in
 * err for OCCAMY_ERR_INVALID_BODY. */
static inline int
fixture_body_ms(const void *body, size_t len, uint64_t *ms, char *err, size_t errlen)
{
	if (fixture_parse_ms(body, len, FIXTURE_MAX_MS, ms) == 0)
		return 0;
	snprintf(err, errlen, "body must be milliseconds as decimal text, 0..%llu",
		 (unsigned long long)FIXTURE_MAX_MS);
	return -1;
}

/* The name of the header that carries a task ID. */
static inline const char *
fixture_task_id_header(const struct occamy_host *host)
{
	if (host != NULL && OCCAMY_HOST_HAS(host, header_task_id) &&
	    host->header_task_id != NULL)
		return host->header_task_id;
	return "task-id";
}

/* The task ID header (a string of 1..FIXTURE_ID_MAX bytes, or an integer)
 * as a new string in *out, NULL without one.  Returns 0, or -1 if the
 * header is there but unusable (see fixture_bad_task_id). */
static inline int
fixture_task_id(const struct occamy_host *host, const struct occamy_headers *h, char **out)
{
	const struct occamy_header *v = occamy_headers_find(h, fixture_task_id_header(host));
	char num[32];

	*out = NULL;
	if (v == NULL)
		return 0;
	if (v->kind == OCCAMY_VALUE_INT) {
		snprintf(num, sizeof(num), "%lld", (long long)v->i);
		*out = strdup(num);
	} else if (v->kind == OCCAMY_VALUE_STRING && v->len > 0 &&
		   v->len <= FIXTURE_ID_MAX && memchr(v->str, '\0', v->len) == NULL) {
		*out = strndup(v->str, v->len);
	} else
		return -1;
	if (*out == NULL)
		abort();
	return 0;
}

/* What task_new says when fixture_task_id() returned -1. */
static inline enum occamy_status
fixture_bad_task_id(char *err, size_t errlen)
{
	snprintf(err, errlen, "task-id header must be a string of 1..%d bytes or an integer",
		 FIXTURE_ID_MAX);
	return OCCAMY_ERR_INVALID_HEADERS;
}

static inline void fixture_result_text(struct occamy_output *out, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));

/* A text/plain result, without the NUL. */
static inline void
fixture_result_text(struct occamy_output *out, const char *fmt, ...)
{
	char msg[256];
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	if (n < 0)
		abort();
	if ((size_t)n >= sizeof(msg))
		n = (int)sizeof(msg) - 1;
	if ((out->body = malloc((size_t)n)) == NULL)
		abort();
	memcpy(out->body, msg, (size_t)n);
	out->len = (size_t)n;
	snprintf(out->content_type, sizeof(out->content_type), "text/plain");
}

/* What init says of an option it does not know; known lists those it does. */
static inline int
fixture_option_unknown(char *err, size_t errlen, const char *key, const char *known)
{
	snprintf(err, errlen, "unknown option '%s' (known: %s)", key, known);
	return -1;
}

/* task_info of a plugin whose tasks have priority 0. */
static inline void
fixture_task_info(struct occamy_task_info *info, const char *id, const char *group,
		  int64_t deadline_ms)
{
	info->id = id;
	info->group = group;
	info->deadline_ms = deadline_ms;
	info->priority = 0;
}

#endif /* OCCAMY_TEST_FIXTURE_H */
