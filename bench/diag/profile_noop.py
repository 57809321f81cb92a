#!/usr/bin/python3
"""bench/diag/profile_noop.py - where occamyd spends its CPU on no-op requests.

    tests/broker run /usr/bin/python3 bench/diag/profile_noop.py [options] BUILD_DIR

Pre-loads N persistent no-op requests (as bench_throughput.py does), starts
occamyd (noop plugin, slots = prefetch = 8 by default) and, once it
consumes, attaches `perf record` (cpu-clock, DWARF call graphs, so that
user-space callers resolve without frame pointers) and `perf stat`
(context switches) to it until the queue is drained.  Writes the top
symbols by self time and by inclusive ("children") time, CPU per thread,
and per-message counts to OUT/profile.md (default bench/out).  Not run by
bench/run (it is not a bench_* script): the analysis built on it lives in
bench/diag/PROFILE.md.

Needs perf (apt-get install -y linux-perf) and the permission to use it
(root, or kernel.perf_event_paranoid <= 1).

Options:
    -n N            requests (default 50000)
    --slots S       (default 8)
    --prefetch P    (default = slots)
    --freq HZ       sampling frequency (default 499)
    --out DIR
"""

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # bench/


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("build", metavar="BUILD_DIR")
    ap.add_argument("-n", type=int, default=50000)
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--prefetch", type=int, default=None)
    ap.add_argument("--freq", type=int, default=499)
    ap.add_argument("--out", default=os.environ.get("OCCAMY_BENCH_OUT")
                    or os.path.join(HERE, "out"))
    a = ap.parse_args()
    a.prefetch = a.prefetch or a.slots
    return a


ARGS = parse_args()
os.environ["OCCAMY_BUILD"] = os.path.abspath(ARGS.build)
sys.path.insert(0, HERE)
sys.dont_write_bytecode = True  # no bench/__pycache__
import drain  # noqa: E402
from drain import log  # noqa: E402


def perf_report(data, *args):
    p = subprocess.run(["perf", "report", "-i", data, "--stdio", "--percent-limit", "0.3",
                        *args], capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(p.stderr.strip())
    return p.stdout


def rows(text, limit):
    """The '%' lines of a perf report -g none, as lists of columns."""
    out = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if "%" not in line:
            continue
        out.append(line.strip())
        if len(out) >= limit:
            break
    return out


def thread_stats(pid):
    """{thread group: [cpu_s, voluntary, involuntary switches, threads]}
    from /proc/PID/task; slot0..slotN count as one group "slot*"."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                comm = f.read().strip()
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            cpu = (int(fields[11]) + int(fields[12])) / drain.CLK_TCK
            vol = invol = 0
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches"):
                        vol = int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches"):
                        invol = int(line.split()[1])
        except OSError:
            continue
        group = re.sub(r"\d+$", "*", comm)
        g = out.setdefault(group, [0.0, 0, 0, 0])
        g[0] += cpu
        g[1] += vol
        g[2] += invol
        g[3] += 1
    return out


# What the innermost user-space frame of a sample is doing, by symbol.
CATEGORIES = [
    ("cond_signal/broadcast: waking another thread", ("pthread_cond_signal", "pthread_cond_broadcast")),
    ("mutex contended: lock wait", ("lll_lock_wait", "__pthread_mutex_cond_lock")),
    ("mutex contended: unlock wakes a waiter", ("lll_lock_wake",)),
    ("cond_wait: sleeping / being woken", ("pthread_cond_wait", "pthread_cond_timedwait",
                                           "__pthread_cond_wait_common", "futex_abstimed_wait")),
    ("send(): one basic.ack frame per syscall", ("__libc_send", "__send")),
    ("recv()", ("__libc_recv", "recv")),
    ("poll(): amqp loop waiting / woken", ("__poll", "poll")),
    ("eventfd write: waking the amqp thread", ("__libc_write", "__GI___libc_write")),
    ("eventfd read", ("__libc_read", "__GI___libc_read")),
    ("malloc / free", ("malloc", "free", "calloc", "realloc", "_int_", "tcache", "cfree",
                       "arena_get")),
    ("snprintf", ("printf", "vfprintf", "__vsnprintf")),
    ("clock_gettime", ("clock_gettime", "__vdso")),
]


def categorise(frames):
    """frames: [(sym, dso)] leaf first.  Returns (category, daemon function,
    kernel scheduling?)."""
    sched = any(s.startswith(("finish_task_switch", "__schedule")) for s, _ in frames)
    resolved = frames
    user = [(x, d) for x, d in resolved if "kernel" not in d]
    cat = "other user code"
    if not user:
        cat = "kernel only"
    else:
        leaf = " ".join(x for x, _ in user[:3])
        for name, keys in CATEGORIES:
            if any(k in leaf for k in keys):
                cat = name
                break
        else:
            if "librabbitmq" in user[0][1]:
                cat = "rabbitmq-c"
            elif user[0][0] in DAEMON_FUNCTIONS:
                cat = "occamyd code itself"
    fn = next((x for x, _ in resolved if x in DAEMON_FUNCTIONS), "-")
    return cat, fn, sched


def daemon_functions():
    """Names of the functions defined in daemon/*.c (the style puts each
    definition's name at the start of a line), inlined ones included."""
    names = set()
    src = os.path.join(drain.ROOT, "daemon")
    for f in os.listdir(src):
        if f.endswith(".c"):
            with open(os.path.join(src, f)) as fh:
                names.update(re.findall(r"^([a-z_][a-z0-9_]*)\(", fh.read(), re.M))
    return names


DAEMON_FUNCTIONS = daemon_functions()


def perf_samples(data):
    """[(comm, [(sym, dso)])] from perf script."""
    p = subprocess.run(["perf", "script", "-i", data, "-F", "comm,tid,ip,sym,dso"],
                       capture_output=True, text=True)
    out, cur = [], None
    for line in p.stdout.splitlines():
        if not line.strip():
            continue
        if not line.startswith(("\t", " ")):
            cur = (line.split()[0], [])
            out.append(cur)
            continue
        m = re.match(r"\s*[0-9a-f]+\s+(.*?)\s+\((.*)\)\s*$", line)
        if m and cur is not None:
            sym, dso = m.group(1), m.group(2)
            if sym.endswith(" (inlined)") or dso == "inlined":
                sym, dso = sym.replace(" (inlined)", ""), "inlined"
            cur[1].append((re.sub(r"\+0x[0-9a-f]+$", "", sym), dso))
        elif cur is not None:
            m = re.match(r"\s*[0-9a-f]+\s+(\S+)\s+\(inlined\)", line)
            if m:
                cur[1].append((m.group(1), "inlined"))
    return out


def main():
    if shutil.which("perf") is None:
        raise SystemExit("perf not found: apt-get install -y linux-perf")
    tmp = tempfile.mkdtemp(prefix="occamy-perf-")
    data = os.path.join(tmp, "perf.data")
    stat = os.path.join(tmp, "perf.stat")
    procs = []
    threads = {}

    def snapshot(pid):
        """A clean run: per-thread CPU and switches from /proc only."""
        threads["before"] = thread_stats(pid)

        def stop():
            threads["after"] = thread_stats(pid)
        return stop

    def attach(pid):
        procs.append(subprocess.Popen(
            ["perf", "record", "-e", "cpu-clock", "-F", str(ARGS.freq),
             "--call-graph", "dwarf,8192", "-o", data, "-p", str(pid)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        procs.append(subprocess.Popen(
            ["perf", "stat", "-e", "task-clock,context-switches,cpu-migrations",
             "-o", stat, "-p", str(pid)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

        def stop():
            for p in procs:
                p.send_signal(signal.SIGINT)
            for p in procs:
                p.wait()
        return stop

    try:
        log(f"occamyd slots {ARGS.slots} prefetch {ARGS.prefetch}, {ARGS.n} no-op requests: "
            "clean run (per-thread /proc counters)")
        clean = drain.run_occamy(ARGS.slots, ARGS.prefetch, ARGS.n, perf=snapshot)
        log(f"{clean['msg_per_s']:,.0f} msg/s; now under perf")
        r = drain.run_occamy(ARGS.slots, ARGS.prefetch, ARGS.n, perf=attach)
        log(f"{r['msg_per_s']:,.0f} msg/s under perf")
        with open(stat) as f:
            stat_text = f.read()
        m = re.search(r"([\d.,]+)\s+msec task-clock", stat_text)
        task_ms = float(m.group(1).replace(",", "")) if m else None
        m = re.search(r"([\d,]+)\s+context-switches", stat_text)
        cs = int(m.group(1).replace(",", "")) if m else None

        self_syms = rows(perf_report(data, "--no-children", "--sort", "dso,sym", "-g", "none"), 25)
        children = rows(perf_report(data, "--children", "--sort", "dso,sym", "-g", "none"), 400)
        ours = [x for x in children if " occamyd " in f" {x} "][:30]
        samples = perf_samples(data)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    n = ARGS.n
    cats, pairs, fns = {}, {}, {}
    nsched = 0
    for _, frames in samples:
        cat, fn, sched = categorise(frames)
        cats[cat] = cats.get(cat, 0) + 1
        pairs[(fn, cat)] = pairs.get((fn, cat), 0) + 1
        fns[fn] = fns.get(fn, 0) + 1
        nsched += sched
    total = max(1, len(samples))

    def pct(k):
        return f"{100 * k / total:.1f}%"

    os.makedirs(ARGS.out, exist_ok=True)
    L = ["## Profile: occamyd's hot path on no-op requests", "",
         f"Generated by `bench/diag/profile_noop.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} "
         "(a separate run, not part of `bench/run`); the analysis and proposed fixes are "
         "in `bench/diag/PROFILE.md`.", "",
         f"- occamyd, `noop` plugin, slots {ARGS.slots}, prefetch {ARGS.prefetch}, "
         f"{n:,} persistent requests pre-loaded (no reply_to: one basic.ack each), "
         "drained twice: once clean, once under perf",
         f"- clean run: {clean['msg_per_s']:,.0f} msg/s, daemon CPU "
         f"{clean['cpu_us']:.0f} µs per request (user + system, all threads), broker CPU "
         f"{clean['broker_cpu_us'] or 0:.0f} µs per request",
         f"- perf run: `perf record -e cpu-clock -F {ARGS.freq} --call-graph dwarf` "
         f"attached once the daemon consumed, until the queue was drained: "
         f"{r['msg_per_s']:,.0f} msg/s, {len(samples):,} samples"]
    if cs is not None:
        L.append(f"- `perf stat`: {cs:,} context switches = **{cs / n:.1f} per request**"
                 + (f"; task-clock {task_ms * 1000 / n:.0f} µs per request" if task_ms else ""))
    L += ["", "### Per thread (clean run, /proc/PID/task counters over the drain)", "",
          "| threads | count | CPU µs per request | share | voluntary switches per request "
          "| involuntary switches per request |",
          "|---|---:|---:|---:|---:|---:|"]
    b, a = threads.get("before", {}), threads.get("after", {})
    tot_cpu = sum(a[g][0] - b.get(g, [0, 0, 0, 0])[0] for g in a) or 1
    for g in sorted(a, key=lambda g: -(a[g][0] - b.get(g, [0])[0])):
        x0 = b.get(g, [0, 0, 0, 0])
        cpu = a[g][0] - x0[0]
        L.append(f"| `{g}` | {a[g][3]} | {cpu / n * 1e6:.1f} | {100 * cpu / tot_cpu:.0f}% | "
                 f"{(a[g][1] - x0[1]) / n:.2f} | {(a[g][2] - x0[2]) / n:.2f} |")
    L += ["", "(CPU from /proc has a 10 ms tick resolution per thread.)", "",
          "### What the samples were doing", "",
          "Each sample's innermost user-space frames, by kind.  On this VM perf has "
          "no hardware PMU: `cpu-clock` samples taken during a context switch land in "
          f"the kernel's `finish_task_switch` ({pct(nsched)} of samples here), with the "
          "user stack of the thread being switched in: the cost of a wake-up shows at "
          "the place where the woken thread slept (`cond_wait`, `poll`).", "",
          "| kind | share of samples |", "|---|---:|"]
    for c, k in sorted(cats.items(), key=lambda x: -x[1]):
        L.append(f"| {c} | {pct(k)} |")
    L += ["", "### By occamyd function (innermost daemon frame) and kind", "",
          "| function | kind | share |", "|---|---|---:|"]
    for (fn, c), k in sorted(pairs.items(), key=lambda x: -x[1])[:30]:
        L.append(f"| `{fn}` | {c} | {pct(k)} |")
    L += ["", "### By occamyd function, all kinds", "", "| function | share |", "|---|---:|"]
    for fn, k in sorted(fns.items(), key=lambda x: -x[1])[:20]:
        L.append(f"| `{fn}` | {pct(k)} |")
    L += ["", "### perf report: top symbols, self time", "", "```"] + self_syms + ["```", "",
          "### perf report: occamyd's functions, inclusive (children) time", "",
          "```"] + ours + ["```", ""]
    path = os.path.join(ARGS.out, "profile.md")
    with open(path, "w") as f:
        f.write("\n".join(L))
    shutil.rmtree(tmp, ignore_errors=True)
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
