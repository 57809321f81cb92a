/*
 * fuzz_config.c - libFuzzer target for the occamy.ini parser (daemon/config.c
 * on top of inih).  Each input is written to a memfd and handed to
 * config_load() by its /proc/self/fd path, exactly as a file on disk would
 * be; the result (a config or an error list) is then checked for the
 * promises config.h makes.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "config.h"

static int fd = -1;
static char path[64];

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct config c;
	char errs[8192];
	size_t off = 0;
	int rc;

	if (fd < 0) {
		fd = memfd_create("occamy.ini", MFD_CLOEXEC);
		if (fd < 0)
			abort();
		snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
	}
	if (ftruncate(fd, 0) != 0 || lseek(fd, 0, SEEK_SET) != 0)
		abort();
	while (off < size) {
		ssize_t n = write(fd, data + off, size - off);
		if (n <= 0)
			abort();
		off += (size_t)n;
	}

	memset(errs, 'X', sizeof(errs));
	rc = config_load(path, &c, errs, sizeof(errs));
	/* The error buffer is always a terminated string. */
	if (memchr(errs, '\0', sizeof(errs)) == NULL)
		abort();
	if (rc == 0) {
		/* A loaded config honours its own ranges. */
		if (c.slots < 1 || c.slots > 1024 || c.expansion_slot_buffer >= c.slots)
			abort();
		if (c.uri == NULL || (strncmp(c.uri, "amqp://", 7) != 0 &&
				      strncmp(c.uri, "amqps://", 8) != 0))
			abort();
		if (strcmp(c.helper_priority, "idle") != 0 &&
		    strcmp(c.helper_priority, "normal") != 0)
			abort();
		for (size_t i = 0; i < c.nplugins; i++)
			if (c.plugins[i].path == NULL || c.plugins[i].path[0] == '\0')
				abort();
		config_free(&c);
	} else {
		/* Failure: an error is reported, and the config was freed. */
		if (errs[0] == '\0' || c.file != NULL || c.plugins != NULL)
			abort();
	}
	return 0;
}
