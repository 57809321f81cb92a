#!/usr/bin/python3
"""bench/bench_footprint.py - memory and threads of occamyd by slot count.

    bench/run [--smoke] BUILD_DIR
    tests/broker run /usr/bin/python3 bench/bench_footprint.py [--smoke] BUILD_DIR

For slots 1, 2, 4, 8, 16, 32 it starts occamyd with the noop plugin
(defaults otherwise: prefetch = slots, metrics off), waits until it
consumes, and reads /proc/PID/status (VmRSS, RssAnon, RssFile, VmSize,
Threads) and /proc/PID/smaps_rollup (Pss): once idle, and again after it
has run 2 000 no-op requests (warm: every slot thread has allocated, so
glibc has given it an arena).  A least-squares line over the slot counts
gives the cost of one more slot.  For scale, the same for an idle Celery
worker (prefork, concurrency 1..8), whose pool processes share pages with
their parent: PSS is the fair sum there.

Writes $OCCAMY_BENCH_OUT/bench_footprint.{md,csv} (default bench/out).
--smoke: slots 1 and 2, Celery concurrency 1, 200 requests.
"""

import argparse
import csv
import os
import signal
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("build", metavar="BUILD_DIR")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--no-celery", action="store_true")
    a = ap.parse_args()
    if not os.path.isdir(a.build):
        ap.error(f"{a.build}: not a directory")
    a.slots = [1, 2] if a.smoke else [1, 2, 4, 8, 16, 32]
    a.celery = [] if a.no_celery else ([1] if a.smoke else [1, 2, 4, 8])
    a.warm_n = 200 if a.smoke else 2000
    a.out = os.environ.get("OCCAMY_BENCH_OUT") or os.path.join(HERE, "out")
    return a


ARGS = parse_args()
os.environ["OCCAMY_BUILD"] = os.path.abspath(ARGS.build)
sys.path.insert(0, HERE)
sys.dont_write_bytecode = True  # no bench/__pycache__
import drain  # noqa: E402
from drain import Daemon, log, new_names  # noqa: E402


def status_kib(pid):
    """{field: value} of /proc/PID/status (kB fields as KiB ints)."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            v = v.split()
            if v and v[0].isdigit():
                out[k] = int(v[0])
    return out


def pss_kib(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def sample(pid):
    st = status_kib(pid)
    return {"rss": st.get("VmRSS"), "anon": st.get("RssAnon"), "file": st.get("RssFile"),
            "vsz": st.get("VmSize"), "threads": len(os.listdir(f"/proc/{pid}/task")),
            "pss": pss_kib(pid)}


def settle_time():
    time.sleep(0.5)


def measure_occamy(slots, broker):
    names = new_names()
    broker.declare_occamy(names)
    d = Daemon(["noop"], names=names, slots=slots)
    try:
        d.start()  # waits until it consumes
        settle_time()
        idle = sample(d.pid)
        drain.preload(names["request_exchange"], names["request_queue"], ARGS.warm_n,
                      headers=[("handler", "noop")])
        drain.watch(broker, names["request_queue"], ARGS.warm_n,
                    lambda: d._check_alive("while warming up"))
        settle_time()
        warm = sample(d.pid)
        d.stop()
    finally:
        d.close()
        broker.delete_occamy(names)
    return idle, warm


CELERY_APP = '''\
import os
from celery import Celery
app = Celery("occamy_bench", broker=os.environ["OCCAMY_TEST_AMQP_URI"])
app.conf.update(task_default_queue=os.environ["BENCH_CELERY_QUEUE"], task_acks_late=True,
                worker_prefetch_multiplier=1, task_ignore_result=True, result_backend=None,
                broker_heartbeat=0)


@app.task(name="bench.noop", ignore_result=True)
def noop(*args, **kwargs):
    return None
'''


def measure_celery(concurrency, broker):
    queue = "bench.celery.fp." + uuid.uuid4().hex[:8]
    tmp = tempfile.mkdtemp(prefix="occamy-celery-")
    proc = None
    try:
        with open(os.path.join(tmp, "occamy_bench_app.py"), "w") as f:
            f.write(CELERY_APP)
        broker.declare_plain(queue)
        env = dict(os.environ, BENCH_CELERY_QUEUE=queue, PYTHONPATH=tmp,
                   PYTHONDONTWRITEBYTECODE="1")
        proc = subprocess.Popen(
            ["/usr/bin/python3", "-m", "celery", "-A", "occamy_bench_app", "worker",
             "--pool=prefork", f"--concurrency={concurrency}", "-Q", queue,
             "--without-gossip", "--without-mingle", "--without-heartbeat",
             "--loglevel=WARNING", "-n", f"fp-{uuid.uuid4().hex[:6]}@%h"],
            cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 60
        while broker.depth(queue)[1] == 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("celery worker did not start")
            time.sleep(0.1)
        # The pool forks its children after connecting: wait for them.
        deadline = time.monotonic() + 30
        while len(drain.children(proc.pid)) < concurrency and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)
        pids = [proc.pid] + drain.children(proc.pid)
        tot = {"rss": 0, "pss": 0, "threads": 0, "procs": len(pids)}
        for p in pids:
            s = sample(p)
            tot["rss"] += s["rss"] or 0
            tot["pss"] += s["pss"] or 0
            tot["threads"] += s["threads"]
        return tot
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        broker.delete_queue(queue)
        broker.ch.exchange_delete(queue)
        shutil.rmtree(tmp, ignore_errors=True)


def fit(xs, ys):
    """Least squares y = a + b x: (a, b)."""
    n = len(xs)
    if n < 2:
        return (ys[0] if ys else 0.0), 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return my - b * mx, b


def mib(kib):
    return "-" if kib is None else f"{kib / 1024:.1f}"


def main():
    t0 = time.monotonic()
    os.makedirs(ARGS.out, exist_ok=True)
    base = os.path.join(ARGS.out, "bench_footprint")
    broker = drain.Broker()
    rows, crow = [], []
    try:
        for s in ARGS.slots:
            idle, warm = measure_occamy(s, broker)
            log(f"slots {s}: idle RSS {idle['rss']} KiB, {idle['threads']} threads; "
                f"warm RSS {warm['rss']} KiB")
            rows.append((s, idle, warm))
        for c in ARGS.celery:
            try:
                tot = measure_celery(c, broker)
            except Exception as e:  # noqa: BLE001 - Celery is optional context
                log(f"celery concurrency {c}: {e}")
                break
            log(f"celery concurrency {c}: RSS {tot['rss']} KiB, PSS {tot['pss']} KiB, "
                f"{tot['procs']} processes")
            crow.append((c, tot))
    finally:
        broker.close()

    with open(base + ".csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["what", "slots", "state", "rss_kib", "anon_kib", "file_kib", "pss_kib",
                    "vsz_kib", "threads", "processes"])
        for s, idle, warm in rows:
            for state, x in (("idle", idle), ("warm", warm)):
                w.writerow(["occamyd", s, state, x["rss"], x["anon"], x["file"], x["pss"],
                            x["vsz"], x["threads"], 1])
        for c, t in crow:
            w.writerow(["celery", c, "idle", t["rss"], "", "", t["pss"], "", t["threads"],
                        t["procs"]])

    xs = [s for s, _, _ in rows]
    a_idle, b_idle = fit(xs, [i["rss"] for _, i, _ in rows])
    a_anon, b_anon = fit(xs, [i["anon"] for _, i, _ in rows])
    a_warm, b_warm = fit(xs, [w["rss"] for _, _, w in rows])
    a_thr, b_thr = fit(xs, [i["threads"] for _, i, _ in rows])
    L = ["## Footprint: occamyd memory and threads by slot count", "",
         "*bench/bench_footprint.py*" + (" — **smoke run**" if ARGS.smoke else ""), "",
         "occamyd with the `noop` plugin loaded, defaults otherwise (prefetch = slots, "
         "no metrics endpoint), connected and consuming.  *Idle*: 0.5 s after it "
         f"started consuming.  *Warm*: after it ran {ARGS.warm_n:,} no-op requests "
         "(each slot thread has allocated once, and glibc gave it a malloc arena).  "
         "From `/proc/PID/status` (VmRSS = RssAnon + RssFile + RssShmem; RssFile is "
         "mostly shared libraries, shared with other processes) and "
         "`/proc/PID/smaps_rollup` (Pss).  1 MiB = 1024 KiB.", "",
         "| slots | threads | RSS idle MiB | RssAnon idle MiB | PSS idle MiB "
         "| RSS warm MiB | virtual MiB |",
         "|---:|---:|---:|---:|---:|---:|---:|"]
    for s, i, w in rows:
        L.append(f"| {s} | {i['threads']} | {mib(i['rss'])} | {mib(i['anon'])} | "
                 f"{mib(i['pss'])} | {mib(w['rss'])} | {mib(i['vsz'])} |")
    L += ["",
          f"Linear fit over {len(xs)} slot counts: idle RSS = {a_idle / 1024:.2f} MiB + "
          f"**{b_idle:.0f} KiB per slot** (anonymous memory: {b_anon:.0f} KiB per slot); "
          f"warm RSS = {a_warm / 1024:.2f} MiB + **{b_warm:.0f} KiB per slot**; "
          f"threads = {a_thr:.1f} + **{b_thr:.2f} per slot**.", "",
          "Per slot the scheduler starts a protected worker, a helper worker (SCHED_IDLE) "
          "and a control dispatcher (`daemon/scheduler.c` `sched_new`: 2 × slots workers, "
          "slots + 1 dispatchers up to 64); the fixed threads are main, amqp, admission "
          "and expansion (and microhttpd's with `[metrics] listen`).  Each thread "
          "reserves an 8 MiB stack (the virtual column) of which only the touched pages "
          "are resident.  PSS moves from run to run with how many other processes map "
          "the same libraries (other occamyd instances and brokers on a shared "
          "machine): RssAnon is the daemon's own memory.", ""]
    if crow:
        L += ["For scale, an idle Celery worker with the same no-op task (prefork pool, "
              "Debian's python3-celery): the parent plus one process per concurrency "
              "slot.  RSS counts pages the forked children share with the parent once "
              "per process, PSS splits them fairly.", "",
              "| concurrency | processes | threads | RSS sum MiB | PSS sum MiB |",
              "|---:|---:|---:|---:|---:|"]
        for c, t in crow:
            L.append(f"| {c} | {t['procs']} | {t['threads']} | {mib(t['rss'])} | "
                     f"{mib(t['pss'])} |")
        if len(crow) >= 2:
            ca, cb = fit([c for c, _ in crow], [t["pss"] for _, t in crow])
            L += ["", f"Celery PSS = {ca / 1024:.1f} MiB + {cb / 1024:.1f} MiB per "
                      "concurrency slot."]
        L.append("")
    L.append(f"This benchmark took {time.monotonic() - t0:.0f} s.")
    L.append("")
    with open(base + ".md", "w") as f:
        f.write("\n".join(L))
    log(f"wrote {base}.md")


if __name__ == "__main__":
    main()
