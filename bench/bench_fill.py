#!/usr/bin/python3
"""bench/bench_fill.py - scenario A: how long after a master starts do its
helpers hold every slot?

    bench/run [--smoke] BUILD_DIR

One idle occamyd with 8 slots and the `recorder` test plugin.  One master
request (body "100": it runs 100 ms) arrives; the admission starts it and
kicks the expansion pass, whose master's expand(7) puts a helper in each of
the 7 other slots.  The recorder writes a CLOCK_MONOTONIC line at the
start of every task (master and helpers, each on its own slot thread), so

    fill time = last helper start - master start

(the moment all 8 slots run the master's work).  Repeated 50 times per
configuration, waiting each time until the master and all its helpers have
ended; helper_priority = idle (the default) and = normal.

Writes $OCCAMY_BENCH_OUT/fill.md.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import schedbench as sb  # noqa: E402
import targets  # noqa: E402

SLOTS = 8


def parse_log(path):
    """{(event, kind, id): [ns, ...]}"""
    out = {}
    try:
        with open(path) as f:
            for line in f:
                p = line.split()
                if len(p) >= 4 and p[1] in ("start", "end"):
                    out.setdefault((p[1], p[2], p[3]), []).append(int(p[0]))
    except FileNotFoundError:
        pass
    return out


def run_mode(ot, wd, mode, reps):
    logpath = wd.file(f"recorder-{mode}.log")
    res = []
    with ot.Daemon({"recorder": {"log": logpath}}, slots=SLOTS, helper_priority=mode) as d:
        pub = sb.Publisher(ot)
        for i in range(reps + 1):       # the first one warms up, not counted
            tid = f"fill-{mode}-{i}"
            t_pub = pub.request(d.names, "recorder", "100", task_id=tid)
            deadline = time.monotonic() + 30
            while True:
                ev = parse_log(logpath)
                if (len(ev.get(("end", "master", tid), [])) == 1 and
                        len(ev.get(("end", "helper", tid), [])) == SLOTS - 1):
                    break
                if time.monotonic() > deadline:
                    raise AssertionError(f"{tid}: master and {SLOTS - 1} helpers did not "
                                         f"all end; log: {ev}\n{d.log_tail()}")
                pub.pump(0.02)
            if i == 0:
                continue
            m0 = ev[("start", "master", tid)][0]
            hs = sorted(ev[("start", "helper", tid)])
            res.append({"fill": hs[-1] - m0, "first": hs[0] - m0, "admit": m0 - t_pub,
                        "load": sb.loadavg()})
            time.sleep(0.05)
        pub.close()
    return res


def main():
    a = sb.parse_args(__doc__)
    ot = sb.harness()
    reps = 5 if a.smoke else 50
    machine = sb.machine_line()
    res = {}
    with sb.Workdir() as wd:
        for mode in ("idle", "normal"):
            sb.log(f"helper_priority = {mode}: {reps} masters")
            res[mode] = run_mode(ot, wd, mode, reps)
            f = [x["fill"] for x in res[mode]]
            sb.log(f"  fill p50 {sb.fmt_ms(sb.pct(f, 50))} ms p99 {sb.fmt_ms(sb.pct(f, 99))} ms")
    rows = []
    for mode in ("idle", "normal"):
        r = res[mode]
        f = [x["fill"] for x in r]
        rows.append([mode, len(r),
                     f"**{sb.fmt_ms(sb.pct(f, 50), digits=3)}**", sb.fmt_ms(sb.pct(f, 99), digits=3),
                     sb.fmt_ms(max(f), digits=3),
                     sb.fmt_ms(sb.pct([x["first"] for x in r], 50), digits=3),
                     sb.fmt_ms(sb.pct([x["admit"] for x in r], 50), digits=2),
                     f"{sb.mean(x['load'] for x in r):.1f}"])
    f = [x["fill"] for x in res["idle"]]
    p50, p99 = sb.pct(f, 50) / 1e6, sb.pct(f, 99) / 1e6
    met_p50 = targets.check("fill", "scenario A fill p50, idle", p50, "<=", 1, " ms")
    met_p99 = targets.check("fill", "scenario A fill p99, idle", p99, "<=", 1, " ms")
    fn = [x["fill"] for x in res["normal"]]
    tail = (f"that is the p99 ({p99:.2f} ms, {p99 / p50:.0f}x the median)" if p99 > 3 * p50
            else f"the p99 ({p99:.2f} ms) stays close to the median in this run")
    text = f"""## Scenario A: time to fill every slot

`bench/bench_fill.py{' --smoke' if a.smoke else ''}` — {machine}.
An idle occamyd with {SLOTS} slots and the `recorder` plugin; one master
request at a time (runs 100 ms), {reps} times per row.  **Fill time** = the
last of its {SLOTS - 1} helpers' start line − the master's start line (the
recorder writes `CLOCK_MONOTONIC` at the first instruction of every task, on
its slot thread), i.e. admission's expansion kick → expansion thread →
`expand({SLOTS - 1})` → {SLOTS - 1} helper threads woken.

{sb.table(["helper_priority", "masters", "fill p50 ms", "fill p99 ms", "fill max ms",
           "first helper p50 ms", "publish → master start p50 ms", "load"], rows)}

**Target** fill ≤ 1 ms after the master starts (`idle`): p50 {p50:.3f} ms —
{met_p50}; p99 {p99:.3f} ms — {met_p99}.

**Reading.** The master's helpers are all running {p50:.2f} ms (median)
after the master's first instruction: the admission kicks the expansion
thread as soon as the request has its slot, one `expand()` call returns all
7 helpers, and each is handed to an already-waiting helper thread.  The
cost is waking 7 threads on 2 CPUs.  With `idle` they are SCHED_IDLE: when
other normal-priority work (here: other people's test runs, load column)
holds both CPUs, a helper waits for a free CPU before it can write its
start line — by design, and {tail}.  With `normal` helpers the fill takes
{sb.pct(fn, 50) / 1e6:.2f} / {sb.pct(fn, 99) / 1e6:.2f} ms (p50 / p99).
"""
    sb.write_report(a, "fill", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
