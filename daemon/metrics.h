/*
 * metrics.h - what the daemon tells operators: the Prometheus endpoint
 * (libmicrohttpd), the Erlang intensity over a sliding window, per-group
 * task histograms, and the summary for systemd's STATUS= line.
 */
#ifndef OCCAMY_METRICS_H
#define OCCAMY_METRICS_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "scheduler.h"

struct config;
struct metrics;
struct transport;

/* One sample of cumulative counters, taken every sample period. */
struct erlang_sample {
	double t;              /* seconds, monotonic */
	uint64_t arrivals;     /* requests handed to the scheduler */
	uint64_t completions;  /* protected tasks that returned */
	double busy_s;         /* their summed run time */
};

/* Erlang intensity between two samples: arrival rate x mean service time /
 * slots.  Mean service time comes from the window, or from fallback_mean_s
 * when nothing completed in it.  0 when undefined. */
double erlang_intensity(const struct erlang_sample *oldest,
			const struct erlang_sample *newest, unsigned slots,
			double fallback_mean_s);

struct metrics *metrics_new(const struct config *cfg);
const struct sched_observer *metrics_observer(struct metrics *m);
void metrics_attach(struct metrics *m, struct sched *s);
void metrics_attach_transport(struct metrics *m, struct transport *t);
struct crash_report;
/* What the previous run left (records.h): occamy_crashes_total and the
 * suspects.  Before metrics_start(). */
void metrics_set_crash_report(struct metrics *m, const struct crash_report *rep);
/* Start the HTTP endpoint if [metrics] listen is set; 0 on success or off. */
int metrics_start(struct metrics *m);
/* Call about once a second: takes a window sample every sample period. */
void metrics_sample(struct metrics *m);
/* "; protected 0.25; intensity 0.41" for STATUS=. */
void metrics_status_suffix(struct metrics *m, char *buf, size_t len);
/* The whole exposition text. */
void metrics_render(struct metrics *m, FILE *out);
void metrics_stop(struct metrics *m);
void metrics_free(struct metrics *m);

#endif /* OCCAMY_METRICS_H */
