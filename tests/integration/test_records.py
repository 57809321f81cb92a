"""Record keeping and the crash guard (issue: "Record keeping: every daemon
knows what it was running when it died, and a request that crashes servers
stops crashing them"):

- kill -9 of a daemon with two tasks running, then a restart: the log names
  both, /metrics counts the crash and lists the suspects, and so does
  `occamyctl status`;
- a segfaulting poison request on a classic queue with three daemons is
  dead-lettered after crash_limit crashes fleet-wide, with an error reply,
  while healthy requests beside it complete.
(The torn-record case is in unit/test_records.)
"""

import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from occamy_test import (  # noqa: E402
    BUILD, Daemon, ReplyQueue, free_port, get_dead_letters, note, publish_request,
    queue_counts, run_tests, scrape_metrics, timeout, wait_until, SCALE)
from test_faults import CrashingDaemon  # noqa: E402


@timeout(120)
def test_kill_9_with_two_tasks_running_is_reported_by_the_next_start():
    port = free_port()
    with Daemon(["sleep"], slots=2, metrics_listen=f"127.0.0.1:{port}") as d:
        for tid in ("job-a", "job-b"):
            publish_request(d, "sleep", b"30000", task_id=tid)
        wait_until(lambda: queue_counts(d)[0] == 0, 10, what="both taken")
        time.sleep(0.3)
        assert scrape_metrics(port)["occamy_crashes_total"] == 0
        d.proc.kill()
        d.proc.wait()
        pos = d.log_size()
        d.start()
        d.wait_log(r"did not stop cleanly: crash 1 of state_dir .*, 2 requests were in flight",
                   after=pos)
        for tid in ("job-a", "job-b"):
            m = d.wait_log(r"in flight at the crash: handler sleep, task id " + tid +
                           r", message \S+, for [0-9.]+ s", after=pos)
            note(m.group(0))
        m = scrape_metrics(port)
        assert m["occamy_crashes_total"] == 1, m
        suspects = [k for k in m if k.startswith("occamy_crash_suspect{")]
        assert len(suspects) == 2 and any('task_id="job-a"' in k for k in suspects), suspects
        p = subprocess.run([os.path.join(BUILD, "occamyctl"), "-c", d.ini, "-t",
                            str(2 * SCALE), "status"], capture_output=True, text=True,
                           timeout=30 * SCALE, stdin=subprocess.DEVNULL)
        assert "crashed before this start" in p.stdout and "task job-b" in p.stdout, p.stdout
        # The broker gave both back: they run again, to the end.
        assert d.stop(signal.SIGKILL) == -signal.SIGKILL
        d.start()
        assert d.stop() == 0
        # A clean stop: the next start reports nothing.
        pos = d.log_size()
        d.start()
        time.sleep(0.5)
        assert "did not stop cleanly" not in d.log()[pos:], d.log_tail()
        assert d.stop() == 0


@timeout(240)
def test_a_poison_request_on_a_classic_queue_stops_after_crash_limit_crashes_fleet_wide():
    limit = 2
    asan = os.environ.get("ASAN_OPTIONS", "")
    env = {"ASAN_OPTIONS": (asan + ":" if asan else "") + "handle_segv=0"}
    first = CrashingDaemon(["fail"], slots=2, crash_limit=limit, env=env)
    fleet = [first] + [CrashingDaemon(["fail"], slots=2, crash_limit=limit, env=env,
                                      names=first.names) for _ in range(2)]
    crashes = []
    with fleet[0], fleet[1], fleet[2], ReplyQueue() as rq:
        for i in range(10):
            publish_request(first, "fail", b"ok", reply_to=rq.name, correlation_id=f"ok{i}")
        publish_request(first, "fail", b"crash", reply_to=rq.name, correlation_id="poison")
        for i in range(10, 20):
            publish_request(first, "fail", b"ok", reply_to=rq.name, correlation_id=f"ok{i}")
        answers = {}

        def restart_crashed():  # systemd's Restart=on-failure
            for d in fleet:
                if not d.running:
                    crashes.append(d.returncode)
                    assert d.returncode in (-signal.SIGSEGV, 1, 66), d.log_tail()
                    d.start(wait=False)

        deadline = time.monotonic() + 120 * SCALE
        while time.monotonic() < deadline and len(answers) < 21:
            restart_crashed()
            rq.conn.process_data_events(0.2)
            for r in rq.received:
                answers.setdefault(r.properties.correlation_id, r)
            rq.received.clear()
        # Both crashes can fall inside the last turn, with the last answers
        # (seen under TSan, whose crash report makes an exit slow).
        deadline = time.monotonic() + 10 * SCALE
        while len(crashes) < limit and time.monotonic() < deadline:
            restart_crashed()
            time.sleep(0.1)
        note(f"poison: {len(crashes)} crashes fleet-wide (exit codes {crashes}), "
             f"{len(answers)} of 21 answered")
        assert "poison" in answers, f"no error reply for the poison after {len(crashes)} crashes"
        r = answers["poison"]
        assert r.headers.get("x-occamy-status") == "crashed", r.headers
        assert f"crashed {limit} servers" in r.headers.get("x-occamy-error", ""), r.headers
        assert len(crashes) <= limit, crashes
        assert all(f"ok{i}" in answers for i in range(20)), sorted(answers)
        assert all(answers[f"ok{i}"].body == b"" or "x-occamy-status" not in answers[f"ok{i}"].headers
                   for i in range(20))
        dead = get_dead_letters(first, min_count=1, timeout=10)
        assert [b for _, b in dead] == [b"crash"], dead
        for d in fleet:
            wait_until(lambda: d.running, 10, what="every daemon up")
        for d in fleet:
            assert d.stop() == 0


if __name__ == "__main__":
    run_tests(globals())
