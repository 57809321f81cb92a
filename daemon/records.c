/*
 * records.c - record keeping in state_dir (see records.h).  The tasks file
 * is mapped shared: taking a request in hand is a 512-byte copy into the
 * page cache and settling it one store, no system call on the hot path.
 * What must survive is the daemon's crash, which leaves the page cache to
 * the kernel; not the machine's (no fsync: a record torn by a power loss,
 * or by a crash in the middle of the copy, fails its CRC and is ignored).
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "clock.h"
#include "log.h"
#include "records.h"

#define RECORD_SIZE 512
#define RECORD_MAGIC 0x5452434fu /* "OCRT" */
#define RECORD_VERSION 1u

/* On disk, little-endian as the machine is: the file never travels. */
struct record_disk {
	uint32_t magic;
	uint32_t version;
	uint32_t crc; /* checksum of everything after this field */
	uint32_t pad;
	int64_t started_ms;
	int64_t redeliveries;
	char fingerprint[RECORD_FINGERPRINT_MAX];
	char handler[RECORD_NAME_MAX];
	char task_id[RECORD_NAME_MAX];
	char spare[RECORD_SIZE - 32 - RECORD_FINGERPRINT_MAX - 2 * RECORD_NAME_MAX];
};

_Static_assert(sizeof(struct record_disk) == RECORD_SIZE, "a record is 512 bytes");

struct records {
	char *dir;
	char *config_path;
	int lock_fd, tasks_fd;
	struct record_disk *map; /* the tasks file, nslots records */
	unsigned nslots, slots;
	bool *used; /* owner thread only */
	uint64_t crashes_total;
	int64_t started_ms;
};

/* FNV-1a: to tell a whole record from a torn one, not to resist anyone;
 * one multiply a byte keeps it off the hot path's bill. */
static uint32_t
checksum_of(const void *data, size_t len)
{
	const unsigned char *p = data;
	uint32_t h = 2166136261u;

	for (size_t i = 0; i < len; i++)
		h = (h ^ p[i]) * 16777619u;
	return h;
}

static uint32_t
record_crc(const struct record_disk *rd)
{
	const unsigned char *p = (const unsigned char *)rd;
	size_t off = offsetof(struct record_disk, crc) + sizeof(rd->crc);

	return checksum_of(p + off, sizeof(*rd) - off);
}

static char *
path_of(const char *dir, const char *name)
{
	size_t n = strlen(dir) + strlen(name) + 2;
	char *p = xmalloc(n);

	snprintf(p, n, "%s/%s", dir, name);
	return p;
}

/* The previous run's "daemon" file: key value lines. */
static void
daemon_file_read(const char *dir, struct crash_report *rep, bool *running)
{
	char *path = path_of(dir, "daemon"), line[512];
	FILE *f = fopen(path, "re");

	*running = false;
	free(path);
	if (f == NULL)
		return;
	while (fgets(line, sizeof(line), f) != NULL) {
		char key[32], value[400];

		if (sscanf(line, "%31s %399[^\n]", key, value) != 2)
			continue;
		if (strcmp(key, "pid") == 0)
			rep->pid = strtol(value, NULL, 10);
		else if (strcmp(key, "started_ms") == 0)
			rep->started_ms = strtoll(value, NULL, 10);
		else if (strcmp(key, "crashes") == 0)
			rep->crashes_total = strtoull(value, NULL, 10);
		else if (strcmp(key, "state") == 0)
			*running = strcmp(value, "running") == 0;
	}
	fclose(f);
}

/* Replace the "daemon" file whole (write a temporary, rename): a crash
 * leaves the old one or the new one, never half of either. */
static int
daemon_file_write(struct records *r, const char *state)
{
	char *path = path_of(r->dir, "daemon"), *tmp = path_of(r->dir, "daemon.tmp");
	FILE *f = fopen(tmp, "we");
	int rc = -1;

	if (f != NULL) {
		fprintf(f, "instance %s\npid %ld\nstarted_ms %" PRId64 "\nconfig %s\nslots %u\n"
			   "state %s\ncrashes %" PRIu64 "\n",
			r->dir, (long)getpid(), r->started_ms, r->config_path, r->slots, state,
			r->crashes_total);
		rc = fclose(f) == 0 && rename(tmp, path) == 0 ? 0 : -1;
	}
	if (rc < 0)
		log_warn("state_dir %s: cannot write its daemon record", r->dir);
	free(path);
	free(tmp);
	return rc;
}

/* Records of the previous run, by their CRC. */
static void
tasks_file_read(int fd, struct crash_report *rep)
{
	struct record_disk rd;
	size_t cap = 0;

	for (off_t off = 0; pread(fd, &rd, sizeof(rd), off) == (ssize_t)sizeof(rd);
	     off += RECORD_SIZE) {
		if (rd.magic != RECORD_MAGIC)
			continue; /* free, or ended */
		if (rd.version != RECORD_VERSION || rd.crc != record_crc(&rd)) {
			rep->torn++;
			continue;
		}
		if (rep->ntasks == cap) {
			cap = cap ? 2 * cap : 8;
			rep->tasks = xrealloc(rep->tasks, cap * sizeof(*rep->tasks));
		}
		struct record_info *ri = &rep->tasks[rep->ntasks++];
		memset(ri, 0, sizeof(*ri));
		memcpy(ri->fingerprint, rd.fingerprint, sizeof(ri->fingerprint) - 1);
		memcpy(ri->handler, rd.handler, sizeof(ri->handler) - 1);
		memcpy(ri->task_id, rd.task_id, sizeof(ri->task_id) - 1);
		ri->started_ms = rd.started_ms;
		ri->redeliveries = rd.redeliveries;
	}
}

/* dir/name, opened for reading and writing (created if need be); -1 after
 * logging that record keeping is off. */
static int
state_file_open(const char *dir, const char *name)
{
	char *path = path_of(dir, name);
	int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0640);

	free(path);
	if (fd < 0)
		log_warn("state_dir %s: record keeping off", dir);
	return fd;
}

struct records *
records_open(const char *dir, unsigned nslots, const char *config_path, unsigned slots,
	     struct crash_report *rep)
{
	struct records *r;
	bool running;
	int lfd, tfd;

	memset(rep, 0, sizeof(*rep));
	if (mkdir(dir, 0750) < 0 && errno != EEXIST) {
		log_warn("state_dir %s: record keeping off", dir);
		return NULL;
	}
	lfd = state_file_open(dir, "lock");
	if (lfd < 0)
		return NULL;
	if (flock(lfd, LOCK_EX | LOCK_NB) < 0) {
		log_warnx("state_dir %s is in use by another running occamyd: record keeping off "
			  "for this one (give each instance its own state_dir)", dir);
		close(lfd);
		return NULL;
	}
	tfd = state_file_open(dir, "tasks");
	if (tfd < 0) {
		close(lfd);
		return NULL;
	}

	daemon_file_read(dir, rep, &running);
	tasks_file_read(tfd, rep);
	/* The lock is ours, so whoever wrote "running" is gone. */
	rep->crashed = running || rep->ntasks > 0;
	if (rep->crashed)
		rep->crashes_total++;

	r = xcalloc(1, sizeof(*r));
	r->dir = xstrdup(dir);
	r->config_path = xstrdup(config_path != NULL ? config_path : "");
	r->lock_fd = lfd;
	r->tasks_fd = tfd;
	r->nslots = nslots > 0 ? nslots : 1;
	r->slots = slots;
	r->used = xcalloc(r->nslots, sizeof(*r->used));
	r->crashes_total = rep->crashes_total;
	r->started_ms = clock_wall_ms();
	if (ftruncate(tfd, 0) < 0 || ftruncate(tfd, (off_t)r->nslots * RECORD_SIZE) < 0 ||
	    (r->map = mmap(NULL, (size_t)r->nslots * RECORD_SIZE, PROT_READ | PROT_WRITE,
			   MAP_SHARED, tfd, 0)) == MAP_FAILED) {
		log_warn("state_dir %s: cannot map the tasks file; record keeping off", dir);
		r->map = NULL;
	}
	daemon_file_write(r, "running");
	return r;
}

int
records_begin(struct records *r, const struct record_info *info)
{
	struct record_disk rd, *dst;
	unsigned i;

	if (r == NULL || r->map == NULL)
		return -1;
	for (i = 0; i < r->nslots && r->used[i]; i++)
		;
	if (i == r->nslots)
		return -1;
	memset(&rd, 0, sizeof(rd));
	rd.version = RECORD_VERSION;
	rd.started_ms = info->started_ms;
	rd.redeliveries = info->redeliveries;
	snprintf(rd.fingerprint, sizeof(rd.fingerprint), "%s", info->fingerprint);
	snprintf(rd.handler, sizeof(rd.handler), "%s", info->handler);
	snprintf(rd.task_id, sizeof(rd.task_id), "%s", info->task_id);
	rd.magic = RECORD_MAGIC;
	rd.crc = record_crc(&rd);
	/* Everything but the magic, then the magic: a copy cut short by a
	 * crash is either not there or fails its CRC. */
	dst = &r->map[i];
	rd.magic = 0;
	memcpy(dst, &rd, sizeof(rd));
	atomic_thread_fence(memory_order_release);
	dst->magic = RECORD_MAGIC;
	r->used[i] = true;
	return (int)i;
}

void
records_end(struct records *r, int slot)
{
	if (r == NULL || r->map == NULL || slot < 0 || (unsigned)slot >= r->nslots ||
	    !r->used[slot])
		return;
	/* The magic alone: a record is either whole or gone. */
	r->map[slot].magic = 0;
	r->used[slot] = false;
}

void
records_close(struct records *r)
{
	if (r == NULL)
		return;
	if (r->map != NULL)
		munmap(r->map, (size_t)r->nslots * RECORD_SIZE);
	if (ftruncate(r->tasks_fd, 0) < 0)
		log_warn("state_dir %s: cannot clear the tasks file", r->dir);
	daemon_file_write(r, "stopped");
	close(r->tasks_fd);
	close(r->lock_fd);
	FREE_ALL(r->used, r->dir, r->config_path, r);
}

void
crash_report_free(struct crash_report *rep)
{
	free(rep->tasks);
	memset(rep, 0, sizeof(*rep));
}
