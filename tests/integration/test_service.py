"""occamyd as a service: what systemd, an operator and a plugin author see.

- the notify protocol, with the test playing systemd (READY, STATUS,
  WATCHDOG, RELOADING, STOPPING), including a transport loop that is really
  stuck (a broker that accepts TCP and never answers the AMQP handshake);
- SIGHUP reloads: a good new file takes effect, a broken one is refused;
- `occamyd -t`, the command line, and that the broker password never shows;
- `make install` into a DESTDIR, the unit (systemd-analyze verify and
  security), the man pages, a plugin built out of tree against the installed
  header and pkg-config file;
- occamyctl submit and status against running daemons.
"""

import glob
import os
import queue
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid

sys.path.insert(0, os.path.dirname(__file__))
from occamy_test import (AMQP_URI, BUILD, OCCAMYD, ROOT, SANITIZER, SCALE,  # noqa: E402
                         Daemon, broker_ctl, get_dead_letters, note, plugin_path,
                         publish_request, queue_counts, rpc, run_tests, skip, timeout,
                         wait_until)

OCCAMYCTL = os.path.join(BUILD, "occamyctl")
EX_USAGE, EX_TEMPFAIL, EX_CONFIG = 64, 75, 78
WATCHDOG_USEC = 400000
# systemd restarts a service that does not ping within WATCHDOG_USEC; the
# daemon promises a ping every half of it.  Allow some scheduling noise, and
# under sanitizers the whole interval (beyond it systemd would kill it).
PING_GAP_MAX = 0.3 if not SANITIZER else 0.4


# ------------------------------------------------------------------ helpers

def run(cmd, timeout=60, env=None, cwd=None, input=None):
    """Run cmd; return the CompletedProcess (text)."""
    e = dict(os.environ)
    e.pop("NOTIFY_SOCKET", None)
    e.update(env or {})
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout * SCALE,
                          env=e, cwd=cwd, input=input,
                          stdin=None if input is not None else subprocess.DEVNULL)


def out_of(p):
    return f"exit {p.returncode}\n--- stdout\n{p.stdout}--- stderr\n{p.stderr}"


class Msg:
    """One datagram from the daemon: arrival time, sender pid, fields."""

    def __init__(self, t, pid, text):
        self.t, self.pid, self.text = t, pid, text
        self.fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)

    def has(self, kv):
        k, v = kv.split("=", 1)
        return self.fields.get(k) == v

    def __repr__(self):
        return f"<{self.t:.3f} pid {self.pid} {self.text!r}>"


class NotifySocket:
    """The test plays systemd: an AF_UNIX datagram socket for NOTIFY_SOCKET.
    A thread timestamps every datagram and, with SO_PASSCRED, notes the
    sender's pid (systemd with NotifyAccess=main accepts only the main
    pid's)."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="occamy-notify-")
        self.path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.settimeout(0.05)
        self._msgs = []
        self._lock = threading.Lock()
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop:
            try:
                data, anc, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(12))
            except socket.timeout:
                continue
            except OSError:
                return
            t = time.monotonic()
            pid = None
            for level, kind, cdata in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("3i", cdata[:12])[0]
            with self._lock:
                self._msgs.append(Msg(t, pid, data.decode("utf-8", "replace")))

    def env(self, **more):
        """Environment for a Daemon: our socket and a 400 ms watchdog."""
        return {"NOTIFY_SOCKET": self.path, "WATCHDOG_USEC": str(WATCHDOG_USEC),
                "WATCHDOG_PID": None, **more}

    def msgs(self, start=0):
        with self._lock:
            return self._msgs[start:]

    def count(self):
        with self._lock:
            return len(self._msgs)

    def wait(self, kv, after=0, timeout=10):
        """The first message at index >= after with field kv ("READY=1"),
        or a STATUS containing text (kv = "STATUS~text"); returns (index,
        Msg)."""
        def find():
            for i, m in enumerate(self.msgs(after), after):
                if "~" in kv:
                    k, text = kv.split("~", 1)
                    if text in m.fields.get(k, ""):
                        return i, m
                elif m.has(kv):
                    return i, m
            return None
        try:
            return wait_until(find, timeout, 0.02, f"{kv} on the notify socket")
        except AssertionError as e:
            raise AssertionError(f"{e}; got: {self.msgs(after)[-20:]}") from None

    def times(self, kv, t0, t1):
        return [m.t for m in self.msgs() if m.has(kv) and t0 <= m.t <= t1]

    def statuses(self, t0, t1):
        return [m for m in self.msgs() if "STATUS" in m.fields and t0 <= m.t <= t1]

    def close(self):
        self._stop = True
        self._thread.join(2)
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class BrokerProxy:
    """A TCP proxy in front of the test broker.  forward: bytes pass both
    ways.  tarpit(): drop every forwarded connection and, from then on,
    accept new ones and never answer, like a broker that is up at the TCP
    level but hung: the daemon's transport thread then sits in a blocking
    AMQP handshake read (rabbitmq-c, up to its 5 s I/O timeout).  release():
    forward again and close the held connections, which ends the handshake
    read at once."""

    def __init__(self):
        u = urllib.parse.urlsplit(AMQP_URI)
        self.upstream = (u.hostname or "127.0.0.1", u.port or 5672)
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(16)
        self.port = self.lsock.getsockname()[1]
        self.user = u.username
        self.uri = f"amqp://{u.username}:{u.password}@127.0.0.1:{self.port}{u.path or '/'}"
        self.mode = "forward"
        self.peer = {}   # forwarded: socket -> the other end
        self.held = {}   # tarpit: socket -> {"accepted": t, "header": t or None}
        self.forwarded = 0
        self._lock = threading.Lock()
        self._cmds = queue.Queue()
        self._closed = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _close_pair(self, s):
        o = self.peer.pop(s, None)
        for x in (s, o):
            if x is not None:
                self.peer.pop(x, None)
                x.close()

    def _run(self):
        while not self._closed:
            while not self._cmds.empty():
                cmd, done = self._cmds.get()
                with self._lock:
                    if cmd == "tarpit":
                        self.mode = "tarpit"
                        for s in list(self.peer):
                            self._close_pair(s)
                    elif cmd == "release":
                        self.mode = "forward"
                        for s in list(self.held):
                            s.close()
                        self.held.clear()
                    elif cmd == "close":
                        self._closed = True
                        for s in list(self.peer):
                            self._close_pair(s)
                        for s in list(self.held):
                            s.close()
                        self.held.clear()
                        self.lsock.close()
                done.set()
            if self._closed:
                return
            with self._lock:
                rlist = [self.lsock] + list(self.peer) + list(self.held)
            r, _, _ = select.select(rlist, [], [], 0.02)
            now = time.monotonic()
            with self._lock:
                for s in r:
                    if s is self.lsock:
                        c, _ = s.accept()
                        if self.mode == "forward":
                            try:
                                up = socket.create_connection(self.upstream, timeout=10)
                            except OSError:
                                c.close()
                                continue
                            self.peer[c], self.peer[up] = up, c
                            self.forwarded += 1
                        else:
                            self.held[c] = {"accepted": now, "header": None, "data": b""}
                    elif s in self.peer:
                        try:
                            data = s.recv(65536)
                            if data:
                                self.peer[s].sendall(data)
                        except OSError:
                            data = b""
                        if not data:
                            self._close_pair(s)
                    elif s in self.held:
                        try:
                            data = s.recv(4096)
                        except OSError:
                            data = b""
                        h = self.held[s]
                        if not data:
                            s.close()
                            del self.held[s]
                            continue
                        h["data"] += data
                        if h["header"] is None and h["data"].startswith(b"AMQP"):
                            h["header"] = now

    def _command(self, cmd):
        done = threading.Event()
        self._cmds.put((cmd, done))
        if not done.wait(10):
            raise AssertionError(f"proxy did not perform {cmd}")

    def tarpit(self):
        self._command("tarpit")

    def release(self):
        self._command("release")

    def wait_held(self, timeout=30):
        """Wait until a client has connected to the tarpit and sent the AMQP
        protocol header; return when (monotonic) it arrived."""
        def header():
            with self._lock:
                ts = [h["header"] for h in self.held.values() if h["header"] is not None]
            return min(ts) if ts else None
        return wait_until(header, timeout, 0.01, "the daemon's AMQP handshake in the tarpit")

    def close(self):
        if not self._closed:
            self._command("close")
        self._thread.join(2)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def proc_state(pid):
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def edit_ini(path, fn):
    """Rewrite the ini at path with fn(list of lines) -> list of lines."""
    with open(path) as f:
        lines = f.read().splitlines()
    lines = fn(lines)
    tmp = path + ".new"
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return lines


def line_of(lines, text):
    """1-based number of the first line equal to text."""
    return lines.index(text) + 1


def set_key(lines, key, value):
    return [f"{key} = {value}" if re.match(rf"{re.escape(key)}\s*=", l) else l for l in lines]


def insert_after(lines, anchor, *new):
    i = lines.index(anchor) + 1
    return lines[:i] + list(new) + lines[i:]


def make_install(dest):
    """make install of the existing build (no rebuild: -o all) into dest."""
    p = run(["make", "-C", ROOT, "-o", "all", "install", f"B={BUILD}",
             f"DESTDIR={dest}", "PREFIX=/usr"], timeout=120)
    assert p.returncode == 0, out_of(p)
    return p


def rendered_unit(dest):
    """The installed unit, copied to a temp dir with ExecStart pointing at
    the DESTDIR binary (systemd-analyze checks that it exists); returns its
    path (named occamyd.service, as systemd wants)."""
    with open(os.path.join(dest, "usr/lib/systemd/system/occamyd.service")) as f:
        text = f.read()
    udir = os.path.join(dest, "unit-check")
    os.makedirs(udir, exist_ok=True)
    path = os.path.join(udir, "occamyd.service")
    with open(path, "w") as f:
        f.write(text.replace("/usr/sbin/occamyd", os.path.join(dest, "usr/sbin/occamyd")))
    return path


class Secret:
    """A broker user whose password must never appear in any output."""

    def __init__(self):
        self.user = "occamy-" + uuid.uuid4().hex[:8]
        self.password = "Pw" + uuid.uuid4().hex
        u = urllib.parse.urlsplit(AMQP_URI)
        self.hostport = f"127.0.0.1:{u.port or 5672}"

    def __enter__(self):
        broker_ctl("add_user", self.user, self.password)
        broker_ctl("set_permissions", "-p", "/", self.user, ".*", ".*", ".*")
        return self

    def __exit__(self, *exc):
        try:
            broker_ctl("delete_user", self.user)
        except AssertionError as e:
            note(f"could not delete broker user {self.user}: {e}")


# ------------------------------------------------------------ notify protocol

def test_notify_socket_gets_ready_then_status_updates_then_stopping_on_sigterm():
    with NotifySocket() as ns, Daemon(["noop"], slots=2, env=ns.env()) as d:
        i, _ = ns.wait("READY=1")
        # READY does not wait for the broker; STATUS tells its state.
        ns.wait("STATUS~slots 2: 0 protected, 0 helping, 2 empty", after=i)
        ns.wait("STATUS~broker up", after=i, timeout=15)
        # STATUS follows the work done.
        n = ns.count()
        assert rpc(d, "noop", b"x").body == b"x"
        ns.wait("STATUS~; 1 done", after=n, timeout=5)
        n = ns.count()
        d.send_signal(signal.SIGTERM)
        ns.wait("STOPPING=1", after=n, timeout=10)
        assert d.wait_exit() == 0
        d.check_sanitizer()
        # Every message came from the main pid (NotifyAccess=main), and
        # READY came once.
        assert {m.pid for m in ns.msgs()} == {d.pid}, ns.msgs()[:5]
        assert sum(m.has("READY=1") for m in ns.msgs()) == 1, ns.msgs()


def test_watchdog_pings_come_every_half_watchdog_usec_from_an_idle_daemon():
    with NotifySocket() as ns, Daemon(["noop"], slots=2, env=ns.env()) as d:
        ns.wait("READY=1")
        ns.wait("STATUS~broker up", timeout=15)
        # Pings over 3 s of an idle, connected daemon: never further apart
        # than the daemon's promise (half of WATCHDOG_USEC, plus noise).
        t0 = time.monotonic()
        time.sleep(3)
        pings = ns.times("WATCHDOG=1", t0, time.monotonic())
        gaps = [b - a for a, b in zip(pings, pings[1:])]
        note(f"{len(pings)} pings in 3 s, gaps {min(gaps):.3f}..{max(gaps):.3f} s"
             if gaps else f"{len(pings)} pings in 3 s")
        assert gaps and max(gaps) <= PING_GAP_MAX, (
            f"WATCHDOG=1 gap {max(gaps or [0]):.3f} s > {PING_GAP_MAX} s with "
            f"WATCHDOG_USEC={WATCHDOG_USEC}: gaps {[round(g, 3) for g in gaps]}")
        assert len(pings) >= 3 / PING_GAP_MAX - 1, pings
        assert d.stop() == 0


def test_watchdog_is_off_when_watchdog_pid_names_another_process():
    # sd_watchdog_enabled(3): WATCHDOG_PID set and not ours = not for us.
    with NotifySocket() as ns, \
            Daemon(["noop"], slots=1, env=ns.env(WATCHDOG_PID=os.getpid())) as d:
        ns.wait("READY=1")
        ns.wait("STATUS~broker up", timeout=15)
        time.sleep(1.5)
        assert not [m for m in ns.msgs() if m.has("WATCHDOG=1")], ns.msgs()
        assert d.stop() == 0


@timeout(120)
def test_watchdog_pings_stop_while_the_transport_loop_is_stuck_and_resume_after():
    with NotifySocket() as ns, BrokerProxy() as px, \
            Daemon(["noop"], slots=2, uri=px.uri, env=ns.env()) as d:
        assert rpc(d, "noop", b"via proxy").body == b"via proxy"
        n = ns.count()
        ns.wait("WATCHDOG=1", after=n)
        # The broker "hangs": the connection drops and the reconnect is
        # accepted but never answered.  The transport thread is now blocked
        # in the handshake; the main thread is not.
        px.tarpit()
        t_stuck = px.wait_held(timeout=30)
        t_end = t_stuck + 2.2
        time.sleep(max(0.0, t_end - time.monotonic()))
        assert d.running and proc_state(d.pid) not in ("T", "t"), "daemon stopped?"
        pings = ns.times("WATCHDOG=1", t_stuck + 0.2, t_end)
        status = ns.statuses(t_stuck + 0.2, t_end)
        note(f"while stuck for {t_end - t_stuck - 0.2:.1f} s: {len(pings)} pings, "
             f"{len(status)} STATUS updates")
        assert pings == [], f"WATCHDOG=1 from a stuck transport loop at {pings}"
        assert status, "the main thread kept updating STATUS while the loop was stuck"
        assert all("broker down" in m.fields["STATUS"] for m in status), status
        # Unstick it: the handshake read fails at once, the loop turns, pings
        # resume, and it reconnects through the proxy.
        n = ns.count()
        t_rel = time.monotonic()
        px.release()
        _, m = ns.wait("WATCHDOG=1", after=n, timeout=5)
        note(f"first ping {m.t - t_rel:.3f} s after the loop was unstuck")
        assert m.t - t_rel < 1.0 * SCALE
        d.wait_log(re.escape(f"cannot connect to amqp://{px.user}:***@127.0.0.1:{px.port}/"))
        wait_until(lambda: queue_counts(d)[1] == 1, 30, 0.1, "the daemon consuming again")
        assert rpc(d, "noop", b"back").body == b"back"
        assert d.stop() == 0


# ------------------------------------------------------------------- reload

def test_sighup_with_a_new_valid_config_reloads_plugins_and_settings():
    with NotifySocket() as ns, \
            Daemon(["noop"], slots=2, kill_timeout_ms=1000, shutdown_grace_s=30,
                   env=ns.env()) as d:
        ns.wait("READY=1")
        assert rpc(d, "noop", b"before").body == b"before"
        # Before: no sleep plugin, so such a request is dead-lettered.
        publish_request(d, "sleep", b"10")
        (headers, _), = get_dead_letters(d, 1)
        assert "sleep" in str(headers.get("x-occamy-error")), headers

        def new(lines):
            lines = set_key(lines, "kill_timeout_ms", 250)
            lines = set_key(lines, "shutdown_grace_s", 1)
            return lines + ["[plugin sleep]", f"path = {plugin_path('sleep')}", ""]
        edit_ini(d.ini, new)
        pos, n = d.log_size(), ns.count()
        d.send_signal(signal.SIGHUP)
        i, m = ns.wait("RELOADING=1", after=n)
        usec = int(m.fields["MONOTONIC_USEC"])
        assert abs(usec / 1e6 - m.t) < 5, (usec, m.t)  # CLOCK_MONOTONIC, now
        ns.wait("READY=1", after=i + 1)
        d.wait_log(r"reloaded: plugins noop, sleep", after=pos)
        assert rpc(d, "sleep", b"20").body == b"slept 20"
        assert rpc(d, "noop", b"after").body == b"after"
        # The new shutdown grace is in force: a long task is cut off after 1 s.
        publish_request(d, "sleep", b"60000")
        wait_until(lambda: queue_counts(d)[0] == 0, 10, what="the long task taken")
        time.sleep(0.2)
        t0 = time.monotonic()
        assert d.stop() == 0
        assert time.monotonic() - t0 < 10, "shutdown_grace_s = 1 was not applied"
        d.wait_log(r"shutting down \(grace 1 s\)")


def test_sighup_with_a_broken_config_is_refused_and_the_old_one_keeps_serving():
    with NotifySocket() as ns, Daemon(["noop"], slots=2, env=ns.env()) as d:
        ns.wait("READY=1")
        good = open(d.ini).read()

        def broken(lines):
            lines = insert_after(lines, "[server]", "no_such_key = 1")
            return lines + ["[plugin sleep]", f"path = {plugin_path('sleep')}", ""]
        lines = edit_ini(d.ini, broken)
        bad_line = line_of(lines, "no_such_key = 1")
        pos, n = d.log_size(), ns.count()
        d.send_signal(signal.SIGHUP)
        i, _ = ns.wait("RELOADING=1", after=n)
        ns.wait("READY=1", after=i + 1)
        d.wait_log(r"reload refused, keeping the running configuration", after=pos)
        d.wait_log(re.escape(f"{d.ini}:{bad_line}: [server] key 'no_such_key': unknown key"),
                   after=pos)
        assert "reloaded:" not in d.log()[pos:]
        assert d.running
        # The old configuration serves: noop works, the sleep plugin of the
        # refused file was not loaded.
        assert rpc(d, "noop", b"still here").body == b"still here"
        publish_request(d, "sleep", b"10")
        (headers, _), = get_dead_letters(d, 1)
        assert "sleep" in str(headers.get("x-occamy-error")), headers

        # A file that parses but names a plugin that cannot load: refused too.
        with open(d.ini, "w") as f:
            f.write(good + "\n[plugin ghost]\npath = /nonexistent/ghost.so\n")
        ghost_line = good.count("\n") + 2
        pos, n = d.log_size(), ns.count()
        d.send_signal(signal.SIGHUP)
        i, _ = ns.wait("RELOADING=1", after=n)
        ns.wait("READY=1", after=i + 1)
        d.wait_log(re.escape(f"{d.ini}:{ghost_line}: plugin ghost"), after=pos)
        assert "reloaded:" not in d.log()[pos:]
        assert rpc(d, "noop", b"still").body == b"still"

        # Fixed: the next SIGHUP takes it.
        with open(d.ini, "w") as f:
            f.write(good)
        pos = d.log_size()
        d.send_signal(signal.SIGHUP)
        d.wait_log(r"reloaded: plugins noop$", after=pos)
        assert d.stop() == 0


def test_sighup_keeps_an_unchanged_plugin_and_finalises_a_removed_one_on_main():
    # The fixture appends "init"/"fini" to its trace file, with "off-main"
    # when called on a thread other than the main one.
    trace = os.path.join(tempfile.mkdtemp(prefix="occamy-trace-"), "trace")
    fx = {"path": plugin_path("fixture_initfail"), "ok": "yes", "trace": trace}

    def events():
        try:
            with open(trace) as f:
                return f.read().splitlines()
        except FileNotFoundError:
            return []
    with Daemon({"fx": fx, "noop": {}}, slots=2) as d:
        assert events() == ["init"]
        edit_ini(d.ini, lambda lines: set_key(lines, "slots", 2) + ["# touched"])
        pos = d.log_size()
        d.send_signal(signal.SIGHUP)
        d.wait_log(r"reloaded: plugins fx, noop$", after=pos)
        assert events() == ["init"], "an unchanged plugin was initialised again"

        def without_fx(lines):
            i = lines.index("[plugin fx]")
            j = lines.index("[plugin noop]")
            return lines[:i] + lines[j:]
        edit_ini(d.ini, without_fx)
        pos = d.log_size()
        d.send_signal(signal.SIGHUP)
        d.wait_log(r"reloaded: plugins noop$", after=pos)
        wait_until(lambda: events() == ["init", "fini"], 10, what="fini of the removed fx")
        assert rpc(d, "noop", b"on").body == b"on"
        assert d.stop() == 0
    assert events() == ["init", "fini"], events()
    shutil.rmtree(os.path.dirname(trace), ignore_errors=True)


def test_sighup_keeps_restart_only_keys_and_names_them_in_one_line():
    # Header names reach the transport, the scheduler, the router and each
    # plugin's host: changed on one side only, helpers' reports and requests
    # would be dead-lettered in silence.  A reload keeps them, says so once,
    # and applies the rest of the file.
    with NotifySocket() as ns, Daemon(["expander"], slots=2, env=ns.env()) as d:
        ns.wait("READY=1")

        def new(lines):
            lines = insert_after(lines, "[server]", "header_task_id = x-new-task-id",
                                 "header_handler = x-new-handler", "kill_timeout_ms = 250")
            return insert_after(lines, "[amqp]", "heartbeat_s = 7")
        edit_ini(d.ini, new)
        pos, n = d.log_size(), ns.count()
        d.send_signal(signal.SIGHUP)
        i, _ = ns.wait("RELOADING=1", after=n)
        ns.wait("READY=1", after=i + 1)
        d.wait_log(r"reloaded: plugins expander", after=pos)
        log = d.log()[pos:]
        lines = [l for l in log.splitlines() if "need a restart" in l or "needs a restart" in l]
        assert len(lines) == 1, log
        assert lines[0].endswith(
            "reload: keys [server] header_task_id, [server] header_handler, "
            "[amqp] heartbeat_s need a restart; keeping their old values"), lines
        assert "kill_timeout_ms" not in lines[0]
        # The old handler header still routes, and the assistant's report
        # (a control message carrying the old task-id header) reaches its
        # master: want = 1 report ends the master at once.
        r = rpc(d, "expander", b"20000,1", timeout=30)
        m = re.match(r"reports=(\d+) internal=(\d+) external=(\d+)", r.text)
        assert m and int(m.group(1)) >= 1, r.text
        assert d.stop() == 0


def test_sighup_refuses_a_slot_buffer_the_running_slots_cannot_hold():
    with Daemon(["noop"], slots=2) as d:
        edit_ini(d.ini, lambda lines: insert_after(
            set_key(lines, "slots", 8), "[server]", "expansion_slot_buffer = 4"))
        pos = d.log_size()
        d.send_signal(signal.SIGHUP)
        d.wait_log(r"reload refused, keeping the running configuration", after=pos)
        d.wait_log(re.escape("[server] key 'expansion_slot_buffer': 4 is not less than "
                             "the running slots (2); slots changes at restart"), after=pos)
        assert "reloaded:" not in d.log()[pos:]
        assert rpc(d, "noop", b"still").body == b"still"
        assert d.stop() == 0


# ----------------------------------------------------- -t, CLI and secrets

def test_config_test_prints_configuration_ok_for_a_good_file():
    cfg = Daemon(["noop", "sleep", "tsp"], slots=3)
    try:
        p = run([OCCAMYD, "-t", "-c", cfg.ini])
        assert p.returncode == 0 and p.stdout == "configuration OK\n", out_of(p)
        p = run([OCCAMYD, "-t", "-q", "-c", cfg.ini])
        assert p.returncode == 0, out_of(p)
    finally:
        cfg.close()


def test_config_test_prints_every_error_with_file_and_line_and_exits_78():
    cfg = Daemon(["noop"], slots=2)
    try:
        lines = edit_ini(cfg.ini, lambda ls: insert_after(
            ls, "[server]", "no_such_key = 1", "kill_timeout_ms = soon",
            "expansion_period_ms = 0", "helper_priority = sometimes")
            + ["[nonsense]", "a = b", "[plugin nopath]", "x = 1", ""])
        p = run([OCCAMYD, "-t", "-c", cfg.ini])
        assert p.returncode == EX_CONFIG, out_of(p)
        assert "configuration OK" not in p.stdout + p.stderr, out_of(p)
        for text, key in (("no_such_key = 1", "no_such_key"),
                          ("kill_timeout_ms = soon", "kill_timeout_ms"),
                          ("expansion_period_ms = 0", "expansion_period_ms"),
                          ("helper_priority = sometimes", "helper_priority")):
            want = f"{cfg.ini}:{line_of(lines, text)}: [server] key '{key}'"
            assert want in p.stderr, f"missing {want!r}\n" + out_of(p)
        assert f"{cfg.ini}:{line_of(lines, '[nonsense]')}:" in p.stderr, out_of(p)
        assert f"{cfg.ini}:{line_of(lines, '[plugin nopath]')}:" in p.stderr, out_of(p)
        errors = [l for l in p.stderr.splitlines() if l.startswith(cfg.ini + ":")]
        assert len(errors) >= 6, out_of(p)

        # Plugins that cannot load: each one reported, with its section's line.
        notelf = os.path.join(cfg.dir, "notelf.so")
        with open(notelf, "w") as f:
            f.write("not a shared object\n")
        os.chmod(notelf, 0o755)
        lines = edit_ini(cfg.ini, lambda ls: [l for l in ls[:ls.index("[nonsense]")]
                                              if not re.match(r"(no_such_key|kill_timeout_ms|"
                                                              r"expansion_period_ms|"
                                                              r"helper_priority) =", l)]
                         + ["[plugin missing]", "path = /nonexistent/missing.so", "",
                            "[plugin notelf]", f"path = {notelf}", ""])
        p = run([OCCAMYD, "-t", "-c", cfg.ini])
        assert p.returncode == EX_CONFIG, out_of(p)
        for name in ("missing", "notelf"):
            want = f"{cfg.ini}:{line_of(lines, f'[plugin {name}]')}: plugin {name}"
            assert want in p.stderr, f"missing {want!r}\n" + out_of(p)
        # A file that is not there.
        p = run([OCCAMYD, "-t", "-c", os.path.join(cfg.dir, "absent.ini")])
        assert p.returncode == EX_CONFIG and "absent.ini" in p.stderr, out_of(p)
    finally:
        cfg.close()


def test_default_handler_naming_no_plugin_is_reported_with_its_line():
    # README: "Each error names the file, line and key."
    cfg = Daemon(["noop"], slots=2, default_handler="nosuch")
    try:
        with open(cfg.ini) as f:
            lines = f.read().splitlines()
        p = run([OCCAMYD, "-t", "-c", cfg.ini])
        assert p.returncode == EX_CONFIG, out_of(p)
        want = f"{cfg.ini}:{line_of(lines, 'default_handler = nosuch')}:"
        assert want in p.stderr, f"missing {want!r}\n" + out_of(p)
    finally:
        cfg.close()


def test_version_and_help_exit_0_and_a_bad_command_line_exits_64():
    p = run([OCCAMYD, "-V"])
    assert p.returncode == 0 and re.fullmatch(r"occamyd \S+ \(plugin ABI \d+\.\d+\)\n",
                                              p.stdout), out_of(p)
    p = run([OCCAMYD, "-h"])
    assert p.returncode == 0 and p.stdout.startswith("usage: occamyd") and \
        "-t" in p.stdout and p.stderr == "", out_of(p)
    for bad in (["-Z"], ["-c"], ["extra-argument"]):
        p = run([OCCAMYD] + bad)
        assert p.returncode == EX_USAGE and "usage: occamyd" in p.stderr, (bad, out_of(p))
        assert p.stdout == "", out_of(p)


@timeout(240)
def test_the_broker_password_never_appears_in_any_output():
    with Secret() as s:
        outputs = []
        wrong = "Wrong" + uuid.uuid4().hex
        pwfile = tempfile.NamedTemporaryFile("w", prefix="occamy-pw-", delete=False)
        pwfile.write(s.password + "\n")
        pwfile.close()
        badpw = tempfile.NamedTemporaryFile("w", prefix="occamy-pw-", delete=False)
        badpw.write(wrong + "\n")
        badpw.close()
        try:
            # -t, good and bad files, the password in the uri and in a file.
            for uri in (f"amqp://{s.user}@{s.hostport}/",
                        f"amqp://{s.user}:{s.password}@{s.hostport}/"):
                cfg = Daemon(["noop"], slots=1, uri=uri, password_file=pwfile.name)
                try:
                    p = run([OCCAMYD, "-t", "-v", "-c", cfg.ini])
                    assert p.returncode == 0, out_of(p)
                    outputs.append(p.stdout + p.stderr)
                    edit_ini(cfg.ini, lambda ls: insert_after(ls, "[amqp]", "heartbeat_s = x",
                                                              "passwd = 1"))
                    p = run([OCCAMYD, "-t", "-v", "-c", cfg.ini])
                    assert p.returncode == EX_CONFIG, out_of(p)
                    outputs.append(p.stdout + p.stderr)
                finally:
                    cfg.close()
            # A daemon that logs in with it (debug logging on) and serves.
            with Daemon(["noop"], slots=1, uri=f"amqp://{s.user}@{s.hostport}/",
                        password_file=pwfile.name, args=["-v"]) as d:
                assert rpc(d, "noop", b"secret-safe").body == b"secret-safe"
                d.send_signal(signal.SIGHUP)
                d.wait_log("reloaded")
                assert d.stop() == 0
                outputs.append(d.log())
            # The password in the uri.
            with Daemon(["noop"], slots=1, uri=f"amqp://{s.user}:{s.password}@{s.hostport}/",
                        args=["-v"]) as d:
                assert rpc(d, "noop", b"inline").body == b"inline"
                d.wait_log(re.escape(f"connected to amqp://{s.user}:***@{s.hostport}/"))
                assert d.stop() == 0
                outputs.append(d.log())
            # occamyctl reads the same file: it logs in with it, and says nothing of it.
            if os.access(OCCAMYCTL, os.X_OK):
                with Daemon(["noop"], slots=1, uri=f"amqp://{s.user}@{s.hostport}/",
                            password_file=pwfile.name) as d:
                    p = run([OCCAMYCTL, "-c", d.ini, "-t", str(30 * SCALE), "submit", "noop",
                             "-"], input="ctl")
                    assert p.returncode == 0 and p.stdout == "ctl\n", out_of(p)
                    outputs.append(p.stdout + p.stderr)
                    edit_ini(d.ini, lambda ls: set_key(ls, "password_file", badpw.name))
                    p = run([OCCAMYCTL, "-c", d.ini, "-t", "2", "status"])
                    assert p.returncode != 0, out_of(p)
                    outputs.append(p.stdout + p.stderr)
                    assert d.stop() == 0
            # A wrong password: refused by the broker, and not shown either.
            with Daemon(["noop"], slots=1, uri=f"amqp://{s.user}:{wrong}@{s.hostport}/",
                        password_file=badpw.name, args=["-v"], ready=False) as d:
                d.wait_log(r"cannot connect to .*login as '%s'" % re.escape(s.user), 30)
                assert d.stop() == 0
                outputs.append(d.log())
        finally:
            os.unlink(pwfile.name)
            os.unlink(badpw.name)
        for i, text in enumerate(outputs):
            for secret in (s.password, wrong):
                assert secret not in text, f"output {i} shows the password:\n{text}"


def test_a_mistyped_uri_scheme_is_reported_without_the_password():
    secret = "Pw" + uuid.uuid4().hex
    cfg = Daemon(["noop"], slots=1, uri=f"amqps//guest:{secret}@127.0.0.1:5671/")
    try:
        p = run([OCCAMYD, "-t", "-c", cfg.ini])
        assert p.returncode == EX_CONFIG and "[amqp] key 'uri'" in p.stderr, out_of(p)
        assert secret not in p.stdout + p.stderr, "the error shows the password:\n" + out_of(p)
        if os.access(OCCAMYCTL, os.X_OK):
            p = run([OCCAMYCTL, "-c", cfg.ini, "status"])
            assert p.returncode == EX_CONFIG, out_of(p)
            assert secret not in p.stdout + p.stderr, "occamyctl shows the password:\n" + out_of(p)
    finally:
        cfg.close()


# ----------------------------------------------------------- install & unit

def test_make_install_puts_everything_under_destdir_and_uninstall_removes_it():
    expected = ["usr/sbin/occamyd", "usr/bin/occamyctl", "usr/include/occamy/plugin.h",
                "usr/lib/pkgconfig/occamy-plugin.pc", "usr/lib/systemd/system/occamyd.service",
                "usr/lib/systemd/system/occamyd@.service", "etc/occamy/occamy.ini"]
    # The example plugins, as the Makefile finds them: plugins/NAME.c and
    # plugins/NAME/*.c (test plugins are not installed).
    names = {os.path.basename(c)[:-2] for c in glob.glob(os.path.join(ROOT, "plugins", "*.c"))}
    names |= {os.path.basename(os.path.dirname(c))
              for c in glob.glob(os.path.join(ROOT, "plugins", "*", "*.c"))}
    assert names, "no example plugins"
    expected += [f"usr/lib/occamy/plugins/{n}.so" for n in names]
    expected += [f"usr/share/man/man{m[-1]}/{os.path.basename(m)}"
                 for m in glob.glob(os.path.join(ROOT, "man", "*.[1-8]"))]
    assert any("/man1/" in e for e in expected) and any("/man5/" in e for e in expected) \
        and any("/man7/" in e for e in expected) and any("/man8/" in e for e in expected)
    watched = ["/usr/sbin/occamyd", "/usr/bin/occamyctl", "/usr/include/occamy",
               "/usr/lib/occamy", "/usr/lib/pkgconfig/occamy-plugin.pc",
               "/usr/lib/systemd/system/occamyd.service", "/etc/occamy",
               "/usr/share/man/man8/occamyd.8"]

    def host_state():
        return {w: (os.stat(w).st_mtime_ns if os.path.exists(w) else None) for w in watched}
    before = host_state()
    dest = tempfile.mkdtemp(prefix="occamy-destdir-")
    try:
        make_install(dest)
        got = sorted(os.path.relpath(os.path.join(dp, f), dest)
                     for dp, _, fs in os.walk(dest) for f in fs)
        assert got == sorted(expected), f"installed {got}\nexpected {sorted(expected)}"
        assert host_state() == before, "make install with DESTDIR touched the host"
        for exe in ("usr/sbin/occamyd", "usr/bin/occamyctl"):
            assert os.stat(os.path.join(dest, exe)).st_mode & 0o777 == 0o755, exe
        for f in ("usr/lib/pkgconfig/occamy-plugin.pc", "usr/lib/systemd/system/occamyd.service",
                  "usr/lib/systemd/system/occamyd@.service"):
            text = open(os.path.join(dest, f)).read()
            assert not re.search(r"@[A-Z_]+@", text), f"placeholder left in {f}:\n{text}"
        unit = open(os.path.join(dest, "usr/lib/systemd/system/occamyd.service")).read()
        assert "ExecStart=/usr/sbin/occamyd -f -c /etc/occamy/occamy.ini" in unit, unit
        assert "StateDirectory=occamy\n" in unit, unit
        tmpl = open(os.path.join(dest, "usr/lib/systemd/system/occamyd@.service")).read()
        assert "-c /etc/occamy/%i.ini -s %S/occamy/%i" in tmpl and \
            "StateDirectory=occamy/%i" in tmpl, tmpl
        ini = os.path.join(dest, "etc/occamy/occamy.ini")
        assert "plugin_dir = /usr/lib/occamy/plugins\n" in open(ini).read()
        p = run([os.path.join(dest, "usr/sbin/occamyd"), "-V"])
        assert p.returncode == 0, out_of(p)
        # The installed example configuration is valid with the installed
        # plugins (plugin_dir pointed into DESTDIR for the check).
        check = os.path.join(dest, "check.ini")
        with open(check, "w") as f:
            f.write(open(ini).read().replace("plugin_dir = /usr/lib/occamy/plugins",
                                             f"plugin_dir = {dest}/usr/lib/occamy/plugins"))
        p = run([os.path.join(dest, "usr/sbin/occamyd"), "-t", "-c", check])
        assert p.returncode == 0 and p.stdout == "configuration OK\n", out_of(p)
        os.unlink(check)
        # A second install keeps the administrator's edits.
        with open(ini, "a") as f:
            f.write("# edited by the administrator\n")
        make_install(dest)
        assert open(ini).read().endswith("# edited by the administrator\n")
        # Uninstall removes everything but the configuration.
        p = run(["make", "-C", ROOT, "-o", "all", "uninstall", f"B={BUILD}",
                 f"DESTDIR={dest}", "PREFIX=/usr"])
        assert p.returncode == 0, out_of(p)
        left = sorted(os.path.relpath(os.path.join(dp, f), dest)
                      for dp, _, fs in os.walk(dest) for f in fs)
        assert left == ["etc/occamy/occamy.ini"], left
        assert host_state() == before, "make uninstall with DESTDIR touched the host"
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def test_plugin_built_out_of_tree_with_pkg_config_loads_and_serves():
    if not shutil.which("pkg-config"):
        skip("pkg-config is not installed")
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("cc")
    if not cc:
        skip("no C compiler")
    dest = tempfile.mkdtemp(prefix="occamy-destdir-")
    work = tempfile.mkdtemp(prefix="occamy-oot-")
    try:
        make_install(dest)
        env = {"PKG_CONFIG_SYSROOT_DIR": dest,
               "PKG_CONFIG_PATH": os.path.join(dest, "usr/lib/pkgconfig"),
               "PKG_CONFIG_LIBDIR": os.path.join(dest, "usr/lib/pkgconfig")}
        p = run(["pkg-config", "--cflags", "occamy-plugin"], env=env)
        assert p.returncode == 0, out_of(p)
        cflags = p.stdout.split()
        assert cflags == [f"-I{dest}/usr/include"], cflags
        p = run(["pkg-config", "--variable=plugindir", "occamy-plugin"], env=env)
        assert p.stdout.strip().endswith("/usr/lib/occamy/plugins"), out_of(p)
        # The noop test plugin, renamed, with the fixture header it includes
        # beside it: a third party's two-file source.
        src = open(os.path.join(ROOT, "tests", "plugins", "noop.c")).read()
        src = src.replace('FIXTURE_PLUGIN("noop"', 'FIXTURE_PLUGIN("outoftree"')
        assert 'FIXTURE_PLUGIN("outoftree"' in src
        shutil.copy(os.path.join(ROOT, "tests", "plugins", "fixture.h"), work)
        c = os.path.join(work, "outoftree.c")
        so = os.path.join(work, "outoftree.so")
        with open(c, "w") as f:
            f.write(src)
        p = run([cc, "-shared", "-fPIC", *cflags, c, "-o", so], cwd=work)
        assert p.returncode == 0, out_of(p)
        os.chmod(so, 0o755)  # as `install -m 755` would
        # The header it compiled against is the installed one.
        p = run([cc, "-M", *cflags, c], cwd=work)
        assert f"{dest}/usr/include/occamy/plugin.h" in p.stdout.replace("\\\n", " "), out_of(p)

        cfg = Daemon({"outoftree": {"path": so}, "tsp": {"path": "tsp.so"}}, slots=2,
                     plugin_dir=os.path.join(dest, "usr/lib/occamy/plugins"))
        try:
            p = run([os.path.join(dest, "usr/sbin/occamyd"), "-t", "-c", cfg.ini])
            assert p.returncode == 0 and p.stdout == "configuration OK\n", out_of(p)
        finally:
            cfg.close()
        with Daemon({"outoftree": {"path": so}}, slots=2) as d:
            assert rpc(d, "outoftree", b"built elsewhere").body == b"built elsewhere"
            d.wait_log(r"plugins outoftree")
            assert d.stop() == 0
    finally:
        shutil.rmtree(dest, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def test_installed_unit_passes_systemd_analyze_verify_and_security():
    sa = shutil.which("systemd-analyze")
    if not sa:
        skip("systemd-analyze is not installed")
    dest = tempfile.mkdtemp(prefix="occamy-destdir-")
    try:
        make_install(dest)
        unit = rendered_unit(dest)
        # Documentation=man:... is checked with man(1): find ours in DESTDIR.
        env = {"MANPATH": os.path.join(dest, "usr/share/man") + ":"}
        p = run([sa, "verify", "--man=yes", unit], env=env, cwd=os.path.dirname(unit))
        assert p.returncode == 0 and not (p.stdout + p.stderr).strip(), out_of(p)

        p = run([sa, "security", "--offline=true", "--no-pager", unit],
                cwd=os.path.dirname(unit))
        m = re.search(r"Overall exposure level for occamyd\.service: (\d+(?:\.\d+)?)", p.stdout)
        if not m:
            skip("systemd-analyze security --offline gave no exposure level: " + out_of(p))
        exposure = float(m.group(1))
        note(f"systemd-analyze security exposure: {exposure}")
        for line in p.stdout.splitlines():
            if line.startswith("\u2717"):
                note("  " + re.sub(r"\s{2,}", "  ", line))
        assert exposure <= 2.5, p.stdout

        # The sandbox keeps what the daemon needs: sched_setscheduler for
        # SCHED_IDLE helpers, AF_UNIX for sd_notify, AF_INET for the broker.
        text = open(unit).read()
        allow = [v for v in re.findall(r"(?m)^SystemCallFilter=(?!~)(.*)$", text)]
        deny = [v for v in re.findall(r"(?m)^SystemCallFilter=~(.*)$", text)]

        expanded = {}

        def group(g):
            # "@group" lists syscalls and nested @groups, indented.
            if g not in expanded:
                expanded[g] = set()
                q = run([sa, "syscall-filter", "--no-pager", g])
                assert q.returncode == 0, out_of(q)
                for w in q.stdout.splitlines()[1:]:
                    w = w.strip()
                    if w.startswith("@"):
                        expanded[g] |= group(w)
                    elif w and not w.startswith("#"):
                        expanded[g].add(w)
            return expanded[g]

        def syscalls(entries):
            names = set()
            for e in " ".join(entries).split():
                names |= group(e) if e.startswith("@") else {e.split(":")[0]}
            return names
        assert allow, "no SystemCallFilter allow list"
        for call in ("sched_setscheduler", "socket", "sendmsg", "connect"):
            assert call in syscalls(allow), f"{call} is not allowed by {allow}"
            assert call not in syscalls(deny), f"{call} is denied by {deny}"
        families = " ".join(re.findall(r"(?m)^RestrictAddressFamilies=(.*)$", text)).split()
        assert "AF_UNIX" in families and "AF_INET" in families, families
        assert re.search(r"(?m)^Type=notify$", text) and re.search(r"(?m)^WatchdogSec=", text)
        assert re.search(r"(?m)^ExecReload=/bin/kill -HUP \$MAINPID$", text)
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def test_man_pages_render_without_warnings():
    man = shutil.which("man")
    if not man:
        skip("man is not installed")
    pages = sorted(glob.glob(os.path.join(ROOT, "man", "*.[1-8]")))
    assert len(pages) >= 4, pages
    env = {"MANWIDTH": "80", "LC_ALL": "C.UTF-8", "MAN_KEEP_STDERR": "1"}
    # The check can see a warning at all: a broken page makes one.
    tmp = tempfile.mkdtemp(prefix="occamy-man-")
    try:
        bad = os.path.join(tmp, "bad.1")
        with open(bad, "w") as f:
            f.write(".TH BAD 1\n.SH NAME\nbad \\- page\n.NOSUCHMACRO\n")
        p = run([man, "--warnings=w", "-l", bad], env=env)
        if "NOSUCHMACRO" not in p.stderr:
            skip("man --warnings does not report groff warnings here: " + out_of(p))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for page in pages:
        p = run([man, "--warnings=w", "-l", page], env=env)
        assert p.returncode == 0 and p.stderr == "", f"{page}: " + out_of(p)
        assert "NAME" in p.stdout and "DESCRIPTION" in p.stdout, f"{page}: " + out_of(p)


# ---------------------------------------------------------------- occamyctl

def test_occamyctl_submit_prints_the_reply():
    if not os.access(OCCAMYCTL, os.X_OK):
        skip("occamyctl is not built")
    with Daemon(["noop"], slots=2) as d:
        body = os.path.join(d.dir, "request.json")
        with open(body, "w") as f:
            f.write('{"hello": "occamyctl"}')
        p = run([OCCAMYCTL, "-c", d.ini, "-t", str(30 * SCALE), "submit", "noop", body])
        assert p.returncode == 0 and p.stdout == '{"hello": "occamyctl"}\n', out_of(p)
        p = run([OCCAMYCTL, "-c", d.ini, "-t", str(30 * SCALE), "submit", "noop", "-"],
                input="from stdin\n")
        assert p.returncode == 0 and p.stdout == "from stdin\n", out_of(p)
        assert d.stop() == 0


def test_occamyctl_status_prints_every_slot_of_every_daemon():
    if not os.access(OCCAMYCTL, os.X_OK):
        skip("occamyctl is not built")
    a = Daemon(["noop"], slots=2)
    b = Daemon(["noop"], slots=3, names=a.names)
    with a, b:
        p = run([OCCAMYCTL, "-c", a.ini, "-t", str(2 * SCALE), "status"])
        assert p.returncode == 0, out_of(p)
        lines = p.stdout.splitlines()
        assert lines[-1] == "2 daemons answered", out_of(p)
        heads = [l for l in lines if l.startswith("daemon ")]
        pids = sorted(int(re.match(r"daemon \S+:(\d+) ", l).group(1)) for l in heads)
        assert pids == sorted([a.pid, b.pid]), out_of(p)
        for d, n in ((a, 2), (b, 3)):
            head = [l for l in heads if f":{d.pid} " in l][0]
            assert f" slots {n} " in head, head
        slots = [l for l in lines if re.match(r"slot \d+ ", l)]
        assert len(slots) == 5, out_of(p)
        assert all(l.split()[2] == "empty" for l in slots), out_of(p)
        assert a.stop() == 0 and b.stop() == 0


def test_occamyctl_submit_with_no_daemon_running_times_out_with_exit_75():
    if not os.access(OCCAMYCTL, os.X_OK):
        skip("occamyctl is not built")
    with Daemon(["noop"], slots=1) as d:   # the queue exists; then nobody serves it
        assert d.stop() == 0
        t0 = time.monotonic()
        p = run([OCCAMYCTL, "-c", d.ini, "-t", "2", "submit", "noop", "-"], input="x")
        took = time.monotonic() - t0
        assert p.returncode == EX_TEMPFAIL, out_of(p)
        assert "no reply within 2 s" in p.stderr, out_of(p)
        assert 1.9 <= took < 2 + 5 * SCALE, took
        assert queue_counts(d)[0] == 1, "the request waits in the queue"


if __name__ == "__main__":
    run_tests(globals())
