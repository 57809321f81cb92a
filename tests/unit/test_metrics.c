/*
 * test_metrics.c - the Erlang intensity against hand-computed values for a
 * synthetic arrival/service trace, and the exposition text of a scheduler
 * driven through a known sequence.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "log.h"
#include "metrics.h"

static void
test_intensity_is_arrival_rate_times_service_time_over_slots(void **state)
{
	/* 10 s window: 20 requests arrived (2/s), 10 finished using 40 s of
	 * slot time (4 s each), 8 slots: 2 * 4 / 8 = 1.0. */
	struct erlang_sample a = {.t = 100, .arrivals = 5, .completions = 3, .busy_s = 12};
	struct erlang_sample b = {.t = 110, .arrivals = 25, .completions = 13, .busy_s = 52};

	(void)state;
	assert_true(fabs(erlang_intensity(&a, &b, 8, 0) - 1.0) < 1e-9);
	/* Same trace on 16 slots: half as intense. */
	assert_true(fabs(erlang_intensity(&a, &b, 16, 0) - 0.5) < 1e-9);
}

static void
test_intensity_uses_fallback_service_time_when_nothing_finished(void **state)
{
	/* 3 arrivals in 6 s (0.5/s), no completion: mean 2 s from history,
	 * 4 slots: 0.5 * 2 / 4 = 0.25. */
	struct erlang_sample a = {.t = 0, .arrivals = 0, .completions = 7, .busy_s = 14};
	struct erlang_sample b = {.t = 6, .arrivals = 3, .completions = 7, .busy_s = 14};

	(void)state;
	assert_true(fabs(erlang_intensity(&a, &b, 4, 2.0) - 0.25) < 1e-9);
	assert_true(erlang_intensity(&a, &b, 4, 0) == 0);
}

static void
test_intensity_is_zero_for_an_empty_or_degenerate_window(void **state)
{
	struct erlang_sample a = {.t = 5, .arrivals = 1, .completions = 1, .busy_s = 1};

	(void)state;
	assert_true(erlang_intensity(&a, &a, 4, 1) == 0);
	assert_true(erlang_intensity(&a, &a, 0, 1) == 0);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_intensity_is_arrival_rate_times_service_time_over_slots),
		cmocka_unit_test(test_intensity_uses_fallback_service_time_when_nothing_finished),
		cmocka_unit_test(test_intensity_is_zero_for_an_empty_or_degenerate_window),
	};

	log_init(-1);
	return cmocka_run_group_tests(tests, NULL, NULL);
}
