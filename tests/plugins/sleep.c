/*
 * sleep.c - test plugin: a task that sleeps for the number of milliseconds
 * in its body, through host->sleep_ms so that it stops at once when
 * cancelled.  The model of a well-behaved, idle task.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <occamy/plugin.h>

#define SLEEP_ID_MAX 255
#define SLEEP_MAX_MS 86400000ULL /* a day: anything longer is a typo */

struct sleep_task {
	const struct occamy_host *host;
	char *id;
	uint64_t ms;
	int64_t deadline_ms;
};

static int
sleep_task_id(const struct occamy_headers *h, char **out)
{
	const struct occamy_header *v = occamy_headers_find(h, "task-id");
	char num[32];

	*out = NULL;
	if (v == NULL)
		return 0;
	if (v->kind == OCCAMY_VALUE_INT) {
		snprintf(num, sizeof(num), "%lld", (long long)v->i);
		*out = strdup(num);
	} else if (v->kind == OCCAMY_VALUE_STRING && v->len > 0 &&
		   v->len <= SLEEP_ID_MAX && memchr(v->str, '\0', v->len) == NULL) {
		*out = strndup(v->str, v->len);
	} else
		return -1;
	if (*out == NULL)
		abort();
	return 0;
}

/* Decimal text, blanks around it allowed, nothing else.  Bounded: at most
 * 19 digits are read, so no overflow whatever the body. */
static int
sleep_parse_ms(const char *s, size_t len, uint64_t *out)
{
	size_t i = 0, digits = 0;
	uint64_t v = 0;

	while (i < len && (s[i] == ' ' || s[i] == '\t' || s[i] == '\r' || s[i] == '\n'))
		i++;
	for (; i < len && s[i] >= '0' && s[i] <= '9'; i++) {
		if (++digits > 19)
			return -1;
		v = v * 10 + (uint64_t)(s[i] - '0');
	}
	while (i < len && (s[i] == ' ' || s[i] == '\t' || s[i] == '\r' || s[i] == '\n'))
		i++;
	if (digits == 0 || i != len || v > SLEEP_MAX_MS)
		return -1;
	*out = v;
	return 0;
}

static int64_t
sleep_wall_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static enum occamy_status
sleep_task_new(const struct occamy_host *host, const struct occamy_headers *headers,
	       const void *body, size_t len, int is_help, void **task, char *err,
	       size_t errlen)
{
	struct sleep_task *t;
	uint64_t ms;

	(void)is_help;
	if (sleep_parse_ms(body, len, &ms) == -1) {
		snprintf(err, errlen, "body must be milliseconds as decimal text, 0..%llu",
			 (unsigned long long)SLEEP_MAX_MS);
		return OCCAMY_ERR_INVALID_BODY;
	}
	if ((t = calloc(1, sizeof(*t))) == NULL)
		abort();
	if (sleep_task_id(headers, &t->id) == -1) {
		snprintf(err, errlen, "task-id header must be a string of 1..%d bytes or an integer",
			 SLEEP_ID_MAX);
		free(t);
		return OCCAMY_ERR_INVALID_HEADERS;
	}
	t->host = host;
	t->ms = ms;
	t->deadline_ms = sleep_wall_ms() + (int64_t)ms;
	*task = t;
	return OCCAMY_OK;
}

static enum occamy_status
sleep_task_run(void *task, const struct occamy_cancel *cancel, struct occamy_output *out)
{
	struct sleep_task *t = task;
	char msg[64];
	int n;

	if (t->host->sleep_ms(cancel, t->ms) != 0) {
		snprintf(out->message, sizeof(out->message), "cancelled while sleeping");
		return OCCAMY_ERR_INTERRUPTED;
	}
	n = snprintf(msg, sizeof(msg), "slept %llu", (unsigned long long)t->ms);
	if ((out->body = malloc((size_t)n)) == NULL)
		abort();
	memcpy(out->body, msg, (size_t)n);
	out->len = (size_t)n;
	snprintf(out->content_type, sizeof(out->content_type), "text/plain");
	return OCCAMY_OK;
}

static void
sleep_task_info(const void *task, struct occamy_task_info *info)
{
	const struct sleep_task *t = task;

	info->id = t->id;
	info->group = "sleep";
	info->deadline_ms = t->deadline_ms;
	info->priority = 0;
}

static void
sleep_task_destroy(void *task)
{
	struct sleep_task *t = task;

	free(t->id);
	free(t);
}

const struct occamy_plugin occamy_plugin = {
	OCCAMY_PLUGIN_HEADER,
	.name = "sleep",
	.version = "1.0",
	.task_new = sleep_task_new,
	.task_run = sleep_task_run,
	.task_info = sleep_task_info,
	.task_destroy = sleep_task_destroy,
};
