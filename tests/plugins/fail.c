/*
 * fail.c - test plugin: fails in the way its body names, so every error path
 * of the daemon (dead-letter, requeue, retry limit, a crashing plugin, a
 * control callback that blocks) can be driven from a test.
 */
#include <signal.h>

#include "fixture.h"

#define FAIL_BLOCK_S 30             /* how long task_handle blocks */
#define FAIL_RUN_DEFAULT_MS 10000   /* how long a handle_block task runs */

enum fail_kind {
	FAIL_OK,
	FAIL_INTERNAL,
	FAIL_INTERRUPTED,
	FAIL_CRASH,
	FAIL_HANDLE_BLOCK,
};

struct fail_task {
	const struct occamy_host *host;
	char *id;
	enum fail_kind kind;
	uint64_t run_ms; /* FAIL_HANDLE_BLOCK only */
};

/* Does the body, less surrounding blanks, equal word (optionally followed
 * by ",rest")?  On a match, rest and restlen describe what follows the comma. */
static int
fail_match(const char *s, size_t len, const char *word, const char **rest,
	   size_t *restlen)
{
	size_t wl = strlen(word);

	while (len > 0 && fixture_is_blank(*s))
		s++, len--;
	while (len > 0 && fixture_is_blank(s[len - 1]))
		len--;
	if (len < wl || memcmp(s, word, wl) != 0)
		return 0;
	if (len == wl) {
		*rest = NULL;
		*restlen = 0;
		return 1;
	}
	if (s[wl] != ',')
		return 0;
	*rest = s + wl + 1;
	*restlen = len - wl - 1;
	return 1;
}

/* ms after "handle_block,": digits only, 0..FIXTURE_MAX_MS. */
static int
fail_parse_ms(const char *s, size_t len, uint64_t *out)
{
	size_t i = 0;
	uint64_t v;

	if (fixture_parse_u64(s, len, &i, &v) == -1 || i != len || v > FIXTURE_MAX_MS)
		return -1;
	*out = v;
	return 0;
}

static enum occamy_status
fail_task_new(const struct occamy_host *host, const struct occamy_headers *headers,
	      const void *body, size_t len, int is_help, void **task, char *err,
	      size_t errlen)
{
	static const struct {
		const char *word;
		enum fail_kind kind;
	} run_kinds[] = {
		{"ok", FAIL_OK},
		{"internal", FAIL_INTERNAL},
		{"interrupted", FAIL_INTERRUPTED},
		{"crash", FAIL_CRASH},
		{"handle_block", FAIL_HANDLE_BLOCK},
	};
	const char *s = body, *rest;
	size_t i, restlen;
	struct fail_task *t;
	uint64_t run_ms = FAIL_RUN_DEFAULT_MS;

	(void)is_help;
	if (fail_match(s, len, "invalid_body", &rest, &restlen) && rest == NULL) {
		snprintf(err, errlen, "fail: asked for invalid_body");
		return OCCAMY_ERR_INVALID_BODY;
	}
	if (fail_match(s, len, "invalid_headers", &rest, &restlen) && rest == NULL) {
		snprintf(err, errlen, "fail: asked for invalid_headers");
		return OCCAMY_ERR_INVALID_HEADERS;
	}
	if (fail_match(s, len, "invalid_task", &rest, &restlen) && rest == NULL) {
		snprintf(err, errlen, "fail: asked for invalid_task");
		return OCCAMY_ERR_INVALID_TASK;
	}
	for (i = 0; i < sizeof(run_kinds) / sizeof(run_kinds[0]); i++)
		if (fail_match(s, len, run_kinds[i].word, &rest, &restlen))
			break;
	if (i == sizeof(run_kinds) / sizeof(run_kinds[0]) ||
	    (rest != NULL && run_kinds[i].kind != FAIL_HANDLE_BLOCK) ||
	    (rest != NULL && fail_parse_ms(rest, restlen, &run_ms) == -1)) {
		snprintf(err, errlen,
			 "fail: body must be one of invalid_body, invalid_headers, "
			 "invalid_task, internal, interrupted, ok, crash, handle_block[,ms]");
		return OCCAMY_ERR_INVALID_BODY;
	}
	t = fixture_calloc(sizeof(*t));
	if (fixture_task_id(host, headers, &t->id) == -1) {
		free(t);
		return fixture_bad_task_id(err, errlen);
	}
	t->host = host;
	t->kind = run_kinds[i].kind;
	t->run_ms = run_ms;
	*task = t;
	return OCCAMY_OK;
}

static enum occamy_status
fail_task_run(void *task, const struct occamy_cancel *cancel, struct occamy_output *out)
{
	struct fail_task *t = task;

	switch (t->kind) {
	case FAIL_OK:
		return OCCAMY_OK;
	case FAIL_INTERNAL:
		snprintf(out->message, sizeof(out->message), "fail: asked for internal");
		return OCCAMY_ERR_INTERNAL;
	case FAIL_INTERRUPTED:
		snprintf(out->message, sizeof(out->message), "fail: asked for interrupted");
		return OCCAMY_ERR_INTERRUPTED;
	case FAIL_CRASH:
		/* A poison message: the daemon must survive it (or at least
		 * not loop on it forever after a restart). */
		raise(SIGSEGV);
		abort();
	case FAIL_HANDLE_BLOCK:
		/* Stay alive long enough for a control message to arrive. */
		if (t->host->sleep_ms(cancel, t->run_ms) != 0) {
			snprintf(out->message, sizeof(out->message), "cancelled");
			return OCCAMY_ERR_INTERRUPTED;
		}
		return OCCAMY_OK;
	}
	return OCCAMY_ERR_INTERNAL;
}

/* Breaks the "task_handle must be quick" rule on purpose, for tests of a
 * dispatcher that must not stall on one task. */
static void
fail_task_handle(void *task, const struct occamy_headers *headers, const void *body,
		 size_t len)
{
	struct fail_task *t = task;

	(void)headers;
	(void)body;
	(void)len;
	if (t->kind != FAIL_HANDLE_BLOCK)
		return;
	t->host->log(t->host, OCCAMY_LOG_DEBUG, "task_handle blocking for %d s", FAIL_BLOCK_S);
	fixture_nap_ms(FAIL_BLOCK_S * 1000);
}

static void
fail_task_info(const void *task, struct occamy_task_info *info)
{
	const struct fail_task *t = task;

	fixture_task_info(info, t->id, "fail", 0);
}

FIXTURE_TASK_DESTROY_ID(fail, struct fail_task)

FIXTURE_PLUGIN("fail", FIXTURE_TASK_CALLBACKS(fail),
	.task_handle = fail_task_handle);
