"""The client side (issue: "a written message contract, error replies, and
client examples"):

- a request with reply_to that is dead-lettered gets one error reply at once
  (x-occamy-status, x-occamy-error, a JSON body) and the dead-letter queue
  holds its copy; one at the retry limit gets one error reply, not one per
  attempt;
- occamyctl submit prints an error reply and exits at once with the status
  occamyctl(1) documents;
- examples/python_client.py and examples/submit.sh work against a daemon;
- the least-privilege broker users of the README: the daemon runs with
  exactly its permissions, a client user cannot publish control messages,
  and a missing permission is named in the daemon's log.
"""

import json
import os
import re
import subprocess
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from occamy_test import (  # noqa: E402
    AMQP_URI, BUILD, ROOT, Daemon, ReplyQueue, broker_ctl, free_port, get_dead_letters, note,
    publish_request, queue_counts, run_tests, timeout, SCALE)

import pika  # noqa: E402

OCCAMYCTL = os.path.join(BUILD, "occamyctl")


def run(cmd, timeout=60, env=None):
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout * SCALE,
                          env=e, stdin=subprocess.DEVNULL)


def out_of(p):
    return f"exit {p.returncode}\n--- stdout\n{p.stdout}--- stderr\n{p.stderr}"


@timeout(60)
def test_invalid_request_gets_an_error_reply_at_once_and_its_copy_is_dead_lettered():
    with Daemon(["fail", "noop"], slots=1) as d, ReplyQueue() as rq:
        t0 = time.monotonic()
        publish_request(d, "fail", b"invalid_body", reply_to=rq.name, correlation_id="bad-1")
        r = rq.get(timeout=10, correlation_id="bad-1")
        took = time.monotonic() - t0
        note(f"error reply after {took * 1000:.0f} ms: {r.headers} {r.body!r}")
        assert took < 1.0 * SCALE, took
        assert r.headers["x-occamy-status"] == "invalid_body", r.headers
        assert r.properties.content_type == "application/json"
        body = r.json()
        assert body["status"] == "invalid_body" and "invalid_body" in body["error"], body
        assert r.headers["x-occamy-error"] == body["error"]
        dead = get_dead_letters(d, min_count=1, timeout=10)
        assert len(dead) == 1 and dead[0][1] == b"invalid_body", dead
        assert dead[0][0]["x-occamy-status"] == "invalid_body"
        # An unknown handler has a status of its own.
        publish_request(d, "no-such-plugin", b"x", reply_to=rq.name, correlation_id="bad-2")
        r = rq.get(timeout=10, correlation_id="bad-2")
        assert r.headers["x-occamy-status"] == "unknown_handler", r.headers
        # Without reply_to: dead-lettered, nobody to answer.
        publish_request(d, "fail", b"invalid_task")
        assert len(get_dead_letters(d, min_count=2, timeout=10)) == 2
        time.sleep(0.3)
        rq.conn.process_data_events(0.2)
        assert rq.received == [], rq.received
        assert queue_counts(d)[0] == 0
        assert d.stop() == 0


@timeout(60)
def test_a_request_at_the_retry_limit_gets_one_error_reply_not_one_per_attempt():
    with Daemon(["fail"], slots=1, delivery_limit=4,
                amqp={"retry_delay_ms": 50, "retry_delay_max_ms": 100}) as d, \
            ReplyQueue() as rq:
        publish_request(d, "fail", b"internal", reply_to=rq.name, correlation_id="int-1")
        r = rq.get(timeout=20, correlation_id="int-1")
        assert r.headers["x-occamy-status"] == "internal_error", r.headers
        assert "attempt 4 of 4" in r.json()["error"], r.json()
        dead = get_dead_letters(d, min_count=1, timeout=10)
        assert len(dead) == 1, dead
        time.sleep(1.0)
        rq.conn.process_data_events(0.3)
        assert rq.received == [], f"more than one answer: {rq.received}"
        assert d.stop() == 0


@timeout(90)
def test_occamyctl_submit_prints_the_error_reply_and_exits_at_once_with_its_status():
    with Daemon(["fail", "noop"], slots=1, delivery_limit=2,
                amqp={"retry_delay_ms": 20, "retry_delay_max_ms": 20}) as d:
        for handler, body, want in (("fail", "invalid_body", 65), ("fail", "invalid_task", 65),
                                    ("nope", "x", 69), ("fail", "internal", 70),
                                    ("noop", "fine", 0)):
            path = os.path.join(d.dir, "body")
            with open(path, "w") as f:
                f.write(body)
            t0 = time.monotonic()
            p = run([OCCAMYCTL, "-c", d.ini, "-t", str(60 * SCALE), "submit", handler, path])
            took = time.monotonic() - t0
            assert p.returncode == want, (handler, body, out_of(p))
            assert took < 10 * SCALE, (handler, body, took)
            if want:
                assert json.loads(p.stdout)["status"] in p.stderr, out_of(p)
                assert p.stderr.startswith("occamyctl: request failed: "), out_of(p)
            else:
                assert p.stdout == "fine\n", out_of(p)
        assert d.stop() == 0


def _ini_with_uri(d, uri):
    with open(d.ini) as f:
        text = f.read()
    text = re.sub(r"(?m)^uri = .*$", lambda m: "uri = " + uri, text, count=1)
    path = os.path.join(d.dir, "ctl.ini")
    with open(path, "w") as f:
        f.write(text)
    return path


@timeout(60)
def test_occamyctl_tries_each_uri_of_a_list_in_order():
    # [amqp] uri may name one URI per cluster node: occamyctl takes the first
    # that connects, and names the ones that do not without their password.
    secret = "Dead-" + uuid.uuid4().hex
    dead = [f"amqp://guest:{secret}@127.0.0.1:{free_port()}/" for _ in range(2)]
    with Daemon(["noop"], slots=1) as d:
        ini = _ini_with_uri(d, f"{dead[0]} \t{dead[1]}  {AMQP_URI}")
        path = os.path.join(d.dir, "body")
        with open(path, "w") as f:
            f.write("via the third")
        p = run([OCCAMYCTL, "-c", ini, "-t", str(30 * SCALE), "submit", "noop", path])
        assert p.returncode == 0 and p.stdout == "via the third\n", out_of(p)
        assert "trying URI 3 of 3" in p.stderr, out_of(p)
        assert secret not in p.stdout + p.stderr, out_of(p)

        ini = _ini_with_uri(d, " ".join(dead))
        p = run([OCCAMYCTL, "-c", ini, "-t", "2", "status"])
        assert p.returncode == 69, out_of(p)
        assert "none of the 2 URIs" in p.stderr, out_of(p)
        assert secret not in p.stdout + p.stderr, out_of(p)
        assert d.stop() == 0


@timeout(90)
def test_the_python_example_client_gets_a_result_and_an_error_reply():
    with Daemon(["noop", "fail"], slots=1, names={
            "request_queue": "occamy.requests", "request_exchange": "occamy.requests",
            "control_exchange": "occamy.control." + uuid.uuid4().hex[:8],
            "dead_letter_exchange": "occamy.dead." + uuid.uuid4().hex[:8],
            "dead_letter_queue": "occamy.dead." + uuid.uuid4().hex[:8]}) as d:
        example = os.path.join(ROOT, "examples", "python_client.py")
        p = run(["/usr/bin/python3", example, AMQP_URI, "noop", "hello from python", "30"])
        assert p.returncode == 0 and p.stdout == "hello from python\n", out_of(p)
        p = run(["/usr/bin/python3", example, AMQP_URI, "fail", "invalid_body", "30"])
        assert p.returncode == 65 and "request failed: invalid_body" in p.stderr, out_of(p)
        p = run(["/usr/bin/python3", example, AMQP_URI, "nope", "x", "30"])
        assert p.returncode == 69, out_of(p)
        assert d.stop() == 0
    for q in ["occamy.requests"] + [f"occamy.requests.retry.{ms}" for ms in
                                    (1000, 2000, 4000, 8000, 16000, 32000, 60000)]:
        _delete_queue(q)


@timeout(90)
def test_the_shell_example_acts_on_occamyctl_exit_status():
    with Daemon(["noop", "fail"], slots=1) as d:
        example = os.path.join(ROOT, "examples", "submit.sh")
        path = os.path.join(d.dir, "body")
        env = {"OCCAMYCTL": OCCAMYCTL}
        with open(path, "w") as f:
            f.write("from the shell")
        p = run(["sh", example, "-c", d.ini, "noop", path], env=env)
        assert p.returncode == 0 and p.stdout == "result: from the shell\n", out_of(p)
        with open(path, "w") as f:
            f.write("invalid_body")
        p = run(["sh", example, "-c", d.ini, "fail", path], env=env)
        assert p.returncode == 65 and "invalid request, not retried" in p.stderr, out_of(p)
        assert d.stop() == 0


def _delete_queue(name):
    conn = pika.BlockingConnection(pika.URLParameters(AMQP_URI))
    try:
        conn.channel().queue_delete(name)
    finally:
        conn.close()


def _user_uri(user, password):
    return re.sub(r"//[^@]*@", f"//{user}:{password}@", AMQP_URI)


def _add_user(user, password, configure, write, read):
    broker_ctl("add_user", user, password)
    broker_ctl("set_permissions", "-p", "/", user, configure, write, read)


@timeout(120)
def test_least_privilege_users_daemon_runs_client_cannot_publish_control():
    tag = uuid.uuid4().hex[:8]
    p = f"lp{tag}"  # every name of this test starts with it
    names = {"request_queue": f"{p}.requests", "request_exchange": f"{p}.requests",
             "control_exchange": f"{p}.control", "dead_letter_exchange": f"{p}.dead",
             "dead_letter_queue": f"{p}.dead"}
    esc = re.escape(p)
    users = {
        # The README's three users, with the test's prefix for "occamy".
        "daemon": (f"^{esc}\\.", f"^({esc}\\..*|amq\\.default)$", f"^{esc}\\."),
        "client": ("^amq\\.gen-.*", f"^({esc}\\.requests|amq\\.gen-.*)$", "^amq\\.gen-.*"),
        "operator": ("^amq\\.gen-.*", f"^({esc}\\.control|amq\\.gen-.*)$", "^amq\\.gen-.*"),
        # The daemon's permissions less the retry queues it must declare.
        "short": (f"^{esc}\\.(requests|dead|control(\\..*)?)$",
                  f"^({esc}\\..*|amq\\.default)$",
                  f"^{esc}\\."),
    }
    created = []
    try:
        for role, perms in users.items():
            _add_user(f"{p}-{role}", f"pw-{tag}", *perms)
            created.append(f"{p}-{role}")
        with Daemon(["noop"], slots=1, names=names,
                    uri=_user_uri(f"{p}-daemon", f"pw-{tag}")) as d:
            client = pika.BlockingConnection(pika.URLParameters(
                _user_uri(f"{p}-client", f"pw-{tag}")))
            try:
                ch = client.channel()
                ch.confirm_delivery()
                rq = ch.queue_declare("", exclusive=True).method.queue
                ch.basic_publish(names["request_exchange"], names["request_queue"], b"least",
                                 pika.BasicProperties(headers={"handler": "noop"},
                                                      reply_to=rq, correlation_id="lp"),
                                 mandatory=True)
                answer = None
                for method, props, body in ch.consume(rq, auto_ack=True,
                                                      inactivity_timeout=20 * SCALE):
                    answer = body
                    break
                assert answer == b"least", answer
                try:
                    ch.basic_publish(names["control_exchange"], "", b"hi",
                                     pika.BasicProperties(headers={"task-id": "x"}))
                    refused = None
                except pika.exceptions.ChannelClosedByBroker as e:
                    refused = e
                assert refused is not None and refused.reply_code == 403, refused
                note(f"client on the control exchange: {refused.reply_code} {refused.reply_text}")
            finally:
                if client.is_open:
                    client.close()
            # The operator may ask for status (occamyctl status).
            ini = os.path.join(d.dir, "operator.ini")
            with open(d.ini) as f:
                text = f.read()
            with open(ini, "w") as f:
                f.write(re.sub(r"(?m)^uri = .*$",
                               "uri = " + _user_uri(f"{p}-operator", f"pw-{tag}"), text))
            r = run([OCCAMYCTL, "-c", ini, "-t", str(3 * SCALE), "status"])
            assert r.returncode == 0 and "daemon " in r.stdout, out_of(r)
            assert d.stop() == 0
        with Daemon(["noop"], slots=1, names=names, ready=False,
                    uri=_user_uri(f"{p}-short", f"pw-{tag}")) as d:
            m = d.wait_log(r"cannot connect .*ACCESS_REFUSED.*", timeout=20)
            note("missing permission: " + m.group(0)[-200:])
            assert f"{p}.requests.retry" in m.group(0), m.group(0)
            assert d.stop() == 0
    finally:
        for user in created:
            broker_ctl("delete_user", user)
        conn = pika.BlockingConnection(pika.URLParameters(AMQP_URI))
        try:
            ch = conn.channel()
            for q in (names["request_queue"], names["dead_letter_queue"]):
                ch.queue_delete(q)
            for ms in (1000, 2000, 4000, 8000, 16000, 32000, 60000):
                ch.queue_delete(f"{p}.requests.retry.{ms}")
        finally:
            conn.close()


if __name__ == "__main__":
    run_tests(globals())
