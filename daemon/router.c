/*
 * router.c - what a loaded plugin's code calls and is called through: the
 * host API table (log, cancellation, sleep, publish), the adapter from
 * plugin tasks to scheduler tasks, and routing of messages by handler
 * header to the installed set.  The host API and the tasks run on any
 * thread (task_new on the admission, control or slot threads); router_new,
 * router_install and router_free on the main thread.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "loader_impl.h"
#include "log.h"

/* ---- host API ---- */

static struct plugin *
plugin_of(const struct occamy_host *h)
{
	return (struct plugin *)(void *)h;
}

static void host_log(const struct occamy_host *h, enum occamy_log_level level,
		     const char *fmt, ...) __attribute__((format(printf, 3, 4)));

static void
host_log(const struct occamy_host *h, enum occamy_log_level level, const char *fmt, ...)
{
	char buf[1024];
	va_list ap;
	int prio = level <= OCCAMY_LOG_ERROR ? LOG_ERR :
		   level == OCCAMY_LOG_WARNING ? LOG_WARNING :
		   level == OCCAMY_LOG_INFO ? LOG_INFO : LOG_DEBUG;

	if (!log_enabled(prio))
		return;
	va_start(ap, fmt);
	vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	log_msg(prio, "plugin %s: %s", plugin_of(h)->name, buf);
}

static int
host_cancelled(const struct occamy_cancel *c)
{
	return c != NULL && cancel_is_set(c);
}

static int
host_sleep_ms(const struct occamy_cancel *c, uint64_t ms)
{
	if (c == NULL) {
		usleep((useconds_t)(ms > 1000000 ? 1000000000u : ms * 1000u));
		return 0;
	}
	return cancel_sleep_ms(c, ms);
}

static int
host_publish(const struct occamy_host *h, enum publish_target target, const char *name,
	     const struct occamy_kv *headers, size_t nheaders, const void *body, size_t len)
{
	struct router *r = plugin_of(h)->router;
	publish_fn fn;
	void *ctx;

	pthread_mutex_lock(&r->mu);
	fn = r->publish;
	ctx = r->publish_ctx;
	pthread_mutex_unlock(&r->mu);
	if (fn == NULL)
		return -1;
	return fn(ctx, target, name, headers, nheaders, body, len);
}

static int
host_publish_request(const struct occamy_host *h, const char *handler,
		     const struct occamy_kv *headers, size_t n, const void *body, size_t len)
{
	return host_publish(h, TARGET_REQUEST, handler, headers, n, body, len);
}

static int
host_publish_control(const struct occamy_host *h, const char *task_id,
		     const struct occamy_kv *headers, size_t n, const void *body, size_t len)
{
	if (task_id == NULL || task_id[0] == '\0')
		return -1;
	return host_publish(h, TARGET_CONTROL, task_id, headers, n, body, len);
}

static int
host_publish_help(const struct occamy_host *h, const char *handler,
		  const struct occamy_kv *headers, size_t n, const void *body, size_t len)
{
	return host_publish(h, TARGET_HELP, handler ? handler : plugin_of(h)->name,
			    headers, n, body, len);
}

void
plugin_host_init(struct plugin *p, const struct config *cfg)
{
	p->host = (struct occamy_host){
		.abi_major = OCCAMY_ABI_MAJOR,
		.abi_minor = OCCAMY_ABI_MINOR,
		.size = sizeof(struct occamy_host),
		.log = host_log,
		.cancelled = host_cancelled,
		.sleep_ms = host_sleep_ms,
		.publish_request = host_publish_request,
		.publish_control = host_publish_control,
		.publish_help = host_publish_help,
		.header_task_id = p->header_task_id = xstrdup(cfg->header_task_id),
		.header_handler = p->header_handler = xstrdup(cfg->header_handler),
	};
}

/* ---- tasks ---- */

static enum occamy_status
ptask_run(struct task *t, const struct occamy_cancel *c, struct occamy_output *out)
{
	struct plugin_task *pt = (struct plugin_task *)t;

	return pt->p->desc->task_run(pt->impl, c, out);
}

static struct task *ptask_wrap(struct plugin *p, void *impl);

static size_t
ptask_expand(struct task *t, size_t n, struct task **helpers)
{
	struct plugin_task *pt = (struct plugin_task *)t;
	void **impls;
	size_t got, i;

	if (pt->p->desc->task_expand == NULL || n == 0)
		return 0;
	impls = xcalloc(n, sizeof(*impls));
	got = pt->p->desc->task_expand(pt->impl, n, impls);
	if (got > n) {
		/* We cannot know what it wrote past n; trust only n. */
		log_warnx("plugin %s: task_expand returned %zu helpers for n = %zu",
			  pt->p->name, got, n);
		got = n;
	}
	for (i = 0; i < got; i++)
		helpers[i] = impls[i] ? ptask_wrap(pt->p, impls[i]) : NULL;
	free(impls);
	return got;
}

static void
ptask_handle(struct task *t, const struct occamy_headers *h, const void *body, size_t len)
{
	struct plugin_task *pt = (struct plugin_task *)t;

	if (pt->p->desc->task_handle != NULL)
		pt->p->desc->task_handle(pt->impl, h, body, len);
}

static void
ptask_destroy(struct task *t)
{
	struct plugin_task *pt = (struct plugin_task *)t;
	struct plugin *p = pt->p;

	p->desc->task_destroy(pt->impl);
	free(pt->base.id);
	free(pt->base.group);
	free(pt);
	plugin_unref(p);
}

static struct task *
ptask_wrap(struct plugin *p, void *impl)
{
	struct plugin_task *pt = xcalloc(1, sizeof(*pt));
	struct occamy_task_info info = {0};

	p->desc->task_info(impl, &info);
	pt->base.ops = &p->task_ops;
	pt->base.id = info.id && info.id[0] ? xstrdup(info.id) : NULL;
	pt->base.group = xstrdup(info.group && info.group[0] ? info.group : p->name);
	pt->base.deadline_ms = info.deadline_ms;
	pt->base.priority = info.priority;
	pt->p = p;
	pt->impl = impl;
	atomic_fetch_add(&p->refs, 1);
	return &pt->base;
}

/* Expand and handle only where the plugin has them, so the scheduler does
 * not offer room to tasks that cannot use it. */
void
plugin_task_ops_init(struct plugin *p)
{
	p->task_ops = (struct task_ops){
		.run = ptask_run,
		.expand = p->desc->task_expand ? ptask_expand : NULL,
		.handle = p->desc->task_handle ? ptask_handle : NULL,
		.destroy = ptask_destroy,
	};
}

/* ---- routing ---- */

static enum occamy_status
router_make_task(void *ctx, const struct message *m, bool is_help, struct task **out,
		 char *why, size_t whylen)
{
	struct router *r = ctx;
	const struct occamy_header *h;
	struct plugin *p = NULL;
	enum occamy_status st;
	char name[128];
	void *impl = NULL;
	size_t i;

	pthread_mutex_lock(&r->mu);
	h = occamy_headers_find(&m->headers, r->header_handler);
	if (h != NULL && (h->kind != OCCAMY_VALUE_STRING || h->len >= sizeof(name) ||
			  memchr(h->str, '\0', h->len) != NULL)) {
		snprintf(why, whylen, "header '%s' is not a short string", r->header_handler);
		pthread_mutex_unlock(&r->mu);
		return OCCAMY_ERR_INVALID_HEADERS;
	}
	snprintf(name, sizeof(name), "%s", h ? h->str : r->default_handler);
	if (name[0] == '\0') {
		snprintf(why, whylen, "no '%s' header and no default_handler", r->header_handler);
		pthread_mutex_unlock(&r->mu);
		return OCCAMY_ERR_INVALID_HEADERS;
	}
	for (i = 0; r->set != NULL && i < r->set->n; i++) {
		if (strcmp(r->set->plugins[i]->name, name) == 0) {
			p = r->set->plugins[i];
			atomic_fetch_add(&p->refs, 1);
			break;
		}
	}
	pthread_mutex_unlock(&r->mu);
	if (p == NULL) {
		snprintf(why, whylen, "unknown handler '%s'", name);
		return OCCAMY_ERR_INVALID_TASK;
	}
	st = p->desc->task_new(&p->host, &m->headers, m->body, m->len, is_help, &impl,
			       why, whylen);
	if (st == OCCAMY_OK && impl != NULL)
		*out = ptask_wrap(p, impl);
	else if (st == OCCAMY_OK)
		snprintf(why, whylen, "plugin %s returned no task", p->name);
	plugin_unref(p);
	return st == OCCAMY_OK && impl == NULL ? OCCAMY_ERR_INTERNAL : st;
}

struct router *
router_new(const struct config *cfg)
{
	struct router *r = xcalloc(1, sizeof(*r));

	pthread_mutex_init(&r->mu, NULL);
	r->header_handler = xstrdup(cfg->header_handler);
	r->default_handler = xstrdup(cfg->default_handler);
	return r;
}

void
router_set_publisher(struct router *r, publish_fn fn, void *ctx)
{
	pthread_mutex_lock(&r->mu);
	r->publish = fn;
	r->publish_ctx = ctx;
	pthread_mutex_unlock(&r->mu);
}

struct task_source
router_task_source(struct router *r)
{
	return (struct task_source){.ctx = r, .make_task = router_make_task};
}

void
router_install(struct router *r, struct plugin_set *set, const struct config *cfg)
{
	struct plugin_set *old;

	pthread_mutex_lock(&r->mu);
	old = r->set;
	r->set = set;
	free(r->header_handler);
	free(r->default_handler);
	r->header_handler = xstrdup(cfg->header_handler);
	r->default_handler = xstrdup(cfg->default_handler);
	pthread_mutex_unlock(&r->mu);
	plugin_set_release(old);
}

void
router_describe(struct router *r, char *buf, size_t len)
{
	size_t i, used = 0;

	buf[0] = '\0';
	pthread_mutex_lock(&r->mu);
	for (i = 0; r->set != NULL && i < r->set->n && used < len; i++) {
		int n = snprintf(buf + used, len - used, "%s%s", i ? ", " : "",
				 r->set->plugins[i]->name);
		if (n < 0)
			break;
		used += (size_t)n;
	}
	pthread_mutex_unlock(&r->mu);
}

void
router_free(struct router *r)
{
	if (r == NULL)
		return;
	{
		struct plugin_set *old;

		pthread_mutex_lock(&r->mu);
		old = r->set;
		r->set = NULL;
		r->publish = NULL;
		pthread_mutex_unlock(&r->mu);
		plugin_set_release(old);
	}
	/* A task wedged in a plugin still points at us: leave it be. */
	if (atomic_load(&r->live_plugins) != 0)
		return;
	free(r->header_handler);
	free(r->default_handler);
	pthread_mutex_destroy(&r->mu);
	free(r);
}
