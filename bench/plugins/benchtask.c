/*
 * benchtask.c - a plugin for the scheduling benchmarks (bench/bench_*.py).
 * Not built by make: each benchmark compiles it into a private directory
 *
 *     cc -std=c11 -D_GNU_SOURCE -Iinclude -O2 -fPIC -shared -pthread \
 *        bench/plugins/benchtask.c -o DIR/benchtask.so
 *
 * Requests (protected tasks), body one of:
 *
 *     sleep MS    sleep MS milliseconds (host->sleep_ms)
 *     cpu MS      burn MS milliseconds of this thread's CPU time
 *     work N      a fixed amount of CPU work: N x 2^20 LCG steps
 *
 * The very first thing task_run does is read CLOCK_MONOTONIC: that is the
 * "first instruction" of the task.  The result (text/plain) is
 *
 *     start=<ns> end=<ns> cpu=<ns> pid=<pid>
 *
 * start and end CLOCK_MONOTONIC (comparable with Python's
 * time.monotonic_ns()), cpu the thread CPU time task_run used.  With the
 * option `log = PATH` every task start also appends a line
 * "<ns> start <kind> <id> <pid>" (one write(), O_APPEND), like the recorder.
 *
 * Help requests (externals), body "help ID POLL_MS [LINGER_MS]": a helper
 * with task ID `ID` that burns CPU and looks at cancellation only every
 * POLL_MS of wall time (a lazy plugin), then lingers LINGER_MS (default 0)
 * ignoring it.  A control message "stop" to its ID ends it at once (OK):
 * the benchmark's way to take helpers away between measurements.
 *
 * Nothing expands: the helpers a benchmark wants are exactly the help
 * requests it publishes.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <occamy/plugin.h>

#define BT_ID_MAX 200

enum bt_mode { BT_SLEEP, BT_CPU, BT_WORK, BT_HELP };

struct bt_state {
	int fd; /* -1 without `log` */
};

struct bt_task {
	const struct occamy_host *host;
	enum bt_mode mode;
	char *id;
	uint64_t arg;       /* ms, or N for work, or poll ms for help */
	uint64_t linger_ms; /* help only */
	atomic_bool stop;
};

static _Atomic uint64_t bt_sink;
static _Atomic unsigned long bt_serial;

static uint64_t
bt_clock(clockid_t c)
{
	struct timespec ts;

	clock_gettime(c, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void
bt_log(const struct occamy_host *host, uint64_t ns, const char *kind, const char *id)
{
	const struct bt_state *st = host->plugin_state;
	char buf[320];
	int n;

	if (st == NULL || st->fd < 0)
		return;
	n = snprintf(buf, sizeof(buf), "%llu start %s %s %ld\n", (unsigned long long)ns, kind,
		     id, (long)getpid());
	if (n > 0 && (size_t)n < sizeof(buf) && write(st->fd, buf, (size_t)n) != n)
		host->log(host, OCCAMY_LOG_WARNING, "short write to the log");
}

static int
bt_init(struct occamy_host *host, const struct occamy_option *options, size_t noptions,
	char *err, size_t errlen)
{
	struct bt_state *st = calloc(1, sizeof(*st));
	size_t i;

	if (st == NULL)
		abort();
	st->fd = -1;
	for (i = 0; i < noptions; i++) {
		if (strcmp(options[i].key, "log") != 0) {
			snprintf(err, errlen, "unknown option '%s' (known: log)", options[i].key);
			free(st);
			return -1;
		}
		st->fd = open(options[i].value, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
		if (st->fd < 0) {
			snprintf(err, errlen, "cannot open '%s': %s", options[i].value,
				 strerror(errno));
			free(st);
			return -1;
		}
	}
	host->plugin_state = st;
	return 0;
}

static void
bt_fini(const struct occamy_host *host)
{
	struct bt_state *st = host->plugin_state;

	if (st != NULL && st->fd >= 0)
		close(st->fd);
	free(st);
}

/* "word n [m [k]]" -> up to 3 numbers; returns how many, -1 if malformed. */
static int
bt_numbers(const char *s, size_t len, size_t i, uint64_t *v, int max)
{
	int k = 0;

	for (;;) {
		size_t digits = 0;
		uint64_t x = 0;

		while (i < len && (s[i] == ' ' || s[i] == '\t' || s[i] == '\n' || s[i] == '\r'))
			i++;
		if (i == len)
			return k;
		if (k == max)
			return -1;
		for (; i < len && s[i] >= '0' && s[i] <= '9'; i++) {
			if (++digits > 18)
				return -1;
			x = x * 10 + (uint64_t)(s[i] - '0');
		}
		if (digits == 0)
			return -1;
		v[k++] = x;
	}
}

static enum occamy_status
bt_task_new(const struct occamy_host *host, const struct occamy_headers *headers,
	    const void *body, size_t len, int is_help, void **task, char *err, size_t errlen)
{
	const char *s = body;
	struct bt_task *t;
	uint64_t v[3] = {0, 0, 0};
	char idbuf[BT_ID_MAX + 1];
	size_t w = 0;
	int n;

	while (w < len && s[w] != ' ')
		w++;
	if ((t = calloc(1, sizeof(*t))) == NULL)
		abort();
	t->host = host;
	atomic_init(&t->stop, 0);
	if (is_help) {
		size_t i = w + 1, j;
		if (w != 4 || memcmp(s, "help", 4) != 0 || i >= len)
			goto bad;
		for (j = i; j < len && s[j] > ' ' && s[j] < 0x7f; j++)
			;
		if (j == i || j - i > BT_ID_MAX)
			goto bad;
		snprintf(idbuf, sizeof(idbuf), "%.*s", (int)(j - i), s + i);
		n = bt_numbers(s, len, j, v, 2);
		if (n < 1 || v[0] == 0)
			goto bad;
		t->mode = BT_HELP;
		t->arg = v[0];
		t->linger_ms = n > 1 ? v[1] : 0;
	} else {
		const struct occamy_header *h = occamy_headers_find(headers, "task-id");
		if (w == 5 && memcmp(s, "sleep", 5) == 0)
			t->mode = BT_SLEEP;
		else if (w == 3 && memcmp(s, "cpu", 3) == 0)
			t->mode = BT_CPU;
		else if (w == 4 && memcmp(s, "work", 4) == 0)
			t->mode = BT_WORK;
		else
			goto bad;
		if (bt_numbers(s, len, w, v, 1) != 1)
			goto bad;
		t->arg = v[0];
		if (h != NULL && h->kind == OCCAMY_VALUE_STRING && h->len > 0 && h->len <= BT_ID_MAX &&
		    memchr(h->str, '\0', h->len) == NULL)
			snprintf(idbuf, sizeof(idbuf), "%.*s", (int)h->len, h->str);
		else if (h != NULL && h->kind == OCCAMY_VALUE_INT)
			snprintf(idbuf, sizeof(idbuf), "%lld", (long long)h->i);
		else
			snprintf(idbuf, sizeof(idbuf), "bt-%ld-%lu", (long)getpid(),
				 atomic_fetch_add(&bt_serial, 1) + 1);
	}
	if ((t->id = strdup(idbuf)) == NULL)
		abort();
	*task = t;
	return OCCAMY_OK;
bad:
	free(t);
	snprintf(err, errlen, "body must be \"sleep MS\", \"cpu MS\", \"work N\" "
		 "(requests) or \"help ID POLL_MS [LINGER_MS]\" (help requests)");
	return OCCAMY_ERR_INVALID_BODY;
}

static uint64_t
bt_burn(uint64_t x, unsigned steps)
{
	unsigned k;

	for (k = 0; k < steps; k++)
		x = x * 6364136223846793005ULL + 1442695040888963407ULL;
	atomic_store_explicit(&bt_sink, x, memory_order_relaxed);
	return x;
}

static void
bt_nap(uint64_t ms)
{
	struct timespec left = {(time_t)(ms / 1000), (long)(ms % 1000) * 1000000L};

	while (nanosleep(&left, &left) == -1 && errno == EINTR)
		;
}

static enum occamy_status
bt_task_run(void *task, const struct occamy_cancel *cancel, struct occamy_output *out)
{
	uint64_t start = bt_clock(CLOCK_MONOTONIC); /* the first instruction */
	uint64_t cpu0 = bt_clock(CLOCK_THREAD_CPUTIME_ID), end, x = start, i;
	struct bt_task *t = task;
	char msg[160];
	int n;

	bt_log(t->host, start, t->mode == BT_HELP ? "external" : "master", t->id);
	switch (t->mode) {
	case BT_SLEEP:
		if (t->host->sleep_ms(cancel, t->arg))
			goto cancelled;
		break;
	case BT_CPU: {
		uint64_t until = cpu0 + t->arg * 1000000u;
		while (bt_clock(CLOCK_THREAD_CPUTIME_ID) < until)
			x = bt_burn(x, 256);
		break;
	}
	case BT_WORK:
		for (i = 0; i < t->arg; i++)
			x = bt_burn(x, 1u << 20);
		break;
	case BT_HELP: {
		uint64_t poll_ns = t->arg * 1000000u, last = start, now;
		for (;;) {
			x = bt_burn(x, 256);
			if (atomic_load_explicit(&t->stop, memory_order_relaxed))
				return OCCAMY_OK;
			now = bt_clock(CLOCK_MONOTONIC);
			if (now - last < poll_ns)
				continue;
			last = now;
			if (t->host->cancelled(cancel)) {
				if (t->linger_ms)
					bt_nap(t->linger_ms);
				goto cancelled;
			}
		}
	}
	}
	end = bt_clock(CLOCK_MONOTONIC);
	n = snprintf(msg, sizeof(msg), "start=%llu end=%llu cpu=%llu pid=%ld",
		     (unsigned long long)start, (unsigned long long)end,
		     (unsigned long long)(bt_clock(CLOCK_THREAD_CPUTIME_ID) - cpu0),
		     (long)getpid());
	if ((out->body = malloc((size_t)n)) == NULL)
		abort();
	memcpy(out->body, msg, (size_t)n);
	out->len = (size_t)n;
	snprintf(out->content_type, sizeof(out->content_type), "text/plain");
	return OCCAMY_OK;
cancelled:
	snprintf(out->message, sizeof(out->message), "cancelled");
	return OCCAMY_ERR_INTERRUPTED;
}

static void
bt_task_handle(void *task, const struct occamy_headers *headers, const void *body, size_t len)
{
	struct bt_task *t = task;

	(void)headers;
	if (len == 4 && memcmp(body, "stop", 4) == 0)
		atomic_store(&t->stop, 1);
}

static void
bt_task_info(const void *task, struct occamy_task_info *info)
{
	const struct bt_task *t = task;

	info->id = t->id;
	info->group = t->mode == BT_HELP ? "benchhelp" : "benchtask";
	info->deadline_ms = 0;
	info->priority = 0;
}

static void
bt_task_destroy(void *task)
{
	struct bt_task *t = task;

	free(t->id);
	free(t);
}

const struct occamy_plugin occamy_plugin = {
	OCCAMY_PLUGIN_HEADER,
	.name = "benchtask",
	.version = "1.0",
	.init = bt_init,
	.fini = bt_fini,
	.task_new = bt_task_new,
	.task_run = bt_task_run,
	.task_handle = bt_task_handle,
	.task_info = bt_task_info,
	.task_destroy = bt_task_destroy,
};
