"""How occamy reaches a Debian fleet, and how that fleet is watched.

- a build that follows its settings: `make`, `make install PREFIX=/usr`,
  `make` again rebuilds each time (build/BUILD-FLAGS), so the unit tests see
  the compiled-in defaults they expect;
- `make deb` (dpkg-buildpackage) builds occamyd and occamy-plugin-dev,
  lintian finds no error, and the packages install, configure, build an
  out-of-tree plugin and purge without leaving a file (as root only);
- the Prometheus rules (conf/prometheus/) pass `promtool check rules` and
  their unit tests, and a real Prometheus on a private loopback port scrapes
  two daemons, records the fleet series and fires and clears the intensity
  alert.

The builds run only in the plain run: under a sanitizer they would repeat
the same work at twice the cost.
"""

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request

sys.path.insert(0, os.path.dirname(__file__))
from occamy_test import (AMQP_URI, BUILD, ROOT, SANITIZER, SCALE, Daemon,  # noqa: E402
                         _prctl_pdeathsig, free_port, note, publish_request, run_tests,
                         scrape_metrics, skip, timeout, wait_until)

RULES = os.path.join(ROOT, "conf", "prometheus", "occamy.rules.yml")
RULES_TEST = os.path.join(ROOT, "conf", "prometheus", "occamy.rules.test.yml")
PACKAGES = ("occamyd", "occamy-plugin-dev")


def run(cmd, timeout=120, **kw):
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout * SCALE, stdin=subprocess.DEVNULL, **kw)


def ok(p):
    assert p.returncode == 0, f"{p.args!r} exited {p.returncode}:\n{p.stdout[-4000:]}"
    return p.stdout


def need_plain_build(what):
    if SANITIZER:
        skip(f"{what} is tested in the plain run, not under {SANITIZER}")


def need_tool(name):
    if not shutil.which(name):
        skip(f"{name} is not installed (scripts/deps installs it)")


def compiled_plugin_dir(binary):
    with open(binary, "rb") as f:
        data = f.read()
    dirs = set(re.findall(rb"(/[\w/.-]*/lib/occamy/plugins)\0", data))
    assert len(dirs) == 1, f"{binary}: compiled-in plugin dirs {dirs}"
    return dirs.pop().decode()


# ------------------------------------------------------------- build flags

@timeout(600)
def test_make_install_with_another_prefix_rebuilds_and_a_later_make_rebuilds_back():
    need_plain_build("the build sequence")
    b = tempfile.mkdtemp(prefix="occamy-flags-")
    try:
        make = ["make", "-C", ROOT, "-j2", f"B={b}"]
        ok(run(make + ["all"], timeout=300))
        assert compiled_plugin_dir(f"{b}/occamyd") == "/usr/local/lib/occamy/plugins"
        again = ok(run(make + ["all"]))
        assert " -c " not in again, f"an unchanged build recompiled:\n{again}"

        dest = os.path.join(b, "dest")
        out = ok(run(make + ["install", f"DESTDIR={dest}", "PREFIX=/usr"], timeout=300))
        assert "build settings changed" in out, out[-2000:]
        assert compiled_plugin_dir(f"{dest}/usr/sbin/occamyd") == "/usr/lib/occamy/plugins"
        assert os.path.exists(f"{dest}/usr/lib/occamy/plugins/tsp.so")

        # what `make test` does next: it must see the /usr/local build again
        ok(run(make + ["all"], timeout=300))
        assert compiled_plugin_dir(f"{b}/occamyd") == "/usr/local/lib/occamy/plugins"
        p = run([f"{b}/tests/unit/test_config"], env=dict(os.environ, CMOCKA_MESSAGE_OUTPUT="TAP"))
        assert p.returncode == 0, p.stdout[-3000:]
        assert re.search(r"^ok \d+ - test_empty_sections_give_documented_defaults", p.stdout, re.M), \
            p.stdout[-3000:]

        ok(run(make + ["all", "CFLAGS=-O1 -g"], timeout=300))
        with open(f"{b}/BUILD-FLAGS") as f:
            assert "-O1 -g" in f.read()
    finally:
        shutil.rmtree(b, ignore_errors=True)


# ------------------------------------------------------------ Debian packages

_debs = {}


def built_debs():
    """`make deb` once per test run, into a temp dir: {package: path}."""
    if not _debs:
        b = tempfile.mkdtemp(prefix="occamy-deb-")
        t0 = time.monotonic()
        out = ok(run(["make", "-C", ROOT, "deb", f"B={b}"], timeout=600))
        note(f"make deb took {time.monotonic() - t0:.1f}s")
        _debs["dir"] = b
        _debs["log"] = out
        for pkg in PACKAGES:
            found = glob.glob(f"{b}/deb/{pkg}_*.deb")
            assert len(found) == 1, f"{pkg}: {found}\n{out[-3000:]}"
            _debs[pkg] = found[0]
    return _debs


def need_root_and_debian_tools():
    need_plain_build("Debian packaging")
    if os.geteuid() != 0:
        skip("needs root (dpkg-buildpackage, dpkg -i)")
    for tool in ("dpkg-buildpackage", "dh", "lintian"):
        need_tool(tool)


def deb_field(deb, field):
    return ok(run(["dpkg-deb", "-f", deb, field])).strip()


def deb_paths(deb):
    lines = ok(run(["dpkg-deb", "-c", deb])).splitlines()
    paths = []
    for line in lines:
        name = line.split(None, 5)[5].split(" -> ")[0]
        name = "/" + name.lstrip("./").rstrip("/")
        if name != "/":
            paths.append(name)
    return paths


@timeout(900)
def test_make_deb_builds_both_packages_with_generated_depends_and_lintian_reports_no_error():
    need_root_and_debian_tools()
    debs = built_debs()
    d, dev = debs["occamyd"], debs["occamy-plugin-dev"]
    assert deb_field(d, "Version") == "0.1.0"
    depends = deb_field(d, "Depends")
    for lib in ("libc6", "librabbitmq4", "libinih1", "libmicrohttpd12", "libsystemd0"):
        assert lib in depends, depends
    paths = deb_paths(d)
    for p in ("/usr/sbin/occamyd", "/usr/bin/occamyctl", "/usr/lib/occamy/plugins/tsp.so",
              "/lib/systemd/system/occamyd.service", "/lib/systemd/system/occamyd@.service",
              "/etc/occamy/occamy.ini",
              "/usr/share/man/man8/occamyd.8.gz", "/usr/share/man/man5/occamy.ini.5.gz",
              "/usr/share/man/man1/occamyctl.1.gz", "/usr/share/doc/occamyd/README.Debian",
              "/usr/share/doc/occamyd/copyright", "/usr/share/doc/occamyd/changelog.gz"):
        assert p in paths, f"{p} not in occamyd: {paths}"
    assert set(deb_paths(dev)) >= {"/usr/include/occamy/plugin.h",
                                  "/usr/share/pkgconfig/occamy-plugin.pc"}
    ctl = tempfile.mkdtemp(prefix="occamy-ctl-")
    try:
        ok(run(["dpkg-deb", "-e", d, ctl]))
        with open(f"{ctl}/conffiles") as f:
            assert f.read().split() == ["/etc/occamy/occamy.ini"]
        with open(f"{ctl}/postinst") as f:
            postinst = f.read()
        assert "deb-systemd-helper enable 'occamyd.service'" in postinst, postinst
        assert "deb-systemd-invoke start" not in postinst, postinst
        with open(f"{ctl}/prerm") as f:
            assert "deb-systemd-invoke stop 'occamyd.service'" in f.read()
    finally:
        shutil.rmtree(ctl, ignore_errors=True)
    with tempfile.TemporaryDirectory() as home:
        # lintian refuses nothing as root but says so; HOME keeps its cache private
        p = run(["lintian", "--fail-on", "error", "-EI", d, dev], timeout=300,
                env=dict(os.environ, HOME=home))
    tags = [line for line in p.stdout.splitlines() if re.match(r"^[EWIPX]: ", line)]
    note("lintian:", *(tags or ["(no tags)"]))
    assert p.returncode == 0 and not any(t.startswith("E: ") for t in tags), p.stdout


def installed(pkg):
    p = run(["dpkg-query", "-W", "-f=${db:Status-Abbrev}", pkg])
    return p.returncode == 0 and p.stdout.strip() not in ("", "un")


@timeout(900)
def test_packages_install_enable_without_starting_check_config_build_a_plugin_and_purge_clean():
    need_root_and_debian_tools()
    # dpkg --root would need a whole Debian in the throwaway root for the
    # shared libraries and deb-systemd-helper: the packages go onto this
    # (CI) machine, and are purged however the test ends.
    for pkg in PACKAGES:
        if installed(pkg):
            skip(f"{pkg} is already installed on this machine: not touching it")
    for path in ("/etc/occamy", "/usr/sbin/occamyd", "/usr/lib/occamy"):
        if os.path.lexists(path):
            skip(f"{path} exists on this machine: not touching it")
    debs = built_debs()
    paths = deb_paths(debs["occamyd"]) + deb_paths(debs["occamy-plugin-dev"])
    new = [p for p in paths if not os.path.lexists(p)]
    wants = "/etc/systemd/system/multi-user.target.wants/occamyd.service"
    work = tempfile.mkdtemp(prefix="occamy-pkg-")
    try:
        ok(run(["dpkg", "-i", debs["occamyd"], debs["occamy-plugin-dev"]], timeout=300))
        assert os.path.islink(wants), "the unit is not enabled"
        assert os.path.realpath(wants) == "/lib/systemd/system/occamyd.service" or \
            os.path.realpath(wants).endswith("/systemd/system/occamyd.service")
        if os.path.isdir("/run/systemd/system"):
            p = run(["systemctl", "is-active", "occamyd"])
            assert p.stdout.strip() != "active", "installing started the service"

        ini = "/etc/occamy/occamy.ini"
        with open(ini) as f:
            text = f.read()
        assert re.search(r"^plugin_dir = /usr/lib/occamy/plugins$", text, re.M), text
        # point it at the private broker, as README.Debian tells an admin to
        text = re.sub(r"^uri = .*$", f"uri = {AMQP_URI}", text, count=1, flags=re.M)
        with open(ini, "w") as f:
            f.write(text)
        out = ok(run(["/usr/sbin/occamyd", "-t", "-c", ini]))
        assert "configuration OK" in out, out
        assert os.access("/usr/bin/occamyctl", os.X_OK)
        ok(run(["man", "-w", "occamyd"]))

        # an out-of-tree plugin, built from the -dev package alone
        assert ok(run(["pkg-config", "--variable=plugindir", "occamy-plugin"])).strip() \
            == "/usr/lib/occamy/plugins"
        cflags = ok(run(["pkg-config", "--cflags", "occamy-plugin"])).split()
        src = os.path.join(work, "mine.c")
        shutil.copy(os.path.join(ROOT, "tests", "plugins", "noop.c"), src)
        shutil.copy(os.path.join(ROOT, "tests", "plugins", "fixture.h"), work)
        so = os.path.join(work, "mine.so")
        ok(run(["cc", "-std=c11", "-D_GNU_SOURCE", "-Wall", "-Werror", *cflags, "-fPIC", "-shared", "-o", so, src]))
        mine_ini = os.path.join(work, "mine.ini")
        with open(mine_ini, "w") as f:
            f.write(text + f"\n[plugin mine]\npath = {so}\n")
        out = ok(run(["/usr/sbin/occamyd", "-t", "-c", mine_ini]))
        assert "configuration OK" in out, out
    finally:
        purge = run(["dpkg", "--purge", *PACKAGES], timeout=300)
        shutil.rmtree(work, ignore_errors=True)
    assert purge.returncode == 0, purge.stdout
    left = [p for p in new if os.path.lexists(p)]
    assert not left, f"dpkg --purge left {left}"
    for p in (wants, "/etc/occamy", "/var/lib/systemd/deb-systemd-helper-enabled/occamyd.service.dsh-also",
              "/var/lib/systemd/deb-systemd-helper-enabled/multi-user.target.wants/occamyd.service"):
        assert not os.path.lexists(p), f"dpkg --purge left {p}"
    for pkg in PACKAGES:
        assert not installed(pkg), pkg


# ------------------------------------------------------------- Prometheus

def dashboard_exprs():
    out = []

    def walk(o):
        if isinstance(o, dict):
            for k, v in o.items():
                if k == "expr" and isinstance(v, str):
                    out.append(v)
                else:
                    walk(v)
        elif isinstance(o, list):
            for x in o:
                walk(x)
    with open(os.path.join(ROOT, "conf", "grafana-occamy.json")) as f:
        walk(json.load(f))
    return out


@timeout(60)
def test_grafana_dashboard_queries_parse_and_name_only_exported_or_recorded_series():
    need_tool("promtool")
    exprs = dashboard_exprs()
    assert len(exprs) > 10, exprs
    with tempfile.TemporaryDirectory() as tmp:
        # Every query, with Grafana's variables filled in, as a recording
        # rule: promtool parses each.
        path = os.path.join(tmp, "dashboard.rules.yml")
        with open(path, "w") as f:
            f.write("groups:\n  - name: dashboard\n    rules:\n")
            for i, e in enumerate(exprs):
                q = (e.replace("$job", ".*").replace("$instance", ".*")
                     .replace("$__rate_interval", "1m"))
                f.write(f"      - record: dashboard:q{i}\n        expr: {json.dumps(q)}\n")
        out = ok(run(["promtool", "check", "rules", path]))
        assert "SUCCESS" in out, out
    port = free_port()
    with Daemon(["sleep"], slots=1, metrics_listen=f"127.0.0.1:{port}") as d:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
        assert d.stop() == 0
    exported = set()
    for m in re.finditer(r"^# TYPE (\S+) (\S+)$", text, re.M):
        exported.add(m.group(1))
        if m.group(2) == "histogram":
            exported |= {m.group(1) + s for s in ("_bucket", "_sum", "_count")}
    with open(RULES) as f:
        recorded = set(re.findall(r"record: (\S+)", f.read()))
    used = {n for e in exprs for n in re.findall(r"\b((?:occamy|process)[a-z0-9_:]*)", e)}
    unknown = sorted(used - exported - recorded)
    assert not unknown, f"dashboard names series nobody exports or records: {unknown}"
    fleet = [e for e in exprs if e in recorded]
    assert {"occamy:protected_ratio:avg", "occamy:erlang_intensity:max"} <= set(fleet), fleet
    note(f"{len(exprs)} dashboard queries parse; {len(used)} series, all exported or recorded; "
         f"fleet panels on the recorded series {sorted(set(fleet))}")


def test_rules_pass_promtool_check_and_their_unit_tests():
    need_tool("promtool")
    out = ok(run(["promtool", "check", "rules", RULES]))
    assert "SUCCESS" in out, out
    out = ok(run(["promtool", "test", "rules", RULES_TEST], cwd=os.path.dirname(RULES_TEST)))
    assert "SUCCESS" in out, out


class Prometheus:
    """Debian's prometheus binary on a private loopback port with its own
    data dir, scraping `targets` every second with `rules`; always stopped."""

    def __init__(self, targets, rules):
        self.dir = tempfile.mkdtemp(prefix="occamy-prom-")
        self.port = free_port()
        shutil.copy(rules, os.path.join(self.dir, "rules.yml"))
        with open(os.path.join(self.dir, "prometheus.yml"), "w") as f:
            json.dump({"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                       "rule_files": ["rules.yml"],
                       "scrape_configs": [{"job_name": "occamy",
                                           "static_configs": [{"targets": targets}]}]}, f)
        self.log = open(os.path.join(self.dir, "prometheus.log"), "w+")
        self.proc = None

    def __enter__(self):
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={self.dir}/prometheus.yml",
             f"--storage.tsdb.path={self.dir}/data",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            cwd=self.dir, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
            preexec_fn=_prctl_pdeathsig)
        try:
            wait_until(self.ready, timeout=60 * SCALE, interval=0.2, what="prometheus ready")
        except BaseException:
            self.__exit__()
            raise
        return self

    def ready(self):
        assert self.proc.poll() is None, "prometheus exited:\n" + self.tail()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def api(self, path, **params):
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr):
        """{frozenset(labels): value} of an instant query."""
        return {frozenset((k, v) for k, v in s["metric"].items() if k != "__name__"):
                float(s["value"][1]) for s in self.api("query", query=expr)["result"]}

    def scalar(self, expr):
        r = self.query(expr)
        return next(iter(r.values())) if len(r) == 1 else None

    def alert_state(self, name):
        states = [a["state"] for a in self.api("alerts")["alerts"]
                  if a["labels"].get("alertname") == name]
        return states[0] if states else "inactive"

    def tail(self):
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-3000:]

    def __exit__(self, *exc):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if exc and exc[0] is not None:
            note("prometheus log:", self.tail())
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def fast_rules(path):
    """The rules with the intensity alert's 5 minutes cut to 3 s, so that a
    test burst can make it fire (promtool test rules covers the 5 minutes)."""
    with open(RULES) as f:
        text = f.read()
    new, n = re.subn(r"(alert: OccamyIntensityHigh\n(?:.*\n)*?\s+for: )5m", r"\g<1>3s", text)
    assert n == 1, "OccamyIntensityHigh has no `for: 5m`"
    with open(path, "w") as f:
        f.write(new)
    return path


@timeout(300)
def test_real_prometheus_records_the_fleet_series_of_two_daemons_and_fires_then_clears_the_intensity_alert():
    need_tool("prometheus")
    ports = [free_port(), free_port()]
    metrics = dict(metrics_window=4, metrics_sample_s=1)
    with tempfile.TemporaryDirectory() as tmp, \
            Daemon(["sleep"], slots=1, metrics_listen=f"127.0.0.1:{ports[0]}", **metrics) as a, \
            Daemon(["sleep"], slots=1, names=a.names, metrics_listen=f"127.0.0.1:{ports[1]}",
                   **metrics) as b, \
            Prometheus([f"127.0.0.1:{p}" for p in ports], fast_rules(os.path.join(tmp, "r.yml"))) as prom:
        wait_until(lambda: prom.scalar("count(up == 1)") == 2, timeout=30 * SCALE,
                   interval=0.5, what="prometheus scrapes both daemons")
        # Both daemons in the recorded series (a rule evaluated between the
        # two first scrapes saw one).
        wait_until(lambda: prom.scalar("occamy:slots_capacity:sum") == 2 and
                   prom.scalar("occamy:daemons_connected:sum") == 2,
                   timeout=30 * SCALE, interval=0.5, what="recorded fleet series of both")
        direct = [scrape_metrics(p) for p in ports]
        assert prom.scalar("occamy:slots_capacity:sum") == \
            sum(m["occamy_slots_capacity"] for m in direct) == 2
        assert prom.scalar("occamy:daemons_connected:sum") == 2
        idle = sum(m["occamy_protected_ratio"] for m in direct) / 2
        assert prom.scalar("occamy:protected_ratio:avg") == idle == 0
        assert prom.alert_state("OccamyIntensityHigh") == "inactive"

        # a sustained burst: more 300 ms tasks than the two slots can serve
        stop = threading.Event()

        def burst():
            while not stop.is_set():
                publish_request(a, "sleep", b"300")
                time.sleep(0.1)
        t = threading.Thread(target=burst, daemon=True)
        t.start()
        try:
            wait_until(lambda: (prom.scalar("occamy:erlang_intensity:max") or 0) >= 0.9,
                       timeout=60 * SCALE, interval=0.5, what="fleet intensity >= 0.9")
            wait_until(lambda: prom.alert_state("OccamyIntensityHigh") == "firing",
                       timeout=60 * SCALE, interval=0.5, what="intensity alert fires")
            busy = prom.scalar("occamy:protected_ratio:avg")
            assert busy is not None and busy > 0, busy
            raw = prom.query("occamy_erlang_intensity")
            assert len(raw) == 2, raw
            # the recorded series is the max of what each daemon reports
            rec = prom.scalar("occamy:erlang_intensity:max")
            assert abs(rec - max(prom.query("occamy_erlang_intensity").values())) < 0.5, (rec, raw)
        finally:
            stop.set()
            t.join()
        wait_until(lambda: prom.alert_state("OccamyIntensityHigh") == "inactive",
                   timeout=120 * SCALE, interval=0.5, what="intensity alert clears after the burst")
        note(f"prometheus saw fleet intensity {rec:.2f} and protected ratio {busy:.2f} under load")
        assert a.stop() == 0 and b.stop() == 0


if __name__ == "__main__":
    run_tests(globals())
