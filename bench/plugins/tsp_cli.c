/*
 * tsp_cli.c - run the tsp plugin once, single-threaded, outside occamyd:
 * the optimiser the Celery side of bench/bench_bursty.py calls, so that
 * both systems run exactly the same code for the same budget.
 *
 *     tsp_cli PATH/tsp.so < request.json > result.json
 *
 * It dlopen()s the plugin the daemon loads (build/plugins/tsp.so) and
 * drives it through a minimal host: task_new (a request, not a help
 * request) with the JSON body from stdin, then task_run on this thread;
 * nothing is ever cancelled, nothing is published (the plugin's option
 * help = no, so the master publishes no help request and gets no
 * assistant).  The plugin's result JSON goes to stdout; exit 0 on OK.
 *
 * Not built by make; bench/bench_bursty.py compiles it with
 *     cc -std=c11 -D_GNU_SOURCE -Iinclude -O2 -pthread tsp_cli.c -ldl
 */
#include <dlfcn.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <occamy/plugin.h>

static void cli_log(const struct occamy_host *host, enum occamy_log_level level,
		    const char *fmt, ...) __attribute__((format(printf, 3, 4)));

static void
cli_log(const struct occamy_host *host, enum occamy_log_level level, const char *fmt, ...)
{
	va_list ap;

	(void)host;
	if (level > OCCAMY_LOG_WARNING)
		return;
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
}

static int
cli_cancelled(const struct occamy_cancel *c)
{
	(void)c;
	return 0;
}

static int
cli_sleep_ms(const struct occamy_cancel *c, uint64_t ms)
{
	struct timespec ts = {(time_t)(ms / 1000), (long)(ms % 1000) * 1000000L};

	(void)c;
	nanosleep(&ts, NULL);
	return 0;
}

static int
cli_publish(const struct occamy_host *host, const char *to, const struct occamy_kv *headers,
	    size_t nheaders, const void *body, size_t len)
{
	(void)host, (void)to, (void)headers, (void)nheaders, (void)body, (void)len;
	return -1; /* nobody to talk to */
}

int
main(int argc, char **argv)
{
	static struct occamy_host host = {
		.abi_major = OCCAMY_ABI_MAJOR,
		.abi_minor = OCCAMY_ABI_MINOR,
		.size = sizeof(struct occamy_host),
		.log = cli_log,
		.cancelled = cli_cancelled,
		.sleep_ms = cli_sleep_ms,
		.publish_request = cli_publish,
		.publish_control = cli_publish,
		.publish_help = cli_publish,
		.header_task_id = "task-id",
		.header_handler = "handler",
	};
	const struct occamy_option opts[] = {{"help", "no"}};
	const struct occamy_plugin *p;
	struct occamy_output out;
	struct occamy_headers none = {NULL, 0};
	enum occamy_status st;
	char err[512] = "", *body = NULL;
	size_t len = 0, cap = 0, n;
	void *dl, *task = NULL;

	if (argc != 2) {
		fprintf(stderr, "usage: tsp_cli PATH/tsp.so < request.json\n");
		return 2;
	}
	if ((dl = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL)) == NULL) {
		fprintf(stderr, "tsp_cli: %s\n", dlerror());
		return 1;
	}
	if ((p = dlsym(dl, OCCAMY_PLUGIN_SYMBOL)) == NULL || p->abi_major != OCCAMY_ABI_MAJOR) {
		fprintf(stderr, "tsp_cli: %s is not an occamy plugin of ABI %d\n", argv[1],
			OCCAMY_ABI_MAJOR);
		return 1;
	}
	for (;;) {
		if (cap - len < 65536) {
			cap = cap ? 2 * cap : 1 << 20;
			if ((body = realloc(body, cap)) == NULL)
				abort();
		}
		if ((n = fread(body + len, 1, cap - len, stdin)) == 0)
			break;
		len += n;
	}
	if (p->init != NULL && p->init(&host, opts, 1, err, sizeof(err)) != 0) {
		fprintf(stderr, "tsp_cli: init: %s\n", err);
		return 1;
	}
	if ((st = p->task_new(&host, &none, body, len, 0, &task, err, sizeof(err))) != OCCAMY_OK) {
		fprintf(stderr, "tsp_cli: task_new (%d): %s\n", (int)st, err);
		return 1;
	}
	memset(&out, 0, sizeof(out));
	/* The cancel token is opaque and never looked into by our host. */
	st = p->task_run(task, (const struct occamy_cancel *)&host, &out);
	if (st != OCCAMY_OK) {
		fprintf(stderr, "tsp_cli: task_run (%d): %s\n", (int)st, out.message);
		return 1;
	}
	fwrite(out.body, 1, out.len, stdout);
	fputc('\n', stdout);
	free(out.body);
	p->task_destroy(task);
	if (p->fini != NULL)
		p->fini(&host);
	free(body);
	return 0;
}
