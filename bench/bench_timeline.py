#!/usr/bin/python3
"""bench/bench_timeline.py - a picture of what every slot does while
scenario A and then scenario B happen.

    bench/run [--smoke] BUILD_DIR

One occamyd, 8 slots, helper_priority = idle, the `recorder` plugin.  A
separate thread asks the daemon for its slots every 20 ms (the control
command `occamyctl status` uses; the reply lists each slot's status) while
the main thread plays this script:

    0.5 s  a master request arrives (runs 2.3 s): it takes a slot and its
           expand() fills the other 7 with internal helpers       (scenario A)
    1.2 s  8 help requests arrive "from elsewhere": no room, stored
    2.8 s  the master ends: its helpers end, the stored help requests
           become external helpers in the freed slots
    3.3 s  a request every 0.3 s (each runs 0.9 s): each preempts a helper
           and starts at once; when one ends, the freed slot goes first to
           the running requests' expand() (internal helpers)      (scenario B)

Writes $OCCAMY_BENCH_OUT/timeline.png and timeline.md.
"""

import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import schedbench as sb  # noqa: E402

SLOTS = 8
PERIOD = 0.020
COLORS = {"protected": "#d62728", "internal": "#2ca02c", "external": "#1f77b4",
          "empty": "#e8e8e8"}


class Sampler(threading.Thread):
    def __init__(self, ot, names, t0):
        super().__init__(daemon=True)
        self.ot, self.names, self.t0 = ot, names, t0
        self.samples = []          # (t, [status per slot], head)
        self.stop = threading.Event()
        self.rtt = []

    def run(self):
        st = sb.Status(self.ot, self.names)
        k = 0
        try:
            while not self.stop.is_set():
                a = time.monotonic()
                r = st.ask(timeout=0.5)
                b = time.monotonic()
                if r:
                    head, slots = r[0]
                    status = ["empty"] * SLOTS
                    for i, s, _, _ in slots:
                        if i < SLOTS:
                            status[i] = s
                    self.samples.append(((a + b) / 2 - self.t0, status, head))
                    self.rtt.append(b - a)
                k += 1
                nxt = self.t0 + k * PERIOD
                while nxt < time.monotonic():
                    k += 1
                    nxt = self.t0 + k * PERIOD
                self.stop.wait(max(0.0, nxt - time.monotonic()))
        finally:
            st.close()


def main():
    a = sb.parse_args(__doc__)
    ot = sb.harness()
    scale = 1.0            # same script in smoke mode: it is only ~6.5 s
    machine = sb.machine_line()
    events = []
    with sb.Workdir() as wd:
        logpath = wd.file("recorder.log")
        with ot.Daemon({"recorder": {"log": logpath}}, slots=SLOTS, helper_priority="idle") as d:
            pub = sb.Publisher(ot)
            time.sleep(0.3)
            t0 = time.monotonic()
            sampler = Sampler(ot, d.names, t0)
            sampler.start()

            def at(t):
                left = t0 + t * scale - time.monotonic()
                if left > 0:
                    pub.pump(left)

            at(0.5)
            pub.request(d.names, "recorder", "2300", task_id="A")
            events.append((time.monotonic() - t0, "A: master arrives"))
            at(1.2)
            for k in range(SLOTS):
                pub.control(d.names, f"6000,ext-{k}", handler="recorder")
            events.append((time.monotonic() - t0, "8 help requests stored"))
            at(2.8)
            t = 3.3
            k = 0
            while t < 5.5:
                at(t)
                pub.request(d.names, "recorder", "900", task_id=f"B{k}")
                if k == 0:
                    events.append((time.monotonic() - t0, "B: requests every 0.3 s"))
                t += 0.3
                k += 1
            at(6.5)
            sampler.stop.set()
            sampler.join()
            pub.close()
    samples = sampler.samples
    if not samples:
        sb.log("no status samples")
        return 1
    # the master's end, from the samples: the first with nothing protected
    t_end = next((t for t, st, _ in samples if t > events[0][0] + 0.5 and "protected" not in st),
                 None)
    if t_end is not None:
        events.insert(2, (t_end, "master ends: externals fill"))
    dat = os.path.join(a.out, "timeline.dat")
    with open(dat, "w") as f:
        for t, status, _ in samples:
            for i, s in enumerate(status):
                f.write(f"{t:.4f} {i} {int(COLORS.get(s, '#000000')[1:], 16)}\n")
    ev_cmds = "\n".join(
        f"set arrow from {t:.3f}, graph 0 to {t:.3f}, graph 1 nohead dt 2 lc rgb '#555555'\n"
        f"set label '{lab}' at {t + 0.03:.3f}, {SLOTS - 0.3 + 0.45 * (i % 2):.2f} "
        f"font ',9' tc rgb '#333333' front"
        for i, (t, lab) in enumerate(events))
    keys = ", ".join(f"NaN with boxes fs solid lc rgb '{c}' title '{n}'"
                     for n, c in COLORS.items())
    ok = sb.gnuplot(f"""
set terminal pngcairo size 1100,430 font ',10'
set output '{os.path.join(a.out, "timeline.png")}'
set title 'Slots of one occamyd (8 slots, 2 CPUs), sampled every 20 ms: scenario A, then B'
set xlabel 'time (s)'
set ylabel 'slot'
set yrange [-0.6:{SLOTS + 0.6}]
set ytics 0,1,{SLOTS - 1}
set xrange [0:{samples[-1][0] + 0.05:.2f}]
set key outside right top
set style fill solid 1.0 noborder
{ev_cmds}
plot '{dat}' using 1:2:({PERIOD / 2 + 0.001}):(0.42):3 with boxxyerror lc rgb variable notitle, \\
     {keys}
""", "timeline.png")
    os.unlink(dat)

    # a few facts from the samples
    def first_time(pred, after=0.0):
        for t, status, head in samples:
            if t >= after and pred(status):
                return t
        return float("nan")

    t_a = events[0][0]
    t_full = first_time(lambda s: s.count("protected") == 1 and s.count("internal") == SLOTS - 1,
                        t_a)
    t_ext = first_time(lambda s: s.count("external") == SLOTS, 2.5)
    t_b = events[-1][0]
    t_b_prot = first_time(lambda s: "protected" in s, t_b)
    max_prot = max(s.count("protected") for _, s, _ in samples)
    rtt = sorted(sampler.rtt)
    rows = [
        ["master arrives (publish)", f"{t_a:.3f} s", ""],
        ["first sample with 1 protected + 7 internal", f"{t_full:.3f} s",
         f"{(t_full - t_a) * 1e3:.0f} ms after the publish (sampling: 20 ms)"],
        ["first sample with 8 externals (after the master ends)", f"{t_ext:.3f} s", ""],
        ["first B request (publish) / first sample with it running", f"{t_b:.3f} s / {t_b_prot:.3f} s", ""],
        ["most protected slots at once", str(max_prot), ""],
        ["samples / status round trip p50, p99", f"{len(samples)}",
         f"{sb.pct(rtt, 50) * 1e3:.2f} / {sb.pct(rtt, 99) * 1e3:.2f} ms"],
    ]
    text = f"""## Timeline: scenario A then B, slot by slot

`bench/bench_timeline.py{' --smoke' if a.smoke else ''}` — {machine}.
One occamyd, {SLOTS} slots, `helper_priority = idle`, `recorder` plugin;
slots sampled every 20 ms with the status command (`occamyctl status`'s
control message).  Script: at 0.5 s a master request (runs 2.3 s) arrives
and fills every slot with its helpers (**A**); at 1.2 s 8 help requests
arrive from elsewhere and are stored (no room); when the master ends, they
become external helpers; from 3.3 s a request every 0.3 s (each 0.9 s)
preempts a helper and starts at once (**B**); each freed slot goes first to
the running requests' own helpers.

![slot timeline]({'timeline.png' if ok else '(gnuplot missing)'})

{sb.table(["event", "when", ""], rows)}

**Reading.** Red is protected work, green helpers of a request running
here, blue helpers for work from elsewhere, grey nothing.  The server is
never idle while there is work anywhere: the master's expand() fills all 8
slots within one 20 ms sample, the stored help requests take the slots the
moment the master's helpers end, and the B requests each take a slot from a
helper without waiting (external helpers go first).  As requests end, their
slots go to the requests still running (green) before any stored help.
"""
    sb.write_report(a, "timeline", text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
