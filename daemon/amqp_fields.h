/*
 * amqp_fields.h - pure conversions between rabbitmq-c's types and ours:
 * field-table entries, header tables flattened for plugins, copies of
 * properties, URIs masked for logs, JSON text.  No connection, no thread,
 * no state: the fuzzers link amqp_fields.c as it is.
 */
#ifndef OCCAMY_AMQP_FIELDS_H
#define OCCAMY_AMQP_FIELDS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <amqp.h>

#include <occamy/plugin.h>

#define HEADERS_MAX 256             /* more: the delivery is refused */
#define HEADER_VALUE_MAX 65536      /* bytes of one string header */
#define SHORTSTR_MAX 255            /* AMQP short strings: keys, names */

amqp_bytes_t
bytes_of(const char *s);
amqp_table_entry_t
entry_string(const char *key, const char *value);
amqp_table_entry_t
entry_bool(const char *key, bool value);
amqp_table_entry_t
entry_int(const char *key, int64_t value);
bool
bytes_equal(amqp_bytes_t b, const char *s);
void
reply_describe(amqp_rpc_reply_t r, char *buf, size_t len);
char *
uri_mask(const char *uri);
int
headers_flatten(const amqp_basic_properties_t *p, struct occamy_header **out, size_t *count,
		char *why, size_t whylen);
bool
table_keys_fit(const amqp_table_t *tbl, char *why, size_t whylen);
amqp_table_entry_t *
copy_properties(const amqp_basic_properties_t *orig, const amqp_table_entry_t *extra,
		int nextra, amqp_basic_properties_t *p);
int
headers_trim(amqp_basic_properties_t *p, int nours, bool all);
size_t
utf8_len(const unsigned char *s);
void
json_escape(char *out, size_t cap, const char *s);
void
bytes_clone(amqp_pool_t *pool, amqp_bytes_t *b);
void
properties_clone(const amqp_basic_properties_t *src, amqp_message_t *m);

#endif /* OCCAMY_AMQP_FIELDS_H */
