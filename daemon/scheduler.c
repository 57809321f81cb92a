/*
 * scheduler.c - the slot scheduler's life cycle: start (threads, pools),
 * reconfiguration, a lost connection, the phases of shutdown, free; and
 * the stats and slot views for monitoring.  Runs on the caller's thread
 * (the daemon's main thread; sched_cancel_requests on the transport's).
 * The structures, the lock rule and the thread table are in
 * scheduler_impl.h.
 */
#include <errno.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "clock.h"
#include "log.h"
#include "scheduler_impl.h"

const double sched_latency_bounds_s[SCHED_LATENCY_BUCKETS] = {
	0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
	0.01, 0.025, 0.05, 0.1, 0.5, 1.0,
};

const char *
slot_status_name(enum slot_status st)
{
	static const char *const names[] = {"empty", "protected", "internal", "external"};

	return st < SLOT_STATUS_COUNT ? names[st] : "?";
}

const char *
job_kind_name(enum job_kind k)
{
	return slot_status_name(slot_status_of(k));
}

void
deadline_to_timespec(uint64_t mono_ns, struct timespec *ts)
{
	ts->tv_sec = (time_t)(mono_ns / 1000000000u);
	ts->tv_nsec = (long)(mono_ns % 1000000000u);
}

void
cond_init_monotonic(pthread_cond_t *cv)
{
	pthread_condattr_t a;

	pthread_condattr_init(&a);
	pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
	pthread_cond_init(cv, &a);
	pthread_condattr_destroy(&a);
}

/* The scheduler's own condition variables, made and destroyed together. */
#define SCHED_NCONDS 4u
static pthread_cond_t *
sched_cond(struct sched *s, unsigned i)
{
	pthread_cond_t *cvs[SCHED_NCONDS] = {&s->admit_cv, &s->expand_cv, &s->control_cv,
					     &s->idle_cv};

	return cvs[i];
}

void
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

/* Both worker pools; returns once every worker knows its tid and priority
 * (each posts s->workers_started as its first act). */
static void
start_workers(struct sched *s)
{
	unsigned i;

	s->workers = xcalloc(2 * s->nslots, sizeof(*s->workers));
	sem_init(&s->workers_started, 0, 0);
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
		worker_put(s, w);
	}
	pthread_mutex_unlock(&s->mu);
	for (i = 0; i < 2 * s->nslots; i++)
		while (sem_wait(&s->workers_started) != 0)
			;
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
	for (i = 0; i < SCHED_NCONDS; i++)
		cond_init_monotonic(sched_cond(s, i));
	copy_config(s, cfg);
	s->src = *src;
	if (obs)
		s->obs = *obs;
	s->life = LIFE_RUNNING;
	s->nslots = cfg->slots;
	s->st.slots = cfg->slots;
	s->slots = xcalloc(s->nslots, sizeof(*s->slots));
	s->help_store_cap = cfg->external_queue_max ? cfg->external_queue_max : 1;
	s->help_store = xcalloc(s->help_store_cap, sizeof(*s->help_store));
	s->helpers_idle = cfg->helper_priority == HELPER_PRIORITY_IDLE && idle_policy_works();
	if (!s->helpers_idle)
		s->cfg.helper_priority = HELPER_PRIORITY_NORMAL;
	SLIST_INIT(&s->free_protected);
	SLIST_INIT(&s->free_helpers);
	TAILQ_INIT(&s->running);
	TAILQ_INIT(&s->waiting);
	STAILQ_INIT(&s->admissions);
	STAILQ_INIT(&s->help_requests);
	STAILQ_INIT(&s->ready);

	start_workers(s);
	/* One dispatcher per task whose handle() may block (see the thread
	 * table), within bounds. */
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
	if (cap > s->help_store_cap) {
		s->help_store = xrealloc(s->help_store, cap * sizeof(*s->help_store));
		s->help_store_cap = cap;
	}
	while (s->nhelp_store > s->cfg.external_queue_max)
		help_store_drop(s, s->help_store[--s->nhelp_store].job, DROP_FULL, &d);
	kick_expansion(s);
	pthread_cond_signal(&s->admit_cv); /* kill_timeout may have changed */
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
	TAILQ_FOREACH(j, &s->running, running_link)
		if (j->kind == JOB_PROTECTED)
			job_cancel(j);
	for (i = 0; i < s->nslots; i++)
		if (s->slots[i].pending != NULL)
			pending_requeue(s, i, "connection lost", &s->orphans);
	waiting_expire(s, "connection lost", &s->orphans);
	kick_expansion(s);
	pthread_mutex_unlock(&s->mu);
}

/* ---- shutdown ---- */

static bool
any_running(const struct sched *s, bool protected_only)
{
	const struct job *j;

	/* A job that returned is done only once its message is settled. */
	if (s->settling > 0)
		return true;
	TAILQ_FOREACH(j, &s->running, running_link)
		if (!protected_only || j->kind == JOB_PROTECTED)
			return true;
	return false;
}

/* Caller holds s->mu. */
static void
wait_until_idle(struct sched *s, bool protected_only, uint64_t deadline)
{
	struct timespec ts;

	assert_locked(s);
	deadline_to_timespec(deadline, &ts);
	while (any_running(s, protected_only) && clock_now_ns() < deadline)
		if (pthread_cond_timedwait(&s->idle_cv, &s->mu, &ts) == ETIMEDOUT)
			break;
}

/* Phase 1: hold new arrivals, drop the help store, cancel helpers and
 * requeue the admissions waiting for them.  Caller holds s->mu. */
static void
shutdown_begin(struct sched *s)
{
	struct deferred d = {0};
	struct job *j;
	unsigned i;

	assert_locked(s);
	s->life = LIFE_STOPPING;
	help_store_clear(s, &d);
	TAILQ_FOREACH(j, &s->running, running_link)
		if (j->kind != JOB_PROTECTED)
			job_cancel(j);
	for (i = 0; i < s->nslots; i++)
		if (s->slots[i].pending != NULL)
			pending_requeue(s, i, "shutting down", &d);
	pthread_mutex_unlock(&s->mu);
	deferred_run(&d);
	pthread_mutex_lock(&s->mu);
}

/* Phase 2: protected tasks run up to shutdown_grace, then everything is
 * cancelled and gets kill_timeout to return.  Caller holds s->mu. */
static void
shutdown_drain(struct sched *s)
{
	struct job *j;

	wait_until_idle(s, true, clock_now_ns() + ms_to_ns(s->cfg.shutdown_grace_ms));
	TAILQ_FOREACH(j, &s->running, running_link)
		job_cancel(j);
	wait_until_idle(s, false, clock_now_ns() + ms_to_ns(s->cfg.kill_timeout_ms));
	if (any_running(s, false))
		log_warnx("shutdown: some tasks ignore cancellation; their messages "
			  "return to the broker when the connection closes");
}

/* Phase 3: tell every thread to exit and join them; dispatchers only for a
 * while, as they may be inside a blocked handle().  Caller holds s->mu,
 * which is dropped and taken again; returns false if a dispatcher is
 * wedged. */
static bool
shutdown_stop_threads(struct sched *s)
{
	struct deferred orphans;
	struct timespec ts;
	bool wedged = false;
	unsigned i;

	s->life = LIFE_QUITTING;
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
	return !wedged;
}

/* Phase 4: what no thread will take now goes back: held requests and
 * queued admissions are requeued, queued help requests acked.  Caller
 * holds s->mu. */
static void
shutdown_settle_leftovers(struct sched *s)
{
	struct deferred d = {0};
	struct message *m;

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
}

void
sched_shutdown(struct sched *s)
{
	bool dispatchers_joined;

	pthread_mutex_lock(&s->mu);
	if (sched_is_stopping(s)) {
		while (s->life < LIFE_STOPPED)
			pthread_cond_wait(&s->idle_cv, &s->mu);
		pthread_mutex_unlock(&s->mu);
		return;
	}
	shutdown_begin(s);
	shutdown_drain(s);
	dispatchers_joined = shutdown_stop_threads(s);
	shutdown_settle_leftovers(s);
	s->life = !any_running(s, false) && dispatchers_joined ? LIFE_STOPPED :
								 LIFE_STOPPED_WEDGED;
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
	if (s->life != LIFE_STOPPED) {
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
	sem_destroy(&s->workers_started);
	/* Jobs still referenced by nobody but finished are already freed;
	 * the ready list holds references only to running jobs. */
	withdrawn_free(s);
	FREE_ALL(s->workers, s->slots, s->help_store, s->header_task_id);
	for (i = 0; i < SCHED_NCONDS; i++)
		pthread_cond_destroy(sched_cond(s, i));
	pthread_mutex_destroy(&s->mu);
	free(s);
}

/* ---- monitoring ---- */

void
sched_get_stats(struct sched *s, struct sched_stats *out)
{
	uint64_t now = clock_now_ns(), kill_ns;
	const struct job *j;
	unsigned i;

	pthread_mutex_lock(&s->mu);
	*out = s->st;
	kill_ns = ms_to_ns(s->cfg.kill_timeout_ms);
	memset(out->by_status, 0, sizeof(out->by_status));
	for (i = 0; i < s->nslots; i++)
		out->by_status[s->slots[i].status]++;
	out->stuck = out->draining = 0;
	TAILQ_FOREACH(j, &s->running, running_link) {
		if (j->slot < 0)
			out->draining++;
		if (j->cancelled && now - j->cancel_ns > kill_ns)
			out->stuck++;
	}
	out->external_queued = s->nhelp_store;
	out->waiting = s->nwaiting;
	pthread_mutex_unlock(&s->mu);
}

unsigned
sched_get_slots(struct sched *s, struct slot_view *v, unsigned n)
{
	uint64_t now = clock_now_ns(), kill_ns;
	unsigned i;

	pthread_mutex_lock(&s->mu);
	kill_ns = ms_to_ns(s->cfg.kill_timeout_ms);
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
