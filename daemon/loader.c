/*
 * loader.c - loading task plugins: dlopen with the care sshd gives its keys,
 * the ABI check before any plugin code runs, init with the plugin's
 * options, the sets a reload keeps or replaces, and the instances' ends.
 * Main thread, except plugin_unref (any thread).  The host API, the task
 * adapter and routing are in router.c.
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
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "loader_impl.h"
#include "log.h"

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

/* Any thread: the last reference leaves the instance for router_reap(). */
void
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
	if (p->initialised && p->desc->fini != NULL)
		p->desc->fini(&p->host);
	if (p->dl != NULL)
		dlclose(p->dl);
	atomic_fetch_sub(&p->router->live_plugins, 1);
	plugin_options_free(p->options, p->noptions);
	FREE_ALL(p->name, p->path, p->header_task_id, p->header_handler, p);
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

	plugin_host_init(p, cfg);
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
	plugin_task_ops_init(p);
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

	if (set == NULL)
		return;
	r = set->router;
	for (size_t i = 0; i < set->n; i++)
		plugin_unref(set->plugins[i]);
	FREE_ALL(set->plugins, set);
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
