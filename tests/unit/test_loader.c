/*
 * test_loader.c - the plugin loader and router against real .so files built
 * from tests/plugins: good plugin, ABI mismatch, missing symbol, not an ELF,
 * unsafe ownership and modes, init failure, load/unload cycles, routing, and
 * what a reload does to init and fini (kept, drained, finalised on main).
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

/* Paths here are short; truncation would only fail a test. */
#pragma GCC diagnostic ignored "-Wformat-truncation"

#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "config.h"
#include "loader.h"
#include "log.h"
#include "scheduler.h"

static char plugin_dir[PATH_MAX]; /* absolute build/tests/plugins */
static char private_dir[PATH_MAX]; /* 0700 scratch dir inside the build tree */

static void
write_file(const char *path, const char *text, mode_t mode)
{
	FILE *f = fopen(path, "w");

	assert_non_null(f);
	fputs(text, f);
	fclose(f);
	chmod(path, mode);
}

static void
copy_file(const char *from, const char *to, mode_t mode)
{
	char buf[65536];
	size_t n;
	FILE *in = fopen(from, "rb"), *out = fopen(to, "wb");

	assert_non_null(in);
	assert_non_null(out);
	while ((n = fread(buf, 1, sizeof(buf), in)) > 0)
		assert_int_equal(fwrite(buf, 1, n, out), n);
	fclose(in);
	fclose(out);
	chmod(to, mode);
}

/* Load a config whose body follows a [server] section naming plugin_dir. */
static int
load_conf(struct config *cfg, const char *extra, const char *dir)
{
	char path[PATH_MAX], text[4096], errs[4096] = "";
	int rc;

	snprintf(path, sizeof(path), "%s/occamy.ini", private_dir);
	snprintf(text, sizeof(text), "[server]\nslots = 2\nplugin_dir = %s\n%s",
		 dir ? dir : plugin_dir, extra);
	write_file(path, text, 0600);
	rc = config_load(path, cfg, errs, sizeof(errs));
	if (rc != 0)
		fail_msg("config did not load: %s", errs);
	return rc;
}

/* Expect the set to fail with an error containing each of the needles. */
static void
expect_load_error(const char *extra, const char *dir, const char *n1, const char *n2)
{
	struct config cfg;
	struct router *r;
	char errs[4096] = "";

	load_conf(&cfg, extra, dir);
	r = router_new(&cfg);
	assert_null(plugin_set_load(r, &cfg, errs, sizeof(errs)));
	if (strstr(errs, n1) == NULL || (n2 && strstr(errs, n2) == NULL))
		fail_msg("error '%s' lacks '%s' / '%s'", errs, n1, n2 ? n2 : "");
	/* file:line of the section header is named */
	assert_non_null(strstr(errs, "occamy.ini:4:"));
	router_free(r);
	config_free(&cfg);
}

struct fake_msg {
	struct message base;
	struct occamy_header hdr[1];
};

static void
no_settle(struct message *m, const struct settlement *s)
{
	(void)m;
	(void)s;
}

static const struct message_ops no_ops = {.settle = no_settle};

static void
msg_init(struct fake_msg *m, const char *handler, bool as_int)
{
	memset(m, 0, sizeof(*m));
	m->base.ops = &no_ops;
	m->base.body = "hi";
	m->base.len = 2;
	if (handler != NULL) {
		m->hdr[0].key = "handler";
		m->hdr[0].kind = as_int ? OCCAMY_VALUE_INT : OCCAMY_VALUE_STRING;
		m->hdr[0].str = handler;
		m->hdr[0].len = strlen(handler);
		m->base.headers.items = m->hdr;
		m->base.headers.count = 1;
	}
}

static int
count_lines(const char *path, const char *line)
{
	char buf[128];
	int n = 0;
	FILE *f = fopen(path, "r");

	if (f == NULL)
		return 0;
	while (fgets(buf, sizeof(buf), f))
		if (strcmp(buf, line) == 0)
			n++;
	fclose(f);
	return n;
}

static void
test_good_plugin_loads_and_routes_by_handler_header(void **state)
{
	struct config cfg;
	struct router *r;
	struct plugin_set *set;
	struct task_source src;
	struct fake_msg m;
	struct task *t = NULL;
	struct occamy_output out = {0};
	char errs[4096] = "", why[256] = "";

	(void)state;
	load_conf(&cfg, "[plugin noop]\npath = noop.so\n", NULL);
	r = router_new(&cfg);
	set = plugin_set_load(r, &cfg, errs, sizeof(errs));
	if (set == NULL)
		fail_msg("load failed: %s", errs);
	router_install(r, set, &cfg);
	src = router_task_source(r);
	msg_init(&m, "noop", false);
	assert_int_equal(src.make_task(src.ctx, &m.base, false, &t, why, sizeof(why)), OCCAMY_OK);
	assert_non_null(t);
	assert_string_equal(t->group, "noop");
	assert_int_equal(t->ops->run(t, NULL, &out), OCCAMY_OK);
	/* noop echoes the body */
	assert_int_equal(out.len, 2);
	assert_memory_equal(out.body, "hi", 2);
	free(out.body);
	t->ops->destroy(t);
	router_free(r);
	config_free(&cfg);
}

static void
test_unknown_or_bad_handler_is_an_invalid_message(void **state)
{
	struct config cfg;
	struct router *r;
	struct plugin_set *set;
	struct task_source src;
	struct fake_msg m;
	struct task *t = NULL;
	char errs[4096] = "", why[256] = "";

	(void)state;
	load_conf(&cfg, "default_handler = noop\n[plugin noop]\npath = noop.so\n", NULL);
	r = router_new(&cfg);
	set = plugin_set_load(r, &cfg, errs, sizeof(errs));
	assert_non_null(set);
	router_install(r, set, &cfg);
	src = router_task_source(r);

	msg_init(&m, "nosuch", false);
	assert_int_equal(src.make_task(src.ctx, &m.base, false, &t, why, sizeof(why)),
			 OCCAMY_ERR_INVALID_TASK);
	assert_string_equal(why, "unknown handler 'nosuch'");
	assert_null(t);

	msg_init(&m, "noop", true);
	assert_int_equal(src.make_task(src.ctx, &m.base, false, &t, why, sizeof(why)),
			 OCCAMY_ERR_INVALID_HEADERS);
	assert_non_null(strstr(why, "not a short string"));

	/* No header: the default handler takes it. */
	msg_init(&m, NULL, false);
	assert_int_equal(src.make_task(src.ctx, &m.base, false, &t, why, sizeof(why)), OCCAMY_OK);
	assert_string_equal(t->group, "noop");
	t->ops->destroy(t);
	router_free(r);
	config_free(&cfg);
}

static void
test_abi_mismatch_is_refused_naming_both_versions(void **state)
{
	(void)state;
	expect_load_error("[plugin abi]\npath = fixture_abi.so\n", NULL,
			  "built for plugin ABI 99.0", "this daemon speaks 1.");
}

static void
test_missing_entry_symbol_is_refused(void **state)
{
	(void)state;
	expect_load_error("[plugin nosym]\npath = fixture_nosym.so\n", NULL,
			  "no 'occamy_plugin' symbol", NULL);
}

static void
test_missing_file_is_refused(void **state)
{
	(void)state;
	expect_load_error("[plugin gone]\npath = gone.so\n", NULL, "gone.so", "cannot open");
}

static void
test_not_an_elf_is_refused(void **state)
{
	char path[PATH_MAX + 16], extra[PATH_MAX + 64];

	(void)state;
	snprintf(path, sizeof(path), "%s/text.so", private_dir);
	write_file(path, "#!/bin/sh\necho not a plugin\n", 0644);
	snprintf(extra, sizeof(extra), "[plugin text]\npath = %s\n", path);
	expect_load_error(extra, NULL, "not a shared object", NULL);
}

static void
test_group_or_world_writable_plugin_is_refused(void **state)
{
	char from[PATH_MAX + 16], to[PATH_MAX + 16], extra[PATH_MAX + 64];

	(void)state;
	snprintf(from, sizeof(from), "%s/noop.so", plugin_dir);
	snprintf(to, sizeof(to), "%s/writable.so", private_dir);
	copy_file(from, to, 0666);
	snprintf(extra, sizeof(extra), "[plugin w]\npath = %s\n", to);
	expect_load_error(extra, NULL, "writable by group or others", "mode 666");
	chmod(to, 0664);
	expect_load_error(extra, NULL, "writable by group or others", "mode 664");
	unlink(to);
}

static void
test_plugin_in_a_world_writable_directory_is_refused(void **state)
{
	char from[PATH_MAX + 16], dir[] = "/tmp/occamy-ww-XXXXXX", to[64], extra[128];

	(void)state;
	/* mkdtemp makes it 0700: open it to the world like a careless admin. */
	assert_non_null(mkdtemp(dir));
	chmod(dir, 0777);
	snprintf(from, sizeof(from), "%s/noop.so", plugin_dir);
	snprintf(to, sizeof(to), "%s/noop.so", dir);
	copy_file(from, to, 0644);
	snprintf(extra, sizeof(extra), "[plugin w]\npath = %s\n", to);
	expect_load_error(extra, NULL, "is writable by group or others", dir);
	unlink(to);
	rmdir(dir);
}

static void
test_plugin_below_a_sticky_root_directory_is_accepted(void **state)
{
	char from[PATH_MAX + 16], dir[] = "/tmp/occamy-st-XXXXXX", to[64], extra[128];
	struct config cfg;
	struct router *r;
	struct plugin_set *set;
	char errs[4096] = "";

	(void)state;
	/* /tmp is world-writable but sticky and root's: nobody can swap our
	 * 0755 directory or the root-owned file in it. */
	assert_non_null(mkdtemp(dir));
	chmod(dir, 0755);
	snprintf(from, sizeof(from), "%s/noop.so", plugin_dir);
	snprintf(to, sizeof(to), "%s/noop.so", dir);
	copy_file(from, to, 0644);
	snprintf(extra, sizeof(extra), "[plugin ok]\npath = %s\n", to);
	load_conf(&cfg, extra, NULL);
	r = router_new(&cfg);
	set = plugin_set_load(r, &cfg, errs, sizeof(errs));
	if (set == NULL)
		fail_msg("refused: %s", errs);
	plugin_set_release(set);
	router_free(r);
	config_free(&cfg);
	unlink(to);
	rmdir(dir);
}

static void
test_init_failure_passes_on_the_plugins_message(void **state)
{
	(void)state;
	expect_load_error("[plugin fx]\npath = fixture_initfail.so\nok = no\n", NULL,
			  "init failed: option ok must be yes", NULL);
}

/* A [plugin fx] section of the fixture with a trace file and extra options. */
static void
fx_conf(struct config *cfg, const char *trace, const char *more)
{
	char extra[PATH_MAX + 256];

	snprintf(extra, sizeof(extra), "[plugin fx]\npath = fixture_initfail.so\nok = yes\n"
		 "trace = %s\n%s", trace, more);
	load_conf(cfg, extra, NULL);
}

static void
trace_path(char *buf, size_t len, const char *name)
{
	snprintf(buf, len, "%s/%s", private_dir, name);
	unlink(buf);
}

static void
reload(struct router *r, const struct config *cfg)
{
	char errs[4096] = "";
	struct plugin_set *set = plugin_set_load(r, cfg, errs, sizeof(errs));

	if (set == NULL)
		fail_msg("reload refused: %s", errs);
	router_install(r, set, cfg);
}

/* init and fini lines the fixture has written to trace so far. */
#define ASSERT_INITS_FINIS(trace, inits, finis)                                \
	do {                                                                   \
		assert_int_equal(count_lines(trace, "init\n"), inits);         \
		assert_int_equal(count_lines(trace, "fini\n"), finis);         \
	} while (0)

/* A router with the fixture plugin installed, tracing into a file named
 * name; *cfg is its config. */
static struct router *
fx_router(char *trace, size_t len, const char *name, struct config *cfg)
{
	struct router *r;

	trace_path(trace, len, name);
	fx_conf(cfg, trace, "");
	r = router_new(cfg);
	reload(r, cfg);
	return r;
}

static struct task *
fx_task(struct router *r)
{
	struct task_source src = router_task_source(r);
	struct fake_msg m;
	struct task *t = NULL;
	char why[256] = "";

	msg_init(&m, "fx", false);
	if (src.make_task(src.ctx, &m.base, false, &t, why, sizeof(why)) != OCCAMY_OK)
		fail_msg("no task: %s", why);
	return t;
}

static void *
destroy_main(void *arg)
{
	struct task *t = arg;

	t->ops->destroy(t);
	return NULL;
}

/* Tasks end on slot threads: destroy one on a thread of its own. */
static void
destroy_elsewhere(struct task *t)
{
	pthread_t th;

	assert_int_equal(pthread_create(&th, NULL, destroy_main, t), 0);
	pthread_join(th, NULL);
}

static void
test_reloads_that_change_the_options_pair_init_with_fini(void **state)
{
	char trace[PATH_MAX + 16], more[64];
	struct config cfg;
	struct router *r;
	int i;

	(void)state;
	trace_path(trace, sizeof(trace), "trace");
	fx_conf(&cfg, trace, "");
	r = router_new(&cfg);
	for (i = 0; i < 50; i++) {
		config_free(&cfg);
		snprintf(more, sizeof(more), "generation = %d\n", i);
		fx_conf(&cfg, trace, more);
		reload(r, &cfg);
		ASSERT_INITS_FINIS(trace, i + 1, i);
	}
	router_free(r);
	ASSERT_INITS_FINIS(trace, 50, 50);
	config_free(&cfg);
}

static void
test_unchanged_plugin_is_kept_across_reloads_without_init_or_fini(void **state)
{
	char trace[PATH_MAX + 16];
	struct config cfg;
	struct router *r;
	struct task *t, *t2;
	int i;

	(void)state;
	r = fx_router(trace, sizeof(trace), "trace-kept", &cfg);
	t = fx_task(r);
	for (i = 0; i < 10; i++) {
		struct config again;

		fx_conf(&again, trace, "");
		reload(r, &again);
		config_free(&again);
	}
	/* One init while the task lives, and it still routes. */
	ASSERT_INITS_FINIS(trace, 1, 0);
	t2 = fx_task(r);
	destroy_elsewhere(t);
	destroy_elsewhere(t2);
	router_reap(r);
	assert_int_equal(count_lines(trace, "fini\n"), 0);
	router_free(r);
	ASSERT_INITS_FINIS(trace, 1, 1);
	config_free(&cfg);
}

static void
test_removed_plugin_is_finalised_on_the_main_thread_after_its_last_task(void **state)
{
	char trace[PATH_MAX + 16];
	struct config cfg, empty;
	struct router *r;
	struct task_source src;
	struct fake_msg m;
	struct task *t, *none = NULL;
	char why[256];

	(void)state;
	r = fx_router(trace, sizeof(trace), "trace-removed", &cfg);
	src = router_task_source(r);
	t = fx_task(r);
	/* Reload without the plugin: new work cannot reach it... */
	load_conf(&empty, "", NULL);
	reload(r, &empty);
	msg_init(&m, "fx", false);
	assert_int_equal(src.make_task(src.ctx, &m.base, false, &none, why, sizeof(why)),
			 OCCAMY_ERR_INVALID_TASK);
	/* ...but it stays loaded while its task lives... */
	assert_int_equal(count_lines(trace, "fini\n"), 0);
	/* ...and the slot thread that ends the task does not finalise it. */
	destroy_elsewhere(t);
	assert_int_equal(count_lines(trace, "fini\n"), 0);
	assert_int_equal(count_lines(trace, "fini off-main\n"), 0);
	router_reap(r);
	assert_int_equal(count_lines(trace, "fini\n"), 1);
	router_free(r);
	assert_int_equal(count_lines(trace, "fini\n"), 1);
	assert_int_equal(count_lines(trace, "init off-main\n"), 0);
	config_free(&cfg);
	config_free(&empty);
}

static void
test_changed_options_start_a_new_instance_while_the_old_one_drains(void **state)
{
	char trace[PATH_MAX + 16];
	struct config cfg, changed;
	struct router *r;
	struct task *old, *young;

	(void)state;
	r = fx_router(trace, sizeof(trace), "trace-changed", &cfg);
	old = fx_task(r);
	fx_conf(&changed, trace, "colour = blue\n");
	reload(r, &changed);
	ASSERT_INITS_FINIS(trace, 2, 0);
	young = fx_task(r);
	destroy_elsewhere(old);
	router_reap(r);
	assert_int_equal(count_lines(trace, "fini\n"), 1);
	destroy_elsewhere(young);
	router_free(r);
	assert_int_equal(count_lines(trace, "fini\n"), 2);
	assert_int_equal(count_lines(trace, "fini off-main\n"), 0);
	config_free(&cfg);
	config_free(&changed);
}

static void
test_replaced_file_keeps_the_loaded_instance_until_restart(void **state)
{
	char trace[PATH_MAX + 16], from[PATH_MAX + 32], to[PATH_MAX + 16],
		tmp[PATH_MAX + 16], extra[3 * PATH_MAX + 128], errs[4096] = "";
	struct config cfg, both;
	struct router *r;
	struct task *t;

	(void)state;
	trace_path(trace, sizeof(trace), "trace-replaced");
	snprintf(from, sizeof(from), "%s/fixture_initfail.so", plugin_dir);
	snprintf(to, sizeof(to), "%s/fx.so", private_dir);
	snprintf(tmp, sizeof(tmp), "%s/fx.so.new", private_dir);
	copy_file(from, to, 0755);
	snprintf(extra, sizeof(extra), "[plugin fx]\npath = %s\nok = yes\ntrace = %s\n", to,
		 trace);
	load_conf(&cfg, extra, NULL);
	r = router_new(&cfg);
	reload(r, &cfg);
	t = fx_task(r);
	/* An upgrade: a new file under the old name. */
	copy_file(from, tmp, 0755);
	assert_int_equal(rename(tmp, to), 0);
	reload(r, &cfg);
	ASSERT_INITS_FINIS(trace, 1, 0);
	/* A second section naming it cannot get the new file: refused. */
	snprintf(extra, sizeof(extra), "[plugin fx]\npath = %s\nok = yes\ntrace = %s\n"
		 "[plugin fy]\npath = %s\nok = yes\n", to, trace, to);
	load_conf(&both, extra, NULL);
	assert_null(plugin_set_load(r, &both, errs, sizeof(errs)));
	if (strstr(errs, "plugin fy") == NULL || strstr(errs, "replaced on disk") == NULL)
		fail_msg("error '%s' does not say fy's file was replaced", errs);
	destroy_elsewhere(t);
	router_free(r);
	assert_int_equal(count_lines(trace, "fini\n"), 1);
	/* Once nothing holds the old file, the new one loads. */
	r = router_new(&cfg);
	reload(r, &both);
	router_free(r);
	assert_int_equal(count_lines(trace, "init\n"), 2);
	config_free(&cfg);
	config_free(&both);
	unlink(to);
}

static int
setup_dirs(void **state)
{
	const char *b = getenv("OCCAMY_BUILD");
	char rel[PATH_MAX];

	(void)state;
	snprintf(rel, sizeof(rel), "%s/tests/plugins", b ? b : "build");
	if (realpath(rel, plugin_dir) == NULL) {
		fprintf(stderr, "no plugin dir %s (set OCCAMY_BUILD)\n", rel);
		return -1;
	}
	snprintf(private_dir, sizeof(private_dir), "%s/tmp-loader-XXXXXX", plugin_dir);
	if (mkdtemp(private_dir) == NULL)
		return -1;
	return 0;
}

static int
teardown_dirs(void **state)
{
	char cmd[PATH_MAX + 16];

	(void)state;
	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", private_dir);
	return system(cmd) == 0 ? 0 : -1;
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_good_plugin_loads_and_routes_by_handler_header),
		cmocka_unit_test(test_unknown_or_bad_handler_is_an_invalid_message),
		cmocka_unit_test(test_abi_mismatch_is_refused_naming_both_versions),
		cmocka_unit_test(test_missing_entry_symbol_is_refused),
		cmocka_unit_test(test_missing_file_is_refused),
		cmocka_unit_test(test_not_an_elf_is_refused),
		cmocka_unit_test(test_group_or_world_writable_plugin_is_refused),
		cmocka_unit_test(test_plugin_in_a_world_writable_directory_is_refused),
		cmocka_unit_test(test_plugin_below_a_sticky_root_directory_is_accepted),
		cmocka_unit_test(test_init_failure_passes_on_the_plugins_message),
		cmocka_unit_test(test_reloads_that_change_the_options_pair_init_with_fini),
		cmocka_unit_test(test_unchanged_plugin_is_kept_across_reloads_without_init_or_fini),
		cmocka_unit_test(test_removed_plugin_is_finalised_on_the_main_thread_after_its_last_task),
		cmocka_unit_test(test_changed_options_start_a_new_instance_while_the_old_one_drains),
		cmocka_unit_test(test_replaced_file_keeps_the_loaded_instance_until_restart),
	};

	log_init(-1);
	return cmocka_run_group_tests(tests, setup_dirs, teardown_dirs);
}
