/*
 * amqp_smoke.c - drives the transport (daemon/transport*.c) against a real broker with a fake
 * scheduler, for manual and scripted checks of the transport.
 *
 *   amqp_smoke URI [classic|quorum] [PREFIX] [DELIVERY_LIMIT]
 *
 * Declares PREFIX.requests / PREFIX.control / PREFIX.dead and runs until
 * SIGINT or SIGTERM.  The fake scheduler settles each request on a thread
 * of its own, as the header "action" says:
 *   ack (default)  ack with the reply "reply:" + body, text/plain
 *   requeue-once   requeue the first delivery of a body, then ack
 *   dead           dead-letter with reason "smoke: invalid input"
 *   retry          retry (internal error) every time
 *   hold           keep it until the connection is lost, then requeue
 *   publish        publish a control message for task "smoke-task" and a
 *                  request with action=ack from this thread, then ack
 * One line per event goes to stdout ("REQUEST ...", "CONTROL ...",
 * "CANCEL", "STATE ...", and "STATS ..." at exit) for scripts to check.
 * Linked with the transport's objects and a fake scheduler (this file).
 */
#include <inttypes.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "config.h"
#include "log.h"
#include "transport_int.h"

struct sched {
	pthread_mutex_t lock;
	struct message *held[64];
	size_t nheld;
	char seen[64][256];
	size_t nseen;
};

static struct sched smoke_sched = {.lock = PTHREAD_MUTEX_INITIALIZER};
static struct transport *smoke_transport;

static void
say(const char *fmt, ...)
{
	char line[1024];
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(line, sizeof(line) - 1, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if ((size_t)n > sizeof(line) - 2)
		n = (int)sizeof(line) - 2;
	line[n++] = '\n';
	(void)!write(STDOUT_FILENO, line, (size_t)n);
}

static const char *
header_str(const struct message *m, const char *key, const char *def)
{
	const struct occamy_header *h = occamy_headers_find(&m->headers, key);

	return h != NULL && h->kind == OCCAMY_VALUE_STRING ? h->str : def;
}

static void
settle(struct message *m, enum settle_outcome o, const char *reason, const char *reply)
{
	struct settlement s = {.outcome = o, .reason = reason};

	if (reply != NULL) {
		size_t n = strlen(reply);
		s.reply = xmalloc(n);
		memcpy(s.reply, reply, n);
		s.reply_len = n;
		s.content_type = "text/plain";
	}
	m->ops->settle(m, &s);
}

static void *
request_work(void *arg)
{
	struct message *m = arg;
	const char *action = header_str(m, "action", "ack");
	char body[256], *reply = xmalloc(m->len + 7);

	snprintf(body, sizeof(body), "%.*s", (int)m->len, (const char *)m->body);
	memcpy(reply, "reply:", 6);
	memcpy(reply + 6, m->body, m->len);
	reply[m->len + 6] = '\0';
	if (strcmp(action, "dead") == 0) {
		settle(m, SETTLE_DEAD_LETTER, "smoke: invalid input", NULL);
	} else if (strcmp(action, "retry") == 0) {
		settle(m, SETTLE_RETRY, "smoke: internal error", NULL);
	} else if (strcmp(action, "requeue-once") == 0) {
		bool first = true;
		pthread_mutex_lock(&smoke_sched.lock);
		for (size_t i = 0; i < smoke_sched.nseen; i++)
			if (strcmp(smoke_sched.seen[i], body) == 0)
				first = false;
		if (first && smoke_sched.nseen < 64)
			memcpy(smoke_sched.seen[smoke_sched.nseen++], body, sizeof(body));
		pthread_mutex_unlock(&smoke_sched.lock);
		if (first)
			settle(m, SETTLE_REQUEUE, "smoke: requeue once", NULL);
		else
			settle(m, SETTLE_ACK, NULL, reply);
	} else if (strcmp(action, "hold") == 0) {
		pthread_mutex_lock(&smoke_sched.lock);
		if (smoke_sched.nheld < 64) {
			smoke_sched.held[smoke_sched.nheld++] = m;
			m = NULL;
		}
		pthread_mutex_unlock(&smoke_sched.lock);
		if (m != NULL)
			settle(m, SETTLE_REQUEUE, "smoke: too many held", NULL);
	} else if (strcmp(action, "publish") == 0) {
		const struct occamy_kv kv[] = {{"origin", "smoke"}, {"action", "ack"}};
		int a = transport_publish(smoke_transport, PUBLISH_CONTROL, "smoke-task", kv, 1,
					  body, strlen(body));
		int b = transport_publish(smoke_transport, PUBLISH_REQUEST, "smoke", kv, 2,
					  "from-plugin", 11);
		say("PUBLISHED control=%d request=%d", a, b);
		settle(m, SETTLE_ACK, NULL, reply);
	} else {
		settle(m, SETTLE_ACK, NULL, reply);
	}
	free(reply);
	return NULL;
}

void
sched_submit_request(struct sched *s, struct message *m)
{
	const struct delivery *d = (const struct delivery *)m;
	char kinds[HEADERS_MAX + 1];
	pthread_t th;

	(void)s;
	/* One letter per header: S(tring) I(nt) F(loat) B(ool) O(ther). */
	for (size_t i = 0; i < m->headers.count; i++)
		kinds[i] = "SIFBO"[m->headers.items[i].kind];
	kinds[m->headers.count] = '\0';
	say("REQUEST body=%.*s action=%s handler=%s attempts=%" PRIu64 " headers=%zu kinds=%s",
	    (int)m->len < 64 ? (int)m->len : 64, (const char *)m->body,
	    header_str(m, "action", "-"), header_str(m, "handler", "-"), d->attempts,
	    m->headers.count, kinds);
	if (pthread_create(&th, NULL, request_work, m) != 0)
		fatalx("pthread_create");
	pthread_detach(th);
}

/* No workers here to hold back: each request has its own thread. */
void
sched_submit_request_held(struct sched *s, struct message *m, struct sched_held_wakeups *held)
{
	(void)held;
	sched_submit_request(s, m);
}

void
sched_wake_held(struct sched_held_wakeups *held)
{
	held->n = 0;
}

void
sched_submit_control(struct sched *s, struct message *m)
{
	(void)s;
	say("CONTROL body=%.*s task-id=%s origin=%s", (int)m->len, (const char *)m->body,
	    header_str(m, "task-id", "-"), header_str(m, "origin", "-"));
	settle(m, SETTLE_ACK, NULL, NULL);
}

void
sched_cancel_requests(struct sched *s)
{
	size_t n;

	pthread_mutex_lock(&s->lock);
	n = s->nheld;
	s->nheld = 0;
	pthread_mutex_unlock(&s->lock);
	say("CANCEL held=%zu", n);
	/* Settle from here, on the owner thread, as a scheduler may. */
	for (size_t i = 0; i < n; i++)
		settle(s->held[i], SETTLE_REQUEUE, "smoke: cancelled", NULL);
}

static void
on_state(void *ctx, bool connected)
{
	(void)ctx;
	say("STATE connected=%d", connected);
}

static unsigned long turns;

static void
on_turn(void *ctx, bool healthy)
{
	(void)ctx;
	(void)healthy;
	turns++;
}

static void *
run_thread(void *arg)
{
	transport_run(arg);
	return NULL;
}

int
main(int argc, char **argv)
{
	struct config cfg;
	struct transport_hooks hooks = {.turn = on_turn, .state = on_state};
	struct transport_stats st;
	char rq[128], cx[128], dl[128];
	const char *prefix = argc > 3 ? argv[3] : "smoke";
	pthread_t th;
	sigset_t set;
	int sig;

	if (argc < 2) {
		fprintf(stderr, "usage: amqp_smoke URI [classic|quorum] [PREFIX] [LIMIT]\n");
		return 2;
	}
	log_init(getenv("SMOKE_DEBUG") != NULL ? 1 : 0);
	snprintf(rq, sizeof(rq), "%s.requests", prefix);
	snprintf(cx, sizeof(cx), "%s.control", prefix);
	snprintf(dl, sizeof(dl), "%s.dead", prefix);
	memset(&cfg, 0, sizeof(cfg));
	cfg.slots = 4;
	cfg.header_task_id = "task-id";
	cfg.header_handler = "handler";
	cfg.uri = argv[1];
	cfg.password_file = getenv("SMOKE_PASSWORD_FILE") ? getenv("SMOKE_PASSWORD_FILE") : "";
	cfg.heartbeat_s = getenv("SMOKE_HEARTBEAT") ? (unsigned)atoi(getenv("SMOKE_HEARTBEAT")) : 10;
	cfg.tls_ca = getenv("SMOKE_TLS_CA") ? getenv("SMOKE_TLS_CA") : "";
	cfg.tls_cert = "";
	cfg.tls_key = "";
	cfg.tls_verify_peer = true;
	cfg.tls_verify_hostname = true;
	cfg.request_queue = rq;
	cfg.request_exchange = rq;
	cfg.control_exchange = cx;
	cfg.dead_letter_exchange = dl;
	cfg.dead_letter_queue = dl;
	cfg.queue_type = argc > 2 ? argv[2] : "classic";
	cfg.delivery_limit = argc > 4 ? (unsigned)atoi(argv[4]) : 3;

	sigemptyset(&set);
	sigaddset(&set, SIGINT);
	sigaddset(&set, SIGTERM);
	pthread_sigmask(SIG_BLOCK, &set, NULL);

	smoke_transport = transport_new(&cfg, &smoke_sched, &hooks);
	if (pthread_create(&th, NULL, run_thread, smoke_transport) != 0)
		fatalx("pthread_create");
	sigwait(&set, &sig);
	say("STOPPING");
	transport_stop(smoke_transport);
	pthread_join(th, NULL);
	transport_get_stats(smoke_transport, &st);
	say("STATS connected=%d reconnects=%" PRIu64 " deliveries=%" PRIu64
	    " control=%" PRIu64 " acks=%" PRIu64 " requeues=%" PRIu64
	    " dead_letters=%" PRIu64 " replies=%" PRIu64 " publishes=%" PRIu64
	    " publish_failures=%" PRIu64 " stale=%" PRIu64 " turns=%lu",
	    st.connected, st.reconnects, st.deliveries, st.control_deliveries, st.acks,
	    st.requeues, st.dead_letters, st.replies, st.publishes, st.publish_failures,
	    st.stale_settlements, turns);
	/* Settle what is still held after the loop returned and after
	 * transport_free(): the last settlement frees the transport. */
	transport_free(smoke_transport);
	sched_cancel_requests(&smoke_sched);
	return 0;
}
