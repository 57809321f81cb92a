"""Requeues and retries: bounded, counted across the fleet, delayed by the
broker, and safe on quorum queues (issue: "No requeue loops; retries counted
across the fleet, with backoff; quorum-safe").

- at SIGTERM the consumers are cancelled first: nothing new is delivered
  during the grace, so nothing is requeued in a loop;
- an always-failing request is delivered exactly delivery_limit times in
  all, across three daemons, on classic and quorum queues; a fresh request
  with the same body gets its own full count;
- retries wait retry_delay_ms, doubling up to retry_delay_max_ms, in delay
  queues of the broker;
- on a quorum queue a healthy request survives more daemon requeues
  (shutdowns) than x-delivery-limit allows, because a requeue is a new copy.
"""

import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from occamy_test import (  # noqa: E402
    Daemon, ReplyQueue, free_port, get_dead_letters, note, publish_request, queue_counts,
    run_tests, scrape_metrics, timeout, transport_totals, wait_until)


@timeout(120)
def test_sigterm_cancels_the_consumers_before_the_grace_and_requeues_nothing_in_a_loop():
    with Daemon(["sleep"], slots=2, shutdown_grace_s=20) as d, ReplyQueue() as rq:
        publish_request(d, "sleep", b"2000", reply_to=rq.name, correlation_id="a")
        publish_request(d, "sleep", b"4000", reply_to=rq.name, correlation_id="b")
        wait_until(lambda: queue_counts(d)[0] == 0, 10, what="both running")
        for i in range(8):
            publish_request(d, "sleep", b"5000", reply_to=rq.name, correlation_id=f"q{i}")
        time.sleep(0.3)
        d.send_signal(signal.SIGTERM)
        d.wait_log(r"consumers cancelled", timeout=10)
        assert d.wait_exit(60) == 0
        got = {rq.get(timeout=10).properties.correlation_id for _ in range(2)}
        assert got == {"a", "b"}, got
        totals = transport_totals(d)
        note(f"SIGTERM with 2 running, 8 queued: {totals}")
        assert totals["requeues"] == 0 and totals["acks"] == 2, totals
        assert queue_counts(d) == (8, 0)


def _fleet_failure(queue_type, limit=5):
    port = [free_port() for _ in range(3)]
    first = Daemon(["fail"], slots=1, queue_type=queue_type, delivery_limit=limit,
                   amqp={"retry_delay_ms": 20, "retry_delay_max_ms": 40},
                   metrics_listen=f"127.0.0.1:{port[0]}")
    with first:
        others = [Daemon(["fail"], names=first.names, slots=1, queue_type=queue_type,
                         delivery_limit=limit,
                         amqp={"retry_delay_ms": 20, "retry_delay_max_ms": 40},
                         metrics_listen=f"127.0.0.1:{p}") for p in port[1:]]
        with others[0], others[1]:
            fleet = [first] + others

            def deliveries():
                return sum(scrape_metrics(p)['occamy_deliveries_total{queue="request"}']
                           for p in port)
            for round_ in (1, 2):
                publish_request(first, "fail", b"internal", correlation_id=f"r{round_}")
                dead = get_dead_letters(first, min_count=1, timeout=30)
                assert len(dead) == 1, dead
                h = dead[0][0]
                assert "attempt %d of %d" % (limit, limit) in h.get("x-occamy-error", ""), h
                time.sleep(0.5)
                n = deliveries()
                per = [scrape_metrics(p)['occamy_deliveries_total{queue="request"}'] for p in port]
                note(f"{queue_type}, round {round_}: delivered {n:.0f} times in all "
                     f"(per daemon {per}), limit {limit}")
                assert n == limit * round_, (n, per)
            assert queue_counts(first)[0] == 0
            for d in fleet:
                assert d.stop() == 0


@timeout(180)
def test_an_always_failing_request_is_delivered_delivery_limit_times_across_three_daemons_classic():
    _fleet_failure("classic")


@timeout(180)
def test_an_always_failing_request_is_delivered_delivery_limit_times_across_three_daemons_quorum():
    _fleet_failure("quorum")


@timeout(120)
def test_retries_wait_in_delay_queues_with_exponential_backoff():
    with Daemon(["fail"], slots=1, delivery_limit=4,
                amqp={"retry_delay_ms": 300, "retry_delay_max_ms": 600}) as d:
        t0 = time.monotonic()
        publish_request(d, "fail", b"internal")
        dead = get_dead_letters(d, min_count=1, timeout=30)
        took = time.monotonic() - t0
        assert len(dead) == 1
        note(f"4 attempts with delays 300, 600, 600 ms: dead-lettered after {took:.2f}s")
        # 0.3 + 0.6 + 0.6 s of delay queues, give or take the broker's timer.
        assert took >= 1.4, took
        queues = {n for n in _queue_names() if n.startswith(d.names["request_queue"] + ".retry.")}
        assert queues == {d.names["request_queue"] + ".retry.300",
                          d.names["request_queue"] + ".retry.600"}, queues
        assert d.stop() == 0


def _queue_names():
    from occamy_test import broker_ctl
    return [line.split("\t")[0] for line in broker_ctl("list_queues", "-q", "name").splitlines()
            if line.strip()]


@timeout(180)
def test_quorum_healthy_request_survives_more_shutdown_requeues_than_the_delivery_limit():
    limit = 2
    d = Daemon(["sleep"], slots=1, queue_type="quorum", delivery_limit=limit, shutdown_grace_s=0)
    with d, ReplyQueue() as rq:
        publish_request(d, "sleep", b"3000", reply_to=rq.name, correlation_id="healthy")
        for i in range(limit + 2):
            d.wait_log(r"AMQP|started", timeout=10)
            wait_until(lambda: queue_counts(d)[0] == 0, 20, what="the request taken")
            time.sleep(0.5)
            d.send_signal(signal.SIGTERM)
            assert d.wait_exit(30) == 0
            d.start()
        r = rq.get(timeout=30, correlation_id="healthy")
        assert r.body == b"slept 3000"
        assert get_dead_letters(d, 0, 1) == [], "a healthy request was dead-lettered"
        note(f"quorum, x-delivery-limit {limit}: requeued by {limit + 2} shutdowns, then done")
        assert d.stop() == 0


if __name__ == "__main__":
    run_tests(globals())
