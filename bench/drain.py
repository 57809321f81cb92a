"""bench/drain.py - shared helpers of the throughput benchmarks
(bench_throughput.py, diag/profile_noop.py): pre-load a durable queue with
persistent messages, start a consumer (the bare rabbitmq-c consumer,
occamyd, or a Celery worker) and time how fast it drains the queue.

Not a benchmark itself (bench/run only runs bench_*).  Import it after
setting OCCAMY_BUILD, since occamy_test reads it when imported:

    os.environ["OCCAMY_BUILD"] = build
    sys.path.insert(0, os.path.dirname(__file__))
    import drain

How the rate is measured, the same way for every consumer: a poller
passively declares the queue every POLL_S seconds and records
(time, messages ready).  The drain rate is the slope between the first
sample where the queue has started to shrink and the last one where it is
not yet empty, so start-up (connecting, loading plugins, forking Celery's
pool) and the tail are excluded.  Requeued messages come back to "ready",
so the rate is the net rate of work done.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))
import pika  # noqa: E402
from occamy_test import AMQP_URI, BUILD, Daemon, free_port, new_names  # noqa: E402

POLL_S = 0.01
ACK_METRIC = 'occamy_settlements_total{outcome="ack"}'
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def tool(name):
    """Path of a bench/*.c program built by make."""
    p = os.path.join(BUILD, "bench", name)
    if not os.access(p, os.X_OK):
        raise SystemExit(f"{p} is not built (run make)")
    return p


# ------------------------------------------------------------------ broker

class Broker:
    """One pika connection for declarations and depth polling."""

    def __init__(self):
        self.conn = pika.BlockingConnection(pika.URLParameters(AMQP_URI))
        self.ch = self.conn.channel()

    def depth(self, queue):
        """(messages ready, consumers)."""
        ok = self.ch.queue_declare(queue, passive=True)
        return ok.method.message_count, ok.method.consumer_count

    def declare_plain(self, queue):
        self.ch.queue_declare(queue, durable=True)

    def declare_occamy(self, names):
        """The topology occamyd declares (daemon/transport_conn.c topology_declare),
        with the same arguments, so that the queue can be filled before the
        daemon starts."""
        ch = self.ch
        ch.exchange_declare(names["dead_letter_exchange"], "fanout", durable=True)
        ch.queue_declare(names["dead_letter_queue"], durable=True,
                         arguments={"x-queue-type": "classic"})
        ch.queue_bind(names["dead_letter_queue"], names["dead_letter_exchange"],
                      names["dead_letter_queue"])
        ch.exchange_declare(names["request_exchange"], "direct", durable=True)
        ch.queue_declare(names["request_queue"], durable=True,
                         arguments={"x-queue-type": "classic",
                                    "x-dead-letter-exchange": names["dead_letter_exchange"]})
        ch.queue_bind(names["request_queue"], names["request_exchange"],
                      names["request_queue"])

    def delete_occamy(self, names):
        for q in ("request_queue", "dead_letter_queue"):
            self.ch.queue_delete(names[q])
        for x in ("request_exchange", "dead_letter_exchange", "control_exchange"):
            self.ch.exchange_delete(names[x])

    def delete_queue(self, queue):
        self.ch.queue_delete(queue)

    def close(self):
        if self.conn.is_open:
            self.conn.close()


def broker_pid():
    """PID of the private broker's beam.smp (for its CPU time), or None."""
    # Its command line names the broker's HOME (-home DIR), which is ours.
    home = os.environ.get("OCCAMY_TEST_BROKER_HOME")
    if not home:
        return None
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
        except OSError:
            continue
        if cmd and cmd[0].endswith(b"beam.smp") and home.encode() in cmd:
            return int(pid)
    return None


def cpu_s(pid):
    """User + system CPU seconds of a process (all its threads), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


class Counters:
    """Syscalls and context switches of one process (every thread) while
    it drains, counted by `perf stat -p` (the raw_syscalls:sys_enter
    tracepoint and the context-switches software event), so the next change
    to the hot path can be judged by them, not by msg/s alone.  Without
    perf, or where the kernel refuses, the counts are None and `why` says
    why.  The same counting runs on the bare consumer and on occamyd, so
    its small cost per syscall hits both alike."""

    EVENTS = ("raw_syscalls:sys_enter", "context-switches")

    def __init__(self, pid):
        self.why = None
        self.proc = None
        self.out = None
        perf = shutil.which("perf")
        if perf is None:
            self.why = "perf not installed"
            return
        fd, self.out = tempfile.mkstemp(prefix="occamy-perf-", suffix=".csv")
        os.close(fd)
        self.proc = subprocess.Popen(
            [perf, "stat", "-x,", "-e", ",".join(self.EVENTS), "-p", str(pid),
             "-o", self.out], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def stop(self):
        """{event: count or None}; call once."""
        counts = {e: None for e in self.EVENTS}
        if self.proc is None:
            return counts
        try:
            self.proc.send_signal(signal.SIGINT)
            _, err = self.proc.communicate(timeout=10)
            with open(self.out) as f:
                for line in f:
                    parts = line.strip().split(",")
                    if len(parts) > 2 and parts[2] in counts and parts[0].isdigit():
                        counts[parts[2]] = int(parts[0])
            if None in counts.values():
                self.why = "perf stat: " + (err.strip().splitlines() or ["no counts"])[-1]
        except (OSError, subprocess.SubprocessError) as e:
            self.why = f"perf stat: {e}"
        finally:
            os.unlink(self.out)
        return counts


def per_msg(counts, n):
    """{"syscalls": per message, "switches": per message} from Counters."""
    sc, cs = counts["raw_syscalls:sys_enter"], counts["context-switches"]
    return {"syscalls_per_msg": sc / n if sc is not None else None,
            "switches_per_msg": cs / n if cs is not None else None}


def tree_cpu_s(pid):
    """CPU seconds of pid and its live children (Celery's pool)."""
    total = cpu_s(pid) or 0.0
    for c in children(pid):
        total += cpu_s(c) or 0.0
    return total


def children(pid):
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
    except OSError:
        pass
    for c in list(out):
        out += children(c)
    return out


def preload(exchange, rkey, n, headers=(), body="", check=None):
    """Publish n persistent messages with bench/publisher (confirmed);
    returns its JSON report."""
    cmd = [tool("publisher"), "-u", AMQP_URI, "-e", exchange, "-k", rkey,
           "-n", str(n), "-m", "-b", body]
    for k, v in headers:
        cmd += ["-H", f"{k}={v}"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        raise RuntimeError(f"publisher failed: {p.stderr.strip()}")
    return json.loads(p.stdout)


# ------------------------------------------------------------------- timing

def watch(broker, queue, n, alive, timeout=600, until_empty=True):
    """Poll the queue depth until it is empty (and stays so for two
    polls); returns [(t, ready, consumers)].  alive() is checked every
    poll and may raise."""
    samples = []
    deadline = time.monotonic() + timeout
    zeros = 0
    while True:
        alive()
        ready, consumers = broker.depth(queue)
        t = time.monotonic()
        samples.append((t, ready, consumers))
        zeros = zeros + 1 if ready == 0 else 0
        if until_empty and zeros >= 2:
            return samples
        if t > deadline:
            raise RuntimeError(f"queue {queue} not drained within {timeout}s "
                               f"({ready} of {n} left)")
        time.sleep(POLL_S)


def rate(samples, n):
    """Drain rate (msg/s) from depth samples: the slope between the first
    sample below n and the last one above 0.  Also returns the window (s)
    it was measured over and the end-to-end time from the first consumer
    to the first empty sample."""
    below = [i for i, s in enumerate(samples) if s[1] < n]
    above = [i for i, s in enumerate(samples) if s[1] > 0]
    t_consumer = next((s[0] for s in samples if s[2] > 0 or s[1] < n), samples[0][0])
    t_empty = next((s[0] for s in samples if s[1] == 0), samples[-1][0])
    total = t_empty - t_consumer
    if below and above and above[-1] > below[0]:
        a, b = samples[below[0]], samples[above[-1]]
        window = b[0] - a[0]
        if window > 0:
            return (a[1] - b[1]) / window, window, total
    return (n / total if total > 0 else 0.0), total, total


def steady_window(samples, n):
    """(t_start, t_end) of the window rate() measures over."""
    below = [s[0] for s in samples if s[1] < n]
    above = [s[0] for s in samples if s[1] > 0]
    if below and above:
        return below[0], above[-1]
    return samples[0][0], samples[-1][0]


# ---------------------------------------------------------------- consumers

def run_bare(prefetch, n, broker=None, slots=None):
    """Pre-load n messages into a fresh durable queue, drain it with
    bench/bare_consumer at prefetch; returns a result dict (slots: only
    recorded, for the comparison it belongs to)."""
    own = broker is None
    broker = broker or Broker()
    queue = "bench.bare." + uuid.uuid4().hex[:8]
    try:
        broker.declare_plain(queue)
        pub = preload("", queue, n, headers=[("handler", "noop")])
        bpid = broker_pid()
        b0 = cpu_s(bpid) if bpid else None
        proc = subprocess.Popen([tool("bare_consumer"), "-u", AMQP_URI, "-q", queue,
                                 "-p", str(prefetch), "-n", str(n)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        def alive():
            # Without reaping it: wait4 below wants its rusage.
            st = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            if st is not None and (st.si_code != os.CLD_EXITED or st.si_status != 0):
                raise RuntimeError("bare_consumer failed: " + proc.stderr.read())
        counters = Counters(proc.pid)
        samples = watch(broker, queue, n, alive)
        counts = counters.stop()
        b1 = cpu_s(bpid) if bpid else None
        # wait4 for the consumer's own CPU time (it has exited or is about
        # to: it stops after n messages).
        _, status, ru = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out, err = proc.stdout.read(), proc.stderr.read()
        if proc.returncode != 0:
            raise RuntimeError(f"bare_consumer: {err.strip()}")
        own_report = json.loads(out)
        r, window, total = rate(samples, n)
        return {"kind": "bare", "prefetch": prefetch, "slots": slots, "n": n,
                "msg_per_s": r, "window_s": window, "total_s": total,
                "self_msg_per_s": own_report["msg_per_s"],
                "cpu_us": (ru.ru_utime + ru.ru_stime) / n * 1e6,
                "publish_msg_per_s": pub["msg_per_s"],
                "broker_cpu_us": (b1 - b0) / n * 1e6 if b0 is not None else None,
                **per_msg(counts, n), "counters_why": counters.why}
    finally:
        try:
            broker.delete_queue(queue)
        finally:
            if own:
                broker.close()


def scrape_metrics(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def run_occamy(slots, prefetch, n, broker=None, perf=None, extra=None):
    """Pre-load n noop requests (persistent, no reply_to) into a fresh
    request queue, start occamyd (noop plugin, slots, prefetch) and time
    the drain.  perf: a callable(pid) -> stop callable, started once the
    daemon consumes (for profiling)."""
    own = broker is None
    broker = broker or Broker()
    names = new_names()
    port = free_port()
    d = None
    stop_perf = None
    try:
        broker.declare_occamy(names)
        pub = preload(names["request_exchange"], names["request_queue"], n,
                      headers=[("handler", "noop")])
        d = Daemon(["noop"], names=names, slots=slots, prefetch=prefetch,
                   metrics_listen=f"127.0.0.1:{port}", ready=False, **(extra or {}))
        d.start(wait=False)
        bpid = broker_pid()

        def alive():
            if not d.running:
                raise RuntimeError(f"occamyd exited ({d.returncode})\n" + d.log_tail())
        # Wait for the consumer, then measure.
        deadline = time.monotonic() + 30
        while True:
            alive()
            ready, consumers = broker.depth(names["request_queue"])
            if consumers > 0 or ready < n:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("occamyd did not consume\n" + d.log_tail())
            time.sleep(POLL_S)
        c0, b0 = cpu_s(d.pid), (cpu_s(bpid) if bpid else None)
        counters = Counters(d.pid) if perf is None else None
        if perf is not None:
            stop_perf = perf(d.pid)
        samples = watch(broker, names["request_queue"], n, alive)
        # Everything acked?  The scheduler's count reaches n, and then the
        # transport sends the last acks.
        deadline = time.monotonic() + 30
        while True:
            m = scrape_metrics(port)
            if m.get(ACK_METRIC, 0) >= n:
                break
            alive()
            if time.monotonic() > deadline:
                acks = m.get(ACK_METRIC, 0)
                raise RuntimeError(f"only {acks:.0f} of {n} acked\n" + d.log_tail())
            time.sleep(POLL_S)
        c1, b1 = cpu_s(d.pid), (cpu_s(bpid) if bpid else None)
        counts = counters.stop() if counters is not None else {e: None for e in Counters.EVENTS}
        if stop_perf is not None:
            stop_perf()
            stop_perf = None
        rc = d.stop(timeout=30)
        left = broker.depth(names["request_queue"])[0]
        if left != 0:
            raise RuntimeError(f"{left} messages back in the queue after the daemon stopped")
        r, window, total = rate(samples, n)
        return {"kind": "occamy", "prefetch": prefetch, "slots": slots, "n": n,
                "msg_per_s": r, "window_s": window, "total_s": total,
                "publish_msg_per_s": pub["msg_per_s"], "exit": rc,
                "cpu_us": (c1 - c0) / n * 1e6 if c0 is not None and c1 is not None else None,
                "broker_cpu_us": (b1 - b0) / n * 1e6 if b0 is not None else None,
                "deliveries": m.get('occamy_deliveries_total{queue="request"}'),
                "requeued_no_room": m.get('occamy_requeued_total{reason="no_room"}'),
                "acks": m.get(ACK_METRIC), **per_msg(counts, n),
                "counters_why": counters.why if counters is not None else "profiled"}
    finally:
        if stop_perf is not None:
            stop_perf()
        if d is not None:
            d.close()
        try:
            broker.delete_occamy(names)
        finally:
            if own:
                broker.close()


# ------------------------------------------------------------------- celery

CELERY_APP = '''\
"""Celery app of bench/bench_throughput.py: one no-op task."""
import os

from celery import Celery

app = Celery("occamy_bench", broker=os.environ["OCCAMY_TEST_AMQP_URI"])
app.conf.update(
    task_default_queue=os.environ["BENCH_CELERY_QUEUE"],
    task_acks_late=True,                     # ack after the task ran, like occamyd
    task_acks_on_failure_or_timeout=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=int(os.environ.get("BENCH_CELERY_MULTIPLIER", "1")),
    task_ignore_result=True,
    result_backend=None,
    worker_send_task_events=False,
    task_send_sent_event=False,
    worker_disable_rate_limits=True,
    broker_heartbeat=0,
)


@app.task(name="bench.noop", ignore_result=True)
def noop(*args, **kwargs):
    return None
'''


def celery_preload(broker, queue, n):
    """Publish n persistent task messages in Celery's protocol 2 (what
    apply_async sends), straight to the queue, and wait until the broker
    has them all."""
    body = json.dumps([[], {}, {"callbacks": None, "errbacks": None,
                                "chain": None, "chord": None}]).encode()
    ch = broker.ch
    t0 = time.monotonic()
    for i in range(n):
        tid = str(uuid.uuid4())
        headers = {"lang": "py", "task": "bench.noop", "id": tid, "shadow": None,
                   "eta": None, "expires": None, "group": None, "group_index": None,
                   "retries": 0, "timelimit": [None, None], "root_id": tid,
                   "parent_id": None, "argsrepr": "()", "kwargsrepr": "{}",
                   "origin": "bench", "ignore_result": True}
        props = pika.BasicProperties(content_type="application/json",
                                     content_encoding="utf-8", correlation_id=tid,
                                     delivery_mode=2, priority=0, headers=headers)
        ch.basic_publish("", queue, body, props)
    deadline = time.monotonic() + 120
    while broker.depth(queue)[0] < n:
        if time.monotonic() > deadline:
            raise RuntimeError("celery pre-load: the broker did not get every message")
        time.sleep(0.05)
    return n / (time.monotonic() - t0)


def run_celery(concurrency, n, multiplier=1, broker=None):
    """Pre-load n no-op tasks, start a Celery worker (prefork pool,
    concurrency, acks_late, prefetch multiplier) and time the drain."""
    own = broker is None
    broker = broker or Broker()
    queue = "bench.celery." + uuid.uuid4().hex[:8]
    tmp = tempfile.mkdtemp(prefix="occamy-celery-")
    proc = None
    try:
        with open(os.path.join(tmp, "occamy_bench_app.py"), "w") as f:
            f.write(CELERY_APP)
        broker.declare_plain(queue)
        pub = celery_preload(broker, queue, n)
        env = dict(os.environ, BENCH_CELERY_QUEUE=queue,
                   BENCH_CELERY_MULTIPLIER=str(multiplier), PYTHONPATH=tmp,
                   PYTHONDONTWRITEBYTECODE="1")
        logf = open(os.path.join(tmp, "worker.log"), "w+")
        proc = subprocess.Popen(
            ["/usr/bin/python3", "-m", "celery", "-A", "occamy_bench_app", "worker",
             "--pool=prefork", f"--concurrency={concurrency}",
             f"--prefetch-multiplier={multiplier}", "-Q", queue, "--without-gossip",
             "--without-mingle", "--without-heartbeat", "--loglevel=WARNING",
             "-n", f"bench-{uuid.uuid4().hex[:6]}@%h"],
            cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=logf,
            stderr=subprocess.STDOUT, start_new_session=True)

        def alive():
            if proc.poll() is not None:
                logf.seek(0)
                raise RuntimeError(f"celery worker exited ({proc.returncode}):\n"
                                   + logf.read()[-3000:])
        deadline = time.monotonic() + 60
        while True:
            alive()
            ready, consumers = broker.depth(queue)
            if consumers > 0 or ready < n:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("celery worker did not consume")
            time.sleep(POLL_S)
        bpid = broker_pid()
        c0, b0 = tree_cpu_s(proc.pid), (cpu_s(bpid) if bpid else None)
        samples = watch(broker, queue, n, alive)
        # The last prefetched tasks: give them a moment to be acked.
        time.sleep(0.3)
        c1, b1 = tree_cpu_s(proc.pid), (cpu_s(bpid) if bpid else None)
        proc.send_signal(signal.SIGTERM)  # warm shutdown
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        left = broker.depth(queue)[0]
        if left != 0:
            raise RuntimeError(f"{left} Celery tasks back in the queue after the worker stopped")
        r, window, total = rate(samples, n)
        return {"kind": "celery", "prefetch": concurrency * multiplier,
                "slots": concurrency, "n": n, "msg_per_s": r, "window_s": window,
                "total_s": total, "publish_msg_per_s": pub,
                "cpu_us": (c1 - c0) / n * 1e6,
                "broker_cpu_us": (b1 - b0) / n * 1e6 if b0 is not None else None}
    finally:
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        try:
            broker.delete_queue(queue)
            broker.ch.exchange_delete(queue)
        finally:
            if own:
                broker.close()
            shutil.rmtree(tmp, ignore_errors=True)
