/*
 * test_transport.c - the transport's pure parts, without a broker: the
 * settlement policy (what each outcome means on the wire), the reconnect
 * backoff, and the conversions of amqp_fields.c (header tables flattened
 * for plugins, copies with our headers, JSON text).
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ack_window.h"
#include "amqp_fields.h"
#include "backoff.h"
#include "config.h"
#include "log.h"
#include "transport.h"
#include "transport_int.h"

static void
test_policy_success_acks_or_replies_first(void **state)
{
	(void)state;
	assert_int_equal(settle_policy(SETTLE_ACK, true, false, 0, 5), SETTLE_DO_ACK);
	assert_int_equal(settle_policy(SETTLE_ACK, true, true, 0, 5), SETTLE_DO_REPLY);
	assert_int_equal(settle_policy(SETTLE_ACK, false, false, 0, 5), SETTLE_DO_ACK);
}

static void
test_policy_requeue_is_a_copy_for_requests_and_a_reject_for_control(void **state)
{
	(void)state;
	assert_int_equal(settle_policy(SETTLE_REQUEUE, true, true, 3, 5), SETTLE_DO_REQUEUE_COPY);
	assert_int_equal(settle_policy(SETTLE_REQUEUE, false, false, 0, 5),
			 SETTLE_DO_REJECT_REQUEUE);
}

static void
test_policy_retries_until_the_last_attempt_then_dead_letters(void **state)
{
	(void)state;
	/* delivery_limit 5: attempts 1..4 retry, attempt 5 is the last. */
	for (uint64_t before = 0; before < 4; before++)
		assert_int_equal(settle_policy(SETTLE_RETRY, true, false, before, 5),
				 SETTLE_DO_RETRY);
	assert_int_equal(settle_policy(SETTLE_RETRY, true, false, 4, 5), SETTLE_DO_DEAD_LETTER);
	assert_int_equal(settle_policy(SETTLE_RETRY, true, false, 99, 5), SETTLE_DO_DEAD_LETTER);
	assert_int_equal(settle_policy(SETTLE_RETRY, true, false, 0, 1), SETTLE_DO_DEAD_LETTER);
	/* 0: no limit. */
	assert_int_equal(settle_policy(SETTLE_RETRY, true, false, 100000, 0), SETTLE_DO_RETRY);
	/* A control message is never retried. */
	assert_int_equal(settle_policy(SETTLE_RETRY, false, false, 0, 5), SETTLE_DO_DEAD_LETTER);
	assert_int_equal(settle_policy(SETTLE_DEAD_LETTER, true, true, 0, 5),
			 SETTLE_DO_DEAD_LETTER);
}

static void
test_backoff_doubles_to_the_cap_with_jitter_and_starts_over(void **state)
{
	struct backoff b;
	unsigned want = 100;

	(void)state;
	backoff_init(&b, 100, 10000, 42);
	for (int i = 0; i < 12; i++) {
		unsigned d = backoff_next(&b);
		assert_in_range(d, want / 2, want);
		want = want * 2 > 10000 ? 10000 : want * 2;
	}
	assert_in_range(backoff_now(&b), 5000, 10000);
	backoff_reset(&b);
	assert_in_range(backoff_now(&b), 50, 100);
	backoff_init(&b, 100, 10000, 0); /* a zero seed still jitters */
	assert_int_not_equal(backoff_random(&b), 0);
}

static void
test_headers_flatten_gives_plugins_c_strings_and_refuses_nul_keys(void **state)
{
	amqp_table_entry_t e[3];
	amqp_basic_properties_t p;
	struct occamy_header *items;
	size_t n;
	char why[256];

	(void)state;
	memset(&p, 0, sizeof(p));
	e[0] = entry_string("handler", "noop");
	e[1] = entry_int("n", -7);
	e[2] = entry_bool("b", true);
	p._flags = AMQP_BASIC_HEADERS_FLAG;
	p.headers = (amqp_table_t){3, e};
	assert_int_equal(headers_flatten(&p, &items, &n, why, sizeof(why)), 0);
	assert_int_equal(n, 3);
	assert_string_equal(items[0].key, "handler");
	assert_string_equal(items[0].str, "noop");
	assert_int_equal(items[1].kind, OCCAMY_VALUE_INT);
	assert_int_equal(items[1].i, -7);
	assert_int_equal(items[2].kind, OCCAMY_VALUE_BOOL);
	free(items);

	e[0].key = (amqp_bytes_t){12, "handler\0evil"};
	assert_int_equal(headers_flatten(&p, &items, &n, why, sizeof(why)), -1);
	assert_null(items);
	assert_non_null(strstr(why, "NUL"));
}

static void
test_copy_replaces_our_headers_and_drops_delivery_count_and_user_id(void **state)
{
	amqp_table_entry_t e[3], extra[1], *copy;
	amqp_basic_properties_t orig, p;

	(void)state;
	memset(&orig, 0, sizeof(orig));
	e[0] = entry_string("keep", "me");
	e[1] = entry_int("x-delivery-count", 3);
	e[2] = entry_int("x-occamy-attempts", 1);
	orig._flags = AMQP_BASIC_HEADERS_FLAG | AMQP_BASIC_USER_ID_FLAG;
	orig.user_id = amqp_cstring_bytes("someone-else");
	orig.headers = (amqp_table_t){3, e};
	extra[0] = entry_int("x-occamy-attempts", 2);
	copy = copy_properties(&orig, extra, 1, &p);
	assert_int_equal(p.headers.num_entries, 2);
	assert_true(bytes_equal(p.headers.entries[0].key, "keep"));
	assert_true(bytes_equal(p.headers.entries[1].key, "x-occamy-attempts"));
	assert_int_equal(p.headers.entries[1].value.value.i64, 2);
	assert_false(p._flags & AMQP_BASIC_USER_ID_FLAG);
	free(copy);
}

static void
test_json_escape_keeps_utf8_and_replaces_what_is_not(void **state)
{
	char out[128];

	(void)state;
	json_escape(out, sizeof(out), "a\"b\\c\n\xc3\xa9\xff\xe0\x80\x80z");
	assert_string_equal(out, "a\\\"b\\\\c\\u000a\xc3\xa9\\ufffd\\ufffd\\ufffd\\ufffdz");
}

/* ---- ack_window: which acks may be sent as one ---- */

static void
test_ack_window_acks_a_settled_prefix_as_one_and_the_rest_alone(void **state)
{
	struct ack_window w = {0};
	struct ack_send out[8];
	size_t n;

	(void)state;
	for (uint64_t tag = 1; tag <= 6; tag++)
		assert_true(ack_window_open(&w, tag));
	assert_int_equal(ack_window_take(&w, out, 8), 0);
	/* 1, 2, 3 settled; 4 still runs; 5 settled; 6 runs. */
	assert_true(ack_window_mark(&w, 2));
	assert_true(ack_window_mark(&w, 1));
	assert_true(ack_window_mark(&w, 3));
	assert_true(ack_window_mark(&w, 5));
	n = ack_window_take(&w, out, 8);
	assert_int_equal(n, 2);
	assert_int_equal(out[0].tag, 3);
	assert_true(out[0].multiple);
	assert_int_equal(out[1].tag, 5);
	assert_false(out[1].multiple); /* 4 is below it and still runs */
	assert_int_equal(ack_window_take(&w, out, 8), 0);
	/* 4 is rejected alone; 6 alone is one single ack. */
	ack_window_close(&w, 4);
	assert_true(ack_window_mark(&w, 6));
	n = ack_window_take(&w, out, 8);
	assert_int_equal(n, 1);
	assert_int_equal(out[0].tag, 6);
	assert_false(out[0].multiple);
	assert_int_equal(w.n, 0);
	/* Tags it never saw, or out of order, are the caller's to ack alone. */
	assert_false(ack_window_mark(&w, 6));
	assert_true(ack_window_open(&w, 9));
	assert_false(ack_window_open(&w, 8));
	ack_window_reset(&w);
	assert_false(ack_window_mark(&w, 9));
	assert_true(ack_window_open(&w, 1)); /* a new connection starts over */
	ack_window_free(&w);
}

/* Random opens, marks, closes and takes against a model: no ack ever
 * covers a tag that is open and not marked, and every marked tag is
 * acked exactly once (by a single ack or under a multiple one). */
static void
test_ack_window_never_covers_a_running_tag(void **state)
{
	enum { TAGS = 4000 };
	static unsigned char st[TAGS + 1]; /* 0 unseen, 1 open, 2 marked, 3 acked, 4 closed */
	struct ack_window w = {0};
	struct ack_send out[5];
	uint64_t next = 1, lo = 1;
	unsigned seed = 12345, multiples = 0, singles = 0;

	(void)state;
	memset(st, 0, sizeof(st));
	while (next <= TAGS || w.n > 0) {
		unsigned r = (seed = seed * 1103515245u + 12345u) >> 16;
		/* Mostly near the oldest open tag, as a FIFO of slots would be. */
		uint64_t span = next - lo > 8 ? 8 : next - lo, tag = span > 0 ? lo + r % span : 0;

		switch (r % 5) {
		case 0:
		case 1:
			if (next <= TAGS) {
				assert_true(ack_window_open(&w, next));
				st[next++] = 1;
			} else if (tag && st[tag] == 1) {
				st[tag] = 2;
				assert_true(ack_window_mark(&w, tag));
			}
			break;
		case 2:
			if (tag && st[tag] == 1) {
				st[tag] = 2;
				assert_true(ack_window_mark(&w, tag));
			}
			break;
		case 3:
			if (tag && st[tag] == 1 && r % 7 == 0) {
				st[tag] = 4;
				ack_window_close(&w, tag);
			}
			break;
		default: {
			size_t n = ack_window_take(&w, out, 1 + r % 5);
			for (size_t i = 0; i < n; i++) {
				uint64_t t = out[i].tag, from = out[i].multiple ? 1 : t;
				assert_int_equal(st[t], 2);
				multiples += out[i].multiple;
				singles += !out[i].multiple;
				for (uint64_t u = from; u <= t; u++) {
					assert_true(st[u] != 1);   /* never a running one */
					if (st[u] == 2)
						st[u] = 3;
				}
			}
			break;
		}
		}
		while (lo < next && st[lo] >= 3)
			lo++;
	}
	for (uint64_t t = 1; t <= TAGS; t++)
		assert_true(st[t] == 3 || st[t] == 4);
	print_message("# %u multiple acks, %u single acks\n", multiples, singles);
	assert_true(multiples > 100 && singles > 100); /* both paths ran */
	ack_window_free(&w);
}

/* A transport that never connects: its owner-thread state, for the paths
 * that run after a connection is lost. */
static struct transport *
offline_transport(void)
{
	char path[] = "/tmp/occamy-test-transport.XXXXXX";
	char err[512];
	struct config cfg;
	struct transport *t;
	int fd = mkstemp(path);
	static const char ini[] = "[amqp]\nuri = amqp://guest@127.0.0.1:1/\n";

	assert_true(fd >= 0);
	assert_int_equal(write(fd, ini, sizeof(ini) - 1), (ssize_t)(sizeof(ini) - 1));
	close(fd);
	assert_int_equal(config_load(path, &cfg, err, sizeof(err)), 0);
	unlink(path);
	t = transport_new(&cfg, NULL, NULL);
	config_free(&cfg);
	return t;
}

static uint64_t
event_count(const struct transport_stats *st, const char *path, const char *reason)
{
	for (unsigned i = 0; i < st->nevents; i++)
		if (strcmp(st->events[i].path, path) == 0 &&
		    strcmp(st->events[i].reason, reason) == 0)
			return st->events[i].count;
	return 0;
}

/* A plugin publish sent and lost with its connection before the confirm
 * goes back to the head of the queue for the next connection, at most
 * RESENDS_MAX sends in all; then it is dropped and counted, not resent
 * for ever. */
static void
test_an_unconfirmed_plugin_publish_is_sent_at_most_resends_max_times(void **state)
{
	struct transport *t = offline_transport();
	struct outgoing *o = xcalloc(1, sizeof(*o));
	struct transport_stats st;

	(void)state;
	o->kind = PUBLISH_CONTROL;
	o->bytes = 10;
	t->out_count = 1; /* queued or unconfirmed, as transport_publish() counts */
	t->out_bytes = o->bytes;
	for (unsigned send = 1; send <= RESENDS_MAX; send++) {
		/* What outgoing_flush() does with it on a live connection. */
		o->sends++;
		confirm_expect(t, PENDING_PUBLISH, NULL, o);
		t->connected = true;
		connection_drop(t, false);
		if (send < RESENDS_MAX) {
			assert_ptr_equal(STAILQ_FIRST(&t->out), o);
			assert_null(STAILQ_NEXT(o, next));
			STAILQ_REMOVE_HEAD(&t->out, next); /* the next connection's flush */
		}
	}
	assert_true(STAILQ_EMPTY(&t->out));
	assert_true(STAILQ_EMPTY(&t->confirms));
	assert_int_equal(t->out_count, 0);
	assert_int_equal(t->out_bytes, 0);
	transport_get_stats(t, &st);
	assert_int_equal(st.publish_failures, 1);
	assert_int_equal(event_count(&st, "resend", "connection lost before its confirm"),
			 RESENDS_MAX - 1);
	assert_int_equal(event_count(&st, "resend", "unconfirmed after 3 sends"), 1);
	transport_free(t);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_policy_success_acks_or_replies_first),
		cmocka_unit_test(test_policy_requeue_is_a_copy_for_requests_and_a_reject_for_control),
		cmocka_unit_test(test_policy_retries_until_the_last_attempt_then_dead_letters),
		cmocka_unit_test(test_backoff_doubles_to_the_cap_with_jitter_and_starts_over),
		cmocka_unit_test(test_headers_flatten_gives_plugins_c_strings_and_refuses_nul_keys),
		cmocka_unit_test(test_copy_replaces_our_headers_and_drops_delivery_count_and_user_id),
		cmocka_unit_test(test_json_escape_keeps_utf8_and_replaces_what_is_not),
		cmocka_unit_test(test_ack_window_acks_a_settled_prefix_as_one_and_the_rest_alone),
		cmocka_unit_test(test_ack_window_never_covers_a_running_tag),
		cmocka_unit_test(test_an_unconfirmed_plugin_publish_is_sent_at_most_resends_max_times),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
