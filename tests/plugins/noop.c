/*
 * noop.c - test plugin: a task that succeeds at once.  A non-empty body is
 * echoed back as the result, so round trips (request -> reply) can be checked
 * byte for byte.  The cheapest task there is: for latency and load tests.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <occamy/plugin.h>

#define NOOP_ID_MAX 255

struct noop_task {
	char *id;   /* task-id header, or NULL */
	void *body; /* what to echo; NULL when the body was empty */
	size_t len;
};

/* Copy the task-id header (a string or an integer) into a new string.
 * Returns 0, or -1 if the header is there but unusable. */
static int
noop_task_id(const struct occamy_headers *h, char **out)
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
		   v->len <= NOOP_ID_MAX && memchr(v->str, '\0', v->len) == NULL) {
		*out = strndup(v->str, v->len);
	} else
		return -1;
	if (*out == NULL)
		abort();
	return 0;
}

static enum occamy_status
noop_task_new(const struct occamy_host *host, const struct occamy_headers *headers,
	      const void *body, size_t len, int is_help, void **task, char *err,
	      size_t errlen)
{
	struct noop_task *t;

	(void)host;
	(void)is_help;
	if ((t = calloc(1, sizeof(*t))) == NULL)
		abort();
	if (noop_task_id(headers, &t->id) == -1) {
		snprintf(err, errlen, "task-id header must be a string of 1..%d bytes or an integer",
			 NOOP_ID_MAX);
		free(t);
		return OCCAMY_ERR_INVALID_HEADERS;
	}
	if (len > 0) {
		if ((t->body = malloc(len)) == NULL)
			abort();
		memcpy(t->body, body, len);
		t->len = len;
	}
	*task = t;
	return OCCAMY_OK;
}

static enum occamy_status
noop_task_run(void *task, const struct occamy_cancel *cancel, struct occamy_output *out)
{
	struct noop_task *t = task;

	(void)cancel;
	/* Hand the copy over: the daemon frees the result, task_destroy
	 * must then not. */
	out->body = t->body;
	out->len = t->len;
	t->body = NULL;
	t->len = 0;
	return OCCAMY_OK;
}

static void
noop_task_info(const void *task, struct occamy_task_info *info)
{
	const struct noop_task *t = task;

	info->id = t->id;
	info->group = "noop";
	info->deadline_ms = 0;
	info->priority = 0;
}

static void
noop_task_destroy(void *task)
{
	struct noop_task *t = task;

	free(t->id);
	free(t->body);
	free(t);
}

const struct occamy_plugin occamy_plugin = {
	OCCAMY_PLUGIN_HEADER,
	.name = "noop",
	.version = "1.0",
	.task_new = noop_task_new,
	.task_run = noop_task_run,
	.task_info = noop_task_info,
	.task_destroy = noop_task_destroy,
};
