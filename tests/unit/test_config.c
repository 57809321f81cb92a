/*
 * test_config.c - occamy.ini parsing: defaults, every key, and one test per
 * kind of bad file, each checking the exact "FILE:LINE:" error it reports.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "config.h"

#ifndef OCCAMY_PLUGIN_DIR
#define OCCAMY_PLUGIN_DIR "/usr/local/lib/occamy/plugins"
#endif

/* inih's buffer is INI_MAX_LINE (200 in Debian's build) bytes: 198
 * characters, the newline and a NUL. */
#define MAX_LINE_CHARS 198

#define TMPDIR_TEMPLATE "/tmp/occamy-test-config.XXXXXX"

static char tmpdir[sizeof(TMPDIR_TEMPLATE)];
static char errbuf[8192];

static int
group_setup(void **state)
{
	(void)state;
	memcpy(tmpdir, TMPDIR_TEMPLATE, sizeof(tmpdir));
	return mkdtemp(tmpdir) == NULL ? -1 : 0;
}

static int
group_teardown(void **state)
{
	char path[512];
	struct dirent *de;
	DIR *d;

	(void)state;
	if ((d = opendir(tmpdir)) == NULL)
		return -1;
	while ((de = readdir(d)) != NULL) {
		if (de->d_name[0] == '.')
			continue;
		snprintf(path, sizeof(path), "%s/%s", tmpdir, de->d_name);
		unlink(path);
	}
	closedir(d);
	return rmdir(tmpdir);
}

/* Write text to tmpdir/name; the path is valid until the next call. */
static const char *
write_conf(const char *name, const char *text)
{
	static char path[512];
	FILE *fp;

	snprintf(path, sizeof(path), "%s/%s.ini", tmpdir, name);
	fp = fopen(path, "w");
	assert_non_null(fp);
	assert_int_equal(fputs(text, fp) >= 0, 1);
	assert_int_equal(fclose(fp), 0);
	return path;
}

static int
load_text(const char *name, const char *text, struct config *c)
{
	return config_load(write_conf(name, text), c, errbuf, sizeof(errbuf));
}

static size_t
count_lines(const char *s)
{
	size_t n = 0;

	if (*s == '\0')
		return 0;
	for (n = 1; *s != '\0'; s++)
		n += *s == '\n';
	return n;
}

static void
assert_zeroed(const struct config *c)
{
	static const struct config zero;

	assert_memory_equal(c, &zero, sizeof(zero));
}

/* Every key of struct config: where it is, and what it holds by default
 * and after full_file below (which sets each key to something else). */
enum want_type { W_UINT, W_BOOL, W_STR };
struct key_want {
	const char *key;
	size_t off;
	enum want_type type;
	const char *dflt, *full; /* numbers and booleans as text too */
};

#define WANT(field, type, dflt, full) {#field, offsetof(struct config, field), type, dflt, full}
static const struct key_want key_wants[] = {
	WANT(expansion_period_ms, W_UINT, "1000", "250"),
	WANT(expansion_slot_buffer, W_UINT, "0", "2"),
	WANT(kill_timeout_ms, W_UINT, "1000", "3000"),
	WANT(shutdown_grace_s, W_UINT, "30", "0"),
	WANT(header_task_id, W_STR, "task-id", "x-task"),
	WANT(header_handler, W_STR, "handler", "x-handler"),
	WANT(default_handler, W_STR, "", "tsp"),
	WANT(external_queue_max, W_UINT, "1024", "0"),
	WANT(external_ttl_s, W_UINT, "60", "600"),
	WANT(plugin_dir, W_STR, OCCAMY_PLUGIN_DIR, "/opt/occamy/plugins"),
	WANT(helper_priority, W_STR, "idle", "normal"),
	WANT(state_dir, W_STR, "/var/lib/occamy", "/srv/occamy"),
	WANT(crash_limit, W_UINT, "2", "0"),
	WANT(uri, W_STR, "amqp://guest@127.0.0.1:5672/", "amqps://worker@broker.example:5671/prod"),
	WANT(password_file, W_STR, "", "/etc/occamy/pw"),
	WANT(heartbeat_s, W_UINT, "30", "0"),
	WANT(tls_ca, W_STR, "", "/etc/ssl/ca.pem"),
	WANT(tls_cert, W_STR, "", "/etc/ssl/c.pem"),
	WANT(tls_key, W_STR, "", "/etc/ssl/c.key"),
	WANT(tls_verify_peer, W_BOOL, "1", "0"),
	WANT(tls_verify_hostname, W_BOOL, "1", "0"),
	WANT(request_queue, W_STR, "occamy.requests", "rq"),
	WANT(request_exchange, W_STR, "occamy.requests", "rx"),
	WANT(control_exchange, W_STR, "occamy.control", "cx"),
	WANT(dead_letter_exchange, W_STR, "occamy.dead", "dx"),
	WANT(dead_letter_queue, W_STR, "occamy.dead", "dq"),
	WANT(queue_type, W_STR, "classic", "quorum"),
	WANT(prefetch, W_UINT, "0", "65535"),
	WANT(delivery_limit, W_UINT, "5", "0"),
	WANT(retry_delay_ms, W_UINT, "1000", "0"),
	WANT(retry_delay_max_ms, W_UINT, "60000", "5000"),
	WANT(metrics_listen, W_STR, "", "[::1]:9100"),
	WANT(metrics_window, W_UINT, "10", "1000"),
	WANT(metrics_sample_s, W_UINT, "10", "3600"),
};
#undef WANT

/* Each key of c against its column of key_wants (full or default). */
static void
assert_keys(const struct config *c, bool full)
{
	for (size_t i = 0; i < sizeof(key_wants) / sizeof(key_wants[0]); i++) {
		const struct key_want *w = &key_wants[i];
		const char *want = full ? w->full : w->dflt;
		const char *field = (const char *)c + w->off;
		char got[32];

		switch (w->type) {
		case W_UINT:
			snprintf(got, sizeof(got), "%u", *(const unsigned *)(const void *)field);
			break;
		case W_BOOL:
			snprintf(got, sizeof(got), "%d", *(const bool *)(const void *)field);
			break;
		case W_STR:
			if (strcmp(*(char *const *)(const void *)field, want) != 0)
				fail_msg("%s: \"%s\", want \"%s\"", w->key,
					 *(char *const *)(const void *)field, want);
			continue;
		}
		if (strcmp(got, want) != 0)
			fail_msg("%s: %s, want %s", w->key, got, want);
	}
}

static void
test_empty_sections_give_documented_defaults(void **state)
{
	struct config c;

	(void)state;
	assert_int_equal(load_text("defaults", "[server]\n[amqp]\n[metrics]\n", &c), 0);
	assert_string_equal(errbuf, "");
	assert_non_null(strstr(c.file, "defaults.ini"));

	assert_int_equal(c.slots, (unsigned)sysconf(_SC_NPROCESSORS_ONLN));
	assert_keys(&c, false);
	assert_null(c.plugins);
	assert_int_equal(c.nplugins, 0);

	config_free(&c);
	assert_zeroed(&c);
	config_free(&c); /* a freed config frees again harmlessly */
}

static void
test_empty_file_is_valid_and_all_defaults(void **state)
{
	struct config c;

	(void)state;
	assert_int_equal(load_text("empty", "", &c), 0);
	assert_string_equal(errbuf, "");
	assert_keys(&c, false);
	config_free(&c);
}

static const char full_file[] =
	"; every key, none at its default\n"
	"[server]\n"
	"slots = 8\n"
	"expansion_period_ms = 250\n"
	"expansion_slot_buffer = 2\n"
	"kill_timeout_ms = 3000\n"
	"shutdown_grace_s = 0\n"
	"header_task_id = x-task\n"
	"header_handler = x-handler\n"
	"default_handler = tsp\n"
	"external_queue_max = 0\n"
	"external_ttl_s = 600\n"
	"plugin_dir = /opt/occamy/plugins\n"
	"helper_priority = normal\n"
	"state_dir = /srv/occamy\n"
	"crash_limit = 0\n"
	"\n"
	"[amqp]\n"
	"uri = amqps://worker@broker.example:5671/prod\n"
	"password_file = /etc/occamy/pw\n"
	"heartbeat_s = 0\n"
	"tls_ca = /etc/ssl/ca.pem\n"
	"tls_cert = /etc/ssl/c.pem\n"
	"tls_key = /etc/ssl/c.key\n"
	"tls_verify_peer = no\n"
	"tls_verify_hostname = off\n"
	"request_queue = rq\n"
	"request_exchange = rx\n"
	"control_exchange = cx\n"
	"dead_letter_exchange = dx\n"
	"dead_letter_queue = dq\n"
	"queue_type = quorum\n"
	"prefetch = 65535\n"
	"delivery_limit = 0\n"
	"retry_delay_ms = 0\n"
	"retry_delay_max_ms = 5000\n"
	"\n"
	"[metrics]\n"
	"listen = [::1]:9100\n"
	"window = 1000\n"
	"sample_s = 3600\n"
	"\n"
	"[plugin tsp]\n"    /* line 43 */
	"path = tsp.so\n"
	"[plugin Echo_2-b]\n" /* line 45 */
	"path = /abs/echo.so\n";

static void
test_every_key_is_parsed_into_its_field(void **state)
{
	struct config c;

	(void)state;
	assert_int_equal(load_text("full", full_file, &c), 0);
	assert_string_equal(errbuf, "");

	assert_int_equal(c.slots, 8);
	assert_keys(&c, true);

	assert_int_equal(c.nplugins, 2);
	assert_string_equal(c.plugins[0].name, "tsp");
	assert_string_equal(c.plugins[0].path, "tsp.so");
	assert_int_equal(c.plugins[0].line, 43);
	assert_int_equal(c.plugins[0].noptions, 0);
	assert_null(c.plugins[0].options);
	assert_string_equal(c.plugins[1].name, "Echo_2-b");
	assert_string_equal(c.plugins[1].path, "/abs/echo.so");
	assert_int_equal(c.plugins[1].line, 45);
	config_free(&c);
}

static void
test_plugin_options_keep_file_order_and_line_numbers(void **state)
{
	struct config c;
	const struct plugin_option *o;

	(void)state;
	assert_int_equal(load_text("options",
				   "[plugin tsp]\n"      /* 1 */
				   "zeta = 1\n"          /* 2 */
				   "# comment\n"         /* 3 */
				   "alpha = two words\n" /* 4 */
				   "path = tsp.so\n"     /* 5 */
				   "empty =\n"           /* 6 */
				   "url = http://x:1/a;b ; comment\n" /* 7 */
				   "[plugin other]\n"    /* 8 */
				   "path = o.so\n"       /* 9 */
				   "mode: fast\n",       /* 10 */
				   &c),
			 0);
	assert_string_equal(errbuf, "");
	assert_int_equal(c.nplugins, 2);
	assert_string_equal(c.plugins[0].path, "tsp.so");
	assert_int_equal(c.plugins[0].noptions, 4);
	o = c.plugins[0].options;
	assert_string_equal(o[0].key, "zeta");
	assert_string_equal(o[0].value, "1");
	assert_int_equal(o[0].line, 2);
	assert_string_equal(o[1].key, "alpha");
	assert_string_equal(o[1].value, "two words");
	assert_int_equal(o[1].line, 4);
	assert_string_equal(o[2].key, "empty");
	assert_string_equal(o[2].value, "");
	assert_int_equal(o[2].line, 6);
	assert_string_equal(o[3].key, "url");
	assert_string_equal(o[3].value, "http://x:1/a;b");
	assert_int_equal(o[3].line, 7);

	assert_string_equal(c.plugins[1].name, "other");
	assert_int_equal(c.plugins[1].line, 8);
	assert_int_equal(c.plugins[1].noptions, 1);
	assert_string_equal(c.plugins[1].options[0].key, "mode");
	assert_string_equal(c.plugins[1].options[0].value, "fast");
	assert_int_equal(c.plugins[1].options[0].line, 10);
	config_free(&c);
}

static void
test_uri_list_of_three_is_kept_raw_and_each_checked(void **state)
{
	struct config c;
	const char *path;

	(void)state;
	path = write_conf("uris",
			  "[amqp]\n"
			  "uri = amqp://w:s3cret@10.0.0.1:5672/prod \t"
			  "amqps://w@[::1]:5671/  amqp://n3/%2F\n");
	if (config_load(path, &c, errbuf, sizeof(errbuf)) != 0)
		fail_msg("%s", errbuf);
	assert_string_equal(c.uri, "amqp://w:s3cret@10.0.0.1:5672/prod \t"
				   "amqps://w@[::1]:5671/  amqp://n3/%2F");
	assert_int_equal(config_uri_count(c.uri), 3);
	config_free(&c);
}

static void
test_uri_count_and_nth_split_at_any_whitespace(void **state)
{
	const char *list = "  amqp://a/ \t amqps://b:1/x\n\tamqp://c ";
	char buf[32];

	(void)state;
	assert_int_equal(config_uri_count(""), 0);
	assert_int_equal(config_uri_count(" \t "), 0);
	assert_int_equal(config_uri_count("amqp://a/"), 1);
	assert_int_equal(config_uri_count(list), 3);

	assert_int_equal(config_uri_nth(list, 0, buf, sizeof(buf)), 0);
	assert_string_equal(buf, "amqp://a/");
	assert_int_equal(config_uri_nth(list, 1, buf, sizeof(buf)), 0);
	assert_string_equal(buf, "amqps://b:1/x");
	assert_int_equal(config_uri_nth(list, 2, buf, sizeof(buf)), 0);
	assert_string_equal(buf, "amqp://c");
	assert_int_equal(config_uri_nth(list, 3, buf, sizeof(buf)), -1);
	assert_string_equal(buf, "");
	/* too long for buf: refused, not cut */
	assert_int_equal(config_uri_nth(list, 1, buf, 13), -1);
	assert_string_equal(buf, "");
	assert_int_equal(config_uri_nth(list, 1, buf, 14), 0);
	assert_string_equal(buf, "amqps://b:1/x");
	assert_int_equal(config_uri_nth("", 0, buf, sizeof(buf)), -1);
}

static void
test_uri_split_gives_a_null_terminated_array(void **state)
{
	size_t n = 99;
	char **v;

	(void)state;
	v = config_uri_split(" amqp://a/ amqp://b/\tamqp://c/ ", &n);
	assert_int_equal(n, 3);
	assert_string_equal(v[0], "amqp://a/");
	assert_string_equal(v[1], "amqp://b/");
	assert_string_equal(v[2], "amqp://c/");
	assert_null(v[3]);
	config_uri_split_free(v);

	v = config_uri_split("", &n);
	assert_int_equal(n, 0);
	assert_null(v[0]);
	config_uri_split_free(v);
	config_uri_split_free(NULL);
}

static void
test_uri_start_is_in_range_stable_and_spreads(void **state)
{
	unsigned seen[3] = {0, 0, 0};
	unsigned long pid;
	size_t i;

	(void)state;
	assert_int_equal(config_uri_start(0, "h", 1), 0);
	assert_int_equal(config_uri_start(1, "h", 1234), 0);
	assert_int_equal(config_uri_start(3, "worker-1", 4242),
			 config_uri_start(3, "worker-1", 4242));
	assert_int_equal(config_uri_start(3, NULL, 7), config_uri_start(3, "", 7));
	/* one host, consecutive pids: every node gets a fair share */
	for (pid = 1000; pid < 1300; pid++) {
		i = config_uri_start(3, "worker-1", pid);
		assert_true(i < 3);
		seen[i]++;
	}
	for (i = 0; i < 3; i++)
		assert_in_range(seen[i], 60, 140);
	/* one pid, many hosts */
	memset(seen, 0, sizeof(seen));
	for (pid = 0; pid < 300; pid++) {
		char host[32];

		snprintf(host, sizeof(host), "node%lu.example", pid);
		seen[config_uri_start(3, host, 1)]++;
	}
	for (i = 0; i < 3; i++)
		assert_in_range(seen[i], 60, 140);
}

static void
test_bad_uri_in_a_list_is_named_by_position_not_echoed(void **state)
{
	struct config c;
	const char *path;

	(void)state;
	path = write_conf("baduri",
			  "[amqp]\n"
			  "uri = amqp://a:pw1@h1/ amqp://someone:Raw/Sl4sh-s3cret@h2/ "
			  "amqp://c:pw3@h3/\n");
	assert_int_equal(config_load(path, &c, errbuf, sizeof(errbuf)), -1);
	assert_non_null(strstr(errbuf, ":2: [amqp] key 'uri': URI 2 of 3 cannot be parsed as "
				       "amqp[s]://user[:password]@host[:port]/[vhost]"));
	assert_null(strstr(errbuf, "s3cret"));
	assert_null(strstr(errbuf, "pw1"));
	assert_null(strstr(errbuf, "pw3"));
	assert_null(strstr(errbuf, "h2"));
	assert_zeroed(&c);
}

static void
test_multiple_errors_are_all_reported_in_line_order(void **state)
{
	struct config c;
	char want[4096];
	const char *path;

	(void)state;
	path = write_conf("multi",
			  "[server]\n"        /* 1 */
			  "slots = 0\n"       /* 2 */
			  "bogus = 1\n"       /* 3 */
			  "[amqp]\n"          /* 4 */
			  "uri = http://x\n"  /* 5 */
			  "[plugin p]\n"      /* 6: no path, found at the end */
			  "k = v\n"           /* 7 */
			  "[metrics]\n"       /* 8 */
			  "window = x\n");    /* 9 */
	assert_int_equal(config_load(path, &c, errbuf, sizeof(errbuf)), -1);
	snprintf(want, sizeof(want),
		 "%1$s:2: [server] key 'slots': 0 is out of range 1..1024\n"
		 "%1$s:3: [server] key 'bogus': unknown key\n"
		 "%1$s:5: [amqp] key 'uri': must start with "
		 "amqp:// or amqps://\n"
		 "%1$s:6: [plugin p] key 'path': missing; every plugin needs one\n"
		 "%1$s:9: [metrics] key 'window': 'x' is not a decimal integer",
		 path);
	assert_string_equal(errbuf, want);
	assert_zeroed(&c);
}

static void
test_overlong_line_is_an_error_and_later_lines_keep_their_numbers(void **state)
{
	struct config c;
	char text[1024], want[1024];
	const char *path;

	(void)state;
	/* inih would split this comment and read its tail as a key */
	snprintf(text, sizeof(text),
		 "[server]\n"
		 "# %0300d = 1\n"
		 "slots = 4\n"
		 "bogus = 1\n", 0);
	path = write_conf("long", text);
	assert_int_equal(config_load(path, &c, errbuf, sizeof(errbuf)), -1);
	snprintf(want, sizeof(want),
		 "%1$s:2: line too long (306 characters, at most %2$d)\n"
		 "%1$s:4: [server] key 'bogus': unknown key",
		 path, MAX_LINE_CHARS);
	assert_string_equal(errbuf, want);
	assert_zeroed(&c);
}

static void
test_line_at_inih_limit_is_read_whole(void **state)
{
	struct config c;
	char text[1024], value[512];
	size_t vlen = MAX_LINE_CHARS - strlen("k = ");

	(void)state;
	memset(value, 'v', vlen);
	value[vlen] = '\0';
	snprintf(text, sizeof(text), "[plugin p]\npath = p.so\nk = %s\nj = 1\n",
		 value);
	assert_int_equal(load_text("limit", text, &c), 0);
	assert_string_equal(errbuf, "");
	assert_int_equal(c.plugins[0].noptions, 2);
	assert_string_equal(c.plugins[0].options[0].value, value);
	assert_int_equal(c.plugins[0].options[1].line, 4);
	config_free(&c);

	/* one character more is refused */
	snprintf(text, sizeof(text), "[plugin p]\npath = p.so\nk = %sv\n", value);
	assert_int_equal(load_text("limit", text, &c), -1);
	assert_non_null(strstr(errbuf, ":3: line too long (199 characters"));
	assert_int_equal(count_lines(errbuf), 1);
}

static void
test_every_boolean_spelling_is_accepted(void **state)
{
	static const struct {
		const char *word;
		bool value;
	} words[] = {
		{"yes", true}, {"no", false}, {"true", true}, {"false", false},
		{"on", true},  {"off", false}, {"1", true},   {"0", false},
		{"YES", true}, {"Off", false},
	};
	struct config c;
	char text[128];
	size_t i;

	(void)state;
	for (i = 0; i < sizeof(words) / sizeof(words[0]); i++) {
		snprintf(text, sizeof(text),
			 "[amqp]\ntls_verify_peer = %s\ntls_verify_hostname = %s\n",
			 words[i].word, words[i].word);
		assert_int_equal(load_text("bool", text, &c), 0);
		assert_int_equal(c.tls_verify_peer, words[i].value);
		assert_int_equal(c.tls_verify_hostname, words[i].value);
		config_free(&c);
	}
}

static void
test_range_limits_are_inclusive(void **state)
{
	struct config c;

	(void)state;
	assert_int_equal(load_text("limits",
				   "[server]\n"
				   "slots = 1024\n"
				   "expansion_slot_buffer = 1023\n"
				   "kill_timeout_ms = 600000\n"
				   "expansion_period_ms = 3600000\n"
				   "shutdown_grace_s = 86400\n"
				   "external_queue_max = 1000000\n"
				   "[amqp]\n"
				   "heartbeat_s = 3600\n"
				   "delivery_limit = 1000\n"
				   "[metrics]\n"
				   "window = 1\n"
				   "sample_s = 1\n",
				   &c),
			 0);
	assert_int_equal(c.slots, 1024);
	assert_int_equal(c.expansion_slot_buffer, 1023);
	assert_int_equal(c.kill_timeout_ms, 600000);
	assert_int_equal(c.expansion_period_ms, 3600000);
	assert_int_equal(c.shutdown_grace_s, 86400);
	assert_int_equal(c.external_queue_max, 1000000);
	assert_int_equal(c.heartbeat_s, 3600);
	assert_int_equal(c.delivery_limit, 1000);
	assert_int_equal(c.metrics_window, 1);
	assert_int_equal(c.metrics_sample_s, 1);
	config_free(&c);

	assert_int_equal(load_text("limits", "[server]\nslots = 1\n"
				   "kill_timeout_ms = 1\n", &c), 0);
	assert_int_equal(c.slots, 1);
	assert_int_equal(c.kill_timeout_ms, 1);
	config_free(&c);
}

static void
test_inline_comment_after_blank_is_stripped(void **state)
{
	struct config c;

	(void)state;
	assert_int_equal(load_text("inline",
				   "[server]   ; the server\n"
				   "slots = 3 ; three\n"
				   "header_task_id = a;b\n",
				   &c),
			 0);
	assert_int_equal(c.slots, 3);
	assert_string_equal(c.header_task_id, "a;b");
	config_free(&c);
}

static void
test_crlf_line_endings_and_utf8_bom_are_accepted(void **state)
{
	struct config c;

	(void)state;
	assert_int_equal(load_text("crlf",
				   "\xEF\xBB\xBF[server]\r\nslots = 5\r\n"
				   "[metrics]\r\nlisten = localhost:1\r\n",
				   &c),
			 0);
	assert_string_equal(errbuf, "");
	assert_int_equal(c.slots, 5);
	assert_string_equal(c.metrics_listen, "localhost:1");
	config_free(&c);
}

static void
test_error_list_is_cut_to_errbuf_and_terminated(void **state)
{
	struct config c;
	char small[24];
	const char *path;

	(void)state;
	path = write_conf("cut", "[server]\nslots = 0\nbogus = 1\n");
	memset(small, 'x', sizeof(small));
	assert_int_equal(config_load(path, &c, small, sizeof(small)), -1);
	assert_int_equal(strlen(small), sizeof(small) - 1);
	assert_memory_equal(small, path, sizeof(small) - 1);
	assert_zeroed(&c);

	/* errlen 0: nothing written, still an error */
	assert_int_equal(config_load(path, &c, NULL, 0), -1);
	assert_zeroed(&c);
}

static char *
slurp(const char *path)
{
	char *text;
	long len;
	FILE *fp;

	fp = fopen(path, "r");
	if (fp == NULL)
		fail_msg("cannot open %s (run from the repository root or set "
			 "OCCAMY_ROOT)", path);
	assert_int_equal(fseek(fp, 0, SEEK_END), 0);
	len = ftell(fp);
	assert_true(len > 0);
	rewind(fp);
	text = malloc((size_t)len + 1);
	assert_non_null(text);
	assert_int_equal(fread(text, 1, (size_t)len, fp), (size_t)len);
	text[len] = '\0';
	fclose(fp);
	return text;
}

static const char *
root_path(const char *rel)
{
	static char path[1024];
	const char *root = getenv("OCCAMY_ROOT");

	snprintf(path, sizeof(path), "%s/%s", root ? root : ".", rel);
	return path;
}

static void
test_example_config_parses_and_shows_the_defaults(void **state)
{
	struct config e, d;

	(void)state;
	if (config_load(root_path("conf/occamy.ini"), &e, errbuf,
			sizeof(errbuf)) != 0)
		fail_msg("conf/occamy.ini: %s", errbuf);
	assert_int_equal(load_text("defaults2", "", &d), 0);

	/* the values it sets on purpose */
	assert_string_equal(e.plugin_dir, "/usr/local/lib/occamy/plugins");
	assert_string_equal(e.metrics_listen, "127.0.0.1:9464");
	assert_int_equal(e.nplugins, 1);
	assert_string_equal(e.plugins[0].name, "tsp");
	assert_string_equal(e.plugins[0].path, "tsp.so");
	assert_int_equal(e.plugins[0].noptions, 0);

	/* everything else is shown at its default */
	assert_int_equal(e.slots, d.slots);
	assert_int_equal(e.expansion_period_ms, d.expansion_period_ms);
	assert_int_equal(e.expansion_slot_buffer, d.expansion_slot_buffer);
	assert_int_equal(e.kill_timeout_ms, d.kill_timeout_ms);
	assert_int_equal(e.shutdown_grace_s, d.shutdown_grace_s);
	assert_string_equal(e.header_task_id, d.header_task_id);
	assert_string_equal(e.header_handler, d.header_handler);
	assert_string_equal(e.default_handler, d.default_handler);
	assert_int_equal(e.external_queue_max, d.external_queue_max);
	assert_int_equal(e.external_ttl_s, d.external_ttl_s);
	assert_string_equal(e.helper_priority, d.helper_priority);
	assert_string_equal(e.uri, d.uri);
	assert_string_equal(e.password_file, d.password_file);
	assert_int_equal(e.heartbeat_s, d.heartbeat_s);
	assert_string_equal(e.tls_ca, d.tls_ca);
	assert_string_equal(e.tls_cert, d.tls_cert);
	assert_string_equal(e.tls_key, d.tls_key);
	assert_int_equal(e.tls_verify_peer, d.tls_verify_peer);
	assert_int_equal(e.tls_verify_hostname, d.tls_verify_hostname);
	assert_string_equal(e.request_queue, d.request_queue);
	assert_string_equal(e.request_exchange, d.request_exchange);
	assert_string_equal(e.control_exchange, d.control_exchange);
	assert_string_equal(e.dead_letter_exchange, d.dead_letter_exchange);
	assert_string_equal(e.dead_letter_queue, d.dead_letter_queue);
	assert_string_equal(e.queue_type, d.queue_type);
	assert_int_equal(e.prefetch, d.prefetch);
	assert_int_equal(e.delivery_limit, d.delivery_limit);
	assert_int_equal(e.metrics_window, d.metrics_window);
	assert_int_equal(e.metrics_sample_s, d.metrics_sample_s);
	config_free(&e);
	config_free(&d);
}

static void
test_example_config_and_man_page_name_every_key(void **state)
{
	static const char *const keys[] = {
		"slots", "expansion_period_ms", "expansion_slot_buffer",
		"kill_timeout_ms", "shutdown_grace_s", "header_task_id",
		"header_handler", "default_handler", "external_queue_max",
		"external_ttl_s", "plugin_dir", "helper_priority", "state_dir", "crash_limit", "uri",
		"password_file", "heartbeat_s", "tls_ca", "tls_cert",
		"tls_key", "tls_verify_peer", "tls_verify_hostname",
		"request_queue", "request_exchange", "control_exchange",
		"dead_letter_exchange", "dead_letter_queue", "queue_type",
		"prefetch", "delivery_limit", "retry_delay_ms", "retry_delay_max_ms",
		"listen", "window", "sample_s", "path",
	};
	char *ini, *man, needle[64], missing[1024] = "";
	size_t i;

	(void)state;
	ini = slurp(root_path("conf/occamy.ini"));
	man = slurp(root_path("man/occamy.ini.5"));
	for (i = 0; i < sizeof(keys) / sizeof(keys[0]); i++) {
		/* a line "KEY =" or, commented out, "#KEY =" */
		snprintf(needle, sizeof(needle), "\n%s =", keys[i]);
		if (strstr(ini, needle) == NULL) {
			snprintf(needle, sizeof(needle), "\n#%s =", keys[i]);
			if (strstr(ini, needle) == NULL)
				strcat(strcat(missing, " occamy.ini:"), keys[i]);
		}
		/* an item ".It Cm KEY" of a key list */
		snprintf(needle, sizeof(needle), ".It Cm %s ", keys[i]);
		if (strstr(man, needle) == NULL)
			strcat(strcat(missing, " occamy.ini.5:"), keys[i]);
	}
	free(ini);
	free(man);
	if (missing[0] != '\0')
		fail_msg("keys not documented:%s", missing);
}

/*
 * Bad files: each row is its own test, named for the behaviour it proves.
 * want is what follows the file name in the report, e.g. ":2: [server] ...".
 */
struct bad_file {
	const char *name;
	const char *text; /* NULL: the file does not exist */
	const char *want;
	size_t nerrors;
};

static const struct bad_file bad_files[] = {
	{"test_unknown_section_names_file_line_and_section_once",
	 "[server]\n[servers]\nslots = 2\nfoo = 1\n",
	 ":2: [servers]: unknown section (expected server, amqp, metrics or "
	 "plugin NAME)", 1},
	{"test_unknown_key_names_file_line_and_key",
	 "[server]\nslots = 2\nslot = 4\n",
	 ":3: [server] key 'slot': unknown key", 1},
	{"test_key_of_one_section_is_unknown_in_another",
	 "[amqp]\nslots = 2\n",
	 ":2: [amqp] key 'slots': unknown key", 1},
	{"test_key_before_any_section_is_refused",
	 "slots = 2\n[server]\n",
	 ":1: key 'slots': outside of any section", 1},
	{"test_non_numeric_value_is_not_a_decimal_integer",
	 "[server]\nslots = 4x\n",
	 ":2: [server] key 'slots': '4x' is not a decimal integer", 1},
	{"test_hex_value_is_not_a_decimal_integer",
	 "[server]\nslots = 0x10\n",
	 ":2: [server] key 'slots': '0x10' is not a decimal integer", 1},
	{"test_plus_sign_is_not_a_decimal_integer",
	 "[server]\nslots = +4\n",
	 ":2: [server] key 'slots': '+4' is not a decimal integer", 1},
	{"test_empty_number_is_not_a_decimal_integer",
	 "[amqp]\nprefetch =\n",
	 ":2: [amqp] key 'prefetch': '' is not a decimal integer", 1},
	{"test_negative_number_is_refused_not_wrapped",
	 "[server]\nkill_timeout_ms = -1\n",
	 ":2: [server] key 'kill_timeout_ms': '-1' is negative; expected "
	 "1..600000", 1},
	{"test_slots_above_1024_is_out_of_range",
	 "[server]\nslots = 1025\n",
	 ":2: [server] key 'slots': 1025 is out of range 1..1024", 1},
	{"test_zero_slots_is_out_of_range",
	 "[server]\nslots = 0\n",
	 ":2: [server] key 'slots': 0 is out of range 1..1024", 1},
	{"test_number_beyond_unsigned_long_is_out_of_range",
	 "[server]\nslots = 99999999999999999999999\n",
	 ":2: [server] key 'slots': 99999999999999999999999 is out of range "
	 "1..1024", 1},
	{"test_kill_timeout_above_600000_is_out_of_range",
	 "[server]\nkill_timeout_ms = 600001\n",
	 ":2: [server] key 'kill_timeout_ms': 600001 is out of range 1..600000",
	 1},
	{"test_zero_expansion_period_is_out_of_range",
	 "[server]\nexpansion_period_ms = 0\n",
	 ":2: [server] key 'expansion_period_ms': 0 is out of range 1..3600000",
	 1},
	{"test_shutdown_grace_above_a_day_is_out_of_range",
	 "[server]\nshutdown_grace_s = 86401\n",
	 ":2: [server] key 'shutdown_grace_s': 86401 is out of range 0..86400",
	 1},
	{"test_external_queue_max_above_a_million_is_out_of_range",
	 "[server]\nexternal_queue_max = 1000001\n",
	 ":2: [server] key 'external_queue_max': 1000001 is out of range "
	 "0..1000000", 1},
	{"test_heartbeat_above_an_hour_is_out_of_range",
	 "[amqp]\nheartbeat_s = 3601\n",
	 ":2: [amqp] key 'heartbeat_s': 3601 is out of range 0..3600", 1},
	{"test_prefetch_above_65535_is_out_of_range",
	 "[amqp]\nprefetch = 65536\n",
	 ":2: [amqp] key 'prefetch': 65536 is out of range 0..65535", 1},
	{"test_delivery_limit_above_1000_is_out_of_range",
	 "[amqp]\ndelivery_limit = 1001\n",
	 ":2: [amqp] key 'delivery_limit': 1001 is out of range 0..1000", 1},
	{"test_retry_delay_max_below_retry_delay_is_refused",
	 "[amqp]\nretry_delay_ms = 5000\nretry_delay_max_ms = 1000\n",
	 ":3: [amqp] key 'retry_delay_max_ms': 1000 must be at least retry_delay_ms (5000)", 1},
	{"test_zero_metrics_window_is_out_of_range",
	 "[metrics]\nwindow = 0\n",
	 ":2: [metrics] key 'window': 0 is out of range 1..1000", 1},
	{"test_metrics_sample_above_an_hour_is_out_of_range",
	 "[metrics]\nsample_s = 3601\n",
	 ":2: [metrics] key 'sample_s': 3601 is out of range 1..3600", 1},
	{"test_unknown_boolean_word_is_refused",
	 "[amqp]\ntls_verify_peer = maybe\n",
	 ":2: [amqp] key 'tls_verify_peer': 'maybe' is not a boolean "
	 "(yes/no, true/false, on/off, 1/0)", 1},
	{"test_unknown_queue_type_lists_the_choices",
	 "[amqp]\nqueue_type = lazy\n",
	 ":2: [amqp] key 'queue_type': 'lazy' is not one of: classic, quorum",
	 1},
	{"test_unknown_helper_priority_lists_the_choices",
	 "[server]\nhelper_priority = Idle\n",
	 ":2: [server] key 'helper_priority': 'Idle' is not one of: idle, "
	 "normal", 1},
	{"test_uri_without_amqp_scheme_is_refused_without_echoing_it",
	 "[amqp]\nuri = amqps//user:s3cret@127.0.0.1:5672/\n",
	 ":2: [amqp] key 'uri': must start with amqp:// or amqps://", 1},
	{"test_uri_that_rabbitmq_c_cannot_parse_is_refused",
	 "[amqp]\nuri = amqp://someone:Raw/Slash@127.0.0.1:5672/\n",
	 ":2: [amqp] key 'uri': cannot be parsed as "
	 "amqp[s]://user[:password]@host[:port]/[vhost]", 1},
	{"test_uri_with_a_bad_port_is_refused",
	 "[amqp]\nuri = amqp://h:99999/\n",
	 ":2: [amqp] key 'uri': cannot be parsed as", 1},
	{"test_empty_uri_is_refused",
	 "[amqp]\nuri =\n",
	 ":2: [amqp] key 'uri': must start with amqp:// or amqps://", 1},
	{"test_second_uri_without_scheme_is_named_by_position",
	 "[amqp]\nuri = amqp://h1/ h2:5672\n",
	 ":2: [amqp] key 'uri': URI 2 of 2 must start with amqp:// or amqps://", 1},
	{"test_first_of_three_uris_unparsable_is_named_by_position",
	 "[amqp]\nuri = amqp://[::1/ amqp://h2/ amqp://h3/\n",
	 ":2: [amqp] key 'uri': URI 1 of 3 cannot be parsed as", 1},
	{"test_default_handler_must_name_a_plugin_section",
	 "[server]\ndefault_handler = ghost\n[plugin noop]\npath = noop.so\n",
	 ":2: [server] key 'default_handler': 'ghost' names no [plugin] section", 1},
	{"test_metrics_listen_without_host_is_refused",
	 "[metrics]\nlisten = 9464\n",
	 ":2: [metrics] key 'listen': '9464' is not HOST:PORT (port "
	 "1..65535), or empty for off", 1},
	{"test_metrics_listen_port_zero_is_refused",
	 "[metrics]\nlisten = 127.0.0.1:0\n",
	 ":2: [metrics] key 'listen': '127.0.0.1:0' is not HOST:PORT", 1},
	{"test_metrics_listen_port_above_65535_is_refused",
	 "[metrics]\nlisten = 127.0.0.1:65536\n",
	 ":2: [metrics] key 'listen': '127.0.0.1:65536' is not HOST:PORT", 1},
	{"test_metrics_listen_bare_ipv6_is_refused",
	 "[metrics]\nlisten = ::1:9464\n",
	 ":2: [metrics] key 'listen': '::1:9464' is not HOST:PORT", 1},
	{"test_empty_header_name_is_refused",
	 "[server]\nheader_task_id =\n",
	 ":2: [server] key 'header_task_id': must not be empty", 1},
	{"test_duplicate_key_names_both_lines",
	 "[server]\nslots = 2\n\nslots = 3\n",
	 ":4: [server] key 'slots': duplicate key (first set on line 2)", 1},
	{"test_duplicate_server_section_is_refused",
	 "[server]\nslots = 2\n[amqp]\n[server]\n",
	 ":4: [server]: duplicate section (first on line 1)", 1},
	{"test_duplicate_plugin_section_names_both_lines",
	 "[plugin a]\npath = a.so\n[plugin a]\npath = b.so\n",
	 ":3: [plugin a]: duplicate section (first on line 1)", 1},
	{"test_plugin_without_path_is_refused_at_its_header",
	 "[plugin a]\nk = v\n[server]\n",
	 ":1: [plugin a] key 'path': missing; every plugin needs one", 1},
	{"test_empty_plugin_section_is_refused",
	 "[server]\n[plugin a]\n",
	 ":2: [plugin a] key 'path': missing; every plugin needs one", 1},
	{"test_empty_plugin_path_is_refused",
	 "[plugin a]\npath =\n",
	 ":2: [plugin a] key 'path': must not be empty", 1},
	{"test_duplicate_plugin_path_is_refused",
	 "[plugin a]\npath = a.so\npath = b.so\n",
	 ":3: [plugin a] key 'path': duplicate key (first set on line 2)", 1},
	{"test_duplicate_plugin_option_is_refused",
	 "[plugin a]\npath = a.so\nk = 1\nk = 2\n",
	 ":4: [plugin a] key 'k': duplicate key (first set on line 3)", 1},
	{"test_plugin_name_with_dot_is_refused",
	 "[plugin a.b]\npath = a.so\n",
	 ":1: [plugin a.b]: bad plugin name 'a.b' (letters, digits, '_' and "
	 "'-')", 1},
	{"test_plugin_section_without_name_is_refused",
	 "[plugin]\npath = a.so\n",
	 ":1: [plugin]: missing plugin name: use [plugin NAME]", 1},
	{"test_expansion_buffer_equal_to_slots_is_refused",
	 "[server]\nslots = 4\nexpansion_slot_buffer = 4\n",
	 ":3: [server] key 'expansion_slot_buffer': 4 must be less than slots "
	 "(4)", 1},
	{"test_tls_cert_without_key_is_refused",
	 "[amqp]\ntls_cert = /c.pem\n",
	 ":2: [amqp] key 'tls_cert': set without tls_key", 1},
	{"test_section_header_without_bracket_is_refused",
	 "[server\nslots = 2\n",
	 ":1: section header without ']'", 1},
	{"test_line_without_equals_sign_is_refused",
	 "[server]\nslots\n",
	 ":2: expected 'key = value', '[section]' or a comment", 1},
	{"test_indented_line_is_refused_as_continuation",
	 "[server]\nslots = 4\n  kill_timeout_ms = 5\n",
	 ":3: [server] key 'slots': indented line would continue its value; "
	 "multi-line values are not supported (unindent the line)", 1},
	{"test_overlong_line_is_refused_not_split",
	 "[plugin p]\npath = p.so\n"
	 "k = 0123456789012345678901234567890123456789012345678901234567890123"
	 "4567890123456789012345678901234567890123456789012345678901234567890"
	 "1234567890123456789012345678901234567890123456789012345678901234567"
	 "89 = split\n",
	 ":3: line too long (212 characters, at most 198)", 1},
	{"test_missing_file_reports_cannot_open_and_strerror",
	 NULL, ": cannot open: No such file or directory", 1},
};

static void
test_bad_file(void **state)
{
	const struct bad_file *b = *state;
	char path[512], want[1024];
	struct config c;

	if (b->text != NULL)
		snprintf(path, sizeof(path), "%s", write_conf(b->name, b->text));
	else
		snprintf(path, sizeof(path), "%s/no-such-file.ini", tmpdir);
	memset(errbuf, 0, sizeof(errbuf));
	assert_int_equal(config_load(path, &c, errbuf, sizeof(errbuf)), -1);
	snprintf(want, sizeof(want), "%s%s", path, b->want);
	if (strstr(errbuf, want) == NULL)
		fail_msg("expected\n  %s\nin\n  %s", want, errbuf);
	if (count_lines(errbuf) != b->nerrors)
		fail_msg("expected %zu error(s), got:\n%s", b->nerrors, errbuf);
	assert_zeroed(&c);
}

int
main(void)
{
	static const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_empty_sections_give_documented_defaults),
		cmocka_unit_test(test_empty_file_is_valid_and_all_defaults),
		cmocka_unit_test(test_every_key_is_parsed_into_its_field),
		cmocka_unit_test(test_plugin_options_keep_file_order_and_line_numbers),
		cmocka_unit_test(test_uri_list_of_three_is_kept_raw_and_each_checked),
		cmocka_unit_test(test_uri_count_and_nth_split_at_any_whitespace),
		cmocka_unit_test(test_uri_split_gives_a_null_terminated_array),
		cmocka_unit_test(test_uri_start_is_in_range_stable_and_spreads),
		cmocka_unit_test(test_bad_uri_in_a_list_is_named_by_position_not_echoed),
		cmocka_unit_test(test_multiple_errors_are_all_reported_in_line_order),
		cmocka_unit_test(test_overlong_line_is_an_error_and_later_lines_keep_their_numbers),
		cmocka_unit_test(test_line_at_inih_limit_is_read_whole),
		cmocka_unit_test(test_every_boolean_spelling_is_accepted),
		cmocka_unit_test(test_range_limits_are_inclusive),
		cmocka_unit_test(test_inline_comment_after_blank_is_stripped),
		cmocka_unit_test(test_crlf_line_endings_and_utf8_bom_are_accepted),
		cmocka_unit_test(test_error_list_is_cut_to_errbuf_and_terminated),
		cmocka_unit_test(test_example_config_parses_and_shows_the_defaults),
		cmocka_unit_test(test_example_config_and_man_page_name_every_key),
	};
	enum { NBAD = sizeof(bad_files) / sizeof(bad_files[0]) };
	struct CMUnitTest bad[NBAD];
	size_t i;
	int failed;

	for (i = 0; i < NBAD; i++) {
		bad[i] = (struct CMUnitTest){
			.name = bad_files[i].name,
			.test_func = test_bad_file,
			.initial_state = (void *)&bad_files[i],
		};
	}
	failed = cmocka_run_group_tests_name("config", tests, group_setup,
					     group_teardown);
	failed += _cmocka_run_group_tests("config_bad_files", bad, NBAD,
					  group_setup, group_teardown);
	return failed != 0;
}
