/*
 * ack_window.h - which delivery tags of one channel may be acked together.
 *
 * The transport acks on its owner thread only; it used to send one
 * basic.ack per request.  An ack with `multiple` covers every unacked tag
 * up to the one named, so it may be used only over a run of tags that are
 * all settled: a tag still running must never be covered.  The window
 * holds the open tags of one channel (delivered, neither acked nor
 * rejected yet), in delivery order, each marked once its ack is decided;
 * at the end of a loop turn the transport takes the acks to send: one
 * `multiple` ack over the marked prefix, single acks for marked tags after
 * the first unmarked one.  Pure: no AMQP, no lock (one thread owns it).
 */
#ifndef OCCAMY_ACK_WINDOW_H
#define OCCAMY_ACK_WINDOW_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct ack_window {
	uint64_t *tags;    /* open tags, increasing */
	bool *marked;      /* marked[i]: tags[i]'s ack is decided */
	size_t n, cap;
	size_t nmarked;
};

/* An ack to send: tag, and whether it covers every open tag up to it. */
struct ack_send {
	uint64_t tag;
	bool multiple;
};

/* A new connection: forget every tag (the old ones died with it). */
void ack_window_reset(struct ack_window *w);
void ack_window_free(struct ack_window *w);
/* A delivery arrived: tags grow on a channel, so it goes last.  Returns
 * false if tag is not above the last one (then the caller acks it alone). */
bool ack_window_open(struct ack_window *w, uint64_t tag);
/* Its ack is decided; false if tag is not open (then ack it alone). */
bool ack_window_mark(struct ack_window *w, uint64_t tag);
/* It was rejected (or acked) alone: no longer open. */
void ack_window_close(struct ack_window *w, uint64_t tag);
/* The acks to send now, at most max of them in out (the first may be a
 * `multiple` one); those returned are closed.  Returns how many. */
size_t ack_window_take(struct ack_window *w, struct ack_send *out, size_t max);

#endif
