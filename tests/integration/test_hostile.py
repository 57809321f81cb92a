"""Hostile input: malformed messages, secrets, TLS.

Each test proves that occamyd survives input built to hurt it, answers it
the right way, and keeps its secrets:

- a corpus of malformed requests and control messages (missing, unknown or
  non-string handlers; non-string, empty, NUL-bearing and huge task IDs;
  1000 headers; tables nested 50 and 10000 deep; oversized header strings;
  invalid UTF-8 in header keys and values; binary and empty bodies; forged
  x-occamy-error; unroutable reply_to) gets exactly the expected outcome,
  each matched by correlation id: a valid reply, or a dead letter whose
  x-occamy-error names the reason; and the daemon keeps serving;
- an 8 MiB body makes the round trip byte for byte; a 1 MiB header never
  reaches the daemon (the broker refuses frames over frame_max);
- the broker password (password_file, or inline in the URI) never appears in
  the log (even at -v), in `occamyd -t` output, in the metrics scrape or in
  the status command's answer; a world-readable password file is warned
  about; an [amqp] uri that rabbitmq-c cannot parse is a configuration error;
- TLS: against a second private broker with a TLS listener and a throwaway
  CA, occamyd with the right tls_ca serves; with a wrong CA or a host name
  the certificate does not name, it refuses with one clear log line and
  never consumes.
"""

import datetime
import decimal
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid

import pika

sys.path.insert(0, os.path.dirname(__file__))
from occamy_test import (OCCAMYD, ROOT, SCALE, Daemon, ReplyQueue, broker_ctl,  # noqa: E402
                         channel, free_port, get_dead_letters, note, publish_request,
                         queue_counts, rpc, run_tests, skip, timeout, wait_until)


# ------------------------------------------------------------------ helpers

class RawStr(str):
    """A header value pika sends as an AMQP long string ('S') with exactly
    these bytes, valid UTF-8 or not (pika calls value.encode('utf-8'))."""

    def __new__(cls, raw):
        s = str.__new__(cls, raw.decode("latin-1"))
        s.raw = raw
        return s

    def encode(self, *args, **kwargs):
        return self.raw


def nested(depth):
    t = {"leaf": "bottom"}
    for _ in range(depth):
        t = {"n": t}
    return t


def scrape(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10 * SCALE) as r:
        return r.read().decode()


def metric(text, name):
    m = re.search(r"^" + re.escape(name) + r" ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else None


def _text(v):
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


def publish_raw(ch, exchange, routing_key, body, headers=None, correlation_id=None,
                reply_to=None, expiration=None):
    ch.basic_publish(exchange, routing_key, body,
                     pika.BasicProperties(headers=headers, correlation_id=correlation_id,
                                          reply_to=reply_to, expiration=expiration,
                                          delivery_mode=2))


def amqp_port():
    port = os.environ.get("OCCAMY_TEST_AMQP_PORT")
    if not port:
        skip("no private broker port (run via tests/run or tests/broker run)")
    return int(port)


def run_check(ini):
    """occamyd -t -c INI: (exit code, stdout + stderr)."""
    p = subprocess.run([OCCAMYD, "-t", "-c", ini], capture_output=True, text=True,
                       timeout=30 * SCALE, stdin=subprocess.DEVNULL)
    return p.returncode, p.stdout + p.stderr


class BrokerUser:
    """A broker user with a distinctive password, removed afterwards."""

    def __init__(self):
        self.name = "occamy-" + uuid.uuid4().hex[:8]
        self.password = "Pw-" + uuid.uuid4().hex + "-never-log-me"

    def __enter__(self):
        broker_ctl("add_user", self.name, self.password)
        broker_ctl("set_permissions", "-p", "/", self.name, ".*", ".*", ".*")
        return self

    def __exit__(self, *exc):
        try:
            broker_ctl("delete_user", self.name)
        except AssertionError as e:
            note(f"could not delete user {self.name}: {e}")


# ------------------------------------------------------------ the corpus

# Each entry: (name, target, handler or None, headers, body, expected)
#   target:   "req" (request exchange) or "ctl" (control exchange)
#   expected: ("reply", body) | ("dead", regex on x-occamy-error) | ("ack",)
# "ack" means: settled without a reply and without a dead letter.
H = "handler"
T = "task-id"
BINARY = bytes(range(256)) * 16


def corpus():
    big_id_ok = "i" * 60000            # under the transport's 65536 limit
    big_id_too_large = "j" * 70000     # over it
    return [
        # -- handler header
        ("no handler", "req", None, {}, b"x", ("dead", r"no 'handler' header")),
        ("unknown handler", "req", "nosuch", {}, b"x", ("dead", r"unknown handler 'nosuch'")),
        ("int handler", "req", None, {H: 7}, b"x", ("dead", r"header 'handler' is not a short string")),
        ("bytes handler", "req", None, {H: b"noop"}, b"x", ("dead", r"not a short string")),
        ("table handler", "req", None, {H: {"noop": 1}}, b"x", ("dead", r"not a short string")),
        ("long handler", "req", None, {H: "n" * 200}, b"x", ("dead", r"not a short string")),
        ("NUL in handler", "req", None, {H: "noop\x00evil"}, b"x", ("dead", r"not a short string")),
        ("invalid UTF-8 handler", "req", None, {H: RawStr(b"no\xffop")}, b"x",
         ("dead", r"unknown handler")),
        # -- task IDs of requests (noop takes a string of 1..255 bytes or an integer)
        ("int task-id", "req", "noop", {T: 42}, b"int id", ("reply", b"int id")),
        ("int64 task-id", "req", "noop", {T: 2**63 - 1}, b"max id", ("reply", b"max id")),
        ("decimal task-id", "req", "noop", {T: decimal.Decimal("1.5")}, b"x", ("dead", r"task-id header must be")),
        ("timestamp task-id", "req", "noop", {T: datetime.datetime(2030, 1, 1)}, b"ts id",
         ("reply", b"ts id")),  # an integer to the plugins
        ("bool task-id", "req", "noop", {T: True}, b"x", ("dead", r"task-id header must be")),
        ("table task-id", "req", "noop", {T: {"a": "b"}}, b"x", ("dead", r"task-id header must be")),
        ("array task-id", "req", "noop", {T: ["a", 1]}, b"x", ("dead", r"task-id header must be")),
        ("void task-id", "req", "noop", {T: None}, b"x", ("dead", r"task-id header must be")),
        ("empty task-id", "req", "noop", {T: ""}, b"x", ("dead", r"task-id header must be")),
        ("NUL task-id", "req", "noop", {T: "a\x00b"}, b"x", ("dead", r"task-id header must be")),
        ("60000-byte task-id", "req", "noop", {T: big_id_ok}, b"x",
         ("dead", r"task-id header must be")),
        ("70000-byte task-id", "req", "noop", {T: big_id_too_large}, b"x",
         ("dead", r"header 'task-id' too large \(70000 > 65536")),
        # -- header tables
        ("1000 headers", "req", "noop", {f"h{i}": "v" for i in range(1000)}, b"x",
         ("dead", r"too many headers \(1001 > 256\)")),
        ("256 headers", "req", "noop", {f"h{i}": i for i in range(255)}, b"256", ("reply", b"256")),
        ("257 headers", "req", "noop", {f"h{i}": i for i in range(256)}, b"x",
         ("dead", r"too many headers \(257 > 256\)")),
        ("nested 50 deep", "req", "noop", {"deep": nested(50)}, b"deep50", ("reply", b"deep50")),
        ("nested 10000 deep", "req", "noop", {"deep": nested(10000)}, b"deep10k",
         ("reply", b"deep10k")),
        ("nested 10000 deep, refused", "req", "nosuch", {"deep": nested(10000)}, b"x",
         ("dead", r"unknown handler")),
        ("100 KB header string", "req", "noop", {"big": "b" * 100000}, b"x",
         ("dead", r"header 'big' too large \(100000 > 65536")),
        ("invalid UTF-8 value", "req", "noop", {"bad": RawStr(b"\xff\xfe\xc3(")}, b"utf",
         ("reply", b"utf")),
        ("invalid UTF-8 key", "req", "noop", {b"\xff\xfekey": "v"}, b"key", ("reply", b"key")),
        ("every field kind", "req", "noop",
         {"arr": [1, "two", {"three": 3}], "bin": b"\x00\xff", "none": None, "neg": -1,
          "big": 2**62, "dec": decimal.Decimal("-2.5"), "t": False,
          "ts": datetime.datetime(2030, 1, 1)}, b"kinds", ("reply", b"kinds")),
        ("forged x-occamy-error, valid", "req", "noop",
         {"x-occamy-error": "forged", "x-occamy-handler-outcome": "forged"}, b"forged",
         ("reply", b"forged")),
        ("forged x-occamy-error, invalid", "req", "nosuch",
         {"x-occamy-error": "forged", "x-occamy-handler-outcome": "forged"}, b"x",
         ("dead", r"^invalid_task: unknown handler 'nosuch'$")),
        # -- bodies
        ("binary body", "req", "noop", {}, BINARY, ("reply", BINARY)),
        ("empty body", "req", "noop", {}, b"", ("reply", b"")),
        ("binary body for a text plugin", "req", "fail", {}, b"\x00\xff" * 100,
         ("dead", r"fail: body must be one of")),
        ("binary body for sleep", "req", "sleep", {}, b"\xff10", ("dead", r"invalid_body")),
        # -- control messages with a task ID
        ("ctl decimal task-id", "ctl", None, {T: decimal.Decimal("1.5")}, b"x", ("dead", r"task ID header is not a string")),
        ("ctl bytes task-id", "ctl", None, {T: b"t-1"}, b"x", ("dead", r"not a string")),
        ("ctl table task-id", "ctl", None, {T: {"a": 1}}, b"x", ("dead", r"not a string")),
        ("ctl NUL task-id", "ctl", None, {T: "t\x001"}, b"x", ("dead", r"not a string")),
        ("ctl empty task-id", "ctl", None, {T: ""}, b"x", ("ack",)),
        ("ctl 60000-byte task-id", "ctl", None, {T: big_id_ok}, BINARY, ("ack",)),
        ("ctl 70000-byte task-id", "ctl", None, {T: big_id_too_large}, b"x",
         ("dead", r"header 'task-id' too large")),
        ("ctl 1000 headers", "ctl", None, {T: "t-1", **{f"h{i}": i for i in range(999)}}, b"x",
         ("dead", r"too many headers")),
        ("ctl nested 10000 deep", "ctl", None, {T: "t-1", "deep": nested(10000)}, b"x", ("ack",)),
        ("ctl invalid UTF-8 task-id", "ctl", None, {T: RawStr(b"\xc3\x28")}, b"x", ("ack",)),
        # -- help requests (control without a task ID)
        ("help, no handler", "ctl", None, {}, b"x", ("dead", r"no 'handler' header")),
        ("help, unknown handler", "ctl", "nosuch", {}, b"x", ("dead", r"unknown handler")),
        ("help, int handler", "ctl", None, {H: 3}, b"x", ("dead", r"not a short string")),
        ("help, binary body", "ctl", "noop", {}, BINARY, ("ack",)),
        ("help, bad body", "ctl", "sleep", {}, b"\x00", ("dead", r"invalid_body")),
        # -- daemon commands
        # (a command is answered on reply_to: an unknown one with an empty body)
        ("int command", "ctl", None, {"x-occamy-command": 1}, b"", ("reply", b"")),
        ("unknown command", "ctl", None, {"x-occamy-command": "rm -rf /"}, b"",
         ("reply", b"")),
    ]


@timeout(240)
def test_malformed_corpus_gets_the_right_outcome_and_the_daemon_keeps_serving():
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 100000))  # pika encodes tables recursively
    port = free_port()
    items = corpus()
    with Daemon(["noop", "fail", "sleep"], slots=2, metrics_listen=f"127.0.0.1:{port}") as d, \
            ReplyQueue() as rq:
        n = d.names
        cids, targets = {}, {}
        with channel() as ch:
            for i, (name, target, handler, headers, body, expected) in enumerate(items):
                cid = f"c{i}"
                cids[cid] = (name, expected)
                targets[cid] = target
                h = dict(headers)
                if handler is not None:
                    h[H] = handler
                if target == "req":
                    publish_raw(ch, n["request_exchange"], n["request_queue"], body, h or None,
                                cid, rq.name)
                else:
                    publish_raw(ch, n["control_exchange"], "", body, h or None, cid, rq.name)
            # Replies that no queue takes come back (mandatory): the result
            # goes to the dead-letter queue with the reason, the request is
            # acked, the connection stays up.
            for rt in ("nonexistent-reply-queue-" + uuid.uuid4().hex,
                       "amq.rabbitmq.reply-to.g2dkABNyYWJiaXRAbG9jYWxob3N0AAAAAAAAAAAAAAAA",
                       "r" * 255):
                publish_raw(ch, n["request_exchange"], n["request_queue"], b"lost reply",
                            {H: "noop"}, "unroutable", rt)
            # The status command answers on reply_to.
            publish_raw(ch, n["control_exchange"], "", b"", {"x-occamy-command": "status"},
                        "status", rq.name)

        # A dead-lettered request also answers its reply_to, with an error
        # reply (a control message does not).
        want_replies = {c for c, (_, e) in cids.items()
                        if e[0] == "reply" or (e[0] == "dead" and targets[c] == "req")} | {"status"}
        want_dead = {c for c, (_, e) in cids.items() if e[0] == "dead"}
        replies = {}
        deadline = time.monotonic() + 60 * SCALE
        while not want_replies <= set(replies) and time.monotonic() < deadline:
            r = rq.get(timeout=max(0.1, (deadline - time.monotonic()) / SCALE))
            cid = r.properties.correlation_id
            assert cid not in replies, f"two replies for {cids.get(cid, (cid,))[0]}"
            replies[cid] = r
        dead = {}
        lost_replies = []
        for h, body, props in drain_dead(d, len(want_dead) + 3, 60):
            dead.setdefault(props.correlation_id, []).append(h)
            if props.correlation_id == "unroutable":
                lost_replies.append((h, body))
        # Anything late (a second reply, a dead letter for an 'ack' item)?
        time.sleep(1.0)
        rq.conn.process_data_events(0.5)
        for r in rq.received:
            replies.setdefault(r.properties.correlation_id + "+late", r)
        for h, body, props in drain_dead(d, 0, 0):
            dead.setdefault(props.correlation_id, []).append(h)

        problems = []
        for cid, (name, expected) in cids.items():
            if expected[0] == "reply":
                r = replies.get(cid)
                if r is None:
                    problems.append(f"{name}: no reply")
                elif r.body != expected[1]:
                    problems.append(f"{name}: reply {r.body[:60]!r} != {expected[1][:60]!r}")
                if cid in dead:
                    problems.append(f"{name}: dead-lettered too: {dead[cid]}")
            elif expected[0] == "dead":
                got = dead.get(cid, [])
                if len(got) != 1:
                    problems.append(f"{name}: {len(got)} dead letters, expected 1")
                else:
                    reason = got[0].get("x-occamy-error", "")
                    if isinstance(reason, bytes):
                        reason = reason.decode("utf-8", "replace")
                    if not re.search(expected[1], reason):
                        problems.append(f"{name}: x-occamy-error {reason[:120]!r} !~ {expected[1]!r}")
                    if got[0].get("x-occamy-handler-outcome") not in ("rejected", "refused"):
                        problems.append(f"{name}: x-occamy-handler-outcome "
                                        f"{got[0].get('x-occamy-handler-outcome')!r}")
                r = replies.get(cid)
                if targets[cid] != "req":
                    if r is not None:
                        problems.append(f"{name}: a control message got a reply")
                elif r is None:
                    problems.append(f"{name}: no error reply")
                elif not r.headers.get("x-occamy-status") or \
                        not got or not _text(got[0].get("x-occamy-error")).startswith(
                            _text(r.headers.get("x-occamy-error"))) or \
                        r.json().get("status") != r.headers.get("x-occamy-status"):
                    problems.append(f"{name}: error reply {r.headers!r} {r.body[:120]!r}")
            else:
                if cid in replies or cid in dead:
                    problems.append(f"{name}: expected neither reply nor dead letter, got "
                                    f"{'a reply' if cid in replies else dead[cid]}")
        extra = set(replies) - set(cids) - {"status"}
        if extra:
            problems.append(f"unexpected replies: {sorted(extra)}")
        extra = set(dead) - set(cids) - {"unroutable"}
        if len(lost_replies) != 3 or any(
                b != b"lost reply" or "reply_to unroutable" not in str(h.get("x-occamy-error"))
                for h, b in lost_replies):
            problems.append(f"unroutable replies: {[(h.get('x-occamy-error'), b) for h, b in lost_replies]}")
        if extra:
            problems.append(f"unexpected dead letters: {sorted(map(str, extra))}")
        status = replies.get("status")
        if status is None or not status.text.startswith("daemon "):
            problems.append(f"status command: {status!r}")
        assert not problems, "\n".join(problems)
        note(f"corpus: {len(items)} messages: {len(want_replies) - 1} replies, "
             f"{len(want_dead)} dead letters with reasons, "
             f"{sum(e[0] == 'ack' for _, e in cids.values())} acked silently; "
             f"3 unroutable reply_to, their results dead-lettered")

        # Still serving, never reconnected, nothing left behind.
        assert rpc(d, "noop", b"after the corpus", timeout=20).body == b"after the corpus"
        assert d.running
        assert not re.search(r"AMQP connection .* lost", d.log()), d.log_tail()
        wait_until(lambda: queue_counts(d) == (0, 1), 20, what="an empty request queue")
        m = scrape(port)
        assert metric(m, "occamy_broker_reconnects_total") == 0, m
        assert metric(m, "occamy_broker_connected") == 1, m
        d.check_sanitizer()
        assert d.stop() == 0


def drain_dead(d, min_count, wait_s):
    """[(headers, body, properties)] from d's dead-letter queue."""
    out = []
    deadline = time.monotonic() + wait_s * SCALE
    conn = pika.BlockingConnection(pika.URLParameters(os.environ.get(
        "OCCAMY_TEST_AMQP_URI", "amqp://guest:guest@127.0.0.1:5672/")))
    try:
        ch = conn.channel()
        while True:
            method, props, body = ch.basic_get(d.names["dead_letter_queue"], auto_ack=True)
            if method:
                out.append((dict(props.headers or {}), body, props))
                continue
            if len(out) >= min_count or time.monotonic() >= deadline:
                return out
            time.sleep(0.05)
    finally:
        if conn.is_open:
            conn.close()


@timeout(120)
def test_8mib_body_round_trip_and_the_daemon_keeps_serving():
    size = 8 << 20
    max_size = broker_ctl("eval", "application:get_env(rabbit, max_message_size).").strip()
    note(f"broker max_message_size: {max_size} (frame_max 131072: bodies span frames)")
    body = os.urandom(size)
    with Daemon(["noop"], slots=2) as d:
        r = rpc(d, "noop", body, timeout=60)
        assert len(r.body) == size and r.body == body, f"{len(r.body)} bytes came back"
        # A second one at once: buffers were released, nothing left over.
        r = rpc(d, "noop", body[::-1], timeout=60)
        assert r.body == body[::-1]
        assert rpc(d, "noop", b"small").body == b"small"
        assert d.stop() == 0


def test_1mib_header_is_refused_by_the_broker_before_the_daemon():
    with Daemon(["noop"], slots=1) as d:
        refused = None
        try:
            publish_request(d, "noop", b"x", headers={"huge": "h" * (1 << 20)})
        except pika.exceptions.AMQPError as e:
            refused = e
        assert refused is not None, "the broker accepted a 1 MiB header frame"
        note(f"broker: {refused}")
        assert "frame_too_large" in str(refused) or "FRAME_ERROR" in str(refused), refused
        time.sleep(0.5)
        assert queue_counts(d) == (0, 1)
        assert rpc(d, "noop", b"fine").body == b"fine"
        assert "lost" not in d.log(), d.log_tail()
        assert d.stop() == 0


def test_header_key_with_a_nul_byte_is_not_taken_for_another_header():
    # AMQP short strings must not hold NUL bytes; a key "handler\0evil" is
    # not the handler header, yet a C-string comparison says it is.  A
    # filter in front of the broker that looks for "handler" sees no such
    # header; the daemon must not see one either.
    with Daemon(["noop"], slots=1) as d, ReplyQueue() as rq:
        publish_request(d, None, b"smuggled", headers={"handler\x00evil": "noop"},
                        reply_to=rq.name, correlation_id="nul-key")
        dead = get_dead_letters(d, min_count=1, timeout=5)
        rq.conn.process_data_events(0.5)
        # The only answer is the error reply of the dead letter.
        ran = [r.body for r in rq.received if "x-occamy-status" not in r.headers]
        assert not ran, ("a header named 'handler\\0evil' was taken for 'handler' and ran the "
                         f"request (reply {ran}); dead letters: {dead}")
        assert [r.headers["x-occamy-status"] for r in rq.received] == ["invalid_headers"]
        assert len(dead) == 1, dead
        assert rpc(d, "noop", b"ok").body == b"ok"
        assert d.stop() == 0


# ------------------------------------------------------------------ secrets

def write_secret(path, secret, mode=0o600):
    with open(path, "w") as f:
        f.write(secret + "\n")
    os.chmod(path, mode)


def assert_secret_absent(secret, what, text):
    assert secret not in text, f"the password appears in {what}:\n" + "\n".join(
        line for line in text.splitlines() if secret in line)[:2000]


@timeout(120)
def test_password_from_password_file_is_never_logged_printed_or_scraped():
    port = amqp_port()
    mport = free_port()
    tmp = tempfile.mkdtemp(prefix="occamy-secret-")
    try:
        with BrokerUser() as user:
            pwfile = os.path.join(tmp, "password")
            write_secret(pwfile, user.password)
            with Daemon(["noop"], slots=1, args=["-v"], uri=f"amqp://{user.name}@127.0.0.1:{port}/",
                        password_file=pwfile, metrics_listen=f"127.0.0.1:{mport}") as d:
                # It did log in with the secret.
                assert rpc(d, "noop", b"authenticated").body == b"authenticated"
                with ReplyQueue() as rq, channel() as ch:
                    publish_raw(ch, d.names["control_exchange"], "", b"",
                                {"x-occamy-command": "status"}, "st", rq.name)
                    status = rq.get(timeout=20).text
                rc, checked = run_check(d.ini)
                assert rc == 0 and "configuration OK" in checked, checked
                scraped = scrape(mport)
                with open(d.ini) as f:
                    ini = f.read()
                d.send_signal(signal.SIGHUP)  # a reload logs the config too
                d.wait_log(r"reloaded")
                assert d.stop() == 0
                for what, text in (("the daemon log (-v)", d.log()), ("occamyd -t", checked),
                                   ("the metrics scrape", scraped), ("the status answer", status),
                                   ("occamy.ini", ini)):
                    assert_secret_absent(user.password, what, text)
                assert re.search(r"connected to amqp://" + re.escape(user.name) + "@", d.log()), \
                    d.log_tail()

            # A wrong password: refused, the log says so, and shows neither.
            wrong = "Wrong-" + uuid.uuid4().hex
            write_secret(pwfile, wrong)
            with Daemon(["noop"], slots=1, args=["-v"], uri=f"amqp://{user.name}@127.0.0.1:{port}/",
                        password_file=pwfile, ready=False) as d:
                m = d.wait_log(r"cannot connect to .*", timeout=20)
                note("wrong password: " + m.group(0))
                assert user.name in m.group(0), m.group(0)
                assert d.stop() == 0
                assert_secret_absent(wrong, "the daemon log", d.log())
                assert_secret_absent(user.password, "the daemon log", d.log())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_password_inline_in_the_uri_is_masked_everywhere():
    port = amqp_port()
    mport = free_port()
    with BrokerUser() as user:
        uri = f"amqp://{user.name}:{user.password}@127.0.0.1:{port}/"
        with Daemon(["noop"], slots=1, args=["-v"], uri=uri,
                    metrics_listen=f"127.0.0.1:{mport}") as d:
            assert rpc(d, "noop", b"inline").body == b"inline"
            rc, checked = run_check(d.ini)
            assert rc == 0, checked
            scraped = scrape(mport)
            assert d.stop() == 0
            for what, text in (("the daemon log (-v)", d.log()), ("occamy -t", checked),
                               ("the metrics scrape", scraped)):
                assert_secret_absent(user.password, what, text)
            assert f"amqp://{user.name}:***@" in d.log(), d.log_tail()


def test_password_file_readable_by_others_is_warned_about():
    port = amqp_port()
    tmp = tempfile.mkdtemp(prefix="occamy-secret-")
    try:
        with BrokerUser() as user:
            pwfile = os.path.join(tmp, "password")
            write_secret(pwfile, user.password, 0o644)
            with Daemon(["noop"], slots=1, uri=f"amqp://{user.name}@127.0.0.1:{port}/",
                        password_file=pwfile) as d:
                assert rpc(d, "noop", b"x").body == b"x"
                rc, checked = run_check(d.ini)
                assert d.stop() == 0
                warned = re.search(r"^.*password_file.*(readable|permission|mode|0?644).*$",
                                   d.log() + "\n" + checked, re.M | re.I)
                assert warned, ("missing feature: no warning that password_file " + pwfile +
                                " (mode 0644) is readable by others; expected one in the log "
                                "(daemon/transport_conn.c password_read) or in occamyd -t\n" + d.log_tail())
                assert_secret_absent(user.password, "the daemon log", d.log())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_uri_that_cannot_be_parsed_is_a_configuration_error():
    # A '/' in a password must be written %2F; written raw, rabbitmq-c cannot
    # parse the URI.  The daemon must refuse it, not fall back to
    # amqp://guest:guest@127.0.0.1:5672/.
    port = amqp_port()
    d = Daemon(["noop"], slots=1, uri=f"amqp://someone:Raw/Slash-Secret@127.0.0.1:{port}/",
               ready=False)
    try:
        rc, checked = run_check(d.ini)
        assert rc == 78 and re.search(r"\[amqp\] key 'uri'", checked), (
            f"occamyd -t accepts an [amqp] uri that rabbitmq-c cannot parse "
            f"(exit {rc}): {checked.strip()}")
    finally:
        d.close()


def test_malformed_uri_in_a_list_is_named_by_position_without_any_password():
    # [amqp] uri may list one URI per cluster node; occamyd -t checks each
    # and names a bad one by file, line, key and position, echoing none.
    port = amqp_port()
    # (short: a line holds at most 198 characters)
    secrets = ["Pw1-" + uuid.uuid4().hex[:12], "Raw/Slash-" + uuid.uuid4().hex[:12],
               "Pw3-" + uuid.uuid4().hex[:12]]
    uris = [f"amqp://u:{pw}@127.0.0.1:{port}/" for pw in secrets]
    d = Daemon(["noop"], slots=1, uri=" ".join(uris), ready=False)
    try:
        rc, checked = run_check(d.ini)
        assert rc == 78, f"occamyd -t accepts a list with a malformed URI (exit {rc}): {checked}"
        want = re.escape(d.ini) + r":\d+: \[amqp\] key 'uri': URI 2 of 3 cannot be parsed"
        assert re.search(want, checked), checked
        for pw in secrets:
            assert_secret_absent(pw, "occamyd -t output", checked)
    finally:
        d.close()


def test_password_in_an_unparsable_uri_is_not_logged():
    port = amqp_port()
    secret = "Raw/Slash-" + uuid.uuid4().hex
    with Daemon(["noop"], slots=1, uri=f"amqp://someone:{secret}@127.0.0.1:{port}/",
                ready=False) as d:
        try:
            d.wait_log(r"(cannot parse|cannot connect)", timeout=10)
        except AssertionError:
            pass  # refused at start: fine, as long as the secret is not shown
        if d.running:
            d.stop()
        assert_secret_absent(secret, "the daemon log", d.log())


# ---------------------------------------------------------------------- TLS

def openssl(*args, cwd):
    p = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True,
                       timeout=60, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, f"openssl {' '.join(args)}: {p.stderr}"


def make_ca(d, name):
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
            "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN=occamy test {name}", cwd=d)
    return os.path.join(d, f"{name}.pem")


def make_server_cert(d, ca):
    with open(os.path.join(d, "ext.cnf"), "w") as f:
        # Names localhost only: connecting to 127.0.0.1 must fail the
        # host name check.
        f.write("subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n"
                "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out",
            "server.csr", "-subj", "/CN=localhost", cwd=d)
    openssl("x509", "-req", "-in", "server.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf", cwd=d)


class TlsBroker:
    """A second private broker (tests/broker start) with a TLS listener on
    127.0.0.1; always stopped by close()."""

    def __init__(self, certdir):
        self.tls_port = free_port()
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith("OCCAMY_TEST_BROKER") and not k.startswith("OCCAMY_TEST_AMQP")}
        self.env["OCCAMY_BROKER_FILES"] = ":".join(
            os.path.join(certdir, f) for f in ("ca.pem", "server.pem", "server.key"))
        self.env["OCCAMY_BROKER_CONF"] = "\n".join([
            f"listeners.ssl.default = 127.0.0.1:{self.tls_port}",
            "ssl_options.cacertfile = @BROKER_DIR@/ca.pem",
            "ssl_options.certfile = @BROKER_DIR@/server.pem",
            "ssl_options.keyfile = @BROKER_DIR@/server.key",
            "ssl_options.verify = verify_none",
            "ssl_options.fail_if_no_peer_cert = false"])
        self.started = False

    def start(self):
        self.started = True  # from here on, stop() in any case
        p = subprocess.run([os.path.join(ROOT, "tests", "broker"), "start"], env=self.env,
                           capture_output=True, text=True, timeout=180 * SCALE,
                           stdin=subprocess.DEVNULL)
        for line in p.stdout.splitlines():
            if line.startswith("export "):
                k, _, v = line[len("export "):].partition("=")
                self.env[k] = shlex.split(v)[0] if v else ""
        assert p.returncode == 0, f"second broker did not start: {p.stderr[-2000:]}"
        self.plain_uri = self.env["OCCAMY_TEST_AMQP_URI"]

    def stop(self):
        if self.started:
            subprocess.run([os.path.join(ROOT, "tests", "broker"), "stop"], env=self.env,
                           timeout=180, stdin=subprocess.DEVNULL, capture_output=True)
            self.started = False

    def consumers(self, queue):
        conn = pika.BlockingConnection(pika.URLParameters(self.plain_uri))
        try:
            return conn.channel().queue_declare(queue, passive=True).method.consumer_count
        except pika.exceptions.ChannelClosedByBroker:
            return None
        finally:
            if conn.is_open:
                conn.close()

    def rpc(self, d, body, wait=30):
        conn = pika.BlockingConnection(pika.URLParameters(self.plain_uri))
        try:
            ch = conn.channel()
            ch.confirm_delivery()
            q = ch.queue_declare("", exclusive=True).method.queue
            ch.basic_publish(d.names["request_exchange"], d.names["request_queue"], body,
                             pika.BasicProperties(headers={H: "noop"}, reply_to=q,
                                                  correlation_id="tls"))
            deadline = time.monotonic() + wait * SCALE
            while time.monotonic() < deadline:
                method, props, got = ch.basic_get(q, auto_ack=True)
                if method:
                    return got
                conn.process_data_events(0.1)
            raise AssertionError("no reply over TLS")
        finally:
            if conn.is_open:
                conn.close()


@timeout(300)
def test_tls_right_ca_serves_wrong_ca_or_host_refuses():
    if shutil.which("openssl") is None:
        skip("openssl not installed")
    certdir = tempfile.mkdtemp(prefix="occamy-tls-")
    os.chmod(certdir, 0o755)
    broker = None
    try:
        make_ca(certdir, "ca")
        wrong_ca = make_ca(certdir, "other")
        make_server_cert(certdir, "ca")
        for f in os.listdir(certdir):
            os.chmod(os.path.join(certdir, f), 0o644)  # the broker user reads them
        ca = os.path.join(certdir, "ca.pem")
        broker = TlsBroker(certdir)
        broker.start()
        tls = broker.tls_port

        # The right CA, the host name the certificate names: it serves.
        with Daemon(["noop"], slots=1, uri=f"amqps://guest:guest@localhost:{tls}/", tls_ca=ca,
                    ready=False) as d:
            wait_until(lambda: (broker.consumers(d.names["request_queue"]) or 0) >= 1
                       or d._check_alive("before consuming over TLS"), 30,
                       what="occamyd to consume over TLS")
            assert broker.rpc(d, b"over tls") == b"over tls"
            assert re.search(r"connected to amqps://guest:\*\*\*@localhost:%d/" % tls, d.log()), \
                d.log_tail()
            assert d.stop() == 0

        # A CA that did not sign the broker's certificate: refused, clearly.
        with Daemon(["noop"], slots=1, uri=f"amqps://guest:guest@localhost:{tls}/",
                    tls_ca=wrong_ca, ready=False) as d:
            m = d.wait_log(r"^.*cannot connect to amqps://.*$", timeout=30)
            note("wrong CA: " + m.group(0))
            assert re.search(r"verif|certificate", m.group(0), re.I), m.group(0)
            time.sleep(1.0)
            assert d.running, "it keeps retrying, it does not exit"
            assert broker.consumers(d.names["request_queue"]) is None, "it must not consume"
            assert d.stop() == 0

        # The right CA, but 127.0.0.1 is not a name in the certificate.
        with Daemon(["noop"], slots=1, uri=f"amqps://guest:guest@127.0.0.1:{tls}/", tls_ca=ca,
                    ready=False) as d:
            m = d.wait_log(r"^.*cannot connect to amqps://.*$", timeout=30)
            note("wrong host name: " + m.group(0))
            assert re.search(r"host ?name|verif|certificate", m.group(0), re.I), m.group(0)
            assert broker.consumers(d.names["request_queue"]) is None, "it must not consume"
            assert d.stop() == 0
    finally:
        if broker is not None:
            broker.stop()
        shutil.rmtree(certdir, ignore_errors=True)


if __name__ == "__main__":
    run_tests(globals())
