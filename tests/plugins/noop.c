/*
 * noop.c - test plugin: a task that succeeds at once.  A non-empty body is
 * echoed back as the result, so round trips (request -> reply) can be checked
 * byte for byte.  The cheapest task there is: for latency and load tests.
 */
#include "fixture.h"

struct noop_task {
	char *id;   /* task-id header, or NULL */
	void *body; /* what to echo; NULL when the body was empty */
	size_t len;
};

static enum occamy_status
noop_task_new(const struct occamy_host *host, const struct occamy_headers *headers,
	      const void *body, size_t len, int is_help, void **task, char *err,
	      size_t errlen)
{
	struct noop_task *t;

	(void)is_help;
	t = fixture_calloc(sizeof(*t));
	if (fixture_task_id(host, headers, &t->id) == -1) {
		free(t);
		return fixture_bad_task_id(err, errlen);
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

	fixture_task_info(info, t->id, "noop", 0);
}

static void
noop_task_destroy(void *task)
{
	struct noop_task *t = task;

	free(t->id);
	free(t->body);
	free(t);
}

FIXTURE_PLUGIN("noop", FIXTURE_TASK_CALLBACKS(noop));
