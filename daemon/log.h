/*
 * log.h - one line per event on stderr: sd-daemon "<N>" priority prefixes
 * when stderr is the journal, timestamps otherwise.  Thread-safe.
 */
#ifndef OCCAMY_LOG_H
#define OCCAMY_LOG_H

#include <stdarg.h>
#include <syslog.h>

/* verbosity: -1 warnings and errors only, 0 info, 1 debug. */
void log_init(int verbosity);
void log_set_verbosity(int verbosity);
int log_enabled(int priority);

void log_emit(int priority, const char *fmt, va_list ap)
	__attribute__((format(printf, 2, 0)));
void log_msg(int priority, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* log_warn appends strerror(errno); log_warnx does not. */
void log_warn(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void log_warnx(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void log_info(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void log_debug(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void fatal(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
void fatalx(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));

/* Allocation failure is fatal, not a code path. */
void *xmalloc(size_t n);
void *xcalloc(size_t n, size_t size);
void *xrealloc(void *p, size_t n);
char *xstrdup(const char *s);

/* free() every pointer named: FREE_ALL(o->name, o->path, o).  For the
 * owned fields of a struct, freed together at its end. */
void free_all(void *const *ptrs, size_t n);
#define FREE_ALL(...)                                                          \
	free_all((void *const[]){__VA_ARGS__},                                 \
		 sizeof((void *const[]){__VA_ARGS__}) / sizeof(void *))

#endif /* OCCAMY_LOG_H */
