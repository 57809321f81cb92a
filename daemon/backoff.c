/*
 * backoff.c - exponential, capped, jittered reconnect delays (see
 * backoff.h).  Called by the transport's owner thread only.
 */
#include "backoff.h"

void
backoff_init(struct backoff *b, unsigned min_ms, unsigned max_ms, uint64_t seed)
{
	b->min_ms = min_ms > 0 ? min_ms : 1;
	b->max_ms = max_ms >= b->min_ms ? max_ms : b->min_ms;
	b->cur_ms = b->min_ms;
	b->rng = seed != 0 ? seed : 0x9e3779b97f4a7c15u;
}

uint64_t
backoff_random(struct backoff *b)
{
	b->rng ^= b->rng << 13;
	b->rng ^= b->rng >> 7;
	b->rng ^= b->rng << 17;
	return b->rng;
}

unsigned
backoff_now(struct backoff *b)
{
	unsigned ms = b->cur_ms;

	return ms / 2 + (unsigned)(backoff_random(b) % (ms / 2 + 1));
}

unsigned
backoff_next(struct backoff *b)
{
	unsigned delay = backoff_now(b);

	b->cur_ms = b->cur_ms > b->max_ms / 2 ? b->max_ms : b->cur_ms * 2;
	return delay;
}

void
backoff_reset(struct backoff *b)
{
	b->cur_ms = b->min_ms;
}
