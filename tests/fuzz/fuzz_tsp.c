/*
 * fuzz_tsp.c - libFuzzer target for the TSP plugin's wire decoders
 * (plugins/tsp/codec.c and tsplib.c): the JSON request/help body, the
 * TSPLIB text body, TSPLIB tours and the "tour LEN N ..." reports that
 * assistants send to their master.  The first byte picks the decoder; the
 * rest is the body.  Whatever parses is then used the way plugin.c uses it
 * (distances, tour length, re-encoding), so a decoder that lets a bad value
 * through shows up as a sanitizer report.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "tsp.h"

#define FUZZ_MAX_N 64 /* small: prepare() builds an n*n matrix */

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void
use_instance(struct tsp_instance *in)
{
	int *tour;
	int64_t len;
	struct tsp_buf b = {0};

	if (in->n < 1 || in->n > FUZZ_MAX_N)
		abort();
	tsp_instance_prepare(in);
	tour = malloc(sizeof(*tour) * (size_t)in->n);
	if (tour == NULL)
		abort();
	for (int i = 0; i < in->n; i++)
		tour[i] = in->n - 1 - i;
	if (tsp_tour_check(in->n, tour) != 0)
		abort();
	len = tsp_tour_length(in, tour);
	if (len < 0)
		abort();
	tsp_report_format(&b, in->n, tour, len);
	{
		/* Our own report must parse back to the same tour. */
		int *back = malloc(sizeof(*back) * (size_t)in->n);
		int64_t claimed;
		if (back == NULL)
			abort();
		if (tsp_report_parse(b.p, b.len, in->n, back, &claimed) != 0 || claimed != len ||
		    memcmp(back, tour, sizeof(*tour) * (size_t)in->n) != 0)
			abort();
		free(back);
	}
	tsp_buf_free(&b);
	tsp_json_help(&b, in, "fuzz-master", 1, 42);
	tsp_buf_free(&b);
	free(tour);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char err[256];
	const char *body;
	size_t len;

	if (size < 1)
		return 0;
	body = (const char *)data + 1;
	len = size - 1;
	err[0] = '\0';
	switch (data[0] % 5) {
	case 0: {
		struct tsp_json_request r;
		if (tsp_json_parse_request(&r, body, len, FUZZ_MAX_N, err, sizeof(err)) == 0) {
			if (r.master[0] != '\0' && !tsp_id_ok(r.master, strlen(r.master)))
				abort();
			use_instance(&r.inst);
			tsp_instance_free(&r.inst);
		} else if (err[0] == '\0') {
			abort(); /* every refusal says why */
		}
		break;
	}
	case 1: {
		struct tsp_instance in;
		memset(&in, 0, sizeof(in));
		if (tsp_parse_tsplib(&in, body, len, FUZZ_MAX_N, err, sizeof(err)) == 0) {
			use_instance(&in);
			tsp_instance_free(&in);
		} else if (err[0] == '\0') {
			abort();
		}
		break;
	}
	case 2: {
		/* A tour for an n-city instance, n from the second byte. */
		int n, tour[FUZZ_MAX_N];
		if (len < 1)
			break;
		n = 1 + (uint8_t)body[0] % FUZZ_MAX_N;
		if (tsp_parse_tour(body + 1, len - 1, n, tour, err, sizeof(err)) == 0 &&
		    tsp_tour_check(n, tour) != 0)
			abort(); /* a parsed tour is a permutation */
		break;
	}
	case 3: {
		int n, tour[FUZZ_MAX_N];
		int64_t claimed;
		if (len < 1)
			break;
		n = 1 + (uint8_t)body[0] % FUZZ_MAX_N;
		if (tsp_report_parse(body + 1, len - 1, n, tour, &claimed) == 0) {
			for (int i = 0; i < n; i++)
				if (tour[i] < 0 || tour[i] >= n)
					abort();
			if (claimed < 0)
				abort();
		}
		break;
	}
	case 4:
		(void)tsp_id_ok(body, len);
		break;
	}
	return 0;
}
