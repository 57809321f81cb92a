/*
 * loader.h - loading task plugins (dlopen, ABI and ownership checks), the
 * host API handed to them, and the router that turns a message into a task
 * of the plugin its handler header names.
 */
#ifndef OCCAMY_LOADER_H
#define OCCAMY_LOADER_H

#include <stdbool.h>
#include <stddef.h>

#include <occamy/plugin.h>

#include "scheduler.h"

struct config;
struct plugin_set;
struct router;

/* How plugins' publishes leave the daemon (the transport, or a fake). */
enum publish_target { TARGET_REQUEST, TARGET_CONTROL, TARGET_HELP };
typedef int (*publish_fn)(void *ctx, enum publish_target target, const char *name,
			  const struct occamy_kv *headers, size_t nheaders,
			  const void *body, size_t len);

/*
 * Threads: router_task_source's callbacks and the tasks they make run on
 * any thread; every other function here is for the main thread only, which
 * is where plugins' init and fini therefore run.
 */
struct router *router_new(const struct config *cfg);
/* Set once the transport exists; until then plugin publishes fail (-1). */
void router_set_publisher(struct router *r, publish_fn fn, void *ctx);
/* The scheduler's view of the router. */
struct task_source router_task_source(struct router *r);

/* Load every [plugin NAME] of cfg.  An installed instance whose section,
 * file and header names are unchanged is kept, not initialised again; one
 * whose file was replaced on disk is kept too, with a warning (the dynamic
 * linker would hand back the loaded copy).  On failure returns NULL and
 * appends one line per problem to err ("plugin NAME (FILE): reason"). */
struct plugin_set *plugin_set_load(struct router *r, const struct config *cfg,
				   char *err, size_t errlen);
/* Make set the one new requests are routed to; the previous set is released:
 * its plugins unload when their last task is destroyed (see router_reap). */
void router_install(struct router *r, struct plugin_set *set,
		    const struct config *cfg);
/* Finalise and unload every plugin instance whose last reference is gone.
 * Those references drop on any thread; fini waits for this call.  The
 * functions above that release sets call it too; the daemon also calls it
 * once a second. */
void router_reap(struct router *r);
/* Names of the installed plugins, comma separated, for logs. */
void router_describe(struct router *r, char *buf, size_t len);
/* Release the installed set and free the router once every task is gone. */
void router_free(struct router *r);

/* For tests: release a set that was never installed. */
void plugin_set_release(struct plugin_set *set);

#endif /* OCCAMY_LOADER_H */
