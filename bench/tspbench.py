"""tspbench - shared code of the TSP benchmarks (bench_tsp_scaling,
bench_fleet, bench_bursty): TSPLIB instances (with the reader of
tests/integration/test_tsp.py), checked replies, fleets of tsp daemons and
their arguments, and a timed trace of requests played against a fleet.
Not a benchmark itself (bench/run only runs bench_*).

The harness (tests/integration/occamy_test.py) reads OCCAMY_BUILD when it
is imported, which a benchmark sets from its arguments: so it is imported
here only by the functions that need it, and OPTIMA can check arguments
before.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests", "integration"))

OPTIMA = {"berlin52": 7542, "kroA100": 21282, "ch150": 6528, "a280": 2579,
          "pcb442": 50778, "pr1002": 259045}
# Helpers off (tsp help = no, expand = no): the same fleet as a plain worker
# pool, the no-helper floor that helpers on are measured against.
OFF_OPTS = {"help": "no", "expand": "no"}


def arg_parser(doc):
    """The TSP benchmarks' common arguments: BUILD_DIR, --smoke, --out."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("build", metavar="BUILD_DIR")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=os.environ.get(
        "OCCAMY_BENCH_OUT", os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")))
    return ap


def parse(ap):
    """Parse, check BUILD_DIR and point the harness at it."""
    a = ap.parse_args()
    if not os.path.isdir(a.build):
        ap.error(f"{a.build}: not a directory")
    os.environ["OCCAMY_BUILD"] = os.path.abspath(a.build)
    return a


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def load(name):
    """(TSPLIB file bytes, [(x, y), ...]) of an EUC_2D instance, read as the
    tsp integration tests read it."""
    from occamy_test import Skip
    from test_tsp import read_tsplib
    try:
        return read_tsplib(name)
    except Skip as e:
        raise SystemExit(f"{e}: the TSPLIB data set is needed") from None


def check_reply(coords, res, what):
    """The reply's tour is a permutation whose length is the one claimed."""
    tour = res["tour"]
    if sorted(tour) != list(range(len(coords))):
        raise SystemExit(f"{what}: the reply's tour is not a permutation")
    from test_tsp import euc_2d_length
    if euc_2d_length(coords, tour) != res["length"]:
        raise SystemExit(f"{what}: claimed length {res['length']} is not the tour's")


def play_trace(pub, names, trace, payloads, tag, timeout):
    """Publish tsp request payloads[i] at trace[i][0] ns (bench_bursty's
    make_trace) after a start 200 ms from now, through pub (a
    schedbench.Publisher, replies to its own queue), with task id and
    correlation id TAG + i; wait up to timeout s for the replies.  Returns
    ([(i, latency s publish -> reply, reply JSON)] of the replies received,
    whether all came)."""
    t_base = time.monotonic_ns() + 200_000_000
    pubs = {}
    for i, ((t, _name, _seed), body) in enumerate(zip(trace, payloads)):
        pub.wait_until_ns(t_base + t)
        pubs[f"{tag}{i}"] = (i, pub.request(names, "tsp", body, task_id=f"{tag}{i}",
                                            cid=f"{tag}{i}"))
    ok = pub.wait_replies(pubs, timeout)
    got = []
    for cid, (i, t0) in pubs.items():
        if cid in pub.replies:
            recv, _props, body = pub.replies[cid]
            got.append((i, (recv - t0) / 1e9, json.loads(body)))
    return got, ok


def idle(v):
    return (v['occamy_slots{status="empty"}'] == v["occamy_slots_capacity"]
            and v["occamy_helpers_draining"] == 0 and v["occamy_external_queue_depth"] == 0)


class Fleet:
    """ndaemons occamyd sharing their queues, slots each, the tsp plugin
    with helpers on or off.  started(i, daemon) runs right after daemon i
    has started (bench_fleet puts it into its CPU cgroup there)."""

    def __init__(self, ndaemons, slots, period_ms=None, off=False, started=None):
        from occamy_test import Daemon, free_port, new_names
        names = new_names()
        self.ports = [free_port() for _ in range(ndaemons)]
        self.started = started
        self.daemons = [Daemon({"tsp": dict(OFF_OPTS) if off else {}}, names=names, slots=slots,
                               expansion_period_ms=period_ms,
                               metrics_listen=f"127.0.0.1:{p}") for p in self.ports]

    def __enter__(self):
        try:
            for i, d in enumerate(self.daemons):
                d.start()
                if self.started is not None:
                    self.started(i, d)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        for d in self.daemons:
            try:
                if d.running:
                    d.stop(timeout=10)
            except AssertionError as e:
                log(f"warning: {e}")
                d.kill()
            d.close()

    def metrics(self):
        from occamy_test import scrape_metrics
        return [scrape_metrics(p) for p in self.ports]

    def wait_idle(self, timeout):
        from occamy_test import wait_until
        wait_until(lambda: all(idle(v) for v in self.metrics()), timeout, 0.02,
                   "every daemon idle")
