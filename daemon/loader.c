/*
 * loader.c - task plugins: dlopen with the care sshd gives its keys, the ABI
 * check before any plugin code runs, the host API, the adapter from plugin
 * tasks to scheduler tasks, and routing of messages by handler header.
 *
 * Lifetimes: a plugin (one [plugin NAME] instance) is reference counted by
 * the sets holding it and by each live task.  When the last reference goes,
 * on whatever thread, it is only marked retired; the main thread finalises
 * and dlclose()s it in router_reap(), so fini never runs on a worker thread
 * and never concurrently with another init or fini.  A reload keeps an
 * instance whose section, file and header names are unchanged, so it is not
 * initialised twice.  r->mu guards the installed set, the list of every
 * instance not yet freed, the header names and the publisher.
 */
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "config.h"
#include "loader.h"
#include "log.h"

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

static void err_append(char *err, size_t errlen, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

static void
err_append(char *err, size_t errlen, const char *fmt, ...)
{
	size_t used = strnlen(err, errlen);
	va_list ap;

	if (used + 1 >= errlen)
		return;
	va_start(ap, fmt);
	vsnprintf(err + used, errlen - used, fmt, ap);
	va_end(ap);
	used = strnlen(err, errlen);
	if (used + 1 < errlen) {
		err[used] = '\n';
		err[used + 1] = '\0';
	}
}

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

/* ---- plugins ---- */

/* Any thread: the last reference leaves the instance for router_reap(). */
static void
plugin_unref(struct plugin *p)
{
	struct router *r = p->router;

	if (atomic_fetch_sub(&p->refs, 1) != 1)
		return;
	pthread_mutex_lock(&r->mu);
	p->retired = true;
	pthread_mutex_unlock(&r->mu);
}

static void
plugin_free(struct plugin *p)
{
	size_t i;

	if (p->initialised && p->desc->fini != NULL)
		p->desc->fini(&p->host);
	if (p->dl != NULL)
		dlclose(p->dl);
	atomic_fetch_sub(&p->router->live_plugins, 1);
	for (i = 0; i < p->noptions; i++) {
		free(p->options[i].key);
		free(p->options[i].value);
	}
	free(p->options);
	free(p->name);
	free(p->path);
	free(p->header_task_id);
	free(p->header_handler);
	free(p);
}

void
router_reap(struct router *r)
{
	struct plugin **pp, *dead = NULL, *p;

	pthread_mutex_lock(&r->mu);
	for (pp = &r->plugins; (p = *pp) != NULL;) {
		if (p->retired) {
			*pp = p->next;
			p->next = dead;
			dead = p;
		} else {
			pp = &p->next;
		}
	}
	pthread_mutex_unlock(&r->mu);
	/* fini outside the lock: the plugin may still publish from it. */
	while ((p = dead) != NULL) {
		dead = p->next;
		plugin_free(p);
	}
}

/* The dynamic linker matches a path it has loaded before by name and hands
 * back the loaded copy, so a file replaced on disk is not read again while
 * an instance of the old one lives. */
static bool
same_file(const struct stat *a, const struct stat *b)
{
	return a->st_dev == b->st_dev && a->st_ino == b->st_ino &&
	       a->st_size == b->st_size && a->st_mtim.tv_sec == b->st_mtim.tv_sec &&
	       a->st_mtim.tv_nsec == b->st_mtim.tv_nsec;
}

static char *
plugin_path(const struct config *cfg, const struct plugin_config *pc)
{
	size_t n;
	char *path;

	if (pc->path[0] == '/')
		return xstrdup(pc->path);
	n = strlen(cfg->plugin_dir) + strlen(pc->path) + 2;
	path = xmalloc(n);
	snprintf(path, n, "%s/%s", cfg->plugin_dir, pc->path);
	return path;
}

/* Code loading gets the care sshd gives its keys: the file and every
 * directory holding it belong to root or to us and nobody else may write. */
static int
check_ownership(const char *path, char *why, size_t whylen)
{
	char real[PATH_MAX], dir[PATH_MAX];
	struct stat st;
	uid_t me = geteuid();

	if (realpath(path, real) == NULL) {
		snprintf(why, whylen, "cannot open: %s", strerror(errno));
		return -1;
	}
	if (stat(real, &st) != 0) {
		snprintf(why, whylen, "cannot stat: %s", strerror(errno));
		return -1;
	}
	if (!S_ISREG(st.st_mode)) {
		snprintf(why, whylen, "not a regular file");
		return -1;
	}
	if (st.st_uid != 0 && st.st_uid != me) {
		snprintf(why, whylen, "owned by uid %u, not root or the daemon's user",
			 (unsigned)st.st_uid);
		return -1;
	}
	if (st.st_mode & (S_IWGRP | S_IWOTH)) {
		snprintf(why, whylen, "writable by group or others (mode %03o)",
			 (unsigned)(st.st_mode & 0777));
		return -1;
	}
	snprintf(dir, sizeof(dir), "%s", real);
	for (;;) {
		char *d = dirname(dir);

		if (stat(d, &st) != 0) {
			snprintf(why, whylen, "cannot stat directory %s: %s", d, strerror(errno));
			return -1;
		}
		if (st.st_uid != 0 && st.st_uid != me) {
			snprintf(why, whylen, "directory %s owned by uid %u, not root or the "
				 "daemon's user", d, (unsigned)st.st_uid);
			return -1;
		}
		/* Others may write here only if the directory is root's and
		 * sticky (like /tmp): then nobody can rename or delete the
		 * entries below it that root or we own, checked above. */
		if ((st.st_mode & (S_IWGRP | S_IWOTH)) &&
		    !((st.st_mode & S_ISVTX) && st.st_uid == 0)) {
			snprintf(why, whylen, "directory %s is writable by group or others "
				 "(mode %03o)", d, (unsigned)(st.st_mode & 0777));
			return -1;
		}
		if (strcmp(d, "/") == 0 || strcmp(d, ".") == 0)
			break;
		memmove(dir, d, strlen(d) + 1);
	}
	return 0;
}

static bool
is_elf(const char *path)
{
	unsigned char magic[4];
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	bool ok;

	if (fd < 0)
		return false;
	ok = read(fd, magic, 4) == 4 && memcmp(magic, "\177ELF", 4) == 0;
	close(fd);
	return ok;
}

/* The task adapter, below. */
static enum occamy_status ptask_run(struct task *t, const struct occamy_cancel *c,
				    struct occamy_output *out);
static size_t ptask_expand(struct task *t, size_t n, struct task **helpers);
static void ptask_handle(struct task *t, const struct occamy_headers *h, const void *body,
			 size_t len);
static void ptask_destroy(struct task *t);

/* The size of the 1.0 descriptor: a plugin must have at least that. */
#define PLUGIN_DESC_MIN_SIZE                                                   \
	(offsetof(struct occamy_plugin, task_destroy) + sizeof(void (*)(void *)))

static struct plugin *
plugin_load(struct router *r, const struct config *cfg, const struct plugin_config *pc,
	    char *err, size_t errlen)
{
	struct plugin *p = xcalloc(1, sizeof(*p));
	struct occamy_option *opts = NULL;
	char why[512] = "", ierr[512] = "";
	const char *sym_err;
	size_t i;

	struct plugin *q;
	bool stale = false;

	p->router = r;
	p->name = xstrdup(pc->name);
	atomic_init(&p->refs, 1);
	atomic_fetch_add(&r->live_plugins, 1);
	p->path = plugin_path(cfg, pc);
	p->options = xcalloc(pc->noptions ? pc->noptions : 1, sizeof(*p->options));
	for (i = 0; i < pc->noptions; i++) {
		p->options[i].key = xstrdup(pc->options[i].key);
		p->options[i].value = xstrdup(pc->options[i].value);
	}
	p->noptions = pc->noptions;
	pthread_mutex_lock(&r->mu);
	p->next = r->plugins;
	r->plugins = p;
	pthread_mutex_unlock(&r->mu);
#define FAIL(...)                                                              \
	do {                                                                   \
		char m_[600];                                                  \
		snprintf(m_, sizeof(m_), __VA_ARGS__);                         \
		err_append(err, errlen, "%s:%d: plugin %s (%s): %s", cfg->file, \
			   pc->line, pc->name, p->path, m_);                   \
		goto fail;                                                     \
	} while (0)

	if (check_ownership(p->path, why, sizeof(why)) != 0)
		FAIL("%s", why);
	if (!is_elf(p->path))
		FAIL("not a shared object (no ELF header)");
	if (stat(p->path, &p->file) != 0)
		FAIL("cannot stat: %s", strerror(errno));
	pthread_mutex_lock(&r->mu);
	for (q = r->plugins; q != NULL; q = q->next)
		if (q != p && strcmp(q->path, p->path) == 0 && !same_file(&q->file, &p->file))
			stale = true;
	pthread_mutex_unlock(&r->mu);
	if (stale)
		FAIL("replaced on disk while the old file is still loaded; "
		     "the new one loads at restart");
	p->dl = dlopen(p->path, RTLD_NOW | RTLD_LOCAL);
	if (p->dl == NULL)
		FAIL("dlopen: %s", dlerror());
	dlerror();
	p->desc = dlsym(p->dl, OCCAMY_PLUGIN_SYMBOL);
	sym_err = dlerror();
	if (p->desc == NULL)
		FAIL("no '%s' symbol: not an occamy plugin (%s)", OCCAMY_PLUGIN_SYMBOL,
		     sym_err ? sym_err : "NULL");
	/* Data only until here: nothing of the plugin has run. */
	if (p->desc->abi_major != OCCAMY_ABI_MAJOR)
		FAIL("built for plugin ABI %u.%u, this daemon speaks %u.%u",
		     p->desc->abi_major, p->desc->abi_minor, OCCAMY_ABI_MAJOR,
		     OCCAMY_ABI_MINOR);
	if (p->desc->size < PLUGIN_DESC_MIN_SIZE)
		FAIL("descriptor too small (%zu bytes, need %zu)", p->desc->size,
		     (size_t)PLUGIN_DESC_MIN_SIZE);
	if (p->desc->task_new == NULL || p->desc->task_run == NULL ||
	    p->desc->task_info == NULL || p->desc->task_destroy == NULL)
		FAIL("descriptor lacks a required callback (task_new, task_run, "
		     "task_info, task_destroy)");

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
	if (p->desc->init != NULL) {
		opts = xcalloc(pc->noptions ? pc->noptions : 1, sizeof(*opts));
		for (i = 0; i < pc->noptions; i++) {
			opts[i].key = pc->options[i].key;
			opts[i].value = pc->options[i].value;
		}
		if (p->desc->init(&p->host, opts, pc->noptions, ierr, sizeof(ierr)) != 0)
			FAIL("init failed: %s", ierr[0] ? ierr : "(no reason given)");
	}
	p->initialised = true;
	p->task_ops = (struct task_ops){
		.run = ptask_run,
		.expand = p->desc->task_expand ? ptask_expand : NULL,
		.handle = p->desc->task_handle ? ptask_handle : NULL,
		.destroy = ptask_destroy,
	};
	free(opts);
	log_info("plugin %s loaded from %s (%s %s, ABI %u.%u)", p->name, p->path,
		 p->desc->name ? p->desc->name : "?",
		 p->desc->version ? p->desc->version : "?", p->desc->abi_major,
		 p->desc->abi_minor);
	return p;
fail:
#undef FAIL
	free(opts);
	plugin_unref(p);
	return NULL;
}

void
plugin_set_release(struct plugin_set *set)
{
	struct router *r;
	size_t i;

	if (set == NULL)
		return;
	for (i = 0; i < set->n; i++)
		plugin_unref(set->plugins[i]);
	r = set->router;
	free(set->plugins);
	free(set);
	router_reap(r);
}

static bool
same_options(const struct plugin *p, const struct plugin_config *pc)
{
	size_t i;

	if (p->noptions != pc->noptions)
		return false;
	for (i = 0; i < p->noptions; i++)
		if (strcmp(p->options[i].key, pc->options[i].key) != 0 ||
		    strcmp(p->options[i].value, pc->options[i].value) != 0)
			return false;
	return true;
}

/* The installed instance a reload keeps for pc, with a reference, or NULL
 * if pc needs a new one.  Kept: same name, path, file, options and header
 * names.  A file replaced under the same name and path keeps the loaded
 * instance too, as the new file cannot be loaded beside it. */
static struct plugin *
plugin_keep(struct router *r, const struct config *cfg, const struct plugin_config *pc)
{
	struct plugin *p = NULL;
	struct stat st;
	char *path = plugin_path(cfg, pc);
	size_t i;
	bool same;

	pthread_mutex_lock(&r->mu);
	for (i = 0; r->set != NULL && i < r->set->n; i++)
		if (strcmp(r->set->plugins[i]->name, pc->name) == 0)
			p = r->set->plugins[i];
	if (p != NULL && strcmp(p->path, path) != 0)
		p = NULL;
	if (p != NULL)
		atomic_fetch_add(&p->refs, 1);
	pthread_mutex_unlock(&r->mu);
	free(path);
	if (p == NULL)
		return NULL;
	same = stat(p->path, &st) == 0 && same_file(&st, &p->file);
	if (!same) {
		log_warnx("%s:%d: plugin %s (%s): the file changed since it was loaded; "
			  "the loaded instance and its options stay until a restart",
			  cfg->file, pc->line, p->name, p->path);
		return p;
	}
	if (same_options(p, pc) && strcmp(p->header_task_id, cfg->header_task_id) == 0 &&
	    strcmp(p->header_handler, cfg->header_handler) == 0) {
		log_debug("plugin %s unchanged: kept, not initialised again", p->name);
		return p;
	}
	plugin_unref(p);
	return NULL;
}

struct plugin_set *
plugin_set_load(struct router *r, const struct config *cfg, char *err, size_t errlen)
{
	struct plugin_set *set = xcalloc(1, sizeof(*set));
	bool failed = false;
	size_t i;

	/* Old instances of a file must be gone before it can be loaded anew. */
	router_reap(r);
	set->router = r;
	set->plugins = xcalloc(cfg->nplugins ? cfg->nplugins : 1, sizeof(*set->plugins));
	for (i = 0; i < cfg->nplugins; i++) {
		struct plugin *p = plugin_keep(r, cfg, &cfg->plugins[i]);
		if (p == NULL)
			p = plugin_load(r, cfg, &cfg->plugins[i], err, errlen);
		if (p == NULL)
			failed = true;
		else
			set->plugins[set->n++] = p;
	}
	if (failed) {
		plugin_set_release(set);
		return NULL;
	}
	return set;
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
