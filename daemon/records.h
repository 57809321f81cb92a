/*
 * records.h - record keeping in [server] state_dir: what this daemon is and
 * which requests it has in hand, so that after a crash the next start can
 * say what was running and the fleet can tell a crash from a clean stop.
 *
 * Two files per state_dir: "daemon" (text: instance, pid, start, config,
 * slots, state running|stopped, crashes so far; replaced by rename) and
 * "tasks" (fixed 512-byte records, one per request in hand, each with a
 * checksum, so a record torn by a crash in the middle of a write is ignored,
 * never misread).  A lock file keeps two daemons off one state_dir.
 *
 * Threads: records_open() and records_close() on the main thread;
 * records_begin() and records_end() on the transport's owner thread only.
 */
#ifndef OCCAMY_RECORDS_H
#define OCCAMY_RECORDS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define RECORD_FINGERPRINT_MAX 40
#define RECORD_NAME_MAX 128

/* One request in hand. */
struct record_info {
	char fingerprint[RECORD_FINGERPRINT_MAX]; /* message id, or a hash */
	char handler[RECORD_NAME_MAX];
	char task_id[RECORD_NAME_MAX];
	int64_t started_ms;   /* wall clock, when the daemon took it */
	int64_t redeliveries; /* lost with a connection before, as the message said */
};

/* What the previous run of this state_dir left behind. */
struct crash_report {
	bool crashed;            /* it did not stop cleanly */
	long pid;                /* its pid */
	int64_t started_ms;      /* when it started */
	uint64_t crashes_total;  /* crashes of this state_dir, this one included */
	struct record_info *tasks; /* in hand when it died (malloc()ed) */
	size_t ntasks;
	size_t torn;             /* records that failed their CRC: ignored */
};

struct records;

/* Take state_dir (created if missing) for this daemon: read what the
 * previous run left into *report, then start afresh with nslots task
 * records.  NULL (and a logged reason) if the directory cannot be used or
 * another running daemon holds it: the daemon then runs without records. */
struct records *records_open(const char *dir, unsigned nslots, const char *config_path,
			     unsigned slots, struct crash_report *report);
/* A request taken in hand: its slot in the tasks file, or -1 if full. */
int records_begin(struct records *r, const struct record_info *info);
/* ... and settled. */
void records_end(struct records *r, int slot);
/* A clean stop: the daemon file says "stopped", the tasks file is empty. */
void records_close(struct records *r);
void crash_report_free(struct crash_report *report);

#endif /* OCCAMY_RECORDS_H */
