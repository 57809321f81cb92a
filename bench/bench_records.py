#!/usr/bin/python3
"""bench/bench_records.py - what record keeping costs: no-op requests per
second and CPU per message of occamyd with its state_dir records on, against
the same daemon with them off, in one run.

    bench/run [--smoke] BUILD_DIR
    tests/broker run /usr/bin/python3 bench/bench_records.py [--smoke] BUILD_DIR

Each run drains N persistent no-op requests at slots = prefetch = 2 and 8
(bench/drain.py: the slope of the queue depth, start-up excluded).  "off"
points state_dir at a path that cannot be created, so the daemon runs
without records (it says so in its log).  A first drain warms the broker
up (its first queues are slow) and is not counted.  Runs alternate (on, off,
off, on), and each on/off pair, run back to back, gives a ratio: the median
of those ratios is reported, since the machine is shared and drifts.

Writes $OCCAMY_BENCH_OUT/bench_records.md (default bench/out).
--smoke: 2 000 messages, one round.
"""

import argparse
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("build", metavar="BUILD_DIR")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("-n", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None)
    a = ap.parse_args()
    a.n = a.n or (2000 if a.smoke else 50000)
    a.reps = a.reps or (1 if a.smoke else 2)
    a.out = os.environ.get("OCCAMY_BENCH_OUT") or os.path.join(HERE, "out")
    return a


ARGS = parse_args()
os.environ["OCCAMY_BUILD"] = os.path.abspath(ARGS.build)
sys.path.insert(0, HERE)
sys.dont_write_bytecode = True  # no bench/__pycache__
import drain  # noqa: E402
from drain import log  # noqa: E402

OFF = {"state_dir": "/proc/occamy-bench-no-records"}  # cannot be created


def main():
    broker = drain.Broker()
    rows = []
    try:
        drain.run_occamy(2, 2, ARGS.n, broker=broker)  # warm-up, not counted
        for slots in (2, 8):
            got = {"on": [], "off": []}
            for rep in range(ARGS.reps):
                order = ("on", "off") if rep % 2 == 0 else ("off", "on")
                for mode in order:
                    r = drain.run_occamy(slots, slots, ARGS.n, broker=broker,
                                         extra=None if mode == "on" else OFF)
                    log(f"records {mode}, slots {slots}: {r['msg_per_s']:.0f} msg/s, "
                        f"{r['cpu_us']:.1f} µs CPU/msg")
                    got[mode].append(r)
            med = {m: (statistics.median(x["msg_per_s"] for x in v),
                       statistics.median(x["cpu_us"] for x in v)) for m, v in got.items()}
            pairs = list(zip(got["on"], got["off"]))
            med["rate_ratio"] = statistics.median(a["msg_per_s"] / b["msg_per_s"] for a, b in pairs)
            med["cpu_ratio"] = statistics.median(a["cpu_us"] / b["cpu_us"] for a, b in pairs)
            rows.append((slots, med))
    finally:
        broker.close()
    os.makedirs(ARGS.out, exist_ok=True)
    L = ["## Record keeping: its cost on the no-op hot path", "",
         f"{ARGS.n} persistent no-op requests per run, {ARGS.reps} run(s) each way after a "
         "warm-up drain; records on (the default: the tasks file mapped shared, a 512-byte "
         "copy when a request is taken, one store when it is settled) against off "
         "(`state_dir` unusable).  Rates and CPU are medians; the ratios are the medians of "
         "the on/off pairs run back to back.", "",
         "| slots = prefetch | on msg/s | off msg/s | on / off (pairs) | on µs CPU/msg | "
         "off µs CPU/msg | on / off (pairs) |", "|---|---|---|---|---|---|---|"]
    for slots, med in rows:
        (ron, con), (roff, coff) = med["on"], med["off"]
        L.append(f"| {slots} | {ron:.0f} | {roff:.0f} | {med['rate_ratio']:.3f} | {con:.1f} | "
                 f"{coff:.1f} | {med['cpu_ratio']:.3f} |")
    micro = subprocess.run([os.path.join(ARGS.build, "bench", "records_micro"),
                            "200000" if ARGS.smoke else "2000000"],
                           capture_output=True, text=True, check=True).stdout.strip()
    L += ["", f"The records alone (`bench/records_micro`: `records_begin` + `records_end` in a "
              f"loop, no broker): {micro}."]
    text = "\n".join(L) + "\n"
    with open(os.path.join(ARGS.out, "bench_records.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
