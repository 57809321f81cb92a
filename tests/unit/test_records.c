/*
 * test_records.c - record keeping in a state_dir (daemon/records.c): what a
 * run that died leaves is read back by the next, a torn record is ignored,
 * a clean stop leaves nothing, and one state_dir serves one daemon.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "records.h"

static char dir[64];

static int
make_dir(void **state)
{
	(void)state;
	snprintf(dir, sizeof(dir), "/tmp/occamy-records-XXXXXX");
	assert_non_null(mkdtemp(dir));
	return 0;
}

static int
remove_dir(void **state)
{
	char cmd[128];

	(void)state;
	snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
	return system(cmd) == 0 ? 0 : -1;
}

static void
info(struct record_info *ri, const char *handler, const char *id)
{
	memset(ri, 0, sizeof(*ri));
	snprintf(ri->handler, sizeof(ri->handler), "%s", handler);
	snprintf(ri->task_id, sizeof(ri->task_id), "%s", id);
	snprintf(ri->fingerprint, sizeof(ri->fingerprint), "fp-%s", id);
	ri->started_ms = 1000;
}

/* A child takes the dir, starts n requests, ends the first, and dies
 * without closing: a crash. */
static void
crash_with(unsigned n)
{
	pid_t pid = fork();

	assert_true(pid >= 0);
	if (pid == 0) {
		struct crash_report rep;
		struct records *r = records_open(dir, 8, "test.ini", 2, &rep);
		struct record_info ri;
		char id[16];
		int first = -1;

		if (r == NULL)
			_exit(2);
		for (unsigned i = 0; i < n + 1; i++) {
			snprintf(id, sizeof(id), "t%u", i);
			info(&ri, "sleep", id);
			int slot = records_begin(r, &ri);
			if (i == 0)
				first = slot;
		}
		records_end(r, first); /* settled before the crash */
		_exit(0);
	}
	int st;
	assert_int_equal(waitpid(pid, &st, 0), pid);
	assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 0);
}

static void
test_a_crash_leaves_what_was_in_hand_and_the_next_start_reads_it(void **state)
{
	struct crash_report rep;
	struct records *r;

	(void)state;
	crash_with(2);
	r = records_open(dir, 8, "test.ini", 2, &rep);
	assert_non_null(r);
	assert_true(rep.crashed);
	assert_int_equal(rep.crashes_total, 1);
	assert_int_equal(rep.ntasks, 2);
	assert_string_equal(rep.tasks[0].task_id, "t1");
	assert_string_equal(rep.tasks[1].task_id, "t2");
	assert_string_equal(rep.tasks[0].handler, "sleep");
	assert_int_equal(rep.torn, 0);
	crash_report_free(&rep);
	/* A clean stop leaves nothing to report, and the count stays. */
	records_close(r);
	r = records_open(dir, 8, "test.ini", 2, &rep);
	assert_non_null(r);
	assert_false(rep.crashed);
	assert_int_equal(rep.ntasks, 0);
	assert_int_equal(rep.crashes_total, 1);
	records_close(r);
	crash_report_free(&rep);
}

static void
test_a_record_torn_in_the_middle_of_a_write_is_ignored(void **state)
{
	struct crash_report rep;
	struct records *r;
	char path[128];
	int fd;

	(void)state;
	crash_with(3);
	/* Half of record 2 rewritten, as a crash (or power loss) in the middle
	 * of its write would leave it. */
	snprintf(path, sizeof(path), "%s/tasks", dir);
	fd = open(path, O_RDWR);
	assert_true(fd >= 0);
	assert_int_equal(pwrite(fd, "garbage!", 8, 2 * 512 + 40), 8);
	close(fd);
	r = records_open(dir, 8, "test.ini", 2, &rep);
	assert_non_null(r);
	assert_true(rep.crashed);
	assert_int_equal(rep.ntasks, 2);
	assert_int_equal(rep.torn, 1);
	assert_string_equal(rep.tasks[0].task_id, "t1");
	assert_string_equal(rep.tasks[1].task_id, "t3");
	records_close(r);
	crash_report_free(&rep);
}

static void
test_one_state_dir_serves_one_daemon(void **state)
{
	struct crash_report rep, rep2;
	struct records *r = records_open(dir, 4, "a.ini", 1, &rep);
	pid_t pid;
	int st;

	(void)state;
	assert_non_null(r);
	pid = fork();
	if (pid == 0) {
		/* Another process: the lock is held. */
		_exit(records_open(dir, 4, "b.ini", 1, &rep2) == NULL ? 0 : 1);
	}
	assert_int_equal(waitpid(pid, &st, 0), pid);
	assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 0);
	/* Full: every slot taken, then -1, not an overwrite. */
	struct record_info ri;
	info(&ri, "h", "x");
	for (int i = 0; i < 4; i++)
		assert_int_equal(records_begin(r, &ri), i);
	assert_int_equal(records_begin(r, &ri), -1);
	records_end(r, 2);
	assert_int_equal(records_begin(r, &ri), 2);
	records_close(r);
	crash_report_free(&rep);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup_teardown(
			test_a_crash_leaves_what_was_in_hand_and_the_next_start_reads_it, make_dir,
			remove_dir),
		cmocka_unit_test_setup_teardown(test_a_record_torn_in_the_middle_of_a_write_is_ignored,
						make_dir, remove_dir),
		cmocka_unit_test_setup_teardown(test_one_state_dir_serves_one_daemon, make_dir,
						remove_dir),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
