/*
 * scheduler_job.c - the scheduler's small parts: cancel tokens, deferred
 * work, jobs and their reference counts, putting a job into a slot and
 * taking it out.  Run by whichever scheduler thread holds s->mu (cancel
 * tokens: any thread, no lock).
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "clock.h"
#include "log.h"
#include "scheduler_impl.h"

#ifndef NDEBUG
void
sched_assert_locked(struct sched *s, const char *func)
{
#ifdef __GLIBC__
	static __thread pid_t self;

	if (self == 0)
		self = (pid_t)syscall(SYS_gettid);
	if (s->mu.__data.__owner != self)
		fatalx("sched: %s called without the scheduler lock (bug)", func);
#else
	/* Weaker: catches only a lock that nobody holds. */
	if (pthread_mutex_trylock(&s->mu) == 0) {
		pthread_mutex_unlock(&s->mu);
		fatalx("sched: %s called without the scheduler lock (bug)", func);
	}
#endif
}
#endif

/* ---- cancel tokens ---- */

void
cancel_init(struct occamy_cancel *c)
{
	atomic_init(&c->set, 0);
}

void
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
	uint64_t now = clock_now_ns(), end;

	/* Saturate: ms * 10^6 or now + that may wrap, and a wrapped deadline
	 * lies in the past, so "sleep forever" would return at once and the
	 * plugin would spin. */
	end = ms > (UINT64_MAX - now) / 1000000u ? UINT64_MAX : now + ms * 1000000u;

	while (!cancel_is_set(c) && (now = clock_now_ns()) < end) {
		uint64_t left = end - now;
		struct timespec rel = {.tv_sec = (time_t)(left / 1000000000u),
				       .tv_nsec = (long)(left % 1000000000u)};
		/* Returns at once if the word is no longer 0. */
		syscall(SYS_futex, &c->set, FUTEX_WAIT_PRIVATE, 0, &rel, NULL, 0);
	}
	return cancel_is_set(c);
}

/* ---- deferred work ---- */

/* Grow *arr (of *cap elements of size sz) to hold one more than n. */
static void *
grow(void *arr, unsigned n, unsigned *cap, size_t sz)
{
	if (n < *cap)
		return arr;
	*cap = *cap ? 2 * *cap : 8;
	return xrealloc(arr, *cap * sz);
}

void
defer_settle(struct deferred *d, struct message *m, enum settle_outcome o,
	     const char *reason)
{
	if (m == NULL)
		return;
	d->settle = grow(d->settle, d->nsettle, &d->cap_settle, sizeof(*d->settle));
	d->settle[d->nsettle].m = m;
	d->settle[d->nsettle].set = (struct settlement){.outcome = o, .reason = reason};
	d->nsettle++;
}

void
defer_destroy(struct deferred *d, struct task *t)
{
	if (t == NULL)
		return;
	d->destroy = grow(d->destroy, d->ndestroy, &d->cap_destroy, sizeof(*d->destroy));
	d->destroy[d->ndestroy++] = t;
}

static void
defer_free_job(struct deferred *d, struct job *j)
{
	d->free_jobs = grow(d->free_jobs, d->nfree, &d->cap_free, sizeof(*d->free_jobs));
	d->free_jobs[d->nfree++] = j;
}

/* Caller holds s->mu. */
void
count_settlement(struct sched *s, enum settle_outcome o)
{
	assert_locked(s);
	s->st.settled[o]++;
}

/* Called without the lock. */
void
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
		free(j->master);
		free(j);
	}
	free(d->settle);
	free(d->destroy);
	free(d->free_jobs);
	memset(d, 0, sizeof(*d));
}

/* ---- jobs ---- */

/* Caller holds s->mu. */
struct job *
job_new(struct sched *s, struct task *t, struct message *m, enum job_kind kind,
	unsigned long root)
{
	struct job *j = xcalloc(1, sizeof(*j));

	assert_locked(s);
	j->task = t;
	j->msg = m;
	j->kind = kind;
	j->slot = -1;
	j->serial = ++s->next_serial;
	j->root = root ? root : j->serial;
	j->refs = 1; /* the worker's */
	STAILQ_INIT(&j->ctl);
	cancel_init(&j->cancel);
	return j;
}

/* Caller holds s->mu. */
void
job_unref(struct sched *s, struct job *j, struct deferred *d)
{
	assert_locked(s);
	if (--j->refs == 0)
		defer_free_job(d, j);
}

void
job_cancel(struct job *j)
{
	if (j->cancelled || j->finished)
		return;
	j->cancelled = true;
	j->cancel_ns = clock_now_ns();
	cancel_fire(&j->cancel);
}

static struct worker *
worker_take(struct sched *s, bool helper)
{
	struct worker_list *list = helper ? &s->free_helpers : &s->free_protected;
	struct worker *w = SLIST_FIRST(list);

	if (w != NULL)
		SLIST_REMOVE_HEAD(list, free_link);
	return w;
}

/* Back on its pool's free list.  Caller holds s->mu. */
void
worker_put(struct sched *s, struct worker *w)
{
	assert_locked(s);
	w->job = NULL;
	SLIST_INSERT_HEAD(w->helper_pool ? &s->free_helpers : &s->free_protected, w,
			  free_link);
}

/* Put j into slot i and hand it to a worker.  Caller holds s->mu and
 * checked both exist. */
void
job_start_held(struct sched *s, struct job *j, unsigned i, struct sched_held_wakeups *held)
{
	struct worker *w = worker_take(s, j->kind != JOB_PROTECTED);

	assert_locked(s);
	if (w == NULL)
		fatalx("sched: no free worker for a %s task (bug)", job_kind_name(j->kind));
	s->slots[i].status = slot_status_of(j->kind);
	s->slots[i].job = j;
	j->slot = (int)i;
	j->start_ns = clock_now_ns();
	j->worker = w;
	TAILQ_INSERT_HEAD(&s->running, j, running_link);
	if (j->kind != JOB_PROTECTED)
		s->st.expansions[j->kind]++;
	w->job = j;
	if (w->helper_pool)
		sem_post(&w->go);
	else if (held != NULL && held->n < SCHED_HELD_MAX)
		held->cv[held->n++] = &w->cv;
	else
		pthread_cond_signal(&w->cv);
}

void
job_start(struct sched *s, struct job *j, unsigned i)
{
	job_start_held(s, j, i, NULL);
}

void
sched_wake_held(struct sched_held_wakeups *held)
{
	for (unsigned i = 0; i < held->n; i++)
		pthread_cond_signal(held->cv[i]);
	held->n = 0;
}

/* Empty slots not reserved for an admission; *first is the lowest. */
unsigned
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

/* Slot i's job left it: the admission reserved on it, else the oldest held
 * request, takes it.  The leaving job's worker must be back on its free
 * list already: job_start may need it.  Caller holds s->mu. */
void
slot_release(struct sched *s, unsigned i)
{
	struct slot *sl = &s->slots[i];
	struct job *p = sl->pending;

	assert_locked(s);
	sl->job = NULL;
	sl->status = SLOT_EMPTY;
	if (p != NULL) {
		sl->pending = NULL;
		job_start(s, p, i);
	} else if (!sched_is_stopping(s) && (p = TAILQ_FIRST(&s->waiting)) != NULL) {
		TAILQ_REMOVE(&s->waiting, p, wait_link);
		s->nwaiting--;
		s->st.admitted++;
		job_start(s, p, i);
	}
}

/* Requeue the message of a job that never started; its task (if made) is
 * destroyed after the lock, through d.  Caller holds s->mu. */
void
unstarted_requeue(struct sched *s, struct job *p, const char *reason, struct deferred *d)
{
	count_settlement(s, SETTLE_REQUEUE);
	defer_settle(d, p->msg, SETTLE_REQUEUE, reason);
	defer_destroy(d, p->task);
	free(p);
}

/* Give up on the admission waiting for slot i.  Caller holds s->mu. */
void
pending_requeue(struct sched *s, unsigned i, const char *reason, struct deferred *d)
{
	struct job *p = s->slots[i].pending;

	s->slots[i].pending = NULL;
	unstarted_requeue(s, p, reason, d);
}

/* ---- outcomes ---- */

enum settle_outcome
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

const char *
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

/* Ask the task source for a task; on error, reason says why.  Called
 * without the lock: it runs plugin code. */
enum occamy_status
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
