#!/usr/bin/python3
"""bench/diag/idle_inversion.py - why does a request wait with SCHED_IDLE
helpers?  A diagnostic, not a benchmark (bench/run does not run it).

    tests/broker run /usr/bin/python3 bench/diag/idle_inversion.py [-n 300] BUILD_DIR

Needs root and perf (linux-perf).  Replays bench_preemption's idle/lazy
set-up (8 slots, 8 `spin` helpers polling every 50 ms, `benchtask` "cpu 5"
requests at exponential 20 ms gaps) while `perf record -a -g` records
sched_switch and sched_waking on every CPU, then reports:

 1. end-to-end latency (publish -> task_run), as the benchmark does;
 2. for every wake-up of one of the daemon's normal threads (amqp,
    admission, slotN, expansion, control) that waited > 1 ms for a CPU,
    who ran on that CPU meanwhile: other processes, the daemon's own normal
    threads, or its SCHED_IDLE helpers (the kernel should never prefer the
    latter);
 3. every mutex hand-off from a helper thread to a normal thread (the
    waker's stack is in __lll_lock_wake): a normal thread that slept on a
    lock a SCHED_IDLE thread held - priority inversion - and how long it
    slept.

--helpers none runs the same trace with no helpers, for comparison.
"""

import argparse
import collections
import os
import random
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # bench/


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("build")
    ap.add_argument("-n", type=int, default=300, help="requests (default 300)")
    ap.add_argument("--helpers", choices=("spin", "none"), default="spin")
    ap.add_argument("--keep", help="keep perf.data here")
    a = ap.parse_args()
    sys.argv = [sys.argv[0], a.build]
    import schedbench as sb
    sb.parse_args(__doc__)
    ot = sb.harness()
    if os.geteuid() != 0:
        sys.exit("needs root (perf record -a)")
    perf_data = a.keep or tempfile.mktemp(prefix="occamy-perf-", suffix=".data")
    r = random.Random(1)
    with sb.Workdir() as wd:
        bt = sb.build_benchtask(wd)
        with ot.Daemon({"benchtask": {"path": bt}, "spin": {}}, slots=8, helper_priority="idle",
                       external_queue_max=100000, external_ttl_s=3600) as d:
            pub = sb.Publisher(ot)
            st = sb.Status(ot, d.names)
            if a.helpers == "spin":
                for _ in range(a.n + 24):
                    pub.control(d.names, "0,50", handler="spin")
                sb.wait_status(st, lambda h: h.get("external") == 8, 30, "8 helpers")
            time.sleep(0.3)
            perf = subprocess.Popen(["perf", "record", "-q", "-a", "-g", "-e", "sched:sched_switch",
                                     "-e", "sched:sched_waking", "-o", perf_data],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)
            t, pubs = time.monotonic_ns() + 50_000_000, {}
            for i in range(a.n):
                t += int(r.expovariate(1 / 20.0) * 1e6)
                pub.wait_until_ns(t)
                pubs[str(i)] = pub.request(d.names, "benchtask", "cpu 5", cid=str(i))
            pub.wait_replies(pubs, 30)
            perf.send_signal(2)
            perf.wait()
            lat = [sb.parse_kv(pub.replies[c][2])["start"] - t0 for c, t0 in pubs.items()
                   if c in pub.replies]
            pid = d.pid
            st.close()
            pub.close()
    print(f"helpers: {a.helpers}; {len(lat)} requests: latency p50 {sb.pct(lat, 50) / 1e6:.2f} "
          f"p90 {sb.pct(lat, 90) / 1e6:.2f} p99 {sb.pct(lat, 99) / 1e6:.2f} "
          f"max {max(lat) / 1e6:.2f} ms; load average {sb.loadavg():.1f}")
    analyse(perf_data, pid)
    if not a.keep:
        os.unlink(perf_data)


def events(perf_data):
    p = subprocess.Popen(["perf", "script", "-i", perf_data, "-F",
                         "comm,pid,tid,cpu,time,event,trace,ip,sym"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    head = re.compile(r"\s*(.+?)\s+(\d+)/(\d+)\s+\[(\d+)\]\s+([\d.]+):\s+(\S+):\s*(.*)")
    cur = None
    for line in p.stdout:
        if not line.strip():
            continue
        m = None if line.startswith("\t") else head.match(line)
        if m:
            if cur:
                yield cur
            cur = {"comm": m.group(1), "pid": int(m.group(2)), "tid": int(m.group(3)),
                   "cpu": int(m.group(4)), "t": float(m.group(5)), "ev": m.group(6),
                   "tr": m.group(7), "stack": []}
        elif cur is not None:
            f = line.split()
            if len(f) >= 2:
                cur["stack"].append(f[1])
    if cur:
        yield cur
    p.wait()


def analyse(perf_data, P):
    evs = list(events(perf_data))
    ours = {e["tid"]: e["comm"] for e in evs if e["pid"] == P}
    helper = lambda tid: ours.get(tid, "").startswith("helper")  # noqa: E731
    base = lambda c: c.rstrip("0123456789")  # noqa: E731
    sw = re.compile(r"prev_comm=(.+?) prev_pid=(\d+) prev_prio=\d+ prev_state=(\S+) ==> "
                    r"next_comm=(.+?) next_pid=(\d+)")
    wk = re.compile(r"comm=(.+?) pid=(\d+) prio=\d+ target_cpu=(\d+)")
    running = {}                    # cpu -> (tid, comm, since)
    waiting = {}                    # tid -> (t, cpu, Counter)
    slept = {}                      # tid -> t went to sleep
    blame = collections.defaultdict(collections.Counter)
    waits = collections.defaultdict(list)
    handoffs = []

    def kind(tid, comm):
        if tid in ours:
            return "daemon SCHED_IDLE helpers" if helper(tid) else "daemon normal threads"
        return "CPU idle" if tid == 0 else "other processes"

    for e in evs:
        if e["ev"] == "sched:sched_waking":
            m = wk.search(e["tr"])
            tid, cpu = int(m.group(2)), int(m.group(3))
            if tid in ours and not helper(tid):
                waiting.setdefault(tid, (e["t"], cpu, collections.Counter()))
                if e["pid"] == P and helper(e["tid"]) and \
                        any("lll_lock_wake" in s for s in e["stack"]):
                    handoffs.append((e["t"] - slept.get(tid, e["t"]), ours[tid], e["comm"]))
        elif e["ev"] == "sched:sched_switch":
            m = sw.search(e["tr"])
            prev, state, nxt = int(m.group(2)), m.group(3), int(m.group(5))
            if prev in ours and state[:1] in "SD":
                slept[prev] = e["t"]
            if e["cpu"] in running:
                rt, rc, since = running[e["cpu"]]
                for (tw, cpu, cnt) in waiting.values():
                    if cpu == e["cpu"] and e["t"] > max(since, tw):
                        cnt[kind(rt, rc)] += e["t"] - max(since, tw)
            running[e["cpu"]] = (nxt, m.group(4), e["t"])
            if nxt in waiting:
                tw, cpu, cnt = waiting.pop(nxt)
                name = base(ours[nxt])
                waits[name].append(e["t"] - tw)
                if e["t"] - tw > 0.001:
                    blame[name].update(cnt)
    print("\nWake-ups of the daemon's normal threads that waited > 1 ms for a CPU, and who had "
          "that CPU meanwhile:")
    for name, v in sorted(waits.items()):
        long_ = [x for x in v if x > 0.001]
        tot = sum(blame[name].values())
        who = ", ".join(f"{k} {100 * c / tot:.0f} %" for k, c in blame[name].most_common()) \
            if tot else "-"
        print(f"  {name:10s} {len(v):5d} wake-ups, {len(long_):4d} waited > 1 ms "
              f"({1e3 * sum(long_):.0f} ms in all): {who}")
    handoffs.sort(reverse=True)
    print(f"\nMutex hand-offs from a SCHED_IDLE helper thread to a normal thread (priority "
          f"inversion): {len(handoffs)}")
    for d, who, waker in handoffs[:12]:
        print(f"  {who:10s} slept {d * 1e3:7.2f} ms on a lock {waker} held")


if __name__ == "__main__":
    main()
