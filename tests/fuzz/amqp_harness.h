/*
 * amqp_harness.h - reach the static helpers of daemon/amqp.c without a
 * broker: the fuzz targets include the transport's source file itself, and
 * this header stubs the scheduler entry points it calls.  No socket is ever
 * opened; only pure functions (headers_convert, uri_mask) are driven.
 */
#ifndef OCCAMY_FUZZ_AMQP_HARNESS_H
#define OCCAMY_FUZZ_AMQP_HARNESS_H

#include "../../daemon/amqp.c"

/* The scheduler, as far as amqp.c links against it: never called here. */
void
sched_submit_request(struct sched *s, struct message *m)
{
	(void)s;
	(void)m;
	abort();
}

void
sched_submit_control(struct sched *s, struct message *m)
{
	(void)s;
	(void)m;
	abort();
}

void
sched_cancel_requests(struct sched *s)
{
	(void)s;
}

#endif
