"""The benchmarks still run: `bench/run --smoke` against its own private
broker, every benchmark for a few seconds, so they cannot rot between the
full runs that produce bench/RESULTS.md."""

import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
from occamy_test import BUILD, ROOT, SCALE, note, run_tests, timeout  # noqa: E402


@timeout(600)
def test_every_benchmark_runs_in_smoke_mode():
    env = dict(os.environ)
    for k in [k for k in env if k.startswith("OCCAMY_TEST_BROKER") or k.startswith("OCCAMY_TEST_AMQP")]:
        del env[k]  # bench/run starts a broker of its own
    env.pop("OCCAMY_BENCH_FILTER", None)
    p = subprocess.run([os.path.join(ROOT, "bench", "run"), "--smoke", BUILD], cwd=ROOT,
                       env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       timeout=540 * SCALE)
    out = p.stdout + p.stderr
    ran = [l for l in out.splitlines() if l.startswith("===== bench_") and l.endswith("s =====")]
    note(*ran)
    assert p.returncode == 0, out[-4000:]
    assert len(ran) >= 8, f"only {len(ran)} benchmarks ran:\n" + out[-4000:]


if __name__ == "__main__":
    run_tests(globals())
