"""occamy_test - helpers for occamy's integration tests.

Run by tests/run with /usr/bin/python3 (Debian's python3-pika) against a
private broker (tests/broker) whose URI is in OCCAMY_TEST_AMQP_URI.  A test
file defines functions test_* and ends with

    if __name__ == "__main__":
        run_tests(globals())

which runs them in definition order and prints TAP (`python3 test_x.py
test_a test_b` runs only those).  A typical test:

    def test_echo():
        with Daemon(plugins=["echo"], slots=2) as d:   # started, consuming
            r = rpc(d, "echo", b"hi")
            assert r.body == b"hi", r
            d.wait_log(r"task .* done")
            assert d.stop() == 0

Every Daemon gets its own queue and exchange names (d.names), so tests do not
see each other's messages; pass names=d.names to let a second daemon share
them.  Timeouts are multiplied by SCALE under sanitizers.
"""

import contextlib
import ctypes
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import uuid

import pika

ROOT = os.environ.get("OCCAMY_ROOT") or os.path.abspath(
    os.path.join(os.path.dirname(__file__), "..", ".."))
BUILD = os.environ.get("OCCAMY_BUILD") or os.path.join(ROOT, "build")
OCCAMYD = os.path.join(BUILD, "occamyd")
AMQP_URI = os.environ.get("OCCAMY_TEST_AMQP_URI", "amqp://guest:guest@127.0.0.1:5672/")
TSPLIB = os.path.join(os.path.dirname(ROOT), "shared", "data", "tsplib")
SANITIZER = os.environ.get("OCCAMY_SANITIZER", "")
SCALE = {"asan": 2, "tsan": 4, "valgrind": 10}.get(SANITIZER, 1)
# A command to run occamyd under, e.g. valgrind (`make valgrind`).
WRAPPER = os.environ.get("OCCAMY_TEST_WRAPPER", "")
TEST_TIMEOUT = float(os.environ.get("OCCAMY_TEST_CASE_TIMEOUT", 120)) * SCALE

HEADER_TASK_ID = "task-id"
HEADER_HANDLER = "handler"

# occamy.ini keys (as in daemon/config.h) by section; keyword arguments of
# Daemon() go to the section that has them.
SECTION_KEYS = {
    "server": """slots expansion_period_ms expansion_slot_buffer kill_timeout_ms
        shutdown_grace_s header_task_id header_handler default_handler
        external_queue_max external_ttl_s plugin_dir helper_priority state_dir
        crash_limit""".split(),
    "amqp": """uri password_file heartbeat_s tls_ca tls_cert tls_key
        tls_verify_peer tls_verify_hostname request_queue request_exchange
        control_exchange dead_letter_exchange dead_letter_queue queue_type
        prefetch delivery_limit retry_delay_ms retry_delay_max_ms""".split(),
    "metrics": "listen window sample_s".split(),
}
_SECTION_OF = {k: s for s, keys in SECTION_KEYS.items() for k in keys}
# [metrics] keys are short in the file; as keywords they carry the prefix.
_SECTION_OF.update({"metrics_" + k: "metrics" for k in SECTION_KEYS["metrics"]})
NAME_KEYS = ("request_queue", "request_exchange", "control_exchange",
             "dead_letter_exchange", "dead_letter_queue")
DEFAULT_NAMES = {"request_queue": "occamy.requests", "request_exchange": "occamy.requests",
                 "control_exchange": "occamy.control", "dead_letter_exchange": "occamy.dead",
                 "dead_letter_queue": "occamy.dead"}  # occamyd's, for keys left out

SANITIZER_REPORT = re.compile(
    r"ERROR: (Address|Leak|Memory|UndefinedBehavior)Sanitizer|"
    r"WARNING: ThreadSanitizer|ThreadSanitizer: reported|runtime error: ")


# ----------------------------------------------------------------- TAP runner

class Skip(Exception):
    """Raised (via skip()) to skip the current test."""


class TestTimeout(Exception):
    pass


def skip(reason):
    raise Skip(reason)


def timeout(seconds):
    """Decorator: this test may take `seconds` (times SCALE) instead of the
    default OCCAMY_TEST_CASE_TIMEOUT."""
    def mark(fn):
        fn.timeout = seconds * SCALE
        return fn
    return mark


def note(*lines):
    """Print diagnostics as TAP comments."""
    for text in lines:
        for line in str(text).splitlines() or [""]:
            print("# " + line, flush=True)


def _on_alarm(signum, frame):
    raise TestTimeout("test did not finish in time")


def run_tests(g, argv=None):
    """Run every function test_* of the module dict g, in definition order,
    as TAP.  Exits with 0 if all passed."""
    argv = sys.argv[1:] if argv is None else argv
    tests = [(n, f) for n, f in g.items()
             if n.startswith("test_") and callable(f)
             and getattr(f, "__module__", None) == g.get("__name__")
             and (not argv or n in argv)]
    signal.signal(signal.SIGALRM, _on_alarm)
    failed = 0
    for i, (name, fn) in enumerate(tests, 1):
        limit = getattr(fn, "timeout", TEST_TIMEOUT)
        signal.setitimer(signal.ITIMER_REAL, limit)
        t0 = time.monotonic()
        try:
            fn()
        except Skip as e:
            print(f"ok {i} - {name} # SKIP {e}", flush=True)
            continue
        except (KeyboardInterrupt, SystemExit):
            print(f"not ok {i} - {name} # interrupted", flush=True)
            raise
        except BaseException as e:  # noqa: B902 - report everything
            failed += 1
            print(f"not ok {i} - {name}", flush=True)
            if isinstance(e, TestTimeout):
                note(f"timed out after {limit:.0f}s")
            elif isinstance(e, AssertionError):
                note(f"assertion failed: {e}")
            else:
                note(f"{type(e).__name__}: {e}")
            note("Traceback (most recent call last):\n"
                 + "".join(traceback.format_tb(e.__traceback__)))
            continue
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        print(f"ok {i} - {name} ({time.monotonic() - t0:.1f}s)", flush=True)
    print(f"1..{len(tests)}", flush=True)
    sys.exit(1 if failed else 0)


def _on_signal(signum, frame):
    # Ctrl-C, or SIGTERM from tests/run's timeout: unwind so that context
    # managers stop the daemons, and let no second signal cut that short.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


signal.signal(signal.SIGINT, _on_signal)
signal.signal(signal.SIGTERM, _on_signal)


# ------------------------------------------------------------------- general

def wait_until(pred, timeout=10, interval=0.05, what=None):
    """Poll pred() until it returns something true (returned); timeout is
    scaled by SCALE.  Raises AssertionError."""
    deadline = time.monotonic() + timeout * SCALE
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout * SCALE}s waiting for "
                                 f"{what or getattr(pred, '__name__', 'condition')}")
        time.sleep(interval)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def plugin_path(name):
    """Absolute path of plugin NAME: an example plugin (BUILD/plugins) or a
    test plugin (BUILD/tests/plugins)."""
    for d in ("plugins", "tests/plugins"):
        p = os.path.join(BUILD, d, name + ".so")
        if os.path.exists(p):
            return p
    return os.path.join(BUILD, "plugins", name + ".so")


def new_names():
    """Fresh queue/exchange names for one test setup."""
    t = "t" + uuid.uuid4().hex[:10]
    return {"request_queue": f"{t}.req", "request_exchange": f"{t}.req.x",
            "control_exchange": f"{t}.ctl", "dead_letter_exchange": f"{t}.dead.x",
            "dead_letter_queue": f"{t}.dead"}


def _ini_value(v):
    if isinstance(v, bool):
        return "yes" if v else "no"
    return str(v)


def _prctl_pdeathsig():
    # The daemon dies with the test process, whatever happens to it.
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


# -------------------------------------------------------------------- daemon

class Daemon:
    """One occamyd -f with a generated occamy.ini in a temp dir.

    Daemon(plugins=["echo", "sleep"] or {"tsp": {"threads": 2}},
           slots=2, prefetch=4, metrics_listen="127.0.0.1:0", ...
                                         # keys of SECTION_KEYS
           server={...}, amqp={...}, metrics={...},  # raw section entries
           names=other.names,            # share queues with another daemon
           config=None,                  # full ini text instead (any test)
           args=[], env={}, ready=True)
    A value None leaves the key out.  `with Daemon(...) as d` starts it and,
    if ready, waits until it consumes; on leaving it is killed if still
    running, its log tail is printed on failure, and a sanitizer report in the
    log fails the test.
    """

    def __init__(self, plugins=None, *, names=None, server=None, amqp=None,
                 metrics=None, config=None, args=(), env=None, ready=True, **keys):
        self.names = dict(names) if names else new_names()
        sections = {
            "server": {"plugin_dir": os.path.join(BUILD, "plugins")},
            "amqp": {"uri": AMQP_URI, **{k: self.names[k] for k in NAME_KEYS}},
            "metrics": {},
        }
        for k, v in keys.items():
            if k not in _SECTION_OF:
                raise TypeError(f"Daemon(): unknown occamy.ini key {k!r}")
            s = _SECTION_OF[k]
            sections[s][k[len("metrics_"):] if k.startswith("metrics_") else k] = v
        for s, extra in (("server", server), ("amqp", amqp), ("metrics", metrics)):
            sections[s].update(extra or {})
        for k in NAME_KEYS:
            self.names[k] = sections["amqp"].get(k, self.names[k]) or DEFAULT_NAMES[k]
        self.names["header_task_id"] = sections["server"].get("header_task_id") or HEADER_TASK_ID
        self.names["header_handler"] = sections["server"].get("header_handler") or HEADER_HANDLER
        if isinstance(plugins, (list, tuple)):
            plugins = {p: {} for p in plugins}

        self.dir = tempfile.mkdtemp(prefix="occamy-test-")
        # Its own record keeping, never the machine's /var/lib/occamy.
        sections["server"].setdefault("state_dir", os.path.join(self.dir, "state"))
        self.ini = os.path.join(self.dir, "occamy.ini")
        self.logfile = os.path.join(self.dir, "occamyd.log")
        if config is None:
            out = []
            for s, kv in sections.items():
                kv = {k: v for k, v in kv.items() if v is not None}
                if kv or s != "metrics":
                    out.append(f"[{s}]")
                    out += [f"{k} = {_ini_value(v)}" for k, v in kv.items()]
                    out.append("")
            for name, opts in (plugins or {}).items():
                opts = dict(opts or {})
                opts.setdefault("path", plugin_path(name))
                out.append(f"[plugin {name}]")
                out += [f"{k} = {_ini_value(v)}" for k, v in opts.items() if v is not None]
                out.append("")
            config = "\n".join(out)
        with open(self.ini, "w") as f:
            f.write(config)
        self.args = list(args)
        self.env = dict(os.environ)
        self.env.pop("NOTIFY_SOCKET", None)
        for k, v in (env or {}).items():
            if v is None:
                self.env.pop(k, None)
            else:
                self.env[k] = str(v)
        self.ready = ready
        self.proc = None
        self._log_cache = None

    # -- process
    def start(self, wait=None):
        """Start occamyd -f -c INI; with wait (default: ready=) return once
        it consumes from its request queue."""
        if not os.access(OCCAMYD, os.X_OK):
            raise AssertionError(f"{OCCAMYD} is not built")
        wait = self.ready if wait is None else wait
        before = (queue_counts(self.names["request_queue"]) or (0, 0))[1] if wait else 0
        with open(self.logfile, "ab") as log:
            self.proc = subprocess.Popen(
                shlex.split(WRAPPER) + [OCCAMYD, "-f", "-c", self.ini] + self.args,
                stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.dir,
                preexec_fn=_prctl_pdeathsig)
        if wait:
            self.wait_ready(consumers_before=before)
        return self

    def wait_ready(self, timeout=20, consumers_before=0):
        """Wait until the request queue has more than consumers_before
        consumers."""
        def consuming():
            self._check_alive("before consuming")
            c = queue_counts(self.names["request_queue"])
            return c is not None and c[1] > consumers_before
        wait_until(consuming, timeout, 0.1, "occamyd to consume " + self.names["request_queue"])

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    @property
    def running(self):
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self):
        return self.proc.poll() if self.proc else None

    def send_signal(self, sig):
        self.proc.send_signal(sig)

    def wait_exit(self, timeout=30):
        """Wait for the process to exit by itself; return its exit code
        (negative: killed by that signal)."""
        try:
            return self.proc.wait(timeout * SCALE)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"occamyd did not exit within {timeout * SCALE}s\n"
                                 + self.log_tail()) from None

    def stop(self, sig=signal.SIGTERM, timeout=30, check_sanitizer=True):
        """Send sig, wait for the exit, return the exit code (negative =
        killed by a signal).  Kills it and fails if it does not exit."""
        if self.running:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout * SCALE)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"occamyd ignored signal {sig} for "
                                     f"{timeout * SCALE}s\n" + self.log_tail()) from None
        if check_sanitizer:
            self.check_sanitizer()
        return self.proc.returncode

    def kill(self):
        if self.running:
            self.proc.kill()
        if self.proc:
            self.proc.wait()

    def _check_alive(self, what):
        if self.proc and self.proc.poll() is not None:
            raise AssertionError(f"occamyd exited ({self.proc.returncode}) {what}\n"
                                 + self.log_tail())

    # -- log
    def log(self):
        if self._log_cache is not None:
            return self._log_cache
        try:
            with open(self.logfile, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def log_size(self):
        """A position for wait_log(after=) to only see later lines."""
        return len(self.log())

    def log_tail(self, n=40):
        lines = self.log().splitlines()[-n:]
        return "occamyd log (last %d lines):\n" % len(lines) + "\n".join("  " + l for l in lines)

    def wait_log(self, regex, timeout=10, after=0):
        """Wait until the log (from position after) matches regex; returns
        the match.  Fails early if the process exits without it."""
        rx = re.compile(regex, re.M)
        deadline = time.monotonic() + timeout * SCALE
        while True:
            exited = not self.running
            m = rx.search(self.log(), after)
            if m:
                return m
            if exited or time.monotonic() >= deadline:
                why = "occamyd exited" if exited else f"{timeout * SCALE}s passed"
                raise AssertionError(f"log never matched {regex!r} ({why})\n" + self.log_tail())
            time.sleep(0.05)

    def sanitizer_report(self):
        m = SANITIZER_REPORT.search(self.log())
        return self.log()[max(0, m.start() - 200):m.start() + 4000] if m else None

    def check_sanitizer(self):
        r = self.sanitizer_report()
        if r:
            raise AssertionError("sanitizer report in the occamyd log:\n" + r)

    def close(self):
        """Kill it if running and remove its directory (what leaving a
        `with` block does)."""
        self.__exit__(None, None, None)

    # -- context manager
    def __enter__(self):
        if self.proc is None:
            try:
                self.start()
            except BaseException:
                self.__exit__(*sys.exc_info())
                raise
        return self

    def __exit__(self, exc_type, exc, tb):
        self.kill()
        self._log_cache = self.log()
        shutil.rmtree(self.dir, ignore_errors=True)
        if exc_type is not None and "occamyd log (" not in str(exc):
            note(self.log_tail())
        else:
            self.check_sanitizer()
        return False


# ---------------------------------------------------------------------- AMQP

def connect():
    return pika.BlockingConnection(pika.URLParameters(AMQP_URI))


@contextlib.contextmanager
def channel(confirm=True):
    """A channel (publisher confirms on) on a fresh connection."""
    conn = connect()
    try:
        ch = conn.channel()
        if confirm:
            ch.confirm_delivery()
        yield ch
    finally:
        if conn.is_open:
            conn.close()


def _names(target):
    if isinstance(target, Daemon):
        return target.names
    if isinstance(target, dict):
        return target
    raise TypeError("expected a Daemon or a names dict")


def _queue(target, key="request_queue"):
    return target if isinstance(target, str) else _names(target)[key]


def _body(body):
    if isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode()
    return json.dumps(body).encode()


class Reply:
    """A received message: headers (dict), body (bytes), properties."""

    def __init__(self, props, body):
        self.properties = props
        self.headers = dict(props.headers or {})
        self.body = body

    @property
    def text(self):
        return self.body.decode("utf-8", "replace")

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return f"Reply(headers={self.headers!r}, body={self.body[:200]!r})"


def publish_request(target, handler, body=b"", headers=None, reply_to=None,
                    correlation_id=None, persistent=True, task_id=None, ch=None,
                    mandatory=True):
    """Publish a request for handler (None: no handler header) to the
    request exchange, routing key = request queue.  body: bytes, str or
    anything JSON.  Fails if the broker does not route or confirm it."""
    if ch is None:
        with channel() as c:
            return publish_request(target, handler, body, headers, reply_to,
                                   correlation_id, persistent, task_id, c, mandatory)
    n = _names(target)
    h = {}
    if handler is not None:
        h[n.get("header_handler", HEADER_HANDLER)] = handler
    if task_id is not None:
        h[n.get("header_task_id", HEADER_TASK_ID)] = task_id
    h.update(headers or {})
    props = pika.BasicProperties(headers=h or None, reply_to=reply_to,
                                 correlation_id=correlation_id,
                                 delivery_mode=2 if persistent else 1)
    ch.basic_publish(n["request_exchange"], n["request_queue"], _body(body), props,
                     mandatory=mandatory)


def publish_control(target, task_id=None, body=b"", headers=None, handler=None, ch=None):
    """Publish to the control exchange (fanout): with task_id, to the running
    tasks with that ID; without, a help request for handler."""
    if ch is None:
        with channel() as c:
            return publish_control(target, task_id, body, headers, handler, c)
    n = _names(target)
    h = {}
    if task_id is not None:
        h[n.get("header_task_id", HEADER_TASK_ID)] = task_id
    if handler is not None:
        h[n.get("header_handler", HEADER_HANDLER)] = handler
    h.update(headers or {})
    ch.basic_publish(n["control_exchange"], "", _body(body),
                     pika.BasicProperties(headers=h or None, delivery_mode=1))


class ReplyQueue:
    """An exclusive server-named queue to collect replies:

        with ReplyQueue() as rq:
            publish_request(d, "echo", b"x", reply_to=rq.name, correlation_id="1")
            r = rq.get(timeout=10)
    """

    def __init__(self):
        self.conn = connect()
        self.ch = self.conn.channel()
        self.name = self.ch.queue_declare("", exclusive=True, auto_delete=True).method.queue
        self.received = []
        self.ch.basic_consume(self.name, lambda ch, m, p, b: self.received.append(Reply(p, b)),
                              auto_ack=True)

    def get(self, timeout=30, correlation_id=None):
        """The next reply (with that correlation_id, if given)."""
        deadline = time.monotonic() + timeout * SCALE
        while True:
            for i, r in enumerate(self.received):
                if correlation_id is None or r.properties.correlation_id == correlation_id:
                    return self.received.pop(i)
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no reply on {self.name} within {timeout * SCALE}s")
            self.conn.process_data_events(time_limit=min(left, 0.2))

    def collect(self, n, timeout=30):
        """n replies (in arrival order)."""
        deadline = time.monotonic() + timeout * SCALE
        out = []
        while len(out) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{len(out)} of {n} replies within {timeout * SCALE}s")
            out.append(self.get(left / SCALE))
        return out

    def close(self):
        if self.conn.is_open:
            self.conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def rpc(target, handler, body=b"", headers=None, timeout=30, task_id=None, persistent=True):
    """Publish a request with a temporary reply queue and return the Reply."""
    cid = uuid.uuid4().hex
    with ReplyQueue() as rq:
        publish_request(target, handler, body, headers, reply_to=rq.name,
                        correlation_id=cid, persistent=persistent, task_id=task_id)
        return rq.get(timeout, correlation_id=cid)


def queue_counts(name):
    """(messages, consumers) of queue name (or a Daemon's request queue);
    None if it does not exist."""
    name = _queue(name)
    conn = connect()
    try:
        ok = conn.channel().queue_declare(name, passive=True)
        return ok.method.message_count, ok.method.consumer_count
    except pika.exceptions.ChannelClosedByBroker as e:
        if e.reply_code == 404:
            return None
        raise
    finally:
        if conn.is_open:
            conn.close()


def get_messages(queue, min_count=0, timeout=10):
    """Drain queue (basic.get + ack); wait up to timeout for at least
    min_count messages.  Returns [Reply]."""
    out = []
    deadline = time.monotonic() + timeout * SCALE
    conn = connect()
    try:
        ch = conn.channel()
        while True:
            method, props, body = ch.basic_get(queue, auto_ack=True)
            if method:
                out.append(Reply(props, body))
                continue
            if len(out) >= min_count or time.monotonic() >= deadline:
                return out
            time.sleep(0.05)
    except pika.exceptions.ChannelClosedByBroker as e:
        raise AssertionError(f"queue {queue}: {e}") from None
    finally:
        if conn.is_open:
            conn.close()


def get_dead_letters(target, min_count=0, timeout=10):
    """Drain the dead-letter queue (of a Daemon, names dict, or a queue
    name): [(headers, body)]."""
    return [(r.headers, r.body)
            for r in get_messages(_queue(target, "dead_letter_queue"), min_count, timeout)]


# -------------------------------------------------------------------- broker

def broker_ctl(*args, timeout=120):
    """rabbitmqctl -n NODE ARGS against the test broker; returns stdout."""
    if not os.environ.get("OCCAMY_TEST_BROKER_NODE"):
        raise AssertionError("no private broker (run via tests/run or tests/broker run)")
    p = subprocess.run([os.path.join(ROOT, "tests", "broker"), "ctl", *map(str, args)],
                       capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        raise AssertionError(f"rabbitmqctl {' '.join(map(str, args))} failed "
                             f"({p.returncode}): {p.stderr.strip()} {p.stdout.strip()}")
    return p.stdout


def broker_restart(timeout=180):
    """Restart the broker application in place (stop_app + start_app);
    returns once it accepts AMQP again.  Connections are dropped."""
    if not os.environ.get("OCCAMY_TEST_BROKER_NODE"):
        raise AssertionError("no private broker (run via tests/run or tests/broker run)")
    subprocess.run([os.path.join(ROOT, "tests", "broker"), "restart"], check=True,
                   timeout=timeout, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)


# ------------------------------------------------------------------ metrics

def scrape_metrics(port):
    """The daemon's /metrics as {"name{labels}": value}."""
    import urllib.request
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10 * SCALE) as r:
        text = r.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def transport_totals(daemon):
    """The "AMQP totals" line occamyd logs at exit, as a dict."""
    m = re.findall(r"AMQP totals: (\d+) requests, (\d+) control messages, (\d+) acks, "
                   r"(\d+) requeues, (\d+) retries, (\d+) dead letters, (\d+) reconnects",
                   daemon.log())
    if not m:
        raise AssertionError("no 'AMQP totals' line in the log\n" + daemon.log_tail())
    keys = ("requests", "control", "acks", "requeues", "retries", "dead_letters", "reconnects")
    return dict(zip(keys, map(int, m[-1])))


# -------------------------------------------------------------------- proxy

class FaultProxy:
    """A fault-injecting TCP proxy on 127.0.0.1 in front of the test broker:

        with FaultProxy() as px, Daemon(..., uri=px.uri) as d:
            px.stall_down(after=100)  # broker->client: pass 100 more bytes, then hold
            px.resume()               # pass what was held, and the rest
            px.stall_up()             # client->broker: hold everything
            px.cut()                  # close every proxied connection (held bytes are lost)

    Unless stall_up() is on, bytes from the client pass (so a daemon's acks
    and publishes reach the broker while its reads are stalled)."""

    def __init__(self):
        import select as _select
        import threading
        import urllib.parse
        self._select = _select
        u = urllib.parse.urlsplit(AMQP_URI)
        self.upstream = (u.hostname or "127.0.0.1", u.port or 5672)
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(16)
        self.port = self.lsock.getsockname()[1]
        self.uri = f"amqp://{u.username}:{u.password}@127.0.0.1:{self.port}{u.path or '/'}"
        self.pairs = []        # [client, upstream, held bytes for client]
        self.down_budget = None  # None: pass all; n: pass n more bytes, then hold
        self.up_held = False     # client->broker bytes held
        self.connections = 0
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._closed:
            with self._lock:
                socks = [self.lsock] + [s for p in self.pairs for s in p[:2]]
            try:
                r, _, _ = self._select.select(socks, [], [], 0.02)
            except (OSError, ValueError):
                continue
            with self._lock:
                for s in r:
                    if s is self.lsock:
                        try:
                            c, _ = s.accept()
                            up = socket.create_connection(self.upstream, timeout=10)
                        except OSError:
                            continue
                        self.pairs.append([c, up, b""])
                        self.connections += 1
                        continue
                    pair = next((p for p in self.pairs if s in p[:2]), None)
                    if pair is None:
                        continue
                    try:
                        data = s.recv(65536)
                    except OSError:
                        data = b""
                    if not data:
                        self._drop(pair)
                        continue
                    try:
                        if s is pair[0] and self.up_held:
                            pass  # held, then lost with the connection
                        elif s is pair[0]:
                            pair[1].sendall(data)
                        else:
                            self._down(pair, data)
                    except OSError:
                        self._drop(pair)

    def _down(self, pair, data):
        if self.down_budget is None:
            pair[0].sendall(data)
            return
        n = min(self.down_budget, len(data))
        if n:
            pair[0].sendall(data[:n])
            self.down_budget -= n
        pair[2] += data[n:]

    def _drop(self, pair):
        for s in pair[:2]:
            try:
                s.close()
            except OSError:
                pass
        if pair in self.pairs:
            self.pairs.remove(pair)

    def stall_down(self, after=0):
        with self._lock:
            self.down_budget = after

    def stall_up(self, on=True):
        with self._lock:
            self.up_held = on

    def resume(self):
        with self._lock:
            self.down_budget = None
            self.up_held = False
            for p in list(self.pairs):
                if p[2]:
                    try:
                        p[0].sendall(p[2])
                    except OSError:
                        self._drop(p)
                        continue
                    p[2] = b""

    def held(self):
        with self._lock:
            return sum(len(p[2]) for p in self.pairs)

    def cut(self):
        with self._lock:
            for p in list(self.pairs):
                self._drop(p)

    def close(self):
        self._closed = True
        self._thread.join(5)
        self.cut()
        self.lsock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
