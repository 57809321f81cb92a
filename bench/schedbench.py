"""schedbench - shared code of the scheduling benchmarks
(bench_preemption, bench_cpu_share, bench_fill, bench_control,
bench_timeline, bench_bursty).  Not a benchmark itself (bench/run only runs
bench_*).

Each benchmark is run by bench/run as

    /usr/bin/python3 bench/bench_NAME.py [--smoke] BUILD_DIR

inside one private broker (OCCAMY_TEST_AMQP_URI), and writes
$OCCAMY_BENCH_OUT/NAME.md (+ PNGs).  It drives occamyd through the
integration tests' harness (tests/integration/occamy_test.py).

Timestamps: Python's time.monotonic_ns() and C's CLOCK_MONOTONIC are the
same clock on Linux, so a publish time taken here and a start time written
by a plugin in the daemon are directly comparable.
"""

import argparse
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def parse_args(doc, extra=None):
    """--smoke and BUILD_DIR; sets OCCAMY_BUILD before the harness is
    imported (it reads it at import time)."""
    ap = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="seconds-long run that proves it works")
    ap.add_argument("build", metavar="BUILD_DIR", nargs="?", default=os.path.join(ROOT, "build"))
    if extra:
        extra(ap)
    a = ap.parse_args()
    a.build = os.path.abspath(a.build)
    if not os.path.isfile(os.path.join(a.build, "occamyd")):
        ap.error(f"{a.build}/occamyd not found: run make first")
    os.environ["OCCAMY_BUILD"] = a.build
    os.environ.setdefault("OCCAMY_ROOT", ROOT)
    a.out = os.environ.get("OCCAMY_BENCH_OUT") or os.path.join(HERE, "out")
    os.makedirs(a.out, exist_ok=True)
    return a


def harness():
    """The integration tests' module (import after parse_args)."""
    p = os.path.join(ROOT, "tests", "integration")
    if p not in sys.path:
        sys.path.insert(0, p)
    import occamy_test  # noqa: E402
    if not os.environ.get("OCCAMY_TEST_AMQP_URI"):
        sys.exit("no broker: run me through bench/run (or tests/broker run ...)")
    return occamy_test


# --------------------------------------------------------------- building

class Workdir:
    """A private 0755 directory (the plugin loader refuses group/world
    writable dirs and files), removed at exit."""

    def __init__(self, prefix="occamy-bench-"):
        self.path = tempfile.mkdtemp(prefix=prefix)
        os.chmod(self.path, 0o755)

    def file(self, name):
        return os.path.join(self.path, name)

    def close(self):
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def cc(src, out, shared=True, libs=()):
    """Compile one of bench/plugins/*.c like a third-party plugin author."""
    cmd = ["cc", "-std=c11", "-D_GNU_SOURCE", "-I", os.path.join(ROOT, "include"), "-O2",
           "-pthread", "-Wall", "-Wextra"]
    if shared:
        cmd += ["-fPIC", "-shared"]
    cmd += [os.path.join(HERE, "plugins", src), "-o", out, *libs]
    subprocess.run(cmd, check=True)
    os.chmod(out, 0o755)
    return out


def build_benchtask(wd):
    return cc("benchtask.c", wd.file("benchtask.so"))


# ------------------------------------------------------------------ stats

def pct(xs, p):
    """Percentile p (0..100) by linear interpolation; nan if empty."""
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * p / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def fmt_ms(ns_or_ms, unit="ns", digits=2):
    v = ns_or_ms / 1e6 if unit == "ns" else ns_or_ms
    if v != v:
        return "-"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.{digits}f}"


def table(header, rows, align=None):
    """A markdown table."""
    out = ["| " + " | ".join(header) + " |",
           "|" + "|".join((align or ["---"] * len(header))) + "|"]
    for r in rows:
        out.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(out)


def loadavg():
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def machine_line():
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs ({model}), load average {loadavg():.2f} at the start"


def write_report(a, name, text):
    path = os.path.join(a.out, name + ".md")
    with open(path, "w") as f:
        f.write(text.rstrip() + "\n")
    print(text)
    print(f"wrote {path}")


# --------------------------------------------------------------- daemon

def metrics(port):
    """GET /metrics -> {'name{labels}': value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        k, _, v = line.rpartition(" ")
        try:
            out[k] = float(v)
        except ValueError:
            pass
    return out


def histogram_quantile(m, name, q):
    """Upper bound of the bucket holding quantile q of a Prometheus
    histogram in metrics dict m (seconds), like histogram_quantile()."""
    buckets = []
    for k, v in m.items():
        mm = re.fullmatch(re.escape(name) + r'_bucket\{le="([^"]+)"\}', k)
        if mm:
            buckets.append((float("inf") if mm.group(1) == "+Inf" else float(mm.group(1)), v))
    buckets.sort()
    if not buckets or buckets[-1][1] == 0:
        return float("nan")
    total = buckets[-1][1]
    for le, c in buckets:
        if c >= q * total:
            return le
    return float("inf")


def proc_cpu_s(pid):
    """utime + stime of a process (all threads), seconds."""
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


class Status:
    """Ask daemons for their slots (what `occamyctl status` does: a control
    message with x-occamy-command: status and reply_to), on a connection
    of its own.  Not thread-safe: one per thread."""

    LINE = re.compile(r"^slot (\d+) (\S+)\s+(\S+)\s+(\S+)\s+([\d.]+)s", re.M)
    HEAD = re.compile(r"^daemon (\S+) slots (\d+) protected (\d+) internal (\d+) external (\d+) "
                      r"empty (\d+) stuck (\d+) draining (\d+)")

    def __init__(self, ot, names):
        import pika
        self.pika = pika
        self.ot = ot
        self.names = names
        self.conn = ot.connect()
        self.ch = self.conn.channel()
        self.queue = self.ch.queue_declare("", exclusive=True, auto_delete=True).method.queue
        self.replies = []
        self.ch.basic_consume(self.queue, lambda c, m, p, b: self.replies.append((p, b)),
                              auto_ack=True)

    def ask(self, ndaemons=1, timeout=1.0):
        """[(head dict, [(slot, status, group, id)])] from up to ndaemons."""
        cid = uuid.uuid4().hex
        self.ch.basic_publish(self.names["control_exchange"], "", b"",
                              self.pika.BasicProperties(
                                  headers={"x-occamy-command": "status"},
                                  reply_to=self.queue, correlation_id=cid, delivery_mode=1))
        out = []
        deadline = time.monotonic() + timeout
        while len(out) < ndaemons and time.monotonic() < deadline:
            self.conn.process_data_events(time_limit=0.002)
            keep = []
            for p, b in self.replies:
                if p.correlation_id == cid:
                    out.append(self.parse(b.decode("utf-8", "replace")))
                else:
                    keep.append((p, b))
            self.replies = keep
        return out

    @classmethod
    def parse(cls, text):
        m = cls.HEAD.search(text)
        head = {}
        if m:
            head = dict(zip("daemon slots protected internal external empty stuck draining".split(),
                            [m.group(1)] + [int(x) for x in m.groups()[1:]]))
        slots = [(int(s), st, g, i) for s, st, g, i, _ in cls.LINE.findall(text)]
        return head, slots

    def close(self):
        if self.conn.is_open:
            self.conn.close()


class StatusSampler(threading.Thread):
    """The first daemon's slot counts (the head dict of Status.ask) every
    period, on its own connection, into samples: (CLOCK_MONOTONIC ns, head)
    pairs if timestamps, else heads."""

    def __init__(self, ot, names, period, timestamps=False):
        super().__init__(daemon=True)
        self.ot, self.names, self.period, self.timestamps = ot, names, period, timestamps
        self.samples = []
        self.stop = threading.Event()

    def run(self):
        st = Status(self.ot, self.names)
        try:
            while not self.stop.is_set():
                r = st.ask(timeout=0.5)
                if r:
                    head = r[0][0]
                    self.samples.append((time.monotonic_ns(), head) if self.timestamps else head)
                self.stop.wait(self.period)
        finally:
            st.close()


def wait_status(st, pred, timeout=20, what="daemon state"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        r = st.ask()
        if r:
            last = r[0]
            if pred(r[0][0]):
                return r[0]
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}; last status {last}")


class Publisher:
    """A plain channel (no confirms: basic_publish returns once the frame
    is written) plus an exclusive reply queue on the same connection."""

    def __init__(self, ot):
        import pika
        self.pika = pika
        self.conn = ot.connect()
        self.ch = self.conn.channel()
        self.reply_queue = self.ch.queue_declare("", exclusive=True,
                                                 auto_delete=True).method.queue
        self.replies = {}   # correlation_id -> (recv_ns, props, body)
        self.ch.basic_consume(self.reply_queue, self._on_reply, auto_ack=True)

    def _on_reply(self, ch, method, props, body):
        self.replies[props.correlation_id] = (time.monotonic_ns(), props, body)

    def request(self, names, handler, body, task_id=None, cid=None, headers=None):
        """Publish a request; returns the monotonic ns just before the
        publish call."""
        h = {names.get("header_handler", "handler"): handler}
        if task_id is not None:
            h[names.get("header_task_id", "task-id")] = task_id
        h.update(headers or {})
        props = self.pika.BasicProperties(headers=h, delivery_mode=1,
                                          reply_to=self.reply_queue if cid else None,
                                          correlation_id=cid)
        if isinstance(body, str):
            body = body.encode()
        t0 = time.monotonic_ns()
        self.ch.basic_publish(names["request_exchange"], names["request_queue"], body, props)
        return t0

    def control(self, names, body, task_id=None, handler=None):
        h = {}
        if task_id is not None:
            h[names.get("header_task_id", "task-id")] = task_id
        if handler is not None:
            h[names.get("header_handler", "handler")] = handler
        if isinstance(body, str):
            body = body.encode()
        t0 = time.monotonic_ns()
        self.ch.basic_publish(names["control_exchange"], "", body,
                              self.pika.BasicProperties(headers=h or None, delivery_mode=1))
        return t0

    def pump(self, seconds=0.0):
        """Process I/O (replies) for up to seconds."""
        self.conn.process_data_events(time_limit=max(0.0, seconds))

    def wait_until_ns(self, t_ns):
        """Serve replies until monotonic time t_ns; the last stretch is a
        plain sleep so the publish that follows is on time."""
        while True:
            left = (t_ns - time.monotonic_ns()) / 1e9
            if left <= 0.002:
                break
            self.conn.process_data_events(time_limit=min(left - 0.0015, 0.05))
        left = (t_ns - time.monotonic_ns()) / 1e9
        if left > 0:
            time.sleep(left)

    def wait_replies(self, cids, timeout):
        deadline = time.monotonic() + timeout
        cids = set(cids)
        while not cids <= set(self.replies) and time.monotonic() < deadline:
            self.conn.process_data_events(time_limit=0.05)
        return cids <= set(self.replies)

    def close(self):
        if self.conn.is_open:
            self.conn.close()


def parse_kv(body):
    """'start=1 end=2 cpu=3 pid=4' -> {'start': 1, ...}"""
    out = {}
    for part in body.decode("ascii", "replace").split():
        k, _, v = part.partition("=")
        try:
            out[k] = int(v)
        except ValueError:
            out[k] = v
    return out


# ---------------------------------------------------------------- gnuplot

def gnuplot(script, what="plot"):
    """Run a gnuplot script; returns True if it worked (a missing gnuplot
    only costs the picture)."""
    exe = shutil.which("gnuplot")
    if exe is None:
        print(f"gnuplot not found: no {what} (apt-get install -y gnuplot-nox)")
        return False
    p = subprocess.run([exe], input=script, text=True, capture_output=True)
    if p.returncode != 0:
        print(f"gnuplot failed for {what}: {p.stderr.strip()[:2000]}")
        return False
    return True


# ------------------------------------------------------------------ celery

class CeleryWorker:
    """A Celery 5 prefork worker (bench/celery_bench.py) on the private
    broker: concurrency N, acks_late, prefetch multiplier 1, its own
    priority queue.  env: extra CELERY_BENCH_* settings for the tasks."""

    def __init__(self, ot, concurrency=8, env=None, logdir=None):
        self.ot = ot
        self.queue = "celery-bench-" + uuid.uuid4().hex[:8]
        self.env = dict(os.environ)
        self.env.update({"CELERY_BENCH_QUEUE": self.queue,
                         "CELERY_BENCH_BROKER": celery_broker_url(),
                         "PYTHONPATH": HERE})
        self.env.update({k: str(v) for k, v in (env or {}).items()})
        self.concurrency = concurrency
        self.logdir = logdir or tempfile.mkdtemp(prefix="celery-bench-")
        self.proc = None

    def start(self, timeout=60):
        os.environ.update({"CELERY_BENCH_QUEUE": self.queue,
                           "CELERY_BENCH_BROKER": celery_broker_url()})
        self.log = open(os.path.join(self.logdir, "worker.log"), "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "celery_bench", "worker",
             "--pool", "prefork", "--concurrency", str(self.concurrency),
             "--prefetch-multiplier", "1", "-Q", self.queue, "-n", self.queue + "@%h",
             "--without-gossip", "--without-mingle", "--without-heartbeat",
             "--loglevel", "WARNING"],
            cwd=HERE, env=self.env, stdin=subprocess.DEVNULL, stdout=self.log,
            stderr=subprocess.STDOUT,
            # Own process group (to kill the pool with it) but the same
            # session as occamyd: with autogroup scheduling a session is a
            # scheduling group, and a separate one would give Celery a
            # share of the shared machine occamy does not get.
            preexec_fn=os.setpgrp)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("celery worker exited:\n" + self.tail())
            c = self.ot.queue_counts(self.queue)
            if c is not None and c[1] > 0:
                # the pool children are forked before the consumer starts
                time.sleep(0.5)
                return self
            time.sleep(0.2)
        raise RuntimeError("celery worker did not start consuming:\n" + self.tail())

    def tail(self, n=30):
        try:
            with open(os.path.join(self.logdir, "worker.log"), "rb") as f:
                return "\n".join(f.read().decode("utf-8", "replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self):
        if self.proc and self.proc.poll() is None:
            import signal
            # warm shutdown would wait for running tasks: cold stop the group
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        if self.proc:
            try:
                with self.ot.channel(confirm=False) as ch:
                    ch.queue_delete(self.queue)
            except Exception:
                pass

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def celery_broker_url():
    # amqp://guest:guest@127.0.0.1:PORT/  ->  kombu wants vhost "/" as "//"
    uri = os.environ["OCCAMY_TEST_AMQP_URI"]
    return uri.rstrip("/") + "//"


def stopwatch():
    t0 = time.monotonic()
    return lambda: time.monotonic() - t0


_lock = threading.Lock()


def log(*args):
    with _lock:
        print(*args, flush=True)
