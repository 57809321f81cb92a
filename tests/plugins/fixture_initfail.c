/*
 * fixture_initfail.c - a plugin whose init refuses its options unless
 * `ok = yes` is given, with a message the loader must pass on.  Counts
 * init/fini through the environment-free way tests can see: a file named
 * by the `trace` option gets "init\n" and "fini\n" lines, or "init
 * off-main\n" and "fini off-main\n" when they run on a thread other than
 * the process's main one (which plugin.h promises they never do).
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <occamy/plugin.h>

struct state {
	char trace[256];
};

static void
trace(const struct state *s, const char *what)
{
	char line[32];
	int fd;

	if (s->trace[0] == '\0')
		return;
	/* The main thread's id is the process id. */
	if (syscall(SYS_gettid) != getpid()) {
		snprintf(line, sizeof(line), "%.4s off-main\n", what);
		what = line;
	}
	fd = open(s->trace, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
	if (fd >= 0) {
		(void)!write(fd, what, strlen(what));
		close(fd);
	}
}

static int
fx_init(struct occamy_host *host, const struct occamy_option *opt, size_t n, char *err,
	size_t errlen)
{
	struct state *s = calloc(1, sizeof(*s));
	int ok = 0;
	size_t i;

	if (s == NULL)
		abort();
	for (i = 0; i < n; i++) {
		if (strcmp(opt[i].key, "ok") == 0)
			ok = strcmp(opt[i].value, "yes") == 0;
		else if (strcmp(opt[i].key, "trace") == 0)
			snprintf(s->trace, sizeof(s->trace), "%s", opt[i].value);
	}
	if (!ok) {
		snprintf(err, errlen, "option ok must be yes");
		free(s);
		return -1;
	}
	host->plugin_state = s;
	trace(s, "init\n");
	return 0;
}

static void
fx_fini(const struct occamy_host *host)
{
	struct state *s = host->plugin_state;

	trace(s, "fini\n");
	free(s);
}

static enum occamy_status
fx_new(const struct occamy_host *h, const struct occamy_headers *hd, const void *b, size_t l,
       int help, void **t, char *e, size_t el)
{
	(void)h; (void)hd; (void)b; (void)l; (void)help; (void)e; (void)el;
	*t = malloc(1);
	return *t ? OCCAMY_OK : OCCAMY_ERR_INTERNAL;
}

static enum occamy_status
fx_run(void *t, const struct occamy_cancel *c, struct occamy_output *o)
{
	(void)t; (void)c; (void)o;
	return OCCAMY_OK;
}

static void
fx_info(const void *t, struct occamy_task_info *i)
{
	(void)t;
	i->group = "fixture";
}

static void
fx_destroy(void *t)
{
	free(t);
}

const struct occamy_plugin occamy_plugin = {
	OCCAMY_PLUGIN_HEADER,
	.name = "fixture_initfail",
	.version = "1",
	.init = fx_init,
	.fini = fx_fini,
	.task_new = fx_new,
	.task_run = fx_run,
	.task_info = fx_info,
	.task_destroy = fx_destroy,
};
