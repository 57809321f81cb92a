#!/usr/bin/python3
"""bench/bench_throughput.py - no-op requests per second: occamyd against a
bare rabbitmq-c consumer at the same prefetch, and against Celery.

    bench/run [--smoke] BUILD_DIR        (all benchmarks, one private broker)
    tests/broker run /usr/bin/python3 bench/bench_throughput.py [--smoke] BUILD_DIR

For each configuration (slots/prefetch 2/2, 8/8, and 8/64: prefetch above
slots) it pre-loads a fresh durable classic queue with N persistent
messages (header handler=noop, empty body, no reply_to) through
bench/publisher (publisher confirms: the broker has them all before any
consumer starts), then starts the consumer and times the drain (see
bench/drain.py: the slope of the queue depth, start-up excluded):

    bare    bench/bare_consumer: acks each delivery on arrival at that prefetch
    occamy  occamyd with the noop plugin, [server] slots, [amqp] prefetch

Runs are interleaved (bare, occamy, occamy, bare, ...) and the medians
reported, since the machine is shared.  Then Celery 5 (Debian's
python3-celery: prefork pool, concurrency = slots, acks_late,
worker_prefetch_multiplier = 1, results ignored) drains the same no-op
workload (fewer messages: it is an order of magnitude slower), interleaved
with occamyd runs of the same size.

Writes $OCCAMY_BENCH_OUT/bench_throughput.{md,csv,png} (default bench/out).

Options:
    --smoke        2 000 messages, one round, Celery 200 messages: proves it runs
    -n N           messages per run (default 100000)
    --reps R       rounds of the comparison (default 2: bare/occamyd, then
                   occamyd/bare)
    --celery-n N   messages per Celery run (default 4000; 0 = no Celery)
    --celery-reps R  (default 2)
"""

import argparse
import csv
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

CONFIGS = [(2, 2), (8, 8), (8, 64)]  # (slots, prefetch)
CELERY_CONFIGS = [2, 8]              # concurrency = slots = prefetch
TARGET = 0.95     # occamyd msg/s over the bare consumer's, at slots = prefetch
CPU_TARGET = 1.5  # occamyd CPU per message over the bare consumer's, likewise


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("build", metavar="BUILD_DIR")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("-n", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--celery-n", type=int, default=None)
    ap.add_argument("--celery-reps", type=int, default=None)
    a = ap.parse_args()
    if not os.path.isdir(a.build):
        ap.error(f"{a.build}: not a directory")
    a.n = a.n or (2000 if a.smoke else 100000)
    # Two rounds complete the ABBA order and keep the whole run near five
    # minutes on a 2-CPU machine (each round pre-loads 600 000 persistent
    # messages); --reps 3 or more for steadier medians.
    a.reps = a.reps or (1 if a.smoke else 2)
    if a.celery_n is None:
        a.celery_n = 200 if a.smoke else 4000
    a.celery_reps = a.celery_reps or (1 if a.smoke else 2)
    a.out = os.environ.get("OCCAMY_BENCH_OUT") or os.path.join(HERE, "out")
    return a


ARGS = parse_args()
os.environ["OCCAMY_BUILD"] = os.path.abspath(ARGS.build)
sys.path.insert(0, HERE)
sys.dont_write_bytecode = True  # no bench/__pycache__
import drain  # noqa: E402
import schedbench as sb  # noqa: E402
import targets  # noqa: E402
from drain import log  # noqa: E402


def fmt(x, digits=0):
    if x is None:
        return "-"
    return f"{x:,.{digits}f}"


def med(runs, key):
    vals = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def celery_available():
    p = subprocess.run(["/usr/bin/python3", "-c", "import celery; print(celery.__version__)"],
                       capture_output=True, text=True)
    return p.stdout.strip() if p.returncode == 0 else None


def one(fn, *a, **kw):
    r = fn(*a, **kw)
    log(f"  {r['kind']:6} slots={r['slots']} prefetch={r['prefetch']} n={r['n']}: "
        f"{r['msg_per_s']:,.0f} msg/s over {r['window_s']:.2f}s"
        + (f", cpu {r['cpu_us']:.0f} us/msg" if r.get("cpu_us") is not None else "")
        + (f", requeued {r['requeued_no_room']:.0f}" if r.get("requeued_no_room") else ""))
    return r


def main():
    t_start = time.monotonic()
    os.makedirs(ARGS.out, exist_ok=True)
    base = os.path.join(ARGS.out, "bench_throughput")
    broker = drain.Broker()
    runs = []
    try:
        # The comparison: ABBA order, so drift hurts both sides alike.
        for rep in range(ARGS.reps):
            for slots, prefetch in CONFIGS:
                log(f"round {rep + 1}/{ARGS.reps}, slots {slots}, prefetch {prefetch}")
                order = ["bare", "occamy"] if rep % 2 == 0 else ["occamy", "bare"]
                for kind in order:
                    if kind == "bare":
                        r = one(drain.run_bare, prefetch, ARGS.n, broker, slots)
                    else:
                        r = one(drain.run_occamy, slots, prefetch, ARGS.n, broker)
                    r["rep"] = rep
                    runs.append(r)

        celery_version = celery_available() if ARGS.celery_n > 0 else None
        if ARGS.celery_n > 0 and celery_version is None:
            log("python3-celery is not installed (apt-get install -y python3-celery): "
                "no Celery comparison")
        if celery_version:
            configs = CELERY_CONFIGS[:1] if ARGS.smoke else CELERY_CONFIGS
            for rep in range(ARGS.celery_reps):
                for c in configs:
                    log(f"celery round {rep + 1}/{ARGS.celery_reps}, concurrency {c}")
                    order = ["celery", "occamy"] if rep % 2 == 0 else ["occamy", "celery"]
                    for kind in order:
                        if kind == "celery":
                            r = one(drain.run_celery, c, ARGS.celery_n, 1, broker)
                        else:
                            r = one(drain.run_occamy, c, c, ARGS.celery_n, broker)
                            r["kind"] = "occamy-celery-n"
                        r["rep"] = rep
                        runs.append(r)
    finally:
        broker.close()

    elapsed = time.monotonic() - t_start
    write_csv(base + ".csv", runs)
    png = plot(base + ".png", runs)
    write_md(base + ".md", runs, celery_version if ARGS.celery_n > 0 else None, png, elapsed)
    log(f"wrote {base}.md ({elapsed:.0f} s)")


# ------------------------------------------------------------------- output

FIELDS = ["rep", "kind", "slots", "prefetch", "n", "msg_per_s", "window_s", "total_s",
          "cpu_us", "broker_cpu_us", "publish_msg_per_s", "deliveries",
          "requeued_no_room", "acks", "self_msg_per_s", "syscalls_per_msg",
          "switches_per_msg"]


def write_csv(path, runs):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in runs:
            w.writerow({k: (f"{v:.3f}" if isinstance(v, float) else v)
                        for k, v in r.items()})


def select(runs, kind, slots, prefetch, n=None):
    return [r for r in runs if r["kind"] == kind and r["slots"] == slots
            and r["prefetch"] == prefetch and (n is None or r["n"] == n)]


def write_md(path, runs, celery_version, png, elapsed):
    L = []
    L.append("## Throughput: no-op requests, occamyd vs a bare consumer and Celery")
    L.append("")
    L.append("*bench/bench_throughput.py*" + (" — **smoke run, numbers meaningless**"
                                               if ARGS.smoke else ""))
    L.append("")
    L.append(f"Each run pre-loads a fresh durable classic queue with **{ARGS.n:,} persistent "
             "messages** (delivery_mode 2, header `handler=noop`, empty body, no `reply_to`) "
             "through `bench/publisher` with publisher confirms, then starts one consumer "
             "and measures how fast it drains the queue: the slope of the queue depth, "
             "polled every 10 ms, between the first poll where the queue has shrunk and "
             "the last one where it is not yet empty (start-up excluded).  "
             "`bare` is `bench/bare_consumer`, a rabbitmq-c consumer that acks each "
             "delivery on arrival on its only thread; `occamyd` runs the `noop` plugin "
             "(no reply: one `basic.ack` per request).  "
             f"Runs alternate bare/occamyd (then occamyd/bare), {ARGS.reps} round(s); "
             "figures are medians" + (" (of two runs: their mean)" if ARGS.reps == 2 else "")
             + ".  CPU is the consumer process's user+system time "
             "per message during the drain; the broker's is its `beam.smp`'s.  "
             "Syscalls and context switches are the consumer process's (every "
             "thread), counted by `perf stat -p` over the drain (the "
             "`raw_syscalls:sys_enter` tracepoint and `context-switches`), per message.")
    L.append("")
    L.append(f"| slots | prefetch | bare msg/s | occamyd msg/s | ratio | ≥ {TARGET:g} "
             f"| CPU µs/msg bare | CPU µs/msg occamyd | CPU ratio ≤ {CPU_TARGET:g} |"
             " broker CPU µs/msg bare / occamyd "
             "| syscalls/msg bare / occamyd | context switches/msg bare / occamyd "
             "| requeued \"no free slot\" per request |")
    L.append("|---:|---:|---:|---:|---:|:---:|---:|---:|:---:|---:|---:|---:|---:|")
    ratios = {}
    for slots, prefetch in CONFIGS:
        b = select(runs, "bare", slots, prefetch, ARGS.n)
        o = select(runs, "occamy", slots, prefetch, ARGS.n)
        if not b or not o:
            continue
        mb, mo = med(b, "msg_per_s"), med(o, "msg_per_s")
        ratio = mo / mb if mb else None
        ratios[(slots, prefetch)] = ratio
        rq = med(o, "requeued_no_room")
        cb, co = med(b, "cpu_us"), med(o, "cpu_us")
        cpu_ratio = co / cb if co is not None and cb else None
        if slots == prefetch:  # the targets are set for slots = prefetch
            where = f"slots = prefetch = {slots}"
            m_rate = targets.check("throughput", f"no-op msg/s / bare consumer's, {where}",
                                   ratio, ">=", TARGET)
            m_cpu = targets.check("throughput", f"CPU per message / bare consumer's, {where}",
                                  cpu_ratio, "<=", CPU_TARGET)
        else:
            m_rate = m_cpu = "–"
        L.append(f"| {slots} | {prefetch} | {fmt(mb)} | {fmt(mo)} | {fmt(ratio, 2)} | "
                 f"{m_rate} | {fmt(cb)} | {fmt(co)} | {fmt(cpu_ratio, 2)} {m_cpu} | "
                 f"{fmt(med(b, 'broker_cpu_us'))} / {fmt(med(o, 'broker_cpu_us'))} | "
                 f"{fmt(med(b, 'syscalls_per_msg'), 1)} / {fmt(med(o, 'syscalls_per_msg'), 1)} | "
                 f"{fmt(med(b, 'switches_per_msg'), 2)} / {fmt(med(o, 'switches_per_msg'), 2)} | "
                 f"{fmt(rq / ARGS.n if rq is not None else None, 2)} |")
    why = sorted({r["counters_why"] for r in runs if r.get("counters_why")})
    if why:
        L.append("")
        L.append("Syscall and switch counts missing: " + "; ".join(why) + ".")
    L.append("")
    short = [k for k, v in ratios.items() if v is not None and v < TARGET]
    if short:
        L.append(f"**Where occamyd falls short of {TARGET:g}**, compare the CPU columns: occamyd "
                 "spends several times the bare consumer's CPU per request, nearly all of "
                 "it handing each request between threads (amqp → slot worker → amqp, and "
                 "the locking around each hand-off: about two context switches per "
                 "request).  On a 2-CPU machine shared "
                 "with the broker, that CPU is taken from the broker; at prefetch 2 the "
                 "hand-offs also add latency to every ack the broker waits for.  "
                 "`bench/diag/PROFILE.md` has the profile and the proposed fixes.")
        L.append("")
    L.append("Per-run figures (msg/s, in run order):")
    L.append("")
    for slots, prefetch in CONFIGS:
        b = select(runs, "bare", slots, prefetch, ARGS.n)
        o = select(runs, "occamy", slots, prefetch, ARGS.n)
        L.append(f"- slots {slots}, prefetch {prefetch}: bare "
                 + ", ".join(fmt(r["msg_per_s"]) for r in b) + "; occamyd "
                 + ", ".join(fmt(r["msg_per_s"]) for r in o))
    L.append("")
    over = [(s, p) for s, p in CONFIGS if p > s]
    for slots, prefetch in over:
        o = select(runs, "occamy", slots, prefetch, ARGS.n)
        if not o:
            continue
        rq = med(o, "requeued_no_room") or 0
        dl = med(o, "deliveries") or 0
        L.append(f"**Prefetch {prefetch} > slots {slots}.**  The broker sends up to "
                 f"{prefetch} unacked requests, but only {slots} can run: admission "
                 "(`daemon/scheduler_admit.c` `admit_one`) finds no empty slot and no helper to "
                 "preempt, and requeues the request (\"no free slot\") to the broker, "
                 "which redelivers it.  Median run: "
                 f"{dl:,.0f} deliveries for {ARGS.n:,} requests, {rq:,.0f} requeues "
                 f"({rq / ARGS.n:.2f} per request), each one logged at info level.  "
                 "Requeued messages return to the queue, so the rate above is the net "
                 "rate of work done.  With one daemon this churn only costs CPU; with "
                 "several daemons on a queue it also bounces requests between servers.  "
                 "`prefetch = slots` (the default) avoids it.")
        L.append("")

    if celery_version:
        cn = ARGS.celery_n
        L.append(f"### Celery {celery_version}")
        L.append("")
        L.append(f"The same no-op workload through Celery (Debian's python3-celery, "
                 f"{cn:,} messages per run: it is an order of magnitude slower): a task "
                 "`bench.noop` that returns None, prefork pool with concurrency = slots, "
                 "`task_acks_late`, `worker_prefetch_multiplier = 1` (so prefetch = "
                 "slots), `task_acks_on_failure_or_timeout`, results ignored, no result "
                 "backend; gossip, mingle and heartbeats off.  The queue is pre-loaded "
                 "with persistent protocol-2 task messages (what `apply_async` sends, "
                 "published with pika).  Each Celery run is paired with an occamyd run "
                 f"of the same {cn:,} messages at the same slots and prefetch; "
                 f"{ARGS.celery_reps} round(s), medians.")
        L.append("")
        L.append("| slots = concurrency | prefetch | Celery msg/s | occamyd msg/s | "
                 "occamyd / Celery | CPU µs/msg Celery (all processes) | CPU µs/msg occamyd |")
        L.append("|---:|---:|---:|---:|---:|---:|---:|")
        for c in CELERY_CONFIGS:
            ce = select(runs, "celery", c, c, cn)
            o = select(runs, "occamy-celery-n", c, c, cn)
            if not ce or not o:
                continue
            mc, mo = med(ce, "msg_per_s"), med(o, "msg_per_s")
            L.append(f"| {c} | {c} | {fmt(mc)} | {fmt(mo)} | "
                     f"{fmt(mo / mc if mc else None, 1)} | {fmt(med(ce, 'cpu_us'))} | "
                     f"{fmt(med(o, 'cpu_us'))} |")
        L.append("")
    if png:
        L.append(f"![throughput]({os.path.basename(png)})")
        L.append("")
    L.append(f"Conditions: {os.cpu_count()} CPUs shared with other jobs, broker and "
             f"consumer on the same host (loopback), Python {platform.python_version()}; "
             f"this benchmark took {elapsed:.0f} s.  Raw runs: `bench_throughput.csv`.")
    L.append("")
    with open(path, "w") as f:
        f.write("\n".join(L))


def plot(png, runs):
    rows = []
    for slots, prefetch in CONFIGS:
        b = select(runs, "bare", slots, prefetch, ARGS.n)
        o = select(runs, "occamy", slots, prefetch, ARGS.n)
        if b and o:
            rows.append((f"{slots}/{prefetch}", med(b, "msg_per_s"),
                         med(o, "msg_per_s"), None))
    for c in CELERY_CONFIGS:
        ce = select(runs, "celery", c, c, ARGS.celery_n)
        o = select(runs, "occamy-celery-n", c, c, ARGS.celery_n)
        if ce and o:
            rows.append((f"{c}/{c} (n={ARGS.celery_n:,})", None,
                         med(o, "msg_per_s"), med(ce, "msg_per_s")))
    if not rows:
        return None
    data = "\n".join(f'"{name}" {b if b else "NaN"} {o if o else "NaN"} {c if c else "NaN"}'
                     for name, b, o, c in rows)
    script = [
        'set terminal pngcairo size 900,480 font "DejaVu Sans,11"',
        f'set output "{png}"',
        f'set title "No-op requests drained per second (persistent, medians)'
        f'{" - SMOKE" if ARGS.smoke else ""}"',
        "set style data histogram",
        "set style histogram clustered gap 1",
        "set style fill solid 0.7 border -1",
        "set boxwidth 0.9",
        "set yrange [0:*]",
        'set ylabel "messages / s"',
        f'set xlabel "slots / prefetch  (n = {ARGS.n:,}; Celery pairs: n as shown)"',
        "set grid ytics",
        "set key top right",
        "set xtics noenhanced font ',9'",
        "plot '-' using 2:xtic(1) title 'bare rabbitmq-c' lc rgb '#999999', "
        "'-' using 3 title 'occamyd (noop)' lc rgb '#4477aa', "
        "'-' using 4 title 'Celery (prefork)' lc rgb '#cc6677'",
    ]
    for _ in range(3):
        script += [data, "e"]
    return png if sb.gnuplot("\n".join(script) + "\n", "the throughput plot") else None


if __name__ == "__main__":
    main()
