/*
 * scheduler_worker.c - the threads that run tasks: protected slot workers,
 * helper workers, and the reaper that does the bookkeeping of finished
 * helpers; a finished job's settlement.  Each loop runs on its own thread
 * (see the thread table in scheduler_impl.h).
 */
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "clock.h"
#include "log.h"
#include "scheduler_impl.h"

/* Stop a helper.  On idle-priority threads it cannot slow anyone down, so
 * its slot is free at once and it drains outside any slot.  Caller holds
 * s->mu. */
void
helper_stop(struct sched *s, struct job *j)
{
	assert_locked(s);
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

	TAILQ_FOREACH(j, &s->running, running_link)
		if (j->root == root && j != except && j->kind != JOB_PROTECTED)
			helper_stop(s, j);
}

/* What job_finish leaves to do after the lock. */
struct finish {
	struct message *msg;    /* to settle with set, or NULL */
	struct settlement set;
	double seconds;         /* run time */
	char *ended_master;     /* to announce (sched_set_withdrawal), or NULL */
	struct announcer announcer;
};

/* The worker returned from run(): free the slot (or hand it to a pending
 * admission), end the job's helpers, and decide the settlement.  Caller
 * holds s->mu. */
static struct finish
job_finish(struct sched *s, struct job *j, enum occamy_status st,
	   struct occamy_output *out, struct deferred *d)
{
	struct finish f = {.seconds = (double)(clock_now_ns() - j->start_ns) / 1e9};

	assert_locked(s);
	j->finished = true;
	s->st.completed++;
	TAILQ_REMOVE(&s->running, j, running_link);

	if (j->slot >= 0) {
		slot_release(s, (unsigned)j->slot);
		j->slot = -1;
	}
	if (j->kind == JOB_PROTECTED) {
		s->st.busy_task_seconds += f.seconds;
		s->st.protected_completed++;
	}
	/* Helpers end with their root: their work is for nobody now. */
	if (j->root == j->serial)
		cancel_lineage(s, j->root, j);
	job_flush_control(s, j, d);

	if (j->msg != NULL) {
		enum settle_outcome o = outcome_of(st, j->cancelled);
		f.msg = j->msg;
		f.set = (struct settlement){.outcome = o};
		if (o == SETTLE_ACK) {
			f.set.reply = out->body;
			f.set.reply_len = out->len;
			f.set.content_type = out->content_type[0] ? out->content_type : NULL;
			out->body = NULL;
		} else {
			f.set.reason = status_reason(st);
		}
		count_settlement(s, o);
		j->msg = NULL;
		/* A final outcome: the help it asked for is for nobody now. */
		if ((o == SETTLE_ACK || o == SETTLE_DEAD_LETTER) && j->task->id != NULL &&
		    s->announcer.fn != NULL &&
		    (f.ended_master = help_published_take(s, j->task->id)) != NULL)
			f.announcer = s->announcer;
	} else if (st != OCCAMY_OK && !(j->cancelled && st == OCCAMY_ERR_INTERRUPTED)) {
		s->st.helper_errors++;
	}
	kick_expansion_if_useful(s);
	pthread_cond_broadcast(&s->idle_cv);
	return f;
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

/* A settlement counted in s->settling (shutdown waits for it) is done.
 * Caller holds s->mu: the worker retakes it after settling anyway, so the
 * count costs no lock round trip of its own. */
static void
settled_uncount(struct sched *s)
{
	assert_locked(s);
	s->settling--;
	pthread_cond_broadcast(&s->idle_cv);
}

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

	assert_locked(s);
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
	TAILQ_REMOVE(&s->running, j, running_link);
	worker_put(s, w);
	slot_release(s, (unsigned)j->slot);
	count_settlement(s, o);
	s->settling++;
	kick_expansion_if_useful(s);
	pthread_mutex_unlock(&s->mu);
	if (t != NULL)
		t->ops->destroy(t);
	free(j->master);
	free(j);
	m->ops->settle(m, &(struct settlement){o, reason, NULL, 0, NULL});
	pthread_mutex_lock(&s->mu);
	settled_uncount(s);
	return false;
}

/* After run() returned: free the slot, settle, account.  Called with the
 * lock held, returns with it held; drops it for plugin and transport code. */
static void
run_finished(struct sched *s, struct worker *w, struct job *j, enum occamy_status st,
	     struct occamy_output *out)
{
	struct deferred d = {0};
	struct finish f;
	char group[64];
	enum job_kind kind = j->kind;
	bool was_cancelled = j->cancelled, counted;

	assert_locked(s);
	snprintf(group, sizeof(group), "%s", j->task->group);
	/* The worker first: the freed slot may go to a held request at once. */
	j->worker = NULL;
	worker_put(s, w);
	f = job_finish(s, j, st, out, &d);
	counted = f.msg != NULL;
	if (counted)
		s->settling++; /* shutdown waits for it, until settled_uncount() */
	job_unref(s, j, &d);
	pthread_mutex_unlock(&s->mu);

	if (f.msg != NULL) {
		char reason[300];
		if (f.set.outcome != SETTLE_ACK) {
			snprintf(reason, sizeof(reason), "%s%s%s", status_reason(st),
				 out->message[0] ? ": " : "", out->message);
			f.set.reason = reason;
		}
		/* Announced inside the settling window, so shutdown (which
		 * waits for it) never outlives the transport it publishes on. */
		if (f.ended_master != NULL) {
			f.announcer.fn(f.announcer.ctx, f.ended_master);
			free(f.ended_master);
		}
		f.msg->ops->settle(f.msg, &f.set);
	} else if (st != OCCAMY_OK && !(was_cancelled && st == OCCAMY_ERR_INTERRUPTED)) {
		log_warnx("%s helper (%s) failed: %s%s%s", job_kind_name(kind),
			  group, status_reason(st), out->message[0] ? ": " : "",
			  out->message);
	}
	free(out->body);
	out->body = NULL;
	if (s->obs.task_done)
		s->obs.task_done(s->obs.ctx, group, kind, st, f.seconds);
	deferred_run(&d);
	pthread_mutex_lock(&s->mu);
	if (counted)
		settled_uncount(s);
}

/* A worker's first act: learn its tid and priority, then post started.  No
 * lock, so a helper never takes s->mu, not even at start-up. */
static void
worker_started(struct worker *w)
{
	struct sched *s = w->s;

	w->tid = (pid_t)syscall(SYS_gettid);
	if (w->helper_pool && s->cfg.helper_priority == HELPER_PRIORITY_IDLE)
		set_helper_priority(w);
	sem_post(&s->workers_started);
}

static void
record_admit_latency(struct sched *s, const struct job *j)
{
	double lat = (double)(clock_now_ns() - j->msg->arrival_ns) / 1e9;
	unsigned b;

	assert_locked(s);
	for (b = 0; b < SCHED_LATENCY_BUCKETS; b++)
		if (lat <= sched_latency_bounds_s[b])
			break;
	s->st.admit_latency_buckets[b]++;
	s->st.admit_latency_sum_s += lat;
	s->st.admit_latency_count++;
}

/* A protected slot thread: normal priority, takes the lock freely. */
void *
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

		while (w->job == NULL && !sched_is_quitting(s))
			pthread_cond_wait(&w->cv, &s->mu);
		if (w->job == NULL)
			break;
		j = w->job;
		if (j->task == NULL && !worker_make_task(s, w, j))
			continue;
		if (j->kind == JOB_PROTECTED && j->msg != NULL)
			record_admit_latency(s, j);
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
 * inversion).  It starts by posting a semaphore, takes jobs through its
 * own semaphore and hands results to the reaper thread through a lock-free
 * stack; the reaper does the bookkeeping.  It never takes s->mu.
 */
void *
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
void *
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
		quit = sched_is_quitting(s) && atomic_load(&s->finished_helpers) == NULL;
		pthread_mutex_unlock(&s->mu);
		if (quit)
			break;
	}
	return NULL;
}
