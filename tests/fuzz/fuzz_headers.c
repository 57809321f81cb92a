/*
 * fuzz_headers.c - libFuzzer target for the AMQP header-table conversion of
 * the transport (daemon/amqp_fields.c headers_flatten, linked as it is; see
 * amqp_harness.h).  The input is an encoded AMQP field table as
 * it arrives in a content header frame (4-byte length, then entries);
 * rabbitmq-c decodes it like the delivery path does (amqp_decode_table),
 * then headers_flatten flattens it for the scheduler and the plugins.  The
 * flattened headers are checked against the table, looked up the way the
 * router, the scheduler and the plugins do, and the dead-letter copy's
 * header table (original entries plus x-occamy-error) is re-encoded.
 */
#include "amqp_harness.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void
check_items(const struct occamy_headers *h, const amqp_table_t *tbl)
{
	if (h->count != 0 && h->count != (size_t)tbl->num_entries)
		abort();
	for (size_t i = 0; i < h->count; i++) {
		const struct occamy_header *it = &h->items[i];
		const amqp_table_entry_t *e = &tbl->entries[i];

		/* Keys are C strings: at most as long as on the wire (shorter
		 * only when the wire key holds a NUL byte). */
		if (strlen(it->key) > e->key.len)
			abort();
		if (it->kind == OCCAMY_VALUE_STRING) {
			if (it->len != e->value.value.bytes.len || it->str[it->len] != '\0' ||
			    it->len > HEADER_VALUE_MAX)
				abort();
			if (it->len > 0 && memcmp(it->str, e->value.value.bytes.bytes, it->len) != 0)
				abort();
		}
	}
	(void)occamy_headers_find(h, "handler");
	(void)occamy_headers_find(h, "task-id");
	(void)occamy_headers_find(h, "x-delivery-count");
	(void)occamy_headers_find(h, COMMAND_HEADER);
}

/* What dead_letter_publish() sends: the original entries (less ours) and
 * the reason, encoded again. */
static void
reencode_dead_letter(const amqp_table_t *h, size_t wire_len)
{
	amqp_table_entry_t *e = xcalloc((size_t)h->num_entries + 2, sizeof(*e));
	amqp_table_t out;
	size_t cap = wire_len + 1024, off = 0;
	void *buf = xmalloc(cap);
	int k = 0;

	for (int i = 0; i < h->num_entries; i++) {
		if (bytes_equal(h->entries[i].key, "x-occamy-error") ||
		    bytes_equal(h->entries[i].key, "x-occamy-handler-outcome"))
			continue;
		e[k++] = h->entries[i];
	}
	e[k++] = entry_string("x-occamy-error", "fuzz: a reason");
	e[k++] = entry_string("x-occamy-handler-outcome", "rejected");
	out.entries = e;
	out.num_entries = k;
	/* Re-encoding what was decoded must fit in what it came in, plus ours. */
	if (amqp_encode_table((amqp_bytes_t){cap, buf}, &out, &off) != AMQP_STATUS_OK)
		abort();
	free(buf);
	free(e);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	amqp_pool_t pool;
	amqp_table_t tbl;
	size_t off = 0;
	amqp_basic_properties_t p;
	struct occamy_headers h;
	struct occamy_header *items;
	char why[REASON_MAX];

	init_amqp_pool(&pool, 4096);
	if (amqp_decode_table((amqp_bytes_t){size, (void *)data}, &pool, &tbl, &off) !=
	    AMQP_STATUS_OK) {
		empty_amqp_pool(&pool);
		return 0;
	}
	memset(&p, 0, sizeof(p));
	p._flags = AMQP_BASIC_HEADERS_FLAG;
	p.headers = tbl;
	why[0] = '\0';
	if (headers_flatten(&p, &items, &h.count, why, sizeof(why)) == 0) {
		h.items = items;
		check_items(&h, &tbl);
		free(items);
	} else if (why[0] == '\0' || items != NULL) {
		abort(); /* a refusal has a reason and allocates nothing */
	}
	reencode_dead_letter(&tbl, off);
	empty_amqp_pool(&pool);
	return 0;
}
