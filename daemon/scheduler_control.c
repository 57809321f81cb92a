/*
 * scheduler_control.c - control messages: routing a message with a task ID
 * to every task with that ID (running, or waiting in the help store), each
 * task's bounded backlog, and the dispatchers that call handle().
 * sched_submit_control runs on the transport's thread; the dispatchers on
 * their own threads.
 */
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "scheduler_impl.h"

/* Caller holds s->mu. */
static void
control_unref(struct sched *s, struct control_ref *r, struct deferred *d)
{
	assert_locked(s);
	if (--r->refs == 0) {
		enum settle_outcome o = r->overflow ? SETTLE_DEAD_LETTER : SETTLE_ACK;

		count_settlement(s, o);
		defer_settle(d, r->m, o, r->overflow ? "control backlog full" : NULL);
		free(r);
	}
}

/* Drop j's backlog; each message is acked once its last task is done.
 * Caller holds s->mu. */
void
job_flush_control(struct sched *s, struct job *j, struct deferred *d)
{
	struct control_item *it;

	while ((it = STAILQ_FIRST(&j->ctl)) != NULL) {
		STAILQ_REMOVE_HEAD(&j->ctl, link);
		control_unref(s, it->ref, d);
		free(it);
	}
	j->ctl_len = 0;
}

static void
ready_push(struct sched *s, struct job *j)
{
	assert_locked(s);
	if (j->ctl_ready || j->ctl_busy || STAILQ_EMPTY(&j->ctl))
		return;
	j->ctl_ready = true;
	j->refs++; /* the ready list's */
	STAILQ_INSERT_TAIL(&s->ready, j, ready_link);
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
				  "more are dead-lettered", job_kind_name(j->kind),
				  j->task->id, SCHED_CONTROL_BACKLOG_MAX);
		j->ctl_overflowed = true;
		return;
	}
	it = xcalloc(1, sizeof(*it));
	r->refs++;
	it->ref = r;
	STAILQ_INSERT_TAIL(&j->ctl, it, link);
	j->ctl_len++;
	ready_push(s, j);
}

static bool
job_takes_control(const struct job *j, const char *id)
{
	return j->task != NULL && j->task->id != NULL && j->task->ops->handle != NULL &&
	       strcmp(j->task->id, id) == 0;
}

/* Queue m for every task with task ID id.  Caller holds s->mu. */
static void
control_route(struct sched *s, struct message *m, const char *id, struct deferred *d)
{
	struct control_ref *r = xcalloc(1, sizeof(*r));
	struct job *j;
	unsigned i;

	assert_locked(s);
	r->m = m;
	r->refs = 1; /* ours, until routing is done */
	TAILQ_FOREACH(j, &s->running, running_link)
		if (!j->cancelled && job_takes_control(j, id))
			job_enqueue_control(s, j, r);
	for (i = 0; i < s->nhelp_store; i++)
		if (job_takes_control(s->help_store[i].job, id))
			job_enqueue_control(s, s->help_store[i].job, r);
	if (r->refs > 1)
		s->st.control_routed++;
	else
		s->st.control_unmatched++;
	control_unref(s, r, d);
}

void
sched_submit_control(struct sched *s, struct message *m)
{
	const struct occamy_header *h = occamy_headers_find(&m->headers, s->header_task_id);
	struct deferred d = {0};

	pthread_mutex_lock(&s->mu);
	if (h == NULL) {
		if (sched_is_stopping(s)) {
			s->st.external_drops[DROP_SHUTDOWN]++;
			count_settlement(s, SETTLE_ACK);
			defer_settle(&d, m, SETTLE_ACK, NULL);
		} else {
			msgq_push(&s->help_requests, m);
			pthread_cond_signal(&s->control_cv);
		}
	} else if (h->kind != OCCAMY_VALUE_STRING || memchr(h->str, '\0', h->len) != NULL) {
		s->st.control_invalid++;
		count_settlement(s, SETTLE_DEAD_LETTER);
		defer_settle(&d, m, SETTLE_DEAD_LETTER,
			     "invalid_headers: task ID header is not a string");
	} else {
		if (occamy_headers_find(&m->headers, OCCAMY_HEADER_DONE) != NULL)
			master_withdraw(s, h->str, &d);
		control_route(s, m, h->str, &d);
	}
	pthread_mutex_unlock(&s->mu);
	deferred_run(&d);
}

/* Run deferred work without the lock.  Caller holds s->mu; so on return. */
static void
run_unlocked(struct sched *s, struct deferred *d)
{
	pthread_mutex_unlock(&s->mu);
	deferred_run(d);
	pthread_mutex_lock(&s->mu);
}

/* One control message to j's handle().  Called and returns with the lock
 * held; drops it around handle(). */
static void
dispatch_one(struct sched *s, struct job *j)
{
	struct deferred d = {0};
	struct control_item *it = STAILQ_FIRST(&j->ctl);

	assert_locked(s);
	j->ctl_ready = false;
	if (it == NULL || j->finished) {
		job_unref(s, j, &d);
		run_unlocked(s, &d);
		return;
	}
	STAILQ_REMOVE_HEAD(&j->ctl, link);
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
	run_unlocked(s, &d);
}

void *
dispatcher_main(void *arg)
{
	struct sched *s = arg;

	pthread_mutex_lock(&s->mu);
	for (;;) {
		struct message *m;
		struct job *j;

		while (STAILQ_EMPTY(&s->ready) && STAILQ_EMPTY(&s->help_requests) &&
		       !sched_is_quitting(s))
			pthread_cond_wait(&s->control_cv, &s->mu);
		if ((m = msgq_pop(&s->help_requests)) != NULL) {
			pthread_mutex_unlock(&s->mu);
			help_request_store(s, m);
			pthread_mutex_lock(&s->mu);
			continue;
		}
		if ((j = STAILQ_FIRST(&s->ready)) == NULL)
			break; /* quit */
		STAILQ_REMOVE_HEAD(&s->ready, ready_link);
		dispatch_one(s, j);
	}
	pthread_mutex_unlock(&s->mu);
	return NULL;
}
