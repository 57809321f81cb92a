/*
 * backoff.h - how long to wait before the next connection attempt:
 * exponential with a cap, jittered so that a fleet that lost its broker
 * does not come back in step.  Plain state, no clock, no locks: the caller
 * (the transport's owner thread) owns one.
 */
#ifndef OCCAMY_BACKOFF_H
#define OCCAMY_BACKOFF_H

#include <stdint.h>

struct backoff {
	unsigned min_ms, max_ms;
	unsigned cur_ms; /* the next delay before jitter */
	uint64_t rng;    /* xorshift64 state, never 0 */
};

void backoff_init(struct backoff *b, unsigned min_ms, unsigned max_ms, uint64_t seed);
/* The delay to wait now, in [cur/2, cur]; then cur doubles up to max. */
unsigned backoff_next(struct backoff *b);
/* The current delay, jittered, without growing it (the first attempt
 * after a loss). */
unsigned backoff_now(struct backoff *b);
/* Start over from min (after a connection that stayed up). */
void backoff_reset(struct backoff *b);
/* A number from the jitter generator, for other spreads (node choice). */
uint64_t backoff_random(struct backoff *b);

#endif /* OCCAMY_BACKOFF_H */
