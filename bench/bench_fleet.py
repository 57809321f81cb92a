#!/usr/bin/python3
"""bench/bench_fleet.py - does a fleet turn CPU that is really spare into
faster or better answers?

    tests/broker run /usr/bin/python3 bench/bench_fleet.py [options] BUILD_DIR

Emulates servers on this machine with kernel CPU limits: every occamyd runs
in its own cgroup v1 CPU group (/sys/fs/cgroup/cpu/occamy-bench-PID-I,
cpu.cfs_quota_us = --cpu x cpu.cfs_period_us), placed there with all its
threads right after it starts, with 1 slot per server (slots = the server's
CPU share).  The broker and this script stay outside the quotas.  So 4
servers of 0.4 CPU really have 1.6 CPUs, where 1 has 0.4.  The groups are
removed at the end, also on failure.  Without a writable cpu controller the
run goes on without quotas (marked so in the output); --smoke then skips.

Configurations (each its own fleet, all running all along):
    N on    N servers, tsp defaults: the master + external assistants from
            its help request on the other servers
    N off   N servers, tsp help = no, expand = no: a plain worker pool
    N min   the N off fleet, the master asking min-assistants = N-1
            protected assistants (helpers otherwise off)

Workload A, one request on an idle fleet (a TSPLIB file, headers budget-ms,
seed, and for time-to-gap target-length): the time to reach a 1 %, 0.5 %
and 0.3 % gap (the master stops at its target; elapsed_ms of the reply), and
the gap at the fixed budget.  A run that does not reach its target within
the budget is "not reached".  Seeds and configurations take turns request by
request, and every daemon of every fleet is idle before each request.  Each
reply is checked (a permutation whose recomputed length is the one
claimed).  The CPU each daemon got is read from /proc/PID/stat (utime +
stime) around every request, throttling from each group's cpu.stat.

The bursty trace, on the largest fleet: bench_bursty.py's trace (bursts of
1..12 TSP requests ~100 ms apart, seconds of silence between; pcb442 or
pr1002, JSON bodies with budget_ms and the optimum) played on the N on and
the N off fleet in turn, --bursty-reps times with a new trace seed each
time (on/off, then off/on, ...).  Per burst size: mean, p50 and p90 of the
gap to the optimum and of the latency publish -> reply, on over off; per
configuration the CPU its fleet got over the trace (as above), throttling,
helpers started and requeues.

Writes $OCCAMY_BENCH_OUT/fleet.md (--smoke: fleet_smoke.md), fleet.csv
(workload A) and fleet_bursty.csv (one row per bursty request).

Options:
    --smoke           pcb442, 1 and 2 servers, 1 seed, 1 s budget; bursty:
                      the 3-request smoke trace, 300 ms budget, once (< 40 s)
    --seeds N         seeds per configuration and measure (default 5)
    --instance NAME   TSPLIB instance (default pr1002)
    --budget-ms MS    budget of every request (default 3000)
    --servers 1,2,4   fleet sizes
    --cpu SHARE       CPU quota of each server (default 0.4)
    --bursty-reps N   bursty trace plays per configuration (default 4; 0: none)
    --bursty-budget-ms MS  budget of every bursty request (default 1000)
    --out DIR         output directory (default bench/out)
"""

import contextlib
import csv
import os
import platform
import re
import signal
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from tspbench import OPTIMA, Fleet, arg_parser, check_reply, load, log, parse, play_trace  # noqa: E402
import bench_bursty as bursty  # noqa: E402
import schedbench as sb  # noqa: E402

CGROUP_ROOT = "/sys/fs/cgroup/cpu"
PERIOD_US = 100000
# % above the optimum, for time-to-gap.  pr1002's greedy start and first
# descent are about 1 % above: 0.3 % is the one 1 server rarely reaches.
GAPS = (1.0, 0.5, 0.3)


def parse_args():
    ap = arg_parser(__doc__)
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--instance", default=None)
    ap.add_argument("--budget-ms", type=int, default=None)
    ap.add_argument("--servers", default=None)
    ap.add_argument("--cpu", type=float, default=0.4)
    ap.add_argument("--bursty-reps", type=int, default=None)
    ap.add_argument("--bursty-budget-ms", type=int, default=None)
    a = parse(ap)
    smoke = {"seeds": 1, "instance": "pcb442", "budget_ms": 1000, "servers": "1,2",
             "bursty_reps": 1, "bursty_budget_ms": 300}
    full = {"seeds": 5, "instance": "pr1002", "budget_ms": 3000, "servers": "1,2,4",
            "bursty_reps": 4, "bursty_budget_ms": 1000}
    for k, v in (smoke if a.smoke else full).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.servers = [int(x) for x in a.servers.split(",")]
    if a.instance not in OPTIMA:
        ap.error(f"unknown instance {a.instance} (known: {', '.join(OPTIMA)})")
    if not 0.01 <= a.cpu <= os.cpu_count():
        ap.error("--cpu must be 0.01..the number of CPUs")
    return a


ARGS = parse_args()
import occamy_test as ot  # noqa: E402
from occamy_test import rpc  # noqa: E402


def say(line):
    """What the smoke test reads: on stdout, prefixed."""
    print(f"fleet: {line}", flush=True)


# ---------------------------------------------------------------- cgroups

def _write(path, value):
    with open(path, "w") as f:
        f.write(str(value))


def _read(path):
    with open(path) as f:
        return f.read()


class CpuGroups:
    """One cgroup v1 CPU group per daemon with a CFS quota of `share` CPUs.
    close() moves anything left back to the root group and removes every
    group it made."""

    def __init__(self, share):
        self.share = share
        self.quota_us = int(round(share * PERIOD_US))
        self.paths = []
        self.reason = self._probe()

    def _probe(self):
        """None if groups can be made here, else why not."""
        if not os.path.exists(os.path.join(CGROUP_ROOT, "cpu.cfs_quota_us")):
            return f"no cgroup v1 cpu controller with CFS quotas at {CGROUP_ROOT}"
        if not os.access(CGROUP_ROOT, os.W_OK):
            return f"{CGROUP_ROOT} is not writable (needs root)"
        self._remove_stale()
        probe = os.path.join(CGROUP_ROOT, f"occamy-bench-{os.getpid()}-probe")
        try:
            os.mkdir(probe)
            try:
                _write(os.path.join(probe, "cpu.cfs_quota_us"), self.quota_us)
            finally:
                os.rmdir(probe)
        except OSError as e:
            return f"cannot make a CPU group under {CGROUP_ROOT}: {e}"
        return None

    @staticmethod
    def _remove_stale():
        # Groups of runs killed before they could clean up (empty once
        # their daemons died with them).
        for name in os.listdir(CGROUP_ROOT):
            m = re.fullmatch(r"occamy-bench-(\d+)-\w+", name)
            if m and not os.path.exists(f"/proc/{m.group(1)}"):
                with contextlib.suppress(OSError):
                    os.rmdir(os.path.join(CGROUP_ROOT, name))

    def place(self, i, pid):
        """Make group i and move process pid, every thread, into it."""
        path = os.path.join(CGROUP_ROOT, f"occamy-bench-{os.getpid()}-{i}")
        os.mkdir(path)
        self.paths.append(path)
        _write(os.path.join(path, "cpu.cfs_period_us"), PERIOD_US)
        _write(os.path.join(path, "cpu.cfs_quota_us"), self.quota_us)
        _write(os.path.join(path, "cgroup.procs"), pid)
        threads = set(os.listdir(f"/proc/{pid}/task"))
        inside = set(_read(os.path.join(path, "tasks")).split())
        if not threads <= inside:
            raise SystemExit(f"{path}: threads {sorted(threads - inside)} of {pid} not moved")
        quota = int(_read(os.path.join(path, "cpu.cfs_quota_us")))
        say(f"cgroup {path}: quota {quota}/{PERIOD_US} us, pid {pid} ({len(threads)} threads)")
        return path

    @staticmethod
    def throttling(path):
        """(periods, throttled periods, throttled seconds) of a group so far."""
        st = dict(line.split() for line in _read(os.path.join(path, "cpu.stat")).splitlines())
        return int(st["nr_periods"]), int(st["nr_throttled"]), int(st["throttled_time"]) / 1e9

    def close(self):
        removed, left = 0, []
        for path in reversed(self.paths):
            try:
                for pid in _read(os.path.join(path, "cgroup.procs")).split():
                    with contextlib.suppress(OSError):
                        _write(os.path.join(CGROUP_ROOT, "cgroup.procs"), pid)
                os.rmdir(path)
                removed += 1
            except OSError as e:
                left.append(f"{path} ({e})")
        if self.paths:
            say(f"cgroups removed: {removed}/{len(self.paths)}"
                + (f"; NOT removed: {', '.join(left)}" if left else ""))
        self.paths = []
        return not left


def cpu_seconds(pid):
    """utime + stime of a process, all its threads, dead ones included."""
    fields = _read(f"/proc/{pid}/stat").rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -------------------------------------------------------------------- run

class Config:
    def __init__(self, name, fleet, servers, helpers, min_assistants=0):
        self.name, self.fleet, self.servers = name, fleet, servers
        self.helpers, self.min_assistants = helpers, min_assistants


def run_one(cfg, data, coords, opt, measure, seed):
    """One request; measure is a gap in % (time to it) or None (the gap at
    the budget)."""
    headers = {"budget-ms": ARGS.budget_ms, "seed": seed}
    target = None
    if measure is not None:
        target = int(opt * (1 + measure / 100))
        headers["target-length"] = target
    if cfg.min_assistants:
        headers["min-assistants"] = cfg.min_assistants
    pids = [d.pid for d in cfg.fleet.daemons]
    cpu0 = [cpu_seconds(p) for p in pids]
    t0 = time.monotonic()
    res = rpc(cfg.fleet.daemons[0], "tsp", data, headers=headers,
              timeout=ARGS.budget_ms / 1000 + 60).json()
    wall = time.monotonic() - t0
    cpu = [cpu_seconds(p) - c for p, c in zip(pids, cpu0)]
    check_reply(coords, res, f"{cfg.name} seed {seed}")
    return {"config": cfg.name, "measure": "budget" if measure is None else f"{measure}%",
            "seed": seed, "length": res["length"],
            "gap_pct": 100.0 * (res["length"] - opt) / opt,
            "reached": target is None or res["length"] <= target,
            "elapsed_ms": res["elapsed_ms"], "wall_s": wall, "cpu_s": sum(cpu),
            "max_share": max(c / wall for c in cpu),
            "reports": res["reports"],
            "protected": res["assistants"]["protected"],
            "external": res["assistants"]["external"]}


def _metric(ms, key):
    return sum(m.get(key, 0) for m in ms)


HELPERS_EXT = 'occamy_helpers_started_total{kind="external"}'
HELPERS_INT = 'occamy_helpers_started_total{kind="internal"}'
REQUEUED = ('occamy_requeued_total{reason="no_room"}',
            'occamy_requeued_total{reason="kill_timeout"}')


def run_trace(cfg, rep, trace, payloads, end_s, coords, capped):
    """One play of a bursty trace on cfg's fleet: ([one dict per request],
    {the fleet's CPU, throttling, helpers and requeues over the play})."""
    ds = cfg.fleet.daemons
    cpu0 = [cpu_seconds(d.pid) for d in ds]
    th0 = [CpuGroups.throttling(d.cgroup) for d in ds] if capped else None
    m0 = cfg.fleet.metrics()
    load1 = os.getloadavg()[0]
    pub = sb.Publisher(ot)
    try:
        t0 = time.monotonic()
        got, ok = play_trace(pub, ds[0].names, trace, payloads,
                             f"{cfg.name.replace(' ', '')}-r{rep}-", end_s + 120)
        wall = time.monotonic() - t0 - 0.2   # play_trace starts 200 ms on
    finally:
        pub.close()
    cpu = sum(cpu_seconds(d.pid) for d in ds) - sum(cpu0)
    m1 = cfg.fleet.metrics()
    if not ok:
        raise SystemExit(f"bursty {cfg.name} play {rep}: {len(trace) - len(got)} of "
                         f"{len(trace)} replies missing")
    sizes = bursty.burst_sizes(trace)
    recs = []
    for i, lat, res in got:
        name = trace[i][1]
        check_reply(coords[name], res, f"bursty {cfg.name} play {rep} request {i}")
        opt = OPTIMA[name]
        recs.append({"config": cfg.name, "play": rep, "i": i, "burst": sizes[i],
                     "instance": name, "length": res["length"],
                     "gap_pct": 100.0 * (res["length"] - opt) / opt, "latency_s": lat,
                     "elapsed_ms": res["elapsed_ms"], "reports": res["reports"],
                     "internal": res["assistants"]["internal"],
                     "external": res["assistants"]["external"]})
    run = {"config": cfg.name, "play": rep, "requests": len(recs), "wall_s": wall,
           "cpu_s": cpu, "load": load1,
           "helpers": (_metric(m1, HELPERS_EXT) - _metric(m0, HELPERS_EXT),
                       _metric(m1, HELPERS_INT) - _metric(m0, HELPERS_INT)),
           "requeued": sum(_metric(m1, k) - _metric(m0, k) for k in REQUEUED)}
    if capped:
        th1 = [CpuGroups.throttling(d.cgroup) for d in ds]
        run["throttled"] = (sum(b[1] - a[1] for a, b in zip(th0, th1)),
                            sum(b[0] - a[0] for a, b in zip(th0, th1)))
    return recs, run


def run_bursty(pair, fleets, capped):
    """The bursty trace on the fleets of pair (helpers on, off), each
    --bursty-reps times, a new trace seed every play, on and off taking
    turns (on/off, off/on, ...).  Returns (request rows, play rows)."""
    coords = {name: load(name)[1] for name in sorted(bursty.INSTANCES)}
    recs, runs = [], []
    for rep in range(ARGS.bursty_reps):
        trace, end_s = bursty.make_trace(ARGS.smoke, bursty.SEED + rep)
        payloads = bursty.bodies(ot, trace, ARGS.bursty_budget_ms)
        for cfg in (pair if rep % 2 == 0 else pair[::-1]):
            for f in fleets:
                f.wait_idle(ARGS.bursty_budget_ms / 1000 + 15)
            r, run = run_trace(cfg, rep, trace, payloads, end_s, coords, capped)
            recs += r
            runs.append(run)
            log(f"  bursty {cfg.name:6} play {rep}: {len(r)} requests in {run['wall_s']:.1f} s, "
                f"mean gap {sb.mean(x['gap_pct'] for x in r):.3f} %, mean latency "
                f"{sb.mean(x['latency_s'] for x in r):.2f} s, cpu {run['cpu_s']:.1f} s, "
                f"helpers ext/int {run['helpers'][0]:.0f}/{run['helpers'][1]:.0f}")
    return recs, runs


def on_signal(signum, frame):
    # Unwind through the finally blocks: daemons stopped, groups removed.
    raise SystemExit(f"signal {signum}")


def main():
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, on_signal)
    t_start = time.monotonic()
    os.makedirs(ARGS.out, exist_ok=True)
    base = os.path.join(ARGS.out, "fleet_smoke" if ARGS.smoke else "fleet")
    groups = CpuGroups(ARGS.cpu)
    if groups.reason:
        if ARGS.smoke:
            say(f"SKIP: {groups.reason}")
            with open(base + ".md", "w") as f:
                f.write(f"## Fleet with real capacity\n\nSkipped: {groups.reason}.\n")
            return
        say(f"WARNING: {groups.reason}: running WITHOUT CPU quotas; the figures are "
            "not those of separate servers")
    data, coords = load(ARGS.instance)
    opt = OPTIMA[ARGS.instance]
    seeds = [2000 + k for k in range(ARGS.seeds)]
    measures = list(GAPS) + [None]
    rows, load_samples, throttle = [], [], {}
    b_recs, b_runs = [], []
    load_before = os.getloadavg()
    n_daemon = 0
    try:
        with contextlib.ExitStack() as stack:
            configs = []

            def started(i, d):
                nonlocal n_daemon
                if groups.reason is None:
                    d.cgroup = groups.place(n_daemon, d.pid)
                n_daemon += 1
            for n in ARGS.servers:
                for helpers in (True, False):
                    name = f"{n} {'on' if helpers else 'off'}"
                    log(f"starting {name}: {n} server(s) x 1 slot")
                    fleet = stack.enter_context(Fleet(n, 1, off=not helpers, started=started))
                    configs.append(Config(name, fleet, n, helpers))
            big = max(ARGS.servers)
            if big > 1:
                off = next(c for c in configs if c.servers == big and not c.helpers)
                configs.append(Config(f"{big} min", off.fleet, big, False, big - 1))
            fleets = list({id(c.fleet): c.fleet for c in configs}.values())
            for seed in seeds:
                for measure in measures:
                    for cfg in configs:
                        for f in fleets:
                            f.wait_idle(ARGS.budget_ms / 1000 + 15)
                        load_samples.append(os.getloadavg()[0])
                        r = run_one(cfg, data, coords, opt, measure, seed)
                        rows.append(r)
                        log(f"  {cfg.name:6} seed {seed} {r['measure']:6}: gap "
                            f"{r['gap_pct']:6.3f} %  {r['elapsed_ms']:5} ms"
                            f"{'' if r['reached'] else ' (not reached)'}  cpu "
                            f"{r['cpu_s']:.2f} s, max share {r['max_share']:.2f}  "
                            f"reports {r['reports']}")
            for f in fleets:
                f.wait_idle(ARGS.budget_ms / 1000 + 15)
            for cfg in configs:
                if groups.reason is None and cfg.min_assistants == 0:
                    t = [CpuGroups.throttling(d.cgroup) for d in cfg.fleet.daemons]
                    throttle[cfg.name] = tuple(sum(x[k] for x in t) for k in range(3))
            pair = [c for c in configs if c.servers == big and not c.min_assistants]
            if ARGS.bursty_reps > 0:
                log(f"bursty trace on {big} server(s), helpers on and off")
                b_recs, b_runs = run_bursty(pair, fleets, groups.reason is None)
    finally:
        ok = groups.close()
    if not ok:
        raise SystemExit("some CPU groups could not be removed")
    say(f"tours checked: {len(rows)} valid")
    if ARGS.bursty_reps > 0:
        say(f"bursty tours checked: {len(b_recs)} valid, {len(b_runs)} plays")
    load_after = os.getloadavg()
    elapsed = time.monotonic() - t_start

    fields = list(rows[0])
    with open(base + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    if b_recs:
        with open(base + "_bursty.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(b_recs[0]))
            w.writeheader()
            w.writerows(b_recs)
    write_markdown(base + ".md", configs, rows, groups, throttle, seeds, opt,
                   load_before, load_after, load_samples, elapsed,
                   bursty_markdown(pair, b_recs, b_runs, groups) if b_recs else [])
    print(open(base + ".md").read())
    log(f"wrote {base}.md, {base}.csv{f', {base}_bursty.csv' if b_recs else ''} "
        f"in {elapsed:.0f} s")


# ----------------------------------------------------------------- report

def time_to(rows):
    """Median time to the target in s, unreached runs counting as never
    (inf), and how many reached it."""
    ts = sorted(r["elapsed_ms"] / 1000 if r["reached"] else float("inf") for r in rows)
    return statistics.median(ts), sum(r["reached"] for r in rows), len(rows)


def fmt_time(t):
    return f"> {ARGS.budget_ms / 1000:g}" if t == float("inf") else f"{t:.2f}"


def ratio(a, b):
    """a / b of medians that may be inf (not reached by half the runs)."""
    inf = float("inf")
    if a == inf and b == inf:
        return "–"
    if a == inf:
        return "> 1 (not reached)"
    if b == inf:
        return f"< {a / (ARGS.budget_ms / 1000):.2f}"
    return f"{a / b:.2f}" if b > 0 else "–"


def write_markdown(path, configs, rows, groups, throttle, seeds, opt, load_before, load_after,
                   load_samples, elapsed, bursty_lines):
    cpu = "?"
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as f:
        cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    capped = groups.reason is None
    by = {(c.name, m): [r for r in rows if r["config"] == c.name and r["measure"] == m]
          for c in configs for m in [f"{g}%" for g in GAPS] + ["budget"]}
    budget_s = ARGS.budget_ms / 1000

    def gap(name):
        return statistics.mean(r["gap_pct"] for r in by[name, "budget"])

    def tt(name, g):
        return time_to(by[name, f"{g}%"])[0]
    L = ["## Fleet with real capacity: servers under CPU quotas\n"]
    L.append(f"`bench/bench_fleet.py{' --smoke' if ARGS.smoke else ''}` on "
             f"{time.strftime('%Y-%m-%d %H:%M %Z')}: {os.cpu_count()} CPUs ({cpu}), "
             f"{platform.system()} {platform.release()}; 1-min load average "
             f"{load_before[0]:.2f} before, {load_after[0]:.2f} after, "
             f"{statistics.mean(load_samples):.2f} mean and {max(load_samples):.2f} max "
             f"before the requests (other jobs share this machine); {elapsed:.0f} s in all.\n")
    if capped:
        L.append(f"Every server is an occamyd with 1 slot in its own cgroup v1 CPU group, "
                 f"`cpu.cfs_quota_us = {groups.quota_us}` of `cpu.cfs_period_us = "
                 f"{PERIOD_US}`: **{ARGS.cpu:g} CPU per server**; the broker and the "
                 "client are outside the quotas.\n")
    else:
        L.append(f"**NO CPU QUOTAS** ({groups.reason}): every daemon could use any CPU, so "
                 "more servers do not mean more CPU here and the figures below are not "
                 "those of a fleet.\n")
    L.append(f"{ARGS.instance} (optimum {opt}), budget {ARGS.budget_ms} ms, {len(seeds)} seeds "
             f"({seeds[0]}..{seeds[-1]}) per configuration and measure, configurations and "
             "measures taking turns request by request, every daemon idle before each "
             "request.  *on*: tsp defaults (the master + external assistants on the other "
             "servers); *off*: `help = no`, `expand = no`, a plain worker pool; *min*: the "
             "off fleet, the master asking `min-assistants` = servers − 1 protected "
             "assistants.  Time to a gap: median of the replies' `elapsed_ms` with the "
             "`target-length` header (runs that did not reach it count as never), and how "
             "many reached it.  Gap: mean ± sd at the budget.  CPU: the fleet's CPU time "
             "(utime + stime of every daemon) over the wall time of its requests, and the "
             "largest share one daemon got during one request of at least 0.5 s (the quota is "
             "per 100 ms period, so shorter requests can exceed it).  Throttled periods: "
             "of all the fleet's groups over the run (the *min* requests run on the off "
             "fleet and count with it).\n")
    g_head = " | ".join(f"to {g:g} % (s) | reached" for g in GAPS)
    L.append(f"| servers × CPU | helpers | {g_head} | gap at {budget_s:g} s (%) | fleet CPU "
             f"| max share of a daemon | throttled periods |")
    L.append("|" + "---|" * (6 + 2 * len(GAPS)))
    for c in configs:
        cells = []
        for g in GAPS:
            t, k, n = time_to(by[c.name, f"{g}%"])
            cells.append(f"{fmt_time(t)} | {k}/{n}")
        rs = [r for r in rows if r["config"] == c.name]
        cores = sum(r["cpu_s"] for r in rs) / sum(r["wall_s"] for r in rs)
        share = max(r["max_share"] for r in rs if r["wall_s"] >= 0.5) if any(
            r["wall_s"] >= 0.5 for r in rs) else max(r["max_share"] for r in rs)
        gs = [r["gap_pct"] for r in by[c.name, "budget"]]
        sd = statistics.stdev(gs) if len(gs) > 1 else 0.0
        th = throttle.get(c.name)
        helpers = {True: "on", False: "off"}[c.helpers] if not c.min_assistants else \
            f"off, min_assistants = {c.min_assistants}"
        L.append(f"| {c.servers} × {ARGS.cpu:g} | {helpers} | " + " | ".join(cells)
                 + f" | {statistics.mean(gs):.3f} ± {sd:.3f} | {cores:.2f} | {share:.2f} | "
                 + (f"{th[1]}/{th[0]}" if th else ("with the off row" if c.min_assistants else "–"))
                 + " |")
    L.append("")
    one = min(ARGS.servers)
    L.append(f"Ratios, this run (< 1: faster or better): time to a gap and gap at the budget "
             f"of N servers over {one} server, and helpers on over off (same N):\n")
    L.append("| ratio | " + " | ".join(f"time to {g:g} %" for g in GAPS) + " | gap |")
    L.append("|" + "---|" * (2 + len(GAPS)))
    pairs = []
    for n in ARGS.servers:
        if n != one:
            for h in ("on", "off"):
                pairs.append((f"{n} {h}", f"{one} {h}"))
    for n in ARGS.servers:
        pairs.append((f"{n} on", f"{n} off"))
    if any(c.min_assistants for c in configs):
        big = max(ARGS.servers)
        pairs.append((f"{big} min", f"{big} off"))
        pairs.append((f"{big} min", f"{big} on"))
    for a, b in pairs:
        gb = gap(b)
        L.append(f"| {a} / {b} | " + " | ".join(ratio(tt(a, g), tt(b, g)) for g in GAPS)
                 + (f" | {gap(a) / gb:.2f} |" if gb > 0 else " | – |"))
    L.append("")
    L.append("Mean assistants that reported to a master at the budget (external from help "
             "requests; protected from `min-assistants`): "
             + ", ".join(f"{c.name} {statistics.mean(r['external'] for r in by[c.name, 'budget']):.1f}"
                         f" + {statistics.mean(r['protected'] for r in by[c.name, 'budget']):.1f}"
                         for c in configs) + ".\n")
    L += bursty_lines or ["The bursty trace was not run (`--bursty-reps 0`).\n"]
    L.append("Caveats: the servers share one machine's memory bandwidth and caches; a quota "
             "caps CPU time per 100 ms period, so a server gets its share as bursts (CFS "
             "throttling, counted above) rather than as a slower CPU.  The machine is shared "
             "with other jobs: the *fleet CPU* column shows what each configuration really "
             f"got against its {ARGS.cpu:g} CPU per server.\n")
    with open(path, "w") as f:
        f.write("\n".join(L))


def on_off(on, off, digits=3):
    return f"{on:.{digits}f} / {off:.{digits}f}" if on == on and off == off else "–"


def ratio_of(a, b):
    return f"{a / b:.2f}" if b == b and a == a and b > 0 else "–"


def bursty_markdown(pair, recs, runs, groups):
    """The bursty section: per burst size gap and latency on / off, and the
    CPU each configuration got."""
    on, off = pair
    n = on.servers
    sizes = sorted({r["burst"] for r in recs})
    L = [f"### Bursty trace on {n} servers × {ARGS.cpu:g} CPU, helpers on and off\n"]
    L.append(f"`bench/bench_bursty.py`'s trace (`make_trace`, bursts of "
             f"{', '.join(str(s) for s in bursty.burst_list(bursty.make_trace(ARGS.smoke)[0]))} "
             "requests, exponential gaps of 100 ms inside a burst, "
             f"{'1.5–2.5' if ARGS.smoke else '3–6'} s of silence between; each request pcb442 or "
             f"pr1002 as a JSON body with `budget_ms` = {ARGS.bursty_budget_ms} and the "
             "optimum, at which the master stops), played "
             f"{ARGS.bursty_reps} time(s), trace seeds {bursty.SEED}..{bursty.SEED + ARGS.bursty_reps - 1}"
             f" (times, instances, request seeds), each play on the *{on.name}* and the "
             f"*{off.name}* fleet of the table above in turn (on first in even plays), every "
             "daemon of every fleet idle before each play.  Latency: publish → reply at the "
             "client (including the wait for a free slot).  Gap: length / optimum − 1, every "
             "tour checked.  Ratios on / off of the means, same plays.\n")
    L.append(f"| burst size | requests per config | mean gap on / off (%) | p50 gap (%) | "
             f"p90 gap (%) | gap on/off | mean latency on / off (s) | p50 latency (s) | "
             f"p90 latency (s) | latency on/off | assistants reported (on, mean) |")
    L.append("|" + "---|" * 11)

    def row(label, keep):
        a = [r for r in recs if r["config"] == on.name and keep(r)]
        b = [r for r in recs if r["config"] == off.name and keep(r)]
        ga, gb = [r["gap_pct"] for r in a], [r["gap_pct"] for r in b]
        la, lb = [r["latency_s"] for r in a], [r["latency_s"] for r in b]
        L.append(f"| {label} | {len(a)} / {len(b)} | {on_off(sb.mean(ga), sb.mean(gb))} | "
                 f"{on_off(sb.pct(ga, 50), sb.pct(gb, 50))} | "
                 f"{on_off(sb.pct(ga, 90), sb.pct(gb, 90))} | "
                 f"{ratio_of(sb.mean(ga), sb.mean(gb))} | "
                 f"{on_off(sb.mean(la), sb.mean(lb), 2)} | "
                 f"{on_off(sb.pct(la, 50), sb.pct(lb, 50), 2)} | "
                 f"{on_off(sb.pct(la, 90), sb.pct(lb, 90), 2)} | "
                 f"{ratio_of(sb.mean(la), sb.mean(lb))} | "
                 f"{sb.mean(r['external'] + r['internal'] for r in a):.1f} |")
    for s in sizes:
        row(str(s), lambda r, s=s: r["burst"] == s)
    row(f"< {n} (spare servers)", lambda r: r["burst"] < n)
    row(f"≥ {n} (every server protected)", lambda r: r["burst"] >= n)
    row("all", lambda r: True)
    L.append("")
    L.append(f"CPU each configuration got over its plays (the fleet's utime + stime over the "
             f"plays' wall time, first publish to last reply; {n} × {ARGS.cpu:g} = "
             f"{n * ARGS.cpu:g} CPU at most), throttled periods of its groups, helpers its "
             "daemons started and requests they requeued (metrics), and the 1-min load "
             "average at the start of its plays:\n")
    L.append("| config | plays | requests | wall (s) | fleet CPU (s) | CPU s per request | "
             "CPUs used | throttled periods | helpers started external / internal | requeued "
             "| load |")
    L.append("|" + "---|" * 11)
    for cfg in pair:
        rs = [r for r in runs if r["config"] == cfg.name]
        wall, cpu, nreq = (sum(r[k] for r in rs) for k in ("wall_s", "cpu_s", "requests"))
        th = (f"{sum(r['throttled'][0] for r in rs)}/{sum(r['throttled'][1] for r in rs)}"
              if groups.reason is None else "–")
        L.append(f"| {cfg.name} | {len(rs)} | {nreq} | {wall:.1f} | {cpu:.1f} | {cpu / nreq:.2f} | "
                 f"{cpu / wall:.2f} | {th} | {sum(r['helpers'][0] for r in rs):.0f} / "
                 f"{sum(r['helpers'][1] for r in rs):.0f} | {sum(r['requeued'] for r in rs):.0f} | "
                 f"{sb.mean(r['load'] for r in rs):.2f} |")
    L.append("")
    L.append(f"A burst of {n} or more requests makes every slot of this fleet protected "
             "(1 slot per server), so helpers can only use the servers that are idle before "
             "the burst's later requests arrive and after its first ones end; a smaller burst "
             "leaves whole servers to them.\n")
    return L


if __name__ == "__main__":
    main()
