/*
 * sleep.c - test plugin: a task that sleeps for the number of milliseconds
 * in its body, through host->sleep_ms so that it stops at once when
 * cancelled.  The model of a well-behaved, idle task.
 */
#include "fixture.h"

struct sleep_task {
	const struct occamy_host *host;
	char *id;
	uint64_t ms;
	int64_t deadline_ms;
};

static enum occamy_status
sleep_task_new(const struct occamy_host *host, const struct occamy_headers *headers,
	       const void *body, size_t len, int is_help, void **task, char *err,
	       size_t errlen)
{
	struct sleep_task *t;
	uint64_t ms;

	(void)is_help;
	if (fixture_body_ms(body, len, &ms, err, errlen) == -1)
		return OCCAMY_ERR_INVALID_BODY;
	t = fixture_calloc(sizeof(*t));
	if (fixture_task_id(host, headers, &t->id) == -1) {
		free(t);
		return fixture_bad_task_id(err, errlen);
	}
	t->host = host;
	t->ms = ms;
	t->deadline_ms = fixture_wall_ms() + (int64_t)ms;
	*task = t;
	return OCCAMY_OK;
}

static enum occamy_status
sleep_task_run(void *task, const struct occamy_cancel *cancel, struct occamy_output *out)
{
	struct sleep_task *t = task;

	if (t->host->sleep_ms(cancel, t->ms) != 0) {
		snprintf(out->message, sizeof(out->message), "cancelled while sleeping");
		return OCCAMY_ERR_INTERRUPTED;
	}
	fixture_result_text(out, "slept %llu", (unsigned long long)t->ms);
	return OCCAMY_OK;
}

static void
sleep_task_info(const void *task, struct occamy_task_info *info)
{
	const struct sleep_task *t = task;

	fixture_task_info(info, t->id, "sleep", t->deadline_ms);
}

FIXTURE_TASK_DESTROY_ID(sleep, struct sleep_task)

FIXTURE_PLUGIN("sleep", FIXTURE_TASK_CALLBACKS(sleep));
