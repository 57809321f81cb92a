#!/usr/bin/python3
"""test_cluster - occamy on a 3-node RabbitMQ 3.10 cluster (issue 17).

Needs the cluster of tests/cluster (tests/run starts it for this file only;
by hand: `tests/cluster run /usr/bin/python3 tests/integration/test_cluster.py`
inside `tests/broker run`).  Its nodes are a, b and c; OCCAMY_TEST_CLUSTER_URIS
holds their AMQP URIs in that order.  Every test first restarts a node that
an earlier one left down, and restarts the node it takes down in `finally`.

- the cluster forms: three running nodes;
- a quorum queue loses nothing when the node that declared it (its leader)
  is killed hard: 100 persistent, confirmed messages are all consumed
  through another node, and the node rejoins;
- a daemon on node b consuming a quorum request queue whose leader is on a:
  a is killed hard, every request of a stream gets its reply, and requests
  published after the leader moved are served too (the daemon consumes
  again, whether or not the broker cancelled its consumer);
- a node no daemon is connected to, and that leads no queue, is killed
  hard: nothing notices (no reconnect, every reply, no duplicate);
- with `uri` listing all three nodes (the transport takes several URIs;
  these tests fail, not skip, if `occamyd -t` refuses such a file): the
  node the daemon is connected to (and that leads its request queue) is
  killed hard, or stopped gracefully; the daemon reconnects to another node
  and every request of a stream completes, at least once (0 lost,
  duplicates counted and printed); the failover time (node down -> first
  reply through another node) is printed;
- a minority partition: node c, with a daemon connected to it, is cut off
  from a and b (`tests/cluster isolate`, then `freeze`/`thaw`: see the
  test's comment for what that does and what RabbitMQ does); a and b
  declare it down after net_ticktime (4 s in tests/cluster), c pauses
  (pause_minority) and closes its client connections, its daemon consumes
  again on a or b; every request of a stream gets its reply (0 lost:
  nothing the daemon on c took was acked into the void), duplicates and
  the time from the partition to that daemon consuming again are printed;
  c rejoins once healed (or is restarted), so later tests find three nodes.

Node losses are detected by watching deliveries and the daemon's own TCP
connections, not by consumer counts: after a node dies, 3.10 keeps counting
its consumers (suspected_down).
"""

import calendar
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import shutil
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from occamy_test import (  # noqa: E402
    OCCAMYD, ROOT, SCALE, Daemon, free_port, note, publish_request, run_tests,
    scrape_metrics, skip, timeout, wait_until)

import pika  # noqa: E402

CLUSTER = os.path.join(ROOT, "tests", "cluster")
LETTERS = ("a", "b", "c")
URIS = os.environ.get("OCCAMY_TEST_CLUSTER_URIS", "").split()
NODES = os.environ.get("OCCAMY_TEST_CLUSTER_NODES", "").split()
PORTS = [int(p) for p in os.environ.get("OCCAMY_TEST_CLUSTER_PORTS", "").split()]


# ------------------------------------------------------------------ cluster

def need_cluster():
    if len(URIS) != 3 or len(PORTS) != 3 or not os.environ.get("OCCAMY_TEST_CLUSTER_DIR"):
        skip("no cluster: run through tests/run, or inside tests/cluster run")


def cluster(*args, timeout=300):
    """tests/cluster ARGS; returns stdout, fails on a non-zero exit."""
    p = subprocess.run([CLUSTER, *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        raise AssertionError(f"tests/cluster {' '.join(map(str, args))} failed "
                             f"({p.returncode}): {p.stderr.strip()} {p.stdout.strip()}")
    return p.stdout


def ctl(node, *args):
    return cluster("ctl", node, *args, timeout=120)


def uri_of(letter):
    return URIS[LETTERS.index(letter)]


def port_open(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def node_up(letter):
    return port_open(PORTS[LETTERS.index(letter)])


def running_nodes(via):
    return json.loads(ctl(via, "cluster_status", "--formatter", "json"))["running_nodes"]


def ensure_all_up():
    """Start whatever node an earlier test left down; wait for 3 running."""
    for letter in LETTERS:
        if not node_up(letter):
            note(f"node {letter} was down: starting it")
            cluster("start-node", letter)
    via = next(letter for letter in LETTERS if node_up(letter))
    wait_until(lambda: len(running_nodes(via)) == 3, 60, 1, "3 running nodes")


class NodeDown:
    """with NodeDown("a", "kill" | "stop") as nd: ... nd.down() ...
    takes the node down when asked (nd.at = time.monotonic() then) and
    always starts it again on leaving, waiting until it rejoined."""

    def __init__(self, letter, how="kill"):
        self.letter, self.how, self.at = letter, how, None

    def down(self):
        self.at = time.monotonic()
        cluster("kill" if self.how == "kill" else "stop-node", self.letter)
        note(f"node {self.letter} {'killed' if self.how == 'kill' else 'stopped'} "
             f"in {time.monotonic() - self.at:.1f}s")
        return self.at

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if self.at is None or node_up(self.letter):
            return False
        t0 = time.monotonic()
        try:
            cluster("start-node", self.letter)
        except AssertionError as e:
            if exc_type is None:
                raise
            note(f"restarting node {self.letter} failed too: {e}")
            return False
        note(f"node {self.letter} restarted and rejoined in {time.monotonic() - t0:.1f}s")
        return False


def connect(letter):
    return pika.BlockingConnection(pika.URLParameters(uri_of(letter)))


def consumers(letter, queue):
    """Consumer count of queue as node letter sees it (None: no queue)."""
    conn = connect(letter)
    try:
        return conn.channel().queue_declare(queue, passive=True).method.consumer_count
    except pika.exceptions.ChannelClosedByBroker as e:
        if e.reply_code == 404:
            return None
        raise
    finally:
        if conn.is_open:
            conn.close()


def queue_leader(via, queue):
    """The node name leading quorum queue `queue` (None if unknown)."""
    try:
        rows = json.loads(ctl(via, "list_queues", "name", "leader", "--formatter", "json"))
    except (AssertionError, ValueError):
        return None
    return next((r.get("leader") for r in rows if r.get("name") == queue), None)


def daemon_node(d):
    """The node (a, b or c) of the daemon's established AMQP connection, or
    None: from its socket inodes and /proc/PID/net/tcp{,6}."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{d.pid}/fd"):
            try:
                target = os.readlink(f"/proc/{d.pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        return None
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{d.pid}/net/{table}") as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) < 10 or fields[3] != "01" or fields[9] not in inodes:
                continue
            port = int(fields[2].rsplit(":", 1)[1], 16)
            if port in PORTS:
                return LETTERS[PORTS.index(port)]
    return None


def wait_consuming(d, letter_for_counts):
    """Wait until the request queue of d (started by `with`, ready=False)
    has a consumer (as node letter_for_counts sees it) and d is connected to
    a node; returns that node."""
    def consuming():
        d._check_alive("before consuming")
        c = consumers(letter_for_counts, d.names["request_queue"])
        return c is not None and c >= 1 and daemon_node(d)
    return wait_until(consuming, 30, 0.2, "occamyd to consume on the cluster")


def quorum_queue_led_by_a():
    """Fresh names whose quorum request queue a daemon on node a declared
    (so its leader is on a) and left; returns the names."""
    with Daemon(["sleep"], slots=2, uri=uri_of("a"), queue_type="quorum", ready=False) as d:
        wait_consuming(d, "a")
        assert d.stop() == 0
        names = d.names
    leader = queue_leader("b", names["request_queue"])
    assert leader in (None, NODES[0]), leader
    return names, leader


# ------------------------------------------------------------- multi-URI

_MULTI = None


def multi_uri_supported():
    """Does occamyd take several URIs?  `occamyd -t` on a file listing the
    three nodes."""
    global _MULTI
    if _MULTI is None:
        tmp = tempfile.mkdtemp(prefix="occamy-test-")
        try:
            ini = os.path.join(tmp, "occamy.ini")
            with open(ini, "w") as f:
                f.write("[amqp]\nuri = " + " ".join(URIS or [
                    "amqp://guest:guest@127.0.0.1:1/", "amqp://guest:guest@127.0.0.1:2/"]) + "\n")
            p = subprocess.run([OCCAMYD, "-t", "-c", ini], capture_output=True, text=True,
                               timeout=30 * SCALE, stdin=subprocess.DEVNULL)
            _MULTI = p.returncode == 0
            if not _MULTI:
                note("occamyd -t refuses several URIs: " + (p.stdout + p.stderr).strip())
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return _MULTI


def need_failover():
    # The transport takes several URIs: a refusal is a regression, not a
    # reason to skip.
    if not multi_uri_supported():
        raise AssertionError("occamyd -t refuses a uri listing the three nodes")


# ----------------------------------------------------------------- streams

class Stream:
    """Requests for the sleep plugin with replies, through node `letter`:
    publish(n) then pump() until every one has a reply.  replies maps a
    correlation id to [arrival times]."""

    def __init__(self, d, letter, ms=20):
        self.d, self.letter, self.ms = d, letter, ms
        self.conn = connect(letter)
        self.ch = self.conn.channel()
        self.ch.confirm_delivery()
        self.queue = self.ch.queue_declare("", exclusive=True, auto_delete=True).method.queue
        self.replies = {}
        self.sent = []
        self.sent_at = {}
        self.ch.basic_consume(self.queue, self._on_reply, auto_ack=True)

    def _on_reply(self, ch, method, props, body):
        self.replies.setdefault(props.correlation_id, []).append(time.monotonic())

    def publish(self, n, prefix="r", retry_for=30):
        for i in range(n):
            cid = f"{prefix}{len(self.sent)}"
            deadline = time.monotonic() + retry_for * SCALE
            while True:
                try:
                    publish_request(self.d, "sleep", str(self.ms), reply_to=self.queue,
                                    correlation_id=cid, ch=self.ch)
                    break
                except pika.exceptions.NackError:
                    # a quorum queue electing a leader nacks: retry
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            self.sent.append(cid)
            self.sent_at[cid] = time.monotonic()

    def pump(self, until, timeout=120, what="replies"):
        deadline = time.monotonic() + timeout * SCALE
        while not until():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout * SCALE}s waiting for {what}: "
                                     f"{len(self.answered())} of {len(self.sent)} answered\n"
                                     + self.d.log_tail())
            self.conn.process_data_events(time_limit=0.1)

    def answered(self):
        return [c for c in self.sent if c in self.replies]

    def all_answered(self):
        return len(self.answered()) == len(self.sent)

    def lost(self):
        return [c for c in self.sent if c not in self.replies]

    def duplicates(self):
        return sum(len(t) - 1 for t in self.replies.values())

    def waits(self):
        """Seconds from each answered request's publish to its first reply."""
        return [self.replies[c][0] - self.sent_at[c] for c in self.sent if c in self.replies]

    def first_reply_after(self, t):
        times = [x for ts in self.replies.values() for x in ts if x > t]
        return min(times) if times else None

    def close(self):
        if self.conn.is_open:
            self.conn.close()


# -------------------------------------------------------------------- tests

@timeout(120)
def test_cluster_forms_three_running_nodes():
    need_cluster()
    ensure_all_up()
    for letter in LETTERS:
        nodes = running_nodes(letter)
        assert sorted(nodes) == sorted(NODES), (letter, nodes, NODES)
    st = json.loads(ctl("a", "cluster_status", "--formatter", "json"))
    assert sorted(st.get("disk_nodes", [])) == sorted(NODES), st


@timeout(240)
def test_quorum_queue_survives_a_node_killed_hard():
    need_cluster()
    ensure_all_up()
    q = f"cluster.qq.{os.getpid()}.{int(time.time())}"
    conn = connect("a")
    try:
        ch = conn.channel()
        ch.queue_declare(q, durable=True, arguments={"x-queue-type": "quorum"})
        ch.confirm_delivery()
        for i in range(100):
            ch.basic_publish("", q, str(i).encode(), pika.BasicProperties(delivery_mode=2),
                             mandatory=True)
    finally:
        if conn.is_open:
            conn.close()
    note(f"leader of {q}: {queue_leader('b', q)}")
    with NodeDown("a", "kill") as nd:
        nd.down()
        assert not node_up("a")
        got = []
        state = {"conn": None}

        def drain():
            # During the leader election a get can fail (541 nodedown closes
            # the connection): retry on a new connection.
            try:
                if state["conn"] is None or not state["conn"].is_open:
                    state["conn"] = connect("b")
                    state["ch"] = state["conn"].channel()
                ch = state["ch"]
                while True:
                    m, _, body = ch.basic_get(q, auto_ack=False)
                    if m is None:
                        return len(set(got)) >= 100
                    got.append(int(body))
                    ch.basic_ack(m.delivery_tag)
            except pika.exceptions.AMQPError as e:
                note(f"basic.get during the election: {e!r}")
                state["conn"] = None
                return False
        try:
            wait_until(drain, 60, 0.2, "100 messages through node b")
        finally:
            if state["conn"] is not None and state["conn"].is_open:
                state["conn"].close()
        # unacked gets of a closed connection come back: at least once
        assert sorted(set(got)) == list(range(100)), got
        note(f"{len(got) - len(set(got))} redelivered; new leader: {queue_leader('b', q)}; "
             f"running: {running_nodes('b')}")
        assert len(running_nodes("b")) == 2
    wait_until(lambda: len(running_nodes("b")) == 3, 60, 1, "node a to rejoin")
    conn = connect("a")
    try:
        conn.channel().queue_delete(q)
    finally:
        if conn.is_open:
            conn.close()


@timeout(300)
def test_quorum_request_queue_leader_loss_is_followed_by_reconsuming():
    # d1 declares the request queue through node a (its leader is on a) and
    # leaves; d2 consumes it through node b.  Killing a moves the leader:
    # every request is answered, before and after the move.
    need_cluster()
    ensure_all_up()
    names, leader = quorum_queue_led_by_a()
    note(f"request queue leader: {leader}")
    with Daemon(["sleep"], names=names, slots=4, uri=uri_of("b"), queue_type="quorum",
                args=["-v"], ready=False) as d, NodeDown("a", "kill") as nd:
        wait_consuming(d, "b")
        s = Stream(d, "c")
        try:
            s.publish(200)
            s.pump(lambda: len(s.answered()) >= 50, what="50 replies before the kill")
            nd.down()
            s.pump(s.all_answered, what="every reply after the leader moved")
            t_after = time.monotonic()
            s.publish(50, prefix="late")
            s.pump(s.all_answered, what="replies to requests published after the move")
            first = s.first_reply_after(t_after)
            note(f"leader now {queue_leader('b', names['request_queue'])}; "
                 f"first reply after the kill {s.first_reply_after(nd.at) - nd.at:.2f}s; "
                 f"{s.duplicates()} duplicates; "
                 f"reconnects: {d.log().count('lost:')}")
            assert first is not None
            assert not s.lost(), s.lost()
        finally:
            s.close()
        assert d.stop() == 0


@timeout(300)
def test_a_bystander_node_killed_hard_changes_nothing():
    # The daemon is connected to b, which leads its request queue; c dies.
    need_cluster()
    ensure_all_up()
    with Daemon(["sleep"], slots=4, uri=uri_of("b"), queue_type="quorum", args=["-v"],
                ready=False) as d, NodeDown("c", "kill") as nd:
        wait_consuming(d, "b")
        s = Stream(d, "a")
        try:
            s.publish(200)
            s.pump(lambda: len(s.answered()) >= 50, what="50 replies before the kill")
            nd.down()
            s.pump(s.all_answered, what="every reply")
            s.publish(50, prefix="late")
            s.pump(s.all_answered, what="replies after the kill")
            note(f"{s.duplicates()} duplicates")
            assert not s.lost(), s.lost()
            assert s.duplicates() == 0, s.duplicates()
            assert daemon_node(d) == "b"
            assert "lost:" not in d.log(), d.log_tail()
        finally:
            s.close()
        assert d.stop() == 0


def _failover(how, n=400):
    need_cluster()
    need_failover()
    ensure_all_up()
    with Daemon(["sleep"], slots=4, uri=" ".join(URIS), queue_type="quorum", args=["-v"],
                ready=False) as d, \
            Daemon(["sleep"], slots=2, uri=" ".join(URIS), queue_type="quorum", args=["-v"],
                   ready=False, names=d.names) as d2:
        victim = wait_until(lambda: d._check_alive("before connecting") or daemon_node(d),
                            30, 0.1, "occamyd to connect to a node")
        wait_until(lambda: d2._check_alive("before connecting") or daemon_node(d2),
                   30, 0.1, "the second occamyd to connect to a node")
        survivor = next(letter for letter in LETTERS if letter != victim)
        wait_until(lambda: (consumers(survivor, d.names["request_queue"]) or 0) >= 1, 30, 0.2,
                   "occamyd to consume")
        note(f"daemon connected to node {victim}; requests and replies through {survivor}; "
             f"request queue leader {queue_leader(survivor, d.names['request_queue'])}")
        with NodeDown(victim, how) as nd:
            s = Stream(d, survivor)
            try:
                s.publish(n)
                s.pump(lambda: len(s.answered()) >= n // 4, what=f"{n // 4} replies before")
                nd.down()
                s.pump(s.all_answered, timeout=180, what="every reply after the failover")
                first = s.first_reply_after(nd.at)
                now_on = daemon_node(d)
                note(f"failover time ({how}, node {victim} down -> first reply through "
                     f"node {now_on}): {first - nd.at:.2f}s",
                     f"{len(s.answered())} of {n} answered, {s.duplicates()} duplicates "
                     f"(at least once)")
                assert not s.lost(), s.lost()
                assert now_on not in (None, victim), now_on
                # Every daemon consumes again, wherever it was connected.
                for x in (d, d2):
                    wait_until(lambda: daemon_node(x) not in (None, victim), 30, 0.2,
                               "every daemon connected to a node that is up")
                note(f"second daemon on node {daemon_node(d2)}; reconnects: "
                     f"{d.log().count('lost:')} and {d2.log().count('lost:')}")
                # and they consume there: requests published now are served
                s.publish(40, prefix="late")
                s.pump(s.all_answered, what="replies to requests after the failover")
            finally:
                s.close()
        assert d.stop() == 0 and d2.stop() == 0


@timeout(420)
def test_daemon_fails_over_when_its_node_is_killed_hard():
    _failover("kill")


@timeout(420)
def test_daemon_fails_over_when_its_node_stops_gracefully():
    _failover("stop")


# --------------------------------------------------------------- partition

CLUSTER_DIR = os.environ.get("OCCAMY_TEST_CLUSTER_DIR", "")


class NodeLog:
    """The RabbitMQ log of node `letter` from now on."""

    def __init__(self, letter):
        self.letter = letter
        self.path = os.path.join(CLUSTER_DIR, letter, "log", NODES[LETTERS.index(letter)] + ".log")
        self.start = os.path.getsize(self.path)

    def text(self):
        with open(self.path, "rb") as f:
            f.seek(self.start)
            return f.read().decode("utf-8", "replace")

    def has(self, regex):
        return re.search(regex, self.text(), re.M)


def daemon_on(stack, letters, **keys):
    """A Daemon (sleep, quorum, `uri` listing all three nodes) connected to
    one of `letters`, entered into ExitStack `stack`; returns it and how
    many were started.  The node a daemon starts at is a hash of its host
    name and pid, so start daemons until one lands there (each does with
    probability len(letters)/3)."""
    for attempt in range(1, 41):
        d = Daemon(["sleep"], uri=" ".join(URIS), queue_type="quorum", args=["-v"],
                   ready=False, **keys)
        with contextlib.ExitStack() as one:
            one.enter_context(d)
            d.wait_log(r"connected to ", 30)
            node = wait_until(lambda: d._check_alive("after connecting") or daemon_node(d),
                              30, 0.1, "occamyd's connection to a node")
            if node in letters:
                stack.push(one.pop_all())
                return d, attempt
            assert d.stop() == 0
    raise AssertionError(f"40 daemons, none connected to {letters}")


def log_time(line):
    """The time of an occamyd log line (2026-12-02T12:00:00.123Z ...)."""
    stamp = line.split(" ", 1)[0]
    return calendar.timegm(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S")) + \
        float("0" + stamp[19:-1])


def request_deliveries(port):
    return scrape_metrics(port).get('occamy_deliveries_total{queue="request"}', 0)


def flow(s, until, timeout, what, rate=20):
    """Keep the stream going at `rate` requests a second, taking replies
    in between, until until() is true; returns its value."""
    deadline = time.monotonic() + timeout * SCALE
    due = time.monotonic()
    while True:
        v = until()
        if v:
            return v
        now = time.monotonic()
        if now > deadline:
            raise AssertionError(f"timed out after {timeout * SCALE}s waiting for {what}: "
                                 f"{len(s.answered())} of {len(s.sent)} answered")
        while due <= now:
            s.publish(1)
            due += 1 / rate
        s.conn.process_data_events(time_limit=max(0.01, min(0.1, due - time.monotonic())))


def cluster_bg(*args):
    """tests/cluster ARGS in the background: done(p) says when it is."""
    return subprocess.Popen([CLUSTER, *map(str, args)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def done(p):
    if p.poll() is None:
        return False
    out, err = p.communicate()
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(p.args)} failed ({p.returncode}): "
                             f"{err.strip()} {out.strip()}")
    return True


def cluster_whole():
    """Three running nodes and no partition, as node a sees it."""
    try:
        st = json.loads(ctl("a", "cluster_status", "--formatter", "json"))
    except (AssertionError, ValueError, subprocess.TimeoutExpired):
        return False
    return len(st.get("running_nodes", [])) == 3 and not st.get("partitions")


def restore_cluster(minority):
    """Whatever the partition test left: thaw and heal the minority node,
    wait for three running nodes and no partition; restart the node if that
    does not come, so that the tests after this one find a whole cluster.
    Returns whether the node came back by itself."""
    for what in ("thaw", "heal"):
        try:
            cluster(what, minority, timeout=60)
        except (AssertionError, subprocess.TimeoutExpired) as e:
            note(f"{what} {minority} failed: {e}")
    try:
        wait_until(cluster_whole, 60, 1, f"node {minority} to rejoin")
        return True
    except AssertionError:
        pass
    note(f"node {minority} did not rejoin by itself: restarting it")
    if node_up(minority):
        cluster("kill", minority)
    cluster("start-node", minority)
    wait_until(cluster_whole, 60, 1, "three running nodes, no partition")
    return False


@timeout(300)
def test_minority_partition_loses_nothing_and_its_daemon_moves_to_the_majority():
    # Node c is cut off from a and b: `tests/cluster isolate c` makes c
    # expect another Erlang cookie from a and b (erlang:set_cookie/2), so
    # that no distribution connection between them can be set up again,
    # and `freeze c` (SIGSTOP of its beam.smp) breaks the ones there are:
    # after net_ticktime (4 s here) a and b log "node c down:
    # net_tick_timeout" and the quorum queue returns what c's consumer held.
    # The daemon on c has seen nothing: its TCP connection is open, its
    # heartbeat (30 s) has not expired, its replies wait unconfirmed in c's
    # socket buffer.  Then `thaw c`: c finds a and b gone and cannot reach
    # them; pause_minority pauses it ("Cluster minority/secondary status
    # detected - awaiting recovery": rabbit stops, every client connection
    # is closed with 320 CONNECTION_FORCED) and what it read from the
    # daemon goes nowhere.  Then `heal c`: c sees the majority again,
    # starts rabbit and rejoins; cluster_status lists no partition.
    # (Without `isolate`, SIGSTOP and SIGCONT alone, RabbitMQ 3.10 often
    # reconnected before it counted its peers: c did not pause, and
    # cluster_status went on listing a partition until c was restarted.)
    # Not reproduced: a minority node that keeps running while its peers
    # are silent (a frozen c takes nothing from its clients meanwhile).
    #
    # The request queue's leader is on a, the majority: the daemon on c
    # works for a leader that its node cannot reach.  Every request of the
    # stream must be answered (0 lost: nothing the daemon on c took, ran
    # or replied to was lost with c), and that daemon must consume again
    # on a or b, once; the daemon on the majority side keeps its
    # connection.
    need_cluster()
    need_failover()
    ensure_all_up()
    names, leader = quorum_queue_led_by_a()
    port = free_port()
    with contextlib.ExitStack() as stack:
        dc, tries_c = daemon_on(stack, ("c",), names=names, slots=4,
                                metrics_listen=f"127.0.0.1:{port}")
        dm, tries_m = daemon_on(stack, ("a", "b"), names=names, slots=2)
        majority = daemon_node(dm)
        note(f"daemon on c (after {tries_c} starts), daemon on {majority} (after {tries_m}); "
             f"request queue leader {leader}; requests and replies through b")
        s = Stream(dc, "b", ms=50)
        touched = False
        try:
            flow(s, lambda: len(s.answered()) >= 40, 60, "40 replies before the partition")
            assert request_deliveries(port) > 0, "the daemon on c took no request"
            logs = {letter: NodeLog(letter) for letter in LETTERS}
            log_at = dc.log_size()
            touched = True
            p = cluster_bg("isolate", "c")
            flow(s, lambda: done(p), 120, "isolate c")
            # A full hand on c, then silence.
            s.publish(12)
            t_part, at = time.time(), time.monotonic()
            cluster("freeze", "c")
            down = rf"node '{re.escape(NODES[2])}' down: (\S+)"
            flow(s, lambda: logs["a"].has(down) and logs["b"].has(down), 60,
                 "a and b to declare c down")
            t_down = time.monotonic() - at
            why_down = logs["a"].has(down).group(1)
            cluster("thaw", "c")
            t_thaw = time.monotonic()
            flow(s, lambda: logs["c"].has(r"Cluster minority/secondary status detected"), 60,
                 "c to pause (pause_minority)")
            t_pause = time.monotonic() - t_thaw
            # The daemon on c lost its connection and consumes again on the
            # majority side (paused, c accepts no connection).
            back = re.compile(r"^(\S+) \S+ connected to \S+:(\d+)/", re.M)
            line = flow(s, lambda: back.search(dc.log(), log_at), 60,
                        "the daemon on c to connect again")
            lost = re.search(r"^\S+ \S+ (AMQP connection to .* lost: .*)$", dc.log()[log_at:],
                             re.M)
            assert lost, dc.log_tail()
            moved_to = LETTERS[PORTS.index(int(line.group(2)))]
            assert moved_to != "c", dc.log_tail()
            t_back = log_time(line.group(0)) - t_part
            flow(s, lambda: daemon_node(dc) == moved_to, 30, "the daemon's new connection")
            before = request_deliveries(port)
            flow(s, lambda: request_deliveries(port) > before, 60,
                 "requests delivered to the daemon that was on c")
            t_heal = time.monotonic()
            p = cluster_bg("heal", "c")
            flow(s, lambda: done(p), 120, "heal c")
            flow(s, lambda: logs["c"].has(r"Server startup complete"), 60, "c to start again")
            t_rejoin = time.monotonic() - t_heal
            flow(s, lambda: len(s.sent) >= 400, 120, "400 requests", rate=40)
            s.publish(40, prefix="late")
            s.pump(s.all_answered, timeout=180, what="every reply after the partition")
        finally:
            if touched:
                restored = restore_cluster("c")
            s.close()
        m = scrape_metrics(port)
        waits = s.waits()
        held = sorted(w for w in waits if w > 1.5)
        note(f"partition -> daemon on c consuming again (on {moved_to}): {t_back:.2f}s",
             f"a and b declared c down after {t_down:.1f}s ({why_down}); c paused "
             f"{t_pause:.2f}s after it resumed; rejoined {t_rejoin:.1f}s after healing "
             f"({'by itself' if restored else 'after a restart'})",
             f"daemon on c: {lost.group(1)}",
             f"{len(s.answered())} of {len(s.sent)} answered, {s.duplicates()} duplicates; "
             f"{len(held)} waited more than 1.5 s for their reply ("
             + ", ".join(f"{w:.1f}" for w in held) + f"); the others at most "
             f"{max([w for w in waits if w <= 1.5] or [0]):.2f}s",
             f"daemon on c: /metrics reconnects {m['occamy_broker_reconnects_total']:.0f}, "
             f"stale settlements {m['occamy_stale_settlements_total']:.0f}, "
             f"requests {request_deliveries(port):.0f}; daemon on {majority}: "
             f"{dm.log().count('lost:')} lost connections")
        assert not s.lost(), s.lost()
        assert m["occamy_broker_reconnects_total"] == 1, m
        assert m["occamy_broker_connected"] == 1, m
        assert daemon_node(dm) == majority and "lost:" not in dm.log(), dm.log_tail()
        assert dc.stop() == 0 and dm.stop() == 0


if __name__ == "__main__":
    run_tests(globals())
