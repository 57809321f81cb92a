/*
 * test_sched.c - the scheduler with fake messages and fake tasks, no broker:
 * admission, preemption, kill timeouts, expansion order and fairness, the
 * external store, control routing, shutdown, and a concurrent stress run.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "log.h"
#include "scheduler.h"
#include "scheduler_impl.h" /* admit_decide() and struct slot */

/* ---- fakes ---- */

enum run_mode {
	RUN_OK,         /* return at once with OCCAMY_OK and a reply */
	RUN_STATUS,     /* return recipe.status at once */
	RUN_UNTIL_CANCEL,
	RUN_UNTIL_RELEASE, /* until the test releases it (or cancel) */
	RUN_STUBBORN,   /* ignores cancellation for stubborn_ms */
	RUN_SLEEP,      /* one cancel_sleep_ms(sleep_ms), then OK or INTERRUPTED */
};

struct recipe {
	enum run_mode mode;
	enum occamy_status status;     /* RUN_STATUS, or make_task error */
	bool make_error;
	bool make_null;
	unsigned stubborn_ms;
	uint64_t sleep_ms;             /* RUN_SLEEP */
	unsigned child_stubborn_ms;
	unsigned expand_max;           /* helpers it will create per call */
	unsigned expand_total;         /* stop expanding after this many (0 = no limit) */
	bool gated;                    /* expand waits for the test's go */
	bool handle_gated;             /* handle waits for the test's go */
	enum run_mode child_mode;
	const char *id;
	int priority;
	int64_t deadline_ms;
};

struct fake_task {
	struct task base;
	struct recipe r;
	atomic_bool released;
	atomic_bool expanding, gate_open;
	atomic_bool handle_open;
	atomic_int handle_entered;
	atomic_int running;
	atomic_int handled;
	atomic_uint expand_max;       /* tests may change it while running */
	atomic_uint expand_calls;
	atomic_uint expand_first_n;
	atomic_uint expand_last_n;
	atomic_uint created;
	atomic_bool was_cancelled;
	struct fake_task *parent;
	int serial;
};

struct fake_msg {
	struct message base;
	struct recipe r;
	struct occamy_header hdr[2];
	struct fake_task *_Atomic made; /* the task made from it */
	atomic_int entered;
	atomic_int settled;
	enum settle_outcome outcome;
	char reason[256];
	char *reply;
};

static atomic_int tasks_alive;
static atomic_int tasks_destroyed_twice;
/* A thread that must never run a task's destroy (the transport's). */
static pthread_t destroy_forbidden_on;
static atomic_bool destroy_forbidden;
static atomic_int destroyed_on_forbidden;
static atomic_int running_total;
static atomic_int next_serial;

static enum occamy_status
fake_run(struct task *t, const struct occamy_cancel *c, struct occamy_output *out)
{
	struct fake_task *f = (struct fake_task *)t;
	enum occamy_status st = OCCAMY_OK;

	atomic_fetch_add(&f->running, 1);
	atomic_fetch_add(&running_total, 1);
	switch (f->r.mode) {
	case RUN_OK:
		out->body = strdup("result");
		out->len = 6;
		snprintf(out->content_type, sizeof(out->content_type), "text/plain");
		break;
	case RUN_STATUS:
		st = f->r.status;
		snprintf(out->message, sizeof(out->message), "fake says %d", st);
		break;
	case RUN_UNTIL_CANCEL:
		while (!cancel_sleep_ms(c, 1000))
			;
		st = OCCAMY_ERR_INTERRUPTED;
		break;
	case RUN_UNTIL_RELEASE:
		while (!atomic_load(&f->released) && !cancel_is_set(c))
			cancel_sleep_ms(c, 1);
		st = cancel_is_set(c) ? OCCAMY_ERR_INTERRUPTED : OCCAMY_OK;
		break;
	case RUN_STUBBORN:
		usleep(f->r.stubborn_ms * 1000u);
		st = cancel_is_set(c) ? OCCAMY_ERR_INTERRUPTED : OCCAMY_OK;
		break;
	case RUN_SLEEP:
		st = cancel_sleep_ms(c, f->r.sleep_ms) ? OCCAMY_ERR_INTERRUPTED : OCCAMY_OK;
		break;
	}
	if (cancel_is_set(c))
		atomic_store(&f->was_cancelled, true);
	atomic_fetch_sub(&running_total, 1);
	atomic_fetch_sub(&f->running, 1);
	return st;
}

static struct fake_task *fake_task_new(const struct recipe *r, struct fake_task *parent);

static size_t
fake_expand(struct task *t, size_t n, struct task **helpers)
{
	struct fake_task *f = (struct fake_task *)t;
	size_t k, max = atomic_load(&f->expand_max), give = n < max ? n : max;

	if (atomic_fetch_add(&f->expand_calls, 1) == 0)
		atomic_store(&f->expand_first_n, (unsigned)n);
	atomic_store(&f->expand_last_n, (unsigned)n);
	if (f->r.expand_total && atomic_load(&f->created) + give > f->r.expand_total)
		give = f->r.expand_total - atomic_load(&f->created);
	if (f->r.gated) {
		atomic_store(&f->expanding, true);
		while (!atomic_load(&f->gate_open))
			usleep(100);
		give = n;
	}
	for (k = 0; k < give; k++) {
		struct recipe cr = {.mode = f->r.child_mode, .id = f->r.id,
				    .stubborn_ms = f->r.child_stubborn_ms};
		helpers[k] = &fake_task_new(&cr, f)->base;
	}
	atomic_fetch_add(&f->created, (unsigned)give);
	return give;
}

static void
fake_handle(struct task *t, const struct occamy_headers *h, const void *body, size_t len)
{
	struct fake_task *f = (struct fake_task *)t;

	(void)h;
	(void)body;
	(void)len;
	atomic_fetch_add(&f->handle_entered, 1);
	while (f->r.handle_gated && !atomic_load(&f->handle_open))
		usleep(100);
	atomic_fetch_add(&f->handled, 1);
}

static void
fake_destroy(struct task *t)
{
	struct fake_task *f = (struct fake_task *)t;

	if (f->serial < 0)
		atomic_fetch_add(&tasks_destroyed_twice, 1);
	if (atomic_load(&destroy_forbidden) && pthread_equal(pthread_self(), destroy_forbidden_on))
		atomic_fetch_add(&destroyed_on_forbidden, 1);
	f->serial = -1;
	atomic_fetch_sub(&tasks_alive, 1);
	free(f->base.id);
	free(f->base.group);
	/* Parents may be gone first; the test keeps no pointers to children. */
	free(f);
}

static const struct task_ops fake_ops = {
	.run = fake_run, .expand = fake_expand, .handle = fake_handle,
	.destroy = fake_destroy,
};

static struct fake_task *
fake_task_new(const struct recipe *r, struct fake_task *parent)
{
	struct fake_task *f = calloc(1, sizeof(*f));

	f->base.ops = &fake_ops;
	f->base.id = r->id ? strdup(r->id) : NULL;
	f->base.group = strdup("fake");
	f->base.priority = r->priority;
	f->base.deadline_ms = r->deadline_ms;
	f->r = *r;
	atomic_init(&f->expand_max, r->expand_max);
	f->parent = parent;
	f->serial = atomic_fetch_add(&next_serial, 1);
	atomic_fetch_add(&tasks_alive, 1);
	return f;
}


static enum occamy_status
fake_make_task(void *ctx, const struct message *m, bool is_help, struct task **out,
	       char *why, size_t whylen)
{
	const struct fake_msg *fm = (const struct fake_msg *)m;
	struct fake_task *f;

	(void)ctx;
	(void)is_help;
	if (fm->r.make_error) {
		snprintf(why, whylen, "fake make error");
		return fm->r.status;
	}
	if (fm->r.make_null)
		return OCCAMY_OK;
	f = fake_task_new(&fm->r, NULL);
	/* The message is the test's; it reads this back with task_of(). */
	atomic_store(&((struct fake_msg *)(uintptr_t)fm)->made, f);
	*out = &f->base;
	return OCCAMY_OK;
}

static atomic_int msgs_alive;
static atomic_int msgs_settled_twice;

static void
fake_settle(struct message *m, const struct settlement *s)
{
	struct fake_msg *fm = (struct fake_msg *)m;

	if (atomic_fetch_add(&fm->entered, 1) != 0) {
		atomic_fetch_add(&msgs_settled_twice, 1);
		free(s->reply);
		return;
	}
	fm->outcome = s->outcome;
	snprintf(fm->reason, sizeof(fm->reason), "%s", s->reason ? s->reason : "");
	fm->reply = s->reply ? strndup(s->reply, s->reply_len) : NULL;
	free(s->reply);
	atomic_fetch_sub(&msgs_alive, 1);
	/* Published last: readers wait for it, then read the rest. */
	atomic_fetch_add(&fm->settled, 1);
}

static const struct message_ops fake_msg_ops = {.settle = fake_settle};

static uint64_t
mono_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static struct fake_msg *
msg_new(const struct recipe *r)
{
	struct fake_msg *m = calloc(1, sizeof(*m));

	m->base.ops = &fake_msg_ops;
	m->base.arrival_ns = mono_ns();
	m->base.body = "";
	m->r = *r;
	atomic_fetch_add(&msgs_alive, 1);
	return m;
}

/* A control message with a task-id header (string, or an int if bad). */
static struct fake_msg *
control_new(const char *task_id, bool as_int)
{
	struct recipe r = {0};
	struct fake_msg *m = msg_new(&r);

	if (task_id != NULL) {
		m->hdr[0].key = "task-id";
		m->hdr[0].kind = as_int ? OCCAMY_VALUE_INT : OCCAMY_VALUE_STRING;
		m->hdr[0].str = as_int ? NULL : task_id;
		m->hdr[0].len = as_int ? 0 : strlen(task_id);
		m->hdr[0].i = 42;
		m->base.headers.items = m->hdr;
		m->base.headers.count = 1;
	}
	return m;
}

/* The task made from m, once the scheduler has made it. */
static struct fake_task *
task_of(struct fake_msg *m)
{
	int i;

	for (i = 0; i < 20000 && atomic_load(&m->made) == NULL; i++)
		usleep(100);
	if (atomic_load(&m->made) == NULL)
		fail_msg("no task was made from the message");
	return atomic_load(&m->made);
}

static void
msg_free(struct fake_msg *m)
{
	free(m->reply);
	free(m);
}

/* Sanitizers slow everything down; waits (never the behaviour) scale. */
static unsigned
time_scale(void)
{
	const char *san = getenv("OCCAMY_SANITIZER");

	return san == NULL ? 1 : strcmp(san, "tsan") == 0 ? 4 : 2;
}

static bool
wait_for(bool (*pred)(void *), void *arg, unsigned ms)
{
	uint64_t end = mono_ns() + (uint64_t)ms * time_scale() * 1000000u;

	while (mono_ns() < end) {
		if (pred(arg))
			return true;
		usleep(200);
	}
	return pred(arg);
}

static bool
is_settled(void *arg)
{
	return atomic_load(&((struct fake_msg *)arg)->settled) > 0;
}

struct status_count {
	struct sched *s;
	enum slot_status st;
	unsigned want;
};

static bool
has_status_count(void *arg)
{
	struct status_count *c = arg;
	struct sched_stats st;

	sched_get_stats(c->s, &st);
	return st.by_status[c->st] == c->want;
}

#define WAIT_STATUS(sch, status, n, ms)                                        \
	do {                                                                   \
		struct status_count c_ = {(sch), (status), (n)};               \
		if (!wait_for(has_status_count, &c_, (ms))) {                  \
			struct sched_stats st_;                                \
			sched_get_stats((sch), &st_);                          \
			fail_msg("expected %u %s slots within %u ms, have %u", \
				 (unsigned)(n), slot_status_name(status),      \
				 (unsigned)(ms), st_.by_status[status]);        \
		}                                                              \
	} while (0)

static bool
no_helpers_left(void *arg)
{
	struct sched_stats st;

	sched_get_stats(arg, &st);
	return st.draining == 0 && st.by_status[SLOT_INTERNAL] == 0 &&
	       st.by_status[SLOT_EXTERNAL] == 0;
}

#define WAIT_SETTLED(m, ms)                                                    \
	do {                                                                   \
		if (!wait_for(is_settled, (m), (ms)))                          \
			fail_msg("message not settled within %u ms", (unsigned)(ms)); \
	} while (0)

static const struct task_source fake_source = {.ctx = NULL, .make_task = fake_make_task};

static struct sched_config
base_config(unsigned slots)
{
	return (struct sched_config){
		.slots = slots,
		.expansion_period_ms = 60000, /* only event-driven expansion */
		.expansion_slot_buffer = 0,
		.kill_timeout_ms = 200,
		.shutdown_grace_ms = 200,
		.header_task_id = "task-id",
		.external_queue_max = 8,
		.external_ttl_ms = 60000,
		.helper_priority = HELPER_PRIORITY_NORMAL,
	};
}

static struct sched *
start(unsigned slots, enum helper_priority hp)
{
	struct sched_config c = base_config(slots);

	c.helper_priority = hp;
	return sched_new(&c, &fake_source, NULL);
}

static void
finish(struct sched *s)
{
	sched_free(s);
	assert_int_equal(atomic_load(&tasks_alive), 0);
	assert_int_equal(atomic_load(&tasks_destroyed_twice), 0);
	assert_int_equal(atomic_load(&msgs_settled_twice), 0);
	assert_int_equal(atomic_load(&msgs_alive), 0);
}

/* finish(s), then free the test's messages. */
#define FINISH(s, ...)                                                         \
	do {                                                                   \
		struct fake_msg *const msgs_[] = {__VA_ARGS__};                \
		finish(s);                                                     \
		for (size_t i_ = 0; i_ < sizeof(msgs_) / sizeof(msgs_[0]); i_++) \
			msg_free(msgs_[i_]);                                   \
	} while (0)

/* Fill every slot of s with helpers of one protected master that runs until
 * released; returns the master's message. */
static struct fake_msg *
fill_with_helpers(struct sched *s, unsigned slots, enum run_mode child)
{
	struct recipe r = {.mode = RUN_UNTIL_RELEASE, .expand_max = 64,
			   .child_mode = child, .child_stubborn_ms = 1500,
			   .id = "master"};
	struct fake_msg *m = msg_new(&r);

	sched_submit_request(s, &m->base);
	WAIT_STATUS(s, SLOT_PROTECTED, 1, 2000);
	WAIT_STATUS(s, SLOT_INTERNAL, slots - 1, 2000);
	return m;
}

/* ---- tests ---- */

static void
test_request_runs_and_is_acked_with_its_result(void **state)
{
	struct sched *s = start(2, HELPER_PRIORITY_NORMAL);
	struct recipe r = {.mode = RUN_OK};
	struct fake_msg *m = msg_new(&r);
	struct sched_stats st;

	(void)state;
	sched_submit_request(s, &m->base);
	WAIT_SETTLED(m, 2000);
	assert_int_equal(m->outcome, SETTLE_ACK);
	assert_string_equal(m->reply, "result");
	sched_get_stats(s, &st);
	assert_int_equal(st.admitted, 1);
	assert_int_equal(st.admit_latency_count, 1);
	FINISH(s, m);
}

/* The transport's batch: a request given an empty slot waits for
 * sched_wake_held(), then runs as any other. */
static void
test_held_wakeup_starts_the_request_when_released(void **state)
{
	struct sched *s = start(2, HELPER_PRIORITY_NORMAL);
	struct recipe r = {.mode = RUN_OK};
	struct fake_msg *a = msg_new(&r), *b = msg_new(&r);
	struct sched_held_wakeups held = {0};
	struct sched_stats st;

	(void)state;
	sched_submit_request_held(s, &a->base, &held);
	sched_submit_request_held(s, &b->base, &held);
	assert_int_equal(held.n, 2);
	sched_get_stats(s, &st);
	assert_int_equal(st.by_status[SLOT_PROTECTED], 2); /* both slots are theirs */
	usleep(50 * 1000);
	/* Nobody woke their workers: neither task was made. */
	assert_null(atomic_load(&a->made));
	assert_null(atomic_load(&b->made));
	sched_wake_held(&held);
	assert_int_equal(held.n, 0);
	WAIT_SETTLED(a, 2000);
	WAIT_SETTLED(b, 2000);
	assert_int_equal(a->outcome, SETTLE_ACK);
	assert_int_equal(b->outcome, SETTLE_ACK);
	FINISH(s, a, b);
}

static void
test_slot_is_free_before_the_message_is_settled(void **state)
{
	/* After settlement the slot must already be empty. */
	struct sched *s = start(1, HELPER_PRIORITY_NORMAL);
	unsigned i;

	(void)state;
	for (i = 0; i < 20; i++) {
		struct recipe r = {.mode = RUN_OK};
		struct fake_msg *m = msg_new(&r);
		struct sched_stats st;

		sched_submit_request(s, &m->base);
		WAIT_SETTLED(m, 2000);
		sched_get_stats(s, &st);
		assert_int_equal(st.by_status[SLOT_PROTECTED], 0);
		msg_free(m);
	}
	finish(s);
}

static void
test_task_outcomes_map_to_settlements(void **state)
{
	static const struct {
		enum occamy_status st;
		enum settle_outcome want;
	} cases[] = {
		{OCCAMY_ERR_INVALID_BODY, SETTLE_DEAD_LETTER},
		{OCCAMY_ERR_INVALID_HEADERS, SETTLE_DEAD_LETTER},
		{OCCAMY_ERR_INVALID_TASK, SETTLE_DEAD_LETTER},
		{OCCAMY_ERR_INTERNAL, SETTLE_RETRY},
		{OCCAMY_ERR_INTERRUPTED, SETTLE_REQUEUE},
	};
	struct sched *s = start(2, HELPER_PRIORITY_NORMAL);
	unsigned i;

	(void)state;
	for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		struct recipe r = {.mode = RUN_STATUS, .status = cases[i].st};
		struct fake_msg *m = msg_new(&r);

		sched_submit_request(s, &m->base);
		WAIT_SETTLED(m, 2000);
		if (m->outcome != cases[i].want)
			fail_msg("status %d: expected settlement %d, got %d",
				 cases[i].st, cases[i].want, m->outcome);
		/* The plugin's own reason is carried to the broker. */
		assert_non_null(strstr(m->reason, "fake says"));
		msg_free(m);
	}
	finish(s);
}

static void
test_handler_errors_and_null_task_are_settled_not_crashed(void **state)
{
	static const struct {
		enum occamy_status st;
		bool null_task;
		enum settle_outcome want;
	} cases[] = {
		{OCCAMY_ERR_INVALID_BODY, false, SETTLE_DEAD_LETTER},
		{OCCAMY_ERR_INVALID_HEADERS, false, SETTLE_DEAD_LETTER},
		{OCCAMY_ERR_INVALID_TASK, false, SETTLE_DEAD_LETTER},
		{OCCAMY_ERR_INTERNAL, false, SETTLE_RETRY},
		{OCCAMY_OK, true, SETTLE_RETRY},
	};
	struct sched *s = start(1, HELPER_PRIORITY_NORMAL);
	unsigned i;

	(void)state;
	for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		struct recipe r = {.make_error = !cases[i].null_task,
				   .make_null = cases[i].null_task, .status = cases[i].st};
		struct fake_msg *m = msg_new(&r);

		sched_submit_request(s, &m->base);
		WAIT_SETTLED(m, 2000);
		assert_int_equal(m->outcome, cases[i].want);
		assert_true(strlen(m->reason) > 0);
		msg_free(m);
	}
	finish(s);
}

static void
test_scenario_a_one_request_fills_every_slot_with_its_helpers(void **state)
{
	struct sched *s = start(8, HELPER_PRIORITY_NORMAL);
	struct fake_msg *m;
	struct fake_task *master;
	struct sched_stats st;

	(void)state;
	m = fill_with_helpers(s, 8, RUN_UNTIL_CANCEL);
	master = task_of(m);
	/* n is exactly the room there was: 7 empty slots, no buffer. */
	assert_int_equal(atomic_load(&master->expand_first_n), 7);
	assert_int_equal(atomic_load(&master->created), 7);
	sched_get_stats(s, &st);
	assert_int_equal(st.expansions[SLOT_INTERNAL], 7);
	atomic_store(&master->released, true);
	WAIT_SETTLED(m, 2000);
	assert_int_equal(m->outcome, SETTLE_ACK);
	/* Helpers end with their master. */
	WAIT_STATUS(s, SLOT_INTERNAL, 0, 2000);
	WAIT_STATUS(s, SLOT_EMPTY, 8, 2000);
	FINISH(s, m);
}

static void
test_expand_is_offered_exactly_the_free_room(void **state)
{
	struct sched_config c = base_config(6);
	struct sched *s;
	struct recipe r = {.mode = RUN_UNTIL_RELEASE, .expand_max = 0};
	struct fake_msg *m;
	struct fake_task *master;

	(void)state;
	c.expansion_slot_buffer = 2;
	s = sched_new(&c, &fake_source, NULL);
	m = msg_new(&r);
	sched_submit_request(s, &m->base);
	WAIT_STATUS(s, SLOT_PROTECTED, 1, 2000);
	master = task_of(m);
	sched_expand_now(s);
	usleep(20000);
	/* 5 empty slots, 2 kept for requests: n = 3, not 5 or 10. */
	assert_true(atomic_load(&master->expand_calls) >= 1);
	assert_int_equal(atomic_load(&master->expand_last_n), 3);
	atomic_store(&master->released, true);
	WAIT_SETTLED(m, 2000);
	FINISH(s, m);
}

static bool
is_expanding(void *arg)
{
	return atomic_load(&((struct fake_task *)arg)->expanding);
}

static void
test_helpers_returned_beyond_room_are_destroyed(void **state)
{
	struct sched *s = start(3, HELPER_PRIORITY_NORMAL);
	struct recipe r = {.mode = RUN_UNTIL_RELEASE, .gated = true,
			   .child_mode = RUN_UNTIL_CANCEL};
	struct recipe rb = {.mode = RUN_UNTIL_RELEASE};
	struct fake_msg *m = msg_new(&r), *b1, *b2;
	struct fake_task *mt, *t1, *t2;
	struct sched_stats st;

	(void)state;
	sched_submit_request(s, &m->base);
	WAIT_STATUS(s, SLOT_PROTECTED, 1, 2000);
	mt = task_of(m);
	assert_true(wait_for(is_expanding, mt, 2000));
	/* While the plugin is inside expand(2), requests take the room. */
	b1 = msg_new(&rb);
	sched_submit_request(s, &b1->base);
	WAIT_STATUS(s, SLOT_PROTECTED, 2, 2000);
	t1 = task_of(b1);
	b2 = msg_new(&rb);
	sched_submit_request(s, &b2->base);
	WAIT_STATUS(s, SLOT_PROTECTED, 3, 2000);
	t2 = task_of(b2);
	atomic_store(&mt->gate_open, true);
	usleep(20000);
	sched_get_stats(s, &st);
	assert_int_equal(st.by_status[SLOT_INTERNAL], 0);
	assert_int_equal(atomic_load(&mt->created), 2);
	/* Both helpers it made were destroyed, not leaked or started. */
	assert_int_equal(atomic_load(&tasks_alive), 3);
	atomic_store(&mt->released, true);
	atomic_store(&t1->released, true);
	atomic_store(&t2->released, true);
	WAIT_SETTLED(m, 2000);
	WAIT_SETTLED(b1, 2000);
	WAIT_SETTLED(b2, 2000);
	FINISH(s, m, b1, b2);
}

static void
test_buffer_slots_stay_empty_for_requests(void **state)
{
	struct sched_config c = base_config(4);
	struct sched *s;
	struct recipe r = {.mode = RUN_UNTIL_RELEASE, .expand_max = 64,
			   .child_mode = RUN_UNTIL_CANCEL};
	struct recipe r2 = {.mode = RUN_UNTIL_RELEASE};
	struct fake_msg *m, *m2;
	struct sched_stats st;

	(void)state;
	c.expansion_slot_buffer = 1;
	s = sched_new(&c, &fake_source, NULL);
	m = msg_new(&r);
	sched_submit_request(s, &m->base);
	WAIT_STATUS(s, SLOT_INTERNAL, 2, 2000);
	usleep(20000);
	sched_get_stats(s, &st);
	assert_int_equal(st.by_status[SLOT_EMPTY], 1);
	/* A request takes the buffer slot without preempting anyone. */
	m2 = msg_new(&r2);
	sched_submit_request(s, &m2->base);
	WAIT_STATUS(s, SLOT_PROTECTED, 2, 2000);
	sched_get_stats(s, &st);
	assert_int_equal(st.preemptions, 0);
	assert_int_equal(st.by_status[SLOT_INTERNAL], 2);
	sched_shutdown(s);
	assert_int_equal(m->outcome, SETTLE_REQUEUE);
	assert_int_equal(m2->outcome, SETTLE_REQUEUE);
	FINISH(s, m, m2);
}

/* prefetch > slots: a request that finds every slot protected waits for
 * one (a first that frees takes it) and is requeued only after the hold, so
 * it cannot bounce between broker and daemon. */
static void
test_full_of_protected_tasks_holds_the_request_then_requeues_it_once(void **state)
{
	struct sched *s = start(2, HELPER_PRIORITY_NORMAL); /* kill_timeout 200 ms */
	struct recipe r = {.mode = RUN_UNTIL_RELEASE};
	struct recipe quick = {.mode = RUN_OK};
	struct fake_msg *a = msg_new(&r), *b = msg_new(&r), *c = msg_new(&quick), *d;
	struct sched_stats st;
	uint64_t t0;

	(void)state;
	sched_submit_request(s, &a->base);
	sched_submit_request(s, &b->base);
	WAIT_STATUS(s, SLOT_PROTECTED, 2, 2000);
	t0 = mono_ns();
	sched_submit_request(s, &c->base);
	usleep(300000);
	assert_int_equal(atomic_load(&c->settled), 0); /* held, not bounced */
	sched_get_stats(s, &st);
	assert_int_equal(st.waiting, 1);
	WAIT_SETTLED(c, 3000);
	assert_int_equal(c->outcome, SETTLE_REQUEUE);
	assert_string_equal(c->reason, "no free slot");
	assert_true(mono_ns() - t0 >= 990000000u); /* the hold: 1 s at least */
	sched_get_stats(s, &st);
	assert_int_equal(st.requeued_no_room, 1);
	assert_int_equal(st.waiting, 0);

	/* A waiting request takes the first slot that frees. */
	d = msg_new(&quick);
	sched_submit_request(s, &d->base);
	usleep(50000);
	assert_int_equal(atomic_load(&d->settled), 0);
	atomic_store(&task_of(a)->released, true);
	WAIT_SETTLED(a, 2000);
	WAIT_SETTLED(d, 2000);
	assert_int_equal(d->outcome, SETTLE_ACK);
	sched_shutdown(s);
	/* Shutdown past the grace requeues protected work. */
	assert_int_equal(b->outcome, SETTLE_REQUEUE);
	FINISH(s, a, b, c, d);
}

static void
test_scenario_b_request_preempts_a_helper(enum helper_priority hp)
{
	struct sched *s = start(4, hp);
	struct fake_msg *master = fill_with_helpers(s, 4, RUN_UNTIL_CANCEL);
	struct fake_task *mt = task_of(master);
	struct recipe r = {.mode = RUN_UNTIL_RELEASE};
	struct fake_msg *m = msg_new(&r);
	struct sched_stats st;

	sched_submit_request(s, &m->base);
	WAIT_STATUS(s, SLOT_PROTECTED, 2, 2000);
	sched_get_stats(s, &st);
	assert_int_equal(st.preemptions, 1);
	assert_int_equal(st.by_status[SLOT_INTERNAL], 2);
	assert_int_equal(atomic_load(&m->settled), 0);
	atomic_store(&task_of(m)->released, true);
	WAIT_SETTLED(m, 2000);
	assert_int_equal(m->outcome, SETTLE_ACK);
	atomic_store(&mt->released, true);
	WAIT_SETTLED(master, 2000);
	FINISH(s, m, master);
}

static void
test_scenario_b_preempts_a_helper_normal_priority(void **state)
{
	(void)state;
	test_scenario_b_request_preempts_a_helper(HELPER_PRIORITY_NORMAL);
}

static void
test_scenario_b_preempts_a_helper_idle_priority(void **state)
{
	(void)state;
	test_scenario_b_request_preempts_a_helper(HELPER_PRIORITY_IDLE);
}

static void
test_external_helpers_are_preempted_before_internal(void **state)
{
	struct sched *s = start(3, HELPER_PRIORITY_NORMAL);
	struct recipe r = {.mode = RUN_UNTIL_RELEASE, .expand_max = 1, .expand_total = 1,
			   .child_mode = RUN_UNTIL_CANCEL, .id = "m1"};
	struct recipe rx = {.mode = RUN_UNTIL_CANCEL};
	struct recipe rq = {.mode = RUN_UNTIL_RELEASE};
	struct fake_msg *m = msg_new(&r), *help, *q;
	struct fake_task *master;
	struct sched_stats st;

	(void)state;
	sched_submit_request(s, &m->base);
	WAIT_STATUS(s, SLOT_INTERNAL, 1, 2000);
	master = task_of(m);
	help = control_new(NULL, false);
	help->r = rx;
	sched_submit_control(s, &help->base);
	WAIT_STATUS(s, SLOT_EXTERNAL, 1, 2000);
	WAIT_SETTLED(help, 2000);
	assert_int_equal(help->outcome, SETTLE_ACK);

	q = msg_new(&rq);
	sched_submit_request(s, &q->base);
	WAIT_STATUS(s, SLOT_PROTECTED, 2, 2000);
	WAIT_STATUS(s, SLOT_EXTERNAL, 0, 2000);
	sched_get_stats(s, &st);
	assert_int_equal(st.by_status[SLOT_INTERNAL], 1);

	atomic_store(&master->released, true);
	atomic_store(&task_of(q)->released, true);
	WAIT_SETTLED(m, 2000);
	WAIT_SETTLED(q, 2000);
	FINISH(s, m, help, q);
}

static void
test_most_recent_helper_is_preempted_first(void **state)
{
	struct sched *s = start(3, HELPER_PRIORITY_NORMAL);
	struct recipe r = {.mode = RUN_UNTIL_RELEASE, .expand_max = 1, .expand_total = 2,
			   .child_mode = RUN_UNTIL_CANCEL};
	struct recipe rq = {.mode = RUN_UNTIL_RELEASE};
	struct fake_msg *m = msg_new(&r), *q;
	struct fake_task *master;
	struct slot_view before[3], after[3];
	unsigned i, oldest = 0, newest = 0;

	(void)state;
	sched_submit_request(s, &m->base);
	WAIT_STATUS(s, SLOT_INTERNAL, 1, 2000);
	master = task_of(m);
	usleep(30000); /* make the two helpers' ages clearly different */
	sched_expand_now(s);
	WAIT_STATUS(s, SLOT_INTERNAL, 2, 2000);
	sched_get_slots(s, before, 3);
	for (i = 0; i < 3; i++) {
		if (before[i].status != SLOT_INTERNAL)
			continue;
		if (before[oldest].status != SLOT_INTERNAL || before[i].age_s > before[oldest].age_s)
			oldest = i;
		if (before[newest].status != SLOT_INTERNAL || before[i].age_s < before[newest].age_s)
			newest = i;
	}
	q = msg_new(&rq);
	sched_submit_request(s, &q->base);
	WAIT_STATUS(s, SLOT_PROTECTED, 2, 2000);
	sched_get_slots(s, after, 3);
	assert_int_equal(after[newest].status, SLOT_PROTECTED);
	assert_int_equal(after[oldest].status, SLOT_INTERNAL);
	atomic_store(&master->released, true);
	atomic_store(&task_of(q)->released, true);
	WAIT_SETTLED(m, 2000);
	WAIT_SETTLED(q, 2000);
	FINISH(s, m, q);
}

static void
test_kill_timeout_requeues_request_and_stays_responsive(void **state)
{
	struct sched *s = start(2, HELPER_PRIORITY_NORMAL); /* kill_timeout 200 ms */
	struct fake_msg *master = fill_with_helpers(s, 2, RUN_STUBBORN);
	struct fake_task *mt = task_of(master);
	struct recipe rq = {.mode = RUN_OK};
	struct fake_msg *q = msg_new(&rq), *ctl;
	struct sched_stats st;
	uint64_t t0;

	(void)state;
	/* The helper ignores cancellation for 1.5 s. */
	t0 = mono_ns();
	sched_submit_request(s, &q->base);
	/* Meanwhile control routing still works. */
	ctl = control_new("master", false);
	sched_submit_control(s, &ctl->base);
	WAIT_SETTLED(ctl, 500);
	assert_int_equal(ctl->outcome, SETTLE_ACK);
	WAIT_SETTLED(q, 2000);
	assert_int_equal(q->outcome, SETTLE_REQUEUE);
	assert_true(mono_ns() - t0 >= 190000000u); /* it did wait kill_timeout */
	usleep(50000);
	sched_get_stats(s, &st);
	assert_int_equal(st.requeued_kill_timeout, 1);
	assert_int_equal(st.stuck, 1);
	atomic_store(&mt->released, true);
	WAIT_SETTLED(master, 3000);
	assert_true(wait_for(no_helpers_left, s, 3000));
	FINISH(s, master, q, ctl);
}

static void
test_stubborn_helper_does_not_delay_admission_in_idle_mode(void **state)
{
	struct sched *s = start(2, HELPER_PRIORITY_IDLE);
	struct recipe r = {.mode = RUN_UNTIL_RELEASE, .expand_max = 1,
			   .child_mode = RUN_STUBBORN, .child_stubborn_ms = 1000,
			   .expand_total = 1};
	struct recipe rq = {.mode = RUN_UNTIL_RELEASE};
	struct fake_msg *master = msg_new(&r), *q;
	struct fake_task *mt;
	struct sched_stats st;
	unsigned prot;

	(void)state;
	sched_submit_request(s, &master->base);
	WAIT_STATUS(s, SLOT_INTERNAL, 1, 2000);
	mt = task_of(master);
	/* The helper runs on an idle-priority thread, the master does not. */
	prot = sched_slot_thread_policy(s, 0) == SCHED_IDLE ? 1 : 0;
	assert_int_equal(sched_slot_thread_policy(s, prot), SCHED_OTHER);
	assert_int_equal(sched_slot_thread_policy(s, 1 - prot), SCHED_IDLE);
	q = msg_new(&rq);
	sched_submit_request(s, &q->base);
	/* Starts at once, though the helper ignores its cancellation for
	 * 1 s: waiting for it would take that long (or requeue at 200 ms). */
	WAIT_STATUS(s, SLOT_PROTECTED, 2, 150);
	assert_int_equal(atomic_load(&q->settled), 0); /* not requeued */
	sched_get_stats(s, &st);
	assert_int_equal(st.draining, 1);
	/* The preempted slot now runs a protected task on a normal thread. */
	assert_int_equal(sched_slot_thread_policy(s, 0), SCHED_OTHER);
	assert_int_equal(sched_slot_thread_policy(s, 1), SCHED_OTHER);
	atomic_store(&mt->released, true);
	atomic_store(&task_of(q)->released, true);
	WAIT_SETTLED(master, 3000);
	WAIT_SETTLED(q, 3000);
	assert_true(wait_for(no_helpers_left, s, 3000));
	FINISH(s, master, q);
}

/* Draining helpers hold their threads, and helpers get no thread beyond the
 * pool of one per slot: memory held by draining helpers is bounded. */
static void
test_draining_helpers_are_bounded_by_the_helper_pool(void **state)
{
	struct sched *s = start(2, HELPER_PRIORITY_IDLE);
	struct recipe r = {.mode = RUN_UNTIL_RELEASE, .expand_max = 1,
			   .child_mode = RUN_STUBBORN, .child_stubborn_ms = 1500};
	struct recipe rq = {.mode = RUN_OK};
	struct fake_msg *master = msg_new(&r), *q[3];
	struct fake_task *mt;
	struct sched_stats st;
	unsigned i;

	(void)state;
	sched_submit_request(s, &master->base);
	WAIT_STATUS(s, SLOT_INTERNAL, 1, 2000);
	mt = task_of(master);
	for (i = 0; i < 3; i++) {
		/* Each request preempts the helper, finishes, and frees the slot
		 * for a new helper while the old one still drains. */
		q[i] = msg_new(&rq);
		sched_submit_request(s, &q[i]->base);
		WAIT_SETTLED(q[i], 2000);
		usleep(20000);
	}
	sched_get_stats(s, &st);
	/* Two helper threads, both draining: no third helper may start. */
	assert_int_equal(st.draining, 2);
	assert_int_equal(st.by_status[SLOT_INTERNAL], 0);
	assert_int_equal(st.by_status[SLOT_EMPTY], 1);
	assert_true(atomic_load(&tasks_alive) <= 3); /* master + 2 draining */
	assert_int_equal(st.preemptions, 2);
	atomic_store(&mt->released, true);
	WAIT_SETTLED(master, 2000);
	assert_true(wait_for(no_helpers_left, s, 4000));
	FINISH(s, master);
	for (i = 0; i < 3; i++)
		msg_free(q[i]);
}

static void
test_fair_share_between_two_protected_tasks(void **state)
{
	struct sched *s = start(8, HELPER_PRIORITY_NORMAL);
	struct recipe r = {.mode = RUN_UNTIL_RELEASE, .expand_max = 0,
			   .child_mode = RUN_UNTIL_CANCEL};
	struct fake_msg *a, *b;
	struct fake_task *ta, *tb;

	(void)state;
	/* Both start before either can expand. */
	a = msg_new(&r);
	sched_submit_request(s, &a->base);
	WAIT_STATUS(s, SLOT_PROTECTED, 1, 2000);
	ta = task_of(a);
	b = msg_new(&r);
	sched_submit_request(s, &b->base);
	WAIT_STATUS(s, SLOT_PROTECTED, 2, 2000);
	tb = task_of(b);
	atomic_store(&ta->expand_max, 64);
	atomic_store(&tb->expand_max, 64);
	sched_expand_now(s);
	WAIT_STATUS(s, SLOT_INTERNAL, 6, 2000);
	assert_int_equal(atomic_load(&ta->created), 3);
	assert_int_equal(atomic_load(&tb->created), 3);
	atomic_store(&ta->released, true);
	atomic_store(&tb->released, true);
	WAIT_SETTLED(a, 2000);
	WAIT_SETTLED(b, 2000);
	FINISH(s, a, b);
}

static void
test_expansion_serves_protected_tasks_before_stored_help(void **state)
{
	struct sched *s = start(4, HELPER_PRIORITY_NORMAL);
	struct recipe rm = {.mode = RUN_UNTIL_RELEASE, .expand_max = 0,
			    .child_mode = RUN_UNTIL_CANCEL};
	struct recipe rb = {.mode = RUN_UNTIL_RELEASE};
	struct recipe rx = {.mode = RUN_UNTIL_CANCEL};
	struct fake_msg *m = msg_new(&rm), *b[3], *help;
	struct fake_task *mt, *bt[3];
	struct sched_stats st;
	unsigned i;

	(void)state;
	sched_submit_request(s, &m->base);
	WAIT_STATUS(s, SLOT_PROTECTED, 1, 2000);
	mt = task_of(m);
	for (i = 0; i < 3; i++) {
		b[i] = msg_new(&rb);
		sched_submit_request(s, &b[i]->base);
		WAIT_STATUS(s, SLOT_PROTECTED, i + 2, 2000);
		bt[i] = task_of(b[i]);
	}
	/* No room: the help request is stored. */
	help = control_new(NULL, false);
	help->r = rx;
	sched_submit_control(s, &help->base);
	WAIT_SETTLED(help, 2000);
	sched_get_stats(s, &st);
	assert_int_equal(st.external_queued, 1);
	/* Room appears: the protected master's helpers come first. */
	atomic_store(&mt->expand_max, 64);
	for (i = 0; i < 3; i++)
		atomic_store(&bt[i]->released, true);
	WAIT_STATUS(s, SLOT_INTERNAL, 3, 2000);
	sched_get_stats(s, &st);
	assert_int_equal(st.by_status[SLOT_EXTERNAL], 0);
	assert_int_equal(st.external_queued, 1);
	/* The master ends, its helpers end, and the stored help runs. */
	atomic_store(&mt->released, true);
	WAIT_STATUS(s, SLOT_EXTERNAL, 1, 2000);
	WAIT_STATUS(s, SLOT_INTERNAL, 0, 2000);
	for (i = 0; i < 3; i++) {
		WAIT_SETTLED(b[i], 2000);
		msg_free(b[i]);
	}
	WAIT_SETTLED(m, 2000);
	FINISH(s, m, help);
}

static void
test_external_store_orders_by_priority_and_expires(void **state)
{
	struct sched_config c = base_config(1);
	struct sched *s;
	struct recipe rq = {.mode = RUN_UNTIL_RELEASE};
	struct fake_msg *q, *h[4];
	struct sched_stats st;
	struct fake_task *blocker;
	unsigned i;

	(void)state;
	c.external_ttl_ms = 100000;
	c.external_queue_max = 2;
	s = sched_new(&c, &fake_source, NULL);
	q = msg_new(&rq);
	sched_submit_request(s, &q->base);
	WAIT_STATUS(s, SLOT_PROTECTED, 1, 2000);
	blocker = task_of(q);
	for (i = 0; i < 4; i++) {
		struct recipe rx = {.mode = RUN_UNTIL_CANCEL, .priority = (int)i,
				    .id = i == 3 ? "expired" : "x"};
		h[i] = control_new(NULL, false);
		h[i]->r = rx;
		/* An external task whose own deadline has passed. */
		if (i == 3)
			h[i]->r.deadline_ms = 1;
		sched_submit_control(s, &h[i]->base);
		WAIT_SETTLED(h[i], 2000);
	}
	sched_get_stats(s, &st);
	/* Capacity 2: priorities 0 and 1 were pushed out by 2 and 3; the
	 * expired one (priority 3) is pruned on the next pass. */
	assert_int_equal(st.external_drops[DROP_FULL], 2);
	sched_expand_now(s);
	usleep(20000);
	sched_get_stats(s, &st);
	assert_int_equal(st.external_drops[DROP_EXPIRED], 1);
	assert_int_equal(st.external_queued, 1);
	atomic_store(&blocker->released, true);
	WAIT_SETTLED(q, 2000);
	WAIT_STATUS(s, SLOT_EXTERNAL, 1, 2000);
	sched_get_stats(s, &st);
	assert_int_equal(st.external_queued, 0);
	FINISH(s, q);
	for (i = 0; i < 4; i++)
		msg_free(h[i]);
}

static void
test_external_task_without_deadline_is_kept_until_ttl(void **state)
{
	struct sched_config c = base_config(1);
	struct sched *s;
	struct recipe rq = {.mode = RUN_UNTIL_RELEASE};
	struct recipe rx = {.mode = RUN_UNTIL_CANCEL};
	struct fake_msg *q, *h;
	struct sched_stats st;
	struct fake_task *blocker;

	(void)state;
	c.external_ttl_ms = 150;
	c.expansion_period_ms = 20;
	s = sched_new(&c, &fake_source, NULL);
	q = msg_new(&rq);
	sched_submit_request(s, &q->base);
	WAIT_STATUS(s, SLOT_PROTECTED, 1, 2000);
	blocker = task_of(q);
	h = control_new(NULL, false);
	h->r = rx;
	sched_submit_control(s, &h->base);
	WAIT_SETTLED(h, 2000);
	usleep(60000);
	sched_get_stats(s, &st);
	assert_int_equal(st.external_queued, 1); /* not treated as expired */
	usleep(200000);
	sched_get_stats(s, &st);
	assert_int_equal(st.external_queued, 0);
	assert_int_equal(st.external_drops[DROP_EXPIRED], 1);
	atomic_store(&blocker->released, true);
	WAIT_SETTLED(q, 2000);
	FINISH(s, q, h);
}

static void
test_control_reaches_every_task_with_the_id(void **state)
{
	struct sched *s = start(4, HELPER_PRIORITY_NORMAL);
	struct recipe r = {.mode = RUN_UNTIL_RELEASE, .id = "job-7"};
	struct recipe other = {.mode = RUN_UNTIL_RELEASE, .id = "job-8"};
	struct fake_msg *a = msg_new(&r), *b = msg_new(&r), *c = msg_new(&other);
	struct fake_task *ta, *tb, *tc;
	struct fake_msg *ctl, *none;
	struct sched_stats st;

	(void)state;
	sched_submit_request(s, &a->base);
	WAIT_STATUS(s, SLOT_PROTECTED, 1, 2000);
	ta = task_of(a);
	sched_submit_request(s, &b->base);
	WAIT_STATUS(s, SLOT_PROTECTED, 2, 2000);
	tb = task_of(b);
	sched_submit_request(s, &c->base);
	WAIT_STATUS(s, SLOT_PROTECTED, 3, 2000);
	tc = task_of(c);

	ctl = control_new("job-7", false);
	sched_submit_control(s, &ctl->base);
	WAIT_SETTLED(ctl, 2000);
	assert_int_equal(ctl->outcome, SETTLE_ACK);
	assert_int_equal(atomic_load(&ta->handled), 1);
	assert_int_equal(atomic_load(&tb->handled), 1);
	assert_int_equal(atomic_load(&tc->handled), 0);

	none = control_new("nobody", false);
	sched_submit_control(s, &none->base);
	WAIT_SETTLED(none, 2000);
	assert_int_equal(none->outcome, SETTLE_ACK);
	sched_get_stats(s, &st);
	assert_int_equal(st.control_routed, 1);
	assert_int_equal(st.control_unmatched, 1);

	atomic_store(&ta->released, true);
	atomic_store(&tb->released, true);
	atomic_store(&tc->released, true);
	WAIT_SETTLED(a, 2000);
	WAIT_SETTLED(b, 2000);
	WAIT_SETTLED(c, 2000);
	FINISH(s, a, b, c, ctl, none);
}

static void
test_control_reaches_a_help_request_waiting_in_the_store(void **state)
{
	struct sched *s = start(1, HELPER_PRIORITY_NORMAL);
	struct recipe rq = {.mode = RUN_UNTIL_RELEASE};
	struct recipe rx = {.mode = RUN_UNTIL_CANCEL, .id = "helper-of-m"};
	struct fake_msg *q = msg_new(&rq), *help, *ctl;
	struct fake_task *blocker, *stored;
	struct sched_stats st;

	(void)state;
	sched_submit_request(s, &q->base);
	WAIT_STATUS(s, SLOT_PROTECTED, 1, 2000);
	blocker = task_of(q);
	help = control_new(NULL, false);
	help->r = rx;
	sched_submit_control(s, &help->base);
	WAIT_SETTLED(help, 2000);
	stored = task_of(help);
	sched_get_stats(s, &st);
	assert_int_equal(st.external_queued, 1);
	/* Its master says "done" before it ever runs: it must hear it. */
	ctl = control_new("helper-of-m", false);
	sched_submit_control(s, &ctl->base);
	WAIT_SETTLED(ctl, 2000);
	assert_int_equal(atomic_load(&stored->handled), 1);
	assert_int_equal(atomic_load(&stored->running), 0);
	sched_get_stats(s, &st);
	assert_int_equal(st.control_routed, 1);
	atomic_store(&blocker->released, true);
	WAIT_SETTLED(q, 2000);
	FINISH(s, q, help, ctl);
}

static void
test_non_string_task_id_is_dead_lettered(void **state)
{
	struct sched *s = start(1, HELPER_PRIORITY_NORMAL);
	struct fake_msg *ctl = control_new("x", true);
	struct sched_stats st;

	(void)state;
	sched_submit_control(s, &ctl->base);
	WAIT_SETTLED(ctl, 2000);
	assert_int_equal(ctl->outcome, SETTLE_DEAD_LETTER);
	assert_non_null(strstr(ctl->reason, "not a string"));
	sched_get_stats(s, &st);
	assert_int_equal(st.control_invalid, 1);
	FINISH(s, ctl);
}

static void
test_shutdown_lets_short_tasks_finish_and_requeues_long_ones(void **state)
{
	struct sched *s = start(3, HELPER_PRIORITY_NORMAL); /* grace 200 ms */
	struct recipe quick = {.mode = RUN_STUBBORN, .stubborn_ms = 50};
	struct recipe slow = {.mode = RUN_UNTIL_RELEASE};
	struct fake_msg *a = msg_new(&quick), *b = msg_new(&slow), *late;
	struct sched_stats st;

	(void)state;
	sched_submit_request(s, &a->base);
	sched_submit_request(s, &b->base);
	WAIT_STATUS(s, SLOT_PROTECTED, 2, 2000);
	sched_shutdown(s);
	sched_shutdown(s); /* idempotent */
	assert_int_equal(a->outcome, SETTLE_ACK);
	assert_int_equal(b->outcome, SETTLE_REQUEUE);
	late = msg_new(&quick);
	sched_submit_request(s, &late->base);
	WAIT_SETTLED(late, 1000);
	assert_int_equal(late->outcome, SETTLE_REQUEUE);
	sched_get_stats(s, &st);
	assert_int_equal(st.by_status[SLOT_EMPTY], 3);
	FINISH(s, a, b, late);
}

static void
test_cancel_requests_requeues_protected_tasks(void **state)
{
	struct sched *s = start(2, HELPER_PRIORITY_NORMAL);
	struct recipe r = {.mode = RUN_UNTIL_RELEASE};
	struct fake_msg *a = msg_new(&r);

	(void)state;
	sched_submit_request(s, &a->base);
	WAIT_STATUS(s, SLOT_PROTECTED, 1, 2000);
	sched_cancel_requests(s);
	WAIT_SETTLED(a, 2000);
	assert_int_equal(a->outcome, SETTLE_REQUEUE);
	FINISH(s, a);
}

/* ---- cancel tokens ---- */

/* Sleeps whose deadline in ns does not fit in 64 bits (ms * 10^6 wraps, or
 * now + that does) last until the cancel, instead of returning at once. */
static void
test_huge_sleep_lasts_until_cancelled(void **state)
{
	static const uint64_t huge[] = {
		UINT64_MAX, UINT64_MAX / 1000000u + 1, UINT64_MAX / 1000000u,
		UINT64_MAX / 2000000u,
	};
	struct sched *s = start(1, HELPER_PRIORITY_NORMAL);
	size_t i;

	(void)state;
	for (i = 0; i < sizeof(huge) / sizeof(huge[0]); i++) {
		struct recipe r = {.mode = RUN_SLEEP, .sleep_ms = huge[i]};
		struct fake_msg *m = msg_new(&r);

		sched_submit_request(s, &m->base);
		WAIT_STATUS(s, SLOT_PROTECTED, 1, 2000);
		usleep(100 * 1000);
		if (atomic_load(&m->settled) != 0)
			fail_msg("sleep_ms(%llu) returned at once",
				 (unsigned long long)huge[i]);
		sched_cancel_requests(s);
		WAIT_SETTLED(m, 2000);
		assert_int_equal(m->outcome, SETTLE_REQUEUE);
		WAIT_STATUS(s, SLOT_EMPTY, 1, 2000);
		msg_free(m);
	}
	finish(s);
}

/* A short sleep still ends on time without a cancel. */
static void
test_short_sleep_ends_on_time(void **state)
{
	struct sched *s = start(1, HELPER_PRIORITY_NORMAL);
	struct recipe r = {.mode = RUN_SLEEP, .sleep_ms = 20};
	struct fake_msg *m = msg_new(&r);

	(void)state;
	sched_submit_request(s, &m->base);
	WAIT_SETTLED(m, 2000);
	assert_int_equal(m->outcome, SETTLE_ACK);
	FINISH(s, m);
}

static bool
is_running(void *arg)
{
	return atomic_load(&((struct fake_task *)arg)->running) > 0;
}

/* Inside run(), past make_task: a cancel now reaches a running task. */
static void
wait_running(struct fake_task *t)
{
	if (!wait_for(is_running, t, 2000))
		fail_msg("task not running within 2 s");
}

/* Plays the broker for one request: each time the scheduler requeues it, it
 * comes straight back (a new fake message, as a redelivery is), until it is
 * settled otherwise or ms pass.  Returns the number of requeues; *last is the
 * final delivery (maybe still unsettled). */
static unsigned
redeliver_until_done(struct sched *s, const struct recipe *r, unsigned ms,
		     struct fake_msg **last)
{
	uint64_t end = mono_ns() + (uint64_t)ms * time_scale() * 1000000u;
	unsigned requeues = 0;

	for (;;) {
		struct fake_msg *m = msg_new(r);

		sched_submit_request(s, &m->base);
		while (!is_settled(m) && mono_ns() < end)
			usleep(100);
		if (!is_settled(m) || m->outcome != SETTLE_REQUEUE || mono_ns() >= end) {
			*last = m;
			return requeues;
		}
		requeues++;
		msg_free(m);
	}
}

/* A one-slot scheduler with kill_timeout_ms, its slot running a's task. */
static struct sched *
start_one_running(unsigned kill_timeout_ms, struct fake_msg *a)
{
	struct sched_config cfg = base_config(1);
	struct sched *s;

	cfg.kill_timeout_ms = kill_timeout_ms;
	s = sched_new(&cfg, &fake_source, NULL);
	sched_submit_request(s, &a->base);
	wait_running(task_of(a));
	return s;
}

/* Issue 16: after a reconnect the cancelled task still holds its slot, but
 * the new channel's prefetch does not count it.  The next delivery waits
 * for that slot instead of bouncing "no free slot". */
static void
test_request_waits_for_a_slot_held_by_a_task_cancelled_with_the_connection(void **state)
{
	struct recipe slow = {.mode = RUN_STUBBORN, .stubborn_ms = 300};
	struct recipe quick = {.mode = RUN_OK};
	struct fake_msg *a = msg_new(&slow), *b;
	struct sched_stats st;
	struct sched *s;
	unsigned requeues;

	(void)state;
	s = start_one_running(2000, a);
	sched_cancel_requests(s);
	requeues = redeliver_until_done(s, &quick, 3000, &b);
	WAIT_SETTLED(b, 1000);
	assert_int_equal(requeues, 0);
	assert_int_equal(b->outcome, SETTLE_ACK);
	WAIT_SETTLED(a, 1000);
	assert_int_equal(a->outcome, SETTLE_REQUEUE); /* stale anyway */
	sched_get_stats(s, &st);
	assert_int_equal(st.requeued_no_room, 0);
	assert_int_equal(st.requeued_kill_timeout, 0);
	FINISH(s, a, b);
}

/* The transport calls sched_cancel_requests() and never runs plugin code:
 * the requests it requeues are settled and their tasks destroyed on a
 * scheduler thread. */
static void
test_cancel_requests_runs_no_task_destroy_on_the_callers_thread(void **state)
{
	struct recipe hold = {.mode = RUN_UNTIL_CANCEL};
	struct recipe quick = {.mode = RUN_OK};
	struct fake_msg *a = msg_new(&hold), *b = msg_new(&quick);
	struct sched *s;

	(void)state;
	s = start_one_running(5000, a);
	sched_submit_request(s, &b->base); /* waits for the only slot */
	usleep(50000);
	assert_int_equal(atomic_load(&b->settled), 0);
	destroy_forbidden_on = pthread_self();
	atomic_store(&destroyed_on_forbidden, 0);
	atomic_store(&destroy_forbidden, true);
	sched_cancel_requests(s);
	WAIT_SETTLED(a, 2000);
	WAIT_SETTLED(b, 2000);
	atomic_store(&destroy_forbidden, false);
	assert_int_equal(a->outcome, SETTLE_REQUEUE);
	assert_int_equal(b->outcome, SETTLE_REQUEUE);
	assert_int_equal(atomic_load(&destroyed_on_forbidden), 0);
	FINISH(s, a, b);
}

/* The same when the cancelled task overruns kill_timeout: requeued once at
 * the kill timeout, then (the slot stuck) at most once a second, and the
 * request runs as soon as the slot frees. */
static void
test_slot_stuck_after_a_lost_connection_requeues_at_a_bounded_rate(void **state)
{
	struct recipe slow = {.mode = RUN_STUBBORN, .stubborn_ms = 2500};
	struct recipe quick = {.mode = RUN_OK};
	struct fake_msg *a = msg_new(&slow), *b;
	struct sched_stats st;
	struct sched *s;
	unsigned requeues;

	(void)state;
	s = start_one_running(100, a);
	sched_cancel_requests(s);
	requeues = redeliver_until_done(s, &quick, 6000, &b);
	WAIT_SETTLED(b, 1000);
	assert_int_equal(b->outcome, SETTLE_ACK);
	/* ~0.1 s (kill timeout), ~1.1 s, ~2.1 s; the slot frees at 2.5 s. */
	if (requeues < 1 || requeues > 4)
		fail_msg("%u requeues in 2.5 s", requeues);
	sched_get_stats(s, &st);
	assert_int_equal(st.requeued_kill_timeout, 1);
	assert_int_equal(st.requeued_no_room, requeues - 1);
	FINISH(s, a, b);
}

struct shutdown_arg {
	struct sched *s;
};

static void *
shutdown_thread(void *arg)
{
	sched_shutdown(((struct shutdown_arg *)arg)->s);
	return NULL;
}

/* The transport consumes until the scheduler has shut down: a request
 * requeued at once during the grace would come straight back.  Held, it
 * keeps its prefetch credit, and it is requeued once at the end. */
static void
test_requests_arriving_during_shutdown_are_held_not_bounced(void **state)
{
	struct sched_config cfg = base_config(1);
	struct recipe r = {.mode = RUN_UNTIL_RELEASE};
	struct recipe quick = {.mode = RUN_OK};
	struct fake_msg *a = msg_new(&r), *b;
	struct shutdown_arg arg;
	pthread_t th;
	struct sched *s;

	(void)state;
	cfg.shutdown_grace_ms = 1500;
	s = sched_new(&cfg, &fake_source, NULL);
	sched_submit_request(s, &a->base);
	WAIT_STATUS(s, SLOT_PROTECTED, 1, 2000);
	arg.s = s;
	pthread_create(&th, NULL, shutdown_thread, &arg);
	usleep(100000);
	b = msg_new(&quick);
	sched_submit_request(s, &b->base);
	usleep(200000);
	assert_int_equal(atomic_load(&b->settled), 0);
	pthread_join(th, NULL);
	assert_int_equal(atomic_load(&b->settled), 1);
	assert_int_equal(b->outcome, SETTLE_REQUEUE);
	assert_string_equal(b->reason, "shutting down");
	assert_int_equal(a->outcome, SETTLE_REQUEUE);
	FINISH(s, a, b);
}

/* Issue 16, item 6: a control message that a task's full backlog cannot
 * take is dead-lettered with a reason, never acked unhandled. */
static void
test_control_backlog_overflow_is_dead_lettered_not_acked(void **state)
{
	enum { EXTRA = 10, N = 1 + SCHED_CONTROL_BACKLOG_MAX + EXTRA };
	struct sched *s = start(1, HELPER_PRIORITY_NORMAL);
	struct recipe r = {.mode = RUN_UNTIL_RELEASE, .id = "slow", .handle_gated = true};
	struct fake_msg *q = msg_new(&r), *ctl[N];
	struct fake_task *t;
	struct sched_stats st;
	unsigned i, acked = 0, dead = 0;

	(void)state;
	sched_submit_request(s, &q->base);
	WAIT_STATUS(s, SLOT_PROTECTED, 1, 2000);
	t = task_of(q);
	ctl[0] = control_new("slow", false);
	sched_submit_control(s, &ctl[0]->base);
	for (i = 0; i < 20000 && atomic_load(&t->handle_entered) == 0; i++)
		usleep(100);
	assert_int_equal(atomic_load(&t->handle_entered), 1);
	for (i = 1; i < N; i++) {
		ctl[i] = control_new("slow", false);
		sched_submit_control(s, &ctl[i]->base);
	}
	atomic_store(&t->handle_open, true);
	for (i = 0; i < N; i++) {
		WAIT_SETTLED(ctl[i], 5000);
		if (ctl[i]->outcome == SETTLE_ACK) {
			acked++;
		} else {
			assert_int_equal(ctl[i]->outcome, SETTLE_DEAD_LETTER);
			assert_string_equal(ctl[i]->reason, "control backlog full");
			dead++;
		}
	}
	assert_int_equal(acked, atomic_load(&t->handled));
	assert_int_equal(acked, 1 + SCHED_CONTROL_BACKLOG_MAX);
	assert_int_equal(dead, EXTRA);
	sched_get_stats(s, &st);
	assert_int_equal(st.control_dropped, EXTRA);
	atomic_store(&t->released, true);
	WAIT_SETTLED(q, 2000);
	FINISH(s, q);
	for (i = 0; i < N; i++)
		msg_free(ctl[i]);
}

/* ---- stress ---- */

struct stress_ctx {
	struct sched *s;
	unsigned seed;
	struct fake_msg **msgs;
	unsigned nmsgs;
	atomic_bool stop;
};

static void *
stress_checker(void *arg)
{
	struct stress_ctx *c = arg;

	while (!atomic_load(&c->stop)) {
		struct sched_stats st;
		unsigned sum = 0, i;

		sched_get_stats(c->s, &st);
		for (i = 0; i < SLOT_STATUS_COUNT; i++)
			sum += st.by_status[i];
		if (sum != st.slots)
			fail_msg("slot counts add up to %u, not %u", sum, st.slots);
		usleep(500);
	}
	return NULL;
}

static void *
stress_submitter(void *arg)
{
	struct stress_ctx *c = arg;
	unsigned i;

	for (i = 0; i < c->nmsgs; i++) {
		unsigned k = (unsigned)rand_r(&c->seed) % 10;
		struct recipe r = {0};
		struct fake_msg *m;

		if (k < 4) {
			r.mode = RUN_STUBBORN;
			r.stubborn_ms = (unsigned)rand_r(&c->seed) % 3;
			r.expand_max = (unsigned)rand_r(&c->seed) % 3;
			r.child_mode = RUN_UNTIL_CANCEL;
			r.id = "s";
			m = msg_new(&r);
			sched_submit_request(c->s, &m->base);
		} else if (k < 6) {
			r.mode = RUN_STATUS;
			r.status = (enum occamy_status)(rand_r(&c->seed) % 6);
			m = msg_new(&r);
			sched_submit_request(c->s, &m->base);
		} else if (k < 8) {
			m = control_new("s", false);
			sched_submit_control(c->s, &m->base);
		} else {
			r.mode = RUN_UNTIL_CANCEL;
			r.expand_max = 1;
			r.child_mode = RUN_UNTIL_CANCEL;
			m = control_new(NULL, false);
			m->r = r;
			sched_submit_control(c->s, &m->base);
		}
		c->msgs[i] = m;
		if (rand_r(&c->seed) % 4 == 0)
			sched_expand_now(c->s);
		if (rand_r(&c->seed) % 8 == 0)
			usleep(100);
	}
	return NULL;
}

static void
test_stress_every_message_settled_exactly_once(void **state)
{
	enum { THREADS = 4, PER_THREAD = 1500 };
	struct sched_config cfg = base_config(6);
	struct stress_ctx ctx[THREADS], chk;
	pthread_t th[THREADS], checker;
	struct sched *s;
	unsigned i, j, settled = 0;

	(void)state;
	cfg.kill_timeout_ms = 50;
	cfg.shutdown_grace_ms = 100;
	cfg.expansion_period_ms = 2;
	cfg.expansion_slot_buffer = 1;
	s = sched_new(&cfg, &fake_source, NULL);
	chk.s = s;
	atomic_init(&chk.stop, false);
	pthread_create(&checker, NULL, stress_checker, &chk);
	for (i = 0; i < THREADS; i++) {
		ctx[i].s = s;
		ctx[i].seed = 1234 + i;
		ctx[i].nmsgs = PER_THREAD;
		ctx[i].msgs = calloc(PER_THREAD, sizeof(*ctx[i].msgs));
		pthread_create(&th[i], NULL, stress_submitter, &ctx[i]);
	}
	for (i = 0; i < THREADS; i++)
		pthread_join(th[i], NULL);
	sched_shutdown(s);
	atomic_store(&chk.stop, true);
	pthread_join(checker, NULL);
	for (i = 0; i < THREADS; i++) {
		for (j = 0; j < PER_THREAD; j++) {
			if (atomic_load(&ctx[i].msgs[j]->settled) != 1)
				fail_msg("message %u/%u settled %d times", i, j,
					 atomic_load(&ctx[i].msgs[j]->settled));
			settled++;
			msg_free(ctx[i].msgs[j]);
		}
		free(ctx[i].msgs);
	}
	assert_int_equal(settled, THREADS * PER_THREAD);
	finish(s);
}

/* A failed test may leave tasks behind; do not blame the next one. */
/* ---- the admission decision, without threads ---- */

static struct slot
slot_of(enum slot_status st, struct job *j, struct job *pending)
{
	return (struct slot){.status = st, .job = j, .pending = pending};
}

static void
test_admit_decision_holds_every_request_during_shutdown(void **state)
{
	struct slot sl[2] = {slot_of(SLOT_EMPTY, NULL, NULL), slot_of(SLOT_EMPTY, NULL, NULL)};
	struct admit_decision d = admit_decide(sl, 2, true);

	(void)state;
	assert_int_equal(d.action, ADMIT_WAIT);
	assert_int_equal(d.slot, -1);
}

static void
test_admit_decision_starts_in_the_first_unreserved_empty_slot(void **state)
{
	struct job p = {.kind = JOB_PROTECTED}, h = {.kind = JOB_INTERNAL};
	struct slot sl[4] = {
		slot_of(SLOT_PROTECTED, &p, NULL),
		slot_of(SLOT_EMPTY, NULL, &p), /* reserved for an admission */
		slot_of(SLOT_INTERNAL, &h, NULL),
		slot_of(SLOT_EMPTY, NULL, NULL),
	};
	struct admit_decision d = admit_decide(sl, 4, false);

	(void)state;
	assert_int_equal(d.action, ADMIT_START);
	assert_int_equal(d.slot, 3);
}

static void
test_admit_decision_preempts_external_before_internal_then_newest(void **state)
{
	struct job i_old = {.kind = JOB_INTERNAL, .start_ns = 10};
	struct job i_new = {.kind = JOB_INTERNAL, .start_ns = 30};
	struct job e_old = {.kind = JOB_EXTERNAL, .start_ns = 5};
	struct job e_new = {.kind = JOB_EXTERNAL, .start_ns = 20};
	struct slot sl[4] = {
		slot_of(SLOT_INTERNAL, &i_new, NULL),
		slot_of(SLOT_EXTERNAL, &e_old, NULL),
		slot_of(SLOT_INTERNAL, &i_old, NULL),
		slot_of(SLOT_EXTERNAL, &e_new, NULL),
	};
	struct admit_decision d = admit_decide(sl, 4, false);

	(void)state;
	assert_int_equal(d.action, ADMIT_PREEMPT);
	assert_int_equal(d.slot, 3); /* external, and the newest of them */
	sl[1].status = sl[3].status = SLOT_PROTECTED;
	d = admit_decide(sl, 4, false);
	assert_int_equal(d.action, ADMIT_PREEMPT);
	assert_int_equal(d.slot, 0); /* the newest internal */
}

static void
test_admit_decision_waits_when_only_protected_or_cancelled_remain(void **state)
{
	struct job p = {.kind = JOB_PROTECTED};
	struct job gone = {.kind = JOB_INTERNAL, .cancelled = true};
	struct job reserved = {.kind = JOB_EXTERNAL};
	struct slot sl[3] = {
		slot_of(SLOT_PROTECTED, &p, NULL),
		slot_of(SLOT_INTERNAL, &gone, NULL),
		slot_of(SLOT_EXTERNAL, &reserved, &p), /* already being preempted */
	};
	struct admit_decision d = admit_decide(sl, 3, false);

	(void)state;
	assert_int_equal(d.action, ADMIT_WAIT);
	assert_int_equal(d.slot, -1);
}

/* The kill timers are the admission thread's: an expand() that blocks the
 * expansion thread must not keep a held request from going back. */
static void
test_gated_expand_does_not_delay_a_held_requests_requeue(void **state)
{
	struct sched *s = start(2, HELPER_PRIORITY_NORMAL); /* kill_timeout 200 ms */
	struct recipe gated = {.mode = RUN_UNTIL_RELEASE, .expand_max = 64, .gated = true};
	struct recipe r = {.mode = RUN_UNTIL_RELEASE};
	struct recipe quick = {.mode = RUN_OK};
	struct fake_msg *a = msg_new(&gated), *b = msg_new(&r), *c = msg_new(&quick);
	struct fake_task *at;
	uint64_t t0, took, bound;

	(void)state;
	sched_submit_request(s, &a->base);
	WAIT_STATUS(s, SLOT_PROTECTED, 1, 2000);
	at = task_of(a);
	assert_true(wait_for(is_expanding, at, 2000)); /* the expansion thread is stuck */
	sched_submit_request(s, &b->base);
	WAIT_STATUS(s, SLOT_PROTECTED, 2, 2000);
	t0 = mono_ns();
	sched_submit_request(s, &c->base);
	WAIT_SETTLED(c, 3000);
	took = mono_ns() - t0;
	assert_int_equal(c->outcome, SETTLE_REQUEUE);
	assert_string_equal(c->reason, "no free slot");
	/* The hold is max(kill_timeout, 1 s); a margin for a loaded machine. */
	bound = (1000u + 500u * time_scale()) * 1000000ull;
	assert_true(took >= 990000000u);
	assert_true(took < bound);
	assert_true(atomic_load(&at->expanding));
	assert_false(atomic_load(&at->gate_open));

	atomic_store(&at->gate_open, true);
	atomic_store(&at->released, true);
	atomic_store(&task_of(b)->released, true);
	WAIT_SETTLED(a, 2000);
	WAIT_SETTLED(b, 2000);
	sched_shutdown(s);
	FINISH(s, a, b, c);
}

/* Not the scheduler's, but the header every plugin includes: an ABI 1.0
 * host table ends before header_task_id. */
static void
test_host_has_sees_only_fields_within_the_tables_size(void **state)
{
	struct occamy_host h = {.size = sizeof(struct occamy_host)};

	(void)state;
	assert_true(OCCAMY_HOST_HAS(&h, header_task_id));
	assert_true(OCCAMY_HOST_HAS(&h, header_handler));
	h.size = offsetof(struct occamy_host, header_task_id);
	assert_false(OCCAMY_HOST_HAS(&h, header_task_id));
	assert_true(OCCAMY_HOST_HAS(&h, plugin_state));
}

static int
reset_counters(void **state)
{
	(void)state;
	atomic_store(&tasks_alive, 0);
	atomic_store(&tasks_destroyed_twice, 0);
	atomic_store(&msgs_alive, 0);
	atomic_store(&msgs_settled_twice, 0);
	return 0;
}

/* The daemon-level withdrawal: announced once, for a noted master only,
 * and only at a final outcome (ack, dead letter), never a requeue or retry
 * (the request runs again and may ask for help again). */
struct announced {
	pthread_mutex_t mu;
	char ids[8][32];
	unsigned n;
};

static void
record_announce(void *ctx, const char *master_id)
{
	struct announced *a = ctx;

	pthread_mutex_lock(&a->mu);
	if (a->n < 8)
		snprintf(a->ids[a->n], sizeof(a->ids[0]), "%s", master_id);
	a->n++;
	pthread_mutex_unlock(&a->mu);
}

static unsigned
announced_count(struct announced *a)
{
	unsigned n;

	pthread_mutex_lock(&a->mu);
	n = a->n;
	pthread_mutex_unlock(&a->mu);
	return n;
}

static void
run_one(struct sched *s, const struct recipe *r, enum settle_outcome want)
{
	struct fake_msg *m = msg_new(r);

	sched_submit_request(s, &m->base);
	WAIT_SETTLED(m, 2000);
	assert_int_equal(m->outcome, want);
	msg_free(m);
}

static void
test_withdrawal_is_announced_once_at_a_final_outcome_of_a_noted_master(void **state)
{
	struct sched *s = start(2, HELPER_PRIORITY_NORMAL);
	struct announced a = {.mu = PTHREAD_MUTEX_INITIALIZER};
	struct recipe ok = {.mode = RUN_OK, .id = "m-ok"};
	struct recipe retried = {.mode = RUN_STATUS, .status = OCCAMY_ERR_INTERNAL, .id = "m-again"};
	struct recipe requeued = {.mode = RUN_STATUS, .status = OCCAMY_ERR_INTERRUPTED,
				  .id = "m-again"};
	struct recipe again_ok = {.mode = RUN_OK, .id = "m-again"};
	struct recipe dead = {.mode = RUN_STATUS, .status = OCCAMY_ERR_INVALID_TASK, .id = "m-dead"};
	struct recipe quiet = {.mode = RUN_OK, .id = "m-quiet"};

	(void)state;
	sched_set_withdrawal(s, record_announce, &a);
	sched_note_help_published(s, "m-ok");
	sched_note_help_published(s, "m-again");
	sched_note_help_published(s, "m-again"); /* noted twice, announced once */
	sched_note_help_published(s, "m-dead");

	run_one(s, &quiet, SETTLE_ACK);           /* never published help */
	run_one(s, &retried, SETTLE_RETRY);
	run_one(s, &requeued, SETTLE_REQUEUE);
	assert_int_equal(announced_count(&a), 0);

	run_one(s, &ok, SETTLE_ACK);
	assert_int_equal(announced_count(&a), 1);
	assert_string_equal(a.ids[0], "m-ok");
	run_one(s, &ok, SETTLE_ACK);              /* announced already: not again */
	assert_int_equal(announced_count(&a), 1);

	run_one(s, &again_ok, SETTLE_ACK);        /* the run after the retries */
	run_one(s, &dead, SETTLE_DEAD_LETTER);
	assert_int_equal(announced_count(&a), 3);
	assert_string_equal(a.ids[1], "m-again");
	assert_string_equal(a.ids[2], "m-dead");

	/* Unset: a later end is not announced (the transport is gone). */
	sched_note_help_published(s, "m-late");
	sched_set_withdrawal(s, NULL, NULL);
	run_one(s, &(struct recipe){.mode = RUN_OK, .id = "m-late"}, SETTLE_ACK);
	assert_int_equal(announced_count(&a), 3);
	finish(s);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup(test_request_runs_and_is_acked_with_its_result, reset_counters),
		cmocka_unit_test_setup(test_held_wakeup_starts_the_request_when_released,
				       reset_counters),
		cmocka_unit_test_setup(test_slot_is_free_before_the_message_is_settled, reset_counters),
		cmocka_unit_test_setup(test_task_outcomes_map_to_settlements, reset_counters),
		cmocka_unit_test_setup(test_handler_errors_and_null_task_are_settled_not_crashed, reset_counters),
		cmocka_unit_test_setup(test_scenario_a_one_request_fills_every_slot_with_its_helpers, reset_counters),
		cmocka_unit_test_setup(test_expand_is_offered_exactly_the_free_room, reset_counters),
		cmocka_unit_test_setup(test_helpers_returned_beyond_room_are_destroyed, reset_counters),
		cmocka_unit_test_setup(test_buffer_slots_stay_empty_for_requests, reset_counters),
		cmocka_unit_test_setup(test_full_of_protected_tasks_holds_the_request_then_requeues_it_once, reset_counters),
		cmocka_unit_test_setup(test_scenario_b_preempts_a_helper_normal_priority, reset_counters),
		cmocka_unit_test_setup(test_scenario_b_preempts_a_helper_idle_priority, reset_counters),
		cmocka_unit_test_setup(test_external_helpers_are_preempted_before_internal, reset_counters),
		cmocka_unit_test_setup(test_most_recent_helper_is_preempted_first, reset_counters),
		cmocka_unit_test_setup(test_kill_timeout_requeues_request_and_stays_responsive, reset_counters),
		cmocka_unit_test_setup(test_stubborn_helper_does_not_delay_admission_in_idle_mode, reset_counters),
		cmocka_unit_test_setup(test_draining_helpers_are_bounded_by_the_helper_pool, reset_counters),
		cmocka_unit_test_setup(test_fair_share_between_two_protected_tasks, reset_counters),
		cmocka_unit_test_setup(test_expansion_serves_protected_tasks_before_stored_help, reset_counters),
		cmocka_unit_test_setup(test_external_store_orders_by_priority_and_expires, reset_counters),
		cmocka_unit_test_setup(test_external_task_without_deadline_is_kept_until_ttl, reset_counters),
		cmocka_unit_test_setup(test_control_reaches_every_task_with_the_id, reset_counters),
		cmocka_unit_test_setup(test_control_reaches_a_help_request_waiting_in_the_store, reset_counters),
		cmocka_unit_test_setup(test_non_string_task_id_is_dead_lettered, reset_counters),
		cmocka_unit_test_setup(test_shutdown_lets_short_tasks_finish_and_requeues_long_ones, reset_counters),
		cmocka_unit_test_setup(test_cancel_requests_requeues_protected_tasks, reset_counters),
		cmocka_unit_test_setup(test_huge_sleep_lasts_until_cancelled, reset_counters),
		cmocka_unit_test_setup(test_short_sleep_ends_on_time, reset_counters),
		cmocka_unit_test_setup(test_request_waits_for_a_slot_held_by_a_task_cancelled_with_the_connection, reset_counters),
		cmocka_unit_test_setup(test_cancel_requests_runs_no_task_destroy_on_the_callers_thread, reset_counters),
		cmocka_unit_test_setup(test_slot_stuck_after_a_lost_connection_requeues_at_a_bounded_rate, reset_counters),
		cmocka_unit_test_setup(test_requests_arriving_during_shutdown_are_held_not_bounced, reset_counters),
		cmocka_unit_test_setup(test_control_backlog_overflow_is_dead_lettered_not_acked, reset_counters),
		cmocka_unit_test_setup(test_stress_every_message_settled_exactly_once, reset_counters),
		cmocka_unit_test(test_admit_decision_holds_every_request_during_shutdown),
		cmocka_unit_test(test_admit_decision_starts_in_the_first_unreserved_empty_slot),
		cmocka_unit_test(test_admit_decision_preempts_external_before_internal_then_newest),
		cmocka_unit_test(test_admit_decision_waits_when_only_protected_or_cancelled_remain),
		cmocka_unit_test_setup(test_gated_expand_does_not_delay_a_held_requests_requeue, reset_counters),
		cmocka_unit_test(test_host_has_sees_only_fields_within_the_tables_size),
		cmocka_unit_test_setup(test_withdrawal_is_announced_once_at_a_final_outcome_of_a_noted_master, reset_counters),
	};

	log_init(-1);
	return cmocka_run_group_tests(tests, NULL, NULL);
}
