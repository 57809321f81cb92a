/*
 * search.c - the optimiser: iterated local search on an array tour.
 *
 *   start     greedy edge matching (or nearest neighbour from a random city)
 *   descent   2-opt and Or-opt (segments of 1..3 cities, both orientations)
 *             over K-nearest neighbour lists, driven by a queue of "active"
 *             cities (don't-look bits: a city is looked at again only when
 *             an edge at it changed)
 *   kick      a local double bridge: two short adjacent segments swap places
 *             (A B C D -> A C B D); only the six cities at the cut points
 *             are reactivated, so an iteration costs microseconds
 *   accept    the new tour if it is no longer than the old one, otherwise
 *             roll back through a journal of the array changes
 *   restart   when the tour has not improved for a while (a deep local
 *             optimum), go back to the best tour, apply several random kicks
 *             at once and continue from wherever the descent lands
 *
 * Every change to the tour is a reversal of a run of positions (a 2-opt
 * move, done on the shorter side) or a segment swap; both are their own
 * inverse given the right arguments, which is what makes rollback cheap.
 * Everything depends only on the seed, so a run bounded by iterations is
 * reproducible.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "tsp.h"

#define SEARCH_K 12          /* neighbours per city */
#define SEARCH_BRUTE_MAX 8   /* exact enumeration up to this many cities */
#define SEARCH_SEG_MAX 100   /* longest segment a kick moves */
#define SEARCH_OR_MAX 3      /* longest segment Or-opt moves */
#define SEARCH_POLL_EVERY 32 /* queue pops between stop polls */
#define SEARCH_BRUTE_GRID 3000 /* above this, neighbour lists come from a grid */
#define SEARCH_STALL_PER_CITY 20 /* restart after this many kicks per city... */
#define SEARCH_STALL_MIN 2000    /* ...but never sooner than this */
#define SEARCH_RESTART_KICKS 8   /* random kicks at a restart */

enum journal_op { J_REVERSE, J_SWAP };

struct journal_entry {
	enum journal_op op;
	int i, a, b; /* REVERSE: from position i, a cities; SWAP: at i, lengths a, b */
};

struct tsp_search {
	const struct tsp_instance *in;
	int n, k;
	int *neigh;   /* n*k, nearest first */
	int *tour;    /* position -> city */
	int *pos;     /* city -> position */
	int64_t len;  /* length of tour */
	int *best;    /* the shortest tour seen, and its length */
	int64_t best_len;
	uint64_t rng;
	uint64_t iterations;
	uint64_t stall;   /* iterations since tour last got shorter */
	uint64_t restarts;

	/* Active cities: a ring of at most n entries, no duplicates. */
	int *queue;
	unsigned char *queued;
	int qhead, qcount;

	/* Changes since the last accepted tour, when journaling. */
	struct journal_entry *journal;
	size_t njournal, cjournal;
	int journaling;

	int *scratch; /* n cities, for segment swaps */

	const struct tsp_hooks *hooks;
	unsigned polls;
	int stopped;
};

static uint64_t
search_rand(struct tsp_search *s)
{
	/* splitmix64: tiny, fast, and plenty for kicks. */
	uint64_t z = (s->rng += 0x9e3779b97f4a7c15ULL);

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

static int
search_below(struct tsp_search *s, int m)
{
	return (int)(search_rand(s) % (uint64_t)m);
}

static inline int
D(const struct tsp_search *s, int a, int b)
{
	return tsp_dist(s->in, a, b);
}

static inline int
succ(const struct tsp_search *s, int c)
{
	int p = s->pos[c] + 1;

	return s->tour[p == s->n ? 0 : p];
}

static inline int
pred(const struct tsp_search *s, int c)
{
	int p = s->pos[c] - 1;

	return s->tour[p < 0 ? s->n - 1 : p];
}

static int
search_should_stop(struct tsp_search *s)
{
	if (!s->stopped && s->hooks != NULL && s->hooks->stop != NULL &&
	    s->hooks->stop(s->hooks->arg))
		s->stopped = 1;
	return s->stopped;
}

/* --- the active-city queue (don't-look bits) --- */

static void
queue_push(struct tsp_search *s, int c)
{
	if (s->queued[c])
		return;
	s->queued[c] = 1;
	s->queue[(s->qhead + s->qcount) % s->n] = c;
	s->qcount++;
}

static int
queue_pop(struct tsp_search *s)
{
	int c = s->queue[s->qhead];

	s->qhead = (s->qhead + 1) % s->n;
	s->qcount--;
	s->queued[c] = 0;
	return c;
}

static void
queue_clear(struct tsp_search *s)
{
	while (s->qcount > 0)
		queue_pop(s);
}

static void
queue_all(struct tsp_search *s)
{
	int i;

	/* In tour order, from a random place: neutral and cache friendly. */
	int start = search_below(s, s->n);
	for (i = 0; i < s->n; i++)
		queue_push(s, s->tour[(start + i) % s->n]);
}

/* --- tour changes --- */

static void
journal_add(struct tsp_search *s, enum journal_op op, int i, int a, int b)
{
	if (!s->journaling)
		return;
	if (s->njournal == s->cjournal) {
		s->cjournal = s->cjournal ? 2 * s->cjournal : 64;
		s->journal = realloc(s->journal, s->cjournal * sizeof(*s->journal));
		if (s->journal == NULL)
			abort();
	}
	s->journal[s->njournal++] = (struct journal_entry){op, i, a, b};
}

/* Reverse the cities at positions i, i+1, ..., i+count-1 (mod n). */
static void
reverse_positions(struct tsp_search *s, int i, int count)
{
	int n = s->n, lo = i, hi = (i + count - 1) % n, k, a, b;

	for (k = 0; k < count / 2; k++) {
		a = s->tour[lo];
		b = s->tour[hi];
		s->tour[lo] = b;
		s->pos[b] = lo;
		s->tour[hi] = a;
		s->pos[a] = hi;
		if (++lo == n)
			lo = 0;
		if (--hi < 0)
			hi = n - 1;
	}
	journal_add(s, J_REVERSE, i, count, 0);
}

/* With b = succ(a) and d = succ(c): replace edges (a,b), (c,d) by (a,c),
 * (b,d).  Reverses b..c or, when shorter, d..a: the same cyclic tour. */
static void
move2(struct tsp_search *s, int a, int b, int c, int d)
{
	int n = s->n, count = (s->pos[c] - s->pos[b] + n) % n + 1;

	if (2 * count <= n)
		reverse_positions(s, s->pos[b], count);
	else
		reverse_positions(s, s->pos[d], n - count);
	(void)a;
}

/* Remove edges {u1,u2} and {v1,v2}, add {u1,v1} and {u2,v2}, whichever way
 * round the tour currently runs (the caller knows the move is a valid
 * 2-opt move, i.e. u2 follows u1 exactly when v2 follows v1). */
static void
make_2opt(struct tsp_search *s, int u1, int u2, int v1, int v2)
{
	if (succ(s, u1) == u2)
		move2(s, u1, u2, v1, v2);
	else
		move2(s, u2, u1, v2, v1);
}

/* Swap the segments at positions i+1..i+a and i+a+1..i+a+b (mod n). */
static void
swap_segments(struct tsp_search *s, int i, int a, int b)
{
	int n = s->n, k, p, c;

	for (k = 0; k < a + b; k++)
		s->scratch[k] = s->tour[(i + 1 + k) % n];
	for (k = 0; k < a + b; k++) {
		c = k < b ? s->scratch[a + k] : s->scratch[k - b];
		p = (i + 1 + k) % n;
		s->tour[p] = c;
		s->pos[c] = p;
	}
	journal_add(s, J_SWAP, i, a, b);
}

static void
journal_undo(struct tsp_search *s)
{
	size_t k;

	s->journaling = 0;
	for (k = s->njournal; k-- > 0;) {
		const struct journal_entry *e = &s->journal[k];
		if (e->op == J_REVERSE)
			reverse_positions(s, e->i, e->a);
		else
			swap_segments(s, e->i, e->b, e->a);
	}
	s->njournal = 0;
}

/* --- local search --- */

/* Best 2-opt move at city a over its neighbour list, in both directions. */
static int
improve_2opt(struct tsp_search *s, int a)
{
	const int *nb = s->neigh + (size_t)a * (size_t)s->k;
	int dir, j, b, c, d, bc = -1, bd = -1, bdir = 0, g1, gain, best = 0;

	for (dir = 0; dir < 2; dir++) {
		b = dir == 0 ? succ(s, a) : pred(s, a);
		int dab = D(s, a, b);
		for (j = 0; j < s->k; j++) {
			c = nb[j];
			g1 = dab - D(s, a, c);
			if (g1 <= 0)
				break;
			d = dir == 0 ? succ(s, c) : pred(s, c);
			if (c == b || d == a)
				continue;
			gain = g1 + D(s, c, d) - D(s, b, d);
			if (gain > best) {
				best = gain;
				bc = c;
				bd = d;
				bdir = dir;
			}
		}
	}
	if (best <= 0)
		return 0;
	b = bdir == 0 ? succ(s, a) : pred(s, a);
	if (bdir == 0)
		move2(s, a, b, bc, bd);
	else
		move2(s, b, a, bd, bc);
	s->len -= best;
	queue_push(s, a);
	queue_push(s, b);
	queue_push(s, bc);
	queue_push(s, bd);
	return 1;
}

/* Is city v among the count cities that start at s1? */
static inline int
in_segment(const struct tsp_search *s, int s1, int count, int v)
{
	return (s->pos[v] - s->pos[s1] + s->n) % s->n < count;
}

/* Best Or-opt move of a segment of 1..3 cities with a at one end, to
 * between two neighbours-of-an-end, either way round. */
static int
improve_oropt(struct tsp_search *s, int a)
{
	int count, dir, e, j, side, c, x, y, s1, s2, p, nx, g, gain, add, rev, best = 0;
	int b_s1 = 0, b_s2 = 0, b_p = 0, b_nx = 0, b_x = 0, b_y = 0, b_rev = 0, b_count = 0;

	for (count = 1; count <= SEARCH_OR_MAX && count + 4 <= s->n; count++) {
		for (dir = 0; dir < (count == 1 ? 1 : 2); dir++) {
			/* The segment runs s1..s2 in tour order; a is s1 or s2. */
			s1 = s2 = a;
			for (j = 1; j < count; j++) {
				if (dir == 0)
					s2 = succ(s, s2);
				else
					s1 = pred(s, s1);
			}
			p = pred(s, s1);
			nx = succ(s, s2);
			g = D(s, p, s1) + D(s, s2, nx) - D(s, p, nx);
			if (g <= 0)
				continue;
			for (e = 0; e < 2; e++) {
				int end = e == 0 ? s1 : s2;
				const int *nb = s->neigh + (size_t)end * (size_t)s->k;
				for (j = 0; j < s->k; j++) {
					c = nb[j];
					if (g - D(s, end, c) <= 0)
						break;
					if (in_segment(s, s1, count, c))
						continue;
					for (side = 0; side < 2; side++) {
						x = side == 0 ? c : pred(s, c);
						y = side == 0 ? succ(s, c) : c;
						if (x == nx || y == p || in_segment(s, s1, count, x) ||
						    in_segment(s, s1, count, y))
							continue;
						/* Attach end to c; that fixes the orientation. */
						rev = (c == x) == (end == s2);
						if (count == 1)
							rev = 1;
						add = rev ? D(s, x, s2) + D(s, s1, y)
							  : D(s, x, s1) + D(s, s2, y);
						gain = g + D(s, x, y) - add;
						if (gain > best) {
							best = gain;
							b_s1 = s1, b_s2 = s2, b_p = p, b_nx = nx;
							b_x = x, b_y = y, b_rev = rev, b_count = count;
						}
					}
				}
			}
		}
	}
	if (best <= 0)
		return 0;
	/* p s1..s2 nx ... x y  ->  p nx ... x s2..s1 y  (-> x s1..s2 y) */
	make_2opt(s, b_p, b_s1, b_x, b_y);
	make_2opt(s, b_p, b_x, b_nx, b_s2);
	if (!b_rev && b_count > 1)
		make_2opt(s, b_x, b_s2, b_s1, b_y);
	s->len -= best;
	queue_push(s, b_p);
	queue_push(s, b_nx);
	queue_push(s, b_s1);
	queue_push(s, b_s2);
	queue_push(s, b_x);
	queue_push(s, b_y);
	return 1;
}

/* Descend until no active city improves, or until told to stop. */
static void
descend(struct tsp_search *s)
{
	int a;

	while (s->qcount > 0) {
		if (++s->polls % SEARCH_POLL_EVERY == 0 && search_should_stop(s))
			return;
		a = queue_pop(s);
		if (improve_2opt(s, a) || improve_oropt(s, a))
			queue_push(s, a);
	}
}

/* --- construction --- */

struct cand {
	int d, i, j;
};

static int
cand_cmp(const void *pa, const void *pb)
{
	const struct cand *a = pa, *b = pb;

	if (a->d != b->d)
		return a->d < b->d ? -1 : 1;
	if (a->i != b->i)
		return a->i < b->i ? -1 : 1;
	return (a->j > b->j) - (a->j < b->j);
}

/* Keep the k best candidates of one city in order (insertion: k is small). */
static void
cand_insert(struct cand *best, int *nbest, int k, struct cand c)
{
	int m = *nbest;

	if (m == k && cand_cmp(&c, &best[k - 1]) >= 0)
		return;
	if (m < k)
		m = ++*nbest;
	m--;
	while (m > 0 && cand_cmp(&c, &best[m - 1]) < 0) {
		best[m] = best[m - 1];
		m--;
	}
	best[m] = c;
}

static void
neighbours_brute(struct tsp_search *s)
{
	struct cand *best = malloc((size_t)s->k * sizeof(*best));
	int i, j, m, nbest;

	if (best == NULL)
		abort();
	for (i = 0; i < s->n; i++) {
		nbest = 0;
		for (j = 0; j < s->n; j++)
			if (j != i)
				cand_insert(best, &nbest, s->k, (struct cand){D(s, i, j), 0, j});
		for (m = 0; m < s->k; m++)
			s->neigh[(size_t)i * (size_t)s->k + (size_t)m] = best[m].j;
	}
	free(best);
}

/* Big instances: bucket the plane into a grid and search rings of cells
 * around each city until no closer city can remain.  Exact for Euclidean
 * types; for GEO the grid works on raw degrees, a fine approximation. */
static void
neighbours_grid(struct tsp_search *s)
{
	const struct tsp_instance *in = s->in;
	int n = s->n, k = s->k, g, i, j, r, cx, cy, x, y, m, nbest;
	double minx = in->x[0], maxx = in->x[0], miny = in->y[0], maxy = in->y[0], w;
	int *start, *items, *cell;
	struct cand *best;

	for (i = 1; i < n; i++) {
		minx = fmin(minx, in->x[i]);
		maxx = fmax(maxx, in->x[i]);
		miny = fmin(miny, in->y[i]);
		maxy = fmax(maxy, in->y[i]);
	}
	g = (int)ceil(sqrt(n / 2.0));
	w = fmax(maxx - minx, maxy - miny) / g;
	if (w <= 0)
		w = 1;
	start = calloc((size_t)g * (size_t)g + 1, sizeof(int));
	items = malloc((size_t)n * sizeof(int));
	cell = malloc((size_t)n * sizeof(int));
	best = malloc((size_t)k * sizeof(*best));
	if (start == NULL || items == NULL || cell == NULL || best == NULL)
		abort();
	for (i = 0; i < n; i++) {
		cx = (int)((in->x[i] - minx) / w);
		cy = (int)((in->y[i] - miny) / w);
		cx = cx >= g ? g - 1 : cx;
		cy = cy >= g ? g - 1 : cy;
		cell[i] = cy * g + cx;
		start[cell[i] + 1]++;
	}
	for (i = 0; i < g * g; i++)
		start[i + 1] += start[i];
	{
		int *fill = malloc((size_t)g * (size_t)g * sizeof(int));
		if (fill == NULL)
			abort();
		memcpy(fill, start, (size_t)g * (size_t)g * sizeof(int));
		for (i = 0; i < n; i++)
			items[fill[cell[i]]++] = i;
		free(fill);
	}
	for (i = 0; i < n; i++) {
		/* Rank by squared Euclidean distance in the grid's plane. */
		double far = INFINITY;
		struct cand *e2 = best;
		int ne = 0;
		double *e2d = malloc((size_t)k * sizeof(double));
		if (e2d == NULL)
			abort();
		cx = cell[i] % g;
		cy = cell[i] / g;
		for (r = 0; r < g; r++) {
			for (y = cy - r; y <= cy + r; y++) {
				if (y < 0 || y >= g)
					continue;
				for (x = cx - r; x <= cx + r; x++) {
					if (x < 0 || x >= g)
						continue;
					if (y != cy - r && y != cy + r && x != cx - r && x != cx + r)
						continue; /* inside: done in an earlier ring */
					for (m = start[y * g + x]; m < start[y * g + x + 1]; m++) {
						j = items[m];
						if (j == i)
							continue;
						double dx = in->x[i] - in->x[j], dy = in->y[i] - in->y[j];
						double dd = dx * dx + dy * dy;
						if (ne == k && dd >= e2d[k - 1])
							continue;
						int q = ne < k ? ne++ : k - 1;
						while (q > 0 && e2d[q - 1] > dd) {
							e2d[q] = e2d[q - 1];
							e2[q] = e2[q - 1];
							q--;
						}
						e2d[q] = dd;
						e2[q] = (struct cand){0, 0, j};
					}
				}
			}
			far = ne == k ? e2d[k - 1] : INFINITY;
			if (ne == k && (r * w) * (r * w) >= far)
				break;
		}
		/* Order the k found by the instance's own distance. */
		for (m = 0; m < ne; m++)
			e2[m].d = D(s, i, e2[m].j);
		qsort(e2, (size_t)ne, sizeof(*e2), cand_cmp);
		nbest = ne;
		for (m = 0; m < nbest; m++)
			s->neigh[(size_t)i * (size_t)k + (size_t)m] = e2[m].j;
		free(e2d);
	}
	free(start);
	free(items);
	free(cell);
	free(best);
}

/* Find a root in the union-find forest, halving paths as we go. */
static int
uf_find(int *parent, int v)
{
	while (parent[v] != v) {
		parent[v] = parent[parent[v]];
		v = parent[v];
	}
	return v;
}

/* Lay out fragments (adj, deg: at most two neighbours each, no cycle) as
 * one tour: walk a fragment to its far end, then jump to the nearest end of
 * an unvisited fragment. */
static void
chain_fragments(struct tsp_search *s, int (*adj)[2], const int *deg, int first)
{
	int n = s->n, filled = 0, cur = first, prev = -1, next, i, j, best, bd;
	unsigned char *done = calloc((size_t)n, 1);
	int *ends = malloc((size_t)n * sizeof(int)), nends = 0;

	if (done == NULL || ends == NULL)
		abort();
	for (i = 0; i < n; i++)
		if (deg[i] < 2)
			ends[nends++] = i;
	for (;;) {
		/* Walk the fragment from cur. */
		while (cur >= 0) {
			done[cur] = 1;
			s->tour[filled++] = cur;
			next = -1;
			for (j = 0; j < deg[cur]; j++)
				if (adj[cur][j] != prev && !done[adj[cur][j]])
					next = adj[cur][j];
			prev = cur;
			cur = next;
		}
		if (filled == n)
			break;
		/* Nearest free end: try the neighbour list, then scan. */
		best = -1;
		for (j = 0; j < s->k && best < 0; j++) {
			int c = s->neigh[(size_t)prev * (size_t)s->k + (size_t)j];
			if (!done[c] && deg[c] < 2)
				best = c;
		}
		if (best < 0) {
			bd = 0;
			for (i = 0; i < nends; i++) {
				int c = ends[i];
				if (done[c]) {
					ends[i--] = ends[--nends]; /* drop used ends */
					continue;
				}
				int d = D(s, prev, c);
				if (best < 0 || d < bd || (d == bd && c < best)) {
					best = c;
					bd = d;
				}
			}
		}
		cur = best;
		prev = -1;
	}
	free(done);
	free(ends);
}

static void
start_greedy(struct tsp_search *s)
{
	int n = s->n, k = s->k, i, j, nc = 0, first = -1;
	struct cand *c = malloc((size_t)n * (size_t)k * sizeof(*c));
	int (*adj)[2] = malloc((size_t)n * sizeof(*adj));
	int *deg = calloc((size_t)n, sizeof(int)), *parent = malloc((size_t)n * sizeof(int));

	if (c == NULL || adj == NULL || deg == NULL || parent == NULL)
		abort();
	for (i = 0; i < n; i++) {
		parent[i] = i;
		for (j = 0; j < k; j++) {
			int o = s->neigh[(size_t)i * (size_t)k + (size_t)j];
			c[nc++] = (struct cand){D(s, i, o), i < o ? i : o, i < o ? o : i};
		}
	}
	qsort(c, (size_t)nc, sizeof(*c), cand_cmp);
	for (i = 0; i < nc; i++) {
		int a = c[i].i, b = c[i].j, ra, rb;
		if (deg[a] == 2 || deg[b] == 2 || (ra = uf_find(parent, a)) == (rb = uf_find(parent, b)))
			continue;
		parent[ra] = rb;
		adj[a][deg[a]++] = b;
		adj[b][deg[b]++] = a;
	}
	for (i = 0; i < n && first < 0; i++)
		if (deg[i] < 2)
			first = i;
	chain_fragments(s, adj, deg, first);
	free(c);
	free(adj);
	free(deg);
	free(parent);
}

static void
start_nn(struct tsp_search *s)
{
	int n = s->n, i, cur = search_below(s, n);
	int (*adj)[2] = calloc((size_t)n, sizeof(*adj));
	int *deg = calloc((size_t)n, sizeof(int));

	/* No edges: every city is a fragment, so chaining is nearest neighbour. */
	if (adj == NULL || deg == NULL)
		abort();
	(void)i;
	chain_fragments(s, adj, deg, cur);
	free(adj);
	free(deg);
}

/* Tiny instances: try every tour with city 0 first. */
static void
brute_force(struct tsp_search *s)
{
	int n = s->n, perm[SEARCH_BRUTE_MAX], best[SEARCH_BRUTE_MAX], i, j;
	int64_t bestlen = INT64_MAX, len;

	for (i = 0; i < n; i++)
		perm[i] = i;
	for (;;) {
		len = 0;
		for (i = 0; i < n; i++)
			len += D(s, perm[i], perm[(i + 1) % n]);
		if (len < bestlen) {
			bestlen = len;
			memcpy(best, perm, sizeof(perm));
		}
		/* next_permutation on perm[1..n) */
		for (i = n - 2; i >= 1 && perm[i] > perm[i + 1]; i--)
			;
		if (i < 1)
			break;
		for (j = n - 1; perm[j] < perm[i]; j--)
			;
		int t = perm[i];
		perm[i] = perm[j];
		perm[j] = t;
		for (i++, j = n - 1; i < j; i++, j--) {
			t = perm[i];
			perm[i] = perm[j];
			perm[j] = t;
		}
	}
	memcpy(s->tour, best, (size_t)n * sizeof(int));
}

/* Remember the current tour if it is the shortest yet. */
static void
note_best(struct tsp_search *s)
{
	if (s->len >= s->best_len)
		return;
	memcpy(s->best, s->tour, (size_t)s->n * sizeof(int));
	s->best_len = s->len;
}

struct tsp_search *
tsp_search_new(const struct tsp_instance *in, uint64_t seed, enum tsp_start start)
{
	struct tsp_search *s = calloc(1, sizeof(*s));
	int n = in->n, i;

	if (s == NULL)
		abort();
	s->in = in;
	s->n = n;
	s->k = n - 1 < SEARCH_K ? n - 1 : SEARCH_K;
	s->rng = seed;
	s->tour = malloc((size_t)n * sizeof(int));
	s->pos = malloc((size_t)n * sizeof(int));
	s->queue = malloc((size_t)n * sizeof(int));
	s->queued = calloc((size_t)n, 1);
	s->scratch = malloc((size_t)n * sizeof(int));
	s->neigh = malloc(((size_t)n * (size_t)s->k + 1) * sizeof(int));
	s->best = malloc((size_t)n * sizeof(int));
	if (s->best == NULL || s->tour == NULL || s->pos == NULL || s->queue == NULL || s->queued == NULL ||
	    s->scratch == NULL || s->neigh == NULL)
		abort();
	if (n <= SEARCH_BRUTE_MAX) {
		brute_force(s);
	} else {
		if (n <= SEARCH_BRUTE_GRID)
			neighbours_brute(s);
		else
			neighbours_grid(s);
		if (start == TSP_START_GREEDY)
			start_greedy(s);
		else
			start_nn(s);
	}
	for (i = 0; i < n; i++)
		s->pos[s->tour[i]] = i;
	s->len = tsp_tour_length(in, s->tour);
	s->best_len = INT64_MAX; /* set when the first descent ends */
	if (n > SEARCH_BRUTE_MAX)
		queue_all(s);
	else
		note_best(s);
	return s;
}

void
tsp_search_free(struct tsp_search *s)
{
	if (s == NULL)
		return;
	free(s->neigh);
	free(s->best);
	free(s->tour);
	free(s->pos);
	free(s->queue);
	free(s->queued);
	free(s->scratch);
	free(s->journal);
	free(s);
}

/* Swap two random adjacent short segments and activate the cut points. */
static void
kick(struct tsp_search *s)
{
	int n = s->n, lmax = (n - 2) / 2, i, a, b, t[6];
	int64_t delta;

	if (lmax > SEARCH_SEG_MAX)
		lmax = SEARCH_SEG_MAX;
	i = search_below(s, n);
	a = 1 + search_below(s, lmax);
	b = 1 + search_below(s, lmax);
	t[0] = s->tour[i];
	t[1] = s->tour[(i + 1) % n];
	t[2] = s->tour[(i + a) % n];
	t[3] = s->tour[(i + a + 1) % n];
	t[4] = s->tour[(i + a + b) % n];
	t[5] = s->tour[(i + a + b + 1) % n];
	/* A B C D -> A C B D: edges (t0,t1) (t2,t3) (t4,t5) become
	 * (t0,t3) (t4,t1) (t2,t5). */
	delta = (int64_t)D(s, t[0], t[3]) + D(s, t[4], t[1]) + D(s, t[2], t[5]) -
		D(s, t[0], t[1]) - D(s, t[2], t[3]) - D(s, t[4], t[5]);
	swap_segments(s, i, a, b);
	s->len += delta;
	for (a = 0; a < 6; a++)
		queue_push(s, t[a]);
}

/* Back to the best tour, shaken harder than one kick can; the descent that
 * follows is accepted whatever it finds. */
static void
restart(struct tsp_search *s)
{
	int i;

	if (s->len > s->best_len) {
		queue_clear(s);
		memcpy(s->tour, s->best, (size_t)s->n * sizeof(int));
		for (i = 0; i < s->n; i++)
			s->pos[s->tour[i]] = i;
		s->len = s->best_len;
	}
	for (i = 0; i < SEARCH_RESTART_KICKS; i++)
		kick(s);
	descend(s);
	queue_clear(s);
	s->stall = 0;
	s->restarts++;
}

/* One kick and descent; keep the result unless it is longer. */
static void
iterate(struct tsp_search *s)
{
	int64_t before = s->len;
	uint64_t limit = (uint64_t)s->n * SEARCH_STALL_PER_CITY;

	if (s->stall >= (limit > SEARCH_STALL_MIN ? limit : SEARCH_STALL_MIN)) {
		restart(s);
		note_best(s);
		s->iterations++;
		return;
	}
	s->journaling = 1;
	s->njournal = 0;
	kick(s);
	descend(s);
	queue_clear(s);
	if (s->len > before) {
		journal_undo(s);
		s->len = before;
	}
	s->journaling = 0;
	s->njournal = 0;
	s->stall = s->len < before ? 0 : s->stall + 1;
	note_best(s);
	s->iterations++;
}

int64_t
tsp_search_run(struct tsp_search *s, const struct tsp_hooks *hooks, uint64_t max_iterations,
	       int64_t target)
{
	uint64_t limit = max_iterations ? s->iterations + max_iterations : UINT64_MAX;

	s->hooks = hooks;
	s->stopped = 0;
	if (s->n <= SEARCH_BRUTE_MAX)
		return s->len; /* already optimal */
	/* Finish a descent left pending (the first one, or after adopting). */
	descend(s);
	if (s->qcount == 0)
		note_best(s);
	while (!s->stopped && s->qcount == 0) {
		if (target >= 0 && s->best_len <= target)
			break;
		if (s->iterations >= limit)
			break;
		if (hooks != NULL && hooks->sync != NULL) {
			hooks->sync(hooks->arg, s);
			if (s->qcount > 0) {
				descend(s); /* a tour was adopted */
				if (s->qcount == 0)
					note_best(s);
				continue;
			}
		}
		if (search_should_stop(s))
			break;
		iterate(s);
	}
	s->hooks = NULL;
	return tsp_search_length(s);
}

/* The best tour, or before the first descent ends, the current one. */
int64_t
tsp_search_length(const struct tsp_search *s)
{
	return s->best_len < s->len ? s->best_len : s->len;
}

const int *
tsp_search_tour(const struct tsp_search *s)
{
	return s->best_len < s->len ? s->best : s->tour;
}

uint64_t
tsp_search_iterations(const struct tsp_search *s)
{
	return s->iterations;
}

int
tsp_search_adopt(struct tsp_search *s, const int *tour, int64_t len)
{
	int i;

	if (len >= tsp_search_length(s))
		return 0;
	queue_clear(s);
	memcpy(s->tour, tour, (size_t)s->n * sizeof(int));
	for (i = 0; i < s->n; i++)
		s->pos[tour[i]] = i;
	s->len = len;
	s->stall = 0;
	/* It is likely optimal for a sibling's neighbourhood, which is ours;
	 * one pass over every city confirms it or finds more. */
	if (s->n > SEARCH_BRUTE_MAX)
		queue_all(s);
	return 1;
}
