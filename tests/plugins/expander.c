/*
 * expander.c - test plugin: exercises the whole master/assistant loop.  A
 * master publishes a help request and expands into local helpers; every
 * helper, internal or external, says hello to the master with a control
 * message; the master counts the distinct hellos and reports them.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <unistd.h>

#include "fixture.h"

#define EXP_ID_MAX 120
#define EXP_MAX_REPORTS 4096 /* distinct hellos remembered */
#define EXP_REPORT_MAX 96    /* longest hello accepted */
#define EXP_STEP_MS 5

enum exp_kind { EXP_MASTER, EXP_INTERNAL, EXP_EXTERNAL };

struct exp_task {
	const struct occamy_host *host;
	enum exp_kind kind;
	char id[EXP_ID_MAX + 16]; /* master: its ID; helpers: "<master>.helper" */
	char master[EXP_ID_MAX + 1];
	int64_t deadline_ms;     /* master: end of its run; helpers: the master's */
	uint64_t ms, want;       /* master only */

	/* The master's tally, fed by task_handle. */
	pthread_mutex_t lock;    /* guards the fields below */
	char (*seen)[EXP_REPORT_MAX + 1];
	size_t nseen, internal, external;
};

/* Generated IDs and hello serials: unique per process with the pid. */
static _Atomic unsigned long exp_counter;

/* Task IDs travel in a text body, so keep them to visible ASCII. */
static int
exp_id_ok(const char *s, size_t len)
{
	size_t i;

	if (len == 0 || len > EXP_ID_MAX)
		return 0;
	for (i = 0; i < len; i++)
		if ((unsigned char)s[i] <= ' ' || (unsigned char)s[i] >= 0x7f)
			return 0;
	return 1;
}

static struct exp_task *
exp_task_alloc(const struct occamy_host *host, enum exp_kind kind, const char *master,
	       int64_t deadline_ms)
{
	struct exp_task *t;

	t = fixture_calloc(sizeof(*t));
	t->host = host;
	t->kind = kind;
	snprintf(t->master, sizeof(t->master), "%s", master);
	if (kind == EXP_MASTER)
		snprintf(t->id, sizeof(t->id), "%s", master);
	else
		snprintf(t->id, sizeof(t->id), "%s.helper", master);
	t->deadline_ms = deadline_ms;
	pthread_mutex_init(&t->lock, NULL);
	return t;
}

static enum occamy_status
exp_new_master(const struct occamy_host *host, const struct occamy_headers *headers,
	       const char *s, size_t len, void **task, char *err, size_t errlen)
{
	const struct occamy_header *h = occamy_headers_find(headers, fixture_task_id_header(host));
	char id[EXP_ID_MAX + 1];
	uint64_t ms, want = 0;
	struct exp_task *t;
	size_t i = 0;

	len = fixture_trim_end(s, len);
	if (fixture_parse_u64(s, len, &i, &ms) == -1 || ms > FIXTURE_MAX_MS ||
	    (i < len && (s[i++] != ',' || fixture_parse_u64(s, len, &i, &want) == -1)) ||
	    i != len) {
		snprintf(err, errlen, "body must be \"ms[,want]\" with ms 0..%llu",
			 (unsigned long long)FIXTURE_MAX_MS);
		return OCCAMY_ERR_INVALID_BODY;
	}
	if (h != NULL && h->kind == OCCAMY_VALUE_INT)
		snprintf(id, sizeof(id), "%lld", (long long)h->i);
	else if (h != NULL && h->kind == OCCAMY_VALUE_STRING && exp_id_ok(h->str, h->len))
		snprintf(id, sizeof(id), "%.*s", (int)h->len, h->str);
	else if (h != NULL) {
		snprintf(err, errlen, "task-id header must be 1..%d visible ASCII characters",
			 EXP_ID_MAX);
		return OCCAMY_ERR_INVALID_HEADERS;
	} else
		snprintf(id, sizeof(id), "exp-%ld-%lu-%lld", (long)getpid(),
			 atomic_fetch_add(&exp_counter, 1) + 1, (long long)fixture_wall_ms());
	t = exp_task_alloc(host, EXP_MASTER, id, fixture_wall_ms() + (int64_t)ms);
	t->ms = ms;
	t->want = want;
	if ((t->seen = calloc(EXP_MAX_REPORTS, sizeof(*t->seen))) == NULL)
		abort();
	*task = t;
	return OCCAMY_OK;
}

/* A help request: "<master-id> <deadline_ms>". */
static enum occamy_status
exp_new_external(const struct occamy_host *host, const char *s, size_t len, void **task,
		 char *err, size_t errlen)
{
	const char *sp;
	uint64_t deadline;
	size_t i;

	len = fixture_trim_end(s, len);
	sp = memchr(s, ' ', len);
	i = sp != NULL ? (size_t)(sp - s) + 1 : len;
	if (sp == NULL || !exp_id_ok(s, (size_t)(sp - s)) ||
	    fixture_parse_u64(s, len, &i, &deadline) == -1 || i != len ||
	    deadline > (uint64_t)INT64_MAX) {
		snprintf(err, errlen, "help body must be \"<master-id> <deadline_ms>\"");
		return OCCAMY_ERR_INVALID_BODY;
	}
	if ((int64_t)deadline <= fixture_wall_ms()) {
		snprintf(err, errlen, "help request expired");
		return OCCAMY_ERR_INVALID_TASK;
	}
	{
		char master[EXP_ID_MAX + 1];

		snprintf(master, sizeof(master), "%.*s", (int)(sp - s), s);
		*task = exp_task_alloc(host, EXP_EXTERNAL, master, (int64_t)deadline);
	}
	return OCCAMY_OK;
}

static enum occamy_status
exp_task_new(const struct occamy_host *host, const struct occamy_headers *headers,
	     const void *body, size_t len, int is_help, void **task, char *err,
	     size_t errlen)
{
	if (is_help)
		return exp_new_external(host, body, len, task, err, errlen);
	return exp_new_master(host, headers, body, len, task, err, errlen);
}

static enum occamy_status
exp_run_master(struct exp_task *t, const struct occamy_cancel *cancel,
	       struct occamy_output *out)
{
	const struct occamy_host *host = t->host;
	char msg[160];
	size_t k, in, ex;
	int n, done = 0;

	n = snprintf(msg, sizeof(msg), "%s %lld", t->id, (long long)t->deadline_ms);
	if (host->publish_help(host, "expander", NULL, 0, msg, (size_t)n) == -1)
		host->log(host, OCCAMY_LOG_WARNING, "%s: could not publish a help request", t->id);
	while (!done) {
		if (host->sleep_ms(cancel, EXP_STEP_MS) != 0) {
			snprintf(out->message, sizeof(out->message), "cancelled");
			return OCCAMY_ERR_INTERRUPTED;
		}
		pthread_mutex_lock(&t->lock);
		done = (t->want > 0 && t->nseen >= t->want) || fixture_wall_ms() >= t->deadline_ms;
		pthread_mutex_unlock(&t->lock);
	}
	pthread_mutex_lock(&t->lock);
	k = t->nseen;
	in = t->internal;
	ex = t->external;
	pthread_mutex_unlock(&t->lock);
	fixture_result_text(out, "reports=%zu internal=%zu external=%zu", k, in, ex);
	return OCCAMY_OK;
}

static enum occamy_status
exp_run_helper(struct exp_task *t, const struct occamy_cancel *cancel,
	       struct occamy_output *out)
{
	const struct occamy_host *host = t->host;
	char hello[EXP_REPORT_MAX];
	int n;

	n = snprintf(hello, sizeof(hello), "hello %ld %s %lu", (long)getpid(),
		     t->kind == EXP_INTERNAL ? "internal" : "external",
		     atomic_fetch_add(&exp_counter, 1) + 1);
	/* The daemon may be unable to send for a moment: keep trying. */
	while (host->publish_control(host, t->master, NULL, 0, hello, (size_t)n) == -1)
		if (host->sleep_ms(cancel, 50) != 0)
			goto cancelled;
	for (;;) {
		if (t->kind == EXP_EXTERNAL && fixture_wall_ms() >= t->deadline_ms)
			return OCCAMY_OK;
		if (host->sleep_ms(cancel, EXP_STEP_MS) != 0)
			goto cancelled;
	}
cancelled:
	snprintf(out->message, sizeof(out->message), "cancelled");
	return OCCAMY_ERR_INTERRUPTED;
}

static enum occamy_status
exp_task_run(void *task, const struct occamy_cancel *cancel, struct occamy_output *out)
{
	struct exp_task *t = task;

	if (t->kind == EXP_MASTER)
		return exp_run_master(t, cancel, out);
	return exp_run_helper(t, cancel, out);
}

/* The master expands into internal helpers; an external helper expands into
 * more externals, so a remote server can be filled from one help request.
 * Internal helpers leave expansion to their master. */
static size_t
exp_task_expand(void *task, size_t n, void **helpers)
{
	struct exp_task *t = task;
	enum exp_kind kind;
	size_t i;

	if (t->kind == EXP_INTERNAL)
		return 0;
	kind = t->kind == EXP_MASTER ? EXP_INTERNAL : EXP_EXTERNAL;
	for (i = 0; i < n; i++)
		helpers[i] = exp_task_alloc(t->host, kind, t->master, t->deadline_ms);
	return n;
}

/* "hello <pid> <internal|external> <serial>"; each distinct text counts once. */
static void
exp_task_handle(void *task, const struct occamy_headers *headers, const void *body,
		size_t len)
{
	struct exp_task *t = task;
	const char *s = body;
	int internal;
	size_t i;

	(void)headers;
	len = fixture_trim_end(s, len);
	if (t->kind != EXP_MASTER || len < 6 || len > EXP_REPORT_MAX ||
	    memcmp(s, "hello ", 6) != 0 || memchr(s, '\0', len) != NULL)
		return;
	if (memmem(s, len, " internal ", 10) != NULL)
		internal = 1;
	else if (memmem(s, len, " external ", 10) != NULL)
		internal = 0;
	else
		return;
	pthread_mutex_lock(&t->lock);
	for (i = 0; i < t->nseen; i++)
		if (strlen(t->seen[i]) == len && memcmp(t->seen[i], s, len) == 0)
			break;
	if (i == t->nseen && t->nseen < EXP_MAX_REPORTS) {
		memcpy(t->seen[t->nseen], s, len);
		t->seen[t->nseen][len] = '\0';
		t->nseen++;
		if (internal)
			t->internal++;
		else
			t->external++;
	}
	pthread_mutex_unlock(&t->lock);
}

static void
exp_task_info(const void *task, struct occamy_task_info *info)
{
	const struct exp_task *t = task;

	fixture_task_info(info, t->id, "expander",
			  t->kind == EXP_INTERNAL ? 0 : t->deadline_ms);
}

static void
exp_task_destroy(void *task)
{
	struct exp_task *t = task;

	pthread_mutex_destroy(&t->lock);
	free(t->seen);
	free(t);
}

FIXTURE_PLUGIN("expander", FIXTURE_TASK_CALLBACKS(exp),
	.task_expand = exp_task_expand,
	.task_handle = exp_task_handle);
