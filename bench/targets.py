"""bench/targets.py - the benchmarks' targets as one table.

A benchmark calls check() for every target it measures (issue 19's hot-path
and preemption targets, and those it keeps: CPU share, fill, footprint).
Each call appends a row to $OCCAMY_BENCH_OUT/targets-BENCH.tsv (made anew
by the benchmark's first call, so a filtered run replaces only its own);
bench/run puts them at the head of bench/RESULTS.md, so one table says what
is met and what is missed.  Not a benchmark (bench/run only
runs bench_*).
"""

import os

_started = set()  # benchmarks whose file this process has begun
OPS = {"<=": lambda v, lim: v <= lim, ">=": lambda v, lim: v >= lim}


def check(bench, target, value, op, limit, unit=""):
    """Record one target: value op limit.  Returns "met", "**missed**", or
    "not measured" when value is None, for the benchmark's own text."""
    if value is None or value != value:  # None or NaN: nothing to compare
        verdict = "not measured"
        shown = "–"
    else:
        verdict = "met" if OPS[op](value, limit) else "**missed**"
        shown = f"{value:.3g}{unit}"
    out = os.environ.get("OCCAMY_BENCH_OUT")
    if out:
        mode = "a" if bench in _started else "w"
        _started.add(bench)
        with open(os.path.join(out, f"targets-{bench}.tsv"), mode) as f:
            f.write("\t".join([bench, target, f"{op} {limit:g}{unit}", shown, verdict]) + "\n")
    return verdict
