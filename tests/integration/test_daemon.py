"""End-to-end: occamyd against the private RabbitMQ, with the test plugins.

Each test proves one promise of the daemon: replies, scenarios A and B,
control routing and help requests across two daemons, nothing lost when
servers are full, dead-lettering with reasons, the delivery limit, broker
restarts, graceful shutdown, and the metrics endpoint.
"""

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(__file__))
from occamy_test import (SCALE, Daemon, ReplyQueue, broker_restart, free_port,  # noqa: E402
                         get_dead_letters, note, publish_control, publish_request,
                         queue_counts, rpc, run_tests, scrape_metrics, timeout,
                         wait_until)


def recorder_log():
    fd, path = tempfile.mkstemp(prefix="occamy-rec-", suffix=".log")
    os.close(fd)
    return path


def events(path):
    """[(ns, what, kind_or_id, ...)] of a recorder log."""
    out = []
    with open(path) as f:
        for line in f:
            parts = line.split()
            if parts:
                out.append((int(parts[0]), *parts[1:]))
    return out


def running(path, kind=None, pid=None):
    """Tasks started and not ended, per the recorder log: {(kind, id, pid)}."""
    live = {}
    for ev in events(path):
        if ev[1] in ("start", "end"):
            key = (ev[2], ev[3], ev[4])
            live[key] = live.get(key, 0) + (1 if ev[1] == "start" else -1)
    return [k for k, n in live.items() if n > 0
            and (kind is None or k[0] == kind) and (pid is None or k[2] == str(pid))]


def count_running(path, kind=None, pid=None):
    """Like running() but counts every live task (helpers share IDs)."""
    live = 0
    for ev in events(path):
        if ev[1] in ("start", "end") and (kind is None or ev[2] == kind) \
                and (pid is None or ev[4] == str(pid)):
            live += 1 if ev[1] == "start" else -1
    return live


def promtool():
    """Path of promtool: on the PATH, or taken out of Debian's prometheus
    package into the build dir (downloaded, never installed: installing it
    would start a Prometheus server).  None if neither works."""
    import shutil
    found = shutil.which("promtool")
    cached = os.path.join(os.environ.get("OCCAMY_BUILD", "build"), "tools", "promtool")
    if found or os.path.exists(cached):
        return found or cached
    tmp = tempfile.mkdtemp(prefix="occamy-promtool-")
    try:
        subprocess.run(["apt-get", "download", "prometheus"], cwd=tmp, check=True,
                       capture_output=True, timeout=300)
        deb = [f for f in os.listdir(tmp) if f.endswith(".deb")][0]
        subprocess.run(["dpkg-deb", "-x", deb, "x"], cwd=tmp, check=True, timeout=300)
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        shutil.copy(os.path.join(tmp, "x", "usr", "bin", "promtool"), cached)
        return cached
    except (OSError, IndexError, subprocess.SubprocessError):
        return None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def scrape(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return text, values


# --------------------------------------------------------------------------

def test_request_with_reply_to_gets_its_result_and_queue_ends_empty():
    with Daemon(["noop"], slots=2) as d:
        r = rpc(d, "noop", b"hello occamy", timeout=20)
        assert r.body == b"hello occamy", r
        # Many at once, each answered once with its own correlation id.
        with ReplyQueue() as rq:
            for i in range(50):
                publish_request(d, "noop", f"m{i}".encode(), reply_to=rq.name,
                                correlation_id=str(i))
            got = {r.properties.correlation_id: r.body for r in rq.collect(50, timeout=30)}
        assert got == {str(i): f"m{i}".encode() for i in range(50)}, got
        wait_until(lambda: queue_counts(d) == (0, 1), 10, what="empty request queue")
        assert d.stop() == 0


def test_scenario_a_one_request_fills_every_slot_with_its_helpers():
    log = recorder_log()
    slots = 4
    with Daemon({"recorder": {"log": log}}, slots=slots) as d:
        publish_request(d, "recorder", b"3000", task_id="master-a")
        wait_until(lambda: count_running(log, "helper") == slots - 1, 10,
                   what=f"{slots - 1} helpers of the master")
        assert count_running(log, "master") == 1
        assert {k[1] for k in running(log)} == {"master-a"}, running(log)
        # When the master ends its helpers end with it: all slots empty.
        wait_until(lambda: count_running(log) == 0, 15, what="every slot empty")
        assert d.stop() == 0
    os.unlink(log)


def test_scenario_b_new_request_starts_at_once_on_a_helpers_slot():
    log = recorder_log()
    with Daemon({"recorder": {"log": log}}, slots=3, shutdown_grace_s=1) as d:
        publish_request(d, "recorder", b"20000", task_id="first")
        wait_until(lambda: count_running(log, "helper") == 2, 10, what="2 helpers")
        t0 = time.monotonic_ns()
        publish_request(d, "recorder", b"500", task_id="second")
        wait_until(lambda: ("master", "second", str(d.pid)) in running(log), 5,
                   what="the second request running")
        # It took a helper's slot: the first master still runs, one helper less.
        assert ("master", "first", str(d.pid)) in running(log)
        assert count_running(log, "helper") == 1, events(log)
        started = [e[0] for e in events(log) if e[1:3] == ("start", "master")
                   and e[3] == "second"][0]
        assert started >= t0
        assert queue_counts(d)[0] == 0
        assert d.stop() == 0
    os.unlink(log)


def test_control_message_reaches_the_task_with_its_id_on_either_daemon():
    log = recorder_log()
    a = Daemon({"recorder": {"log": log}}, slots=1)
    b = Daemon({"recorder": {"log": log}}, slots=1, names=a.names)
    with a, b:
        publish_request(a, "recorder", b"10000", task_id="t-one")
        publish_request(a, "recorder", b"10000", task_id="t-two")
        wait_until(lambda: count_running(log, "master") == 2, 10, what="both masters")
        owner = {k[1]: k[2] for k in running(log, "master")}
        assert set(owner.values()) == {str(a.pid), str(b.pid)}, owner
        publish_control(a, "t-two", b"ping-two")
        publish_control(a, "t-none", b"nobody")

        def handled():
            return [e for e in events(log) if e[1] == "handle"]
        wait_until(lambda: handled(), 5, what="handle() call")
        time.sleep(0.3)
        h = handled()
        assert len(h) == 1, h
        assert h[0][2] == "t-two" and h[0][3] == owner["t-two"] and h[0][4] == "ping-two", h
    os.unlink(log)


@timeout(90)
def test_help_request_from_a_master_is_served_by_another_daemon():
    a = Daemon(["expander"], slots=2)
    b = Daemon(["expander"], slots=2, names=a.names)
    with a, b:
        r = rpc(a, "expander", b"20000,3", timeout=40)
        m = re.match(r"reports=(\d+) internal=(\d+) external=(\d+)", r.text)
        assert m, r
        reports, internal, external = map(int, m.groups())
        # One slot beside the master is internal; the other daemon's two
        # slots go to external helpers that reported back by task ID.
        assert reports >= 3 and internal >= 1 and external >= 2, r.text


@timeout(90)
def test_one_help_request_fills_an_idle_4_slot_daemon_at_once():
    # With expansion_period_ms = 1000 the periodic pass cannot be what fills
    # the slots: the help request's arrival wakes expansion (one external),
    # and that external's start wakes it again so its own expand() takes the
    # other three.  Without the second wake the three would wait for the
    # next period (0-1000 ms later); five rounds all under 300 ms cannot
    # happen by luck (0.3^5).
    port = free_port()
    with Daemon(["expander"], slots=4, expansion_period_ms=1000,
                metrics_listen=f"127.0.0.1:{port}") as d:
        def external():
            return scrape_metrics(port)['occamy_slots{status="external"}']
        fills = []
        for i in range(5):
            deadline_ms = int(time.time() * 1000) + 600 * SCALE
            t0 = time.monotonic()
            publish_control(d, body=f"fill-{i} {deadline_ms}".encode(), handler="expander")
            seen = 0
            while seen < 4 and time.monotonic() - t0 < 5 * SCALE:
                seen = max(seen, external())
            fills.append(time.monotonic() - t0)
            assert seen == 4, f"round {i}: at most {seen:.0f} of 4 slots external at once"
            # The externals end at their master's deadline; start the next
            # round on an idle daemon.
            wait_until(lambda: scrape_metrics(port)['occamy_slots{status="empty"}'] == 4,
                       10, 0.02, "every slot empty again")
        note("publish -> 4 of 4 slots external (seen by polling /metrics): "
             + ", ".join(f"{t * 1000:.1f}" for t in fills) + " ms")
        assert max(fills) < 0.3 * SCALE, fills
        assert d.stop() == 0


@timeout(120)
def test_two_full_daemons_lose_nothing():
    a = Daemon(["sleep"], slots=2)
    b = Daemon(["sleep"], slots=2, names=a.names)
    n = 24
    with a, b, ReplyQueue() as rq:
        for i in range(n):
            publish_request(a, "sleep", b"150", reply_to=rq.name, correlation_id=str(i))
        got = rq.collect(n, timeout=60)
        assert sorted(int(r.properties.correlation_id) for r in got) == list(range(n))
        assert all(r.body == b"slept 150" for r in got), got
        wait_until(lambda: queue_counts(a)[0] == 0, 10, what="empty queue")
        assert a.stop() == 0 and b.stop() == 0


def test_invalid_messages_are_dead_lettered_with_a_reason():
    with Daemon(["noop", "fail"], slots=2) as d:
        publish_request(d, "nosuch", b"x")
        publish_request(d, "fail", b"invalid_body")
        publish_request(d, "fail", b"garbage")
        publish_request(d, None, b"no handler header")
        publish_control(d, task_id=12345, body=b"int task id")
        dead = get_dead_letters(d, min_count=5, timeout=15)
        reasons = sorted(h.get("x-occamy-error", "") for h, _ in dead)
        assert len(dead) == 5, dead
        assert any("unknown handler 'nosuch'" in r for r in reasons), reasons
        assert sum("invalid_body" in r for r in reasons) == 2, reasons
        assert any("no 'handler' header" in r for r in reasons), reasons
        assert any("not a string" in r for r in reasons), reasons
        # ...and it keeps serving.
        assert rpc(d, "noop", b"still here").body == b"still here"
        assert d.stop() == 0


@timeout(90)
def test_internal_errors_are_retried_then_dead_lettered_at_the_limit():
    for queue_type in ("quorum", "classic"):
        with Daemon(["fail", "noop"], slots=1, queue_type=queue_type, delivery_limit=3) as d:
            publish_request(d, "fail", b"internal")
            dead = get_dead_letters(d, min_count=1, timeout=30)
            assert len(dead) == 1, (queue_type, dead)
            assert "internal" in dead[0][0].get("x-occamy-error", ""), dead
            assert queue_counts(d)[0] == 0
            assert d.stop() == 0


@timeout(240)
def test_broker_restart_mid_run_every_request_completes():
    n = 30
    with Daemon(["sleep"], slots=2, heartbeat_s=5) as d, ReplyQueue() as rq:
        for i in range(n):
            publish_request(d, "sleep", b"100", reply_to=rq.name, correlation_id=str(i))
        wait_until(lambda: len(rq.received) >= 3 or rq.conn.process_data_events(0.1),
                   20, what="some replies before the restart")
        rq.close()
        pos = d.log_size()
        broker_restart()
        d.wait_log(r"connected to amqp", timeout=60, after=pos)
        assert d.running
        # Replies sent before the restart went to a queue that died with the
        # connection; ask for the results again with a fresh reply queue.
        with ReplyQueue() as rq2:
            got = set()
            for i in range(n):
                publish_request(d, "sleep", b"10", reply_to=rq2.name, correlation_id=f"b{i}")
            for r in rq2.collect(n, timeout=90):
                got.add(r.properties.correlation_id)
            assert got == {f"b{i}" for i in range(n)}
        # Nothing of the first batch is left behind either.
        wait_until(lambda: queue_counts(d)[0] == 0, 60, what="the queue drained")
        assert d.stop() == 0


def test_sigterm_requeues_protected_tasks_past_the_grace():
    with Daemon(["sleep"], slots=3, shutdown_grace_s=1) as d, ReplyQueue() as rq:
        publish_request(d, "sleep", b"60000", reply_to=rq.name, correlation_id="long1")
        publish_request(d, "sleep", b"60000", reply_to=rq.name, correlation_id="long2")
        publish_request(d, "sleep", b"300", reply_to=rq.name, correlation_id="short")
        wait_until(lambda: queue_counts(d)[0] == 0, 10, what="all three taken")
        time.sleep(0.2)
        t0 = time.monotonic()
        assert d.stop(signal.SIGTERM, timeout=30) == 0
        assert time.monotonic() - t0 < 10
        # The short one finished; the long ones are back in the queue.
        got = rq.collect(1, timeout=5)
        assert [r.properties.correlation_id for r in got] == ["short"]
        wait_until(lambda: queue_counts(d) == (2, 0), 10, what="2 messages requeued")
        time.sleep(0.5)
        rq.conn.process_data_events(0.2)
        assert rq.received == [], "no reply for work that did not finish"


@timeout(90)
def test_metrics_count_a_known_sequence():
    port = free_port()
    log = recorder_log()
    with Daemon({"recorder": {"log": log}, "sleep": {}}, slots=3,
                metrics_listen=f"127.0.0.1:{port}") as d:
        publish_request(d, "recorder", b"4000", task_id="m")
        wait_until(lambda: count_running(log, "helper") == 2, 10, what="2 helpers")
        with ReplyQueue() as rq:
            publish_request(d, "sleep", b"200", reply_to=rq.name, correlation_id="1")
            rq.collect(1, timeout=10)
            wait_until(lambda: count_running(log, "helper") == 2, 10, what="helpers back")
            publish_request(d, "sleep", b"200", reply_to=rq.name, correlation_id="2")
            rq.collect(1, timeout=10)
        publish_request(d, "nosuch", b"")
        get_dead_letters(d, min_count=1, timeout=10)
        wait_until(lambda: count_running(log, "master") == 0, 15, what="master done")
        text, v = scrape(port)
        assert v["occamy_requests_total"] == 4, text
        assert v["occamy_preemptions_total"] == 2, text
        assert v['occamy_settlements_total{outcome="ack"}'] == 3, text
        assert v['occamy_settlements_total{outcome="dead_letter"}'] == 1, text
        assert v['occamy_errors_total{kind="make_task"}'] == 1, text
        assert v["occamy_admission_latency_seconds_count"] == 3, text
        assert v['occamy_helpers_started_total{kind="internal"}'] >= 2, text
        assert v["occamy_slots_capacity"] == 3 and v["occamy_broker_connected"] == 1, text
        assert v['occamy_tasks_total{group="sleep",status="protected",result="ok"}'] == 2, text
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            assert r.headers["Content-Type"].startswith("text/plain")
        tool = promtool()
        if tool:
            p = subprocess.run([tool, "check", "metrics"], input=text, capture_output=True,
                               text=True, timeout=60)
            assert p.returncode == 0, p.stdout + p.stderr
            note("promtool check metrics: OK")
        else:
            note("promtool not available: exposition format not cross-checked")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=5)
            raise AssertionError("expected 404")
        except urllib.error.HTTPError as e:
            assert e.code == 404
        assert d.stop() == 0
    os.unlink(log)


if __name__ == "__main__":
    run_tests(globals())
