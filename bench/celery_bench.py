"""celery_bench - the Celery side of bench_preemption and bench_bursty.

A Celery 5 app on the benchmarks' private broker: prefork pool (the
worker is started by schedbench.CeleryWorker with --concurrency 8
--prefetch-multiplier 1), acks_late, one queue with x-max-priority so that
requests (priority 9) overtake queued helper work (priority 0): the most
favourable set-up Celery has for "a request waits for the next free
worker".  Settings come from the environment:

    CELERY_BENCH_BROKER   broker URL (kombu form of OCCAMY_TEST_AMQP_URI)
    CELERY_BENCH_QUEUE    queue name (one per run)
    CELERY_BENCH_STOP     a path; once it exists helper chains stop

Tasks write what they measured as lines appended (one write(), O_APPEND)
to a log file named in their arguments, so no result backend is needed.
"""

import json
import os
import resource
import subprocess
import time

from celery import Celery
from kombu import Exchange, Queue

QUEUE = os.environ.get("CELERY_BENCH_QUEUE", "celery-bench")

app = Celery("celery_bench", broker=os.environ.get("CELERY_BENCH_BROKER", "amqp://"))
app.conf.update(
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    task_ignore_result=True,
    task_default_queue=QUEUE,
    task_queues=[Queue(QUEUE, Exchange(QUEUE), routing_key=QUEUE,
                       queue_arguments={"x-max-priority": 10})],
    task_default_priority=0,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    worker_send_task_events=False,
    task_send_sent_event=False,
)


def _append(path, line):
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def _spin_wall(ms):
    end = time.monotonic() + ms / 1000.0
    x = 1
    while time.monotonic() < end:
        for _ in range(200):
            x = (x * 6364136223846793005 + 1442695040888963407) & 0xFFFFFFFFFFFFFFFF
    return x


def _spin_cpu(ms):
    end = time.thread_time() + ms / 1000.0
    x = 1
    while time.thread_time() < end:
        for _ in range(200):
            x = (x * 6364136223846793005 + 1442695040888963407) & 0xFFFFFFFFFFFFFFFF
    return x


@app.task(name="bench.helper", acks_late=True)
def helper(chain, k, chunk_ms, long_ms=0, long_every=0):
    """One chunk of background work; enqueues the next chunk of its chain
    (so 8 chains keep 8 workers busy, like occamy's refilled helpers).
    Every long_every-th chunk lasts long_ms instead of chunk_ms."""
    long_chunk = long_every and (k + chain * 3) % long_every == long_every - 1
    stop = os.environ.get("CELERY_BENCH_STOP")
    if not (stop and os.path.exists(stop)):
        helper.apply_async((chain, k + 1, chunk_ms, long_ms, long_every), priority=0)
    _spin_wall(long_ms if long_chunk else chunk_ms)


@app.task(name="bench.request", acks_late=True)
def request(seq, cpu_ms, logpath):
    t = time.monotonic_ns()  # the task's first instruction
    _spin_cpu(cpu_ms)
    _append(logpath, f"{seq} {t} {time.monotonic_ns()}")


@app.task(name="bench.tsp", acks_late=True)
def tsp(seq, body, logpath, cli, plugin):
    """The tsp plugin's optimiser, single-threaded, for the request's budget
    (bench/plugins/tsp_cli.c drives build/plugins/tsp.so)."""
    t0 = time.monotonic_ns()
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    p = subprocess.run([cli, plugin], input=body.encode(), capture_output=True)
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t1 = time.monotonic_ns()
    rec = {"seq": seq, "start": t0, "end": t1,
           "cpu": (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)}
    if p.returncode == 0:
        res = json.loads(p.stdout)
        rec.update(length=res["length"], elapsed_ms=res.get("elapsed_ms"),
                   iterations=res.get("iterations"))
    else:
        rec["error"] = p.stderr.decode("utf-8", "replace")[:300]
    _append(logpath, json.dumps(rec))
