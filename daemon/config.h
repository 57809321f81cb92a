/*
 * config.h - occamy.ini: the settings, their defaults, and the parser
 * (inih) that fills them with file/line/key errors.
 */
#ifndef OCCAMY_CONFIG_H
#define OCCAMY_CONFIG_H

#include <stdbool.h>
#include <stddef.h>

#define CONFIG_DEFAULT_PATH "/etc/occamy/occamy.ini"
#define EX_CONFIG_STATUS 78 /* sysexits EX_CONFIG */

struct plugin_option {
	char *key;
	char *value;
	int line;
};

struct plugin_config {
	char *name;      /* from [plugin NAME] */
	char *path;      /* file in plugin_dir, or absolute */
	int line;        /* line of the section header */
	struct plugin_option *options;
	size_t noptions;
};

struct config {
	char *file;

	/* [server] */
	unsigned slots;                 /* default: online CPUs */
	unsigned expansion_period_ms;   /* default 1000 */
	unsigned expansion_slot_buffer; /* default 0 */
	unsigned kill_timeout_ms;       /* default 1000 */
	unsigned shutdown_grace_s;      /* default 30 */
	char *header_task_id;           /* default "task-id" */
	char *header_handler;           /* default "handler" */
	char *default_handler;          /* default "" (none) */
	unsigned external_queue_max;    /* default 1024 */
	unsigned external_ttl_s;        /* default 60 */
	char *plugin_dir;               /* default PREFIX/lib/occamy/plugins */
	char *helper_priority;          /* "idle" (default) or "normal" */
	char *state_dir;                /* default /var/lib/occamy */
	unsigned crash_limit;           /* default 2; 0 = off */

	/* [amqp] */
	char *uri;                      /* default amqp://guest@127.0.0.1:5672/;
					 * one or more, whitespace-separated
					 * (config_uri_*) */
	char *password_file;            /* default "" */
	unsigned heartbeat_s;           /* default 30 */
	char *tls_ca;                   /* default "" */
	char *tls_cert;
	char *tls_key;
	bool tls_verify_peer;           /* default true */
	bool tls_verify_hostname;       /* default true */
	char *request_queue;            /* default "occamy.requests" */
	char *request_exchange;         /* default "occamy.requests" */
	char *control_exchange;         /* default "occamy.control" */
	char *dead_letter_exchange;     /* default "occamy.dead" */
	char *dead_letter_queue;        /* default "occamy.dead" */
	char *queue_type;               /* "classic" (default) or "quorum" */
	unsigned prefetch;              /* default 0 = slots */
	unsigned delivery_limit;        /* default 5: attempts; 0 = no limit */
	unsigned retry_delay_ms;        /* default 1000; 0 = retry at once */
	unsigned retry_delay_max_ms;    /* default 60000 */

	/* [metrics] */
	char *metrics_listen;           /* "" = off */
	unsigned metrics_window;        /* samples, default 10 */
	unsigned metrics_sample_s;      /* default 10 */

	struct plugin_config *plugins;
	size_t nplugins;
};

/* Parse path into *out (defaults first).  On failure returns -1 after
 * writing every error, in line order, one per line (joined by '\n', no
 * final newline), into errbuf (truncated to errlen); *out is then freed
 * and zeroed.  Forms: "FILE:LINE: [section] key 'K': reason",
 * "FILE:LINE: [section]: reason", "FILE:LINE: reason" and
 * "FILE: cannot open: strerror".  [metrics] keys are listen, window and
 * sample_s; every other key is named like its field. */
int config_load(const char *path, struct config *out, char *errbuf, size_t errlen);
void config_free(struct config *c);
/* Free n options, their keys and values, and the array (which may be
 * NULL if n is 0). */
void plugin_options_free(struct plugin_option *o, size_t n);

/* [amqp] uri holds one or more URIs separated by whitespace (one per node
 * of a cluster); config_load() has checked that each parses.  How many: */
size_t config_uri_count(const char *uri);
/* Copy URI number i (from 0) into buf.  Returns 0, or -1 (buf "") if there
 * is no such URI or it does not fit in len bytes with its NUL. */
int config_uri_nth(const char *uri, size_t i, char *buf, size_t len);
/* All of them, as a malloc'ed NULL-terminated array (*n = its length, if n
 * is not NULL); free it with config_uri_split_free (which also wipes the
 * strings: they may hold a password). */
char **config_uri_split(const char *uri, size_t *n);
void config_uri_split_free(char **v);
/* 0 if every URI of the list parses as rabbitmq-c parses it; else -1 and
 * why, naming the URI by its position, never echoing it (a password). */
int config_uri_check(const char *uri, char *why, size_t whylen);
/* The index (0..n-1) a daemon starts at: a hash of its host name and pid,
 * so a fleet spreads across the nodes; 0 if n is 0. */
size_t config_uri_start(size_t n, const char *host, unsigned long pid);

#endif /* OCCAMY_CONFIG_H */
