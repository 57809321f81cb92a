/*
 * recorder.c - test plugin: appends one line per task start, task end and
 * control message to a log file, so integration tests can replay what ran
 * where and when (scenario A: every slot taken by one master's helpers;
 * scenario B: helpers stopped to make room for a request).
 *
 * Every line goes out in a single write() on an O_APPEND descriptor, so
 * lines from many slot threads and many daemons never interleave.
 */
#include <fcntl.h>
#include <stdatomic.h>
#include <unistd.h>

#include "fixture.h"

#define REC_HELP_DEFAULT_MS 10000
#define REC_HANDLE_BODY_MAX 200 /* bytes of a control body put in the log */
#define REC_STEP_MS 5           /* helpers look at cancellation this often */

enum rec_kind { REC_MASTER, REC_HELPER, REC_EXTERNAL };

static const char *const rec_kind_names[] = {"master", "helper", "external"};

struct rec_state {
	int fd; /* the log, O_APPEND */
	unsigned handle_ms; /* each task_handle takes this long (a slow handler) */
};

struct rec_task {
	const struct occamy_host *host;
	enum rec_kind kind;
	char *id;         /* as the daemon routes it */
	char *log_id;     /* the same, blanks and controls made '_' */
	uint64_t ms;      /* master: run time; external: lifetime; helper: 0 */
	int64_t deadline_ms;
};

/* Generated task IDs: pid plus this counter are unique per host. */
static _Atomic unsigned long rec_id_counter;

static void rec_line(const struct occamy_host *host, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));

/* One line, one write(): O_APPEND makes it land whole at the end. */
static void
rec_line(const struct occamy_host *host, const char *fmt, ...)
{
	const struct rec_state *st = host->plugin_state;
	char buf[512];
	va_list ap;
	int n;

	if (st == NULL)
		return;
	va_start(ap, fmt);
	n = vsnprintf(buf, sizeof(buf) - 1, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if ((size_t)n > sizeof(buf) - 2)
		n = sizeof(buf) - 2;
	buf[n++] = '\n';
	if (write(st->fd, buf, (size_t)n) != n)
		host->log(host, OCCAMY_LOG_WARNING, "short write to the recorder log");
}

static char *
rec_log_safe(const char *s)
{
	char *c, *p;

	c = fixture_strdup(s);
	for (p = c; *p != '\0'; p++)
		if ((unsigned char)*p <= ' ' || (unsigned char)*p >= 0x7f)
			*p = '_';
	return c;
}

static int
rec_init(struct occamy_host *host, const struct occamy_option *options, size_t noptions,
	 char *err, size_t errlen)
{
	const char *path = NULL, *handle_ms = "0";
	struct rec_state *st;
	char *end;
	unsigned long v;
	size_t i;

	for (i = 0; i < noptions; i++) {
		if (strcmp(options[i].key, "log") == 0)
			path = options[i].value;
		else if (strcmp(options[i].key, "handle_ms") == 0)
			handle_ms = options[i].value;
		else
			return fixture_option_unknown(err, errlen, options[i].key,
						      "log, handle_ms");
	}
	errno = 0;
	v = strtoul(handle_ms, &end, 10);
	if (errno != 0 || end == handle_ms || *end != '\0' || v > 60000) {
		snprintf(err, errlen, "option 'handle_ms' must be 0..60000");
		return -1;
	}
	if (path == NULL || path[0] == '\0') {
		snprintf(err, errlen, "option 'log = PATH' is required");
		return -1;
	}
	st = fixture_calloc(sizeof(*st));
	st->handle_ms = (unsigned)v;
	st->fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
	if (st->fd == -1) {
		snprintf(err, errlen, "cannot open log '%s': %s", path, strerror(errno));
		free(st);
		return -1;
	}
	host->plugin_state = st;
	return 0;
}

static void
rec_fini(const struct occamy_host *host)
{
	struct rec_state *st = host->plugin_state;

	if (st == NULL)
		return;
	close(st->fd);
	free(st);
}

static struct rec_task *
rec_task_alloc(const struct occamy_host *host, enum rec_kind kind, const char *id,
	       uint64_t ms)
{
	struct rec_task *t;

	t = fixture_calloc(sizeof(*t));
	t->host = host;
	t->kind = kind;
	t->id = fixture_strdup(id);
	t->log_id = rec_log_safe(id);
	t->ms = ms;
	if (kind != REC_HELPER)
		t->deadline_ms = fixture_wall_ms() + (int64_t)ms;
	return t;
}

/* "ms[,id]": digits, then optionally a comma and an ID (help requests may
 * name themselves so tests can tell externals apart). */
static int
rec_parse_body(const char *s, size_t len, uint64_t dflt, uint64_t *ms, const char **id,
	       size_t *idlen)
{
	size_t i = 0;
	uint64_t v;

	len = fixture_trim_end(s, len);
	while (i < len && (s[i] == ' ' || s[i] == '\t'))
		i++;
	*id = NULL;
	*idlen = 0;
	if (i == len) {
		*ms = dflt;
		return 0;
	}
	if (fixture_parse_u64(s, len, &i, &v) == -1 || v > FIXTURE_MAX_MS)
		return -1;
	*ms = v;
	if (i < len && s[i] == ',') {
		*id = s + i + 1;
		*idlen = len - i - 1;
		if (*idlen == 0 || *idlen > FIXTURE_ID_MAX || memchr(*id, '\0', *idlen) != NULL)
			return -1;
		return 0;
	}
	return i == len ? 0 : -1;
}

static enum occamy_status
rec_task_new(const struct occamy_host *host, const struct occamy_headers *headers,
	     const void *body, size_t len, int is_help, void **task, char *err,
	     size_t errlen)
{
	char idbuf[FIXTURE_ID_MAX + 1], *hid;
	const char *bid;
	size_t bidlen;
	uint64_t ms;

	if (rec_parse_body(body, len, is_help ? REC_HELP_DEFAULT_MS : 0, &ms, &bid,
			   &bidlen) == -1 ||
	    (bid != NULL && !is_help)) {
		snprintf(err, errlen, "body must be \"ms\" (0..%llu)%s",
			 (unsigned long long)FIXTURE_MAX_MS,
			 is_help ? " or \"ms,id\" for a help request" : "");
		return OCCAMY_ERR_INVALID_BODY;
	}
	if (fixture_task_id(host, headers, &hid) == -1)
		return fixture_bad_task_id(err, errlen);
	if (hid != NULL)
		snprintf(idbuf, sizeof(idbuf), "%s", hid);
	else if (bid != NULL)
		snprintf(idbuf, sizeof(idbuf), "%.*s", (int)bidlen, bid);
	else
		snprintf(idbuf, sizeof(idbuf), "rec-%ld-%lu", (long)getpid(),
			 atomic_fetch_add(&rec_id_counter, 1) + 1);
	free(hid);
	*task = rec_task_alloc(host, is_help ? REC_EXTERNAL : REC_MASTER, idbuf, ms);
	return OCCAMY_OK;
}

static enum occamy_status
rec_task_run(void *task, const struct occamy_cancel *cancel, struct occamy_output *out)
{
	struct rec_task *t = task;
	const struct occamy_host *host = t->host;
	const char *kind = rec_kind_names[t->kind];
	uint64_t left = t->ms;
	int cancelled = 0;

	rec_line(host, "%llu start %s %s %ld", (unsigned long long)fixture_now_ns(), kind,
		 t->log_id, (long)getpid());
	if (t->kind == REC_HELPER) {
		/* No deadline: only the daemon stops a helper. */
		while (!(cancelled = host->sleep_ms(cancel, REC_STEP_MS)))
			;
	} else {
		while (left > 0 && !cancelled) {
			uint64_t step = left < REC_STEP_MS ? left : REC_STEP_MS;
			cancelled = host->sleep_ms(cancel, step);
			left -= step;
		}
	}
	rec_line(host, "%llu end %s %s %ld", (unsigned long long)fixture_now_ns(), kind,
		 t->log_id, (long)getpid());
	if (cancelled) {
		snprintf(out->message, sizeof(out->message), "cancelled");
		return OCCAMY_ERR_INTERRUPTED;
	}
	if (t->kind == REC_MASTER) {
		fixture_result_text(out, "ran %llu", (unsigned long long)t->ms);
	}
	return OCCAMY_OK;
}

/* Only masters expand.  Helpers share the master's task ID, so a control
 * message to that ID reaches (and is logged by) all of them. */
static size_t
rec_task_expand(void *task, size_t n, void **helpers)
{
	struct rec_task *t = task;
	size_t i;

	if (t->kind != REC_MASTER)
		return 0;
	for (i = 0; i < n; i++)
		helpers[i] = rec_task_alloc(t->host, REC_HELPER, t->id, 0);
	return n;
}

static void
rec_task_handle(void *task, const struct occamy_headers *headers, const void *body,
		size_t len)
{
	struct rec_task *t = task;
	const struct rec_state *st = t->host->plugin_state;
	char safe[REC_HANDLE_BODY_MAX + 1];
	const unsigned char *b = body;
	size_t i;

	(void)headers;
	if (len > REC_HANDLE_BODY_MAX)
		len = REC_HANDLE_BODY_MAX;
	for (i = 0; i < len; i++)
		safe[i] = (b[i] >= ' ' && b[i] < 0x7f) ? (char)b[i] : '.';
	safe[len] = '\0';
	rec_line(t->host, "%llu handle %s %ld %s", (unsigned long long)fixture_now_ns(),
		 t->log_id, (long)getpid(), safe);
	if (st->handle_ms > 0)
		fixture_nap_ms(st->handle_ms);
}

static void
rec_task_info(const void *task, struct occamy_task_info *info)
{
	const struct rec_task *t = task;

	fixture_task_info(info, t->id, "recorder", t->deadline_ms);
}

static void
rec_task_destroy(void *task)
{
	struct rec_task *t = task;

	free(t->id);
	free(t->log_id);
	free(t);
}

FIXTURE_PLUGIN("recorder", FIXTURE_TASK_CALLBACKS(rec),
	.init = rec_init,
	.fini = rec_fini,
	.task_expand = rec_task_expand,
	.task_handle = rec_task_handle);
