/*
 * scheduler_impl.h - the scheduler's private structures, its lock rule and
 * its threads.  Included only by daemon/scheduler*.c (and the unit test of
 * the pure admission decision); the rest of the daemon sees scheduler.h.
 *
 * Files, in reading order:
 *   scheduler.c          life cycle (new, reconfigure, shutdown, free), stats
 *   scheduler_job.c      jobs, cancel tokens, deferred work, slot start/release
 *   scheduler_admit.c    admission, preemption, held requests, kill timers
 *   scheduler_worker.c   worker, helper and reaper loops; finish and settle
 *   scheduler_expand.c   the expansion pass and the help store
 *   scheduler_control.c  routing of control messages to running tasks
 *
 * THE LOCK RULE.  One mutex, s->mu, guards every field of struct sched, its
 * slots, workers and jobs, except those marked "no lock" below.  It is
 * never held while plugin code runs (make_task, run, expand, handle,
 * destroy) nor while a message is settled, so a slow plugin or transport
 * never blocks the scheduler: work decided under the lock is collected in a
 * struct deferred and carried out after unlocking.  Jobs are reference
 * counted so that a task is destroyed only after every callback returned.
 * A function whose comment says "caller holds s->mu" checks it with
 * assert_locked(s) in debug builds.
 *
 * THE THREADS.
 *
 * | thread     | count      | policy              | plugin callbacks        | may block on                 |
 * |------------|------------|---------------------|-------------------------|------------------------------|
 * | slotN      | slots      | SCHED_OTHER         | task_new (a request     | s->mu; the plugin            |
 * |            |            |                     | given a free slot at    |                              |
 * |            |            |                     | once), task_run,        |                              |
 * |            |            |                     | task_destroy            |                              |
 * | helperN    | slots      | SCHED_IDLE (nice 19 | task_run                | its semaphore; the plugin.   |
 * |            |            | if refused), or     |                         | Never s->mu: see helper_main |
 * |            |            | SCHED_OTHER with    |                         |                              |
 * |            |            | helper_priority =   |                         |                              |
 * |            |            | normal              |                         |                              |
 * | reaper     | 1          | SCHED_OTHER         | task_destroy            | its semaphore; s->mu         |
 * | admission  | 1          | SCHED_OTHER         | task_new, task_destroy  | s->mu; admit_cv until the    |
 * |            |            |                     |                         | next kill timer              |
 * | expansion  | 1          | SCHED_OTHER         | task_expand,            | s->mu; expand_cv until the   |
 * |            |            |                     | task_destroy            | next period                  |
 * | control    | slots + 1  | SCHED_OTHER         | task_new (help          | s->mu; control_cv; the       |
 * |            | (2 to 64)  |                     | requests), task_handle, | plugin's handle()            |
 * |            |            |                     | task_destroy            |                              |
 *
 * Control dispatchers number slots + 1: task_handle() calls for one task
 * are serialised, so one dispatcher per task that may be running at once
 * (at most one per slot) lets every task's handle() block for a while
 * without stalling the others, and the one more keeps help requests moving
 * while every task's handle() is busy.
 *
 * The transport's thread calls sched_submit_*() and sched_cancel_requests();
 * it runs no plugin code: what those must destroy goes to s->orphans, which
 * the expansion thread runs.
 */
#ifndef OCCAMY_SCHEDULER_IMPL_H
#define OCCAMY_SCHEDULER_IMPL_H

#include <pthread.h>
#include <semaphore.h>
#include <stdatomic.h>
#include <sys/queue.h>
#include <sys/types.h>

#include "scheduler.h"

#define DISPATCHERS_MAX 64
/* A request that finds no slot is held at least this long before it goes
 * back to the broker, which would hand it straight back otherwise. */
#define REQUEUE_HOLD_MIN_MS 1000
#define EXPANSION_ROUNDS_MAX 8
/* Masters recently withdrawn, remembered so that their late help requests
 * are dropped; the oldest is forgotten first. */
#define WITHDRAWN_MAX 64
#define REASON_KILL_TIMEOUT "kill timeout: no slot freed in time"

/* Debug builds check the lock rule: the mutex is an error-checking one, so
 * a trylock by its owner fails with EDEADLK. */
#ifdef NDEBUG
#define assert_locked(s) ((void)(s))
#else
void sched_assert_locked(struct sched *s, const char *func);
#define assert_locked(s) sched_assert_locked((s), __func__)
#endif

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
	STAILQ_ENTRY(control_item) link;
};
STAILQ_HEAD(control_list, control_item);

struct worker;

struct job {
	struct task *task;
	struct message *msg;       /* protected jobs only */
	enum job_kind kind;
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
	char *master;              /* externals: OCCAMY_HEADER_MASTER, or NULL */
	TAILQ_ENTRY(job) running_link; /* s->running */
	TAILQ_ENTRY(job) wait_link;    /* s->waiting: held for a slot */
	uint64_t wait_deadline_ns;
	bool wait_for_kill;        /* held for a cancelled task within kill_timeout */

	struct control_list ctl;   /* control messages for its handle() */
	unsigned ctl_len;
	bool ctl_busy, ctl_ready;
	bool ctl_overflowed;       /* logged once per task */
	STAILQ_ENTRY(job) ready_link;  /* s->ready */
};
TAILQ_HEAD(job_list, job);
STAILQ_HEAD(job_queue, job);

struct worker {
	struct sched *s;
	pthread_t thread;
	pid_t tid;
	bool helper_pool;
	bool niced;      /* SCHED_IDLE was refused: fell back to nice 19 */
	struct job *job;
	pthread_cond_t cv;          /* protected workers wait on it with s->mu */
	SLIST_ENTRY(worker) free_link;

	/* Helper workers only: no lock.  They never take s->mu (see
	 * helper_main); the semaphores order what they read and write. */
	sem_t go;
	atomic_bool stop;
	enum occamy_status status;
	struct occamy_output out;
	struct worker *next_finished;
};
SLIST_HEAD(worker_list, worker);

struct slot {
	enum slot_status status;
	struct job *job;
	struct job *pending;       /* normal mode: admitted, waiting for the kill */
	uint64_t pending_deadline_ns;
};

/* An entry of the help store: an external helper's job not yet started, so
 * control messages to its task ID reach it while it waits (its master may
 * say "done"). */
struct help_entry {
	struct job *job;
	int64_t deadline_ms;
	uint64_t seq;
};

/* A master that said OCCAMY_HEADER_DONE, until its help requests expire;
 * also a master that published help from here, until the same. */
struct withdrawn {
	char *id;
	int64_t until_ms;
};

struct queued_msg {
	struct message *m;
	STAILQ_ENTRY(queued_msg) link;
};
STAILQ_HEAD(msg_queue, queued_msg);

struct deferred_settle {
	struct message *m;
	struct settlement set;
};

/* Work collected under the lock and carried out after unlocking. */
struct deferred {
	struct deferred_settle *settle;
	unsigned nsettle, cap_settle;
	struct task **destroy;
	unsigned ndestroy, cap_destroy;
	struct job **free_jobs;
	unsigned nfree, cap_free;
};

/* Where the scheduler is in its life; it only moves forward. */
enum sched_life {
	LIFE_RUNNING,
	LIFE_STOPPING,       /* shutdown: arrivals held, helpers cancelled */
	LIFE_QUITTING,       /* threads told to exit */
	LIFE_STOPPED,        /* shutdown done, every thread returned */
	LIFE_STOPPED_WEDGED, /* shutdown done, some thread is stuck in a plugin */
};

/* Who publishes a master's end (sched_set_withdrawal): fn(ctx, id),
 * called off the lock. */
struct announcer {
	sched_announce_fn fn;
	void *ctx;
};

struct sched {
	pthread_mutex_t mu;
	struct sched_config cfg;
	char *header_task_id;
	struct task_source src;
	struct sched_observer obs;
	enum sched_life life;

	unsigned nslots;
	struct slot *slots;
	struct worker *workers;     /* [0, nslots) protected, [nslots, 2n) helpers */
	sem_t workers_started;      /* each worker posts it once, as its first act */
	struct worker_list free_protected, free_helpers;
	struct job_list running;    /* newest first */
	struct job_list waiting;    /* requests held for any slot, FIFO */
	unsigned nwaiting;
	unsigned long next_serial;
	bool helpers_idle;          /* SCHED_IDLE actually in force */

	struct msg_queue admissions;
	pthread_cond_t admit_cv;    /* an admission, or a kill timer changed */
	pthread_t admit_thread;

	pthread_cond_t expand_cv;
	bool expand_kick;
	pthread_t expand_thread;
	/* Settlements and destroys collected on a thread that must not run
	 * plugin code (the transport's): the expansion thread runs them. */
	struct deferred orphans;

	struct msg_queue help_requests;
	struct job_queue ready;     /* jobs with control messages to handle */
	pthread_cond_t control_cv;
	pthread_t dispatchers[DISPATCHERS_MAX];
	unsigned ndispatchers;

	struct help_entry *help_store; /* best first */
	unsigned nhelp_store, help_store_cap;
	uint64_t help_store_seq;
	struct withdrawn withdrawn[WITHDRAWN_MAX]; /* a ring */
	unsigned nwithdrawn_next;
	/* Masters of help requests published from here (a ring), and who
	 * announces their end (sched_set_withdrawal). */
	struct withdrawn help_published[SCHED_HELP_PUBLISHED_MAX];
	unsigned nhelp_published_next;
	struct announcer announcer;

	pthread_cond_t idle_cv;     /* a job finished */
	_Atomic(struct worker *) finished_helpers; /* no lock: helpers push */
	sem_t reaper_go;
	pthread_t reaper_thread;
	unsigned settling;          /* finished jobs whose message is being settled */

	struct sched_stats st;
};

static inline bool
sched_is_stopping(const struct sched *s)
{
	return s->life >= LIFE_STOPPING;
}

static inline bool
sched_is_quitting(const struct sched *s)
{
	return s->life >= LIFE_QUITTING;
}

static inline uint64_t
ms_to_ns(unsigned ms)
{
	return (uint64_t)ms * 1000000u;
}

/* ---- scheduler.c ---- */
void cond_init_monotonic(pthread_cond_t *cv);
void deadline_to_timespec(uint64_t mono_ns, struct timespec *ts);
void start_thread(pthread_t *th, void *(*fn)(void *), void *arg, const char *name);

/* ---- scheduler_job.c ---- */
void cancel_init(struct occamy_cancel *c);
void cancel_fire(struct occamy_cancel *c);
void defer_settle(struct deferred *d, struct message *m, enum settle_outcome o,
		  const char *reason);
void defer_destroy(struct deferred *d, struct task *t);
void deferred_run(struct deferred *d);
void count_settlement(struct sched *s, enum settle_outcome o);
struct job *job_new(struct sched *s, struct task *t, struct message *m,
		    enum job_kind kind, unsigned long root);
void job_unref(struct sched *s, struct job *j, struct deferred *d);
void job_cancel(struct job *j);
void job_start(struct sched *s, struct job *j, unsigned i);
void job_start_held(struct sched *s, struct job *j, unsigned i, struct sched_held_wakeups *held);
void worker_put(struct sched *s, struct worker *w);
unsigned count_empty(const struct sched *s, int *first);
void slot_release(struct sched *s, unsigned i);
void unstarted_requeue(struct sched *s, struct job *p, const char *reason,
		       struct deferred *d);
void pending_requeue(struct sched *s, unsigned i, const char *reason,
		     struct deferred *d);
enum settle_outcome outcome_of(enum occamy_status st, bool cancelled);
const char *status_reason(enum occamy_status st);
enum occamy_status make_task(struct sched *s, const struct message *m, bool is_help,
			     struct task **t, char *reason, size_t len);

/* ---- scheduler_admit.c ---- */
void *admission_main(void *arg);
uint64_t waiting_expire(struct sched *s, const char *all_reason, struct deferred *d);
struct message *msgq_pop(struct msg_queue *q);
void msgq_push(struct msg_queue *q, struct message *m);

/* What admission does with a request that has its task.  Pure: it reads
 * the slots and nothing else, so unit tests call it without threads. */
enum admit_action {
	ADMIT_START,   /* into the empty slot .slot */
	ADMIT_PREEMPT, /* stop the helper in slot .slot and take it */
	ADMIT_WAIT,    /* hold it until a slot frees or its hold is over */
};

struct admit_decision {
	enum admit_action action;
	int slot;      /* -1 for ADMIT_WAIT */
};

struct admit_decision admit_decide(const struct slot *slots, unsigned nslots,
				   bool stopping);

/* ---- scheduler_worker.c ---- */
void *worker_main(void *arg);
void *helper_main(void *arg);
void *reaper_main(void *arg);
void helper_stop(struct sched *s, struct job *j);

/* ---- scheduler_expand.c ---- */
void *expansion_main(void *arg);
void kick_expansion(struct sched *s);
void kick_expansion_if_useful(struct sched *s);
void help_request_store(struct sched *s, struct message *m);
void help_store_drop(struct sched *s, struct job *j, enum sched_drop_reason why,
		     struct deferred *d);
void help_store_clear(struct sched *s, struct deferred *d);
void master_withdraw(struct sched *s, const char *id, struct deferred *d);
void withdrawn_free(struct sched *s);
char *help_published_take(struct sched *s, const char *id);

/* ---- scheduler_control.c ---- */
void *dispatcher_main(void *arg);
void job_flush_control(struct sched *s, struct job *j, struct deferred *d);

#endif /* OCCAMY_SCHEDULER_IMPL_H */
