"""A fault that belongs to one message costs that message, never the
connection (issue: "A bad message or a refused publish costs one message").

- a request with a 131,000-byte header, and one whose header frame is over
  the negotiated frame size, are dead-lettered with a reason while a healthy
  request beside them completes once, with at most one reconnect;
- a plugin publish with a header key over 255 bytes or a header too large
  for a frame is refused with -1 and nothing goes on the wire;
- a reply that its queue refuses is retried to the delivery limit, then the
  request is dead-lettered carrying the result; a reply whose reply_to names
  no queue is dead-lettered with its correlation id;
- a broker that stalls in the middle of a message does not stop the loop: a
  finished request is acked meanwhile;
- control messages published while the daemon reconnects all reach
  handle().
"""

import os
import signal
import re
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from occamy_test import (  # noqa: E402
    Daemon, FaultProxy, ReplyQueue, channel, free_port, get_dead_letters,
    note, publish_control, publish_request, queue_counts, rpc, run_tests, scrape_metrics,
    timeout, transport_totals, wait_until, SCALE)

import pika  # noqa: E402

LOST = r"AMQP connection to .* lost"


def reconnects(d):
    return len(re.findall(LOST, d.log()))


def header_frame_size(headers, **props):
    """Bytes of the content header frame pika sends for these properties."""
    from pika import spec
    p = spec.BasicProperties(headers=headers, **props)
    # frame header, class/weight/size, end
    return 7 + 12 + sum(len(x) for x in p.encode()) + 1


@timeout(120)
def test_131000_byte_header_is_dead_lettered_trimmed_and_a_healthy_request_completes_once():
    with Daemon(["sleep", "noop"], slots=2) as d, ReplyQueue() as rq:
        publish_request(d, "sleep", b"1500", reply_to=rq.name, correlation_id="healthy")
        publish_request(d, "noop", b"big", headers={"big": "x" * 131000},
                        correlation_id="big")
        dead = get_dead_letters(d, min_count=1, timeout=30)
        assert len(dead) == 1, dead
        h, body = dead[0]
        err = h.get("x-occamy-error", "")
        note(f"x-occamy-error: {err}")
        assert body == b"big" and "big" not in h, h.keys()
        assert re.search(r"too large", err) and "left out of this copy" in err, err
        r = rq.get(timeout=30, correlation_id="healthy")
        assert r.body == b"slept 1500", r
        time.sleep(1)
        rq.conn.process_data_events(0.2)
        assert rq.received == [], "the healthy request completed more than once"
        assert reconnects(d) == 0, d.log_tail()
        assert queue_counts(d) == (0, 1)
        assert d.stop() == 0
        assert transport_totals(d)["reconnects"] == 0


@timeout(120)
def test_header_frame_over_the_frame_limit_is_dead_lettered_and_the_queue_stays_consumable():
    # A header frame of exactly frame_max from the publisher; a quorum queue
    # adds x-delivery-count on redelivery, so what the daemon receives is a
    # little over the negotiated frame size.
    d = Daemon(["noop", "sleep"], slots=2, queue_type="quorum", ready=False)
    with d, ReplyQueue() as rq:
        wait_until(lambda: queue_counts(d) is not None and queue_counts(d)[1] == 1, 20,
                   what="the daemon to declare and consume")
        d.stop()
        base = {"handler": "noop", "big": ""}
        fill = 131072 - header_frame_size(base, delivery_mode=2)
        headers = {"handler": "noop", "big": "y" * fill}
        assert header_frame_size(headers, delivery_mode=2) == 131072
        publish_request(d, None, b"over", headers=headers)
        # Deliver it once to a consumer that gives it back.
        conn = pika.BlockingConnection(pika.URLParameters(os.environ["OCCAMY_TEST_AMQP_URI"]))
        try:
            ch = conn.channel()
            for method, props, body in ch.consume(d.names["request_queue"], inactivity_timeout=10):
                assert method is not None, "the message never came"
                ch.basic_nack(method.delivery_tag, requeue=True)
                break
            ch.cancel()
        finally:
            conn.close()
        publish_request(d, "sleep", b"500", reply_to=rq.name, correlation_id="healthy")
        d.start()
        dead = get_dead_letters(d, min_count=1, timeout=30)
        assert len(dead) == 1, dead
        h, body = dead[0]
        note(f"x-occamy-error: {h.get('x-occamy-error')}")
        assert body == b"over" and "too large" in h.get("x-occamy-error", ""), h.keys()
        assert rq.get(timeout=30, correlation_id="healthy").body == b"slept 500"
        assert reconnects(d) <= 1, d.log_tail()
        assert queue_counts(d) == (0, 1)
        assert d.stop() == 0


@timeout(90)
def test_plugin_publish_that_cannot_be_encoded_is_refused_and_the_connection_stays():
    port = free_port()
    with Daemon(["publisher"], slots=1, metrics_listen=f"127.0.0.1:{port}") as d:
        for body, want in (("control 300 1", b"rc=-1"),      # key over 255 bytes
                           ("control 10 200000", b"rc=-1"),  # header over the frame
                           ("help 256 1", b"rc=-1"),
                           ("request 10 140000", b"rc=-1"),
                           ("control 255 1000", b"rc=0"),
                           ("control 10 100000", b"rc=0")):
            r = rpc(d, "publisher", body.encode())
            assert r.body == want, (body, r)
        m = scrape_metrics(port)
        assert m["occamy_publishes_refused_total"] == 4, m
        wait_until(lambda: scrape_metrics(port)["occamy_publishes_total"] == 2, 10,
                   what="the two good publishes confirmed")
        time.sleep(1)
        assert reconnects(d) == 0, d.log_tail()
        assert len(re.findall(r"plugin publish refused", d.log())) == 4
        assert d.stop() == 0


@timeout(120)
def test_reply_refused_by_a_full_reply_queue_is_retried_to_the_limit_then_dead_lettered_with_its_result():
    port = free_port()
    with Daemon(["sleep"], slots=1, delivery_limit=3, amqp={"retry_delay_ms": 50},
                metrics_listen=f"127.0.0.1:{port}") as d, channel() as ch:
        full = "full-" + uuid.uuid4().hex
        ch.queue_declare(full, arguments={"x-max-length": 0, "x-overflow": "reject-publish"})
        try:
            publish_request(d, "sleep", b"10", reply_to=full, correlation_id="refused")
            dead = get_dead_letters(d, min_count=1, timeout=30)
            assert len(dead) == 1, dead
            h, body = dead[0]
            note(f"x-occamy-error: {h.get('x-occamy-error')}")
            assert body == b"slept 10", (h, body)
            assert "reply refused by the broker" in h.get("x-occamy-error", ""), h
            assert "attempt 3 of 3" in h.get("x-occamy-error", ""), h
            m = scrape_metrics(port)
            assert m['occamy_deliveries_total{queue="request"}'] == 3, m
            assert m['occamy_replies_failed_total{reason="refused"}'] == 3, m
            time.sleep(0.5)
            assert queue_counts(d)[0] == 0
            assert reconnects(d) == 0
        finally:
            ch.queue_delete(full)
        assert d.stop() == 0


@timeout(60)
def test_reply_to_naming_no_queue_dead_letters_the_result_with_its_correlation_id():
    port = free_port()
    with Daemon(["noop"], slots=1, metrics_listen=f"127.0.0.1:{port}") as d:
        publish_request(d, "noop", b"the result", reply_to="no-such-queue-" + uuid.uuid4().hex,
                        correlation_id="c-42")
        conn = pika.BlockingConnection(pika.URLParameters(os.environ["OCCAMY_TEST_AMQP_URI"]))
        try:
            ch = conn.channel()
            method = None
            deadline = time.monotonic() + 20 * SCALE
            while method is None and time.monotonic() < deadline:
                method, props, body = ch.basic_get(d.names["dead_letter_queue"], auto_ack=True)
                time.sleep(0.05)
        finally:
            conn.close()
        assert method is not None, "no dead letter"
        assert body == b"the result" and props.correlation_id == "c-42", (props, body)
        assert "reply_to unroutable" in props.headers["x-occamy-error"], props.headers
        assert scrape_metrics(port)['occamy_replies_failed_total{reason="unroutable"}'] == 1
        d.wait_log(r"returned by the broker")
        assert queue_counts(d)[0] == 0
        assert d.stop() == 0


@timeout(120)
def test_stall_in_the_middle_of_a_message_does_not_stop_the_loop():
    with FaultProxy() as px, ReplyQueue() as rq, \
            Daemon(["sleep", "noop"], slots=2, heartbeat_s=0, uri=px.uri) as d:
        publish_request(d, "sleep", b"1000", reply_to=rq.name, correlation_id="first")
        time.sleep(0.3)
        # The next delivery (1 MiB: many frames) is cut after 200 bytes.
        px.stall_down(after=200)
        publish_request(d, "noop", b"z" * (1 << 20), reply_to=rq.name, correlation_id="big")
        wait_until(lambda: px.held() > 0, 10, what="the proxy to hold the big delivery")
        # The first request finishes meanwhile: its reply goes out and it
        # is acked, although the loop's reads are stuck mid-message.
        r = rq.get(timeout=10, correlation_id="first")
        assert r.body == b"slept 1000", r
        wait_until(lambda: queue_counts(d)[0] == 0, 10, what="the queue empty")
        px.resume()
        r = rq.get(timeout=20, correlation_id="big")
        assert r.body == b"z" * (1 << 20)
        assert reconnects(d) == 0, d.log_tail()
        assert d.stop() == 0


@timeout(120)
def test_control_messages_published_during_a_reconnect_all_reach_handle():
    import tempfile
    log = tempfile.NamedTemporaryFile(prefix="occamy-rec-", delete=False).name
    n = 300
    try:
        with FaultProxy() as px, Daemon({"recorder": {"log": log}}, slots=1,
                                         uri=px.uri, heartbeat_s=5) as d:
            # An external helper (not cancelled by a lost connection) with
            # a known ID receives every control message.
            publish_control(d, None, b"60000,ext-1", handler="recorder")
            wait_until(lambda: " start external ext-1 " in open(log).read(), 20,
                       what="the external to start")
            with channel() as ch:
                for i in range(n):
                    publish_control(d, "ext-1", f"m{i}".encode(), ch=ch)
                    if i == n // 3:
                        px.cut()
            d.wait_log(r"connected to .* after|AMQP connection to .* lost", timeout=20)

            def handled():
                return {line.split()[-1] for line in open(log) if " handle ext-1 " in line}
            wait_until(lambda: len(handled()) == n, 60,
                       what=f"all {n} control messages handled")
            assert handled() == {f"m{i}" for i in range(n)}
            assert d.stop() == 0
            note(f"{n} control messages, connection cut after {n // 3 + 1}: all handled; "
                 f"{reconnects(d)} reconnect(s)")
    finally:
        os.unlink(log)


@timeout(90)
def test_a_flood_of_bad_requests_is_counted_and_logged_at_most_once_a_second():
    port = free_port()
    n = 300
    with Daemon(["fail"], slots=2, metrics_listen=f"127.0.0.1:{port}") as d:
        t0 = time.monotonic()
        with channel() as ch:
            for i in range(n):
                publish_request(d, "fail", b"invalid_body", ch=ch)
        get_dead_letters(d, min_count=n, timeout=60)
        took = time.monotonic() - t0
        key = 'occamy_transport_events_total{path="dead-letter",reason="invalid_body"}'
        wait_until(lambda: scrape_metrics(port).get(key) == n, 10, what=f"{key} == {n}")
        lines = re.findall(r"dead-letter: request: invalid_body", d.log())
        note(f"{n} invalid requests in {took:.1f}s: {len(lines)} log lines")
        assert 1 <= len(lines) <= took + 2, len(lines)
        assert d.stop() == 0


@timeout(90)
def test_a_plugin_publish_lost_with_the_connection_at_sigterm_is_still_sent():
    # The publish goes out, the proxy swallows it, the connection is cut and
    # SIGTERM comes before the reconnect: the stopping daemon connects once
    # more (without consuming) to send it.
    with FaultProxy() as px, Daemon(["publisher"], slots=1, uri=px.uri) as d, \
            channel(confirm=False) as ch:
        q = ch.queue_declare("", exclusive=True).method.queue
        ch.queue_bind(q, d.names["control_exchange"])
        publish_request(d, "publisher", b"control 8 5")
        time.sleep(0.5)
        px.stall_up()
        time.sleep(0.5)
        publish_request(d, "publisher", b"control 9 5")
        time.sleep(1.0)  # run, published into the proxy, held there
        px.cut()
        px.stall_up(False)
        d.send_signal(signal.SIGTERM)
        assert d.wait_exit(30) == 0
        got = []
        deadline = time.monotonic() + 10 * SCALE
        while time.monotonic() < deadline and not any("k" * 9 in h for h in got):
            method, props, body = ch.basic_get(q, auto_ack=True)
            if method is None:
                time.sleep(0.1)
                continue
            got.append(" ".join((props.headers or {}).keys()))
        assert any("k" * 9 in h for h in got), (got, d.log_tail())
        assert "plugin publishes dropped at stop" not in d.log(), d.log_tail()
        note("the publish held by the proxy went out after SIGTERM: "
             + ", ".join(sorted(set(got))))


if __name__ == "__main__":
    run_tests(globals())
