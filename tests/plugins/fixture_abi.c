/*
 * fixture_abi.c - a plugin built for a future ABI major version: the loader
 * must refuse it before running any of its code.
 */
#include <stdlib.h>

#include <occamy/plugin.h>

static enum occamy_status
never_new(const struct occamy_host *h, const struct occamy_headers *hd, const void *b,
	  size_t l, int help, void **t, char *e, size_t el)
{
	(void)h; (void)hd; (void)b; (void)l; (void)help; (void)t; (void)e; (void)el;
	abort(); /* must never run */
}

static enum occamy_status
never_run(void *t, const struct occamy_cancel *c, struct occamy_output *o)
{
	(void)t; (void)c; (void)o;
	abort();
}

static void
never_info(const void *t, struct occamy_task_info *i)
{
	(void)t; (void)i;
	abort();
}

static void
never_destroy(void *t)
{
	(void)t;
	abort();
}

const struct occamy_plugin occamy_plugin = {
	.abi_major = OCCAMY_ABI_MAJOR + 98,
	.abi_minor = 0,
	.size = sizeof(struct occamy_plugin),
	.name = "fixture_abi",
	.version = "0",
	.task_new = never_new,
	.task_run = never_run,
	.task_info = never_info,
	.task_destroy = never_destroy,
};
