/*
 * tsplib.c - TSP instances: the TSPLIB95 file formats (TSP and TOUR, node
 * coordinates only) and the exact TSPLIB95 distance functions, rounding
 * included, so tour lengths match published optima to the unit.
 *
 * Input may be hostile: parsing works on a private NUL-terminated copy, is
 * bounded by max_n, and every failure says what and where.
 */
#include <ctype.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tsp.h"

/* TSPLIB95 fixes these: its published GEO optima depend on them. */
#define TSPLIB_PI 3.141592
#define TSPLIB_RRR 6378.388

static const char *const lib_weight_names[] = {
	[TSP_EUC_2D] = "EUC_2D",
	[TSP_CEIL_2D] = "CEIL_2D",
	[TSP_ATT] = "ATT",
	[TSP_GEO] = "GEO",
};

/* Published optima (TSPLIB95 STSP.html) of instances people try first. */
static const struct {
	const char *name;
	int n;
	int64_t optimum;
} lib_optima[] = {
	{"burma14", 14, 3323},     {"ulysses16", 16, 6859},   {"ulysses22", 22, 7013},
	{"att48", 48, 10628},      {"eil51", 51, 426},        {"berlin52", 52, 7542},
	{"st70", 70, 675},         {"eil76", 76, 538},        {"pr76", 76, 108159},
	{"rat99", 99, 1211},       {"kroA100", 100, 21282},   {"kroB100", 100, 22141},
	{"kroC100", 100, 20749},   {"kroD100", 100, 21294},   {"kroE100", 100, 22068},
	{"rd100", 100, 7910},      {"eil101", 101, 629},      {"lin105", 105, 14379},
	{"ch130", 130, 6110},      {"ch150", 150, 6528},      {"a280", 280, 2579},
	{"lin318", 318, 42029},    {"pcb442", 442, 50778},    {"att532", 532, 27686},
	{"rat783", 783, 8806},     {"pr1002", 1002, 259045},
};

const char *
tsp_weight_name(enum tsp_weight w)
{
	return lib_weight_names[w];
}

int
tsp_weight_parse(const char *s, enum tsp_weight *out)
{
	size_t i;

	for (i = 0; i < sizeof(lib_weight_names) / sizeof(lib_weight_names[0]); i++)
		if (strcmp(s, lib_weight_names[i]) == 0) {
			*out = (enum tsp_weight)i;
			return 0;
		}
	return -1;
}

int64_t
tsp_known_optimum(const char *name, int n)
{
	size_t i;

	for (i = 0; i < sizeof(lib_optima) / sizeof(lib_optima[0]); i++)
		if (lib_optima[i].n == n && strcmp(lib_optima[i].name, name) == 0)
			return lib_optima[i].optimum;
	return -1;
}

/* TSPLIB's GEO conversion: DDD.MM (degrees, minutes) to radians.  The
 * integer part is truncated, as in TSPLIB's reference code. */
static double
lib_geo_radians(double v)
{
	double deg = (double)(long)v;
	double min = v - deg;

	return TSPLIB_PI * (deg + 5.0 * min / 3.0) / 180.0;
}

int
tsp_dist_compute(const struct tsp_instance *in, int i, int j)
{
	double dx, dy, r, q1, q2, q3, a;
	int t;

	if (i == j)
		return 0;
	switch (in->type) {
	case TSP_EUC_2D:
		dx = in->x[i] - in->x[j];
		dy = in->y[i] - in->y[j];
		return (int)(sqrt(dx * dx + dy * dy) + 0.5);
	case TSP_CEIL_2D:
		dx = in->x[i] - in->x[j];
		dy = in->y[i] - in->y[j];
		return (int)ceil(sqrt(dx * dx + dy * dy));
	case TSP_ATT:
		dx = in->x[i] - in->x[j];
		dy = in->y[i] - in->y[j];
		r = sqrt((dx * dx + dy * dy) / 10.0);
		t = (int)(r + 0.5);
		return t < r ? t + 1 : t;
	case TSP_GEO:
		q1 = cos(in->lon[i] - in->lon[j]);
		q2 = cos(in->lat[i] - in->lat[j]);
		q3 = cos(in->lat[i] + in->lat[j]);
		a = 0.5 * ((1.0 + q1) * q2 - (1.0 - q1) * q3);
		/* Rounding can push a hair past 1 for near-equal points. */
		a = a > 1.0 ? 1.0 : a < -1.0 ? -1.0 : a;
		return (int)(TSPLIB_RRR * acos(a) + 1.0);
	}
	return 0;
}

int64_t
tsp_tour_length(const struct tsp_instance *in, const int *tour)
{
	int64_t len = 0;
	int i;

	for (i = 0; i < in->n; i++)
		len += tsp_dist(in, tour[i], tour[(i + 1) % in->n]);
	return len;
}

int
tsp_tour_check(int n, const int *tour)
{
	unsigned char *seen;
	int i, ok = 0;

	if (n <= 0 || (seen = calloc((size_t)n, 1)) == NULL)
		return -1;
	for (i = 0; i < n; i++) {
		if (tour[i] < 0 || tour[i] >= n || seen[tour[i]]) {
			ok = -1;
			break;
		}
		seen[tour[i]] = 1;
	}
	free(seen);
	return ok;
}

static void lib_err(char *err, size_t errlen, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

static void
lib_err(char *err, size_t errlen, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(err, errlen, fmt, ap);
	va_end(ap);
}

int
tsp_instance_init(struct tsp_instance *in, const char *name, enum tsp_weight type, int n,
		  const double *x, const double *y, char *err, size_t errlen)
{
	int i;

	memset(in, 0, sizeof(*in));
	for (i = 0; i < n; i++)
		if (!isfinite(x[i]) || !isfinite(y[i]) || fabs(x[i]) > TSP_COORD_LIMIT ||
		    fabs(y[i]) > TSP_COORD_LIMIT) {
			lib_err(err, errlen, "city %d: coordinates must be finite and within +-%g",
				i, TSP_COORD_LIMIT);
			return -1;
		}
	if (n < 1) {
		lib_err(err, errlen, "no cities");
		return -1;
	}
	snprintf(in->name, sizeof(in->name), "%s", name != NULL ? name : "");
	in->type = type;
	in->n = n;
	in->optimum = tsp_known_optimum(in->name, n);
	if ((in->x = malloc((size_t)n * sizeof(double))) == NULL ||
	    (in->y = malloc((size_t)n * sizeof(double))) == NULL)
		abort();
	memcpy(in->x, x, (size_t)n * sizeof(double));
	memcpy(in->y, y, (size_t)n * sizeof(double));
	if (type == TSP_GEO) {
		if ((in->lat = malloc((size_t)n * sizeof(double))) == NULL ||
		    (in->lon = malloc((size_t)n * sizeof(double))) == NULL)
			abort();
		for (i = 0; i < n; i++) {
			in->lat[i] = lib_geo_radians(x[i]);
			in->lon[i] = lib_geo_radians(y[i]);
		}
	}
	return 0;
}

void
tsp_instance_copy(struct tsp_instance *dst, const struct tsp_instance *src)
{
	char err[8];

	if (tsp_instance_init(dst, src->name, src->type, src->n, src->x, src->y, err,
			      sizeof(err)) == -1)
		abort(); /* src was validated when it was made */
	dst->optimum = src->optimum;
}

void
tsp_instance_prepare(struct tsp_instance *in)
{
	int i, j, n = in->n;

	if (n > TSP_MATRIX_MAX || in->matrix != NULL)
		return;
	if ((in->matrix = malloc((size_t)n * (size_t)n * sizeof(int))) == NULL)
		abort();
	/* Fill through tsp_dist_compute: matrix stays NULL-checked until done. */
	for (i = 0; i < n; i++)
		for (j = 0; j <= i; j++) {
			int d = tsp_dist_compute(in, i, j);
			in->matrix[(size_t)i * (size_t)n + (size_t)j] = d;
			in->matrix[(size_t)j * (size_t)n + (size_t)i] = d;
		}
}

void
tsp_instance_free(struct tsp_instance *in)
{
	free(in->x);
	free(in->y);
	free(in->lat);
	free(in->lon);
	free(in->matrix);
	memset(in, 0, sizeof(*in));
}

/*
 * The line-oriented reader.  TSPLIB headers are "KEY : VALUE" with any
 * spacing; sections are bare keywords followed by whitespace-separated
 * numbers.
 */
struct lib_reader {
	char *p;      /* the private copy, NUL-terminated */
	int line;
	char *err;
	size_t errlen;
};

static char *
lib_copy(const char *text, size_t len, char *err, size_t errlen)
{
	char *p;

	if (memchr(text, '\0', len) != NULL) {
		lib_err(err, errlen, "body contains a NUL byte");
		return NULL;
	}
	if ((p = malloc(len + 1)) == NULL)
		abort();
	memcpy(p, text, len);
	p[len] = '\0';
	return p;
}

/* Next line, trimmed, in *key (before ':') and *val (after; NULL without
 * a colon).  Returns 0 at the end of input. */
static int
lib_next_line(struct lib_reader *r, char **key, char **val)
{
	char *s, *e, *colon;

	for (;;) {
		if (*r->p == '\0')
			return 0;
		s = r->p;
		e = strchr(s, '\n');
		if (e != NULL) {
			*e = '\0';
			r->p = e + 1;
		} else
			r->p = s + strlen(s);
		r->line++;
		while (isspace((unsigned char)*s))
			s++;
		e = s + strlen(s);
		while (e > s && isspace((unsigned char)e[-1]))
			*--e = '\0';
		if (*s != '\0')
			break;
	}
	*val = NULL;
	if ((colon = strchr(s, ':')) != NULL) {
		*colon = '\0';
		*val = colon + 1;
		while (isspace((unsigned char)**val))
			(*val)++;
		e = colon;
		while (e > s && isspace((unsigned char)e[-1]))
			*--e = '\0';
	}
	*key = s;
	return 1;
}

/* Numbers in a section: whitespace (newlines included) between them. */
static int
lib_next_number(struct lib_reader *r, double *out)
{
	char *end;

	while (isspace((unsigned char)*r->p)) {
		if (*r->p == '\n')
			r->line++;
		r->p++;
	}
	/* strtod would also take "nan", "inf" and hex floats: TSPLIB has
	 * none, so the token may hold only digits, signs, points and e. */
	for (end = r->p; *end != '\0' && !isspace((unsigned char)*end); end++)
		if (!isdigit((unsigned char)*end) && strchr("+-.eE", *end) == NULL)
			return -1;
	*out = strtod(r->p, &end);
	if (end == r->p || !isfinite(*out))
		return -1;
	if (*end != '\0' && !isspace((unsigned char)*end))
		return -1;
	r->p = end;
	return 0;
}

static int
lib_parse_int(const char *s, int lo, int hi, int *out)
{
	char *end;
	long v;

	if (!isdigit((unsigned char)*s))
		return -1;
	v = strtol(s, &end, 10);
	if (*end != '\0' || v < lo || v > hi)
		return -1;
	*out = (int)v;
	return 0;
}

int
tsp_parse_tsplib(struct tsp_instance *in, const char *text, size_t len, int max_n,
		 char *err, size_t errlen)
{
	struct lib_reader r = {NULL, 0, err, errlen};
	char *buf, *key, *val, name[TSP_NAME_MAX] = "";
	double *x = NULL, *y = NULL, v;
	unsigned char *seen = NULL;
	enum tsp_weight type = TSP_EUC_2D;
	int n = -1, have_type = 0, have_coords = 0, rc = -1, i, id;

	if ((buf = lib_copy(text, len, err, errlen)) == NULL)
		return -1;
	r.p = buf;
	while (!have_coords && lib_next_line(&r, &key, &val)) {
		if (strcmp(key, "EOF") == 0)
			break;
		if (strcmp(key, "NODE_COORD_SECTION") == 0) {
			if (n < 0 || !have_type) {
				lib_err(err, errlen, "line %d: NODE_COORD_SECTION before %s", r.line,
					n < 0 ? "DIMENSION" : "EDGE_WEIGHT_TYPE");
				goto out;
			}
			if ((x = calloc((size_t)n, sizeof(double))) == NULL ||
			    (y = calloc((size_t)n, sizeof(double))) == NULL ||
			    (seen = calloc((size_t)n, 1)) == NULL)
				abort();
			for (i = 0; i < n; i++) {
				if (lib_next_number(&r, &v) == -1 || v != floor(v) || v < 1 ||
				    v > n) {
					lib_err(err, errlen,
						"line %d: expected a node id in 1..%d (entry %d of %d)",
						r.line + 1, n, i + 1, n);
					goto out;
				}
				id = (int)v - 1;
				if (seen[id]) {
					lib_err(err, errlen, "line %d: node %d appears twice",
						r.line + 1, id + 1);
					goto out;
				}
				seen[id] = 1;
				if (lib_next_number(&r, &x[id]) == -1 ||
				    lib_next_number(&r, &y[id]) == -1) {
					lib_err(err, errlen, "line %d: node %d needs two coordinates",
						r.line + 1, id + 1);
					goto out;
				}
			}
			have_coords = 1; /* whatever follows (EOF, display data) is ignored */
			break;
		}
		if (val == NULL) {
			lib_err(err, errlen, "line %d: '%.40s' is neither KEY: VALUE nor a section "
				"we read (NODE_COORD_SECTION)", r.line, key);
			goto out;
		}
		if (strcmp(key, "NAME") == 0) {
			size_t l = strlen(val);
			if (l > 4 && strcmp(val + l - 4, ".tsp") == 0)
				val[l - 4] = '\0';
			snprintf(name, sizeof(name), "%s", val);
		} else if (strcmp(key, "TYPE") == 0) {
			if (strcmp(val, "TSP") != 0) {
				lib_err(err, errlen, "line %d: TYPE %.20s: only symmetric TSP", r.line,
					val);
				goto out;
			}
		} else if (strcmp(key, "DIMENSION") == 0) {
			if (lib_parse_int(val, 1, max_n, &n) == -1) {
				lib_err(err, errlen, "line %d: DIMENSION must be 1..%d", r.line, max_n);
				goto out;
			}
		} else if (strcmp(key, "EDGE_WEIGHT_TYPE") == 0) {
			if (tsp_weight_parse(val, &type) == -1) {
				lib_err(err, errlen,
					"line %d: EDGE_WEIGHT_TYPE %.20s not supported "
					"(EUC_2D, CEIL_2D, ATT, GEO)", r.line, val);
				goto out;
			}
			have_type = 1;
		} else if (strcmp(key, "NODE_COORD_TYPE") == 0) {
			if (strcmp(val, "TWOD_COORDS") != 0) {
				lib_err(err, errlen, "line %d: NODE_COORD_TYPE must be TWOD_COORDS",
					r.line);
				goto out;
			}
		}
		/* COMMENT, DISPLAY_DATA_TYPE and the rest do not matter here. */
	}
	if (!have_coords) {
		lib_err(err, errlen, "no NODE_COORD_SECTION");
		goto out;
	}
	rc = tsp_instance_init(in, name, type, n, x, y, err, errlen);
out:
	free(x);
	free(y);
	free(seen);
	free(buf);
	return rc;
}

int
tsp_parse_tour(const char *text, size_t len, int n, int *tour, char *err, size_t errlen)
{
	struct lib_reader r = {NULL, 0, err, errlen};
	char *buf, *key, *val;
	int i, dim, rc = -1;
	double v;

	if ((buf = lib_copy(text, len, err, errlen)) == NULL)
		return -1;
	r.p = buf;
	while (lib_next_line(&r, &key, &val)) {
		if (strcmp(key, "TOUR_SECTION") == 0) {
			for (i = 0; i < n; i++) {
				if (lib_next_number(&r, &v) == -1 || v != floor(v) || v < 1 ||
				    v > n) {
					lib_err(err, errlen, "line %d: expected a node in 1..%d",
						r.line + 1, n);
					goto out;
				}
				tour[i] = (int)v - 1;
			}
			if (tsp_tour_check(n, tour) == -1) {
				lib_err(err, errlen, "the tour is not a permutation of 1..%d", n);
				goto out;
			}
			rc = 0;
			goto out;
		}
		if (val == NULL) {
			lib_err(err, errlen, "line %d: unexpected '%.40s'", r.line, key);
			goto out;
		}
		if (strcmp(key, "TYPE") == 0 && strcmp(val, "TOUR") != 0) {
			lib_err(err, errlen, "line %d: TYPE must be TOUR", r.line);
			goto out;
		}
		if (strcmp(key, "DIMENSION") == 0 &&
		    (lib_parse_int(val, 1, 1 << 30, &dim) == -1 || dim != n)) {
			lib_err(err, errlen, "line %d: DIMENSION is not %d", r.line, n);
			goto out;
		}
	}
	lib_err(err, errlen, "no TOUR_SECTION");
out:
	free(buf);
	return rc;
}
