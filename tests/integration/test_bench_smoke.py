"""The benchmarks still run: `bench/run --smoke` against its own private
broker, every benchmark for a few seconds, so they cannot rot between the
full runs that produce bench/RESULTS.md."""

import os
import re
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
    assert len(ran) >= 11, f"only {len(ran)} benchmarks ran:\n" + out[-4000:]
    check_fleet_smoke(out)


def check_fleet_smoke(out):
    """bench_fleet either put every daemon under its CPU quota, checked the
    replies' tours (one request at a time and the bursty trace) and removed
    its groups, or said why it could not."""
    fleet = [line for line in out.splitlines() if line.startswith("fleet: ")]
    note(*fleet)
    if any(line.startswith("fleet: SKIP: ") for line in fleet):
        return
    groups = re.findall(r"^fleet: cgroup (/sys/fs/cgroup/cpu/occamy-bench-\S+): "
                        r"quota 40000/100000 us, pid \d+", out, re.M)
    assert len(groups) >= 6, "bench_fleet placed no daemon in a CPU group:\n" + "\n".join(fleet)
    assert f"fleet: cgroups removed: {len(groups)}/{len(groups)}" in fleet, "\n".join(fleet)
    left = [g for g in groups if os.path.exists(g)]
    assert not left, f"CPU groups left behind: {left}"
    checked = re.search(r"^fleet: tours checked: (\d+) valid$", out, re.M)
    assert checked and int(checked.group(1)) >= 15, "\n".join(fleet)
    # The bursty trace, in its smoke form: 3 requests on the on and the off fleet.
    bursty = re.search(r"^fleet: bursty tours checked: (\d+) valid, (\d+) plays$", out, re.M)
    assert bursty and int(bursty.group(1)) >= 6 and int(bursty.group(2)) >= 2, "\n".join(fleet)


if __name__ == "__main__":
    run_tests(globals())
