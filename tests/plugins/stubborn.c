/*
 * stubborn.c - test plugin: a task that ignores cancellation for a while,
 * the misbehaving plugin kill_timeout exists for.  It sleeps with plain
 * nanosleep(), never host->sleep_ms(), so a cancel cannot cut it short.
 */
#include "fixture.h"

enum stubborn_kind { STUBBORN_MASTER, STUBBORN_HELPER, STUBBORN_EXTERNAL };

struct stubborn_task {
	const struct occamy_host *host;
	enum stubborn_kind kind;
	char *id;
	uint64_t ms;
};

static struct stubborn_task *
stubborn_task_alloc(const struct occamy_host *host, enum stubborn_kind kind,
		    const char *id, uint64_t ms)
{
	struct stubborn_task *t;

	t = fixture_calloc(sizeof(*t));
	t->host = host;
	t->kind = kind;
	if (id != NULL)
		t->id = fixture_strdup(id);
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

	if (fixture_body_ms(body, len, &ms, err, errlen) == -1)
		return OCCAMY_ERR_INVALID_BODY;
	if (fixture_task_id(host, headers, &id) == -1)
		return fixture_bad_task_id(err, errlen);
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
		fixture_nap_ms(t->ms);
	} else {
		/* Helpers run until cancelled and then linger ms before they
		 * return: a deterministic overrun for kill_timeout tests. */
		while (!t->host->cancelled(cancel))
			fixture_nap_ms(1);
		fixture_nap_ms(t->ms);
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

	fixture_task_info(info, t->id, "stubborn", 0);
}

FIXTURE_TASK_DESTROY_ID(stubborn, struct stubborn_task)

FIXTURE_PLUGIN("stubborn", FIXTURE_TASK_CALLBACKS(stubborn),
	.task_expand = stubborn_task_expand);
