/*
 * main.c - occamyd: command line, start-up order, signals (TERM/INT stop,
 * HUP reloads), and the systemd notify protocol (READY, STATUS, WATCHDOG,
 * RELOADING, STOPPING).  The only file with process-wide mutable state: the
 * struct daemon below, owned by the main thread except where noted.
 */
#include <errno.h>
#include <getopt.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sysexits.h>
#include <time.h>
#include <unistd.h>

#include <systemd/sd-daemon.h>

#include "clock.h"
#include "transport.h"
#include "config.h"
#include "loader.h"
#include "log.h"
#include "metrics.h"
#include "records.h"
#include "scheduler.h"

#ifndef OCCAMY_VERSION
#define OCCAMY_VERSION "dev"
#endif
#ifndef OCCAMY_CONFIG_PATH
#define OCCAMY_CONFIG_PATH CONFIG_DEFAULT_PATH
#endif

struct daemon {
	const char *config_path;
	const char *state_dir; /* -s: overrides [server] state_dir */
	struct config cfg;
	struct router *router;
	struct sched *sched;
	struct transport *transport;
	struct metrics *metrics;
	struct records *records;    /* NULL: no record keeping */
	struct crash_report crash;  /* what the previous run left */
	pthread_t transport_thread;

	/* Written by the transport thread, read by main: atomics. */
	atomic_bool broker_up;
	atomic_uint_fast64_t watchdog_usec;
	atomic_uint_fast64_t last_ping_ns;
};

/* What the command line says over the file: -s DIR (one state directory
 * per instance of the template unit). */
static void
config_override(const struct daemon *d, struct config *cfg)
{
	if (d->state_dir != NULL) {
		free(cfg->state_dir);
		cfg->state_dir = xstrdup(d->state_dir);
	}
}

static void
usage(FILE *f)
{
	fprintf(f,
		"usage: occamyd [-fhqtvV] [-c FILE] [-s DIR]\n"
		"  -c FILE  configuration (default %s)\n"
		"  -s DIR   state directory, instead of [server] state_dir\n"
		"  -t       test the configuration and load every plugin, then exit\n"
		"  -f       stay in the foreground (the default: occamyd never forks;\n"
		"           run it under systemd, Type=notify)\n"
		"  -v       more logging (debug)   -q  less logging (warnings)\n"
		"  -V       print the version      -h  this help\n",
		OCCAMY_CONFIG_PATH);
}

static void
sched_config_from(const struct config *c, struct sched_config *sc)
{
	*sc = (struct sched_config){
		.slots = c->slots,
		.expansion_period_ms = c->expansion_period_ms,
		.expansion_slot_buffer = c->expansion_slot_buffer,
		.kill_timeout_ms = c->kill_timeout_ms,
		.shutdown_grace_ms = c->shutdown_grace_s * 1000u,
		.header_task_id = c->header_task_id,
		.external_queue_max = c->external_queue_max,
		.external_ttl_ms = c->external_ttl_s * 1000u,
		.helper_priority = strcmp(c->helper_priority, "normal") == 0 ?
			HELPER_PRIORITY_NORMAL : HELPER_PRIORITY_IDLE,
	};
}

/* Plugins publish through the transport.  A help request that names its
 * master is noted, so that the daemon itself withdraws it when that master
 * ends (see announce_master_ended). */
static int
publish_via_transport(void *ctx, enum publish_target target, const char *name,
		      const struct occamy_kv *headers, size_t nheaders,
		      const void *body, size_t len)
{
	static const enum publish_kind kinds[] = {
		[TARGET_REQUEST] = PUBLISH_REQUEST,
		[TARGET_CONTROL] = PUBLISH_CONTROL,
		[TARGET_HELP] = PUBLISH_HELP,
	};
	struct daemon *d = ctx;
	size_t i;
	int rc = transport_publish(d->transport, kinds[target], name, headers, nheaders,
				   body, len);

	if (rc == 0 && target == TARGET_HELP)
		for (i = 0; i < nheaders; i++)
			if (strcmp(headers[i].key, OCCAMY_HEADER_MASTER) == 0)
				sched_note_help_published(d->sched, headers[i].value);
	return rc;
}

/* The scheduler's withdrawal hook: a master that published help ended, so
 * tell every server (this one included) through the control exchange.  A
 * failed publish is logged by the transport; the help then expires at its
 * deadline, as it would without withdrawal. */
static void
announce_master_ended(void *ctx, const char *master_id)
{
	struct daemon *d = ctx;
	const struct occamy_kv done = {OCCAMY_HEADER_DONE, "1"};

	(void)transport_publish(d->transport, PUBLISH_CONTROL, master_id, &done, 1, "", 0);
}

/* Transport thread: one ping per half watchdog interval, only while the
 * loop turns.  A lost broker is not a reason to be restarted (the loop keeps
 * reconnecting), but a wedged loop is. */
static void
on_transport_turn(void *ctx, bool connected)
{
	struct daemon *d = ctx;
	uint64_t usec = atomic_load(&d->watchdog_usec), now;

	(void)connected;
	if (usec == 0)
		return;
	now = clock_now_ns();
	if (now - atomic_load(&d->last_ping_ns) >= usec * 1000u / 2) {
		atomic_store(&d->last_ping_ns, now);
		sd_notify(0, "WATCHDOG=1");
	}
}

static void
on_transport_state(void *ctx, bool connected)
{
	struct daemon *d = ctx;

	atomic_store(&d->broker_up, connected);
}

/* Transport thread: the answer to `occamyctl status`, one line for the
 * daemon and one per slot. */
static char *
on_status_command(void *ctx, size_t *len)
{
	struct daemon *d = ctx;
	struct sched_stats st;
	struct slot_view *v;
	char host[256] = "?";
	char *text = NULL;
	size_t n = 0;
	unsigned i, nslots;
	FILE *f = open_memstream(&text, &n);

	if (f == NULL)
		return NULL;
	gethostname(host, sizeof(host) - 1);
	sched_get_stats(d->sched, &st);
	fprintf(f, "daemon %s:%d slots %u protected %u internal %u external %u empty %u "
		"stuck %u draining %u requests %llu done %llu preemptions %llu\n",
		host, (int)getpid(), st.slots, st.by_status[SLOT_PROTECTED],
		st.by_status[SLOT_INTERNAL], st.by_status[SLOT_EXTERNAL],
		st.by_status[SLOT_EMPTY], st.stuck, st.draining,
		(unsigned long long)st.requests, (unsigned long long)st.completed,
		(unsigned long long)st.preemptions);
	v = xcalloc(st.slots ? st.slots : 1, sizeof(*v));
	nslots = sched_get_slots(d->sched, v, st.slots);
	for (i = 0; i < nslots && i < st.slots; i++)
		fprintf(f, "slot %u %-9s %-16s %-24s %8.1fs%s\n", i,
			slot_status_name(v[i].status), v[i].group[0] ? v[i].group : "-",
			v[i].task_id[0] ? v[i].task_id : "-", v[i].age_s,
			v[i].stuck ? " STUCK" : "");
	free(v);
	if (d->crash.crashed) {
		fprintf(f, "crashed before this start: pid %ld, crash %llu of this state_dir, "
			"%zu requests in flight\n", d->crash.pid,
			(unsigned long long)d->crash.crashes_total, d->crash.ntasks);
		for (size_t k = 0; k < d->crash.ntasks; k++)
			fprintf(f, "suspect %s handler %s task %s\n", d->crash.tasks[k].fingerprint,
				d->crash.tasks[k].handler[0] ? d->crash.tasks[k].handler : "-",
				d->crash.tasks[k].task_id[0] ? d->crash.tasks[k].task_id : "-");
	}
	fclose(f);
	*len = n;
	return text;
}

/* Record keeping: take state_dir, say what a crash of the previous run
 * left in flight, then keep records of this run's requests. */
static void
records_start(struct daemon *d)
{
	unsigned prefetch = d->cfg.prefetch > 0 ? d->cfg.prefetch : d->cfg.slots;
	int64_t now = clock_wall_ms();

	/* Deliveries in hand: at most the prefetch, twice for a reconnect's
	 * overlap with deliveries of the old connection still settling. */
	d->records = records_open(d->cfg.state_dir, 2 * prefetch + 1, d->config_path,
				  d->cfg.slots, &d->crash);
	if (d->crash.crashed) {
		log_warnx("the previous run (pid %ld) did not stop cleanly: crash %llu of state_dir "
			  "%s, %zu requests were in flight", d->crash.pid,
			  (unsigned long long)d->crash.crashes_total, d->cfg.state_dir,
			  d->crash.ntasks);
		for (size_t i = 0; i < d->crash.ntasks; i++) {
			const struct record_info *ri = &d->crash.tasks[i];
			log_warnx("in flight at the crash: handler %s, task id %s, message %s, for "
				  "%.1f s, lost %lld times before",
				  ri->handler[0] ? ri->handler : "-", ri->task_id[0] ? ri->task_id : "-",
				  ri->fingerprint, (double)(now - ri->started_ms) / 1000.0,
				  (long long)ri->redeliveries);
		}
	}
	if (d->crash.torn > 0)
		log_warnx("state_dir %s: %zu torn records ignored", d->cfg.state_dir, d->crash.torn);
	transport_set_records(d->transport, d->records);
	metrics_set_crash_report(d->metrics, &d->crash);
}

static void
notify_status(struct daemon *d)
{
	struct sched_stats st;
	char line[256];

	sched_get_stats(d->sched, &st);
	snprintf(line, sizeof(line),
		 "STATUS=broker %s; slots %u: %u protected, %u helping, %u empty%s; "
		 "%llu done",
		 atomic_load(&d->broker_up) ? "up" : "down", st.slots,
		 st.by_status[SLOT_PROTECTED],
		 st.by_status[SLOT_INTERNAL] + st.by_status[SLOT_EXTERNAL],
		 st.by_status[SLOT_EMPTY], st.stuck ? "; STUCK" : "",
		 (unsigned long long)st.completed);
	if (d->metrics != NULL) {
		size_t n = strlen(line);
		metrics_status_suffix(d->metrics, line + n, sizeof(line) - n);
	}
	sd_notify(0, line);
}

static void
print_errors(const char *errs)
{
	fprintf(stderr, "%s%s", errs, errs[0] && errs[strlen(errs) - 1] != '\n' ? "\n" : "");
}

/* Keys read only at start: the transport, the metrics endpoint, the
 * scheduler's slots and helper threads, and every plugin's host table are
 * built from them.  A reload keeps their running values, so that no part of
 * the daemon runs with a value the others do not share. */
enum key_type { KEY_UNSIGNED, KEY_BOOL, KEY_STRING };

static const struct restart_key {
	const char *name;
	enum key_type type;
	size_t offset;
} restart_keys[] = {
#define KEY(name, type, field) {name, type, offsetof(struct config, field)}
	KEY("[server] slots", KEY_UNSIGNED, slots),
	KEY("[server] helper_priority", KEY_STRING, helper_priority),
	KEY("[server] header_task_id", KEY_STRING, header_task_id),
	KEY("[server] header_handler", KEY_STRING, header_handler),
	KEY("[server] state_dir", KEY_STRING, state_dir),
	KEY("[server] crash_limit", KEY_UNSIGNED, crash_limit),
	KEY("[amqp] uri", KEY_STRING, uri),
	KEY("[amqp] password_file", KEY_STRING, password_file),
	KEY("[amqp] heartbeat_s", KEY_UNSIGNED, heartbeat_s),
	KEY("[amqp] tls_ca", KEY_STRING, tls_ca),
	KEY("[amqp] tls_cert", KEY_STRING, tls_cert),
	KEY("[amqp] tls_key", KEY_STRING, tls_key),
	KEY("[amqp] tls_verify_peer", KEY_BOOL, tls_verify_peer),
	KEY("[amqp] tls_verify_hostname", KEY_BOOL, tls_verify_hostname),
	KEY("[amqp] request_queue", KEY_STRING, request_queue),
	KEY("[amqp] request_exchange", KEY_STRING, request_exchange),
	KEY("[amqp] control_exchange", KEY_STRING, control_exchange),
	KEY("[amqp] dead_letter_exchange", KEY_STRING, dead_letter_exchange),
	KEY("[amqp] dead_letter_queue", KEY_STRING, dead_letter_queue),
	KEY("[amqp] queue_type", KEY_STRING, queue_type),
	KEY("[amqp] prefetch", KEY_UNSIGNED, prefetch),
	KEY("[amqp] delivery_limit", KEY_UNSIGNED, delivery_limit),
	KEY("[amqp] retry_delay_ms", KEY_UNSIGNED, retry_delay_ms),
	KEY("[amqp] retry_delay_max_ms", KEY_UNSIGNED, retry_delay_max_ms),
	KEY("[metrics] listen", KEY_STRING, metrics_listen),
	KEY("[metrics] window", KEY_UNSIGNED, metrics_window),
	KEY("[metrics] sample_s", KEY_UNSIGNED, metrics_sample_s),
#undef KEY
};

/* Give ncfg the running value of every restart key; name those that
 * differed, comma separated, in buf.  Returns how many did. */
static unsigned
keep_restart_keys(const struct config *run, struct config *ncfg, char *buf, size_t len)
{
	unsigned n = 0;
	size_t i, used = 0;

	buf[0] = '\0';
	for (i = 0; i < sizeof(restart_keys) / sizeof(restart_keys[0]); i++) {
		const struct restart_key *k = &restart_keys[i];
		const void *from = (const char *)run + k->offset;
		void *to = (char *)ncfg + k->offset;
		bool same = false;

		switch (k->type) {
		case KEY_UNSIGNED:
			same = *(const unsigned *)from == *(unsigned *)to;
			*(unsigned *)to = *(const unsigned *)from;
			break;
		case KEY_BOOL:
			same = *(const bool *)from == *(bool *)to;
			*(bool *)to = *(const bool *)from;
			break;
		case KEY_STRING:
			same = strcmp(*(char *const *)from, *(char **)to) == 0;
			free(*(char **)to);
			*(char **)to = xstrdup(*(char *const *)from);
			break;
		}
		if (same)
			continue;
		if (used < len) {
			int w = snprintf(buf + used, len - used, "%s%s", n ? ", " : "", k->name);
			used += w > 0 ? (size_t)w : 0;
		}
		n++;
	}
	return n;
}

/* Reload on SIGHUP: a new config with errors is refused and the old one
 * keeps running.  Keys that change only at restart keep their running
 * values, and one line names those that the new file changed. */
static void
reload(struct daemon *d)
{
	struct config ncfg;
	struct plugin_set *set;
	struct sched_config sc;
	char errs[8192] = "";
	char names[512], kept[1024];
	unsigned nkept;

	sd_notifyf(0, "RELOADING=1\nMONOTONIC_USEC=%llu",
		   (unsigned long long)(clock_now_ns() / 1000u));
	log_info("reloading %s", d->config_path);
	if (config_load(d->config_path, &ncfg, errs, sizeof(errs)) != 0) {
		log_warnx("reload refused, keeping the running configuration:\n%s", errs);
		goto done;
	}
	config_override(d, &ncfg);
	if (transport_check_config(&ncfg, errs, sizeof(errs)) != 0) {
		log_warnx("reload refused, keeping the running configuration:\n%s", errs);
		config_free(&ncfg);
		goto done;
	}
	nkept = keep_restart_keys(&d->cfg, &ncfg, kept, sizeof(kept));
	/* The file checked the buffer against its own slots, not ours. */
	if (ncfg.expansion_slot_buffer >= ncfg.slots) {
		log_warnx("reload refused, keeping the running configuration:\n"
			  "%s: [server] key 'expansion_slot_buffer': %u is not less than the "
			  "running slots (%u); slots changes at restart",
			  ncfg.file, ncfg.expansion_slot_buffer, ncfg.slots);
		config_free(&ncfg);
		goto done;
	}
	set = plugin_set_load(d->router, &ncfg, errs, sizeof(errs));
	if (set == NULL) {
		log_warnx("reload refused, keeping the running configuration:\n%s", errs);
		config_free(&ncfg);
		goto done;
	}
	router_install(d->router, set, &ncfg);
	sched_config_from(&ncfg, &sc);
	sched_reconfigure(d->sched, &sc);
	if (nkept > 0)
		log_warnx("reload: %s %s %s a restart; keeping %s old value%s",
			  nkept == 1 ? "key" : "keys", kept, nkept == 1 ? "needs" : "need",
			  nkept == 1 ? "its" : "their", nkept == 1 ? "" : "s");
	{
		struct config old = d->cfg;
		d->cfg = ncfg;
		config_free(&old);
	}
	router_describe(d->router, names, sizeof(names));
	log_info("reloaded: plugins %s", names);
done:
	sd_notify(0, "READY=1");
	notify_status(d);
}

static void *
transport_main(void *arg)
{
	transport_run(arg);
	return NULL;
}

int
main(int argc, char **argv)
{
	struct daemon d = {.config_path = OCCAMY_CONFIG_PATH};
	struct transport_hooks hooks = {.ctx = &d, .turn = on_transport_turn,
					.state = on_transport_state,
					.status = on_status_command};
	struct plugin_set *set;
	struct sched_config sc;
	struct task_source src;
	char errs[8192] = "";
	char names[512];
	bool test_only = false;
	int verbosity = 0, ch, sig;
	uint64_t usec = 0;
	sigset_t sigs;

	while ((ch = getopt(argc, argv, "c:fhqs:tvV")) != -1) {
		switch (ch) {
		case 'c': d.config_path = optarg; break;
		case 's': d.state_dir = optarg; break;
		case 'f': break;
		case 'h': usage(stdout); return 0;
		case 'q': verbosity--; break;
		case 't': test_only = true; break;
		case 'v': verbosity++; break;
		case 'V': printf("occamyd %s (plugin ABI %d.%d)\n", OCCAMY_VERSION,
				 OCCAMY_ABI_MAJOR, OCCAMY_ABI_MINOR);
			return 0;
		default: usage(stderr); return EX_USAGE;
		}
	}
	if (optind != argc) {
		usage(stderr);
		return EX_USAGE;
	}
	log_init(verbosity);

	/* Signals are taken synchronously by this thread only; every thread
	 * started below inherits the mask. */
	sigemptyset(&sigs);
	sigaddset(&sigs, SIGTERM);
	sigaddset(&sigs, SIGINT);
	sigaddset(&sigs, SIGHUP);
	pthread_sigmask(SIG_BLOCK, &sigs, NULL);
	signal(SIGPIPE, SIG_IGN);

	if (config_load(d.config_path, &d.cfg, errs, sizeof(errs)) != 0) {
		print_errors(errs);
		return EX_CONFIG;
	}
	config_override(&d, &d.cfg);
	if (transport_check_config(&d.cfg, errs, sizeof(errs)) != 0) {
		print_errors(errs);
		config_free(&d.cfg);
		return EX_CONFIG;
	}
	d.router = router_new(&d.cfg);
	set = plugin_set_load(d.router, &d.cfg, errs, sizeof(errs));
	if (set == NULL) {
		print_errors(errs);
		router_free(d.router);
		config_free(&d.cfg);
		return EX_CONFIG;
	}
	if (test_only) {
		plugin_set_release(set);
		router_free(d.router);
		config_free(&d.cfg);
		printf("configuration OK\n");
		return 0;
	}
	router_install(d.router, set, &d.cfg);

	sched_config_from(&d.cfg, &sc);
	src = router_task_source(d.router);
	d.metrics = metrics_new(&d.cfg);
	d.sched = sched_new(&sc, &src, metrics_observer(d.metrics));
	metrics_attach(d.metrics, d.sched);
	if (sd_watchdog_enabled(0, &usec) > 0) {
		atomic_store(&d.watchdog_usec, usec);
		/* Ping at half the interval: turn at least every quarter. */
		hooks.turn_max_ms = usec / 4000 > 0 ? (unsigned)(usec / 4000) : 1;
	}
	d.transport = transport_new(&d.cfg, d.sched, &hooks);
	metrics_attach_transport(d.metrics, d.transport);
	records_start(&d);
	router_set_publisher(d.router, publish_via_transport, &d);
	sched_set_withdrawal(d.sched, announce_master_ended, &d);
	if (pthread_create(&d.transport_thread, NULL, transport_main, d.transport) != 0)
		fatal("cannot start the transport thread");
	pthread_setname_np(d.transport_thread, "amqp");
	if (metrics_start(d.metrics) != 0) {
		log_warnx("metrics endpoint %s could not start", d.cfg.metrics_listen);
	}

	router_describe(d.router, names, sizeof(names));
	log_info("occamyd %s started: %u slots, plugins %s, helpers %s", OCCAMY_VERSION,
		 d.cfg.slots, names[0] ? names : "(none)", sched_helper_mode(d.sched));
	sd_notify(0, "READY=1");
	notify_status(&d);

	for (;;) {
		struct timespec tick = {.tv_sec = 1};

		sig = sigtimedwait(&sigs, NULL, &tick);
		if (sig < 0) {
			if (errno != EAGAIN && errno != EINTR)
				fatal("sigtimedwait");
			metrics_sample(d.metrics);
			notify_status(&d);
			/* Plugins whose last task ended meanwhile: fini runs
			 * here, on the main thread, as plugin.h promises. */
			router_reap(d.router);
			continue;
		}
		if (sig == SIGHUP) {
			reload(&d);
			continue;
		}
		break;
	}

	log_info("%s: shutting down (grace %u s)", strsignal(sig), d.cfg.shutdown_grace_s);
	sd_notify(0, "STOPPING=1");
	/* Nothing new first, then the grace; the running requests are still
	 * settled on the same connection. */
	transport_quiesce(d.transport);
	sched_shutdown(d.sched);
	router_set_publisher(d.router, NULL, NULL);
	sched_set_withdrawal(d.sched, NULL, NULL);
	transport_stop(d.transport);
	pthread_join(d.transport_thread, NULL);
	metrics_stop(d.metrics);
	sched_free(d.sched);
	transport_free(d.transport);
	records_close(d.records);
	crash_report_free(&d.crash);
	metrics_free(d.metrics);
	router_free(d.router);
	config_free(&d.cfg);
	log_info("stopped");
	return 0;
}
