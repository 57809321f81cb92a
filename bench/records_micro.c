/*
 * records_micro.c - the cost of record keeping alone: records_begin() +
 * records_end() (daemon/records.c) for one request, in a loop, in a
 * throwaway state_dir.  bench/bench_records.py runs it beside the
 * end-to-end drains.
 *
 *   records_micro [N]     prints "<microseconds> us per request"
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "clock.h"
#include "records.h"

int
main(int argc, char **argv)
{
	char dir[] = "/tmp/occamy-records-micro-XXXXXX", cmd[128];
	long n = argc > 1 ? atol(argv[1]) : 2000000;
	struct crash_report rep;
	struct record_info ri;
	struct records *r;
	uint64_t t0, t1;

	if (mkdtemp(dir) == NULL || (r = records_open(dir, 5, "micro.ini", 2, &rep)) == NULL)
		return 1;
	memset(&ri, 0, sizeof(ri));
	snprintf(ri.handler, sizeof(ri.handler), "noop");
	snprintf(ri.fingerprint, sizeof(ri.fingerprint), "fnv-0123456789abcdef");
	t0 = clock_now_ns();
	for (long i = 0; i < n; i++)
		records_end(r, records_begin(r, &ri));
	t1 = clock_now_ns();
	printf("%.3f us per request\n", (double)(t1 - t0) / (double)n / 1000.0);
	records_close(r);
	crash_report_free(&rep);
	snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
	return system(cmd) == 0 ? 0 : 1;
}
