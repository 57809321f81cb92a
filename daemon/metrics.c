/*
 * metrics.c - Prometheus exposition of the scheduler's and transport's
 * numbers, served by libmicrohttpd (no hand-written HTTP parser), plus the
 * Erlang intensity window and per-group task histograms.
 *
 * m->mu guards the window and the group table; the scheduler and transport
 * keep their own counters and hand out snapshots.
 */
#include <arpa/inet.h>
#include <microhttpd.h>
#include <netdb.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "clock.h"
#include "transport.h"
#include "config.h"
#include "log.h"
#include "metrics.h"
#include "records.h"

#define GROUPS_MAX 64 /* distinct task groups tracked; the rest are "other" */
#define DURATION_BUCKETS 12

static const double duration_bounds_s[DURATION_BUCKETS] = {
	0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60, 300, 1800,
};

struct group_stats {
	char name[64];
	/* by slot status (protected/internal/external) and outcome */
	uint64_t buckets[SLOT_STATUS_COUNT][DURATION_BUCKETS + 1];
	double sum_s[SLOT_STATUS_COUNT];
	uint64_t count[SLOT_STATUS_COUNT];
	uint64_t results[SLOT_STATUS_COUNT][6]; /* by enum occamy_status */
};

#define SUSPECTS_MAX 64

struct metrics {
	pthread_mutex_t mu;
	struct sched *sched;
	struct transport *transport;
	struct sched_observer obs;
	char *listen;
	unsigned window, sample_s;
	struct MHD_Daemon *httpd;

	struct erlang_sample *samples; /* ring of window + 1 */
	unsigned nsamples, head;
	double last_sample_t;
	double intensity;

	struct group_stats groups[GROUPS_MAX];
	unsigned ngroups;

	/* Set once before the endpoint starts; read-only after. */
	uint64_t crashes_total;
	struct record_info suspects[SUSPECTS_MAX];
	unsigned nsuspects;
};

double
erlang_intensity(const struct erlang_sample *a, const struct erlang_sample *b,
		 unsigned slots, double fallback_mean_s)
{
	double dt = b->t - a->t, rate, mean;
	uint64_t done = b->completions - a->completions;

	if (dt <= 0 || slots == 0)
		return 0;
	rate = (double)(b->arrivals - a->arrivals) / dt;
	mean = done > 0 ? (b->busy_s - a->busy_s) / (double)done : fallback_mean_s;
	return rate * mean / slots;
}

static const char *const status_label[] = {"empty", "protected", "internal", "external"};
static const char *const result_label[] = {
	"ok", "invalid_body", "invalid_headers", "invalid_task", "internal", "interrupted",
};

static void
on_task_done(void *ctx, const char *group, enum job_kind kind, enum occamy_status res,
	     double seconds)
{
	struct metrics *m = ctx;
	struct group_stats *g = NULL;
	unsigned i, b;

	pthread_mutex_lock(&m->mu);
	for (i = 0; i < m->ngroups; i++)
		if (strcmp(m->groups[i].name, group) == 0)
			g = &m->groups[i];
	if (g == NULL) {
		if (m->ngroups < GROUPS_MAX) {
			g = &m->groups[m->ngroups++];
			snprintf(g->name, sizeof(g->name), "%s", group);
		} else {
			g = &m->groups[GROUPS_MAX - 1];
			snprintf(g->name, sizeof(g->name), "other");
		}
	}
	for (b = 0; b < DURATION_BUCKETS; b++)
		if (seconds <= duration_bounds_s[b])
			break;
	g->buckets[kind][b]++;
	g->sum_s[kind] += seconds;
	g->count[kind]++;
	if ((unsigned)res < 6)
		g->results[kind][res]++;
	pthread_mutex_unlock(&m->mu);
}

struct metrics *
metrics_new(const struct config *cfg)
{
	struct metrics *m = xcalloc(1, sizeof(*m));

	pthread_mutex_init(&m->mu, NULL);
	m->listen = xstrdup(cfg->metrics_listen);
	m->window = cfg->metrics_window ? cfg->metrics_window : 10;
	m->sample_s = cfg->metrics_sample_s ? cfg->metrics_sample_s : 10;
	m->samples = xcalloc(m->window + 1, sizeof(*m->samples));
	m->obs = (struct sched_observer){.ctx = m, .task_done = on_task_done};
	return m;
}

const struct sched_observer *
metrics_observer(struct metrics *m)
{
	return &m->obs;
}

void
metrics_attach(struct metrics *m, struct sched *s)
{
	m->sched = s;
	metrics_sample(m);
}

void
metrics_attach_transport(struct metrics *m, struct transport *t)
{
	m->transport = t;
}

void
metrics_set_crash_report(struct metrics *m, const struct crash_report *rep)
{
	pthread_mutex_lock(&m->mu);
	m->crashes_total = rep->crashes_total;
	m->nsuspects = 0;
	for (size_t i = 0; i < rep->ntasks && m->nsuspects < SUSPECTS_MAX; i++)
		m->suspects[m->nsuspects++] = rep->tasks[i];
	pthread_mutex_unlock(&m->mu);
}

void
metrics_sample(struct metrics *m)
{
	struct sched_stats st;
	struct erlang_sample now;
	const struct erlang_sample *oldest;
	double fallback;

	if (m == NULL || m->sched == NULL)
		return;
	now.t = (double)clock_now_ns() / 1e9;
	pthread_mutex_lock(&m->mu);
	if (m->nsamples > 0 && now.t - m->last_sample_t < m->sample_s - 0.05) {
		pthread_mutex_unlock(&m->mu);
		return;
	}
	pthread_mutex_unlock(&m->mu);
	sched_get_stats(m->sched, &st);
	now.arrivals = st.requests;
	now.completions = st.protected_completed;
	now.busy_s = st.busy_task_seconds;
	fallback = st.protected_completed ?
		st.busy_task_seconds / (double)st.protected_completed : 0;

	pthread_mutex_lock(&m->mu);
	m->last_sample_t = now.t;
	m->samples[m->head] = now;
	m->head = (m->head + 1) % (m->window + 1);
	if (m->nsamples < m->window + 1)
		m->nsamples++;
	oldest = &m->samples[(m->head + m->window + 1 - m->nsamples) % (m->window + 1)];
	m->intensity = m->nsamples > 1 ?
		erlang_intensity(oldest, &now, st.slots, fallback) : 0;
	pthread_mutex_unlock(&m->mu);
}

void
metrics_status_suffix(struct metrics *m, char *buf, size_t len)
{
	struct sched_stats st;
	double intensity;

	if (m->sched == NULL) {
		buf[0] = '\0';
		return;
	}
	sched_get_stats(m->sched, &st);
	pthread_mutex_lock(&m->mu);
	intensity = m->intensity;
	pthread_mutex_unlock(&m->mu);
	snprintf(buf, len, "; protected ratio %.2f; intensity %.2f",
		 st.slots ? (double)st.by_status[SLOT_PROTECTED] / st.slots : 0, intensity);
}

static void
process_usage(double *rss_bytes, double *cpu_s)
{
	struct rusage ru;
	long pages = 0, resident = 0;
	FILE *f = fopen("/proc/self/statm", "r");

	*rss_bytes = 0;
	if (f != NULL) {
		if (fscanf(f, "%ld %ld", &pages, &resident) == 2)
			*rss_bytes = (double)resident * (double)sysconf(_SC_PAGESIZE);
		fclose(f);
	}
	getrusage(RUSAGE_SELF, &ru);
	*cpu_s = (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 +
		 (double)ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}

#define HELP(name, type, text)                                                 \
	fprintf(out, "# HELP " name " " text "\n# TYPE " name " " type "\n")

static void
render_histogram(FILE *out, const char *name, const char *labels,
		 const uint64_t *buckets, const double *bounds, unsigned nb,
		 double sum, uint64_t count)
{
	uint64_t cum = 0;
	unsigned b;

	for (b = 0; b < nb; b++) {
		cum += buckets[b];
		fprintf(out, "%s_bucket{%s%sle=\"%g\"} %llu\n", name, labels,
			labels[0] ? "," : "", bounds[b], (unsigned long long)cum);
	}
	cum += buckets[nb];
	fprintf(out, "%s_bucket{%s%sle=\"+Inf\"} %llu\n", name, labels,
		labels[0] ? "," : "", (unsigned long long)cum);
	fprintf(out, "%s_sum%s%s%s %.9g\n", name, labels[0] ? "{" : "", labels,
		labels[0] ? "}" : "", sum);
	fprintf(out, "%s_count%s%s%s %llu\n", name, labels[0] ? "{" : "", labels,
		labels[0] ? "}" : "", (unsigned long long)count);
}

/* One sample per label of a family: NAME{KEY="LABEL"} VALUE. */
struct labelled {
	const char *label;
	uint64_t value;
};

static void
render_labelled(FILE *out, const char *name, const char *key, const struct labelled *v,
		size_t n)
{
	size_t i;

	for (i = 0; i < n; i++)
		fprintf(out, "%s{%s=\"%s\"} %llu\n", name, key, v[i].label,
			(unsigned long long)v[i].value);
}

#define LABELLED(out, name, key, ...)                                          \
	do {                                                                   \
		const struct labelled l_[] = {__VA_ARGS__};                    \
		render_labelled(out, name, key, l_, sizeof(l_) / sizeof(l_[0])); \
	} while (0)

static void
label_escape(char *dst, size_t len, const char *src)
{
	size_t j = 0;

	for (; *src && j + 2 < len; src++) {
		if (*src == '"' || *src == '\\' || *src == '\n') {
			dst[j++] = '\\';
			dst[j++] = *src == '\n' ? 'n' : *src;
		} else {
			dst[j++] = *src;
		}
	}
	dst[j] = '\0';
}

void
metrics_render(struct metrics *m, FILE *out)
{
	struct sched_stats st;
	struct transport_stats ts = {0};
	static const char *const outcome_label[] = {"ack", "requeue", "retry", "dead_letter"};
	static const char *const drop_label[] = {"full", "expired", "shutdown", "withdrawn"};
	double rss, cpu, intensity;
	unsigned i, k, r;

	sched_get_stats(m->sched, &st);
	if (m->transport)
		transport_get_stats(m->transport, &ts);
	pthread_mutex_lock(&m->mu);
	intensity = m->intensity;
	pthread_mutex_unlock(&m->mu);

	HELP("occamy_slots", "gauge", "Slots by status.");
	for (i = 0; i < SLOT_STATUS_COUNT; i++)
		fprintf(out, "occamy_slots{status=\"%s\"} %u\n", status_label[i], st.by_status[i]);
	HELP("occamy_slots_capacity", "gauge", "Slots configured.");
	fprintf(out, "occamy_slots_capacity %u\n", st.slots);
	HELP("occamy_protected_ratio", "gauge",
	     "Protected slots over total slots: the signal to scale the fleet on.");
	fprintf(out, "occamy_protected_ratio %.6g\n",
		st.slots ? (double)st.by_status[SLOT_PROTECTED] / st.slots : 0.0);
	HELP("occamy_erlang_intensity", "gauge",
	     "Request arrival rate x mean service time / slots over the sample window.");
	fprintf(out, "occamy_erlang_intensity %.6g\n", intensity);
	HELP("occamy_slots_stuck", "gauge",
	     "Tasks that ignored cancellation for longer than kill_timeout.");
	fprintf(out, "occamy_slots_stuck %u\n", st.stuck);
	HELP("occamy_helpers_draining", "gauge",
	     "Cancelled helpers still returning, outside any slot.");
	fprintf(out, "occamy_helpers_draining %u\n", st.draining);

	HELP("occamy_requests_total", "counter", "Requests handed to the scheduler.");
	fprintf(out, "occamy_requests_total %llu\n", (unsigned long long)st.requests);
	HELP("occamy_settlements_total", "counter", "Messages settled, by outcome.");
	for (i = 0; i < 4; i++)
		fprintf(out, "occamy_settlements_total{outcome=\"%s\"} %llu\n", outcome_label[i],
			(unsigned long long)st.settled[i]);
	HELP("occamy_admissions_total", "counter", "Requests started as protected tasks.");
	fprintf(out, "occamy_admissions_total %llu\n", (unsigned long long)st.admitted);
	HELP("occamy_preemptions_total", "counter", "Helpers cancelled to admit a request.");
	fprintf(out, "occamy_preemptions_total %llu\n", (unsigned long long)st.preemptions);
	HELP("occamy_requeued_total", "counter", "Requests requeued without running, by reason.");
	LABELLED(out, "occamy_requeued_total", "reason", {"no_room", st.requeued_no_room},
		 {"kill_timeout", st.requeued_kill_timeout});
	HELP("occamy_admission_latency_seconds", "histogram",
	     "Request arrival to its protected task running.");
	render_histogram(out, "occamy_admission_latency_seconds", "",
			 st.admit_latency_buckets, sched_latency_bounds_s,
			 SCHED_LATENCY_BUCKETS, st.admit_latency_sum_s, st.admit_latency_count);
	HELP("occamy_helpers_started_total", "counter", "Helper tasks started, by kind.");
	LABELLED(out, "occamy_helpers_started_total", "kind",
		 {"internal", st.expansions[SLOT_INTERNAL]},
		 {"external", st.expansions[SLOT_EXTERNAL]});
	HELP("occamy_external_queue_depth", "gauge", "Stored help requests.");
	fprintf(out, "occamy_external_queue_depth %u\n", st.external_queued);
	HELP("occamy_external_dropped_total", "counter", "Help requests dropped, by reason.");
	for (i = 0; i < DROP_REASON_COUNT; i++)
		fprintf(out, "occamy_external_dropped_total{reason=\"%s\"} %llu\n", drop_label[i],
			(unsigned long long)st.external_drops[i]);
	HELP("occamy_errors_total", "counter", "Errors, by kind.");
	LABELLED(out, "occamy_errors_total", "kind", {"make_task", st.make_task_errors},
		 {"helper", st.helper_errors}, {"publish", ts.publish_failures});
	HELP("occamy_control_messages_total", "counter", "Control messages with a task ID, by result.");
	LABELLED(out, "occamy_control_messages_total", "result", {"routed", st.control_routed},
		 {"unmatched", st.control_unmatched}, {"invalid", st.control_invalid},
		 {"dropped", st.control_dropped});

	HELP("occamy_task_duration_seconds", "histogram", "Task run time, by group and slot status.");
	pthread_mutex_lock(&m->mu);
	for (i = 0; i < m->ngroups; i++) {
		const struct group_stats *g = &m->groups[i];
		char esc[140], labels[200];

		label_escape(esc, sizeof(esc), g->name);
		for (k = SLOT_PROTECTED; k < SLOT_STATUS_COUNT; k++) {
			if (g->count[k] == 0)
				continue;
			snprintf(labels, sizeof(labels), "group=\"%s\",status=\"%s\"", esc,
				 status_label[k]);
			render_histogram(out, "occamy_task_duration_seconds", labels,
					 g->buckets[k], duration_bounds_s, DURATION_BUCKETS,
					 g->sum_s[k], g->count[k]);
		}
	}
	HELP("occamy_tasks_total", "counter", "Tasks finished, by group, slot status and result.");
	for (i = 0; i < m->ngroups; i++) {
		const struct group_stats *g = &m->groups[i];
		char esc[140];

		label_escape(esc, sizeof(esc), g->name);
		for (k = SLOT_PROTECTED; k < SLOT_STATUS_COUNT; k++)
			for (r = 0; r < 6; r++)
				if (g->results[k][r])
					fprintf(out, "occamy_tasks_total{group=\"%s\",status=\"%s\","
						"result=\"%s\"} %llu\n", esc, status_label[k],
						result_label[r], (unsigned long long)g->results[k][r]);
	}
	pthread_mutex_unlock(&m->mu);

	HELP("occamy_broker_connected", "gauge", "1 while connected to the broker.");
	fprintf(out, "occamy_broker_connected %d\n", ts.connected ? 1 : 0);
	HELP("occamy_broker_reconnects_total", "counter", "Reconnections after a lost connection.");
	fprintf(out, "occamy_broker_reconnects_total %llu\n", (unsigned long long)ts.reconnects);
	HELP("occamy_deliveries_total", "counter", "Messages received, by queue.");
	LABELLED(out, "occamy_deliveries_total", "queue", {"request", ts.deliveries},
		 {"control", ts.control_deliveries});
	HELP("occamy_replies_total", "counter", "Results published to reply_to and confirmed.");
	fprintf(out, "occamy_replies_total %llu\n", (unsigned long long)ts.replies);
	HELP("occamy_publishes_total", "counter", "Plugin publishes confirmed by the broker.");
	fprintf(out, "occamy_publishes_total %llu\n", (unsigned long long)ts.publishes);
	HELP("occamy_replies_failed_total", "counter",
	     "Replies that could not be delivered, by reason; their results were dead-lettered.");
	LABELLED(out, "occamy_replies_failed_total", "reason", {"unroutable", ts.replies_unroutable},
		 {"refused", ts.replies_refused});
	HELP("occamy_publishes_refused_total", "counter",
	     "Plugin publishes refused before sending: they cannot be encoded.");
	fprintf(out, "occamy_publishes_refused_total %llu\n",
		(unsigned long long)ts.publish_refused);
	HELP("occamy_transport_events_total", "counter",
	     "Requeues, retries, resends and drops by the transport, by path and reason.");
	for (i = 0; i < ts.nevents; i++) {
		char reason[2 * sizeof(ts.events[i].reason)];
		label_escape(reason, sizeof(reason), ts.events[i].reason);
		fprintf(out, "occamy_transport_events_total{path=\"%s\",reason=\"%s\"} %llu\n",
			ts.events[i].path, reason, (unsigned long long)ts.events[i].count);
	}
	HELP("occamy_crashes_total", "counter",
	     "Runs of this state_dir that did not stop cleanly, counted at start.");
	pthread_mutex_lock(&m->mu);
	fprintf(out, "occamy_crashes_total %llu\n", (unsigned long long)m->crashes_total);
	HELP("occamy_crash_suspect", "gauge",
	     "Requests in flight when the previous run crashed (1 each).");
	for (i = 0; i < m->nsuspects; i++) {
		char fp[2 * RECORD_FINGERPRINT_MAX], h[2 * RECORD_NAME_MAX], id[2 * RECORD_NAME_MAX];
		label_escape(fp, sizeof(fp), m->suspects[i].fingerprint);
		label_escape(h, sizeof(h), m->suspects[i].handler);
		label_escape(id, sizeof(id), m->suspects[i].task_id);
		fprintf(out, "occamy_crash_suspect{message=\"%s\",handler=\"%s\",task_id=\"%s\"} 1\n",
			fp, h, id);
	}
	pthread_mutex_unlock(&m->mu);
	HELP("occamy_frame_max_bytes", "gauge", "AMQP frame size negotiated with the broker.");
	fprintf(out, "occamy_frame_max_bytes %u\n", ts.frame_max);
	HELP("occamy_stale_settlements_total", "counter",
	     "Settlements dropped because their connection was gone.");
	fprintf(out, "occamy_stale_settlements_total %llu\n",
		(unsigned long long)ts.stale_settlements);

	process_usage(&rss, &cpu);
	HELP("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.");
	fprintf(out, "process_resident_memory_bytes %.0f\n", rss);
	HELP("process_cpu_seconds_total", "counter", "User and system CPU time spent in seconds.");
	fprintf(out, "process_cpu_seconds_total %.6f\n", cpu);
}

static enum MHD_Result
serve(void *cls, struct MHD_Connection *conn, const char *url, const char *method,
      const char *version, const char *upload, size_t *upload_size, void **req_cls)
{
	struct metrics *m = cls;
	struct MHD_Response *resp;
	enum MHD_Result ret;
	char *text = NULL;
	size_t len = 0;
	unsigned code = MHD_HTTP_OK;
	FILE *out;

	(void)version;
	(void)upload;
	(void)upload_size;
	(void)req_cls;
	if (strcmp(method, "GET") != 0 || strcmp(url, "/metrics") != 0) {
		static const char nf[] = "not found: try GET /metrics\n";
		resp = MHD_create_response_from_buffer(sizeof(nf) - 1, (void *)nf,
						       MHD_RESPMEM_PERSISTENT);
		ret = MHD_queue_response(conn, MHD_HTTP_NOT_FOUND, resp);
		MHD_destroy_response(resp);
		return ret;
	}
	out = open_memstream(&text, &len);
	if (out == NULL)
		return MHD_NO;
	metrics_render(m, out);
	fclose(out);
	resp = MHD_create_response_from_buffer(len, text, MHD_RESPMEM_MUST_FREE);
	MHD_add_response_header(resp, "Content-Type", "text/plain; version=0.0.4; charset=utf-8");
	ret = MHD_queue_response(conn, code, resp);
	MHD_destroy_response(resp);
	return ret;
}

int
metrics_start(struct metrics *m)
{
	struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
				 .ai_flags = AI_NUMERICSERV};
	struct addrinfo *ai = NULL;
	char host[256], *colon;
	unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_ERROR_LOG;
	int e;

	if (m->listen[0] == '\0')
		return 0;
	snprintf(host, sizeof(host), "%s", m->listen);
	colon = strrchr(host, ':');
	if (colon == NULL)
		return -1;
	*colon = '\0';
	if (host[0] == '[') { /* [::1]:9464 */
		memmove(host, host + 1, strlen(host));
		host[strlen(host) - 1] = '\0';
	}
	if ((e = getaddrinfo(host, colon + 1, &hints, &ai)) != 0) {
		log_warnx("metrics: cannot resolve %s: %s", m->listen, gai_strerror(e));
		return -1;
	}
	if (ai->ai_family == AF_INET6)
		flags |= MHD_USE_IPv6;
	m->httpd = MHD_start_daemon(flags, 0, NULL, NULL, serve, m,
				    MHD_OPTION_SOCK_ADDR, ai->ai_addr,
				    MHD_OPTION_CONNECTION_LIMIT, 16u,
				    MHD_OPTION_CONNECTION_TIMEOUT, 10u,
				    MHD_OPTION_END);
	freeaddrinfo(ai);
	if (m->httpd == NULL) {
		log_warnx("metrics: cannot listen on %s", m->listen);
		return -1;
	}
	log_info("metrics on http://%s/metrics", m->listen);
	return 0;
}

void
metrics_stop(struct metrics *m)
{
	if (m != NULL && m->httpd != NULL) {
		MHD_stop_daemon(m->httpd);
		m->httpd = NULL;
	}
}

void
metrics_free(struct metrics *m)
{
	if (m == NULL)
		return;
	metrics_stop(m);
	free(m->samples);
	free(m->listen);
	pthread_mutex_destroy(&m->mu);
	free(m);
}
