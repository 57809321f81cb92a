/*
 * occamy/plugin.h - the one public header: the contract between occamyd and
 * the task plugins it dlopen()s.  A plugin never links against the daemon;
 * everything it may call arrives in a struct occamy_host table.
 *
 * A plugin is a shared object exporting one data symbol:
 *
 *     const struct occamy_plugin occamy_plugin = {
 *         OCCAMY_PLUGIN_HEADER,
 *         .name = "sleep", .version = "1.0",
 *         .task_new = ..., .task_run = ..., .task_info = ...,
 *         .task_destroy = ...,
 *     };
 *
 * The loader reads that descriptor (ABI major, minor, struct size) before it
 * calls anything, and refuses a plugin built for another major version.
 *
 * INSTANCES, INIT AND FINI
 *  - Each [plugin NAME] section of occamy.ini is one instance of its .so,
 *    with a host table of its own.  init runs once per instance: at start,
 *    or when a reload adds the section or changes it (other options, another
 *    path).  fini runs once per instance, once the instance has left the
 *    running configuration (a reload dropped or changed its section, or the
 *    daemon is stopping) and the last task it made was destroyed; no
 *    callback of that instance runs after fini.  A task still stuck in
 *    task_run when the daemon exits keeps its instance: no fini then.
 *  - init and fini run on the daemon's main thread only, so they never run
 *    concurrently with each other.  fini may come a second or so after the
 *    last task_destroy.
 *  - A reload that leaves a section unchanged (same path, same file on
 *    disk, same options, same header names) keeps its instance: neither
 *    fini nor init runs, and its tasks go on undisturbed.
 *  - The same .so is mapped once per process, so its global variables are
 *    shared by all its instances, and instances may overlap: two sections
 *    may name the same file, and a reload that changes a section inits the
 *    new instance while the old one's tasks still run (its fini follows
 *    them).  Keep per-instance state in host->plugin_state.  State that
 *    must be process-global is set up by the first init and torn down by
 *    the last fini: count them; no lock is needed for that count.
 *  - A .so replaced on disk is not read again before a restart (the
 *    dynamic linker would hand back the loaded copy): a reload keeps the
 *    running instance, with its old options, and logs a warning; a new
 *    section naming that file is refused while the old copy is loaded.
 *
 * THREADING RULES
 *  - init and fini: see above.
 *  - task_new runs on the daemon's admission thread, on a control dispatcher
 *    thread (help requests), or on the slot thread about to run the task (a
 *    request that found a free slot at once); it must be quick (parse,
 *    validate, allocate) and never block.
 *  - task_run runs on a slot thread and is the only long-running callback.
 *    Different tasks run concurrently on different threads.
 *  - task_expand runs on the expansion thread and task_handle on a control
 *    dispatcher thread, WHILE task_run of the same task may be running on its
 *    slot thread.  The plugin synchronises access to its own task state.
 *    Calls of task_handle for one task are serialised; task_expand calls for
 *    one task are serialised; the two may overlap each other.
 *  - task_handle must be quick: queue the data for task_run and return.
 *    For a help request's task it may come before task_run starts (while
 *    the task waits in the store for a free slot), so that a master's
 *    "stop" reaches assistants that have not started yet.
 *  - task_info may be called from any thread at any time until task_destroy;
 *    the strings it returns must stay valid and unchanged until then.
 *  - task_destroy is called exactly once per task, after every other callback
 *    for that task has returned, on any thread.
 *  - Tasks must not share mutable memory with each other: an assistant may run
 *    on this server or on another one, and must behave the same either way.
 *    Talk through host->publish_control() instead.
 *
 * OWNERSHIP
 *  - Every pointer the daemon passes in (headers, bodies, options) is borrowed
 *    for the duration of the call only.  Copy what you keep.
 *  - Tasks are allocated by the plugin and freed by task_destroy.
 *  - A result body set in struct occamy_output must come from malloc(); the
 *    daemon takes ownership and free()s it.
 *  - The host table is valid from init until fini returns.
 */
#ifndef OCCAMY_PLUGIN_H
#define OCCAMY_PLUGIN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Bump MAJOR on any incompatible change; MINOR when fields are appended. */
#define OCCAMY_ABI_MAJOR 1
#define OCCAMY_ABI_MINOR 1

/* The symbol name the loader looks up with dlsym(). */
#define OCCAMY_PLUGIN_SYMBOL "occamy_plugin"

/* What a task or a conversion returns.  The daemon maps each to a broker
 * outcome: OK -> ack; INVALID_* -> reject without requeue (dead-letter);
 * INTERNAL -> requeue until the delivery limit, then dead-letter;
 * INTERRUPTED -> requeue (the task was cancelled by the daemon). */
enum occamy_status {
	OCCAMY_OK = 0,
	OCCAMY_ERR_INVALID_BODY,
	OCCAMY_ERR_INVALID_HEADERS,
	OCCAMY_ERR_INVALID_TASK,
	OCCAMY_ERR_INTERNAL,
	OCCAMY_ERR_INTERRUPTED,
};

enum occamy_log_level {
	OCCAMY_LOG_ERROR = 3,
	OCCAMY_LOG_WARNING = 4,
	OCCAMY_LOG_INFO = 6,
	OCCAMY_LOG_DEBUG = 7,
};

/* A message header value.  AMQP tables, arrays and other exotic types appear
 * as OCCAMY_VALUE_OTHER so plugins can at least tell that the key is there. */
enum occamy_value_kind {
	OCCAMY_VALUE_STRING,
	OCCAMY_VALUE_INT,
	OCCAMY_VALUE_FLOAT,
	OCCAMY_VALUE_BOOL,
	OCCAMY_VALUE_OTHER,
};

struct occamy_header {
	const char *key; /* NUL-terminated */
	enum occamy_value_kind kind;
	/* STRING: str is NUL-terminated, len excludes the NUL (the value may
	 * itself contain NUL bytes; len is authoritative). */
	const char *str;
	size_t len;
	int64_t i;  /* INT, and BOOL as 0/1 */
	double f;   /* FLOAT */
};

struct occamy_headers {
	const struct occamy_header *items;
	size_t count;
};

/* Headers a plugin adds to what it publishes (strings only, for clarity). */
struct occamy_kv {
	const char *key;
	const char *value;
};

/* Cancellation token of a running task; opaque, poll it through the host. */
struct occamy_cancel;

/* Where task_run leaves its result and, on error, a human reason. */
struct occamy_output {
	void *body;               /* malloc()ed; daemon frees; may be NULL */
	size_t len;
	char content_type[64];    /* e.g. "application/json"; may stay empty */
	char message[256];        /* why, when the status is not OCCAMY_OK */
};

/* What the daemon needs to know about a task to schedule it. */
struct occamy_task_info {
	const char *id;       /* control messages with this task ID reach it; may be NULL */
	const char *group;    /* for metrics, e.g. the handler or a sub-kind; may be NULL */
	int64_t deadline_ms;  /* wall clock, ms since the epoch; 0 = none */
	int priority;         /* higher first in expansion; default 0 */
};

/* One [plugin NAME] key of occamy.ini other than `path`. */
struct occamy_option {
	const char *key;
	const char *value;
};

struct occamy_host {
	uint32_t abi_major;
	uint32_t abi_minor;
	size_t size; /* sizeof(struct occamy_host) of the daemon */

	/* Log a line tagged with the plugin's name. */
	void (*log)(const struct occamy_host *host, enum occamy_log_level level,
		    const char *fmt, ...) __attribute__((format(printf, 3, 4)));

	/* Non-zero once the task has been asked to stop.  Cheap: poll it in
	 * inner loops (every millisecond or so of work). */
	int (*cancelled)(const struct occamy_cancel *cancel);

	/* Sleep up to ms milliseconds; returns non-zero at once if the task is
	 * (or becomes) cancelled, 0 after a full sleep. */
	int (*sleep_ms)(const struct occamy_cancel *cancel, uint64_t ms);

	/* Publish a request for the named handler (NULL: the default handler)
	 * on the request exchange: it runs protected on exactly one server.
	 * Returns 0 when queued for sending (it is then sent at least once,
	 * and at most 3 times if connections keep breaking before its
	 * confirm), -1 if the daemon cannot send now (not connected, its
	 * outgoing queue full) or can never send it: a header key empty or
	 * over 255 bytes, headers that do not fit in the negotiated frame
	 * (128 KiB with RabbitMQ's defaults), a body over 128 MiB.  The host
	 * logs why.  The same holds for publish_control and publish_help. */
	int (*publish_request)(const struct occamy_host *host, const char *handler,
			       const struct occamy_kv *headers, size_t nheaders,
			       const void *body, size_t len);

	/* Publish a control message to every running task with this task ID on
	 * every server (how assistants report to their master). */
	int (*publish_control)(const struct occamy_host *host, const char *task_id,
			       const struct occamy_kv *headers, size_t nheaders,
			       const void *body, size_t len);

	/* Publish a help request: a control message without task ID that every
	 * server may turn into an external helper (via the named handler's
	 * task_new with is_help set) when it has spare slots. */
	int (*publish_help)(const struct occamy_host *host, const char *handler,
			    const struct occamy_kv *headers, size_t nheaders,
			    const void *body, size_t len);

	/* The plugin's own state, as set by init; for callbacks that only get
	 * the host pointer. */
	void *plugin_state;

	/* ABI 1.1: the header names occamy.ini configures (header_task_id,
	 * header_handler), so plugins need not assume "task-id".  Check
	 * OCCAMY_HOST_HAS(host, header_task_id) first. */
	const char *header_task_id;
	const char *header_handler;
};

/* WITHDRAWAL: help never outlives its master.
 *  - A help request that carries the header OCCAMY_HEADER_MASTER names the
 *    task ID of the master it helps; every daemon remembers it for the
 *    external helper made from it and for every helper that one expands.
 *    Set it to your task's ID (task_info) when you publish_help: that is
 *    all a plugin has to do.
 *  - The daemon that published it sends, once, when the task with that ID
 *    ends with a final outcome (its request acked with the result or dead-
 *    lettered; not when it is requeued or retried, since it runs again), a
 *    control message for task ID X with the header OCCAMY_HEADER_DONE.
 *    Every daemon then drops its stored help requests whose master is X,
 *    cancels the running external helpers whose master is X, and for
 *    external_ttl_s drops help requests for X that arrive later (one may
 *    reach a daemon after its master finished).  Internal helpers end with
 *    their task anyway.  The message is also routed to tasks with ID X, as
 *    any control message: a plugin may send it itself (any value) for a
 *    master that is not a daemon task.  Protected assistants (from
 *    publish_request) are never cancelled by it: tell them yourself. */
#define OCCAMY_HEADER_MASTER "occamy-master"
#define OCCAMY_HEADER_DONE "occamy-done"

/* True if the host table the daemon passed is large enough to contain
 * field: fields added in a later minor ABI are absent from an older
 * daemon's table.  For example OCCAMY_HOST_HAS(host, header_task_id). */
#define OCCAMY_HOST_HAS(host, field)                                           \
	((host)->size >= offsetof(struct occamy_host, field) +                 \
				 sizeof(((struct occamy_host *)0)->field))

struct occamy_plugin {
	uint32_t abi_major;
	uint32_t abi_minor;
	size_t size; /* sizeof(struct occamy_plugin) the plugin was built with */

	const char *name;
	const char *version;

	/* Optional.  Called once per instance, on the main thread, with its
	 * options from occamy.ini (see INSTANCES above).  Store host (and set
	 * host->plugin_state if useful; it is writable here only).  Return 0,
	 * or -1 with a reason in err: then fini is not called. */
	int (*init)(struct occamy_host *host, const struct occamy_option *options,
		    size_t noptions, char *err, size_t errlen);

	/* Optional.  Called once per instance, on the main thread, after the
	 * instance left the running configuration and every task it made was
	 * destroyed; other instances of the same .so may still be running. */
	void (*fini)(const struct occamy_host *host);

	/* Required.  Turn a message into a task.  is_help is non-zero for a help
	 * request (a control message without task ID); the task will run as an
	 * unprotected external helper.  On error return the status and a reason
	 * in err, and leave *task alone. */
	enum occamy_status (*task_new)(const struct occamy_host *host,
				       const struct occamy_headers *headers,
				       const void *body, size_t len, int is_help,
				       void **task, char *err, size_t errlen);

	/* Required.  Do the work.  Return OCCAMY_OK with an optional result in
	 * out (sent to the request's reply_to), or an error status with a reason
	 * in out->message.  A cancelled task returns OCCAMY_ERR_INTERRUPTED. */
	enum occamy_status (*task_run)(void *task, const struct occamy_cancel *cancel,
				       struct occamy_output *out);

	/* Optional.  Create up to n helper tasks into helpers[0..n-1]; return
	 * how many.  Helpers run unprotected and may be cancelled at any time. */
	size_t (*task_expand)(void *task, size_t n, void **helpers);

	/* Optional.  A control message carrying this task's ID. */
	void (*task_handle)(void *task, const struct occamy_headers *headers,
			    const void *body, size_t len);

	/* Required.  Fill info; see struct occamy_task_info. */
	void (*task_info)(const void *task, struct occamy_task_info *info);

	/* Required. */
	void (*task_destroy)(void *task);
};

/* Start every descriptor with this. */
#define OCCAMY_PLUGIN_HEADER                                                   \
	.abi_major = OCCAMY_ABI_MAJOR, .abi_minor = OCCAMY_ABI_MINOR,          \
	.size = sizeof(struct occamy_plugin)

/* Find a header by key; NULL if absent.  Inline so plugins need no symbol
 * from the daemon. */
static inline const struct occamy_header *
occamy_headers_find(const struct occamy_headers *h, const char *key)
{
	size_t i, j;

	if (h == NULL || key == NULL)
		return NULL;
	for (i = 0; i < h->count; i++) {
		const char *a = h->items[i].key, *b = key;
		for (j = 0; a[j] != '\0' && a[j] == b[j]; j++)
			;
		if (a[j] == b[j])
			return &h->items[i];
	}
	return NULL;
}

#ifdef __cplusplus
}
#endif

#endif /* OCCAMY_PLUGIN_H */
