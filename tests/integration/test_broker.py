"""The test harness itself: the private broker and the AMQP helpers."""

import os
import uuid

import pika

from occamy_test import (ReplyQueue, broker_ctl, broker_restart, channel, get_dead_letters,
                         get_messages, queue_counts, run_tests)


def _queue():
    return f"harness.{uuid.uuid4().hex[:10]}"


def test_private_broker():
    uri = os.environ.get("OCCAMY_TEST_AMQP_URI", "")
    assert uri.startswith("amqp://guest:guest@127.0.0.1:"), uri
    assert not uri.endswith(":5672/"), "must not use the shared default port"
    out = broker_ctl("eval", "application:get_env(rabbit, consumer_timeout).")
    assert "{ok,7200000}" in out, out


def test_publish_and_get_back():
    q = _queue()
    with channel() as ch:
        ch.queue_declare(q, durable=True)
        for i in range(3):
            ch.basic_publish("", q, f"m{i}".encode(),
                             pika.BasicProperties(headers={"task-id": f"id{i}", "n": i},
                                                  delivery_mode=2))
    try:
        assert queue_counts(q) == (3, 0), queue_counts(q)
        assert q in broker_ctl("list_queues", "name", "messages")
        got = get_messages(q, min_count=3)
        assert [r.body for r in got] == [b"m0", b"m1", b"m2"], got
        assert [r.headers["task-id"] for r in got] == ["id0", "id1", "id2"], got
        assert got[2].headers["n"] == 2
        assert queue_counts(q) == (0, 0)
    finally:
        with channel() as ch:
            ch.queue_delete(q)
    assert queue_counts(q) is None


def test_reply_queue_matches_correlation_id():
    with ReplyQueue() as rq, channel() as ch:
        for cid in ("a", "b"):
            ch.basic_publish("", rq.name, cid.encode() * 2,
                             pika.BasicProperties(correlation_id=cid))
        assert rq.get(10, correlation_id="b").body == b"bb"
        assert rq.get(10).body == b"aa"


def test_dead_lettering():
    # What occamyd relies on: a rejected message goes to the queue's
    # dead-letter exchange with an x-death header.
    q, dlx, dlq = _queue(), _queue(), _queue()
    with channel() as ch:
        ch.exchange_declare(dlx, "fanout", auto_delete=True)
        ch.queue_declare(dlq, exclusive=False, auto_delete=False)
        ch.queue_bind(dlq, dlx)
        ch.queue_declare(q, arguments={"x-dead-letter-exchange": dlx})
        ch.basic_publish("", q, b"poison", pika.BasicProperties(headers={"task-id": "p"}))
        method, _, body = ch.basic_get(q)
        assert body == b"poison"
        ch.basic_reject(method.delivery_tag, requeue=False)
    try:
        dead = get_dead_letters(dlq, min_count=1)
        assert len(dead) == 1, dead
        headers, body = dead[0]
        assert body == b"poison" and headers["task-id"] == "p", dead
        assert headers["x-death"][0]["reason"] == "rejected", headers
        assert headers["x-death"][0]["queue"] == q, headers
    finally:
        with channel() as ch:
            for name in (q, dlq):
                ch.queue_delete(name)


def test_broker_restart_keeps_durable_messages():
    q = _queue()
    with channel() as ch:
        ch.queue_declare(q, durable=True)
        ch.basic_publish("", q, b"survivor", pika.BasicProperties(delivery_mode=2))
    broker_restart()
    try:
        got = get_messages(q, min_count=1)
        assert [r.body for r in got] == [b"survivor"], got
    finally:
        with channel() as ch:
            ch.queue_delete(q)


if __name__ == "__main__":
    run_tests(globals())
