/*
 * ack_window.c - the open delivery tags of one channel and the acks that
 * may cover several of them (see ack_window.h).  Run by the transport's
 * owner thread only.  The window holds at most prefetch tags plus those
 * whose copies await a confirm, so arrays and linear moves are enough.
 */
#include <stdlib.h>
#include <string.h>

#include "ack_window.h"
#include "log.h"

void
ack_window_reset(struct ack_window *w)
{
	w->n = 0;
	w->nmarked = 0;
}

void
ack_window_free(struct ack_window *w)
{
	free(w->tags);
	free(w->marked);
	memset(w, 0, sizeof(*w));
}

bool
ack_window_open(struct ack_window *w, uint64_t tag)
{
	if (w->n > 0 && tag <= w->tags[w->n - 1])
		return false;
	if (w->n == w->cap) {
		w->cap = w->cap ? 2 * w->cap : 64;
		w->tags = xrealloc(w->tags, w->cap * sizeof(*w->tags));
		w->marked = xrealloc(w->marked, w->cap * sizeof(*w->marked));
	}
	w->tags[w->n] = tag;
	w->marked[w->n] = false;
	w->n++;
	return true;
}

/* Index of tag, or w->n if it is not open. */
static size_t
find(const struct ack_window *w, uint64_t tag)
{
	size_t lo = 0, hi = w->n;

	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;
		if (w->tags[mid] < tag)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo < w->n && w->tags[lo] == tag ? lo : w->n;
}

bool
ack_window_mark(struct ack_window *w, uint64_t tag)
{
	size_t i = find(w, tag);

	if (i == w->n)
		return false;
	if (!w->marked[i]) {
		w->marked[i] = true;
		w->nmarked++;
	}
	return true;
}

static void
remove_at(struct ack_window *w, size_t i)
{
	if (w->marked[i])
		w->nmarked--;
	memmove(&w->tags[i], &w->tags[i + 1], (w->n - i - 1) * sizeof(*w->tags));
	memmove(&w->marked[i], &w->marked[i + 1], (w->n - i - 1) * sizeof(*w->marked));
	w->n--;
}

void
ack_window_close(struct ack_window *w, uint64_t tag)
{
	size_t i = find(w, tag);

	if (i < w->n)
		remove_at(w, i);
}

size_t
ack_window_take(struct ack_window *w, struct ack_send *out, size_t max)
{
	size_t prefix = 0, k = 0, i, j;

	if (w->nmarked == 0 || max == 0)
		return 0;
	while (prefix < w->n && w->marked[prefix])
		prefix++;
	if (prefix > 0) {
		/* One ack for the whole run: every tag below it is settled
		 * (closed before, or in this run). */
		out[k++] = (struct ack_send){w->tags[prefix - 1], prefix > 1};
		w->nmarked -= prefix;
		w->n -= prefix;
		memmove(w->tags, w->tags + prefix, w->n * sizeof(*w->tags));
		memmove(w->marked, w->marked + prefix, w->n * sizeof(*w->marked));
	}
	/* The rest one by one, compacting the open tags that stay. */
	for (i = 0, j = 0; i < w->n; i++) {
		if (w->marked[i] && k < max) {
			out[k++] = (struct ack_send){w->tags[i], false};
			w->nmarked--;
			continue;
		}
		w->tags[j] = w->tags[i];
		w->marked[j] = w->marked[i];
		j++;
	}
	w->n = j;
	return k;
}
