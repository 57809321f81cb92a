/*
 * spin.c - test plugin: burns CPU until its time is up or it is cancelled,
 * polling cancellation only every poll_ms of spinning, so benchmarks can
 * model plugins that notice cancellation late.  Masters expand into helpers
 * that spin until cancelled: the easy way to fill every slot.
 */
#include <stdatomic.h>

#include "fixture.h"

#define SPIN_MAX_POLL_MS 60000ULL

enum spin_kind { SPIN_MASTER, SPIN_HELPER, SPIN_EXTERNAL };

static const char *const spin_kind_names[] = {"master", "helper", "external"};

struct spin_conf {
	int expand; /* option expand = yes|no */
};

struct spin_task {
	const struct occamy_host *host;
	enum spin_kind kind;
	char *id;
	uint64_t ms;      /* how long to spin; 0 = until cancelled */
	uint64_t poll_ms; /* spin this long between looks at cancellation */
	int64_t deadline_ms;
};

/* Sink for the busy loop so the compiler cannot drop it.  Relaxed: nobody
 * reads it, it only has to exist. */
static _Atomic uint64_t spin_sink;

/* Body "ms[,poll_ms]", blanks around it allowed. */
static int
spin_parse_body(const char *s, size_t len, uint64_t *ms, uint64_t *poll_ms)
{
	size_t i = 0;

	len = fixture_trim_end(s, len);
	while (i < len && (s[i] == ' ' || s[i] == '\t'))
		i++;
	*poll_ms = 1;
	if (fixture_parse_u64(s, len, &i, ms) == -1 || *ms > FIXTURE_MAX_MS)
		return -1;
	if (i < len && s[i] == ',') {
		i++;
		if (fixture_parse_u64(s, len, &i, poll_ms) == -1 || *poll_ms == 0 ||
		    *poll_ms > SPIN_MAX_POLL_MS)
			return -1;
	}
	return i == len ? 0 : -1;
}

static int
spin_init(struct occamy_host *host, const struct occamy_option *options, size_t noptions,
	  char *err, size_t errlen)
{
	struct spin_conf *conf;
	size_t i;

	conf = fixture_calloc(sizeof(*conf));
	conf->expand = 1;
	for (i = 0; i < noptions; i++) {
		if (strcmp(options[i].key, "expand") != 0) {
			free(conf);
			return fixture_option_unknown(err, errlen, options[i].key, "expand");
		}
		if (strcmp(options[i].value, "yes") == 0)
			conf->expand = 1;
		else if (strcmp(options[i].value, "no") == 0)
			conf->expand = 0;
		else {
			snprintf(err, errlen, "expand must be yes or no, not '%s'", options[i].value);
			free(conf);
			return -1;
		}
	}
	host->plugin_state = conf;
	return 0;
}

static void
spin_fini(const struct occamy_host *host)
{
	free(host->plugin_state);
}

static struct spin_task *
spin_task_alloc(const struct occamy_host *host, enum spin_kind kind, const char *id,
		uint64_t ms, uint64_t poll_ms)
{
	struct spin_task *t;

	t = fixture_calloc(sizeof(*t));
	t->host = host;
	t->kind = kind;
	if (id != NULL)
		t->id = fixture_strdup(id);
	t->ms = ms;
	t->poll_ms = poll_ms;
	t->deadline_ms = ms > 0 ? fixture_wall_ms() + (int64_t)ms : 0;
	return t;
}

static enum occamy_status
spin_task_new(const struct occamy_host *host, const struct occamy_headers *headers,
	      const void *body, size_t len, int is_help, void **task, char *err,
	      size_t errlen)
{
	uint64_t ms, poll_ms;
	char *id;

	if (spin_parse_body(body, len, &ms, &poll_ms) == -1) {
		snprintf(err, errlen,
			 "body must be \"ms[,poll_ms]\": ms 0..%llu (0 = until cancelled), "
			 "poll_ms 1..%llu",
			 (unsigned long long)FIXTURE_MAX_MS, (unsigned long long)SPIN_MAX_POLL_MS);
		return OCCAMY_ERR_INVALID_BODY;
	}
	if (fixture_task_id(host, headers, &id) == -1)
		return fixture_bad_task_id(err, errlen);
	*task = spin_task_alloc(host, is_help ? SPIN_EXTERNAL : SPIN_MASTER, id, ms, poll_ms);
	free(id);
	return OCCAMY_OK;
}

static enum occamy_status
spin_task_run(void *task, const struct occamy_cancel *cancel, struct occamy_output *out)
{
	struct spin_task *t = task;
	uint64_t start = fixture_now_ns(), now = start, last_poll = start;
	uint64_t poll_ns = t->poll_ms * 1000000u;
	uint64_t end = t->ms > 0 ? start + t->ms * 1000000u : UINT64_MAX;
	uint64_t x = start, k;

	for (;;) {
		/* About a microsecond of work between clock reads. */
		for (k = 0; k < 256; k++)
			x = x * 6364136223846793005ULL + 1442695040888963407ULL;
		atomic_store_explicit(&spin_sink, x, memory_order_relaxed);
		now = fixture_now_ns();
		if (now >= end)
			break;
		if (now - last_poll < poll_ns)
			continue;
		if (t->host->cancelled(cancel)) {
			/* The cancel came at most one poll interval ago. */
			t->host->log(t->host, OCCAMY_LOG_DEBUG,
				     "%s %s noticed cancellation; at most %llu ns late",
				     spin_kind_names[t->kind], t->id != NULL ? t->id : "-",
				     (unsigned long long)(now - last_poll));
			snprintf(out->message, sizeof(out->message), "cancelled");
			return OCCAMY_ERR_INTERRUPTED;
		}
		last_poll = now;
	}
	if (t->kind != SPIN_MASTER)
		return OCCAMY_OK; /* helpers record nothing */
	fixture_result_text(out, "spun %llu", (unsigned long long)t->ms);
	return OCCAMY_OK;
}

/* Only masters expand: helpers that spin until cancelled, polling as often
 * as the master does. */
static size_t
spin_task_expand(void *task, size_t n, void **helpers)
{
	struct spin_task *t = task;
	const struct spin_conf *conf = t->host->plugin_state;
	size_t i;

	if (t->kind != SPIN_MASTER || (conf != NULL && !conf->expand))
		return 0;
	for (i = 0; i < n; i++)
		helpers[i] = spin_task_alloc(t->host, SPIN_HELPER, t->id, 0, t->poll_ms);
	return n;
}

static void
spin_task_info(const void *task, struct occamy_task_info *info)
{
	const struct spin_task *t = task;

	fixture_task_info(info, t->id, "spin", t->deadline_ms);
}

FIXTURE_TASK_DESTROY_ID(spin, struct spin_task)

FIXTURE_PLUGIN("spin", FIXTURE_TASK_CALLBACKS(spin),
	.init = spin_init,
	.fini = spin_fini,
	.task_expand = spin_task_expand);
