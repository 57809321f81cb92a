/*
 * config_uri.c - [amqp] uri: one or more URIs separated by whitespace, one
 * per node of a cluster.  Counting, splitting, checking each as rabbitmq-c
 * parses it, and where a daemon starts.  Pure; any thread.  Linked by
 * occamyd and occamyctl.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <amqp.h> /* amqp_parse_url() only: the transport's own parser */

#include "config.h"

static _Noreturn void
out_of_memory(void)
{
	fputs("occamy: config: out of memory\n", stderr);
	abort();
}

#define URI_SPACE " \t\r\n\f\v"

/* The start and length of the URI number i (from 0) of list, or NULL. */
static const char *
uri_item(const char *list, size_t i, size_t *len)
{
	const char *p = list;

	for (;;) {
		p += strspn(p, URI_SPACE);
		if (*p == '\0')
			return NULL;
		*len = strcspn(p, URI_SPACE);
		if (i-- == 0)
			return p;
		p += *len;
	}
}

size_t
config_uri_count(const char *uri)
{
	size_t n = 0, len;

	while (uri_item(uri, n, &len) != NULL)
		n++;
	return n;
}

int
config_uri_nth(const char *uri, size_t i, char *buf, size_t len)
{
	const char *p;
	size_t n;

	if (len > 0)
		buf[0] = '\0';
	p = uri_item(uri, i, &n);
	if (p == NULL || n >= len)
		return -1;
	memcpy(buf, p, n);
	buf[n] = '\0';
	return 0;
}

char **
config_uri_split(const char *uri, size_t *n)
{
	size_t count = config_uri_count(uri), i, len = 0;
	char **v = calloc(count + 1, sizeof(*v));
	const char *p;

	if (v == NULL)
		out_of_memory();

	for (i = 0; i < count; i++) {
		p = uri_item(uri, i, &len);
		v[i] = strndup(p, len);
		if (v[i] == NULL)
			out_of_memory();
	}
	v[count] = NULL;
	if (n != NULL)
		*n = count;
	return v;
}

void
config_uri_split_free(char **v)
{
	if (v == NULL)
		return;
	for (char **p = v; *p != NULL; p++) {
		explicit_bzero(*p, strlen(*p)); /* may hold a password */
		free(*p);
	}
	free(v);
}

size_t
config_uri_start(size_t n, const char *host, unsigned long pid)
{
	uint64_t h = 1469598103934665603ULL; /* FNV-1a */
	unsigned char b;

	if (n == 0)
		return 0;
	for (const char *p = host != NULL ? host : ""; *p != '\0'; p++) {
		h ^= (unsigned char)*p;
		h *= 1099511628211ULL;
	}
	for (size_t i = 0; i < sizeof(pid); i++) {
		b = (unsigned char)(pid >> (8 * i));
		h ^= b;
		h *= 1099511628211ULL;
	}
	return (size_t)(h % n);
}

/* Every URI of the list must parse as rabbitmq-c parses it when
 * connecting.  Never echo one: it may hold the password; name it by its
 * position instead. */
int
config_uri_check(const char *v, char *why, size_t whylen)
{
	size_t n = config_uri_count(v), i, len = 0;
	char which[64] = "", *copy;
	struct amqp_connection_info ci;
	const char *p;
	int ok;

	if (n == 0) {
		snprintf(why, whylen, "must start with amqp:// or amqps://");
		return -1;
	}
	for (i = 0; i < n; i++) {
		p = uri_item(v, i, &len);
		if (n > 1)
			snprintf(which, sizeof(which), "URI %zu of %zu ", i + 1, n);
		if (!(len >= 7 && strncmp(p, "amqp://", 7) == 0) &&
		    !(len >= 8 && strncmp(p, "amqps://", 8) == 0)) {
			snprintf(why, whylen, "%smust start with amqp:// or amqps://",
				 which);
			return -1;
		}
		copy = strndup(p, len);
		if (copy == NULL)
			out_of_memory();
		ok = amqp_parse_url(copy, &ci) == AMQP_STATUS_OK;
		explicit_bzero(copy, len);
		free(copy);
		if (!ok) {
			snprintf(why, whylen, "%scannot be parsed as "
				 "amqp[s]://user[:password]@host[:port]/[vhost]",
				 which);
			return -1;
		}
	}
	return 0;
}
