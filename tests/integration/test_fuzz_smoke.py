"""The libFuzzer targets build and survive a short run.

tests/fuzz/run builds every target of tests/fuzz/ with clang
(-fsanitize=fuzzer,address,undefined) and runs each from its seed corpus;
here for 10 s per target (OCCAMY_FUZZ_SMOKE_SECONDS), which catches a
target that no longer builds, a decoder that crashes on its own seeds or on
what a few seconds of mutation find, and leaks.  Skipped when clang or its
libFuzzer runtime is missing (Debian: clang, libclang-rt-14-dev).  Needs no
broker.
"""

import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
from occamy_test import BUILD, ROOT, SCALE, note, run_tests, skip, timeout  # noqa: E402

SECONDS = int(os.environ.get("OCCAMY_FUZZ_SMOKE_SECONDS", 10))
TARGETS = ["config", "tsp", "headers", "uri"]


@timeout(120 + 4 * SECONDS)
def test_fuzz_targets_build_and_run_clean():
    run = os.path.join(ROOT, "tests", "fuzz", "run")
    # Binaries, corpora and any crash input stay in BUILD/fuzz-smoke (started
    # afresh from the seeds each time) for a look after a failure.
    out = os.path.join(BUILD, "fuzz-smoke")
    env = dict(os.environ)
    # The fuzzers get their own sanitizer settings from tests/fuzz/run; a
    # TSan build's options must not leak into an ASan binary.
    env.pop("TSAN_OPTIONS", None)
    p = subprocess.run([run, "-t", str(SECONDS), "-o", out, "-k", *TARGETS], env=env,
                       capture_output=True, text=True, errors="replace",
                       stdin=subprocess.DEVNULL, timeout=(120 + 4 * SECONDS) * SCALE)
    text = p.stdout + p.stderr
    if p.returncode == 125:
        skip("clang or its libFuzzer runtime is missing (Debian: clang, libclang-rt-14-dev): "
             + text.strip().splitlines()[0])
    for line in text.splitlines():
        if line.startswith("fuzz: ") and ("DONE" in line or " ok" in line or "FAIL" in line
                                         or "reproduce" in line):
            note(line)
    assert p.returncode == 0, f"tests/fuzz/run failed ({p.returncode}); outputs in {out}:\n" \
        + text[-6000:]


if __name__ == "__main__":
    run_tests(globals())
