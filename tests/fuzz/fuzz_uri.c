/*
 * fuzz_uri.c - libFuzzer target for uri_mask() of daemon/amqp_fields.c
 * (linked as it is): the masked URI is what every log line about
 * the broker shows, so the password must never survive it.
 *
 * The input is split at the first two NUL bytes into USER, PASSWORD and
 * REST; the target builds "amqp://USER:PASSWORD@REST" (USER without ':' '@'
 * '/', PASSWORD without '@').  A URI that rabbitmq-c cannot parse never
 * reaches uri_mask (transport_check_config refuses it at start, -t and
 * reload, without echoing it); for every other one, the password as written
 * and as decoded must not be in uri_mask's output, unless it also occurs in
 * the URI with the password replaced by the mask (or is shorter than 4
 * bytes).
 */
#include "amqp_harness.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static char *
field(const uint8_t **p, const uint8_t *end, const char *banned)
{
	const uint8_t *s = *p, *z = memchr(s, '\0', (size_t)(end - s));
	size_t n = z ? (size_t)(z - s) : (size_t)(end - s), k = 0;
	char *out = xmalloc(n + 1);

	for (size_t i = 0; i < n; i++)
		if (strchr(banned, s[i]) == NULL)
			out[k++] = (char)s[i];
	out[k] = '\0';
	*p = z ? z + 1 : end;
	return out;
}

/* secret in masked, though not in what may show: abort. */
static void
leak(const char *uri, const char *masked, const char *shown, const char *secret)
{
	if (secret == NULL || strlen(secret) < 4 || strstr(shown, secret) != NULL)
		return;
	if (strstr(masked, secret) != NULL) {
		fprintf(stderr, "uri_mask leaks the password '%s': '%s' -> '%s'\n", secret, uri,
			masked);
		abort();
	}
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	const uint8_t *p = data, *end = data + size;
	char *user, *pass, *rest, *uri, *masked, *parsed, *shown;
	struct amqp_connection_info ci;
	size_t n;

	user = field(&p, end, ":@/?#");
	pass = field(&p, end, "@");
	rest = field(&p, end, "");
	n = strlen(user) + strlen(pass) + strlen(rest) + 16;
	uri = xmalloc(n);
	snprintf(uri, n, "amqp://%s:%s@%s", user, pass, rest);
	parsed = xstrdup(uri);
	amqp_default_connection_info(&ci);
	if (amqp_parse_url(parsed, &ci) != AMQP_STATUS_OK) {
		free(parsed);
		free(uri);
		free(user);
		free(pass);
		free(rest);
		return 0;
	}
	/* The URI with its password masked: what may legitimately show,
	 * the mask included (a password such as "*@host" is in
	 * "amqp://:***@host" without having leaked).  (ci points into
	 * parsed.) */
	shown = xmalloc(n + 3);
	snprintf(shown, n + 3, "amqp://%s:***@%s", user, rest);
	masked = uri_mask(uri);
	leak(uri, masked, shown, pass);
	leak(uri, masked, shown, ci.password);
	free(masked);
	free(shown);
	free(parsed);
	free(uri);
	free(user);
	free(pass);
	free(rest);
	return 0;
}
