/*
 * clock.h - the daemon's one clock: monotonic nanoseconds for intervals and
 * deadlines, wall-clock milliseconds for deadlines that cross servers.
 * Any thread.  A link seam: a test that wants a fake clock links its own
 * definitions instead of clock.o (today every unit test links clock.o).
 */
#ifndef OCCAMY_CLOCK_H
#define OCCAMY_CLOCK_H

#include <stdint.h>

/* CLOCK_MONOTONIC, in nanoseconds. */
uint64_t clock_now_ns(void);
/* CLOCK_REALTIME, in milliseconds since the epoch. */
int64_t clock_wall_ms(void);

#endif /* OCCAMY_CLOCK_H */
