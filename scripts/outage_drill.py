"""Outage drill: a real Prometheus scraping ragcache under traffic while its dependencies break.

    .venv/bin/python scripts/outage_drill.py run [--out DIR]
    .venv/bin/python scripts/outage_drill.py promtool DIR     # rule tests from a recorded run

``run`` starts everything on free loopback ports, all private and stopped afterwards: a
redis-server for the cache, another as the Celery broker, a PostgreSQL cluster of its own
(initdb; as root its binaries run as the ``postgres`` user), gunicorn with 2 workers in
multiprocess mode (project/gunicorn.conf.py), a Celery worker with embedded beat, and
Debian's ``prometheus`` with docs/prometheus-alerts.yml. Then, under steady demo traffic,
one outage at a time: Redis stopped, Redis at maxmemory (noeviction), PostgreSQL stopped,
the broker stopped, aggregation failing (its table renamed away: a migration not applied),
and the Celery worker stopped. For each, it polls Prometheus' /api/v1/alerts and
/ragcache/health every 2 s, and reports the alerts seen pending and firing.

Time is compressed tenfold so the drill takes minutes: scrape and evaluation every 2 s,
beat every 6 s, and a copy of the rules with every duration (``for:``, ranges, offsets)
and the two 600 s age thresholds divided by 10. Everything that decides an alert scales
together, so the rules behave as they would in 10x the time.

``promtool`` turns a run's recorded series (Prometheus' own, from its HTTP API) back into
real time (x10: 2 s steps become 20 s, ages and timestamps stretched alike) and prints
promtool rule tests: per outage, which alert fires and that every other one stays silent.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
SCALE = 10
STEP = 2  # seconds: scrape, evaluation and poll interval of the drill
PG_BIN = Path("/usr/lib/postgresql/15/bin")
ALERTS = [
    "RagcacheRedisDown", "RagcacheRedisRefusingWrites", "RagcacheDatabaseDown", "RagcacheBrokerDown",
    "RagcacheAggregationFailing", "RagcacheAggregationStale", "RagcacheMetricsMissing", "RagcacheHitRateCollapse",
    "RagcacheRefusalSpike", "RagcacheLookupErrors", "RagcacheLookupSlow", "RagcacheUsageBacklogGrowing",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


# --- the rules, time-compressed ----------------------------------------------------------

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _seconds(text: str) -> int:
    return int(text[:-1]) * _UNITS[text[-1]]


def _scaled(text: str) -> str:
    seconds = _seconds(text)
    assert seconds % SCALE == 0, text
    return f"{seconds // SCALE}s"


def scale_rules(text: str) -> str:
    """docs/prometheus-alerts.yml with every duration and age threshold divided by SCALE."""
    rules = yaml.safe_load(text)
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule["for"] = _scaled(rule["for"])
            expr = re.sub(r"\[(\d+[smhd])(?::(\d+[smhd]))?\]",
                          lambda m: f"[{_scaled(m[1])}" + (f":{_scaled(m[2])}]" if m[2] else "]"), rule["expr"])
            expr = re.sub(r"offset (\d+[smhd])", lambda m: f"offset {_scaled(m[1])}", expr)
            expr = re.sub(r"([<>]) 600\b", lambda m: f"{m[1]} {600 // SCALE}", expr)
            assert " 600" not in expr, expr
            rule["expr"] = expr
    return yaml.safe_dump(rules, sort_keys=False)


# --- private servers ---------------------------------------------------------------------

class Drill:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.procs: dict[str, subprocess.Popen] = {}
        self.ports = {name: free_port() for name in ("redis", "broker", "pg", "web", "prometheus")}
        self.pg_data = out / "pg" / "data"
        self.mp_dir = out / "prom-multiproc"
        self.as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        self.env = {k: v for k, v in os.environ.items() if k.upper() != "PROMETHEUS_MULTIPROC_DIR"}
        self.env.update(
            DJANGO_SETTINGS_MODULE="project.settings",
            PYTHONPATH=str(ROOT),
            REDIS_URL=f"redis://127.0.0.1:{self.ports['redis']}/0",
            CELERY_BROKER_URL=f"redis://127.0.0.1:{self.ports['broker']}/0",
            DATABASE_URL=f"postgres://postgres@127.0.0.1:{self.ports['pg']}/ragcache",
            PROMETHEUS_MULTIPROC_DIR=str(self.mp_dir),
            WEB_CONCURRENCY="2",
            RAGCACHE_AGGREGATE_EVERY=str(60 / SCALE),
            RAGCACHE_KEY_PREFIX="drill",
            RAGCACHE_LOG_LEVEL="WARNING",
            DEMO_LLM_DELAY_MS="20",
            DEBUG="0",
            SECRET_KEY="outage-drill-" + os.urandom(8).hex(),
        )
        self.env.pop("DATABASE_TEST_NAME", None)
        self.env.pop("REDIS_CLUSTER_URL", None)

    def spawn(self, name: str, args: list[str], **kwargs) -> None:
        logfile = (self.out / f"{name}.log").open("ab")
        self.procs[name] = subprocess.Popen(args, stdout=logfile, stderr=subprocess.STDOUT, start_new_session=True,
                                            cwd=ROOT, **kwargs)

    def stop(self, name: str, sig: int = signal.SIGTERM, wait: float = 30) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, sig)  # the group this drill created for it (pool processes too)
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    # Redis
    def start_redis(self, name: str) -> None:
        directory = self.out / name
        directory.mkdir(exist_ok=True)
        self.spawn(name, ["redis-server", "--port", str(self.ports[name]), "--bind", "127.0.0.1", "--save", "",
                          "--appendonly", "no", "--dir", str(directory)])
        self.wait_for(lambda: self.redis_cli(name, "PING") == "PONG", f"{name} up")

    def redis_cli(self, name: str, *args: str) -> str:
        done = subprocess.run(["redis-cli", "-p", str(self.ports[name]), *args], capture_output=True, text=True,
                              timeout=10)
        return done.stdout.strip()

    # PostgreSQL
    def pg_ctl(self, *args: str) -> None:
        subprocess.run([*self.as_postgres, str(PG_BIN / "pg_ctl"), "-D", str(self.pg_data), *args], check=True,
                       stdout=subprocess.DEVNULL, timeout=120)

    def start_pg(self) -> None:
        self.pg_ctl("-o", f"-p {self.ports['pg']} -c listen_addresses=127.0.0.1 -c unix_socket_directories="
                          f"{self.pg_data.parent} -c fsync=off -c synchronous_commit=off",
                    "-l", str(self.pg_data.parent / "postgres.log"), "-w", "start")

    def stop_pg(self) -> None:
        self.pg_ctl("-m", "fast", "-w", "stop")

    def sql(self, statement: str, dbname: str = "ragcache") -> None:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.ports["pg"], user="postgres", dbname=dbname,
                             autocommit=True) as conn:
            conn.execute(statement)

    def setup_pg(self) -> None:
        self.pg_data.parent.mkdir(parents=True)
        if self.as_postgres:
            shutil.chown(self.pg_data.parent, "postgres", "postgres")
        subprocess.run([*self.as_postgres, str(PG_BIN / "initdb"), "-D", str(self.pg_data), "-A", "trust",
                        "-U", "postgres", "-E", "UTF8", "--no-sync"], check=True, stdout=subprocess.DEVNULL,
                       timeout=120)
        self.start_pg()
        self.sql("CREATE DATABASE ragcache", dbname="postgres")

    # the application
    def start_web(self) -> None:
        self.spawn("gunicorn", [PY, "-m", "gunicorn", "-c", "project/gunicorn.conf.py", "--bind",
                                f"127.0.0.1:{self.ports['web']}"], env=self.env)
        self.wait_for(lambda: get(self.url("/ragcache/health"))[0] in (200, 503), "gunicorn answering")

    def start_celery(self) -> None:
        self.spawn("celery", [PY, "-m", "celery", "-A", "project", "worker", "-B", "--schedule",
                              str(self.out / "celerybeat-schedule"), "-P", "prefork", "-c", "1", "--loglevel",
                              "INFO", "--without-gossip", "--without-mingle", "--without-heartbeat"], env=self.env)

    def start_prometheus(self) -> None:
        rules = self.out / "rules.yml"
        rules.write_text(scale_rules((ROOT / "docs" / "prometheus-alerts.yml").read_text()))
        config = {
            "global": {"scrape_interval": f"{STEP}s", "evaluation_interval": f"{STEP}s", "scrape_timeout": f"{STEP}s"},
            "rule_files": [str(rules)],
            "scrape_configs": [{"job_name": "ragcache", "metrics_path": "/metrics",
                                "static_configs": [{"targets": [f"127.0.0.1:{self.ports['web']}"]}]}],
        }
        (self.out / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.spawn("prometheus", ["prometheus", f"--config.file={self.out / 'prometheus.yml'}",
                                  f"--storage.tsdb.path={self.out / 'tsdb'}",
                                  f"--web.listen-address=127.0.0.1:{self.ports['prometheus']}"])
        self.wait_for(lambda: get(self.prom("/-/ready"))[0] == 200, "prometheus ready")
        query = urllib.parse.urlencode({"query": "ragcache_redis_up"})
        self.wait_for(lambda: b'"result":[{' in get(self.prom(f"/api/v1/query?{query}"))[1], "a first scrape")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.ports['web']}{path}"

    def prom(self, path: str) -> str:
        return f"http://127.0.0.1:{self.ports['prometheus']}{path}"

    def wait_for(self, condition, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}")
            time.sleep(0.2)

    def start(self) -> None:
        self.mp_dir.mkdir()
        self.start_redis("redis")
        self.start_redis("broker")
        self.setup_pg()
        subprocess.run([PY, "manage.py", "migrate", "-v0"], env=self.env, cwd=ROOT, check=True, timeout=300)
        self.start_web()
        self.start_celery()
        self.start_prometheus()

    def celery_exited(self) -> bool:
        proc = self.procs.get("celery")
        return proc is not None and proc.poll() is not None

    def shutdown(self) -> None:
        for name in ("traffic", "gunicorn", "celery", "prometheus", "redis", "broker"):
            self.stop(name)
        try:
            self.stop_pg()
        except (subprocess.SubprocessError, OSError):
            pass


# --- traffic, polling, outages -----------------------------------------------------------

class Traffic(threading.Thread):
    """Demo questions from a pool of 40, about 4 a second: hits, misses and stores."""

    def __init__(self, drill: Drill) -> None:
        super().__init__(daemon=True)
        self.drill, self.stopped = drill, threading.Event()
        self.count = 0

    def run(self) -> None:
        n = 0
        while not self.stopped.is_set():
            n += 1
            question = f"drill question {(n * 7919) % 40}"
            get(self.drill.url("/demo/ask.json?" + urllib.parse.urlencode({"q": question})), timeout=10)
            self.count += 1
            self.stopped.wait(0.25)


def active_alerts(drill: Drill) -> list[dict]:
    status, body = get(drill.prom("/api/v1/alerts"))
    if status != 200:
        return []
    return [{"name": a["labels"]["alertname"], "state": a["state"],
             "labels": {k: v for k, v in a["labels"].items() if k != "alertname"}}
            for a in json.loads(body)["data"]["alerts"]]


def poll(drill: Drill, timeline: list, phase: str) -> dict:
    alerts = active_alerts(drill)
    status, body = get(drill.url("/ragcache/health"))
    try:
        health = json.loads(body)
    except ValueError:
        health = {"unparsed": body[:200].decode(errors="replace")}
    entry = {"t": time.time(), "phase": phase, "alerts": alerts, "health_status": status, "health": health}
    timeline.append(entry)
    return entry


def outage(drill: Drill, timeline: list, name: str, expected: str, break_it, repair) -> dict:
    log(f"outage {name}: breaking")
    started = time.time()
    break_it()
    fired_at = None
    seen: dict[str, dict] = {}
    while True:
        entry = poll(drill, timeline, name)
        for alert in entry["alerts"]:
            key = (alert["name"], alert["state"])
            seen.setdefault(f"{key[0]}:{key[1]}", {"first": round(time.time() - started, 1), **alert})
        if fired_at is None and any(a["name"] == expected and a["state"] == "firing" for a in entry["alerts"]):
            fired_at = time.time()
            log(f"outage {name}: {expected} firing after {fired_at - started:.0f} s")
        elapsed = time.time() - started
        # Hold long enough for any symptom rule to fire (the slowest needs ~100 s here),
        # and a minute past the expected alert.
        if elapsed >= 300 or (fired_at and elapsed >= 150 and time.time() - fired_at >= 60):
            break
        time.sleep(STEP)
    health = entry["health"]
    log(f"outage {name}: repairing; health said {entry['health_status']} {health.get('status')} "
        f"{health.get('problems')}")
    repaired = time.time()
    repair()
    notes = []
    if drill.celery_exited():
        # As systemd's Restart= would: the worker's exit is a finding, not part of the outage.
        notes.append(f"the Celery worker had exited (code {drill.procs['celery'].returncode}, see celery.log); "
                     "restarted after the repair")
        log(f"outage {name}: {notes[-1]}")
        drill.procs.pop("celery")
        drill.start_celery()
    quiet = 0
    recovery: dict[str, dict] = {}
    while time.time() - repaired < 300 and quiet < 5:
        entry = poll(drill, timeline, f"{name}:recovery")
        for alert in entry["alerts"]:
            recovery.setdefault(f"{alert['name']}:{alert['state']}", {"first": round(time.time() - repaired, 1),
                                                                     **alert})
        quiet = quiet + 1 if not entry["alerts"] else 0
        time.sleep(STEP)
    log(f"outage {name}: quiet again after {time.time() - repaired:.0f} s")
    return {"outage": name, "expected": expected, "started": started, "repaired": repaired,
            "fired_after_s": round(fired_at - started, 1) if fired_at else None,
            "recovered_after_s": round(time.time() - repaired, 1), "notes": notes,
            "seen": seen, "seen_in_recovery": recovery, "health": health, "health_status": entry_health(timeline, name)}


def entry_health(timeline: list, phase: str) -> int:
    return [e for e in timeline if e["phase"] == phase][-1]["health_status"]


def record_series(drill: Drill, start: float, end: float) -> dict:
    selector = '{__name__=~"ragcache_.+",__name__!~".+_(bucket|created|sum|count)"}'
    query = urllib.parse.urlencode({"query": selector, "start": start, "end": end, "step": f"{STEP}s"})
    status, body = get(drill.prom(f"/api/v1/query_range?{query}"), timeout=60)
    assert status == 200, body[:300]
    return json.loads(body)["data"]


def _exit(signum, frame):
    raise SystemExit(f"signal {signum}")  # runs the finally clause: everything started is stopped


def run(out: Path) -> None:
    signal.signal(signal.SIGTERM, _exit)
    signal.signal(signal.SIGINT, _exit)
    out.mkdir(parents=True)
    drill = Drill(out)
    timeline: list = []
    results = []
    traffic = Traffic(drill)
    try:
        log(f"starting private servers and the application under {out}")
        drill.start()
        traffic.start()
        begin = time.time()
        log("baseline: 60 s of traffic, nothing broken")
        while time.time() - begin < 60:
            poll(drill, timeline, "baseline")
            time.sleep(STEP)
        baseline = {f"{a['name']} ({a['state']})" for e in timeline for a in e["alerts"]}
        log(f"baseline alerts seen: {sorted(baseline) or 'none'}")

        def redis_down():
            drill.stop("redis")

        def redis_back():
            drill.start_redis("redis")  # same port, empty (as after a restart without persistence)

        def fill():
            drill.redis_cli("redis", "CONFIG", "SET", "maxmemory-policy", "noeviction")
            drill.redis_cli("redis", "CONFIG", "SET", "maxmemory", "1")

        def unfill():
            drill.redis_cli("redis", "CONFIG", "SET", "maxmemory", "0")

        def broker_down():
            drill.stop("broker")

        def broker_back():
            drill.start_redis("broker")

        def break_table():
            drill.sql("ALTER TABLE ragcache_usagerecord RENAME TO ragcache_usagerecord_away")

        def mend_table():
            drill.sql("ALTER TABLE ragcache_usagerecord_away RENAME TO ragcache_usagerecord")

        def worker_down():
            drill.stop("celery")

        plan = [
            ("redis_down", "RagcacheRedisDown", redis_down, redis_back),
            ("redis_full", "RagcacheRedisRefusingWrites", fill, unfill),
            ("database_down", "RagcacheDatabaseDown", drill.stop_pg, drill.start_pg),
            ("broker_down", "RagcacheBrokerDown", broker_down, broker_back),
            ("aggregation_failing", "RagcacheAggregationFailing", break_table, mend_table),
            ("worker_stopped", "RagcacheAggregationStale", worker_down, drill.start_celery),
        ]
        for name, expected, break_it, repair in plan:
            results.append(outage(drill, timeline, name, expected, break_it, repair))
        end = time.time()
        series = record_series(drill, begin - 10, end)
        (out / "series.json").write_text(json.dumps({"begin": begin, "end": end, "series": series}))
        (out / "outages.json").write_text(json.dumps({"baseline_alerts": sorted(baseline), "outages": results},
                                                     indent=1))
        (out / "timeline.json").write_text(json.dumps(timeline))
        log(f"{traffic.count} demo requests")
        report(results, sorted(baseline))
    finally:
        traffic.stopped.set()
        drill.shutdown()
        log("stopped everything the drill started")


def report(results: list, baseline: list) -> None:
    print(f"\nbaseline (nothing broken): {', '.join(baseline) or 'no alert'}")
    for result in results:
        firing = sorted({v["name"] for v in result["seen"].values() if v["state"] == "firing"})
        pending = sorted({v["name"] for v in result["seen"].values() if v["state"] == "pending"} - set(firing))
        after = sorted({f"{v['name']} ({v['state']})" for v in result["seen_in_recovery"].values()})
        health = result["health"]
        print(f"{result['outage']}: firing {', '.join(firing) or 'none'}"
              f"{' (pending only: ' + ', '.join(pending) + ')' if pending else ''}; "
              f"{result['expected']} after {result['fired_after_s']} s (drill time); health {result['health_status']}"
              f" {health.get('status')} {health.get('problems')}; after the repair: {', '.join(after) or 'nothing'},"
              f" quiet {result['recovered_after_s']} s after it" + "".join(f"; {n}" for n in result["notes"]))


# --- promtool tests from a recorded run --------------------------------------------------

def _number(value: float) -> str:
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _values(samples: list) -> str:
    """promtool's expanding notation: ``_`` for a missing sample, ``a+bxn`` for runs. A
    series that leaves the scrape gets a ``stale`` marker first, as Prometheus writes one
    (without it promtool would carry the last value on for its 5 minute lookback)."""
    out, i = [], 0
    while i < len(samples):
        if samples[i] is None:
            j = i
            while j + 1 < len(samples) and samples[j + 1] is None:
                j += 1
            blanks = j - i + 1
            if i > 0:
                out.append("stale")
                blanks -= 1
            if blanks:
                out.append("_" if blanks == 1 else f"_x{blanks}")
            i = j + 1
            continue
        j = i
        step = None
        while j + 1 < len(samples) and samples[j + 1] is not None:
            diff = round(samples[j + 1] - samples[j], 6)
            if step is None:
                step = diff
            elif diff != step:
                break
            j += 1
        if j == i:
            out.append(_number(samples[i]))
        else:
            sign = "+" if step >= 0 else "-"
            out.append(f"{_number(samples[i])}{sign}{_number(abs(step))}x{j - i}")
        i = j + 1
    return " ".join(out)


def promtool_tests(directory: Path) -> list:
    recorded = json.loads((directory / "series.json").read_text())
    outages = json.loads((directory / "outages.json").read_text())["outages"]
    groups = []
    for result in outages:
        start = result["started"] - 60  # a minute of the healthy state first
        end = result["repaired"] + result["recovered_after_s"]
        steps = int((end - start) // STEP) + 1
        input_series = []
        for series in recorded["series"]["result"]:
            labels = dict(series["metric"])
            name = labels.pop("__name__")
            labels["instance"] = "web1:8000"
            by_step: list = [None] * steps
            for ts, raw in series["values"]:
                index = round((float(ts) - start) / STEP)
                if 0 <= index < steps:
                    value = float(raw)
                    if name == "ragcache_usage_lag_seconds":
                        value *= SCALE
                    elif name == "ragcache_last_aggregation_timestamp_seconds":
                        value = (value - start) * SCALE  # promtool's clock starts at 0
                    by_step[index] = value
            if all(v is None for v in by_step):
                continue
            selector = name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
            input_series.append({"series": selector, "values": _values(by_step)})
        broken = round((result["started"] - start) * SCALE)
        repaired = round((result["repaired"] - start) * SCALE)
        interval = STEP * SCALE
        checks = []
        # Just before the repair every rule has had the whole outage to fire.
        at = (repaired - interval) // interval * interval
        for alert in ALERTS:
            expect = [{"exp_labels": {}}] if alert == result["expected"] else []  # pinned by pin()
            checks.append({"eval_time": f"{at}s", "alertname": alert, "exp_alerts": expect})
        after = (steps - 1) * interval
        for alert in ALERTS:
            checks.append({"eval_time": f"{after}s", "alertname": alert, "exp_alerts": []})
        groups.append({
            "name": f"outage: {result['outage']} (drill run, broken at {broken}s, repaired at {repaired}s)",
            "interval": f"{interval}s",
            "input_series": input_series,
            "alert_rule_test": checks,
        })
    return groups


_FAILURE = re.compile(r"name: (?P<group>[^\n]*),\n\s*alertname: (?P<alert>\w+), time: (?P<time>\S+), \n"
                      r"\s*exp:(?P<exp>\[\]|\[.*?\n\s*\]), \n\s*got:(?P<got>\[\]|\[.*?\n\s*\])\n", re.S)
_ALERT = re.compile(r"Labels:\{(?P<labels>.*?)\}\n\s*Annotations:\{(?P<annotations>.*?)\}\n", re.S)
_PAIR = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def _duration(text: str) -> int:
    """Seconds of a Prometheus duration such as 1d35m or 320s."""
    parts = re.findall(r"(\d+)([smhdwy])", text)
    assert "".join(n + u for n, u in parts) == text, text
    return sum(int(n) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}[u] for n, u in parts)


def _pairs(text: str) -> dict[str, str]:
    return {k: json.loads(f'"{v}"') for k, v in _PAIR.findall(text)}


def pin(tests: list, rules: Path) -> list:
    """Fill in the labels and annotations of every expected alert (a check whose
    exp_alerts entries carry only ``exp_labels: {alertname-less placeholder}``) from what
    promtool evaluates, after checking that exactly the expected alerts fired there. A
    check expecting silence is never filled: an alert firing there is an error."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tests.yml"
        shutil.copy(rules, Path(tmp) / rules.name)
        path.write_text(yaml.safe_dump({"rule_files": [rules.name], "evaluation_interval": "20s", "tests": tests},
                                       sort_keys=False, width=200))
        done = subprocess.run(["promtool", "test", "rules", str(path)], capture_output=True, text=True)
    failures = list(_FAILURE.finditer(done.stdout + done.stderr))
    by_group = {group.get("name"): group for group in tests}
    used: set[int] = set()
    for failure in failures:
        group = by_group[failure["group"]]
        got = [(_pairs(m["labels"]), _pairs(m["annotations"])) for m in _ALERT.finditer(failure["got"])]
        for check in group["alert_rule_test"]:
            if (id(check) in used or check["alertname"] != failure["alert"]
                    or _duration(check["eval_time"]) != _duration(failure["time"])):
                continue
            placeholders = check.get("exp_alerts") or []
            if not placeholders or any("exp_annotations" in e for e in placeholders):
                raise SystemExit(f"{failure['group']}: {failure['alert']} at {failure['time']}: expected silence "
                                 f"or pinned alerts, got {got}")
            if len(got) != len(placeholders) or any(g[0]["alertname"] != failure["alert"] for g in got):
                raise SystemExit(f"{failure['group']}: {failure['alert']}: expected {len(placeholders)}, got {got}")
            check["exp_alerts"] = [{"exp_labels": {k: v for k, v in labels.items() if k != "alertname"},
                                    "exp_annotations": annotations} for labels, annotations in got]
            used.add(id(check))
            break
        else:
            raise SystemExit(f"unmatched promtool failure: {failure.group(0)}")
    return tests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run")
    run_parser.add_argument("--out", type=Path, default=ROOT / ".run" / time.strftime("drill-%Y%m%d-%H%M%S"))
    promtool_parser = sub.add_parser("promtool")
    promtool_parser.add_argument("directory", type=Path)
    pin_parser = sub.add_parser("pin", help="fill in expected alerts' labels and annotations in a test list")
    pin_parser.add_argument("tests", type=Path, help="YAML: a list of promtool test groups")
    args = parser.parse_args()
    rules = ROOT / "docs" / "prometheus-alerts.yml"
    if args.command == "run":
        run(args.out)
    elif args.command == "promtool":
        print(dump(pin(promtool_tests(args.directory), rules)))
    else:
        print(dump(pin(yaml.safe_load(args.tests.read_text()), rules)))


def dump(tests: list) -> str:
    return yaml.safe_dump(tests, sort_keys=False, width=120, allow_unicode=True)


if __name__ == "__main__":
    main()
