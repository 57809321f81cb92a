/*
 * scheduler_expand.c - the expansion pass, which offers free slots to
 * running tasks' expand() and to the help store, and the help store itself:
 * help requests turned into external helpers' jobs that wait for room.
 * The pass runs on the expansion thread; help requests are stored by the
 * control dispatchers.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "clock.h"
#include "log.h"
#include "scheduler_impl.h"

static unsigned
count_free_helper_workers(const struct sched *s)
{
	unsigned n = 0;
	const struct worker *w;

	SLIST_FOREACH(w, &s->free_helpers, free_link)
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
	unsigned workers = count_free_helper_workers(s);

	return room < workers ? room : workers;
}

/* Caller holds s->mu. */
void
kick_expansion(struct sched *s)
{
	assert_locked(s);
	s->expand_kick = true;
	pthread_cond_signal(&s->expand_cv);
}

/* Kick only if a pass could start something: waking the expansion thread
 * for every finished request costs more than the request itself.  Caller
 * holds s->mu. */
void
kick_expansion_if_useful(struct sched *s)
{
	const struct job *j;

	if (s->expand_kick)
		return;
	if (s->nhelp_store > 0) {
		kick_expansion(s);
		return;
	}
	TAILQ_FOREACH(j, &s->running, running_link) {
		if (!j->cancelled && j->slot >= 0 && j->task != NULL &&
		    j->task->ops->expand != NULL) {
			kick_expansion(s);
			return;
		}
	}
}

/* ---- the help store ---- */

/* Better = higher priority, then older. */
static bool
help_entry_before(const struct help_entry *a, const struct help_entry *b)
{
	if (a->job->task->priority != b->job->task->priority)
		return a->job->task->priority > b->job->task->priority;
	return a->seq < b->seq;
}

/* Drop a stored help request: it never runs; pending control is acked.
 * Caller holds s->mu. */
void
help_store_drop(struct sched *s, struct job *j, enum sched_drop_reason why,
		struct deferred *d)
{
	assert_locked(s);
	s->st.external_drops[why]++;
	j->finished = true;
	job_flush_control(s, j, d);
	job_unref(s, j, d);
}

static void
help_store_add(struct sched *s, struct task *t, char *master, struct deferred *d)
{
	struct help_entry e = {.seq = ++s->help_store_seq};
	unsigned i;

	assert_locked(s);
	e.deadline_ms = t->deadline_ms > 0 ? t->deadline_ms :
		clock_wall_ms() + (int64_t)s->cfg.external_ttl_ms;
	e.job = job_new(s, t, NULL, JOB_EXTERNAL, 0); /* the store's reference */
	e.job->master = master;
	if (s->cfg.external_queue_max == 0) {
		help_store_drop(s, e.job, DROP_FULL, d);
		return;
	}
	if (s->nhelp_store == s->cfg.external_queue_max) {
		/* Full: the worst entry (last) makes way only for a better one. */
		struct help_entry *worst = &s->help_store[s->nhelp_store - 1];
		if (!help_entry_before(&e, worst)) {
			help_store_drop(s, e.job, DROP_FULL, d);
			return;
		}
		help_store_drop(s, worst->job, DROP_FULL, d);
		s->nhelp_store--;
	}
	for (i = s->nhelp_store; i > 0 && help_entry_before(&e, &s->help_store[i - 1]); i--)
		s->help_store[i] = s->help_store[i - 1];
	s->help_store[i] = e;
	s->nhelp_store++;
	kick_expansion(s);
}

static void
help_store_prune(struct sched *s, struct deferred *d)
{
	int64_t now = clock_wall_ms();
	unsigned i, k = 0;

	for (i = 0; i < s->nhelp_store; i++) {
		if (s->help_store[i].deadline_ms <= now)
			help_store_drop(s, s->help_store[i].job, DROP_EXPIRED, d);
		else
			s->help_store[k++] = s->help_store[i];
	}
	s->nhelp_store = k;
}

/* Caller holds s->mu. */
void
help_store_clear(struct sched *s, struct deferred *d)
{
	unsigned i;

	for (i = 0; i < s->nhelp_store; i++)
		help_store_drop(s, s->help_store[i].job, DROP_SHUTDOWN, d);
	s->nhelp_store = 0;
}

/* ---- withdrawal: see WITHDRAWAL in occamy/plugin.h ---- */

/* The two rings of remembered masters (withdrawn ones, and those that
 * published help from here) hold each ID at most once. */
static struct withdrawn *
ring_find(struct withdrawn *ring, unsigned n, const char *id)
{
	unsigned i;

	for (i = 0; i < n; i++)
		if (ring[i].id != NULL && strcmp(ring[i].id, id) == 0)
			return &ring[i];
	return NULL;
}

/* Remember id until until_ms: its entry if it has one, else the next one,
 * forgetting the oldest. */
static void
ring_remember(struct withdrawn *ring, unsigned n, unsigned *next, const char *id,
	      int64_t until_ms)
{
	struct withdrawn *w = ring_find(ring, n, id);

	if (w == NULL) {
		w = &ring[*next];
		*next = (*next + 1) % n;
		free(w->id);
		w->id = xstrdup(id);
	}
	w->until_ms = until_ms;
}

/* Caller holds s->mu. */
static bool
master_is_withdrawn(struct sched *s, const char *id)
{
	const struct withdrawn *w = ring_find(s->withdrawn, WITHDRAWN_MAX, id);

	assert_locked(s);
	return w != NULL && w->until_ms > clock_wall_ms();
}

/* Master id has ended: drop its stored help requests, stop its running
 * external helpers (an external's own helpers carry the same master) and
 * remember it for help requests still on their way.  Protected jobs are
 * never touched: they have a request to answer.  Caller holds s->mu. */
void
master_withdraw(struct sched *s, const char *id, struct deferred *d)
{
	struct job *j;
	unsigned i, k = 0;

	assert_locked(s);
	if (!master_is_withdrawn(s, id))
		ring_remember(s->withdrawn, WITHDRAWN_MAX, &s->nwithdrawn_next, id,
			      clock_wall_ms() + (int64_t)s->cfg.external_ttl_ms);
	for (i = 0; i < s->nhelp_store; i++) {
		struct job *e = s->help_store[i].job;
		if (e->master != NULL && strcmp(e->master, id) == 0)
			help_store_drop(s, e, DROP_WITHDRAWN, d);
		else
			s->help_store[k++] = s->help_store[i];
	}
	s->nhelp_store = k;
	TAILQ_FOREACH(j, &s->running, running_link)
		if (j->kind == JOB_EXTERNAL && !j->cancelled && j->master != NULL &&
		    strcmp(j->master, id) == 0)
			helper_stop(s, j);
}

void
withdrawn_free(struct sched *s)
{
	unsigned i;

	for (i = 0; i < WITHDRAWN_MAX; i++)
		free(s->withdrawn[i].id);
	for (i = 0; i < SCHED_HELP_PUBLISHED_MAX; i++)
		free(s->help_published[i].id);
}

void
sched_set_withdrawal(struct sched *s, sched_announce_fn announce, void *ctx)
{
	pthread_mutex_lock(&s->mu);
	s->announcer = (struct announcer){announce, ctx};
	pthread_mutex_unlock(&s->mu);
}

/* Any thread (a plugin's publish_help).  Past external_ttl_ms the help
 * request has expired everywhere, so the entry can be forgotten; a full
 * ring forgets the oldest, whose master then ends unannounced and its help
 * expires at its deadline, as before withdrawal existed. */
void
sched_note_help_published(struct sched *s, const char *master_id)
{
	if (master_id == NULL || master_id[0] == '\0')
		return;
	pthread_mutex_lock(&s->mu);
	ring_remember(s->help_published, SCHED_HELP_PUBLISHED_MAX, &s->nhelp_published_next,
		      master_id, clock_wall_ms() + (int64_t)s->cfg.external_ttl_ms);
	pthread_mutex_unlock(&s->mu);
}

/* If id published help from here that may still wait somewhere, forget it
 * and return a copy to announce (the caller frees it); else NULL.  Caller
 * holds s->mu. */
char *
help_published_take(struct sched *s, const char *id)
{
	struct withdrawn *w = ring_find(s->help_published, SCHED_HELP_PUBLISHED_MAX, id);
	char *out;

	assert_locked(s);
	if (w == NULL)
		return NULL;
	out = w->until_ms > clock_wall_ms() ? w->id : NULL;
	if (out == NULL)
		free(w->id);
	w->id = NULL;
	return out;
}

/* A help request (a control message without task ID): make its task and
 * store it; the message is acked either way.  Called without the lock, on
 * a control dispatcher. */
void
help_request_store(struct sched *s, struct message *m)
{
	struct deferred d = {0};
	struct task *t = NULL;
	const struct occamy_header *hm = occamy_headers_find(&m->headers, OCCAMY_HEADER_MASTER);
	char reason[300], *master = NULL;
	enum occamy_status st;

	if (hm != NULL && hm->kind == OCCAMY_VALUE_STRING && hm->len > 0 &&
	    memchr(hm->str, '\0', hm->len) == NULL)
		master = xstrdup(hm->str);
	st = make_task(s, m, true, &t, reason, sizeof(reason));
	pthread_mutex_lock(&s->mu);
	if (st != OCCAMY_OK) {
		/* A help request is advice, never retried: invalid or not. */
		s->st.make_task_errors++;
		s->st.control_invalid++;
		count_settlement(s, SETTLE_DEAD_LETTER);
		pthread_mutex_unlock(&s->mu);
		m->ops->settle(m, &(struct settlement){SETTLE_DEAD_LETTER, reason, NULL, 0, NULL});
		free(master);
		return;
	}
	if (sched_is_stopping(s)) {
		s->st.external_drops[DROP_SHUTDOWN]++;
		defer_destroy(&d, t);
		free(master);
	} else if (master != NULL && master_is_withdrawn(s, master)) {
		/* Its master ended while this was on its way. */
		s->st.external_drops[DROP_WITHDRAWN]++;
		defer_destroy(&d, t);
		free(master);
	} else {
		help_store_add(s, t, master, &d);
	}
	count_settlement(s, SETTLE_ACK);
	defer_settle(&d, m, SETTLE_ACK, NULL);
	pthread_mutex_unlock(&s->mu);
	deferred_run(&d);
}

/* ---- expansion ---- */

/* The running jobs of one kind that may expand, oldest first (so the
 * remainder of a fair share goes to them), each with a reference. */
static struct job **
expand_candidates(struct sched *s, enum job_kind kind, unsigned *n)
{
	struct job **cand = NULL, *j;
	unsigned ncand = 0, cap = 0;

	TAILQ_FOREACH_REVERSE(j, &s->running, job_list, running_link) {
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
	*n = ncand;
	return cand;
}

/* Start the helpers p's expand() returned, where room is left; destroy the
 * rest after the lock.  Caller holds s->mu. */
static void
expand_start_helpers(struct sched *s, struct job *p, enum job_kind kind,
		     struct task **helpers, unsigned got, struct deferred *d)
{
	enum job_kind hk = kind == JOB_EXTERNAL ? JOB_EXTERNAL : JOB_INTERNAL;
	unsigned h;

	assert_locked(s);
	for (h = 0; h < got; h++) {
		int slot;

		if (helpers[h] == NULL)
			continue;
		count_empty(s, &slot);
		/* Room may have gone to a request meanwhile. */
		if (sched_is_stopping(s) || p->finished || p->cancelled ||
		    helper_room(s) == 0 || slot < 0) {
			defer_destroy(d, helpers[h]);
			continue;
		}
		struct job *hj = job_new(s, helpers[h], NULL, hk, p->root);
		if (hk == JOB_EXTERNAL && p->master != NULL)
			hj->master = xstrdup(p->master);
		job_start(s, hj, (unsigned)slot);
	}
}

/* Offer the helper room to every running job of one kind, shared fairly,
 * in rounds while someone still takes all it is offered.  Called and
 * returns with the lock held; drops it around expand(). */
static void
expand_class(struct sched *s, enum job_kind kind, struct deferred *d)
{
	unsigned ncand, i, round;
	struct job **cand = expand_candidates(s, kind, &ncand);
	bool *done;

	assert_locked(s);
	if (ncand == 0)
		return;
	done = xcalloc(ncand, sizeof(*done));
	for (round = 0; round < EXPANSION_ROUNDS_MAX && !sched_is_stopping(s); round++) {
		unsigned room = helper_room(s), active = 0, k = 0, progress = 0;

		for (i = 0; i < ncand; i++)
			if (!done[i] && !cand[i]->finished && !cand[i]->cancelled)
				active++;
		if (room == 0 || active == 0)
			break;
		for (i = 0; i < ncand; i++) {
			unsigned share, got;
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
			expand_start_helpers(s, p, kind, helpers, got, d);
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
	assert_locked(s);
	help_store_prune(s, d);
	if (sched_is_stopping(s))
		return;
	expand_class(s, JOB_PROTECTED, d);
	expand_class(s, JOB_INTERNAL, d);
	expand_class(s, JOB_EXTERNAL, d);
	while (!sched_is_stopping(s) && s->nhelp_store > 0 && helper_room(s) > 0) {
		struct help_entry e = s->help_store[0];
		int slot;

		memmove(&s->help_store[0], &s->help_store[1],
			(s->nhelp_store - 1) * sizeof(*s->help_store));
		s->nhelp_store--;
		count_empty(s, &slot);
		job_start(s, e.job, (unsigned)slot);
		/* Its own expand() deserves the rest of the room now, not at
		 * the next period: run the pass again. */
		s->expand_kick = true;
	}
}

void *
expansion_main(void *arg)
{
	struct sched *s = arg;

	pthread_mutex_lock(&s->mu);
	while (!sched_is_quitting(s)) {
		struct deferred d = {0}, orphans;
		uint64_t next = clock_now_ns() + ms_to_ns(s->cfg.expansion_period_ms);
		struct timespec ts;

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
		while (!s->expand_kick && !sched_is_quitting(s))
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
