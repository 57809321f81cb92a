"""Faults under load: nothing lost.

Each test proves one reliability promise with a real broker and two or more
daemons sharing one request queue:

- kill -9 of one of three daemons in the middle of 3000 requests: every
  request gets a reply (at-least-once: duplicates are counted, never a
  loss), and the survivors drain the queue;
- the broker restarted (stop_app/start_app) in the middle of 2000 requests,
  with 300 more published through the outage: the daemons reconnect by
  themselves, no daemon exits, every correlation id gets a reply on a durable
  reply queue of ours;
- a plugin that ignores cancellation (stubborn) and one that blocks in
  task_handle (fail handle_block): with helper_priority = normal and = idle
  the daemon keeps admitting requests on its other slots and keeps routing
  control messages, and the stuck slot (idle: the draining helper) shows in
  /metrics; and a request that meets only a stuck helper (normal) does not
  bounce between the broker and the daemon thousands of times a second;
- a poison request that crashes the daemon (SIGSEGV) on a quorum queue with
  delivery_limit = 3: restarted after every crash (as systemd would), the
  daemon stops meeting it after the limit: it is dead-lettered;
- SIGTERM to both daemons under load: every reply belongs to a request that
  ran to completion, and every request cut off is back in the queue, ready,
  with nothing unacknowledged;
- a task longer than the broker's consumer_timeout (opt-in, slow: RabbitMQ
  3.10 checks the timeout once a minute and has no per-queue setting).

Sizes: 3000 requests for the kill test and 2000 + 300 for the restart test
keep this file around two minutes on a 2-core machine (the broker, three
daemons and this client share the cores); OCCAMY_FAULT_REQUESTS=N scales
both.
"""

import collections
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import pika

sys.path.insert(0, os.path.dirname(__file__))
from occamy_test import (ROOT, SCALE, Daemon, ReplyQueue, broker_ctl,  # noqa: E402
                         broker_restart, channel, connect, free_port, get_dead_letters,
                         note, publish_control, publish_request, queue_counts, rpc,
                         run_tests, skip, timeout, wait_until,
                         scrape_metrics as scrape)

SCALE_N = float(os.environ.get("OCCAMY_FAULT_REQUESTS", 0)) / 3000 or 1.0
AMQP_ERRORS = (pika.exceptions.AMQPError, OSError)


# ------------------------------------------------------------------ helpers

class Collector(threading.Thread):
    """Consumes a durable, non-exclusive reply queue declared here, on its own
    thread and connection, reconnecting by itself (so replies published while
    our client is disconnected wait in the queue).  Counts replies per
    correlation id; a reply the broker redelivers to us because our own ack
    was lost is not a daemon duplicate and is counted apart."""

    def __init__(self):
        super().__init__(daemon=True)
        self.queue = "occamy-faults-replies-" + uuid.uuid4().hex[:8]
        self.counts = collections.Counter()
        self.bodies = {}
        self.redelivered_to_us = 0
        self.connects = 0
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.connected = threading.Event()
        conn = connect()
        try:
            conn.channel().queue_declare(self.queue, durable=True, exclusive=False,
                                         auto_delete=False)
        finally:
            conn.close()

    def _on_message(self, ch, method, props, body):
        cid = props.correlation_id
        with self.lock:
            if method.redelivered and cid in self.counts:
                self.redelivered_to_us += 1
            else:
                self.counts[cid] += 1
                self.bodies.setdefault(cid, body)
        ch.basic_ack(method.delivery_tag)

    def run(self):
        while not self.stopping.is_set():
            conn = None
            try:
                conn = connect()
                ch = conn.channel()
                ch.basic_qos(prefetch_count=1000)
                ch.basic_consume(self.queue, self._on_message)
                self.connects += 1
                self.connected.set()
                while not self.stopping.is_set():
                    conn.process_data_events(time_limit=0.1)
            except AMQP_ERRORS:
                self.connected.clear()
                time.sleep(0.3)
            finally:
                try:
                    if conn is not None and conn.is_open:
                        conn.close()
                except AMQP_ERRORS:
                    pass

    def unique(self):
        with self.lock:
            return len(self.counts)

    def snapshot(self):
        with self.lock:
            return collections.Counter(self.counts), dict(self.bodies)

    def wait_for(self, cids, seconds, what):
        cids = set(cids)

        def done():
            with self.lock:
                return cids <= self.counts.keys()
        try:
            wait_until(done, seconds, 0.1, what)
        except AssertionError:
            counts, _ = self.snapshot()
            missing = sorted(cids - counts.keys())
            raise AssertionError(f"{len(missing)} of {len(cids)} requests got no reply "
                                 f"({what}); first missing: {missing[:10]}") from None

    def close(self):
        self.stopping.set()
        if self.is_alive():
            self.join(10)
        try:
            conn = connect()
            conn.channel().queue_delete(self.queue)
            conn.close()
        except AMQP_ERRORS:
            pass

    def __enter__(self):
        self.start()
        if not self.connected.wait(20 * SCALE):
            raise AssertionError("reply collector could not connect")
        return self

    def __exit__(self, *exc):
        self.close()


class Publisher(threading.Thread):
    """Publishes [(cid, handler, body)] as persistent requests with publisher
    confirms, on its own thread; rate = messages per second (None: as fast as
    confirms come back).  A publish that fails (the broker went away) is
    retried on a new connection until confirmed: at least once."""

    def __init__(self, names, items, reply_to, rate=None):
        super().__init__(daemon=True)
        self.names, self.items, self.reply_to, self.rate = names, list(items), reply_to, rate
        self.sent = 0
        self.retries = 0
        self.error = None
        self.stopping = threading.Event()

    def run(self):
        i, ch, conn = 0, None, None
        t0 = time.monotonic()
        try:
            while i < len(self.items) and not self.stopping.is_set():
                if self.rate:
                    ahead = t0 + i / self.rate - time.monotonic()
                    if ahead > 0:
                        time.sleep(ahead)
                cid, handler, body = self.items[i]
                try:
                    if ch is None:
                        conn = connect()
                        ch = conn.channel()
                        ch.confirm_delivery()
                    publish_request(self.names, handler, body, reply_to=self.reply_to,
                                    correlation_id=cid, ch=ch)
                    i += 1
                    self.sent = i
                except AMQP_ERRORS:
                    self.retries += 1
                    ch = None
                    try:
                        if conn is not None and conn.is_open:
                            conn.close()
                    except AMQP_ERRORS:
                        pass
                    time.sleep(0.3)
        except BaseException as e:  # noqa: B902 - reported by join_checked
            self.error = e
        finally:
            try:
                if conn is not None and conn.is_open:
                    conn.close()
            except AMQP_ERRORS:
                pass

    def join_checked(self, seconds):
        self.join(seconds * SCALE)
        if self.is_alive():
            self.stopping.set()
            raise AssertionError(f"publisher still busy after {seconds * SCALE}s "
                                 f"({self.sent} of {len(self.items)} sent)")
        if self.error is not None:
            raise AssertionError(f"publisher failed: {self.error!r}")



def slots(v):
    return {s: int(v.get(f'occamy_slots{{status="{s}"}}', -1))
            for s in ("empty", "protected", "internal", "external")}


def recorder_log():
    fd, path = tempfile.mkstemp(prefix="occamy-rec-", suffix=".log")
    os.close(fd)
    return path


def recorder_lines(path, what):
    with open(path) as f:
        return [line.split() for line in f if line.split()[1:2] == [what]]


def check_replies(counts, bodies, expected, what):
    """Every cid of expected ({cid: body}) replied with its body; returns the
    number of duplicate replies."""
    wrong = [(c, bodies[c], b) for c, b in expected.items() if bodies.get(c) != b]
    assert not wrong, f"{what}: {len(wrong)} wrong replies, first {wrong[:3]}"
    stray = set(counts) - set(expected)
    assert not stray, f"{what}: replies for unknown ids {sorted(stray)[:10]}"
    return sum(counts.values()) - len(counts)


def sleep_items(prefix, n, lo, hi, seed):
    rnd = random.Random(seed)
    items, expected = [], {}
    for i in range(n):
        ms = rnd.randint(lo, hi)
        cid = f"{prefix}-{i}"
        items.append((cid, "sleep", str(ms).encode()))
        expected[cid] = f"slept {ms}".encode()
    return items, expected


# -------------------------------------------------------------------- tests

@timeout(240)
def test_kill_9_of_one_daemon_under_load_loses_nothing():
    n = int(3000 * SCALE_N)
    items, expected = sleep_items("k", n, 1, 5, 1)
    # The whole load is queued first (a daemon declares the topology and
    # leaves), so that the three daemons then run flat out, every slot and
    # prefetch full, when one of them is killed.
    with Daemon(["sleep"], slots=1) as first:
        names = first.names
        assert first.stop() == 0
    a = Daemon(["sleep"], slots=2, names=names)
    b = Daemon(["sleep"], slots=2, names=names)
    c = Daemon(["sleep"], slots=2, names=names)
    with Collector() as col:
        pub = Publisher(names, items, col.queue)
        pub.start()
        pub.join_checked(120)
        assert queue_counts(names["request_queue"]) == (n, 0)
        with a, b, c:
            t0 = time.monotonic()
            wait_until(lambda: col.unique() >= n // 3, 60, 0.01, "a third of the replies")
            done_at_kill = col.unique()
            b.proc.kill()
            assert b.wait_exit(10) == -signal.SIGKILL
            col.wait_for(expected, 120, "after kill -9")
            elapsed = time.monotonic() - t0
            counts, bodies = col.snapshot()
            dups = check_replies(counts, bodies, expected, "kill -9")
            assert done_at_kill < n, "the load was over before the kill"
            note(f"kill -9: {n} requests queued, then 3 daemons x 2 slots (sleep 1-5 ms); one "
                 f"killed after {done_at_kill} replies; 0 lost, {dups} duplicate replies "
                 f"(at-least-once), {col.redelivered_to_us} redelivered to the client; "
                 f"{n / elapsed:.0f} req/s")
            wait_until(lambda: queue_counts(a) == (0, 2), 30,
                       what="the queue drained by the survivors")
            assert a.running and c.running
            assert a.stop() == 0 and c.stop() == 0


@timeout(300)
def test_broker_restart_under_load_loses_nothing_and_daemons_reconnect():
    n = int(2000 * SCALE_N)
    late = int(300 * SCALE_N)
    items, expected = sleep_items("r", n, 8, 16, 2)
    late_items, late_expected = sleep_items("late", late, 1, 3, 3)
    expected.update(late_expected)
    a = Daemon(["sleep"], slots=2, heartbeat_s=5)
    b = Daemon(["sleep"], slots=2, heartbeat_s=5, names=a.names)
    with a, b, Collector() as col:
        pos = {d: d.log_size() for d in (a, b)}
        pub = Publisher(a.names, items, col.queue)
        pub.start()
        pub.join_checked(120)
        wait_until(lambda: col.unique() >= 100, 60, 0.01, "the first replies")
        # More requests published through the outage, at a steady pace.
        pub2 = Publisher(a.names, late_items, col.queue, rate=30)
        pub2.start()
        before = col.unique()
        t0 = time.monotonic()
        broker_restart()
        outage = time.monotonic() - t0
        for d in (a, b):
            d.wait_log(r"AMQP connection to .* lost", timeout=30, after=pos[d])
            d.wait_log(r"connected to amqp", timeout=60, after=d.log().index(" lost", pos[d]))
        pub2.join_checked(120)
        col.wait_for(expected, 180, "after the broker restart")
        counts, bodies = col.snapshot()
        dups = check_replies(counts, bodies, expected, "broker restart")
        assert before < n, "the load was over before the restart"
        note(f"broker restart ({outage:.1f}s for stop_app + start_app): {n} requests queued "
             f"(sleep 8-16 ms, 2 daemons x 2 slots), {before} answered before; {late} more "
             f"published through the outage ({pub2.retries} publish retries); 0 lost, {dups} "
             f"duplicate replies, client reconnected {col.connects - 1} time(s)")
        assert a.running and b.running, "a daemon exited"
        wait_until(lambda: queue_counts(a) == (0, 2), 60, what="the queue drained")
        assert a.stop() == 0 and b.stop() == 0


def stuck_daemon(log, port, priority, slots_n, buffer):
    return Daemon({"stubborn": {}, "noop": {}, "fail": {}, "recorder": {"log": log}},
                  slots=slots_n, expansion_slot_buffer=buffer, kill_timeout_ms=300,
                  expansion_period_ms=100, helper_priority=priority, shutdown_grace_s=1,
                  metrics_listen=f"127.0.0.1:{port}")


def control_still_routed(d, log, port):
    """A control message for another task is routed while a dispatcher is
    blocked in the fail plugin's task_handle."""
    v0 = scrape(port)
    publish_request(d, "recorder", b"8000", task_id="rec")
    wait_until(lambda: any(l[3] == "rec" for l in recorder_lines(log, "start")), 10,
               what="the recorder master running")
    publish_control(d, "blk", b"block again")  # queued behind the blocked one
    for i in range(3):
        publish_control(d, "rec", f"ping{i}".encode())
    wait_until(lambda: len([l for l in recorder_lines(log, "handle") if l[2] == "rec"]) == 3,
               10, what="3 control messages handled by the recorder task")
    v = scrape(port)
    routed = v['occamy_control_messages_total{result="routed"}'] - \
        v0['occamy_control_messages_total{result="routed"}']
    assert routed >= 4, v


def admits_at_once(d, count=5):
    for i in range(count):
        t0 = time.monotonic()
        r = rpc(d, "noop", f"while stuck {i}".encode(), timeout=10)
        assert r.body == f"while stuck {i}".encode(), r
        assert time.monotonic() - t0 < 3 * SCALE, "admission waited on the stuck slot"


@timeout(120)
def test_stuck_helper_and_blocked_handle_with_normal_priority():
    log, port = recorder_log(), free_port()
    try:
        with stuck_daemon(log, port, "normal", 4, 1) as d, ReplyQueue() as rq:
            # A stubborn master: 5 s protected, two helpers that, once
            # cancelled, ignore it for another 5 s.
            publish_request(d, "stubborn", b"5000", task_id="stub", reply_to=rq.name,
                            correlation_id="stub")
            wait_until(lambda: slots(scrape(port)) ==
                       {"empty": 1, "protected": 1, "internal": 2, "external": 0}, 10,
                       what="master + 2 stubborn helpers")
            # A task whose task_handle blocks for 30 s, and a message to it.
            publish_request(d, "fail", b"handle_block,20000", task_id="blk")
            wait_until(lambda: slots(scrape(port))["protected"] == 2, 10, what="fail running")
            publish_control(d, "blk", b"block")
            # The master ends: its helpers are cancelled and ignore it.
            assert rq.get(timeout=20, correlation_id="stub").body == b""
            wait_until(lambda: scrape(port)["occamy_slots_stuck"] == 2, 10,
                       what="2 stuck slots in /metrics")
            v = scrape(port)
            assert slots(v) == {"empty": 1, "protected": 1, "internal": 2, "external": 0}, v
            assert v["occamy_helpers_draining"] == 0, v  # normal: they stay in their slots
            admits_at_once(d)
            control_still_routed(d, log, port)
            assert scrape(port)["occamy_slots_stuck"] == 2
            # The helpers return at last: nothing stuck any more.
            wait_until(lambda: scrape(port)["occamy_slots_stuck"] == 0, 15,
                       what="the stuck helpers to return")
            assert d.stop(timeout=40) == 0
            note("shutdown with a blocked task_handle: " + "; ".join(
                re.findall(r"shutdown: .*$", d.log(), re.M)))
    finally:
        os.unlink(log)


@timeout(120)
def test_stuck_helper_and_blocked_handle_with_idle_priority():
    log, port = recorder_log(), free_port()
    try:
        with stuck_daemon(log, port, "idle", 3, 1) as d:
            if "helpers idle" not in d.log():
                skip("SCHED_IDLE helpers not available here: " + d.log_tail(3))
            publish_request(d, "stubborn", b"6000", task_id="stub")
            wait_until(lambda: slots(scrape(port)) ==
                       {"empty": 1, "protected": 1, "internal": 1, "external": 0}, 10,
                       what="master + 1 stubborn helper")
            publish_request(d, "fail", b"handle_block,20000", task_id="blk")
            wait_until(lambda: slots(scrape(port))["empty"] == 0, 10, what="every slot busy")
            publish_control(d, "blk", b"block")
            # A request preempts the stubborn helper: it starts at once, the
            # helper drains outside the slot and turns stuck.
            t0 = time.monotonic()
            assert rpc(d, "noop", b"preempts", timeout=10).body == b"preempts"
            assert time.monotonic() - t0 < 3 * SCALE
            wait_until(lambda: scrape(port)["occamy_slots_stuck"] == 1, 10,
                       what="the draining helper counted stuck")
            v = scrape(port)
            assert v["occamy_helpers_draining"] == 1, v
            assert v["occamy_preemptions_total"] == 1, v
            assert slots(v)["internal"] == 0, v
            admits_at_once(d)
            control_still_routed(d, log, port)
            v = scrape(port)
            assert v["occamy_helpers_draining"] == 1 and v["occamy_slots_stuck"] == 1, v
            wait_until(lambda: scrape(port)["occamy_helpers_draining"] == 0, 15,
                       what="the drained helper to return")
            assert scrape(port)["occamy_slots_stuck"] == 0
            assert d.stop(timeout=40) == 0
    finally:
        os.unlink(log)


@timeout(60)
def test_stuck_helper_with_normal_priority_does_not_spin_requeues():
    # One daemon, 2 slots: a stubborn master (protected) and its helper.  A
    # request preempts the helper, which ignores the cancel: after
    # kill_timeout the request is requeued (by design), the slot is stuck.
    # The slot holds no delivery, so prefetch = slots lets the broker hand
    # the request straight back, and "no free slot" requeues it again, until
    # the master ends.  That loop must not spin.
    port = free_port()
    with Daemon(["stubborn", "noop"], slots=2, helper_priority="normal", kill_timeout_ms=300,
                expansion_period_ms=100, metrics_listen=f"127.0.0.1:{port}") as d:
        publish_request(d, "stubborn", b"4000", task_id="s")
        wait_until(lambda: slots(scrape(port)) ==
                   {"empty": 0, "protected": 1, "internal": 1, "external": 0}, 10,
                   what="master + 1 stubborn helper")
        t0 = time.monotonic()
        assert rpc(d, "noop", b"waited", timeout=30).body == b"waited"
        took = time.monotonic() - t0
        v = scrape(port)
        spins = v['occamy_requeued_total{reason="no_room"}']
        killed = v['occamy_requeued_total{reason="kill_timeout"}']
        note(f"request admitted after {took:.1f}s; requeued {spins:.0f} times for no room, "
             f"{killed:.0f} for the kill timeout")
        assert spins <= 50, (
            f"{spins:.0f} 'no free slot' requeues in {took:.1f}s: the request bounced between "
            "the broker and this daemon while a stuck helper held a slot")
        assert d.stop() == 0


@timeout(120)
def test_reconnect_with_a_stubborn_task_does_not_spin_requeues():
    # Issue 16: slots = 1, a task that ignores cancellation for seconds, one
    # more request queued, then the broker closes the connection.  The old
    # task still holds the slot; the new channel's prefetch (= slots) does
    # not count it, so the broker delivers at once.  That delivery must wait
    # for the slot, not bounce "no free slot" thousands of times a second;
    # every request still completes exactly once.
    port = free_port()
    with Daemon(["stubborn", "noop"], slots=1, kill_timeout_ms=300, shutdown_grace_s=1,
                metrics_listen=f"127.0.0.1:{port}") as d, Collector() as col:
        # The collector's durable queue keeps replies while its own
        # connection is closed too.
        publish_request(d, "stubborn", b"5000", task_id="s", reply_to=col.queue,
                        correlation_id="stubborn")
        wait_until(lambda: slots(scrape(port))["protected"] == 1, 10, what="stubborn running")
        publish_request(d, "noop", b"queued", reply_to=col.queue, correlation_id="queued")
        wait_until(lambda: queue_counts(d)[0] == 1, 10, what="one request queued behind it")
        pos = d.log_size()
        v0 = scrape(port)
        broker_ctl("close_all_connections", "test: issue 16")
        d.wait_log(r"AMQP connection to .* lost", timeout=30, after=pos)
        d.wait_log(r"connected to", timeout=30, after=d.log().index(" lost", pos))
        t0 = time.monotonic()
        time.sleep(10)
        v = scrape(port)
        key = 'occamy_settlements_total{outcome="requeue"}'
        requeues = v[key] - v0[key]
        col.wait_for(["stubborn", "queued"], 30, "after the reconnect")
        time.sleep(1)  # a second run would have replied by now
        counts, bodies = col.snapshot()
        no_room = v['occamy_requeued_total{reason="no_room"}']
        killed = v['occamy_requeued_total{reason="kill_timeout"}']
        note(f"after the reconnect: {requeues:.0f} requeues in {time.monotonic() - t0:.0f} s "
             f"(no_room {no_room:.0f}, kill_timeout {killed:.0f}); replies {dict(counts)}")
        assert requeues < 20, f"{requeues:.0f} requeues in 10 s: the delivery bounced"
        assert counts == {"stubborn": 1, "queued": 1}, counts
        assert bodies["queued"] == b"queued", bodies
        assert d.stop() == 0


@timeout(120)
def test_slow_control_handler_gets_every_message_or_a_dead_letter():
    # Issue 16, item 6: a task whose handle() is slow has a bounded backlog.
    # What does not fit is dead-lettered with a reason, never acked unseen.
    n = 400
    log = recorder_log()
    try:
        with Daemon({"recorder": {"log": log, "handle_ms": 30}}, slots=1,
                    shutdown_grace_s=1) as d:
            publish_request(d, "recorder", b"120000", task_id="slow")
            wait_until(lambda: any(l[3] == "slow" for l in recorder_lines(log, "start")), 10,
                       what="the recorder task running")
            with channel(confirm=False) as ch:
                for i in range(n):
                    publish_control(d, "slow", f"c{i}".encode(), ch=ch)

            def handled():
                return [l[4] for l in recorder_lines(log, "handle") if l[2] == "slow"]
            dead = []

            def accounted():
                dead.extend(get_dead_letters(d, timeout=0))
                return len(handled()) + len(dead) >= n
            wait_until(accounted, 60, 0.2, "every control message handled or dead-lettered")
            time.sleep(1)
            dead.extend(get_dead_letters(d, timeout=0))
            seen = handled()
            dead_bodies = [b.decode() for _, b in dead]
            reasons = collections.Counter(h.get("x-occamy-error") for h, _ in dead)
            note(f"{n} control messages to a task with a 30 ms handle(): {len(seen)} handled, "
                 f"{len(dead)} dead-lettered {dict(reasons)}")
            assert sorted(seen + dead_bodies) == sorted(f"c{i}" for i in range(n))
            assert dead, "the backlog never overflowed: the test proves nothing"
            assert set(reasons) == {"control backlog full"}, reasons
            assert d.stop() == 0
    finally:
        os.unlink(log)


class CrashingDaemon(Daemon):
    """A daemon that is expected to die of SIGSEGV: a sanitizer report of
    that deliberate crash is not a finding; any other report still is."""

    def sanitizer_report(self):
        log = re.sub(r"AddressSanitizer:DEADLYSIGNAL.*?(==\d+==ABORTING|$)", "",
                     self.log(), flags=re.S)
        log = re.sub(r"==\d+==ERROR: AddressSanitizer: SEGV.*?==\d+==ABORTING", "", log,
                     flags=re.S)
        from occamy_test import SANITIZER_REPORT
        m = SANITIZER_REPORT.search(log)
        return log[max(0, m.start() - 200):m.start() + 4000] if m else None


@timeout(180)
def test_poison_request_that_crashes_is_dead_lettered_after_the_delivery_limit():
    limit = 3
    asan = os.environ.get("ASAN_OPTIONS", "")
    # crash_limit 0: the broker's x-delivery-limit alone, the backstop
    # (test_records.py tests the daemon's own crash guard).
    d = CrashingDaemon(["fail", "noop"], slots=1, queue_type="quorum", delivery_limit=limit,
                       crash_limit=0,
                       env={"ASAN_OPTIONS": (asan + ":" if asan else "") + "handle_segv=0"})
    with d, ReplyQueue() as rq:
        dlq = d.names["dead_letter_queue"]
        publish_request(d, "fail", b"crash", reply_to=rq.name, correlation_id="poison")
        codes = []
        while True:
            rc = d.wait_exit(30)
            # SIGSEGV, or the exit code of a sanitizer that still caught it
            # (ASan 1, TSan 66).
            assert rc in (-signal.SIGSEGV, 1, 66), f"crash exit code {rc}\n{d.log_tail()}"
            codes.append(rc)
            wait_until(lambda: queue_counts(d)[1] == 0, 20, what="the dead consumer gone")
            # The quorum queue takes the message back: ready again, or
            # dead-lettered once past the limit.
            wait_until(lambda: (queue_counts(dlq) or (0, 0))[0] + queue_counts(d)[0] > 0, 20,
                       what="the poison back in the queue or dead-lettered")
            if (queue_counts(dlq) or (0, 0))[0] > 0:
                break
            assert len(codes) <= limit + 1, f"crashed {len(codes)} times: no delivery limit"
            d.start(wait=False)  # like systemd's Restart=on-failure
        note(f"poison: crashed {len(codes)} times (exit codes {codes}), then dead-lettered "
             f"by the quorum queue's delivery limit {limit}")
        # The next incarnation is never handed the poison and serves.
        d.start()
        assert rpc(d, "noop", b"alive").body == b"alive"
        time.sleep(1)
        assert d.running
        conn = connect()
        try:
            method, props, body = conn.channel().basic_get(dlq, auto_ack=True)
        finally:
            conn.close()
        assert body == b"crash" and props.correlation_id == "poison", (props, body)
        h = props.headers or {}
        reasons = [x.get("reason") for x in h.get("x-death", [])]
        note(f"dead letter headers: x-occamy-error={h.get('x-occamy-error')!r} "
             f"x-death reasons={reasons} x-delivery-count={h.get('x-delivery-count')}")
        assert "delivery_limit" in [r.decode() if isinstance(r, bytes) else r for r in reasons] \
            or h.get("x-occamy-error"), h
        rq.conn.process_data_events(0.2)
        assert rq.received == [], "no reply for a request that never completed"
        assert queue_counts(d) == (0, 1)
        assert d.stop() == 0


@timeout(180)
def test_sigterm_under_load_acks_only_finished_work_and_requeues_the_rest():
    n = 200
    lengths = [20, 40, 5000, 60, 30, 4000]   # ms; the long ones cannot finish in the grace
    items, expected = [], {}
    for i in range(n):
        ms = lengths[i % len(lengths)]
        items.append((f"g-{i}", "sleep", str(ms).encode()))
        expected[f"g-{i}"] = f"slept {ms}".encode()
    a = Daemon(["sleep"], slots=2, shutdown_grace_s=1, kill_timeout_ms=500)
    b = Daemon(["sleep"], slots=2, shutdown_grace_s=1, kill_timeout_ms=500, names=a.names)
    with a, b, Collector() as col:
        pub = Publisher(a.names, items, col.queue)
        pub.start()
        pub.join_checked(60)
        wait_until(lambda: col.unique() >= 10, 30, 0.02, "the first replies")
        time.sleep(0.3)
        t0 = time.monotonic()
        for d in (a, b):
            d.send_signal(signal.SIGTERM)
        codes = [a.wait_exit(30), b.wait_exit(30)]
        took = time.monotonic() - t0
        assert codes == [0, 0], codes
        a.check_sanitizer()
        b.check_sanitizer()
        q = a.names["request_queue"]
        lines = [l.split() for l in broker_ctl("list_queues", "-q", "name", "messages_ready",
                                               "messages_unacknowledged").splitlines()]
        row = [l for l in lines if l and l[0] == q]
        assert row, lines
        ready, unacked = int(row[0][1]), int(row[0][2])
        assert unacked == 0, f"{unacked} messages left unacknowledged after exit"
        time.sleep(0.5)  # replies confirmed before the acks: all in the reply queue by now
        counts, bodies = col.snapshot()
        # Whatever is back in the queue, with its redelivered flag.
        back, redelivered = set(), set()
        conn = connect()
        try:
            ch = conn.channel()
            while True:
                method, props, body = ch.basic_get(q, auto_ack=True)
                if not method:
                    break
                back.add(props.correlation_id)
                # A requeue is a new copy (never a broker redelivery): it
                # says so in x-occamy-requeues.
                if method.redelivered or (props.headers or {}).get("x-occamy-requeues"):
                    redelivered.add(props.correlation_id)
        finally:
            conn.close()
        replied = set(counts)
        assert ready == len(back), (ready, len(back))
        assert not (replied & back), f"replied to and requeued: {sorted(replied & back)[:10]}"
        assert replied | back == set(expected), \
            f"lost: {sorted(set(expected) - replied - back)[:10]}"
        assert sum(counts.values()) == len(replied), "a request was answered twice"
        for cid in replied:
            assert bodies[cid] == expected[cid], (cid, bodies[cid])  # ran to the end
        cut = [c for c in redelivered if int(expected[c].split()[1]) >= 4000]
        assert cut, f"no long task was cut off by the shutdown (requeued: {sorted(redelivered)})"
        note(f"SIGTERM under load: exit after {took:.1f}s; {len(replied)} answered (all ran "
             f"to the end), {len(back)} back in the queue (ready {ready}, unacked 0), of "
             f"which {len(redelivered)} had started ({len(cut)} long ones cut off at the grace)")


@timeout(400)
def test_task_longer_than_consumer_timeout_is_redelivered_once_then_dead_lettered():
    # RabbitMQ 3.10 has no per-queue x-consumer-timeout (3.12 adds it) and
    # checks consumer_timeout on the channel's one-minute tick: a 5 s timeout
    # fires after 60 s (measured here).  So this needs its own broker and
    # over two minutes: opt in with OCCAMY_TEST_SLOW=1.
    if not os.environ.get("OCCAMY_TEST_SLOW"):
        skip("needs a second broker with a short consumer_timeout and ~150 s "
             "(RabbitMQ 3.10 checks the timeout once a minute; no per-queue "
             "x-consumer-timeout before 3.12); set OCCAMY_TEST_SLOW=1")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("OCCAMY_TEST_BROKER") and not k.startswith("OCCAMY_TEST_AMQP")}
    env["OCCAMY_BROKER_CONF"] = "consumer_timeout = 5000"
    started = False
    log = recorder_log()
    try:
        started = True
        p = subprocess.run([os.path.join(ROOT, "tests", "broker"), "start"], env=env,
                           capture_output=True, text=True, timeout=180 * SCALE,
                           stdin=subprocess.DEVNULL)
        for line in p.stdout.splitlines():
            if line.startswith("export "):
                k, _, v = line[len("export "):].partition("=")
                env[k] = shlex.split(v)[0] if v else ""
        assert p.returncode == 0, p.stderr[-2000:]
        uri = env["OCCAMY_TEST_AMQP_URI"]
        with Daemon({"recorder": {"log": log}}, slots=1, uri=uri, queue_type="quorum",
                    delivery_limit=1, ready=False) as d:
            conn = pika.BlockingConnection(pika.URLParameters(uri))

            def dead():
                try:
                    return conn.channel().queue_declare(d.names["dead_letter_queue"],
                                                        passive=True).method.message_count
                except pika.exceptions.ChannelClosedByBroker:
                    return 0
            d.wait_log(r"connected to", 30)
            ch = conn.channel()
            ch.confirm_delivery()
            publish_request(d, "recorder", b"600000", task_id="long", ch=ch)
            wait_until(lambda: dead() > 0, 180, 1, "the long task dead-lettered")
            starts = recorder_lines(log, "start")
            ends = recorder_lines(log, "end")
            conn.close()
            timeouts = re.findall(r"^.*delivery acknowledgement on channel 1 timed out.*$",
                                  d.log(), re.M)
            note(f"consumer_timeout 5 s: {len(starts)} runs, {len(timeouts)} channel "
                 f"closes; first: {timeouts[0][:200] if timeouts else None}")
            assert len(starts) == 2, starts          # delivered, redelivered once, no more
            assert len(timeouts) == 2, d.log_tail()
            # The first run was cancelled before the second started.
            assert int(ends[0][0]) <= int(starts[1][0]), (starts, ends)
            assert d.stop() == 0
    finally:
        if started:
            subprocess.run([os.path.join(ROOT, "tests", "broker"), "stop"], env=env,
                           timeout=180, stdin=subprocess.DEVNULL, capture_output=True)
        os.unlink(log)


if __name__ == "__main__":
    run_tests(globals())
