/*
 * publisher.c - test plugin: a task that publishes one message with a header
 * of the sizes its body names and returns what host->publish_*() said, so a
 * test can drive the host's publish checks with what a careless plugin
 * might send.
 *
 * Body: "KIND KEYLEN VALLEN" with KIND control, help or request.  The
 * header key is KEYLEN 'k's, its value VALLEN 'v's (KEYLEN 0: no header).
 * Result: "rc=N" with N the return of the publish call.
 */
#include "fixture.h"

#define PUBLISHER_LEN_MAX (16u << 20)

struct publisher_task {
	const struct occamy_host *host;
	char kind[16];
	unsigned long keylen, vallen;
};

static enum occamy_status
publisher_task_new(const struct occamy_host *host, const struct occamy_headers *headers,
		   const void *body, size_t len, int is_help, void **task, char *err,
		   size_t errlen)
{
	struct publisher_task *t;
	char text[128];

	(void)headers;
	(void)is_help;
	t = fixture_calloc(sizeof(*t));
	t->host = host;
	snprintf(text, sizeof(text), "%.*s", (int)(len < sizeof(text) ? len : sizeof(text) - 1),
		 (const char *)body);
	if (sscanf(text, "%15s %lu %lu", t->kind, &t->keylen, &t->vallen) != 3 ||
	    t->keylen > PUBLISHER_LEN_MAX || t->vallen > PUBLISHER_LEN_MAX ||
	    (strcmp(t->kind, "control") != 0 && strcmp(t->kind, "help") != 0 &&
	     strcmp(t->kind, "request") != 0)) {
		snprintf(err, errlen, "publisher: body must be 'control|help|request KEYLEN VALLEN'");
		free(t);
		return OCCAMY_ERR_INVALID_BODY;
	}
	*task = t;
	return OCCAMY_OK;
}

static enum occamy_status
publisher_task_run(void *task, const struct occamy_cancel *cancel, struct occamy_output *out)
{
	struct publisher_task *t = task;
	struct occamy_kv kv;
	char *key = malloc(t->keylen + 1), *value = malloc(t->vallen + 1);
	char result[32];
	int rc;

	(void)cancel;
	if (key == NULL || value == NULL)
		abort();
	memset(key, 'k', t->keylen);
	key[t->keylen] = '\0';
	memset(value, 'v', t->vallen);
	value[t->vallen] = '\0';
	kv.key = key;
	kv.value = value;
	if (strcmp(t->kind, "control") == 0)
		rc = t->host->publish_control(t->host, "publisher-target", &kv, t->keylen > 0,
					      "x", 1);
	else if (strcmp(t->kind, "help") == 0)
		rc = t->host->publish_help(t->host, "no-such-handler", &kv, t->keylen > 0, "x", 1);
	else
		rc = t->host->publish_request(t->host, "no-such-handler", &kv, t->keylen > 0,
					      "x", 1);
	free(key);
	free(value);
	snprintf(result, sizeof(result), "rc=%d", rc);
	if ((out->body = strdup(result)) == NULL)
		abort();
	out->len = strlen(result);
	return OCCAMY_OK;
}

static void
publisher_task_info(const void *task, struct occamy_task_info *info)
{
	(void)task;
	fixture_task_info(info, NULL, "publisher", 0);
}

static void
publisher_task_destroy(void *task)
{
	free(task);
}

FIXTURE_PLUGIN("publisher", FIXTURE_TASK_CALLBACKS(publisher));
