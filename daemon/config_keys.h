/*
 * config_keys.h - private to config.c and config_keys.c: the sections of
 * occamy.ini, the keyword table behind an opaque struct keyword, and the
 * allocators whose failure aborts (config.c links without log.c).
 */
#ifndef OCCAMY_CONFIG_KEYS_H
#define OCCAMY_CONFIG_KEYS_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"

#define nitems(a) (sizeof(a) / sizeof((a)[0]))

enum section {
	SEC_NONE,    /* before the first header */
	SEC_SERVER,
	SEC_AMQP,
	SEC_METRICS,
	SEC_PLUGIN,
	SEC_IGNORED, /* a bad header: already reported, skip its keys */
};

struct keyword;

/* The keyword named name in section sec, or NULL. */
const struct keyword *keyword_find(enum section sec, const char *name);
/* Its index in the table, 0..keyword_count()-1. */
size_t keyword_index(const struct keyword *k);
size_t keyword_count(void);
/* Parse v into the field of k.  Returns 0, or -1 with a reason in why. */
int keyword_set(const struct keyword *k, struct config *c, const char *v,
		char *why, size_t whylen);
/* Every keyword's default, and slots = online CPUs (1..1024). */
void config_defaults(struct config *c);

static inline _Noreturn void
config_out_of_memory(void)
{
	fputs("occamyd: config: out of memory\n", stderr);
	abort();
}

static inline void *
config_xreallocarray(void *p, size_t n, size_t size)
{
	if (size != 0 && n > SIZE_MAX / size)
		config_out_of_memory();
	p = realloc(p, n * size);
	if (p == NULL && n * size != 0)
		config_out_of_memory();
	return p;
}

static inline char *
config_xstrdup(const char *s)
{
	char *d = strdup(s);

	if (d == NULL)
		config_out_of_memory();
	return d;
}

/* Replace the string *field by a copy of v. */
static inline void
config_set_string(char **field, const char *v)
{
	free(*field);
	*field = config_xstrdup(v);
}

#endif /* OCCAMY_CONFIG_KEYS_H */
