/*
 * scheduler_admit.c - admission of requests: the pure decision (start,
 * preempt, wait) and the code that acts on it, requests held for a slot,
 * and the kill timers that bound every hold.  Runs on the admission thread
 * (sched_submit_request on the transport's).
 */
#include <errno.h>
#include <stdlib.h>
#include <time.h>

#include "clock.h"
#include "log.h"
#include "scheduler_impl.h"

/* ---- message queues ---- */

struct message *
msgq_pop(struct msg_queue *q)
{
	struct queued_msg *e = STAILQ_FIRST(q);
	struct message *m;

	if (e == NULL)
		return NULL;
	STAILQ_REMOVE_HEAD(q, link);
	m = e->m;
	free(e);
	return m;
}

void
msgq_push(struct msg_queue *q, struct message *m)
{
	struct queued_msg *e = xcalloc(1, sizeof(*e));

	e->m = m;
	STAILQ_INSERT_TAIL(q, e, link);
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
 * The holds and the preemptions' kill waits are timed by the admission
 * thread alone (kill_timers_run), which never waits for a plugin's
 * expand(): a slow expansion pass cannot delay a requeue.
 *
 * Caller holds s->mu for all of these.
 */

/* A cancelled task may still free its slot within kill_timeout. */
static bool
slot_freeing_soon(const struct sched *s, uint64_t now)
{
	uint64_t kill_ns = ms_to_ns(s->cfg.kill_timeout_ms);
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
	uint64_t now = clock_now_ns();
	uint64_t kill_ns = ms_to_ns(s->cfg.kill_timeout_ms);
	uint64_t hold = ms_to_ns(REQUEUE_HOLD_MIN_MS);

	assert_locked(s);
	j->wait_for_kill = !sched_is_stopping(s) && slot_freeing_soon(s, now);
	if (j->wait_for_kill || kill_ns > hold)
		hold = kill_ns;
	j->wait_deadline_ns = now + hold;
	TAILQ_INSERT_TAIL(&s->waiting, j, wait_link);
	s->nwaiting++;
	/* The admission thread arms its timer when it loops; a waiting
	 * request added on another thread would need a signal. */
	pthread_cond_signal(&s->admit_cv);
}

static const char *
expired_reason(struct sched *s, const struct job *j)
{
	if (sched_is_stopping(s))
		return "shutting down";
	if (j->wait_for_kill) {
		s->st.requeued_kill_timeout++;
		log_warnx("a cancelled task ignored cancellation for %u ms: request "
			  "requeued, its slot stuck until it returns",
			  s->cfg.kill_timeout_ms);
		return REASON_KILL_TIMEOUT;
	}
	s->st.requeued_no_room++;
	return "no free slot";
}

/* Requeue the held requests whose hold is over, or all of them with
 * reason all_reason; returns the earliest deadline left. */
uint64_t
waiting_expire(struct sched *s, const char *all_reason, struct deferred *d)
{
	struct job *j, *next;
	uint64_t now = clock_now_ns(), left = UINT64_MAX;

	assert_locked(s);
	for (j = TAILQ_FIRST(&s->waiting); j != NULL; j = next) {
		next = TAILQ_NEXT(j, wait_link);
		if (all_reason == NULL && j->wait_deadline_ns > now) {
			if (j->wait_deadline_ns < left)
				left = j->wait_deadline_ns;
			continue;
		}
		TAILQ_REMOVE(&s->waiting, j, wait_link);
		s->nwaiting--;
		unstarted_requeue(s, j, all_reason ? all_reason : expired_reason(s, j), d);
	}
	return left;
}

/* Kill timers: requeue admissions whose helper did not stop in time, and
 * held requests whose hold is over.  Returns when to look again. */
static uint64_t
kill_timers_run(struct sched *s, struct deferred *d)
{
	uint64_t now = clock_now_ns(), next = UINT64_MAX, kt;
	uint64_t kill_ns = ms_to_ns(s->cfg.kill_timeout_ms);
	unsigned i;
	struct job *j;

	assert_locked(s);
	for (i = 0; i < s->nslots; i++) {
		struct slot *sl = &s->slots[i];

		if (sl->pending == NULL)
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
	/* Wake up again when a cancelled job would turn stuck: a request
	 * held meanwhile must not count on its slot any more. */
	TAILQ_FOREACH(j, &s->running, running_link)
		if (j->cancelled && j->cancel_ns + kill_ns > now &&
		    j->cancel_ns + kill_ns < next)
			next = j->cancel_ns + kill_ns;
	return next;
}

/* ---- the decision ---- */

/* The unprotected job to stop for a request: external before internal, and
 * among equals the most recently started (least work lost). */
static int
choose_victim(const struct slot *slots, unsigned nslots)
{
	int best = -1;
	unsigned i;

	for (i = 0; i < nslots; i++) {
		const struct slot *sl = &slots[i];
		const struct slot *b;

		if (sl->pending != NULL || sl->job == NULL || sl->job->cancelled)
			continue;
		if (sl->status != SLOT_EXTERNAL && sl->status != SLOT_INTERNAL)
			continue;
		if (best < 0) {
			best = (int)i;
			continue;
		}
		b = &slots[best];
		if (sl->status != b->status) {
			if (sl->status == SLOT_EXTERNAL)
				best = (int)i;
		} else if (sl->job->start_ns > b->job->start_ns) {
			best = (int)i;
		}
	}
	return best;
}

struct admit_decision
admit_decide(const struct slot *slots, unsigned nslots, bool stopping)
{
	unsigned i;
	int victim;

	/* During shutdown a request is held, never started (see waiting_add). */
	if (stopping)
		return (struct admit_decision){ADMIT_WAIT, -1};
	/* A protected request may take any empty slot, the buffer included. */
	for (i = 0; i < nslots; i++)
		if (slots[i].status == SLOT_EMPTY && slots[i].pending == NULL)
			return (struct admit_decision){ADMIT_START, (int)i};
	victim = choose_victim(slots, nslots);
	if (victim >= 0)
		return (struct admit_decision){ADMIT_PREEMPT, victim};
	/* Every slot is protected or cancelled: wait for one to free, within
	 * bounds (see waiting_add). */
	return (struct admit_decision){ADMIT_WAIT, -1};
}

/* ---- acting on it ---- */

/* Stop the helper in slot victim for p.  Caller holds s->mu. */
static void
admit_preempt(struct sched *s, struct job *p, unsigned victim)
{
	struct slot *sl = &s->slots[victim];
	struct job *h = sl->job;

	assert_locked(s);
	s->st.preemptions++;
	s->st.admitted++;
	job_cancel(h);
	if (s->helpers_idle) {
		/* The helper cannot take CPU from us: start at once and let it
		 * drain on its idle thread, outside any slot. */
		h->slot = -1;
		sl->job = NULL;
		sl->status = SLOT_EMPTY;
		job_start(s, p, victim);
	} else {
		/* The admission thread times the kill when it loops. */
		sl->pending = p;
		sl->pending_deadline_ns = clock_now_ns() + ms_to_ns(s->cfg.kill_timeout_ms);
	}
}

static void
admit_one(struct sched *s, struct message *m)
{
	struct task *t = NULL;
	char reason[300];
	enum occamy_status st;
	struct admit_decision dec;
	struct job *j;

	pthread_mutex_lock(&s->mu);
	if (sched_is_stopping(s)) {
		/* Held, not requeued (see waiting_add); no task: it never runs. */
		waiting_add(s, job_new(s, NULL, m, JOB_PROTECTED, 0));
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
	dec = admit_decide(s->slots, s->nslots, sched_is_stopping(s));
	j = job_new(s, t, m, JOB_PROTECTED, 0);
	switch (dec.action) {
	case ADMIT_START:
		s->st.admitted++;
		job_start(s, j, (unsigned)dec.slot);
		kick_expansion(s);
		break;
	case ADMIT_PREEMPT:
		admit_preempt(s, j, (unsigned)dec.slot);
		break;
	case ADMIT_WAIT:
		waiting_add(s, j);
		break;
	}
	pthread_mutex_unlock(&s->mu);
}

/* Sleep on admit_cv until an admission arrives, quit, or the next kill
 * timer at next (UINT64_MAX: none).  Caller holds s->mu. */
static void
admission_wait(struct sched *s, uint64_t next)
{
	struct timespec ts;

	assert_locked(s);
	if (!STAILQ_EMPTY(&s->admissions) || sched_is_quitting(s))
		return;
	if (next == UINT64_MAX) {
		pthread_cond_wait(&s->admit_cv, &s->mu);
		return;
	}
	deadline_to_timespec(next, &ts);
	pthread_cond_timedwait(&s->admit_cv, &s->mu, &ts);
}

void *
admission_main(void *arg)
{
	struct sched *s = arg;
	struct message *m;

	pthread_mutex_lock(&s->mu);
	for (;;) {
		struct deferred d = {0};
		uint64_t next = kill_timers_run(s, &d);

		if (d.nsettle || d.ndestroy || d.nfree) {
			pthread_mutex_unlock(&s->mu);
			deferred_run(&d);
			pthread_mutex_lock(&s->mu);
			continue;
		}
		if ((m = msgq_pop(&s->admissions)) != NULL) {
			pthread_mutex_unlock(&s->mu);
			admit_one(s, m);
			pthread_mutex_lock(&s->mu);
			continue;
		}
		if (sched_is_quitting(s))
			break;
		admission_wait(s, next);
	}
	pthread_mutex_unlock(&s->mu);
	return NULL;
}

void
sched_submit_request(struct sched *s, struct message *m)
{
	sched_submit_request_held(s, m, NULL);
}

void
sched_submit_request_held(struct sched *s, struct message *m, struct sched_held_wakeups *held)
{
	pthread_mutex_lock(&s->mu);
	if (sched_is_quitting(s)) {
		count_settlement(s, SETTLE_REQUEUE);
		pthread_mutex_unlock(&s->mu);
		m->ops->settle(m, &(struct settlement){SETTLE_REQUEUE, "shutting down", NULL, 0, NULL});
		return;
	}
	s->st.requests++;
	if (!sched_is_stopping(s) && STAILQ_EMPTY(&s->admissions) &&
	    !SLIST_EMPTY(&s->free_protected)) {
		int slot;

		/* The common case, a free slot: no admission thread hop; the
		 * slot's worker makes the task. */
		count_empty(s, &slot);
		/* Not for preemptions: a helper is stopped only for a request
		 * that has turned into a task (admission makes it first). */
		if (slot >= 0) {
			job_start_held(s, job_new(s, NULL, m, JOB_PROTECTED, 0), (unsigned)slot,
				       held);
			pthread_mutex_unlock(&s->mu);
			return;
		}
	}
	msgq_push(&s->admissions, m);
	pthread_cond_signal(&s->admit_cv);
	pthread_mutex_unlock(&s->mu);
}
