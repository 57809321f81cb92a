/*
 * sched.c - the slot scheduler.  Owns the slots, the worker threads that run
 * tasks in them, admission and preemption of requests, the expansion pass,
 * the store of external help requests and the routing of control messages.
 *
 * Locking: one mutex (s->mu) guards every field of struct sched, its slots,
 * workers and jobs.  It is never held while plugin code runs (make_task,
 * run, expand, handle, destroy) nor while a message is settled, so a slow
 * plugin or transport never blocks the scheduler.  Jobs are reference
 * counted so that a task is destroyed only after every callback returned.
 *
 * Threads: 2 x slots workers (a protected pool at normal priority and a
 * helper pool, at SCHED_IDLE unless helper_priority = normal), one admission
 * thread, one expansion thread, and a few control dispatchers.
 */
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <semaphore.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/futex.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "log.h"
#include "scheduler.h"

#define DISPATCHERS_MAX 64
/* A request that finds no slot is held at least this long before it goes
 * back to the broker, which would hand it straight back otherwise. */
#define REQUEUE_HOLD_MIN_MS 1000
#define EXPANSION_ROUNDS_MAX 8

const double sched_latency_bounds_s[SCHED_LATENCY_BUCKETS] = {
	0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
	0.01, 0.025, 0.05, 0.1, 0.5, 1.0,
};

/* A flag and a futex on it: no mutex, so firing it never waits for an
 * idle-priority helper that happens to be inside a sleep. */
struct occamy_cancel {
	atomic_uint set;
};

/* A control message shared by every task it was routed to; acked when the
 * last of them has handled it, dead-lettered if a task could not take it. */
struct control_ref {
	struct message *m;
	unsigned refs;
	bool overflow;   /* some task's backlog was full */
};

struct control_item {
	struct control_ref *ref;
	struct control_item *next;
};

struct worker;

struct job {
	struct task *task;
	struct message *msg;       /* protected jobs only */
	enum slot_status kind;     /* PROTECTED, INTERNAL or EXTERNAL */
	int slot;                  /* -1 while pending or draining */
	unsigned long serial;
	unsigned long root;        /* lineage: serial of the protected/external root */
	uint64_t start_ns;
	uint64_t cancel_ns;
	bool cancelled;            /* by the scheduler */
	bool finished;
	unsigned refs;
	struct occamy_cancel cancel;
	struct worker *worker;
	struct job *prev, *next;   /* s->running */
	struct job *wait_next;     /* s->wait_head: held for a slot */
	uint64_t wait_deadline_ns;
	bool wait_for_kill;        /* held for a cancelled task within kill_timeout */

	struct control_item *ctl_head, *ctl_tail;
	unsigned ctl_len;
	bool ctl_busy, ctl_ready;
	bool ctl_overflowed;       /* logged once per task */
	struct job *ready_next;
};

struct worker {
	struct sched *s;
	pthread_t thread;
	pid_t tid;
	bool helper_pool;
	bool started;
	bool niced;      /* SCHED_IDLE was refused: fell back to nice 19 */
	struct job *job;
	pthread_cond_t cv;          /* protected workers wait on it with s->mu */
	struct worker *next_free;

	/* Helper workers only: they never take s->mu (see helper_main). */
	sem_t go;
	atomic_bool stop;
	enum occamy_status status;
	struct occamy_output out;
	struct worker *next_finished;
};

struct slot {
	enum slot_status status;
	struct job *job;
	struct job *pending;       /* normal mode: admitted, waiting for the kill */
	uint64_t pending_deadline_ns;
};

/* A stored help request: a job not yet started, so control messages to its
 * task ID reach it while it waits (its master may say "done"). */
struct external {
	struct job *job;
	int64_t deadline_ms;
	uint64_t seq;
};

struct queued_msg {
	struct message *m;
	struct queued_msg *next;
};

struct msg_queue {
	struct queued_msg *head, *tail;
};

struct deferred_settle {
	struct message *m;
	struct settlement set;
};

struct deferred {
	struct deferred_settle *settle;
	unsigned nsettle, cap_settle;
	struct task **destroy;
	unsigned ndestroy, cap_destroy;
	struct job **free_jobs;
	unsigned nfree, cap_free;
};

struct sched {
	pthread_mutex_t mu;
	struct sched_config cfg;
	char *header_task_id;
	struct task_source src;
	struct sched_observer obs;

	unsigned nslots;
	struct slot *slots;
	struct worker *workers;     /* [0, nslots) protected, [nslots, 2n) helpers */
	struct worker *free_protected, *free_helpers;
	struct job *running;
	struct job *wait_head, *wait_tail; /* requests held for any slot, FIFO */
	unsigned nwaiting;
	unsigned long next_serial;
	bool helpers_idle;          /* SCHED_IDLE actually in force */

	struct msg_queue admissions;
	pthread_cond_t admit_cv;
	pthread_t admit_thread;

	pthread_cond_t expand_cv;
	bool expand_kick;
	pthread_t expand_thread;
	/* Settlements and destroys collected on a thread that must not run
	 * plugin code (the transport's): the expansion thread runs them. */
	struct deferred orphans;

	struct msg_queue help_requests;
	struct job *ready_head, *ready_tail;
	pthread_cond_t control_cv;
	pthread_t dispatchers[DISPATCHERS_MAX];
	unsigned ndispatchers;

	struct external *store;
	unsigned nstore, store_cap;
	uint64_t store_seq;

	pthread_cond_t idle_cv;     /* a job finished */
	_Atomic(struct worker *) finished_helpers; /* lock-free: helpers push */
	sem_t reaper_go;
	pthread_t reaper_thread;
	unsigned settling;          /* finished jobs whose message is being settled */
	bool stopping, quit, shut_down, freed_ok, dispatchers_wedged;

	struct sched_stats st;
};

/* Work collected under the lock and carried out after unlocking. */
static uint64_t
now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int64_t
wall_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void
deadline_to_timespec(uint64_t mono_ns, struct timespec *ts)
{
	ts->tv_sec = (time_t)(mono_ns / 1000000000u);
	ts->tv_nsec = (long)(mono_ns % 1000000000u);
}

static void
cond_init_monotonic(pthread_cond_t *cv)
{
	pthread_condattr_t a;

	pthread_condattr_init(&a);
	pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
	pthread_cond_init(cv, &a);
	pthread_condattr_destroy(&a);
}

const char *
slot_status_name(enum slot_status st)
{
	static const char *const names[] = {"empty", "protected", "internal", "external"};

	return st < SLOT_STATUS_COUNT ? names[st] : "?";
}

/* ---- cancel tokens ---- */

static void
cancel_init(struct occamy_cancel *c)
{
	atomic_init(&c->set, 0);
}

static void
cancel_destroy(struct occamy_cancel *c)
{
	(void)c;
}

static void
cancel_fire(struct occamy_cancel *c)
{
	atomic_store_explicit(&c->set, 1, memory_order_release);
	syscall(SYS_futex, &c->set, FUTEX_WAKE_PRIVATE, INT32_MAX, NULL, NULL, 0);
}

bool
cancel_is_set(const struct occamy_cancel *c)
{
	return atomic_load_explicit(&c->set, memory_order_acquire) != 0;
}

bool
cancel_sleep_ms(const struct occamy_cancel *cc, uint64_t ms)
{
	/* The token is logically const to plugins; waiting needs its word. */
	struct occamy_cancel *c = (struct occamy_cancel *)(uintptr_t)cc;
	uint64_t now = now_ns(), end;

	/* Saturate: ms * 10^6 or now + that may wrap, and a wrapped deadline
	 * lies in the past, so "sleep forever" would return at once and the
	 * plugin would spin. */
	end = ms > (UINT64_MAX - now) / 1000000u ? UINT64_MAX : now + ms * 1000000u;

	while (!cancel_is_set(c) && (now = now_ns()) < end) {
		uint64_t left = end - now;
		struct timespec rel = {.tv_sec = (time_t)(left / 1000000000u),
				       .tv_nsec = (long)(left % 1000000000u)};
		/* Returns at once if the word is no longer 0. */
		syscall(SYS_futex, &c->set, FUTEX_WAIT_PRIVATE, 0, &rel, NULL, 0);
	}
	return cancel_is_set(c);
}

/* ---- deferred work ---- */

static void
defer_settle(struct deferred *d, struct message *m, enum settle_outcome o,
	     const char *reason)
{
	if (m == NULL)
		return;
	if (d->nsettle == d->cap_settle) {
		d->cap_settle = d->cap_settle ? 2 * d->cap_settle : 8;
		d->settle = xrealloc(d->settle, d->cap_settle * sizeof(*d->settle));
	}
	d->settle[d->nsettle].m = m;
	d->settle[d->nsettle].set = (struct settlement){.outcome = o, .reason = reason};
	d->nsettle++;
}

static void
defer_destroy(struct deferred *d, struct task *t)
{
	if (t == NULL)
		return;
	if (d->ndestroy == d->cap_destroy) {
		d->cap_destroy = d->cap_destroy ? 2 * d->cap_destroy : 8;
		d->destroy = xrealloc(d->destroy, d->cap_destroy * sizeof(*d->destroy));
	}
	d->destroy[d->ndestroy++] = t;
}

static void
defer_free_job(struct deferred *d, struct job *j)
{
	if (d->nfree == d->cap_free) {
		d->cap_free = d->cap_free ? 2 * d->cap_free : 8;
		d->free_jobs = xrealloc(d->free_jobs, d->cap_free * sizeof(*d->free_jobs));
	}
	d->free_jobs[d->nfree++] = j;
}

static void
count_settlement(struct sched *s, enum settle_outcome o)
{
	s->st.settled[o]++;
}

/* Called without the lock. */
static void
deferred_run(struct deferred *d)
{
	unsigned i;

	for (i = 0; i < d->nsettle; i++)
		d->settle[i].m->ops->settle(d->settle[i].m, &d->settle[i].set);
	for (i = 0; i < d->ndestroy; i++)
		d->destroy[i]->ops->destroy(d->destroy[i]);
	for (i = 0; i < d->nfree; i++) {
		struct job *j = d->free_jobs[i];
		j->task->ops->destroy(j->task);
		cancel_destroy(&j->cancel);
		free(j);
	}
	free(d->settle);
	free(d->destroy);
	free(d->free_jobs);
	memset(d, 0, sizeof(*d));
}

/* ---- jobs ---- */

static struct job *
job_new(struct sched *s, struct task *t, struct message *m, enum slot_status kind,
	unsigned long root)
{
	struct job *j = xcalloc(1, sizeof(*j));

	j->task = t;
	j->msg = m;
	j->kind = kind;
	j->slot = -1;
	j->serial = ++s->next_serial;
	j->root = root ? root : j->serial;
	j->refs = 1; /* the worker's */
	cancel_init(&j->cancel);
	return j;
}

static void
job_unref(struct sched *s, struct job *j, struct deferred *d)
{
	(void)s;
	if (--j->refs == 0)
		defer_free_job(d, j);
}

static void
job_cancel(struct job *j)
{
	if (j->cancelled || j->finished)
		return;
	j->cancelled = true;
	j->cancel_ns = now_ns();
	cancel_fire(&j->cancel);
}

static struct worker *
worker_take(struct sched *s, bool helper)
{
	struct worker **list = helper ? &s->free_helpers : &s->free_protected;
	struct worker *w = *list;

	if (w != NULL)
		*list = w->next_free;
	return w;
}

/* Put j into slot i and hand it to a worker.  Caller checked both exist. */
static void
job_start(struct sched *s, struct job *j, unsigned i)
{
	struct worker *w = worker_take(s, j->kind != SLOT_PROTECTED);

	if (w == NULL)
		fatalx("sched: no free worker for a %s task (bug)", slot_status_name(j->kind));
	s->slots[i].status = j->kind;
	s->slots[i].job = j;
	j->slot = (int)i;
	j->start_ns = now_ns();
	j->worker = w;
	j->next = s->running;
	j->prev = NULL;
	if (s->running)
		s->running->prev = j;
	s->running = j;
	if (j->kind != SLOT_PROTECTED)
		s->st.expansions[j->kind]++;
	w->job = j;
	if (w->helper_pool)
		sem_post(&w->go);
	else
		pthread_cond_signal(&w->cv);
}

static unsigned
count_empty(const struct sched *s, int *first)
{
	unsigned i, n = 0;

	*first = -1;
	for (i = 0; i < s->nslots; i++) {
		if (s->slots[i].status == SLOT_EMPTY && s->slots[i].pending == NULL) {
			if (*first < 0)
				*first = (int)i;
			n++;
		}
	}
	return n;
}

static unsigned
free_helper_workers(const struct sched *s)
{
	unsigned n = 0;
	const struct worker *w;

	for (w = s->free_helpers; w != NULL; w = w->next_free)
		n++;
	return n;
}

/* How many helpers may start now: empty slots beyond the buffer, and no
 * more than the helper threads that are not draining. */
static unsigned
helper_room(const struct sched *s)
{
	int first;
	unsigned empty = count_empty(s, &first);
	unsigned room = empty > s->cfg.expansion_slot_buffer ?
				empty - s->cfg.expansion_slot_buffer : 0;
	unsigned workers = free_helper_workers(s);

	return room < workers ? room : workers;
}

static void
kick_expansion(struct sched *s)
{
	s->expand_kick = true;
	pthread_cond_signal(&s->expand_cv);
}

/* Kick only if a pass could start something: waking the expansion thread
 * for every finished request costs more than the request itself. */
static void
kick_expansion_if_useful(struct sched *s)
{
	const struct job *j;

	if (s->expand_kick)
		return;
	if (s->nstore > 0) {
		kick_expansion(s);
		return;
	}
	for (j = s->running; j != NULL; j = j->next) {
		if (!j->cancelled && j->slot >= 0 && j->task != NULL &&
		    j->task->ops->expand != NULL) {
			kick_expansion(s);
			return;
		}
	}
}

/* ---- requests without a slot ---- */

/* Requeue the message of a job that never started; its task (if made) is
 * destroyed after the lock, through d. */
static void
unstarted_requeue(struct sched *s, struct job *p, const char *reason, struct deferred *d)
{
	count_settlement(s, SETTLE_REQUEUE);
	defer_settle(d, p->msg, SETTLE_REQUEUE, reason);
	defer_destroy(d, p->task);
	cancel_destroy(&p->cancel);
	free(p);
}

/* Give up on the admission waiting for slot i. */
static void
pending_requeue(struct sched *s, unsigned i, const char *reason, struct deferred *d)
{
	struct job *p = s->slots[i].pending;

	s->slots[i].pending = NULL;
	unstarted_requeue(s, p, reason, d);
}

/*
 * Requests held for a slot.  The broker's prefetch counts only deliveries
 * of the current channel, so slots may be taken by work it does not see: a
 * task cancelled with a lost connection, a helper that ignores its cancel
 * (stuck), or, with prefetch > slots, simply the other deliveries.  A
 * request requeued at once would come straight back: a tight loop.  Held,
 * it keeps its prefetch credit, so the broker stops sending; it takes the
 * first slot that frees.  It goes back to the broker after kill_timeout if
 * a cancelled task is about to free a slot, else after
 * max(kill_timeout, REQUEUE_HOLD_MIN_MS), so each delivery is requeued at
 * most once per hold, and prefetch bounds how many are held.  During
 * shutdown the consumer stays open, so arrivals are held the same way and
 * never start.
 *
 * Caller holds s->mu for all of these.
 */

#define REASON_KILL_TIMEOUT "kill timeout: no slot freed in time"

/* A cancelled task may still free its slot within kill_timeout. */
static bool
slot_freeing_soon(const struct sched *s, uint64_t now)
{
	uint64_t kill_ns = (uint64_t)s->cfg.kill_timeout_ms * 1000000u;
	unsigned i;

	for (i = 0; i < s->nslots; i++) {
		const struct job *j = s->slots[i].job;

		if (s->slots[i].pending == NULL && j != NULL && j->cancelled &&
		    j->cancel_ns + kill_ns > now)
			return true;
	}
	return false;
}

static void
waiting_add(struct sched *s, struct job *j)
{
	uint64_t now = now_ns();
	uint64_t kill_ns = (uint64_t)s->cfg.kill_timeout_ms * 1000000u;
	uint64_t hold = (uint64_t)REQUEUE_HOLD_MIN_MS * 1000000u;

	j->wait_for_kill = !s->stopping && slot_freeing_soon(s, now);
	if (j->wait_for_kill || kill_ns > hold)
		hold = kill_ns;
	j->wait_deadline_ns = now + hold;
	j->wait_next = NULL;
	if (s->wait_tail)
		s->wait_tail->wait_next = j;
	else
		s->wait_head = j;
	s->wait_tail = j;
	s->nwaiting++;
	kick_expansion(s); /* arms the timer */
}

static struct job *
waiting_pop(struct sched *s)
{
	struct job *j = s->wait_head;

	if (j == NULL)
		return NULL;
	s->wait_head = j->wait_next;
	if (s->wait_head == NULL)
		s->wait_tail = NULL;
	j->wait_next = NULL;
	s->nwaiting--;
	return j;
}

/* Requeue the held requests whose hold is over, or all of them with
 * reason all_reason; returns the earliest deadline left. */
static uint64_t
waiting_expire(struct sched *s, const char *all_reason, struct deferred *d)
{
	struct job **pp = &s->wait_head, *j;
	uint64_t now = now_ns(), next = UINT64_MAX;
	const char *reason;

	s->wait_tail = NULL;
	while ((j = *pp) != NULL) {
		if (all_reason == NULL && j->wait_deadline_ns > now) {
			if (j->wait_deadline_ns < next)
				next = j->wait_deadline_ns;
			s->wait_tail = j;
			pp = &j->wait_next;
			continue;
		}
		*pp = j->wait_next;
		s->nwaiting--;
		if (all_reason != NULL) {
			reason = all_reason;
		} else if (s->stopping) {
			reason = "shutting down";
		} else if (j->wait_for_kill) {
			s->st.requeued_kill_timeout++;
			log_warnx("a cancelled task ignored cancellation for %u ms: request "
				  "requeued, its slot stuck until it returns",
				  s->cfg.kill_timeout_ms);
			reason = REASON_KILL_TIMEOUT;
		} else {
			s->st.requeued_no_room++;
			reason = "no free slot";
		}
		unstarted_requeue(s, j, reason, d);
	}
	return next;
}

/* Slot i's job left it: the admission reserved on it, else the oldest held
 * request, takes it.  The leaving job's worker must be back on its free
 * list already: job_start may need it. */
static void
slot_release(struct sched *s, unsigned i)
{
	struct slot *sl = &s->slots[i];
	struct job *p = sl->pending;

	sl->job = NULL;
	sl->status = SLOT_EMPTY;
	if (p != NULL) {
		sl->pending = NULL;
		job_start(s, p, i);
	} else if (!s->stopping && (p = waiting_pop(s)) != NULL) {
		s->st.admitted++;
		job_start(s, p, i);
	}
}

/* ---- control routing ---- */

static void
control_unref(struct sched *s, struct control_ref *r, struct deferred *d)
{
	if (--r->refs == 0) {
		enum settle_outcome o = r->overflow ? SETTLE_DEAD_LETTER : SETTLE_ACK;

		count_settlement(s, o);
		defer_settle(d, r->m, o, r->overflow ? "control backlog full" : NULL);
		free(r);
	}
}

static void
job_flush_control(struct sched *s, struct job *j, struct deferred *d)
{
	struct control_item *it, *next;

	for (it = j->ctl_head; it != NULL; it = next) {
		next = it->next;
		control_unref(s, it->ref, d);
		free(it);
	}
	j->ctl_head = j->ctl_tail = NULL;
	j->ctl_len = 0;
}

static void
ready_push(struct sched *s, struct job *j)
{
	if (j->ctl_ready || j->ctl_busy || j->ctl_head == NULL)
		return;
	j->ctl_ready = true;
	j->refs++; /* the ready list's */
	j->ready_next = NULL;
	if (s->ready_tail)
		s->ready_tail->ready_next = j;
	else
		s->ready_head = j;
	s->ready_tail = j;
	pthread_cond_signal(&s->control_cv);
}

/* A task whose handle() is slower than its control traffic must not grow
 * memory without bound, nor have messages acked that it never saw, nor
 * stall the control channel for every other task (as a prefetch would):
 * beyond its backlog, a message is dead-lettered with a reason. */
static void
job_enqueue_control(struct sched *s, struct job *j, struct control_ref *r)
{
	struct control_item *it;

	if (j->ctl_len >= SCHED_CONTROL_BACKLOG_MAX) {
		if (!r->overflow)
			s->st.control_dropped++;
		r->overflow = true;
		if (!j->ctl_overflowed)
			log_warnx("%s task %s: %u control messages wait for its handle(); "
				  "more are dead-lettered", slot_status_name(j->kind),
				  j->task->id, SCHED_CONTROL_BACKLOG_MAX);
		j->ctl_overflowed = true;
		return;
	}
	it = xcalloc(1, sizeof(*it));
	r->refs++;
	it->ref = r;
	if (j->ctl_tail)
		j->ctl_tail->next = it;
	else
		j->ctl_head = it;
	j->ctl_tail = it;
	j->ctl_len++;
	ready_push(s, j);
}

/* ---- job completion ---- */

/* Stop a helper.  On idle-priority threads it cannot slow anyone down, so
 * its slot is free at once and it drains outside any slot. */
static void
helper_stop(struct sched *s, struct job *j)
{
	job_cancel(j);
	if (s->helpers_idle && j->slot >= 0 && s->slots[j->slot].pending == NULL) {
		slot_release(s, (unsigned)j->slot);
		j->slot = -1;
		kick_expansion(s);
	}
}

static void
cancel_lineage(struct sched *s, unsigned long root, const struct job *except)
{
	struct job *j;

	for (j = s->running; j != NULL; j = j->next)
		if (j->root == root && j != except && j->kind != SLOT_PROTECTED)
			helper_stop(s, j);
}

static enum settle_outcome
outcome_of(enum occamy_status st, bool cancelled)
{
	if (st == OCCAMY_OK)
		return SETTLE_ACK;
	if (cancelled || st == OCCAMY_ERR_INTERRUPTED)
		return SETTLE_REQUEUE;
	if (st == OCCAMY_ERR_INTERNAL)
		return SETTLE_RETRY;
	return SETTLE_DEAD_LETTER;
}

static const char *
status_reason(enum occamy_status st)
{
	switch (st) {
	case OCCAMY_OK: return "ok";
	case OCCAMY_ERR_INVALID_BODY: return "invalid_body";
	case OCCAMY_ERR_INVALID_HEADERS: return "invalid_headers";
	case OCCAMY_ERR_INVALID_TASK: return "invalid_task";
	case OCCAMY_ERR_INTERNAL: return "internal_error";
	case OCCAMY_ERR_INTERRUPTED: return "task_interrupted";
	}
	return "unknown_status";
}

static void
running_unlink(struct sched *s, struct job *j)
{
	if (j->prev)
		j->prev->next = j->next;
	else
		s->running = j->next;
	if (j->next)
		j->next->prev = j->prev;
	j->prev = j->next = NULL;
}

/* The worker returned from run(): free the slot (or hand it to a pending
 * admission), end the job's helpers, and decide the settlement. */
static void
job_finish(struct sched *s, struct job *j, enum occamy_status st,
	   struct occamy_output *out, struct deferred *d, struct settlement *set,
	   struct message **settle_msg, double *seconds)
{
	uint64_t t = now_ns();

	j->finished = true;
	*seconds = (double)(t - j->start_ns) / 1e9;
	s->st.completed++;
	running_unlink(s, j);

	if (j->slot >= 0) {
		slot_release(s, (unsigned)j->slot);
		j->slot = -1;
	}
	if (j->kind == SLOT_PROTECTED) {
		s->st.busy_task_seconds += *seconds;
		s->st.protected_completed++;
	}
	/* Helpers end with their root: their work is for nobody now. */
	if (j->root == j->serial)
		cancel_lineage(s, j->root, j);
	job_flush_control(s, j, d);

	*settle_msg = NULL;
	if (j->msg != NULL) {
		enum settle_outcome o = outcome_of(st, j->cancelled);
		*settle_msg = j->msg;
		*set = (struct settlement){.outcome = o};
		if (o == SETTLE_ACK) {
			set->reply = out->body;
			set->reply_len = out->len;
			set->content_type = out->content_type[0] ? out->content_type : NULL;
			out->body = NULL;
		} else {
			set->reason = status_reason(st);
		}
		count_settlement(s, o);
		j->msg = NULL;
	} else if (st != OCCAMY_OK && !(j->cancelled && st == OCCAMY_ERR_INTERRUPTED)) {
		s->st.helper_errors++;
	}
	kick_expansion_if_useful(s);
	pthread_cond_broadcast(&s->idle_cv);
}

static void
set_helper_priority(struct worker *w)
{
	struct sched_param sp = {.sched_priority = 0};

	if (pthread_setschedparam(pthread_self(), SCHED_IDLE, &sp) == 0)
		return;
	/* Not allowed here (a seccomp filter, an old kernel): the next best
	 * thing is the lowest nice value. */
	w->niced = true;
	if (setpriority(PRIO_PROCESS, (id_t)w->tid, 19) != 0)
		log_warn("sched: cannot lower helper thread priority");
}

static enum occamy_status make_task(struct sched *s, const struct message *m, bool is_help,
				     struct task **t, char *reason, size_t len);

/* A request given a slot straight from the transport: make its task here,
 * on the slot's thread, so the transport never runs plugin code and a
 * request costs no extra thread hop.  Called and returns with the lock
 * held; false if there is nothing to run (the slot is free again). */
static bool
worker_make_task(struct sched *s, struct worker *w, struct job *j)
{
	struct message *m = j->msg;
	struct task *t = NULL;
	char reason[300];
	enum occamy_status st;
	enum settle_outcome o;

	pthread_mutex_unlock(&s->mu);
	st = make_task(s, m, false, &t, reason, sizeof(reason));
	pthread_mutex_lock(&s->mu);
	if (st == OCCAMY_OK && !j->cancelled) {
		s->st.admitted++;
		j->task = t;
		if (t->ops->expand != NULL)
			kick_expansion(s); /* a protected task may expand */
		return true;
	}
	if (st == OCCAMY_OK) {
		o = SETTLE_REQUEUE;
		snprintf(reason, sizeof(reason), "cancelled before it started");
	} else {
		o = outcome_of(st, false);
		s->st.make_task_errors++;
	}
	/* Undo the reservation: nothing ran.  The worker first: the slot may
	 * go to a held request (and so to this worker) at once. */
	running_unlink(s, j);
	w->job = NULL;
	w->next_free = s->free_protected;
	s->free_protected = w;
	slot_release(s, (unsigned)j->slot);
	count_settlement(s, o);
	s->settling++;
	kick_expansion_if_useful(s);
	pthread_mutex_unlock(&s->mu);
	if (t != NULL)
		t->ops->destroy(t);
	m->ops->settle(m, &(struct settlement){o, reason, NULL, 0, NULL});
	cancel_destroy(&j->cancel);
	free(j);
	pthread_mutex_lock(&s->mu);
	s->settling--;
	pthread_cond_broadcast(&s->idle_cv);
	return false;
}

/* After run() returned: free the slot, settle, account.  Called with the
 * lock held, returns with it held; drops it for plugin and transport code. */
static void
run_finished(struct sched *s, struct worker *w, struct job *j, enum occamy_status st,
	     struct occamy_output *out)
{
	struct deferred d = {0};
	struct settlement set = {0};
	struct message *msg;
	double seconds;
	char group[64];
	enum slot_status kind = j->kind;
	bool was_cancelled = j->cancelled;

	snprintf(group, sizeof(group), "%s", j->task->group);
	/* The worker first: the freed slot may go to a held request at once. */
	w->job = NULL;
	j->worker = NULL;
	w->next_free = w->helper_pool ? s->free_helpers : s->free_protected;
	if (w->helper_pool)
		s->free_helpers = w;
	else
		s->free_protected = w;
	job_finish(s, j, st, out, &d, &set, &msg, &seconds);
	if (msg != NULL)
		s->settling++; /* shutdown waits for it */
	job_unref(s, j, &d);
	pthread_mutex_unlock(&s->mu);

	if (msg != NULL) {
		char reason[300];
		if (set.outcome != SETTLE_ACK) {
			snprintf(reason, sizeof(reason), "%s%s%s", status_reason(st),
				 out->message[0] ? ": " : "", out->message);
			set.reason = reason;
		}
		msg->ops->settle(msg, &set);
		pthread_mutex_lock(&s->mu);
		s->settling--;
		pthread_cond_broadcast(&s->idle_cv);
		pthread_mutex_unlock(&s->mu);
	} else if (st != OCCAMY_OK && !(was_cancelled && st == OCCAMY_ERR_INTERRUPTED)) {
		log_warnx("%s helper (%s) failed: %s%s%s", slot_status_name(kind),
			  group, status_reason(st), out->message[0] ? ": " : "",
			  out->message);
	}
	free(out->body);
	out->body = NULL;
	if (s->obs.task_done)
		s->obs.task_done(s->obs.ctx, group, kind, st, seconds);
	deferred_run(&d);
	pthread_mutex_lock(&s->mu);
}

static void
worker_started(struct worker *w)
{
	struct sched *s = w->s;

	w->tid = (pid_t)syscall(SYS_gettid);
	if (w->helper_pool && s->cfg.helper_priority == HELPER_PRIORITY_IDLE)
		set_helper_priority(w);
	pthread_mutex_lock(&s->mu);
	w->started = true;
	pthread_cond_broadcast(&s->idle_cv);
	pthread_mutex_unlock(&s->mu);
}

/* A protected slot thread: normal priority, takes the lock freely. */
static void *
worker_main(void *arg)
{
	struct worker *w = arg;
	struct sched *s = w->s;

	worker_started(w);
	pthread_mutex_lock(&s->mu);
	for (;;) {
		struct job *j;
		struct occamy_output out;
		enum occamy_status st;

		while (w->job == NULL && !s->quit)
			pthread_cond_wait(&w->cv, &s->mu);
		if (w->job == NULL)
			break;
		j = w->job;
		if (j->task == NULL && !worker_make_task(s, w, j))
			continue;
		if (j->kind == SLOT_PROTECTED && j->msg != NULL) {
			double lat = (double)(now_ns() - j->msg->arrival_ns) / 1e9;
			unsigned b;
			for (b = 0; b < SCHED_LATENCY_BUCKETS; b++)
				if (lat <= sched_latency_bounds_s[b])
					break;
			s->st.admit_latency_buckets[b]++;
			s->st.admit_latency_sum_s += lat;
			s->st.admit_latency_count++;
		}
		pthread_mutex_unlock(&s->mu);

		memset(&out, 0, sizeof(out));
		st = j->task->ops->run(j->task, &j->cancel, &out);

		pthread_mutex_lock(&s->mu);
		run_finished(s, w, j, st, &out);
	}
	pthread_mutex_unlock(&s->mu);
	return NULL;
}

/*
 * A helper thread.  It may run at SCHED_IDLE, so it must never hold a lock
 * a normal thread waits for: a helper preempted inside the scheduler lock
 * would stall admissions for as long as the CPUs are busy (a priority
 * inversion).  It takes jobs through its semaphore and hands results to the
 * reaper thread through a lock-free stack; the reaper does the bookkeeping.
 */
static void *
helper_main(void *arg)
{
	struct worker *w = arg;
	struct sched *s = w->s;

	worker_started(w);
	for (;;) {
		struct job *j;
		struct worker *head;

		while (sem_wait(&w->go) != 0)
			;
		if (atomic_load(&w->stop))
			break;
		j = w->job; /* set before sem_post: ordered by the semaphore */
		memset(&w->out, 0, sizeof(w->out));
		w->status = j->task->ops->run(j->task, &j->cancel, &w->out);
		head = atomic_load(&s->finished_helpers);
		do
			w->next_finished = head;
		while (!atomic_compare_exchange_weak(&s->finished_helpers, &head, w));
		sem_post(&s->reaper_go);
	}
	return NULL;
}

/* Normal priority: the bookkeeping of finished helpers. */
static void *
reaper_main(void *arg)
{
	struct sched *s = arg;

	for (;;) {
		struct worker *w, *next;
		bool quit;

		while (sem_wait(&s->reaper_go) != 0)
			;
		w = atomic_exchange(&s->finished_helpers, NULL);
		pthread_mutex_lock(&s->mu);
		for (; w != NULL; w = next) {
			/* A copy: run_finished() frees w for a new helper, which
			 * writes w->out, before it is done reading the output. */
			struct occamy_output out = w->out;

			next = w->next_finished;
			run_finished(s, w, w->job, w->status, &out);
		}
		quit = s->quit && atomic_load(&s->finished_helpers) == NULL;
		pthread_mutex_unlock(&s->mu);
		if (quit)
			break;
	}
	return NULL;
}

/* ---- admission ---- */

/* Ask the task source for a task; on error, reason says why. */
static enum occamy_status
make_task(struct sched *s, const struct message *m, bool is_help, struct task **t,
	  char *reason, size_t len)
{
	char why[256] = "";
	enum occamy_status st;

	*t = NULL;
	st = s->src.make_task(s->src.ctx, m, is_help, t, why, sizeof(why));
	if (st == OCCAMY_OK && *t == NULL) {
		st = OCCAMY_ERR_INTERNAL;
		snprintf(why, sizeof(why), "handler returned no task");
	}
	if (st != OCCAMY_OK)
		snprintf(reason, len, "%s%s%s", status_reason(st), why[0] ? ": " : "", why);
	return st;
}

/* The unprotected job to stop for a request: external before internal, and
 * among equals the most recently started (least work lost). */
static int
choose_victim(const struct sched *s)
{
	int best = -1;
	unsigned i;

	for (i = 0; i < s->nslots; i++) {
		const struct slot *sl = &s->slots[i];
		const struct slot *b;

		if (sl->pending != NULL || sl->job == NULL || sl->job->cancelled)
			continue;
		if (sl->status != SLOT_EXTERNAL && sl->status != SLOT_INTERNAL)
			continue;
		if (best < 0) {
			best = (int)i;
			continue;
		}
		b = &s->slots[best];
		if (sl->status != b->status) {
			if (sl->status == SLOT_EXTERNAL)
				best = (int)i;
		} else if (sl->job->start_ns > b->job->start_ns) {
			best = (int)i;
		}
	}
	return best;
}

static void
admit_one(struct sched *s, struct message *m)
{
	struct deferred d = {0};
	struct task *t = NULL;
	char reason[300];
	enum occamy_status st;
	int slot, victim;

	pthread_mutex_lock(&s->mu);
	if (s->stopping) {
		/* Held, not requeued (see waiting_add); no task: it never runs. */
		waiting_add(s, job_new(s, NULL, m, SLOT_PROTECTED, 0));
		pthread_mutex_unlock(&s->mu);
		return;
	}
	pthread_mutex_unlock(&s->mu);

	st = make_task(s, m, false, &t, reason, sizeof(reason));
	if (st != OCCAMY_OK) {
		enum settle_outcome o = outcome_of(st, false);

		pthread_mutex_lock(&s->mu);
		s->st.make_task_errors++;
		count_settlement(s, o);
		pthread_mutex_unlock(&s->mu);
		m->ops->settle(m, &(struct settlement){o, reason, NULL, 0, NULL});
		return;
	}

	pthread_mutex_lock(&s->mu);
	if (s->stopping) {
		waiting_add(s, job_new(s, t, m, SLOT_PROTECTED, 0));
		goto out;
	}
	/* A protected request may take any empty slot, the buffer included. */
	count_empty(s, &slot);
	if (slot >= 0) {
		s->st.admitted++;
		job_start(s, job_new(s, t, m, SLOT_PROTECTED, 0), (unsigned)slot);
		kick_expansion(s);
		goto out;
	}
	victim = choose_victim(s);
	if (victim < 0) {
		/* Every slot is protected or cancelled: wait for one to free,
		 * within bounds (see waiting_add). */
		waiting_add(s, job_new(s, t, m, SLOT_PROTECTED, 0));
		goto out;
	}
	s->st.preemptions++;
	s->st.admitted++;
	{
		struct slot *sl = &s->slots[victim];
		struct job *h = sl->job;
		struct job *p = job_new(s, t, m, SLOT_PROTECTED, 0);

		job_cancel(h);
		if (s->helpers_idle) {
			/* The helper cannot take CPU from us: start at once and let
			 * it drain on its idle thread, outside any slot. */
			h->slot = -1;
			sl->job = NULL;
			sl->status = SLOT_EMPTY;
			job_start(s, p, (unsigned)victim);
		} else {
			sl->pending = p;
			sl->pending_deadline_ns = now_ns() +
				(uint64_t)s->cfg.kill_timeout_ms * 1000000u;
			kick_expansion(s); /* arms the kill timer */
		}
	}
out:
	pthread_mutex_unlock(&s->mu);
	deferred_run(&d);
}

static struct message *
msgq_pop(struct msg_queue *q)
{
	struct queued_msg *e = q->head;
	struct message *m;

	if (e == NULL)
		return NULL;
	q->head = e->next;
	if (q->head == NULL)
		q->tail = NULL;
	m = e->m;
	free(e);
	return m;
}

static void
msgq_push(struct msg_queue *q, struct message *m)
{
	struct queued_msg *e = xcalloc(1, sizeof(*e));

	e->m = m;
	if (q->tail)
		q->tail->next = e;
	else
		q->head = e;
	q->tail = e;
}

static void *
admission_main(void *arg)
{
	struct sched *s = arg;
	struct message *m;

	pthread_mutex_lock(&s->mu);
	for (;;) {
		while (s->admissions.head == NULL && !s->quit)
			pthread_cond_wait(&s->admit_cv, &s->mu);
		if ((m = msgq_pop(&s->admissions)) == NULL)
			break;
		pthread_mutex_unlock(&s->mu);
		admit_one(s, m);
		pthread_mutex_lock(&s->mu);
	}
	pthread_mutex_unlock(&s->mu);
	return NULL;
}

void
sched_submit_request(struct sched *s, struct message *m)
{
	pthread_mutex_lock(&s->mu);
	if (s->quit) {
		count_settlement(s, SETTLE_REQUEUE);
		pthread_mutex_unlock(&s->mu);
		m->ops->settle(m, &(struct settlement){SETTLE_REQUEUE, "shutting down", NULL, 0, NULL});
		return;
	}
	s->st.requests++;
	if (!s->stopping && s->admissions.head == NULL && s->free_protected != NULL) {
		int slot;

		/* The common case, a free slot: no admission thread hop; the
		 * slot's worker makes the task. */
		count_empty(s, &slot);
		/* Not for preemptions: a helper is stopped only for a request
		 * that has turned into a task (admission makes it first). */
		if (slot >= 0) {
			job_start(s, job_new(s, NULL, m, SLOT_PROTECTED, 0), (unsigned)slot);
			pthread_mutex_unlock(&s->mu);
			return;
		}
	}
	msgq_push(&s->admissions, m);
	pthread_cond_signal(&s->admit_cv);
	pthread_mutex_unlock(&s->mu);
}

/* ---- external store ---- */

/* Better = higher priority, then older. */
static bool
external_before(const struct external *a, const struct external *b)
{
	if (a->job->task->priority != b->job->task->priority)
		return a->job->task->priority > b->job->task->priority;
	return a->seq < b->seq;
}

/* Drop a stored help request: it never runs; pending control is acked. */
static void
store_drop(struct sched *s, struct job *j, enum sched_drop_reason why, struct deferred *d)
{
	s->st.external_drops[why]++;
	j->finished = true;
	job_flush_control(s, j, d);
	job_unref(s, j, d);
}

static void
store_external(struct sched *s, struct task *t, struct deferred *d)
{
	struct external e = {.seq = ++s->store_seq};
	unsigned i;

	e.deadline_ms = t->deadline_ms > 0 ? t->deadline_ms :
		wall_ms() + (int64_t)s->cfg.external_ttl_ms;
	e.job = job_new(s, t, NULL, SLOT_EXTERNAL, 0); /* the store's reference */
	if (s->cfg.external_queue_max == 0) {
		store_drop(s, e.job, DROP_FULL, d);
		return;
	}
	if (s->nstore == s->cfg.external_queue_max) {
		/* Full: the worst entry (last) makes way only for a better one. */
		struct external *worst = &s->store[s->nstore - 1];
		if (!external_before(&e, worst)) {
			store_drop(s, e.job, DROP_FULL, d);
			return;
		}
		store_drop(s, worst->job, DROP_FULL, d);
		s->nstore--;
	}
	for (i = s->nstore; i > 0 && external_before(&e, &s->store[i - 1]); i--)
		s->store[i] = s->store[i - 1];
	s->store[i] = e;
	s->nstore++;
	kick_expansion(s);
}

static void
store_prune(struct sched *s, struct deferred *d)
{
	int64_t now = wall_ms();
	unsigned i, k = 0;

	for (i = 0; i < s->nstore; i++) {
		if (s->store[i].deadline_ms <= now)
			store_drop(s, s->store[i].job, DROP_EXPIRED, d);
		else
			s->store[k++] = s->store[i];
	}
	s->nstore = k;
}

static void
store_clear(struct sched *s, struct deferred *d)
{
	unsigned i;

	for (i = 0; i < s->nstore; i++)
		store_drop(s, s->store[i].job, DROP_SHUTDOWN, d);
	s->nstore = 0;
}

/* ---- control messages ---- */

void
sched_submit_control(struct sched *s, struct message *m)
{
	const struct occamy_header *h = occamy_headers_find(&m->headers, s->header_task_id);
	struct deferred d = {0};
	struct control_ref *r;
	struct job *j;
	unsigned i;

	pthread_mutex_lock(&s->mu);
	if (h == NULL) {
		if (s->stopping) {
			s->st.external_drops[DROP_SHUTDOWN]++;
			count_settlement(s, SETTLE_ACK);
			defer_settle(&d, m, SETTLE_ACK, NULL);
		} else {
			msgq_push(&s->help_requests, m);
			pthread_cond_signal(&s->control_cv);
		}
		goto out;
	}
	if (h->kind != OCCAMY_VALUE_STRING || memchr(h->str, '\0', h->len) != NULL) {
		s->st.control_invalid++;
		count_settlement(s, SETTLE_DEAD_LETTER);
		defer_settle(&d, m, SETTLE_DEAD_LETTER,
			     "invalid_headers: task ID header is not a string");
		goto out;
	}
	r = xcalloc(1, sizeof(*r));
	r->m = m;
	r->refs = 1; /* ours, until routing is done */
	for (j = s->running; j != NULL; j = j->next) {
		if (j->cancelled || j->task == NULL || j->task->id == NULL ||
		    j->task->ops->handle == NULL)
			continue;
		if (strcmp(j->task->id, h->str) == 0)
			job_enqueue_control(s, j, r);
	}
	for (i = 0; i < s->nstore; i++) {
		j = s->store[i].job;
		if (j->task->id != NULL && j->task->ops->handle != NULL &&
		    strcmp(j->task->id, h->str) == 0)
			job_enqueue_control(s, j, r);
	}
	if (r->refs > 1)
		s->st.control_routed++;
	else
		s->st.control_unmatched++;
	control_unref(s, r, &d);
out:
	pthread_mutex_unlock(&s->mu);
	deferred_run(&d);
}

static void
help_request_one(struct sched *s, struct message *m)
{
	struct deferred d = {0};
	struct task *t = NULL;
	char reason[300];
	enum occamy_status st;

	st = make_task(s, m, true, &t, reason, sizeof(reason));
	pthread_mutex_lock(&s->mu);
	if (st != OCCAMY_OK) {
		/* A help request is advice, never retried: invalid or not. */
		s->st.make_task_errors++;
		s->st.control_invalid++;
		count_settlement(s, SETTLE_DEAD_LETTER);
		pthread_mutex_unlock(&s->mu);
		m->ops->settle(m, &(struct settlement){SETTLE_DEAD_LETTER, reason, NULL, 0, NULL});
		return;
	}
	if (s->stopping) {
		s->st.external_drops[DROP_SHUTDOWN]++;
		defer_destroy(&d, t);
	} else {
		store_external(s, t, &d);
	}
	count_settlement(s, SETTLE_ACK);
	defer_settle(&d, m, SETTLE_ACK, NULL);
	pthread_mutex_unlock(&s->mu);
	deferred_run(&d);
}

static void *
dispatcher_main(void *arg)
{
	struct sched *s = arg;

	pthread_mutex_lock(&s->mu);
	for (;;) {
		struct deferred d = {0};
		struct control_item *it;
		struct message *m;
		struct job *j;

		while (s->ready_head == NULL && s->help_requests.head == NULL && !s->quit)
			pthread_cond_wait(&s->control_cv, &s->mu);
		if ((m = msgq_pop(&s->help_requests)) != NULL) {
			pthread_mutex_unlock(&s->mu);
			help_request_one(s, m);
			pthread_mutex_lock(&s->mu);
			continue;
		}
		if ((j = s->ready_head) == NULL)
			break; /* quit */
		s->ready_head = j->ready_next;
		if (s->ready_head == NULL)
			s->ready_tail = NULL;
		j->ctl_ready = false;
		it = j->ctl_head;
		if (it == NULL || j->finished) {
			job_unref(s, j, &d);
			pthread_mutex_unlock(&s->mu);
			deferred_run(&d);
			pthread_mutex_lock(&s->mu);
			continue;
		}
		j->ctl_head = it->next;
		if (j->ctl_head == NULL)
			j->ctl_tail = NULL;
		j->ctl_len--;
		j->ctl_busy = true;
		pthread_mutex_unlock(&s->mu);

		j->task->ops->handle(j->task, &it->ref->m->headers, it->ref->m->body,
				     it->ref->m->len);

		pthread_mutex_lock(&s->mu);
		j->ctl_busy = false;
		control_unref(s, it->ref, &d);
		free(it);
		if (!j->finished)
			ready_push(s, j);
		job_unref(s, j, &d); /* the ready list's reference we consumed */
		pthread_mutex_unlock(&s->mu);
		deferred_run(&d);
		pthread_mutex_lock(&s->mu);
	}
	pthread_mutex_unlock(&s->mu);
	return NULL;
}

/* ---- expansion ---- */

/* Offer the helper room to every running job of one kind, shared fairly,
 * in rounds while someone still takes all it is offered.  Called and
 * returns with the lock held; drops it around expand(). */
static void
expand_class(struct sched *s, enum slot_status kind, struct deferred *d)
{
	struct job **cand = NULL;
	bool *done = NULL;
	unsigned ncand = 0, cap = 0, i, round;
	struct job *j;

	for (j = s->running; j != NULL; j = j->next) {
		if (j->kind != kind || j->cancelled || j->slot < 0 || j->task == NULL ||
		    j->task->ops->expand == NULL)
			continue;
		if (ncand == cap) {
			cap = cap ? 2 * cap : 8;
			cand = xrealloc(cand, cap * sizeof(*cand));
		}
		j->refs++;
		cand[ncand++] = j;
	}
	if (ncand == 0)
		return;
	done = xcalloc(ncand, sizeof(*done));
	/* Oldest first, so the remainder of a fair share goes to them. */
	for (i = 0; i < ncand / 2; i++) {
		struct job *tmp = cand[i];
		cand[i] = cand[ncand - 1 - i];
		cand[ncand - 1 - i] = tmp;
	}
	for (round = 0; round < EXPANSION_ROUNDS_MAX && !s->stopping; round++) {
		unsigned room = helper_room(s), active = 0, k = 0, progress = 0;

		for (i = 0; i < ncand; i++)
			if (!done[i] && !cand[i]->finished && !cand[i]->cancelled)
				active++;
		if (room == 0 || active == 0)
			break;
		for (i = 0; i < ncand; i++) {
			unsigned share, got, h;
			struct task **helpers;
			struct job *p = cand[i];

			if (done[i] || p->finished || p->cancelled)
				continue;
			share = room / active + (k < room % active ? 1 : 0);
			k++;
			if (share == 0)
				continue;
			helpers = xcalloc(share, sizeof(*helpers));
			pthread_mutex_unlock(&s->mu);
			got = (unsigned)p->task->ops->expand(p->task, share, helpers);
			pthread_mutex_lock(&s->mu);
			if (got > share) {
				log_warnx("expand of %s returned %u helpers, asked %u",
					  p->task->group, got, share);
				got = share;
			}
			if (got < share)
				done[i] = true;
			progress += got;
			for (h = 0; h < got; h++) {
				int slot;
				enum slot_status hk = kind == SLOT_EXTERNAL ?
					SLOT_EXTERNAL : SLOT_INTERNAL;

				if (helpers[h] == NULL)
					continue;
				count_empty(s, &slot);
				/* Room may have gone to a request meanwhile. */
				if (s->stopping || p->finished || p->cancelled ||
				    helper_room(s) == 0 || slot < 0) {
					defer_destroy(d, helpers[h]);
					continue;
				}
				job_start(s, job_new(s, helpers[h], NULL, hk, p->root),
					  (unsigned)slot);
			}
			free(helpers);
		}
		if (progress == 0)
			break;
	}
	for (i = 0; i < ncand; i++)
		job_unref(s, cand[i], d);
	free(cand);
	free(done);
}

static void
expansion_pass(struct sched *s, struct deferred *d)
{
	store_prune(s, d);
	if (s->stopping)
		return;
	expand_class(s, SLOT_PROTECTED, d);
	expand_class(s, SLOT_INTERNAL, d);
	expand_class(s, SLOT_EXTERNAL, d);
	while (!s->stopping && s->nstore > 0 && helper_room(s) > 0) {
		struct external e = s->store[0];
		int slot;

		memmove(&s->store[0], &s->store[1], (s->nstore - 1) * sizeof(*s->store));
		s->nstore--;
		count_empty(s, &slot);
		job_start(s, e.job, (unsigned)slot);
		/* Its own expand() deserves the rest of the room now, not at
		 * the next period: run the pass again. */
		s->expand_kick = true;
	}
}

/* Kill timeouts: requeue admissions whose helper did not stop in time, and
 * held requests whose hold is over. */
static uint64_t
check_kill_timeouts(struct sched *s, struct deferred *d)
{
	uint64_t now = now_ns(), next = UINT64_MAX, kt;
	uint64_t kill_ns = (uint64_t)s->cfg.kill_timeout_ms * 1000000u;
	unsigned i;
	struct job *j;

	for (i = 0; i < s->nslots; i++) {
		struct slot *sl = &s->slots[i];
		struct job *p = sl->pending;

		if (p == NULL)
			continue;
		if (sl->pending_deadline_ns > now) {
			if (sl->pending_deadline_ns < next)
				next = sl->pending_deadline_ns;
			continue;
		}
		s->st.requeued_kill_timeout++;
		log_warnx("slot %u: %s helper ignored cancellation for %u ms; "
			  "request requeued, slot stuck until it returns",
			  i, sl->job ? sl->job->task->group : "?", s->cfg.kill_timeout_ms);
		pending_requeue(s, i, REASON_KILL_TIMEOUT, d);
	}
	if ((kt = waiting_expire(s, NULL, d)) < next)
		next = kt;
	/* Wake up again when a cancelled job would turn stuck, for the count. */
	for (j = s->running; j != NULL; j = j->next)
		if (j->cancelled && j->cancel_ns + kill_ns > now &&
		    j->cancel_ns + kill_ns < next)
			next = j->cancel_ns + kill_ns;
	return next;
}

static void *
expansion_main(void *arg)
{
	struct sched *s = arg;

	pthread_mutex_lock(&s->mu);
	while (!s->quit) {
		struct deferred d = {0}, orphans;
		uint64_t now = now_ns();
		uint64_t next = now + (uint64_t)s->cfg.expansion_period_ms * 1000000u;
		uint64_t kt = check_kill_timeouts(s, &d);
		struct timespec ts;

		if (kt < next)
			next = kt;
		/* Cleared before the pass: a kick while expand() runs unlocked
		 * means another pass, not a lost event. */
		s->expand_kick = false;
		expansion_pass(s, &d);
		orphans = s->orphans;
		memset(&s->orphans, 0, sizeof(s->orphans));
		pthread_mutex_unlock(&s->mu);
		deferred_run(&orphans);
		deferred_run(&d);
		pthread_mutex_lock(&s->mu);
		deadline_to_timespec(next, &ts);
		while (!s->expand_kick && !s->quit)
			if (pthread_cond_timedwait(&s->expand_cv, &s->mu, &ts) == ETIMEDOUT)
				break;
	}
	pthread_mutex_unlock(&s->mu);
	return NULL;
}

void
sched_expand_now(struct sched *s)
{
	pthread_mutex_lock(&s->mu);
	kick_expansion(s);
	pthread_mutex_unlock(&s->mu);
}

/* ---- life cycle ---- */

static void
start_thread(pthread_t *th, void *(*fn)(void *), void *arg, const char *name)
{
	int e = pthread_create(th, NULL, fn, arg);

	if (e != 0) {
		errno = e;
		fatal("sched: cannot start %s thread", name);
	}
	pthread_setname_np(*th, name);
}

static void
copy_config(struct sched *s, const struct sched_config *cfg)
{
	free(s->header_task_id);
	s->cfg = *cfg;
	s->header_task_id = xstrdup(cfg->header_task_id ? cfg->header_task_id : "task-id");
	s->cfg.header_task_id = s->header_task_id;
	if (s->cfg.expansion_period_ms == 0)
		s->cfg.expansion_period_ms = 1000;
	if (s->cfg.kill_timeout_ms == 0)
		s->cfg.kill_timeout_ms = 1;
}

static bool
idle_policy_works(void)
{
	/* Probe on a throwaway thread: SCHED_IDLE cannot be undone without
	 * privilege, which is why helpers keep threads of their own. */
	return sched_get_priority_min(SCHED_IDLE) >= 0;
}

struct sched *
sched_new(const struct sched_config *cfg, const struct task_source *src,
	  const struct sched_observer *obs)
{
	struct sched *s = xcalloc(1, sizeof(*s));
	unsigned i;

	if (cfg->slots == 0)
		fatalx("sched: zero slots");
	pthread_mutex_init(&s->mu, NULL);
	copy_config(s, cfg);
	s->src = *src;
	if (obs)
		s->obs = *obs;
	s->nslots = cfg->slots;
	s->st.slots = cfg->slots;
	s->slots = xcalloc(s->nslots, sizeof(*s->slots));
	s->store_cap = cfg->external_queue_max ? cfg->external_queue_max : 1;
	s->store = xcalloc(s->store_cap, sizeof(*s->store));
	s->helpers_idle = cfg->helper_priority == HELPER_PRIORITY_IDLE && idle_policy_works();
	if (!s->helpers_idle)
		s->cfg.helper_priority = HELPER_PRIORITY_NORMAL;
	cond_init_monotonic(&s->admit_cv);
	cond_init_monotonic(&s->expand_cv);
	cond_init_monotonic(&s->control_cv);
	cond_init_monotonic(&s->idle_cv);

	s->workers = xcalloc(2 * s->nslots, sizeof(*s->workers));
	pthread_mutex_lock(&s->mu);
	for (i = 0; i < 2 * s->nslots; i++) {
		struct worker *w = &s->workers[i];
		char name[32];

		w->s = s;
		w->helper_pool = i >= s->nslots;
		cond_init_monotonic(&w->cv);
		sem_init(&w->go, 0, 0);
		snprintf(name, sizeof(name), "%s%u", w->helper_pool ? "helper" : "slot",
			 i % s->nslots);
		name[15] = '\0'; /* the kernel's limit for thread names */
		start_thread(&w->thread, w->helper_pool ? helper_main : worker_main, w, name);
		if (w->helper_pool) {
			w->next_free = s->free_helpers;
			s->free_helpers = w;
		} else {
			w->next_free = s->free_protected;
			s->free_protected = w;
		}
	}
	/* Wait until every worker knows its tid and priority. */
	for (i = 0; i < 2 * s->nslots; i++)
		while (!s->workers[i].started)
			pthread_cond_wait(&s->idle_cv, &s->mu);
	pthread_mutex_unlock(&s->mu);

	s->ndispatchers = s->nslots + 1 < 2 ? 2 : s->nslots + 1;
	if (s->ndispatchers > DISPATCHERS_MAX)
		s->ndispatchers = DISPATCHERS_MAX;
	sem_init(&s->reaper_go, 0, 0);
	start_thread(&s->reaper_thread, reaper_main, s, "reaper");
	start_thread(&s->admit_thread, admission_main, s, "admission");
	start_thread(&s->expand_thread, expansion_main, s, "expansion");
	for (i = 0; i < s->ndispatchers; i++)
		start_thread(&s->dispatchers[i], dispatcher_main, s, "control");
	return s;
}

const char *
sched_helper_mode(const struct sched *s)
{
	unsigned i;

	if (!s->helpers_idle)
		return "normal (helpers share the CPU; admission waits for them)";
	for (i = s->nslots; i < 2 * s->nslots; i++)
		if (s->workers[i].niced)
			return "idle, but SCHED_IDLE was refused: helpers run at nice 19";
	return "idle (helpers on SCHED_IDLE threads; requests never wait for them)";
}

void
sched_reconfigure(struct sched *s, const struct sched_config *cfg)
{
	struct deferred d = {0};
	unsigned slots, cap;
	enum helper_priority hp;

	pthread_mutex_lock(&s->mu);
	if (cfg->slots != s->nslots)
		log_warnx("slots changed from %u to %u: takes effect at restart",
			  s->nslots, cfg->slots);
	if ((cfg->helper_priority == HELPER_PRIORITY_IDLE) != s->helpers_idle)
		log_warnx("helper_priority change takes effect at restart");
	slots = s->cfg.slots;
	hp = s->cfg.helper_priority;
	copy_config(s, cfg);
	s->cfg.slots = slots;
	s->cfg.helper_priority = hp;
	cap = s->cfg.external_queue_max ? s->cfg.external_queue_max : 1;
	if (cap > s->store_cap) {
		s->store = xrealloc(s->store, cap * sizeof(*s->store));
		s->store_cap = cap;
	}
	while (s->nstore > s->cfg.external_queue_max)
		store_drop(s, s->store[--s->nstore].job, DROP_FULL, &d);
	kick_expansion(s);
	pthread_mutex_unlock(&s->mu);
	deferred_run(&d);
}

void
sched_cancel_requests(struct sched *s)
{
	struct job *j;
	unsigned i;

	/* Called by the transport, which never runs plugin code: the task
	 * destroys (and settlements) go to the expansion thread. */
	pthread_mutex_lock(&s->mu);
	for (j = s->running; j != NULL; j = j->next)
		if (j->kind == SLOT_PROTECTED)
			job_cancel(j);
	for (i = 0; i < s->nslots; i++)
		if (s->slots[i].pending != NULL)
			pending_requeue(s, i, "connection lost", &s->orphans);
	waiting_expire(s, "connection lost", &s->orphans);
	kick_expansion(s);
	pthread_mutex_unlock(&s->mu);
}

static bool
any_running(const struct sched *s, bool protected_only)
{
	const struct job *j;

	/* A job that returned is done only once its message is settled. */
	if (s->settling > 0)
		return true;
	for (j = s->running; j != NULL; j = j->next)
		if (!protected_only || j->kind == SLOT_PROTECTED)
			return true;
	return false;
}

static void
wait_until_idle(struct sched *s, bool protected_only, uint64_t deadline)
{
	struct timespec ts;

	deadline_to_timespec(deadline, &ts);
	while (any_running(s, protected_only) && now_ns() < deadline)
		if (pthread_cond_timedwait(&s->idle_cv, &s->mu, &ts) == ETIMEDOUT)
			break;
}

void
sched_shutdown(struct sched *s)
{
	struct deferred d = {0}, orphans;
	struct message *m;
	struct job *j;
	uint64_t kill_ns;
	unsigned i;

	pthread_mutex_lock(&s->mu);
	if (s->stopping) {
		while (!s->shut_down)
			pthread_cond_wait(&s->idle_cv, &s->mu);
		pthread_mutex_unlock(&s->mu);
		return;
	}
	s->stopping = true;
	kill_ns = (uint64_t)s->cfg.kill_timeout_ms * 1000000u;
	store_clear(s, &d);
	for (j = s->running; j != NULL; j = j->next)
		if (j->kind != SLOT_PROTECTED)
			job_cancel(j);
	for (i = 0; i < s->nslots; i++)
		if (s->slots[i].pending != NULL)
			pending_requeue(s, i, "shutting down", &d);
	pthread_mutex_unlock(&s->mu);
	deferred_run(&d);
	pthread_mutex_lock(&s->mu);

	wait_until_idle(s, true, now_ns() + (uint64_t)s->cfg.shutdown_grace_ms * 1000000u);
	for (j = s->running; j != NULL; j = j->next)
		job_cancel(j);
	wait_until_idle(s, false, now_ns() + kill_ns);
	if (any_running(s, false))
		log_warnx("shutdown: some tasks ignore cancellation; their messages "
			  "return to the broker when the connection closes");

	s->quit = true;
	pthread_cond_broadcast(&s->admit_cv);
	pthread_cond_broadcast(&s->expand_cv);
	pthread_cond_broadcast(&s->control_cv);
	for (i = 0; i < 2 * s->nslots; i++) {
		struct worker *w = &s->workers[i];
		if (w->helper_pool) {
			atomic_store(&w->stop, true);
			sem_post(&w->go);
		} else {
			pthread_cond_signal(&w->cv);
		}
	}
	sem_post(&s->reaper_go);
	pthread_mutex_unlock(&s->mu);

	pthread_join(s->reaper_thread, NULL);
	pthread_join(s->admit_thread, NULL);
	pthread_join(s->expand_thread, NULL);
	/* What it left: the caller of shutdown runs plugin code anyway. */
	pthread_mutex_lock(&s->mu);
	orphans = s->orphans;
	memset(&s->orphans, 0, sizeof(s->orphans));
	pthread_mutex_unlock(&s->mu);
	deferred_run(&orphans);
	/* Dispatchers may be inside a blocked handle(): do not wait for ever. */
	{
		struct timespec ts;
		bool wedged = false;

		clock_gettime(CLOCK_REALTIME, &ts);
		ts.tv_sec += 1 + s->cfg.kill_timeout_ms / 1000;
		for (i = 0; i < s->ndispatchers; i++) {
			if (pthread_timedjoin_np(s->dispatchers[i], NULL, &ts) != 0) {
				pthread_detach(s->dispatchers[i]);
				wedged = true;
			}
		}
		if (wedged)
			log_warnx("shutdown: a control handler is blocked in a plugin");
		pthread_mutex_lock(&s->mu);
		s->dispatchers_wedged = wedged;
		pthread_mutex_unlock(&s->mu);
	}

	pthread_mutex_lock(&s->mu);
	waiting_expire(s, "shutting down", &d);
	pthread_mutex_unlock(&s->mu);
	deferred_run(&d);
	pthread_mutex_lock(&s->mu);
	while ((m = msgq_pop(&s->admissions)) != NULL) {
		count_settlement(s, SETTLE_REQUEUE);
		pthread_mutex_unlock(&s->mu);
		m->ops->settle(m, &(struct settlement){SETTLE_REQUEUE, "shutting down", NULL, 0, NULL});
		pthread_mutex_lock(&s->mu);
	}
	while ((m = msgq_pop(&s->help_requests)) != NULL) {
		s->st.external_drops[DROP_SHUTDOWN]++;
		count_settlement(s, SETTLE_ACK);
		pthread_mutex_unlock(&s->mu);
		m->ops->settle(m, &(struct settlement){SETTLE_ACK, NULL, NULL, 0, NULL});
		pthread_mutex_lock(&s->mu);
	}
	s->freed_ok = !any_running(s, false) && !s->dispatchers_wedged;
	s->shut_down = true;
	pthread_cond_broadcast(&s->idle_cv);
	pthread_mutex_unlock(&s->mu);
}

void
sched_free(struct sched *s)
{
	unsigned i;

	if (s == NULL)
		return;
	sched_shutdown(s);
	if (!s->freed_ok) {
		/* A wedged plugin thread still uses this memory: leave it to
		 * the process exit rather than free it under its feet. */
		for (i = 0; i < 2 * s->nslots; i++)
			if (s->workers[i].job == NULL)
				pthread_join(s->workers[i].thread, NULL);
			else
				pthread_detach(s->workers[i].thread);
		return;
	}
	for (i = 0; i < 2 * s->nslots; i++) {
		pthread_join(s->workers[i].thread, NULL);
		pthread_cond_destroy(&s->workers[i].cv);
		sem_destroy(&s->workers[i].go);
	}
	sem_destroy(&s->reaper_go);
	/* Jobs still referenced by nobody but finished are already freed;
	 * the ready list holds references only to running jobs. */
	free(s->workers);
	free(s->slots);
	free(s->store);
	free(s->header_task_id);
	pthread_cond_destroy(&s->admit_cv);
	pthread_cond_destroy(&s->expand_cv);
	pthread_cond_destroy(&s->control_cv);
	pthread_cond_destroy(&s->idle_cv);
	pthread_mutex_destroy(&s->mu);
	free(s);
}

void
sched_get_stats(struct sched *s, struct sched_stats *out)
{
	uint64_t now = now_ns(), kill_ns;
	const struct job *j;
	unsigned i;

	pthread_mutex_lock(&s->mu);
	*out = s->st;
	kill_ns = (uint64_t)s->cfg.kill_timeout_ms * 1000000u;
	memset(out->by_status, 0, sizeof(out->by_status));
	for (i = 0; i < s->nslots; i++)
		out->by_status[s->slots[i].status]++;
	out->stuck = out->draining = 0;
	for (j = s->running; j != NULL; j = j->next) {
		if (j->slot < 0)
			out->draining++;
		if (j->cancelled && now - j->cancel_ns > kill_ns)
			out->stuck++;
	}
	out->external_queued = s->nstore;
	out->waiting = s->nwaiting;
	pthread_mutex_unlock(&s->mu);
}

unsigned
sched_get_slots(struct sched *s, struct slot_view *v, unsigned n)
{
	uint64_t now = now_ns(), kill_ns;
	unsigned i;

	pthread_mutex_lock(&s->mu);
	kill_ns = (uint64_t)s->cfg.kill_timeout_ms * 1000000u;
	for (i = 0; i < s->nslots && i < n; i++) {
		const struct job *j = s->slots[i].job;

		memset(&v[i], 0, sizeof(v[i]));
		v[i].status = s->slots[i].status;
		if (j == NULL || j->task == NULL)
			continue;
		v[i].stuck = j->cancelled && now - j->cancel_ns > kill_ns;
		snprintf(v[i].group, sizeof(v[i].group), "%s", j->task->group);
		snprintf(v[i].task_id, sizeof(v[i].task_id), "%s",
			 j->task->id ? j->task->id : "");
		v[i].age_s = (double)(now - j->start_ns) / 1e9;
	}
	i = s->nslots;
	pthread_mutex_unlock(&s->mu);
	return i;
}

int
sched_slot_thread_policy(struct sched *s, unsigned slot)
{
	int policy = -1;

	pthread_mutex_lock(&s->mu);
	if (slot < s->nslots && s->slots[slot].job != NULL)
		policy = sched_getscheduler(s->slots[slot].job->worker->tid);
	pthread_mutex_unlock(&s->mu);
	return policy;
}
