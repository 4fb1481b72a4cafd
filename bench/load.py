"""Load test: the demo JSON endpoint under gunicorn, a few hundred keep-alive clients, and
Redis restarted (empty) once in the middle. On demand, not part of the test suite.

    make load                                  # 120 s, 200 clients
    make load LOAD_ARGS="--duration 60 --clients 100"

Everything runs on loopback and is private to the run: a redis-server on a free port
(the shared Redis is never touched), a fresh SQLite database (or DATABASE_URL, counted
as a before/after difference), gunicorn (gthread) with the demo project, and a key
prefix of its own. Half-way through, the script aggregates usage, freezes writes
(CLIENT PAUSE WRITE) to count exactly the events still in the stream, stops Redis,
waits --outage seconds and starts it again, empty.

Afterwards it aggregates and checks the accounting:

    requests served = lookups recorded in the database
                    + lookups still in the stream when Redis died (the loss window)
                    + lookups that could not reach Redis (ragcache_lookups_total{result="error"})

A lookup that Redis ran but whose reply came after SOCKET_TIMEOUT (an overloaded host)
is on both sides: recorded, and served by the LLM as an error. The script reports these
"late replies" (recorded + lost + errors - served; never negative) and the number of
TimeoutError episodes in the gunicorn log. It also reports failed requests (must be 0),
gunicorn workers' memory over time, latency and hit rate per phase. Results go to
bench/results/load.json.
"""
from __future__ import annotations

import argparse
import bisect
import http.client
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "load.json"
LOOKUP_RESULTS = ("hit", "miss", "shadow_hit")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, round(fraction * (len(values) - 1)))]


class RedisServer:
    """A private redis-server: no persistence, so a restart comes back empty."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.02)
        raise SystemExit("redis-server did not start")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.process = None


class Questions:
    """A pool with a Zipf-like repeat (rank k drawn with weight 1/k^s), plus a share of
    questions never asked before (always misses)."""

    def __init__(self, size: int, exponent: float, fresh: float) -> None:
        self.size = size
        self.fresh = fresh
        total = 0.0
        self.cumulative = []
        for rank in range(1, size + 1):
            total += 1.0 / rank**exponent
            self.cumulative.append(total)

    def pick(self, rng: random.Random) -> str:
        if rng.random() < self.fresh:
            return f"fresh question {uuid.uuid4().hex}: what changed today?"
        rank = bisect.bisect_left(self.cumulative, rng.random() * self.cumulative[-1]) + 1
        return f"load question {rank}: what is item {rank} and why does it matter?"


class Client(threading.Thread):
    """One keep-alive HTTP client asking questions until told to stop."""

    def __init__(self, index: int, port: int, questions: Questions, think_s: float, stop: threading.Event,
                 started: float) -> None:
        super().__init__(daemon=True)
        self.rng = random.Random(index)
        self.port, self.questions, self.think_s, self.stop_event, self.t0 = port, questions, think_s, stop, started
        self.samples: list[tuple[float, float, bool]] = []  # (start offset s, latency ms, hit)
        self.failures: Counter = Counter()
        self.conn: http.client.HTTPConnection | None = None

    def run(self) -> None:
        while not self.stop_event.is_set():
            path = "/demo/ask.json?q=" + urllib.parse.quote(self.questions.pick(self.rng))
            begun = time.monotonic()
            try:
                if self.conn is None:
                    self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
                self.conn.request("GET", path)
                response = self.conn.getresponse()
                body = response.read()
                if response.status != 200:
                    self.failures[f"HTTP {response.status}"] += 1
                else:
                    hit = json.loads(body)["hit"]
                    self.samples.append((begun - self.t0, (time.monotonic() - begun) * 1000, bool(hit)))
                if response.getheader("Connection", "").lower() == "close":
                    self._reset()
            except (OSError, http.client.HTTPException, ValueError, KeyError) as exc:
                self.failures[type(exc).__name__] += 1
                self._reset()
            if self.think_s:
                time.sleep(self.rng.uniform(0, 2 * self.think_s))
        self._reset()

    def _reset(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
        return [int(p) for p in text.split()]
    except OSError:
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry.name))
                except (OSError, IndexError, ValueError):
                    continue
        return found


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class MemorySampler(threading.Thread):
    def __init__(self, master: int, stop: threading.Event, started: float, every: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.master, self.stop_event, self.t0, self.every = master, stop, started, every
        self.samples: dict[int, list[tuple[float, float]]] = {}

    def run(self) -> None:
        while not self.stop_event.is_set():
            now = time.monotonic() - self.t0
            for pid in children(self.master):
                value = rss_mb(pid)
                if value is not None:
                    self.samples.setdefault(pid, []).append((round(now, 1), round(value, 1)))
            self.stop_event.wait(self.every)

    def summary(self, warmup_s: float) -> dict:
        workers = {}
        for pid, series in self.samples.items():
            settled = [mb for t, mb in series if t >= warmup_s] or [mb for _, mb in series]
            workers[str(pid)] = {
                "first_mb": series[0][1], "after_warmup_mb": settled[0], "last_mb": series[-1][1],
                "max_mb": max(mb for _, mb in series), "growth_after_warmup_mb": round(series[-1][1] - settled[0], 1),
                "samples": len(series),
            }
        return workers


def scrape_lookups(port: int) -> dict[str, float]:
    """ragcache_lookups_total by result, summed over every gunicorn worker (multiprocess)."""
    from prometheus_client.parser import text_string_to_metric_families

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    totals: Counter = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "ragcache_lookups_total":
                totals[sample.labels["result"]] += sample.value
    return dict(totals)


def wait_for_port(port: int, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"gunicorn exited during start-up:\n{log.read_text()[-3000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit("gunicorn did not start within 60 s")


def phase_stats(samples: list[tuple[float, float, bool]]) -> dict:
    latencies = [ms for _, ms, _ in samples]
    hits = sum(1 for *_, hit in samples if hit)
    return {
        "requests": len(samples),
        "hits": hits,
        "hit_rate": round(hits / len(samples), 4) if samples else None,
        "p50_ms": round(percentile(latencies, 0.5), 2) if samples else None,
        "p95_ms": round(percentile(latencies, 0.95), 2) if samples else None,
        "p99_ms": round(percentile(latencies, 0.99), 2) if samples else None,
        "max_ms": round(max(latencies), 2) if samples else None,
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=120, help="seconds of load (default 120)")
    parser.add_argument("--clients", type=int, default=200, help="concurrent keep-alive clients (threads)")
    parser.add_argument("--think-ms", type=float, default=50, help="mean pause between a client's requests")
    parser.add_argument("--questions", type=int, default=1000, help="size of the repeated question pool")
    parser.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of the pool (higher: more repeats)")
    parser.add_argument("--fresh", type=float, default=0.05, help="share of never-seen questions (misses)")
    parser.add_argument("--llm-delay-ms", type=int, default=20, help="the demo's fake LLM latency")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers")
    parser.add_argument("--threads", type=int, default=32, help="threads per gunicorn worker (gthread)")
    parser.add_argument("--restart-at", type=float, default=0.5, help="when to restart Redis (fraction of run)")
    parser.add_argument("--outage", type=float, default=3.0, help="seconds Redis stays down")
    parser.add_argument("--aggregate-every", type=float, default=30,
                        help="run ragcache_aggregate this often during the load, like Celery beat (0: never)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, database)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="ragcache-load-"))
    redis_server = RedisServer(workdir)
    redis_server.start()
    prefix = f"ragload-{os.getpid()}"
    redis_url = f"redis://127.0.0.1:{redis_server.port}/0"
    metrics_dir = workdir / "metrics"
    metrics_dir.mkdir()
    env = dict(
        os.environ,
        DJANGO_SETTINGS_MODULE="project.settings",
        PYTHONPATH=str(ROOT),
        REDIS_URL=redis_url,
        CELERY_BROKER_URL=f"redis://127.0.0.1:{redis_server.port}/1",
        RAGCACHE_KEY_PREFIX=prefix,
        DEMO_LLM_DELAY_MS=str(args.llm_delay_ms),
        DEBUG="0",
        RAGCACHE_LOG_LEVEL="WARNING",
    )
    env.setdefault("DATABASE_URL", f"sqlite:///{workdir / 'load.sqlite3'}")
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    subprocess.run([sys.executable, "manage.py", "migrate", "--verbosity", "0"], cwd=ROOT, env=env, check=True)

    # This process aggregates and counts through Django, on the same database and Redis.
    os.environ.update({k: env[k] for k in ("DJANGO_SETTINGS_MODULE", "REDIS_URL", "CELERY_BROKER_URL",
                                           "RAGCACHE_KEY_PREFIX", "DATABASE_URL", "DEBUG", "RAGCACHE_LOG_LEVEL")})
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    import redis
    from django.db.models import Count, Sum

    from ragcache import store
    from ragcache.models import UsageRecord, UsageRollup

    def db_counts() -> dict[str, int]:
        by_result = Counter(dict(UsageRecord.objects.values_list("result").annotate(n=Count("id"))))
        rollup = UsageRollup.objects.filter(granularity="hour").aggregate(n=Sum("lookups"))["n"] or 0
        return {"lookups": sum(by_result[r] for r in LOOKUP_RESULTS), "hits": by_result["hit"],
                "stores": by_result["store"], "rollup_lookups": rollup}

    aggregation_log: list[dict] = []

    def aggregate_now(why: str) -> str:
        begun = time.monotonic()
        out = subprocess.run([sys.executable, "manage.py", "ragcache_aggregate"], cwd=ROOT, env=env,
                             capture_output=True, text=True)
        text = (out.stdout.strip() or out.stderr.strip().splitlines()[-1]) if (out.stdout or out.stderr) else ""
        aggregation_log.append({"why": why, "at_s": round(begun - t0, 1) if t0 else None,
                                "seconds": round(time.monotonic() - begun, 2), "ok": out.returncode == 0,
                                "output": text[-300:]})
        return text

    def beat(stop_event: threading.Event) -> None:
        while not stop_event.wait(args.aggregate_every):
            aggregate_now("beat")

    t0 = 0.0

    before = db_counts()
    port = free_port()
    log = workdir / "gunicorn.log"
    gunicorn_env = dict(env, PROMETHEUS_MULTIPROC_DIR=str(metrics_dir))
    server = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "project.wsgi:application", "--bind", f"127.0.0.1:{port}",
         "--workers", str(args.workers), "--worker-class", "gthread", "--threads", str(args.threads),
         "--keep-alive", "30", "--timeout", "60", "--log-level", "warning", "--chdir", str(ROOT)],
        env=gunicorn_env, stdout=log.open("w"), stderr=subprocess.STDOUT,
    )
    report: dict = {}
    try:
        wait_for_port(port, server, log)
        questions = Questions(args.questions, args.zipf, args.fresh)
        stop = threading.Event()
        t0 = time.monotonic()
        beat_thread = threading.Thread(target=beat, args=(stop,), daemon=True)
        if args.aggregate_every > 0:
            beat_thread.start()
        sampler = MemorySampler(server.pid, stop, t0)
        sampler.start()
        clients = [Client(i, port, questions, args.think_ms / 1000, stop, t0) for i in range(args.clients)]
        for client in clients:
            client.start()
        print(f"load: {args.clients} clients for {args.duration:.0f} s against gunicorn {args.workers}x{args.threads} "
              f"on 127.0.0.1:{port}; private redis-server on {redis_server.port}; Redis restart at "
              f"{args.restart_at * args.duration:.0f} s for {args.outage:.1f} s", flush=True)

        time.sleep(max(0.0, args.restart_at * args.duration - (time.monotonic() - t0)))
        # Aggregate now ("busy" if a beat run is still at it), then freeze writes and list
        # the events still in the stream: they die with Redis unless an aggregation that is
        # under way commits them first (checked by id afterwards).
        pre_restart_aggregation = aggregate_now("just before the restart")
        raw = redis.Redis(port=redis_server.port)
        raw.execute_command("CLIENT", "PAUSE", 30_000, "WRITE")
        # UsageRecord.event_id is "<shard>-<stream id>": one stream per virtual shard.
        in_stream = [(f"{shard}-{event_id.decode()}", fields.get(b"r", b"?").decode())
                     for shard, stream in enumerate(store.current_layout().streams)
                     for event_id, fields in raw.xrange(stream)]
        raw.close()
        down_at = time.monotonic() - t0
        redis_server.stop()
        time.sleep(args.outage)
        redis_server.start()
        up_at = time.monotonic() - t0  # accepting connections again
        print(f"load: Redis stopped at {down_at:.1f} s, back (empty) at {up_at:.1f} s; {len(in_stream)} events "
              "were still in the stream", flush=True)

        time.sleep(max(0.0, args.duration - (time.monotonic() - t0)))
        stop.set()
        for client in clients:
            client.join(120)
        ended_at = time.monotonic() - t0
        sampler.join(5)

        metrics_lookups = scrape_lookups(port)
        if beat_thread.is_alive():
            beat_thread.join(600)
        aggregate_now("after the load")
        while store.backlog() and len(aggregation_log) < 100:
            aggregate_now("after the load, backlog left")
        saved = set()
        ids = [event_id for event_id, _ in in_stream]
        for start in range(0, len(ids), 500):
            saved.update(UsageRecord.objects.filter(event_id__in=ids[start:start + 500])
                         .values_list("event_id", flat=True))
        lost = Counter(result for event_id, result in in_stream if event_id not in saved)
        after = db_counts()

        samples = sorted(s for client in clients for s in client.samples)
        failures = sum((client.failures for client in clients), Counter())
        served = len(samples)
        client_hits = sum(1 for *_, hit in samples if hit)
        recorded = after["lookups"] - before["lookups"]
        lost_lookups = sum(lost[r] for r in LOOKUP_RESULTS)
        errors = int(metrics_lookups.get("error", 0))
        first_hit_after = next((start for start, _, hit in samples if hit and start >= up_at), None)
        warmup = min(10.0, args.duration * 0.1)
        memory = sampler.summary(warmup)
        report = {
            "config": vars(args),
            "duration_s": round(ended_at, 1),
            "requests": {
                "served_200": served, "failed": sum(failures.values()), "failures": dict(failures),
                "per_second": round(served / ended_at, 1),
            },
            "phases": {
                "all": phase_stats(samples),
                "before_outage": phase_stats([s for s in samples if s[0] < down_at]),
                "outage": phase_stats([s for s in samples if down_at <= s[0] < up_at]),
                "after_outage": phase_stats([s for s in samples if s[0] >= up_at]),
            },
            "redis_restart": {
                "down_at_s": round(down_at, 1), "up_at_s": round(up_at, 1),
                "first_hit_after_restart_s": round(first_hit_after - up_at, 2) if first_hit_after else None,
                "pre_restart_aggregation": pre_restart_aggregation,
                "events_in_stream_at_stop": len(in_stream),
                "of_which_saved_by_a_running_aggregation": len(saved),
                "lost_window_events": dict(lost),
            },
            "accounting": {
                "requests_served": served,
                "lookups_recorded_in_db": recorded,
                "lookups_lost_with_redis": lost_lookups,
                "lookups_without_redis": errors,
                "late_replies": recorded + lost_lookups + errors - served,
                "hits_served": client_hits,
                "hits_recorded_in_db": after["hits"] - before["hits"],
                "hits_lost_with_redis": lost.get("hit", 0),
                "hits_late_replies": after["hits"] - before["hits"] + lost.get("hit", 0) - client_hits,
                "timeout_episodes_in_log": log.read_text().count("Redis unavailable (TimeoutError)"),
                "rollup_lookups_equal_records": after["rollup_lookups"] - before["rollup_lookups"] == recorded,
                "metrics_lookups_by_result": metrics_lookups,
                "aggregation_runs": aggregation_log,
            },
            "memory_rss_mb": memory,
            "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                        "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        }
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        redis_server.stop()
        if args.keep:
            print(f"load: kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print_summary(report)
    acc = report["accounting"]
    ok = report["requests"]["failed"] == 0 and acc["late_replies"] >= 0 and acc["hits_late_replies"] >= 0
    ok = ok and (acc["late_replies"] == 0 or acc["timeout_episodes_in_log"] > 0)
    return 0 if ok else 1


def print_summary(report: dict) -> None:
    req, acc, restart = report["requests"], report["accounting"], report["redis_restart"]
    print(f"\nrequests: {req['served_200']} served (HTTP 200), {req['failed']} failed {req['failures'] or ''}; "
          f"{req['per_second']} req/s over {report['duration_s']} s")
    print(f"{'phase':<14} {'requests':>9} {'hit rate':>9} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for name, row in report["phases"].items():
        if row["requests"]:
            print(f"{name:<14} {row['requests']:>9} {row['hit_rate']:>9.3f} {row['p50_ms']:>8.1f} "
                  f"{row['p95_ms']:>8.1f} {row['p99_ms']:>8.1f} {row['max_ms']:>8.1f}")
    print(f"Redis down {restart['down_at_s']}-{restart['up_at_s']} s; first hit "
          f"{restart['first_hit_after_restart_s']} s after it came back; lost window {restart['lost_window_events']}")
    print(f"accounting: {acc['requests_served']} served + {acc['late_replies']} late replies = "
          f"{acc['lookups_recorded_in_db']} recorded in the database + {acc['lookups_lost_with_redis']} lost with "
          f"Redis + {acc['lookups_without_redis']} without Redis; hits: {acc['hits_served']} served + "
          f"{acc['hits_late_replies']} late = {acc['hits_recorded_in_db']} recorded + {acc['hits_lost_with_redis']} "
          f"lost; TimeoutError episodes in the log: {acc['timeout_episodes_in_log']}; rollups match records: "
          f"{acc['rollup_lookups_equal_records']}")
    for pid, row in report["memory_rss_mb"].items():
        print(f"worker {pid}: RSS first {row['first_mb']} MB, after warm-up {row['after_warmup_mb']} MB, "
              f"last {row['last_mb']} MB, max {row['max_mb']} MB ({row['samples']} samples)")
    print(f"results: {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    sys.exit(main())
