/*
 * plugin.c - the occamy glue of the TSP optimiser: turns requests into a
 * master task, help requests and expansion into assistant tasks, and moves
 * tours between them with control messages.
 *
 *   master      from a request.  Publishes one help request, searches until
 *               its deadline (or the known optimum), adopts better tours its
 *               assistants report, broadcasts its own improvements to them,
 *               and replies with the best tour as JSON.
 *   assistant   from task_expand (internal) or a help request (external).
 *               Owns a copy of the instance and its own seed; reports
 *               improvements to the master's task ID and listens on
 *               "<master>.a", the ID every assistant of that master shares.
 *
 * Tasks share nothing: everything between them goes through the broker, so
 * an assistant behaves the same on this server or another one.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <occamy/plugin.h>

#include "tsp.h"

#define PLUG_BUDGET_DEFAULT_MS 2000
#define PLUG_BUDGET_MAX_MS 86400000
#define PLUG_SEND_EVERY_MS 100 /* least time between two tour messages... */
#define PLUG_SEND_PER_CITY 10  /* ...plus 1 ms per this many cities */
#define PLUG_TINY 8            /* solved exactly at once: no helpers */

enum plug_role { ROLE_MASTER, ROLE_INTERNAL, ROLE_EXTERNAL, ROLE_PROTECTED };

static const char *const plug_role_names[] = {"master", "internal", "external", "protected"};

/* Distinct assistants a master counts in its reply, per kind. */
#define PLUG_SEEN_MAX 256

struct plug_conf {
	int64_t budget_ms; /* option budget_ms: when the request names none */
	int max_cities;    /* option max_cities */
	int help;          /* option help = yes|no: publish help requests */
	int has_seed;      /* option seed: fixed seed for every master */
	uint64_t seed;
	int min_assistants; /* option min_assistants: protected assistants asked */
	int expand;         /* option expand = yes|no: make assistants in expand() */
};

static const struct plug_conf plug_defaults = {
	PLUG_BUDGET_DEFAULT_MS, TSP_MAX_CITIES_DEFAULT, 1, 0, 0, 0, 1,
};

struct plug_task {
	const struct occamy_host *host;
	enum plug_role role;
	char master[TSP_ID_MAX + 1];   /* the master's task ID */
	char id[TSP_ID_MAX + 3];       /* master: master; assistants: "<master>.a" */
	struct tsp_instance inst;      /* coordinates fixed at task_new */
	uint64_t seed;
	uint64_t iterations;           /* kick limit, 0 = none */
	int64_t deadline_ms;           /* wall clock */
	int64_t created_ms;
	uint64_t spawned;              /* assistants made; task_expand only */
	int min_assistants;            /* master: protected assistants to ask */
	int64_t target_length;         /* master: stop at a tour this short, -1: none */
	char from[48];                 /* assistant: "<role> <unique>", header tsp-from */
	atomic_int has_assistants;     /* master: anybody to broadcast to? */
	atomic_int master_done;        /* assistant: the master said "done" */

	pthread_mutex_t lock;          /* guards the inbox and counters */
	int *inbox;                    /* best tour received, not yet adopted */
	int64_t inbox_len;             /* INT64_MAX: empty */
	uint64_t reports;              /* valid tour messages received */
	uint64_t seen[PLUG_SEEN_MAX];  /* master: hashes of assistants heard */
	unsigned nseen, seen_by_role[4];
	atomic_int inbox_full;

	/* Used by task_run only (its slot thread). */
	const struct occamy_cancel *cancel;
	uint64_t end_ns;               /* deadline on CLOCK_MONOTONIC */
	uint64_t send_gap_ns;
	uint64_t last_send_ns;
	int64_t last_sent_len;
	uint64_t adopted;
	int *scratch;
	int help_sent;
	int requests_sent;             /* master: protected assistants asked */
	int sent_once;                 /* assistant: has reported at least once */
};

/* Generated IDs are unique per host with the pid and this counter. */
static _Atomic uint64_t plug_counter;

static uint64_t
plug_mono_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int64_t
plug_wall_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static uint64_t
plug_mix(uint64_t a, uint64_t b)
{
	uint64_t z = a ^ (b + 0x9e3779b97f4a7c15ULL + (a << 6) + (a >> 2));

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

/* Entropy for seeds and IDs nobody asked to be reproducible. */
static uint64_t
plug_fresh(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return plug_mix(plug_mix((uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec,
				 (uint64_t)getpid()),
			atomic_fetch_add(&plug_counter, 1));
}

static const struct plug_conf *
plug_conf(const struct occamy_host *host)
{
	return host->plugin_state != NULL ? host->plugin_state : &plug_defaults;
}

static int
plug_parse_u64(const char *s, size_t len, uint64_t *out)
{
	uint64_t v = 0;
	size_t i;

	if (len == 0 || len > 20)
		return -1;
	for (i = 0; i < len; i++) {
		if (s[i] < '0' || s[i] > '9' || v > (UINT64_MAX - (uint64_t)(s[i] - '0')) / 10)
			return -1;
		v = v * 10 + (uint64_t)(s[i] - '0');
	}
	*out = v;
	return 0;
}

/* A header that must be a non-negative integer (AMQP int, integral float,
 * or decimal string).  0 if absent, 1 if read, -1 if malformed. */
static int
plug_header_u64(const struct occamy_headers *h, const char *key, uint64_t max,
		uint64_t *out)
{
	const struct occamy_header *v = occamy_headers_find(h, key);

	if (v == NULL)
		return 0;
	switch (v->kind) {
	case OCCAMY_VALUE_INT:
		if (v->i < 0)
			return -1;
		*out = (uint64_t)v->i;
		break;
	case OCCAMY_VALUE_FLOAT:
		if (!(v->f >= 0 && v->f <= 1e18) || v->f != (double)(int64_t)v->f)
			return -1;
		*out = (uint64_t)v->f;
		break;
	case OCCAMY_VALUE_STRING:
		if (plug_parse_u64(v->str, v->len, out) == -1)
			return -1;
		break;
	default:
		return -1;
	}
	return *out <= max ? 1 : -1;
}

static int
plug_init(struct occamy_host *host, const struct occamy_option *options, size_t noptions,
	  char *err, size_t errlen)
{
	struct plug_conf *c = malloc(sizeof(*c));
	uint64_t v;
	size_t i;

	if (c == NULL)
		abort();
	*c = plug_defaults;
	for (i = 0; i < noptions; i++) {
		const char *k = options[i].key, *val = options[i].value;
		if (strcmp(k, "budget_ms") == 0) {
			if (plug_parse_u64(val, strlen(val), &v) == -1 || v > PLUG_BUDGET_MAX_MS)
				goto bad;
			c->budget_ms = (int64_t)v;
		} else if (strcmp(k, "max_cities") == 0) {
			if (plug_parse_u64(val, strlen(val), &v) == -1 || v < 1 || v > 1000000)
				goto bad;
			c->max_cities = (int)v;
		} else if (strcmp(k, "help") == 0) {
			if (strcmp(val, "yes") != 0 && strcmp(val, "no") != 0)
				goto bad;
			c->help = strcmp(val, "yes") == 0;
		} else if (strcmp(k, "seed") == 0) {
			if (plug_parse_u64(val, strlen(val), &c->seed) == -1)
				goto bad;
			c->has_seed = 1;
		} else if (strcmp(k, "expand") == 0) {
			if (strcmp(val, "yes") != 0 && strcmp(val, "no") != 0)
				goto bad;
			c->expand = strcmp(val, "yes") == 0;
		} else if (strcmp(k, "min_assistants") == 0) {
			if (plug_parse_u64(val, strlen(val), &v) == -1 || v > TSP_ASSISTANTS_MAX)
				goto bad;
			c->min_assistants = (int)v;
		} else {
			snprintf(err, errlen,
				 "unknown option '%s' (known: budget_ms, max_cities, help, seed, "
				 "min_assistants, expand)", k);
			free(c);
			return -1;
		}
		continue;
bad:
		snprintf(err, errlen,
			 "bad value '%s' for %s (budget_ms: 0..%d; max_cities: 1..1000000; "
			 "help, expand: yes|no; seed: 0..2^64-1; min_assistants: 0..%d)", val, k,
			 PLUG_BUDGET_MAX_MS, TSP_ASSISTANTS_MAX);
		free(c);
		return -1;
	}
	host->plugin_state = c;
	return 0;
}

static void
plug_fini(const struct occamy_host *host)
{
	free(host->plugin_state);
}

static struct plug_task *
plug_task_alloc(const struct occamy_host *host, enum plug_role role, const char *master)
{
	struct plug_task *t = calloc(1, sizeof(*t));

	if (t == NULL)
		abort();
	t->host = host;
	t->role = role;
	snprintf(t->master, sizeof(t->master), "%s", master);
	snprintf(t->id, sizeof(t->id), role == ROLE_MASTER ? "%s" : "%s.a", master);
	t->inbox_len = INT64_MAX;
	t->created_ms = plug_wall_ms();
	snprintf(t->from, sizeof(t->from), "%s %ld-%llu-%08llx", plug_role_names[role],
		 (long)getpid(), (unsigned long long)atomic_fetch_add(&plug_counter, 1) + 1,
		 (unsigned long long)(plug_fresh() & 0xffffffffu));
	pthread_mutex_init(&t->lock, NULL);
	return t;
}

static void
plug_task_destroy(void *task)
{
	struct plug_task *t = task;

	tsp_instance_free(&t->inst);
	pthread_mutex_destroy(&t->lock);
	free(t->inbox);
	free(t->scratch);
	free(t);
}

static int
plug_is_json(const char *s, size_t len)
{
	size_t i;

	for (i = 0; i < len; i++)
		if (s[i] != ' ' && s[i] != '\t' && s[i] != '\r' && s[i] != '\n')
			return s[i] == '{';
	return 0;
}

/* A help request (external) or a request for a protected assistant, r
 * parsed from the JSON a master published; takes r's instance. */
static enum occamy_status
plug_new_assistant(const struct occamy_host *host, enum plug_role role,
		   struct tsp_json_request *r, void **task, char *err, size_t errlen)
{
	struct plug_task *t;

	if (r->master[0] == '\0' || r->deadline_ms < 0) {
		snprintf(err, errlen, "a help request needs \"master\" and \"deadline_ms\"");
		tsp_instance_free(&r->inst);
		return OCCAMY_ERR_INVALID_BODY;
	}
	if (r->deadline_ms <= plug_wall_ms()) {
		snprintf(err, errlen, "help request for %s expired", r->master);
		tsp_instance_free(&r->inst);
		return OCCAMY_ERR_INVALID_TASK;
	}
	t = plug_task_alloc(host, role, r->master);
	t->inst = r->inst;
	t->deadline_ms = r->deadline_ms;
	/* Every server gets the same help request: their searches must
	 * differ, so the master's seed is only a starting point. */
	t->seed = plug_mix(r->seed, plug_fresh());
	*task = t;
	return OCCAMY_OK;
}

static enum occamy_status
plug_task_new(const struct occamy_host *host, const struct occamy_headers *headers,
	      const void *body, size_t len, int is_help, void **task, char *err,
	      size_t errlen)
{
	const struct plug_conf *conf = plug_conf(host);
	const struct occamy_header *hid = occamy_headers_find(headers, "task-id");
	struct tsp_json_request r;
	struct plug_task *t;
	char master[TSP_ID_MAX + 1];
	uint64_t budget = (uint64_t)conf->budget_ms, seed = 0, iterations = 0, v;
	uint64_t min_assistants = (uint64_t)conf->min_assistants, target = 0;
	int64_t target_length;
	int has_seed = conf->has_seed, rc;

	if (is_help) {
		if (!plug_is_json(body, len)) {
			snprintf(err, errlen, "a tsp help request is a JSON object");
			return OCCAMY_ERR_INVALID_BODY;
		}
		if (tsp_json_parse_request(&r, body, len, conf->max_cities, err, errlen) == -1)
			return OCCAMY_ERR_INVALID_BODY;
		return plug_new_assistant(host, ROLE_EXTERNAL, &r, task, err, errlen);
	}

	/* Headers first: cheap, and a JSON body may override them. */
	if (hid != NULL && hid->kind == OCCAMY_VALUE_STRING && tsp_id_ok(hid->str, hid->len))
		snprintf(master, sizeof(master), "%.*s", (int)hid->len, hid->str);
	else if (hid != NULL && hid->kind == OCCAMY_VALUE_INT)
		snprintf(master, sizeof(master), "%lld", (long long)hid->i);
	else if (hid != NULL) {
		snprintf(err, errlen, "task-id must be 1..%d visible ASCII characters, "
			 "no quotes or backslashes", TSP_ID_MAX);
		return OCCAMY_ERR_INVALID_HEADERS;
	} else
		snprintf(master, sizeof(master), "tsp-%ld-%llu-%08llx", (long)getpid(),
			 (unsigned long long)atomic_fetch_add(&plug_counter, 1) + 1,
			 (unsigned long long)(plug_fresh() & 0xffffffffu));
	if ((rc = plug_header_u64(headers, "budget-ms", PLUG_BUDGET_MAX_MS, &v)) == -1) {
		snprintf(err, errlen, "budget-ms must be an integer 0..%d", PLUG_BUDGET_MAX_MS);
		return OCCAMY_ERR_INVALID_HEADERS;
	} else if (rc == 1)
		budget = v;
	if (conf->has_seed)
		seed = conf->seed;
	if ((rc = plug_header_u64(headers, "seed", UINT64_MAX, &v)) == -1) {
		snprintf(err, errlen, "seed must be an integer 0..2^64-1");
		return OCCAMY_ERR_INVALID_HEADERS;
	} else if (rc == 1) {
		seed = v;
		has_seed = 1;
	}
	if (plug_header_u64(headers, "iterations", UINT64_MAX, &iterations) == -1) {
		snprintf(err, errlen, "iterations must be a non-negative integer");
		return OCCAMY_ERR_INVALID_HEADERS;
	}
	if ((rc = plug_header_u64(headers, "target-length", INT64_MAX, &target)) == -1) {
		snprintf(err, errlen, "target-length must be a non-negative integer");
		return OCCAMY_ERR_INVALID_HEADERS;
	}
	target_length = rc == 1 ? (int64_t)target : -1;
	if (plug_header_u64(headers, "min-assistants", TSP_ASSISTANTS_MAX, &min_assistants) ==
	    -1) {
		snprintf(err, errlen, "min-assistants must be an integer 0..%d", TSP_ASSISTANTS_MAX);
		return OCCAMY_ERR_INVALID_HEADERS;
	}

	memset(&r, 0, sizeof(r));
	if (plug_is_json(body, len)) {
		if (tsp_json_parse_request(&r, body, len, conf->max_cities, err, errlen) == -1)
			return OCCAMY_ERR_INVALID_BODY;
		if (r.budget_ms >= 0)
			budget = (uint64_t)r.budget_ms;
		if (r.has_seed) {
			seed = r.seed;
			has_seed = 1;
		}
		if (r.iterations > 0)
			iterations = r.iterations;
		if (r.min_assistants >= 0)
			min_assistants = (uint64_t)r.min_assistants;
		if (r.target_length >= 0)
			target_length = r.target_length;
		/* A master's request for a protected assistant: the help
		 * body, marked by a header. */
		if (occamy_headers_find(headers, "tsp-assistant") != NULL)
			return plug_new_assistant(host, ROLE_PROTECTED, &r, task, err, errlen);
	} else if (tsp_parse_tsplib(&r.inst, body, len, conf->max_cities, err, errlen) == -1)
		return OCCAMY_ERR_INVALID_BODY;

	t = plug_task_alloc(host, ROLE_MASTER, master);
	t->inst = r.inst;
	t->seed = has_seed ? seed : plug_fresh();
	t->iterations = iterations;
	t->min_assistants = (int)min_assistants;
	t->target_length = target_length;
	t->deadline_ms = t->created_ms + (int64_t)budget;
	*task = t;
	return OCCAMY_OK;
}

/* --- running --- */

static int
plug_stop(void *arg)
{
	struct plug_task *t = arg;

	return t->host->cancelled(t->cancel) || plug_mono_ns() >= t->end_ns ||
	       atomic_load_explicit(&t->master_done, memory_order_relaxed);
}

static void
plug_send(struct plug_task *t, const struct tsp_search *s, uint64_t now)
{
	char dest[TSP_ID_MAX + 3];
	struct tsp_buf b = {0};
	int64_t len = tsp_search_length(s);

	/* The master talks to all its assistants, an assistant to its master. */
	snprintf(dest, sizeof(dest), t->role == ROLE_MASTER ? "%s.a" : "%s", t->master);
	tsp_report_format(&b, t->inst.n, tsp_search_tour(s), len);
	/* On failure try again at the next interval; nothing is lost. */
	struct occamy_kv from = {"tsp-from", t->from};

	if (t->host->publish_control(t->host, dest, &from, t->role == ROLE_MASTER ? 0 : 1, b.p,
				     b.len) == 0) {
		t->last_sent_len = len;
		t->sent_once = 1;
	}
	t->last_send_ns = now;
	tsp_buf_free(&b);
}

/* Between kicks: adopt the best tour received, send our own if it got
 * better (rate-limited: tours of big instances are big messages). */
static void
plug_sync(void *arg, struct tsp_search *s)
{
	struct plug_task *t = arg;
	int64_t len = INT64_MAX;
	uint64_t now;

	/* Report once before adopting anything, so that the master counts
	 * every assistant that ran, even one that never beats it. */
	if (t->role != ROLE_MASTER && !t->sent_once)
		plug_send(t, s, plug_mono_ns());
	if (atomic_load_explicit(&t->inbox_full, memory_order_acquire)) {
		pthread_mutex_lock(&t->lock);
		if (t->inbox_len < tsp_search_length(s)) {
			memcpy(t->scratch, t->inbox, (size_t)t->inst.n * sizeof(int));
			len = t->inbox_len;
		}
		t->inbox_len = INT64_MAX;
		atomic_store_explicit(&t->inbox_full, 0, memory_order_relaxed);
		pthread_mutex_unlock(&t->lock);
		if (len != INT64_MAX && tsp_search_adopt(s, t->scratch, len)) {
			t->adopted++;
			/* Do not echo a tour straight back to where it came from. */
			if (t->role != ROLE_MASTER)
				t->last_sent_len = len;
		}
	}
	if (tsp_search_length(s) >= t->last_sent_len)
		return;
	if (t->role == ROLE_MASTER && !atomic_load_explicit(&t->has_assistants,
							    memory_order_relaxed) &&
	    !t->help_sent && !t->requests_sent)
		return;
	now = plug_mono_ns();
	if (now - t->last_send_ns >= t->send_gap_ns)
		plug_send(t, s, now);
}

static void
plug_result(struct plug_task *t, const struct tsp_search *s, struct occamy_output *out)
{
	const int *tour = tsp_search_tour(s);
	int64_t len = tsp_search_length(s);
	struct tsp_buf b = {0};
	uint64_t reports;
	unsigned by_role[4];
	int i;

	pthread_mutex_lock(&t->lock);
	reports = t->reports;
	memcpy(by_role, t->seen_by_role, sizeof(by_role));
	pthread_mutex_unlock(&t->lock);
	tsp_buf_printf(&b, "{\"length\":%lld,\"tour\":[", (long long)len);
	for (i = 0; i < t->inst.n; i++)
		tsp_buf_printf(&b, "%s%d", i ? "," : "", tour[i]);
	tsp_buf_printf(&b, "],\"n\":%d,\"name\":", t->inst.n);
	tsp_buf_json_string(&b, t->inst.name);
	if (t->inst.optimum >= 0)
		tsp_buf_printf(&b, ",\"optimum_known\":%lld", (long long)t->inst.optimum);
	else
		tsp_buf_printf(&b, ",\"optimum_known\":null");
	tsp_buf_printf(&b,
		       ",\"reports\":%llu,\"adopted\":%llu,\"iterations\":%llu,\"seed\":\"%llu\","
		       "\"task_id\":",
		       (unsigned long long)reports, (unsigned long long)t->adopted,
		       (unsigned long long)tsp_search_iterations(s), (unsigned long long)t->seed);
	tsp_buf_json_string(&b, t->master);
	tsp_buf_printf(&b, ",\"min_assistants\":%d,\"assistants\":{\"protected\":%u,"
		       "\"internal\":%u,\"external\":%u}", t->min_assistants,
		       by_role[ROLE_PROTECTED], by_role[ROLE_INTERNAL], by_role[ROLE_EXTERNAL]);
	if (t->target_length >= 0)
		tsp_buf_printf(&b, ",\"target_length\":%lld", (long long)t->target_length);
	else
		tsp_buf_printf(&b, ",\"target_length\":null");
	tsp_buf_printf(&b, ",\"elapsed_ms\":%lld}", (long long)(plug_wall_ms() - t->created_ms));
	out->body = b.p;
	out->len = b.len;
	snprintf(out->content_type, sizeof(out->content_type), "application/json");
}

static void
plug_publish_help(struct plug_task *t)
{
	const struct occamy_host *host = t->host;
	struct tsp_buf b = {0};

	struct occamy_kv master = {OCCAMY_HEADER_MASTER, t->master};
	struct occamy_kv assistant = {"tsp-assistant", "1"};
	int i;

	tsp_json_help(&b, &t->inst, t->master, t->deadline_ms, t->seed);
	/* The minimum first: requests, each protected on exactly one server. */
	for (i = 0; i < t->min_assistants; i++)
		if (host->publish_request(host, "tsp", &assistant, 1, b.p, b.len) == 0)
			t->requests_sent++;
	if (t->requests_sent < t->min_assistants)
		host->log(host, OCCAMY_LOG_WARNING, "%s: asked %d of %d protected assistants",
			  t->master, t->requests_sent, t->min_assistants);
	if (plug_conf(host)->help) {
		if (host->publish_help(host, "tsp", &master, 1, b.p, b.len) == 0)
			t->help_sent = 1;
		else
			host->log(host, OCCAMY_LOG_WARNING, "%s: could not publish a help request",
				  t->master);
	}
	tsp_buf_free(&b);
}

/* "done" to every assistant: running ones stop at their next poll, stored
 * ones at once when they start.  Withdrawing the help request itself (every
 * daemon dropping its stored copies and external helpers) is the daemon's
 * job: it saw the occamy-master header on our publish_help and announces
 * our end once the request is settled. */
static void
plug_send_done(struct plug_task *t)
{
	const struct occamy_host *host = t->host;
	char dest[TSP_ID_MAX + 3];

	snprintf(dest, sizeof(dest), "%s.a", t->master);
	host->publish_control(host, dest, NULL, 0, "done", 4);
}

static enum occamy_status
plug_task_run(void *task, const struct occamy_cancel *cancel, struct occamy_output *out)
{
	struct plug_task *t = task;
	const struct occamy_host *host = t->host;
	struct tsp_hooks hooks = {plug_stop, plug_sync, t};
	struct tsp_search *s;
	int64_t left = t->deadline_ms - plug_wall_ms(), target;
	uint64_t now = plug_mono_ns();

	t->cancel = cancel;
	t->end_ns = now + (uint64_t)(left > 0 ? left : 0) * 1000000u;
	t->send_gap_ns = (PLUG_SEND_EVERY_MS + (uint64_t)t->inst.n / PLUG_SEND_PER_CITY) * 1000000u;
	t->last_send_ns = now - t->send_gap_ns;
	t->last_sent_len = INT64_MAX;
	if ((t->scratch = malloc((size_t)t->inst.n * sizeof(int))) == NULL)
		abort();
	tsp_instance_prepare(&t->inst);
	if (t->role == ROLE_MASTER && t->inst.n > PLUG_TINY && left > 0 &&
	    (plug_conf(host)->help || t->min_assistants > 0))
		plug_publish_help(t);

	s = tsp_search_new(&t->inst, t->seed,
			   t->role == ROLE_MASTER ? TSP_START_GREEDY : TSP_START_NN);
	/* Nothing beats the known optimum: stop there and free the slot.  A
	 * master asked for a target length stops at the first of the two
	 * (its elapsed_ms is then the time to the target). */
	target = t->inst.optimum;
	if (t->role == ROLE_MASTER && t->target_length > target)
		target = t->target_length;
	tsp_search_run(s, &hooks, t->iterations, target);
	/* A tour may have arrived since the last look. */
	plug_sync(t, s);
	if (t->role != ROLE_MASTER && tsp_search_length(s) < t->last_sent_len)
		plug_send(t, s, plug_mono_ns());

	host->log(host, OCCAMY_LOG_DEBUG, "%s %s: n=%d length=%lld iterations=%llu adopted=%llu",
		  plug_role_names[t->role], t->id, t->inst.n, (long long)tsp_search_length(s),
		  (unsigned long long)tsp_search_iterations(s), (unsigned long long)t->adopted);
	if (host->cancelled(cancel)) {
		/* Requeued: protected assistants must not search on for a
		 * master that restarts elsewhere (and asks again). */
		if (t->role == ROLE_MASTER && t->requests_sent > 0)
			plug_send_done(t);
		tsp_search_free(s);
		snprintf(out->message, sizeof(out->message), "cancelled");
		return OCCAMY_ERR_INTERRUPTED;
	}
	if (t->role == ROLE_MASTER) {
		plug_result(t, s, out);
		/* Assistants outlive us otherwise: until the deadline. */
		if (t->help_sent || t->requests_sent > 0 ||
		    atomic_load_explicit(&t->has_assistants, memory_order_relaxed))
			plug_send_done(t);
	}
	tsp_search_free(s);
	return OCCAMY_OK;
}

/* Assistants with their own copy of the instance and their own seed.  The
 * master and external assistants expand (an external fills its server from
 * one help request); internal ones leave it to their master. */
static size_t
plug_task_expand(void *task, size_t n, void **helpers)
{
	struct plug_task *t = task, *a;
	size_t i;

	if (t->role == ROLE_INTERNAL || t->inst.n <= PLUG_TINY || !plug_conf(t->host)->expand ||
	    t->deadline_ms <= plug_wall_ms())
		return 0;
	for (i = 0; i < n; i++) {
		a = plug_task_alloc(t->host, t->role == ROLE_EXTERNAL ? ROLE_EXTERNAL : ROLE_INTERNAL,
				    t->master);
		tsp_instance_copy(&a->inst, &t->inst);
		a->deadline_ms = t->deadline_ms;
		a->seed = plug_mix(t->seed, ++t->spawned);
		helpers[i] = a;
	}
	if (n > 0)
		atomic_store_explicit(&t->has_assistants, 1, memory_order_relaxed);
	return n;
}

/* Count an assistant the first time it reports, by the kind its tsp-from
 * header names ("<role> <unique>").  Caller holds t->lock. */
static void
plug_seen(struct plug_task *t, const char *from, size_t len)
{
	uint64_t h = 1469598103934665603ULL;
	unsigned i;
	int role;

	for (role = ROLE_INTERNAL; role <= ROLE_PROTECTED; role++) {
		size_t k = strlen(plug_role_names[role]);
		if (len > k && memcmp(from, plug_role_names[role], k) == 0 && from[k] == ' ')
			break;
	}
	if (role > ROLE_PROTECTED)
		return;
	for (i = 0; i < len; i++)
		h = (h ^ (unsigned char)from[i]) * 1099511628211ULL;
	for (i = 0; i < t->nseen; i++)
		if (t->seen[i] == h)
			return;
	if (t->nseen == PLUG_SEEN_MAX)
		return;
	t->seen[t->nseen++] = h;
	t->seen_by_role[role]++;
}

/* A tour from an assistant (to a master) or from the master (to its
 * assistants), or "done" from a master that has finished.  Tours are
 * checked in full, never trusted: a permutation, and the length recomputed.
 * Kept if it beats what is already waiting. */
static void
plug_task_handle(void *task, const struct occamy_headers *headers, const void *body,
		 size_t len)
{
	struct plug_task *t = task;
	int n = t->inst.n, *tour, i;
	int64_t claimed, real = 0;

	const struct occamy_header *from = occamy_headers_find(headers, "tsp-from");

	if (len == 4 && memcmp(body, "done", 4) == 0) {
		if (t->role != ROLE_MASTER)
			atomic_store_explicit(&t->master_done, 1, memory_order_relaxed);
		return;
	}
	/* "tour L N" and up to 11 bytes a city: anything longer is junk. */
	if (len > 64 + (size_t)n * 12)
		return;
	if ((tour = malloc((size_t)n * sizeof(int))) == NULL)
		abort();
	if (tsp_report_parse(body, len, n, tour, &claimed) == -1 ||
	    tsp_tour_check(n, tour) == -1) {
		t->host->log(t->host, OCCAMY_LOG_DEBUG, "%s: ignored a malformed tour message", t->id);
		free(tour);
		return;
	}
	/* tsp_dist_compute, not tsp_dist: task_run may be building the matrix. */
	for (i = 0; i < n; i++)
		real += tsp_dist_compute(&t->inst, tour[i], tour[(i + 1) % n]);
	if (real != claimed) {
		t->host->log(t->host, OCCAMY_LOG_DEBUG, "%s: ignored a tour of wrong length", t->id);
		free(tour);
		return;
	}
	pthread_mutex_lock(&t->lock);
	t->reports++;
	if (t->role == ROLE_MASTER && from != NULL && from->kind == OCCAMY_VALUE_STRING)
		plug_seen(t, from->str, from->len);
	if (real < t->inbox_len) {
		int *old = t->inbox;
		t->inbox = tour;
		tour = old;
		t->inbox_len = real;
		atomic_store_explicit(&t->inbox_full, 1, memory_order_release);
	}
	pthread_mutex_unlock(&t->lock);
	free(tour);
}

static void
plug_task_info(const void *task, struct occamy_task_info *info)
{
	const struct plug_task *t = task;

	info->id = t->id;
	info->group = "tsp";
	info->deadline_ms = t->deadline_ms;
	info->priority = 0;
}

const struct occamy_plugin occamy_plugin = {
	OCCAMY_PLUGIN_HEADER,
	.name = "tsp",
	.version = "1.0",
	.init = plug_init,
	.fini = plug_fini,
	.task_new = plug_task_new,
	.task_run = plug_task_run,
	.task_expand = plug_task_expand,
	.task_handle = plug_task_handle,
	.task_info = plug_task_info,
	.task_destroy = plug_task_destroy,
};
