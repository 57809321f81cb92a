/*
 * loader_impl.h - private to loader.c and router.c: a loaded plugin
 * instance, a set of them, the router, and the few calls between the two
 * files.  r->mu guards the installed set, the list of every instance not
 * yet freed, the header names and the publisher (see loader.c for the
 * instances' lifetimes).
 */
#ifndef OCCAMY_LOADER_IMPL_H
#define OCCAMY_LOADER_IMPL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <sys/stat.h>

#include "config.h"
#include "loader.h"

struct plugin {
	struct occamy_host host;      /* first: host pointers lead back here */
	struct router *router;
	const struct occamy_plugin *desc;
	void *dl;
	char *name;                   /* the [plugin NAME] */
	char *path;
	char *header_task_id;         /* handed to the plugin in its host */
	char *header_handler;
	struct plugin_option *options; /* as given to init, to tell a change */
	size_t noptions;
	struct stat file;             /* what was dlopen()ed, to tell a new file */
	atomic_uint refs;
	bool initialised;
	bool retired;                 /* refs reached 0; r->mu */
	struct plugin *next;          /* r->plugins; r->mu */
	/* Its tasks' ops: expand and handle only where the plugin has them,
	 * so the scheduler does not offer room to tasks that cannot use it. */
	struct task_ops task_ops;
};

struct plugin_set {
	struct router *router;
	struct plugin **plugins;
	size_t n;
};

struct router {
	pthread_mutex_t mu;
	struct plugin_set *set;
	char *header_handler;
	char *default_handler;
	publish_fn publish;
	void *publish_ctx;
	struct plugin *plugins;       /* every instance not yet freed */
	atomic_uint live_plugins;
};

struct plugin_task {
	struct task base;
	struct plugin *p;
	void *impl;
};

/* router.c: fill p->host (the host API table, with copies of cfg's header
 * names) before the plugin's init runs, and p->task_ops after. */
void plugin_host_init(struct plugin *p, const struct config *cfg);
void plugin_task_ops_init(struct plugin *p);

/* loader.c: drop a reference; any thread.  The last one leaves the
 * instance for router_reap(). */
void plugin_unref(struct plugin *p);

#endif /* OCCAMY_LOADER_IMPL_H */
