/*
 * tsp.h - the TSP plugin's private interfaces: instances and TSPLIB
 * distances (tsplib.c), the iterated local search (search.c), JSON and text
 * codecs (codec.c).  plugin.c glues them to occamy.  Every external name
 * starts with tsp_ so the unit test can link these files with the daemon.
 */
#ifndef OCCAMY_TSP_H
#define OCCAMY_TSP_H

#include <stddef.h>
#include <stdint.h>

/* Internal to the plugin: keep these out of the .so's dynamic symbols. */
#pragma GCC visibility push(hidden)

#define TSP_MAX_CITIES_DEFAULT 20000
#define TSP_COORD_LIMIT 1e8  /* |x|, |y| bound: keeps every distance in an int */
#define TSP_MATRIX_MAX 1500  /* full distance matrix up to this many cities */
#define TSP_NAME_MAX 64
#define TSP_ID_MAX 100       /* longest task ID of a master */

/* TSPLIB95 EDGE_WEIGHT_TYPEs we understand (all from NODE_COORD_SECTION). */
enum tsp_weight {
	TSP_EUC_2D,
	TSP_CEIL_2D,
	TSP_ATT,
	TSP_GEO,
};

struct tsp_instance {
	char name[TSP_NAME_MAX]; /* NAME, without a ".tsp" suffix; may be "" */
	enum tsp_weight type;
	int n;
	double *x, *y;      /* as given; GEO: x = latitude, y = longitude */
	double *lat, *lon;  /* GEO only: radians, per TSPLIB */
	int64_t optimum;    /* known optimal length, or -1 */
	int *matrix;        /* n*n distances when n <= TSP_MATRIX_MAX, else NULL */
};

/* tsplib.c */
const char *tsp_weight_name(enum tsp_weight w);
int tsp_weight_parse(const char *s, enum tsp_weight *out);
/* Parse a TSPLIB TSP file held in text[0..len) (any bytes).  Returns 0, or
 * -1 with a reason in err. */
int tsp_parse_tsplib(struct tsp_instance *in, const char *text, size_t len, int max_n,
		     char *err, size_t errlen);
/* Parse a TSPLIB TOUR file for an n-city instance into tour[0..n) (0-based). */
int tsp_parse_tour(const char *text, size_t len, int n, int *tour, char *err,
		   size_t errlen);
/* Set up an instance from coordinates (copied); derives GEO radians. */
int tsp_instance_init(struct tsp_instance *in, const char *name, enum tsp_weight type,
		      int n, const double *x, const double *y, char *err, size_t errlen);
void tsp_instance_copy(struct tsp_instance *dst, const struct tsp_instance *src);
/* Build the distance matrix (if small enough); call before searching. */
void tsp_instance_prepare(struct tsp_instance *in);
void tsp_instance_free(struct tsp_instance *in);
int tsp_dist_compute(const struct tsp_instance *in, int i, int j);
int64_t tsp_tour_length(const struct tsp_instance *in, const int *tour);
/* 0 if tour[0..n) is a permutation of 0..n-1. */
int tsp_tour_check(int n, const int *tour);
/* Published optimum of a TSPLIB instance by name and size, or -1. */
int64_t tsp_known_optimum(const char *name, int n);

static inline int
tsp_dist(const struct tsp_instance *in, int i, int j)
{
	if (in->matrix != NULL)
		return in->matrix[(size_t)i * (size_t)in->n + (size_t)j];
	return tsp_dist_compute(in, i, j);
}

/* search.c: iterated local search (2-opt + Or-opt with neighbour lists and
 * don't-look bits, segment-swap double-bridge kicks). */
struct tsp_search;

enum tsp_start {
	TSP_START_GREEDY, /* greedy edge matching: the best cheap start */
	TSP_START_NN,     /* nearest neighbour from a random city: diversity */
};

struct tsp_hooks {
	/* Non-zero to stop now; polled about every millisecond of work. */
	int (*stop)(void *arg);
	/* Called between kicks, when the tour is the best so far: the place to
	 * report it and adopt better tours (tsp_search_adopt).  May be NULL. */
	void (*sync)(void *arg, struct tsp_search *s);
	void *arg;
};

/* The instance must outlive the search and be prepared. */
struct tsp_search *tsp_search_new(const struct tsp_instance *in, uint64_t seed,
				  enum tsp_start start);
void tsp_search_free(struct tsp_search *s);
/* Search until hooks->stop, max_iterations kicks (0: no limit) or a tour of
 * length target (-1: none).  Resumable.  Returns the best length. */
int64_t tsp_search_run(struct tsp_search *s, const struct tsp_hooks *hooks,
		       uint64_t max_iterations, int64_t target);
int64_t tsp_search_length(const struct tsp_search *s);
const int *tsp_search_tour(const struct tsp_search *s);
uint64_t tsp_search_iterations(const struct tsp_search *s);
/* Take tour (validated by the caller) if it is shorter than ours. */
int tsp_search_adopt(struct tsp_search *s, const int *tour, int64_t len);

/* codec.c: bounded parsers for what arrives over the wire, and a growable
 * text buffer for what leaves. */
struct tsp_buf {
	char *p;
	size_t len, cap;
};

void tsp_buf_printf(struct tsp_buf *b, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));
void tsp_buf_json_string(struct tsp_buf *b, const char *s);
void tsp_buf_free(struct tsp_buf *b);

/* A JSON request or help body. */
#define TSP_ASSISTANTS_MAX 64 /* most protected assistants one master asks */

struct tsp_json_request {
	struct tsp_instance inst;
	int64_t budget_ms;     /* -1: absent */
	int has_seed;
	uint64_t seed;
	uint64_t iterations;   /* 0: absent */
	char master[TSP_ID_MAX + 1]; /* help bodies only; "" if absent */
	int64_t deadline_ms;   /* help bodies only; -1 if absent */
	int64_t min_assistants; /* -1: absent */
	int64_t target_length;  /* -1: absent */
};

/* 1 if s[0..len) is a usable task ID: it goes into JSON and text bodies,
 * so visible ASCII without quote or backslash, 1..TSP_ID_MAX bytes. */
int tsp_id_ok(const char *s, size_t len);

int tsp_json_parse_request(struct tsp_json_request *r, const char *text, size_t len,
			   int max_n, char *err, size_t errlen);
/* Help body: everything an assistant on another server needs. */
void tsp_json_help(struct tsp_buf *b, const struct tsp_instance *in, const char *master,
		   int64_t deadline_ms, uint64_t seed);
/* Tour reports between master and assistants: "tour LEN N c0 c1 ...". */
void tsp_report_format(struct tsp_buf *b, int n, const int *tour, int64_t len);
int tsp_report_parse(const char *text, size_t len, int n, int *tour, int64_t *claimed);

#pragma GCC visibility pop

#endif /* OCCAMY_TSP_H */
