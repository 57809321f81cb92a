/*
 * stubborn.c - test plugin: a task that ignores cancellation for a while,
 * the misbehaving plugin kill_timeout exists for.  It sleeps with plain
 * nanosleep(), never host->sleep_ms(), so a cancel cannot cut it short.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <occamy/plugin.h>

#define STUBBORN_ID_MAX 255
#define STUBBORN_MAX_MS 86400000ULL

enum stubborn_kind { STUBBORN_MASTER, STUBBORN_HELPER, STUBBORN_EXTERNAL };

struct stubborn_task {
	const struct occamy_host *host;
	enum stubborn_kind kind;
	char *id;
	uint64_t ms;
};

static int
stubborn_task_id(const struct occamy_headers *h, char **out)
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
		   v->len <= STUBBORN_ID_MAX && memchr(v->str, '\0', v->len) == NULL) {
		*out = strndup(v->str, v->len);
	} else
		return -1;
	if (*out == NULL)
		abort();
	return 0;
}

static int
stubborn_parse_ms(const char *s, size_t len, uint64_t *out)
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
	if (digits == 0 || i != len || v > STUBBORN_MAX_MS)
		return -1;
	*out = v;
	return 0;
}

/* Sleep the whole time, deaf to everything but the clock. */
static void
stubborn_nap(uint64_t ms)
{
	struct timespec left = {(time_t)(ms / 1000), (long)(ms % 1000) * 1000000L};

	while (nanosleep(&left, &left) == -1 && errno == EINTR)
		;
}

static struct stubborn_task *
stubborn_task_alloc(const struct occamy_host *host, enum stubborn_kind kind,
		    const char *id, uint64_t ms)
{
	struct stubborn_task *t;

	if ((t = calloc(1, sizeof(*t))) == NULL)
		abort();
	t->host = host;
	t->kind = kind;
	if (id != NULL && (t->id = strdup(id)) == NULL)
		abort();
	t->ms = ms;
	return t;
}

static enum occamy_status
stubborn_task_new(const struct occamy_host *host, const struct occamy_headers *headers,
		  const void *body, size_t len, int is_help, void **task, char *err,
		  size_t errlen)
{
	uint64_t ms;
	char *id;

	if (stubborn_parse_ms(body, len, &ms) == -1) {
		snprintf(err, errlen, "body must be milliseconds as decimal text, 0..%llu",
			 (unsigned long long)STUBBORN_MAX_MS);
		return OCCAMY_ERR_INVALID_BODY;
	}
	if (stubborn_task_id(headers, &id) == -1) {
		snprintf(err, errlen, "task-id header must be a string of 1..%d bytes or an integer",
			 STUBBORN_ID_MAX);
		return OCCAMY_ERR_INVALID_HEADERS;
	}
	*task = stubborn_task_alloc(host, is_help ? STUBBORN_EXTERNAL : STUBBORN_MASTER, id, ms);
	free(id);
	return OCCAMY_OK;
}

static enum occamy_status
stubborn_task_run(void *task, const struct occamy_cancel *cancel, struct occamy_output *out)
{
	struct stubborn_task *t = task;

	if (t->kind == STUBBORN_MASTER) {
		/* Runs its full time whatever happens, then owns up. */
		stubborn_nap(t->ms);
	} else {
		/* Helpers run until cancelled and then linger ms before they
		 * return: a deterministic overrun for kill_timeout tests. */
		while (!t->host->cancelled(cancel))
			stubborn_nap(1);
		stubborn_nap(t->ms);
	}
	if (t->host->cancelled(cancel)) {
		snprintf(out->message, sizeof(out->message),
			 "cancelled (ignored it for up to %llu ms)", (unsigned long long)t->ms);
		return OCCAMY_ERR_INTERRUPTED;
	}
	return OCCAMY_OK;
}

static size_t
stubborn_task_expand(void *task, size_t n, void **helpers)
{
	struct stubborn_task *t = task;
	size_t i;

	if (t->kind != STUBBORN_MASTER)
		return 0;
	for (i = 0; i < n; i++)
		helpers[i] = stubborn_task_alloc(t->host, STUBBORN_HELPER, t->id, t->ms);
	return n;
}

static void
stubborn_task_info(const void *task, struct occamy_task_info *info)
{
	const struct stubborn_task *t = task;

	info->id = t->id;
	info->group = "stubborn";
	info->deadline_ms = 0;
	info->priority = 0;
}

static void
stubborn_task_destroy(void *task)
{
	struct stubborn_task *t = task;

	free(t->id);
	free(t);
}

const struct occamy_plugin occamy_plugin = {
	OCCAMY_PLUGIN_HEADER,
	.name = "stubborn",
	.version = "1.0",
	.task_new = stubborn_task_new,
	.task_run = stubborn_task_run,
	.task_expand = stubborn_task_expand,
	.task_info = stubborn_task_info,
	.task_destroy = stubborn_task_destroy,
};
