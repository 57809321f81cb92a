/*
 * log.c - logging to stderr for the whole daemon, and the x-allocators
 * that make allocation failure fatal.
 */
#include <errno.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "log.h"

/* Set once at start-up, read by every thread: atomics, no lock. */
static atomic_int log_level = LOG_INFO;
static atomic_bool log_journal;

void
log_init(int verbosity)
{
	const char *js = getenv("JOURNAL_STREAM");

	atomic_store(&log_journal, js != NULL && js[0] != '\0');
	log_set_verbosity(verbosity);
}

void
log_set_verbosity(int verbosity)
{
	atomic_store(&log_level, verbosity < 0 ? LOG_WARNING :
				 verbosity > 0 ? LOG_DEBUG : LOG_INFO);
}

int
log_enabled(int priority)
{
	return priority <= atomic_load(&log_level);
}

static const char *
level_name(int priority)
{
	switch (priority) {
	case LOG_EMERG: case LOG_ALERT: case LOG_CRIT: return "crit";
	case LOG_ERR: return "error";
	case LOG_WARNING: return "warning";
	case LOG_NOTICE: return "notice";
	case LOG_INFO: return "info";
	default: return "debug";
	}
}

void
log_emit(int priority, const char *fmt, va_list ap)
{
	char line[2048];
	size_t n = 0;

	if (!log_enabled(priority))
		return;
	if (atomic_load(&log_journal)) {
		n = (size_t)snprintf(line, sizeof(line), "<%d>", priority);
	} else {
		struct timespec ts;
		struct tm tm;

		clock_gettime(CLOCK_REALTIME, &ts);
		gmtime_r(&ts.tv_sec, &tm);
		n = strftime(line, sizeof(line), "%Y-%m-%dT%H:%M:%S", &tm);
		n += (size_t)snprintf(line + n, sizeof(line) - n, ".%03ldZ %s ",
				      ts.tv_nsec / 1000000, level_name(priority));
	}
	if (n < sizeof(line)) {
		int m = vsnprintf(line + n, sizeof(line) - n, fmt, ap);
		if (m > 0)
			n += (size_t)m;
	}
	if (n > sizeof(line) - 2)
		n = sizeof(line) - 2;
	line[n++] = '\n';
	/* One write per line keeps lines whole across threads. */
	(void)!write(STDERR_FILENO, line, n);
}

void
log_msg(int priority, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	log_emit(priority, fmt, ap);
	va_end(ap);
}

static void
log_with_errno(int priority, int saved, const char *fmt, va_list ap)
{
	char buf[1536];

	vsnprintf(buf, sizeof(buf), fmt, ap);
	log_msg(priority, "%s: %s", buf, strerror(saved));
}

/* The verbs, OpenBSD's four and two more levels: the x-less ones append
 * strerror(errno) as it was on entry; the fatal ones then exit. */
#define LOG_VERB(name, prio, then)                                             \
	void name(const char *fmt, ...)                                        \
	{                                                                      \
		va_list ap;                                                    \
		va_start(ap, fmt);                                             \
		log_emit(prio, fmt, ap);                                       \
		va_end(ap);                                                    \
		then;                                                          \
	}
#define LOG_VERB_ERRNO(name, prio, then)                                       \
	void name(const char *fmt, ...)                                        \
	{                                                                      \
		int saved = errno;                                             \
		va_list ap;                                                    \
		va_start(ap, fmt);                                             \
		log_with_errno(prio, saved, fmt, ap);                          \
		va_end(ap);                                                    \
		then;                                                          \
	}
LOG_VERB_ERRNO(log_warn, LOG_WARNING, )
LOG_VERB(log_warnx, LOG_WARNING, )
LOG_VERB(log_info, LOG_INFO, )
LOG_VERB(log_debug, LOG_DEBUG, )
LOG_VERB_ERRNO(fatal, LOG_CRIT, exit(1))
LOG_VERB(fatalx, LOG_CRIT, exit(1))

void *
xmalloc(size_t n)
{
	void *p = malloc(n ? n : 1);

	if (p == NULL)
		fatalx("out of memory (%zu bytes)", n);
	return p;
}

void *
xcalloc(size_t n, size_t size)
{
	void *p = calloc(n ? n : 1, size ? size : 1);

	if (p == NULL)
		fatalx("out of memory (%zu x %zu bytes)", n, size);
	return p;
}

void *
xrealloc(void *p, size_t n)
{
	void *q = realloc(p, n ? n : 1);

	if (q == NULL)
		fatalx("out of memory (%zu bytes)", n);
	return q;
}

char *
xstrdup(const char *s)
{
	char *d = strdup(s ? s : "");

	if (d == NULL)
		fatalx("out of memory");
	return d;
}

void
free_all(void *const *ptrs, size_t n)
{
	for (size_t i = 0; i < n; i++)
		free(ptrs[i]);
}
