/*
 * amqp_fields.c - pure conversions between rabbitmq-c's types and ours (see
 * amqp_fields.h).  Any thread; no state.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "amqp_fields.h"
#include "log.h"

amqp_bytes_t
bytes_of(const char *s)
{
	return amqp_cstring_bytes(s != NULL ? s : "");
}

amqp_table_entry_t
entry_string(const char *key, const char *value)
{
	return (amqp_table_entry_t){.key = amqp_cstring_bytes(key),
				    .value = {.kind = AMQP_FIELD_KIND_UTF8,
					      .value.bytes = bytes_of(value)}};
}

amqp_table_entry_t
entry_bool(const char *key, bool value)
{
	return (amqp_table_entry_t){.key = amqp_cstring_bytes(key),
				    .value = {.kind = AMQP_FIELD_KIND_BOOLEAN,
					      .value.boolean = value}};
}

amqp_table_entry_t
entry_int(const char *key, int64_t value)
{
	return (amqp_table_entry_t){.key = amqp_cstring_bytes(key),
				    .value = {.kind = AMQP_FIELD_KIND_I64, .value.i64 = value}};
}

bool
bytes_equal(amqp_bytes_t b, const char *s)
{
	size_t n = strlen(s);

	return b.len == n && (n == 0 || memcmp(b.bytes, s, n) == 0);
}

/* Why an RPC failed, as one line. */
void
reply_describe(amqp_rpc_reply_t r, char *buf, size_t len)
{
	switch (r.reply_type) {
	case AMQP_RESPONSE_NORMAL:
		snprintf(buf, len, "ok");
		break;
	case AMQP_RESPONSE_NONE:
		snprintf(buf, len, "no reply (missing RPC reply type)");
		break;
	case AMQP_RESPONSE_LIBRARY_EXCEPTION:
		snprintf(buf, len, "%s", amqp_error_string2(r.library_error));
		break;
	case AMQP_RESPONSE_SERVER_EXCEPTION:
		if (r.reply.id == AMQP_CONNECTION_CLOSE_METHOD) {
			const amqp_connection_close_t *c = r.reply.decoded;
			snprintf(buf, len, "connection closed by the broker: %u %.*s",
				 c->reply_code, (int)c->reply_text.len,
				 (const char *)c->reply_text.bytes);
		} else if (r.reply.id == AMQP_CHANNEL_CLOSE_METHOD) {
			const amqp_channel_close_t *c = r.reply.decoded;
			snprintf(buf, len, "channel closed by the broker: %u %.*s",
				 c->reply_code, (int)c->reply_text.len,
				 (const char *)c->reply_text.bytes);
		} else {
			snprintf(buf, len, "unexpected broker method %s",
				 amqp_method_name(r.reply.id));
		}
		break;
	}
}

/* "amqp://user:secret@host/" -> "amqp://user:***@host/" */
char *
uri_mask(const char *uri)
{
	const char *auth = strstr(uri, "://");
	const char *end, *at, *colon;
	char *out;

	if (auth == NULL)
		return xstrdup(uri);
	auth += 3;
	end = auth + strcspn(auth, "/?#");
	at = NULL;
	for (const char *p = auth; p < end; p++)
		if (*p == '@')
			at = p;
	if (at == NULL)
		return xstrdup(uri);
	colon = memchr(auth, ':', (size_t)(at - auth));
	if (colon == NULL)
		return xstrdup(uri);
	out = xmalloc(strlen(uri) + 4);
	sprintf(out, "%.*s***%s", (int)(colon + 1 - uri), uri, at);
	return out;
}

/* Flatten the headers of p into *out (one allocation, free() it; NULL if
 * there are none) and *count.  Refuses, with why and nothing allocated,
 * what would make us allocate without bound. */
int
headers_flatten(const amqp_basic_properties_t *p, struct occamy_header **out, size_t *count,
		char *why, size_t whylen)
{
	const amqp_table_t *tbl = &p->headers;
	size_t n, size, i;
	struct occamy_header *items;
	char *s;

	*out = NULL;
	*count = 0;
	if (!(p->_flags & AMQP_BASIC_HEADERS_FLAG) || tbl->num_entries <= 0)
		return 0;
	n = (size_t)tbl->num_entries;
	if (n > HEADERS_MAX) {
		snprintf(why, whylen, "too many headers (%zu > %d)", n, HEADERS_MAX);
		return -1;
	}
	size = n * sizeof(*items);
	for (i = 0; i < n; i++) {
		const amqp_table_entry_t *e = &tbl->entries[i];
		/* Keys are C strings to plugins: "task-id\0x" must not pass
		 * for "task-id". */
		if (e->key.len > 0 && memchr(e->key.bytes, '\0', e->key.len) != NULL) {
			snprintf(why, whylen, "header key with a NUL byte");
			return -1;
		}
		size += e->key.len + 1;
		if (e->value.kind == AMQP_FIELD_KIND_UTF8) {
			if (e->value.value.bytes.len > HEADER_VALUE_MAX) {
				snprintf(why, whylen,
					 "header '%.*s' too large (%zu > %d bytes)",
					 (int)e->key.len, (const char *)e->key.bytes,
					 e->value.value.bytes.len, HEADER_VALUE_MAX);
				return -1;
			}
			size += e->value.value.bytes.len + 1;
		}
	}

	items = xcalloc(1, size);
	s = (char *)(items + n);
	for (i = 0; i < n; i++) {
		const amqp_table_entry_t *e = &tbl->entries[i];
		const amqp_field_value_t *v = &e->value;
		struct occamy_header *h = &items[i];

		if (e->key.len > 0)
			memcpy(s, e->key.bytes, e->key.len);
		s[e->key.len] = '\0';
		h->key = s;
		s += e->key.len + 1;
		switch (v->kind) {
		case AMQP_FIELD_KIND_UTF8:
			if (v->value.bytes.len > 0)
				memcpy(s, v->value.bytes.bytes, v->value.bytes.len);
			s[v->value.bytes.len] = '\0';
			h->kind = OCCAMY_VALUE_STRING;
			h->str = s;
			h->len = v->value.bytes.len;
			s += v->value.bytes.len + 1;
			break;
		case AMQP_FIELD_KIND_BOOLEAN:
			h->kind = OCCAMY_VALUE_BOOL;
			h->i = v->value.boolean ? 1 : 0;
			break;
		case AMQP_FIELD_KIND_I8: h->kind = OCCAMY_VALUE_INT; h->i = v->value.i8; break;
		case AMQP_FIELD_KIND_U8: h->kind = OCCAMY_VALUE_INT; h->i = v->value.u8; break;
		case AMQP_FIELD_KIND_I16: h->kind = OCCAMY_VALUE_INT; h->i = v->value.i16; break;
		case AMQP_FIELD_KIND_U16: h->kind = OCCAMY_VALUE_INT; h->i = v->value.u16; break;
		case AMQP_FIELD_KIND_I32: h->kind = OCCAMY_VALUE_INT; h->i = v->value.i32; break;
		case AMQP_FIELD_KIND_U32: h->kind = OCCAMY_VALUE_INT; h->i = v->value.u32; break;
		case AMQP_FIELD_KIND_I64: h->kind = OCCAMY_VALUE_INT; h->i = v->value.i64; break;
		case AMQP_FIELD_KIND_U64:
		case AMQP_FIELD_KIND_TIMESTAMP:
			h->kind = OCCAMY_VALUE_INT;
			h->i = v->value.u64 > INT64_MAX ? INT64_MAX : (int64_t)v->value.u64;
			break;
		case AMQP_FIELD_KIND_F32: h->kind = OCCAMY_VALUE_FLOAT; h->f = v->value.f32; break;
		case AMQP_FIELD_KIND_F64: h->kind = OCCAMY_VALUE_FLOAT; h->f = v->value.f64; break;
		case AMQP_FIELD_KIND_DECIMAL: {
			/* The wire value is a signed long. */
			double f = (int32_t)v->value.decimal.value;
			for (unsigned k = 0; k < v->value.decimal.decimals; k++)
				f /= 10;
			h->kind = OCCAMY_VALUE_FLOAT;
			h->f = f;
			break;
		}
		default: /* tables, arrays, bytes, void */
			h->kind = OCCAMY_VALUE_OTHER;
			break;
		}
	}
	*out = items;
	*count = n;
	return 0;
}

bool
table_keys_fit(const amqp_table_t *tbl, char *why, size_t whylen)
{
	for (int i = 0; i < tbl->num_entries; i++) {
		/* rabbitmq-c would cut the length to 8 bits and the broker
		 * would close the connection (541). */
		if (tbl->entries[i].key.len > SHORTSTR_MAX) {
			snprintf(why, whylen, "header key of %zu bytes (at most %d)",
				 tbl->entries[i].key.len, SHORTSTR_MAX);
			return false;
		}
	}
	return true;
}

/* The properties of a copy of a message: its own (orig), without the headers that extra
 * replaces and without x-delivery-count (the copy is a new message), then
 * extra.  *p points into the returned array (free it) and into orig. */
amqp_table_entry_t *
copy_properties(const amqp_basic_properties_t *orig, const amqp_table_entry_t *extra,
		int nextra, amqp_basic_properties_t *p)
{
	const amqp_table_t *h = &orig->headers;
	int n = (orig->_flags & AMQP_BASIC_HEADERS_FLAG) ? h->num_entries : 0;
	amqp_table_entry_t *e = xcalloc((size_t)(n + nextra) + 1, sizeof(*e));
	int k = 0;

	*p = *orig;
	for (int i = 0; i < n; i++) {
		bool replaced = h->entries[i].key.len == 16 &&
				memcmp(h->entries[i].key.bytes, "x-delivery-count", 16) == 0;
		for (int j = 0; j < nextra && !replaced; j++)
			replaced = h->entries[i].key.len == extra[j].key.len &&
				   memcmp(h->entries[i].key.bytes, extra[j].key.bytes,
					  extra[j].key.len) == 0;
		if (!replaced)
			e[k++] = h->entries[i];
	}
	for (int j = 0; j < nextra; j++)
		e[k++] = extra[j];
	p->headers.entries = e;
	p->headers.num_entries = k;
	if (k > 0)
		p->_flags |= AMQP_BASIC_HEADERS_FLAG;
	else
		p->_flags &= ~(amqp_flags_t)AMQP_BASIC_HEADERS_FLAG;
	/* A user-id not ours would make the broker close the channel. */
	p->_flags &= ~(amqp_flags_t)AMQP_BASIC_USER_ID_FLAG;
	return e;
}

/* Leave out of a copy's headers the original ones that can be large
 * (strings over 1 KiB, tables, arrays, bytes) or, if all is true, every
 * original one; the last nours entries are ours and stay.  Returns how many
 * went. */
int
headers_trim(amqp_basic_properties_t *p, int nours, bool all)
{
	amqp_table_entry_t *e = p->headers.entries;
	int n = p->headers.num_entries, k = 0, dropped = 0;

	for (int i = 0; i < n; i++) {
		const amqp_field_value_t *v = &e[i].value;
		bool ours = i >= n - nours;
		bool large = v->kind == AMQP_FIELD_KIND_TABLE || v->kind == AMQP_FIELD_KIND_ARRAY ||
			     ((v->kind == AMQP_FIELD_KIND_UTF8 || v->kind == AMQP_FIELD_KIND_BYTES) &&
			      v->value.bytes.len > 1024);
		if (!ours && (all || large)) {
			dropped++;
			continue;
		}
		e[k++] = e[i];
	}
	p->headers.num_entries = k;
	return dropped;
}

/* Length of the valid UTF-8 sequence at s, 0 if there is none. */
size_t
utf8_len(const unsigned char *s)
{
	size_t n = s[0] >= 0xf0 && s[0] <= 0xf4 ? 4 : s[0] >= 0xe0 ? 3 : s[0] >= 0xc2 ? 2 : 0;

	/* No overlong forms, surrogates or code points past U+10FFFF. */
	if (s[0] >= 0xf5 || (s[0] == 0xe0 && s[1] < 0xa0) || (s[0] == 0xed && s[1] >= 0xa0) ||
	    (s[0] == 0xf0 && s[1] < 0x90) || (s[0] == 0xf4 && s[1] >= 0x90))
		return 0;
	for (size_t i = 1; i < n; i++)
		if ((s[i] & 0xc0) != 0x80)
			return 0;
	return n;
}

/* s as the inside of a JSON string: valid UTF-8 whatever s holds (a
 * plugin's message, a header's bytes), invalid bytes as U+FFFD. */
void
json_escape(char *out, size_t cap, const char *s)
{
	const unsigned char *p = (const unsigned char *)s;
	size_t n = 0, k;

	while (*p != '\0' && n + 8 < cap) {
		if (*p == '"' || *p == '\\') {
			out[n++] = '\\';
			out[n++] = (char)*p++;
		} else if (*p < 0x20) {
			n += (size_t)snprintf(out + n, cap - n, "\\u%04x", *p++);
		} else if (*p < 0x80) {
			out[n++] = (char)*p++;
		} else if ((k = utf8_len(p)) > 0) {
			memcpy(out + n, p, k);
			n += k;
			p += k;
		} else {
			n += (size_t)snprintf(out + n, cap - n, "\\ufffd");
			p++;
		}
	}
	out[n] = '\0';
}

void
bytes_clone(amqp_pool_t *pool, amqp_bytes_t *b)
{
	amqp_bytes_t src = *b;

	if (src.len == 0) {
		*b = amqp_empty_bytes;
		return;
	}
	amqp_pool_alloc_bytes(pool, src.len, b);
	if (b->bytes == NULL)
		fatalx("out of memory");
	memcpy(b->bytes, src.bytes, src.len);
}

/* Frames live in the library's channel pools until the next release: what
 * a message keeps is copied into its own pool at once. */
void
properties_clone(const amqp_basic_properties_t *src, amqp_message_t *m)
{
	amqp_basic_properties_t *p = &m->properties;
	amqp_flags_t f = src->_flags;

	memset(p, 0, sizeof(*p));
	p->_flags = f;
	p->delivery_mode = src->delivery_mode;
	p->priority = src->priority;
	p->timestamp = src->timestamp;
#define CLONE(field, flag)                                                     \
	if (f & (flag)) {                                                      \
		p->field = src->field;                                         \
		bytes_clone(&m->pool, &p->field);                              \
	}
	CLONE(content_type, AMQP_BASIC_CONTENT_TYPE_FLAG);
	CLONE(content_encoding, AMQP_BASIC_CONTENT_ENCODING_FLAG);
	CLONE(correlation_id, AMQP_BASIC_CORRELATION_ID_FLAG);
	CLONE(reply_to, AMQP_BASIC_REPLY_TO_FLAG);
	CLONE(expiration, AMQP_BASIC_EXPIRATION_FLAG);
	CLONE(message_id, AMQP_BASIC_MESSAGE_ID_FLAG);
	CLONE(type, AMQP_BASIC_TYPE_FLAG);
	CLONE(user_id, AMQP_BASIC_USER_ID_FLAG);
	CLONE(app_id, AMQP_BASIC_APP_ID_FLAG);
	CLONE(cluster_id, AMQP_BASIC_CLUSTER_ID_FLAG);
#undef CLONE
	if ((f & AMQP_BASIC_HEADERS_FLAG) &&
	    amqp_table_clone(&src->headers, &p->headers, &m->pool) != AMQP_STATUS_OK)
		fatalx("out of memory");
}
