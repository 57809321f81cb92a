/*
 * scheduler.h - the slot scheduler: admission, preemption, expansion, control
 * routing and shutdown.  Knows nothing of AMQP or dlopen: it sees messages
 * through struct message and tasks through struct task.
 */
#ifndef OCCAMY_SCHEDULER_H
#define OCCAMY_SCHEDULER_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <occamy/plugin.h>

/* How a message is finally settled with the broker. */
enum settle_outcome {
	SETTLE_ACK,         /* done; reply (if any) is sent first */
	SETTLE_REQUEUE,     /* not our fault: cancelled, no room, shutting down */
	SETTLE_RETRY,       /* internal error: requeue until the delivery limit */
	SETTLE_DEAD_LETTER, /* invalid: reject without requeue, with a reason */
};

struct settlement {
	enum settle_outcome outcome;
	const char *reason;       /* short, for logs and x-occamy-error */
	void *reply;              /* malloc()ed result; the message takes it */
	size_t reply_len;
	const char *content_type; /* may be NULL */
};

struct message;

struct message_ops {
	/* Settle and release the message; called exactly once per message,
	 * from any thread, never with a scheduler lock held. */
	void (*settle)(struct message *m, const struct settlement *s);
};

/* A delivery, as the transport hands it to the scheduler. */
struct message {
	const struct message_ops *ops;
	struct occamy_headers headers;
	const void *body;
	size_t len;
	uint64_t arrival_ns; /* CLOCK_MONOTONIC, when the transport received it */
};

/* The cancel token of a running task.  struct occamy_cancel is opaque to
 * plugins; the host's cancelled()/sleep_ms() read it. */
struct occamy_cancel;
bool cancel_is_set(const struct occamy_cancel *c);
/* Returns true if cancelled before ms elapsed. */
bool cancel_sleep_ms(const struct occamy_cancel *c, uint64_t ms);

/* A task as the scheduler sees it; the plugin layer implements the ops. */
struct task;

struct task_ops {
	enum occamy_status (*run)(struct task *t, const struct occamy_cancel *c,
				  struct occamy_output *out);
	/* NULL if the task cannot expand. */
	size_t (*expand)(struct task *t, size_t n, struct task **helpers);
	/* NULL if the task takes no control messages. */
	void (*handle)(struct task *t, const struct occamy_headers *h,
		       const void *body, size_t len);
	void (*destroy)(struct task *t);
};

struct task {
	const struct task_ops *ops;
	/* Filled by whoever creates the task; owned by the task. */
	char *id;       /* may be NULL */
	char *group;    /* never NULL: handler name if nothing better */
	int64_t deadline_ms;
	int priority;
};

/* Turns messages into tasks (the plugin router, or a fake in tests).
 * Returns OCCAMY_OK and *out, or an error and a reason in why. */
struct task_source {
	void *ctx;
	enum occamy_status (*make_task)(void *ctx, const struct message *m,
					bool is_help, struct task **out,
					char *why, size_t whylen);
};

enum slot_status {
	SLOT_EMPTY,
	SLOT_PROTECTED,
	SLOT_INTERNAL,
	SLOT_EXTERNAL,
	SLOT_STATUS_COUNT
};

const char *slot_status_name(enum slot_status s);

/* What a job is.  A slot running a job shows its kind as its status, so
 * the values are the same. */
enum job_kind {
	JOB_PROTECTED = SLOT_PROTECTED, /* a request, settled when it returns */
	JOB_INTERNAL = SLOT_INTERNAL,   /* a helper from a local task's expand() */
	JOB_EXTERNAL = SLOT_EXTERNAL,   /* an external helper, from a help request */
};

const char *job_kind_name(enum job_kind k);

static inline enum slot_status
slot_status_of(enum job_kind k)
{
	return (enum slot_status)k;
}

enum helper_priority {
	HELPER_PRIORITY_IDLE,   /* helpers on SCHED_IDLE threads; no kill wait */
	HELPER_PRIORITY_NORMAL, /* helpers share the CPU; admission waits */
};

struct sched_config {
	unsigned slots;
	unsigned expansion_period_ms;
	unsigned expansion_slot_buffer;
	unsigned kill_timeout_ms;
	unsigned shutdown_grace_ms;
	const char *header_task_id;
	unsigned external_queue_max;
	unsigned external_ttl_ms;
	enum helper_priority helper_priority;
};

/* Counters and timings for monitoring; a consistent snapshot. */
enum sched_drop_reason { DROP_FULL, DROP_EXPIRED, DROP_SHUTDOWN, DROP_WITHDRAWN,
			 DROP_REASON_COUNT };

/* Control messages a task may have waiting for its handle(); one more is
 * dead-lettered. */
#define SCHED_CONTROL_BACKLOG_MAX 256

#define SCHED_LATENCY_BUCKETS 12
extern const double sched_latency_bounds_s[SCHED_LATENCY_BUCKETS];

struct sched_stats {
	unsigned slots;
	unsigned by_status[SLOT_STATUS_COUNT];
	unsigned stuck;      /* slots (or draining helpers) past kill_timeout */
	unsigned draining;   /* cancelled helpers still returning */
	unsigned external_queued;
	unsigned waiting;    /* requests held for a slot (or through shutdown) */
	uint64_t requests;            /* requests handed to the scheduler */
	uint64_t admitted;
	uint64_t preemptions;
	uint64_t requeued_no_room;
	uint64_t requeued_kill_timeout;
	uint64_t settled[4];          /* by enum settle_outcome */
	uint64_t make_task_errors;
	uint64_t expansions[SLOT_STATUS_COUNT]; /* helpers started, by job kind */
	uint64_t external_drops[DROP_REASON_COUNT];
	uint64_t helper_errors;       /* unprotected tasks that failed */
	uint64_t control_routed;      /* control messages matched to >= 1 task */
	uint64_t control_unmatched;
	uint64_t control_invalid;
	uint64_t control_dropped;     /* dead-lettered: a task's backlog was full */
	uint64_t completed;           /* tasks that returned, any kind */
	/* request arrival -> protected task running, histogram and sum */
	uint64_t admit_latency_buckets[SCHED_LATENCY_BUCKETS + 1];
	double admit_latency_sum_s;
	uint64_t admit_latency_count;
	double busy_task_seconds;     /* summed protected task run time */
	uint64_t protected_completed; /* protected tasks that returned */
};

struct sched;

/* Per-slot view for `occamyctl top` and tests. */
struct slot_view {
	enum slot_status status;
	bool stuck;
	char group[64];
	char task_id[64];
	double age_s;
};

/* Hooks for observers (metrics, test recorders).  Called without locks. */
struct sched_observer {
	void *ctx;
	void (*task_done)(void *ctx, const char *group, enum job_kind kind,
			  enum occamy_status result, double seconds);
};

struct sched *sched_new(const struct sched_config *cfg,
			const struct task_source *src,
			const struct sched_observer *obs);
/* Stops (if not yet) and frees.  Slot threads still wedged in a plugin are
 * detached and left to the process exit. */
void sched_free(struct sched *s);

/* Tunables that may change at runtime (SIGHUP). Slots cannot change. */
void sched_reconfigure(struct sched *s, const struct sched_config *cfg);

/* Hand over a request; never blocks on a slot.  The scheduler owns m from
 * here and settles it exactly once. */
void sched_submit_request(struct sched *s, struct message *m);

/* Slot workers whose wake-up the caller holds back until it is done with a
 * batch of requests: the transport hands out every request of a loop turn,
 * then wakes their workers, so that a woken worker does not preempt it in
 * the middle of its frames (and wait for the scheduler lock it holds).
 * Owned by the one thread that submits with it. */
#define SCHED_HELD_MAX 64
struct sched_held_wakeups {
	unsigned n;
	pthread_cond_t *cv[SCHED_HELD_MAX];
};
/* sched_submit_request, but a slot worker it starts is woken by
 * sched_wake_held(held), which the caller must call before it sleeps. */
void sched_submit_request_held(struct sched *s, struct message *m,
			       struct sched_held_wakeups *held);
/* Wake the workers held; no lock needed (each worker re-checks its job
 * under the scheduler lock, so a late wake-up is never a lost one). */
void sched_wake_held(struct sched_held_wakeups *held);

/* Hand over a control message (with or without task ID); settled once. */
void sched_submit_control(struct sched *s, struct message *m);

/* WITHDRAWAL (occamy/plugin.h), sent by the daemon.  A task published a
 * help request naming master_id (OCCAMY_HEADER_MASTER); the scheduler
 * remembers it (for external_ttl_ms, at most SCHED_HELP_PUBLISHED_MAX ids).
 * When a protected task with that ID ends with a final settlement (ack or
 * dead letter, never a requeue or retry: it may run again under the same
 * ID), the scheduler calls announce(ctx, master_id) once, without its lock,
 * on the thread that finished the task; announce publishes the daemon-level
 * "done" control message that makes every server drop the help.  Set it
 * once the transport exists; NULL stops announcing. */
#define SCHED_HELP_PUBLISHED_MAX 256
typedef void (*sched_announce_fn)(void *ctx, const char *master_id);
void sched_set_withdrawal(struct sched *s, sched_announce_fn announce, void *ctx);
void sched_note_help_published(struct sched *s, const char *master_id);

/* Run an expansion pass now (also runs by itself). */
void sched_expand_now(struct sched *s);

/* The broker connection was lost: the broker requeues every unacked
 * request, so cancel all protected tasks (their settlements are stale). */
void sched_cancel_requests(struct sched *s);

/* Graceful stop: requeue new arrivals, cancel helpers, let protected tasks
 * run up to shutdown_grace, then cancel them.  Blocks until all slot threads
 * are idle or kill_timeout past the grace.  Idempotent. */
void sched_shutdown(struct sched *s);

void sched_get_stats(struct sched *s, struct sched_stats *out);
/* Fills up to n views; returns the number of slots. */
unsigned sched_get_slots(struct sched *s, struct slot_view *v, unsigned n);

/* Scheduling policy (SCHED_OTHER, SCHED_IDLE...) of the thread running the
 * task in this slot, or -1 if the slot is empty. */
int sched_slot_thread_policy(struct sched *s, unsigned slot);

/* Policy of helper threads actually in force (for the start-up log line). */
const char *sched_helper_mode(const struct sched *s);

#endif /* OCCAMY_SCHEDULER_H */
