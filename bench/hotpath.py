#!/usr/bin/env python
"""Hot-path benchmark: ragcache against the floor (raw redis-py) and its peers, in one run.

    make bench                                   # single process, the main table
    make bench BENCH_ARGS="--processes 2"        # the hit cases in 2 processes at once
    make bench BENCH_ARGS="--http"               # demo JSON endpoint vs a plain view, under gunicorn
    python bench/hotpath.py --iterations 50000 --json /tmp/hotpath.json

Every case runs in the same process and the same run, round-robin in batches, so noise
(other jobs on the machine) hits all of them alike: compare ratios, not absolute µs.
Keys live under a unique RAGCACHE_KEY_PREFIX and are removed at the end (SCAN + UNLINK).
See docs/performance.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _common  # noqa: E402

MODEL = "gpt-4o-mini"
QUESTION = "How do I rotate the API keys of a production service without downtime? Keep it short."
STORE_QUESTION = "Which settings decide how long an answer stays in the cache?"
STEPS_LOGGER = "ragcache.steps"
UNPREFIXED_KEYS: set[str] = set()


def make_answer(size: int = 2000) -> dict:
    """An OpenAI-style response whose content is ~``size`` characters (~2 KB stored)."""
    sentence = "Rotate keys by issuing a new one, deploying it alongside the old, then revoking the old. "
    content = (sentence * (size // len(sentence) + 1))[:size]
    return {
        "id": "chatcmpl-bench",
        "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 42, "completion_tokens": 420},
    }


class _FormattingSink(logging.Handler):
    """Formats every record (what a real handler pays) and writes it nowhere."""

    def emit(self, record: logging.LogRecord) -> None:
        self.format(record)


def configure_logging(steps_level: str) -> None:
    """Step lines go to a formatting sink; warnings (e.g. Redis trouble) still reach stderr."""
    base = logging.getLogger("ragcache")
    for handler in list(base.handlers):
        base.removeHandler(handler)
    sink = _FormattingSink()
    sink.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    base.addHandler(sink)
    loud = logging.StreamHandler(sys.stderr)
    loud.setLevel(logging.WARNING)
    base.addHandler(loud)
    base.setLevel(logging.DEBUG if steps_level == "debug" else logging.INFO)
    logging.getLogger(STEPS_LOGGER).setLevel(steps_level.upper())


def set_steps_level(level: str) -> Callable[[], None]:
    def prepare() -> None:
        logger = logging.getLogger(STEPS_LOGGER)
        if logger.level != logging.getLevelName(level.upper()):
            logger.setLevel(level.upper())

    return prepare


@dataclass
class Case:
    name: str
    kind: str  # lookup | store
    fn: Callable[[], Any]
    prepare: Callable[[], None] | None = None
    check: bool = True  # a falsy return value counts as a failure (a miss where a hit was expected)
    samples: list[int] = field(default_factory=list)
    failures: int = 0


def build_cases(prefix: str, steps_level: str, *, stores: bool = True) -> tuple[list[Case], dict]:
    """Seed the entries and return the cases. Idempotent: concurrent workers call it too."""
    import redis
    from django.core.cache import caches

    from ragcache.services import cache_service

    answer = make_answer()
    if not cache_service.cache_response(QUESTION, answer, model=MODEL, latency_ms=850.0):
        raise SystemExit("ragcache refused to store the bench answer: is Redis up and the 'default' policy on?")
    seeded = cache_service.get_cached_response(QUESTION, model=MODEL)
    if seeded is None:
        raise SystemExit("ragcache stored the bench answer but does not hit it")
    client = redis.Redis.from_url(_common.REDIS_URL)
    body = client.hget(seeded.key, "b")
    raw_key, raw_store_key = f"{prefix}:raw:get", f"{prefix}:raw:set"
    client.set(raw_key, body, ex=3600)
    dj = caches["ragcache"]
    dj_key, dj_store_key = f"{prefix}:dj:get", f"{prefix}:dj:set"
    dj.set(dj_key, answer, timeout=3600)
    info = {"answer_bytes": len(body), "entry_key_len": len(seeded.key)}
    steps_default = set_steps_level(steps_level)

    def ragcache_hit():
        return cache_service.get_cached_response(QUESTION, model=MODEL)

    def get_or_call_hit():
        return cache_service.get_or_call(QUESTION, _never_called, model=MODEL).hit

    cases = [
        Case("raw redis-py GET", "lookup", lambda: client.get(raw_key)),
        Case("django-redis cache.get", "lookup", lambda: dj.get(dj_key)),
        Case(f"ragcache hit, get_cached_response (step log {steps_level.upper()})", "lookup", ragcache_hit,
             steps_default),
    ]
    other = "warning" if steps_level != "warning" else "info"
    cases.append(Case(f"ragcache hit, get_cached_response (step log {other.upper()})", "lookup", ragcache_hit,
                      set_steps_level(other)))
    cases.append(Case("ragcache get_or_call hit", "lookup", get_or_call_hit, steps_default))
    langchain = _langchain_cache(client)
    if langchain is not None:
        lc_cache, generation = langchain
        llm_string = f"model={MODEL}"
        lc_cache.update(QUESTION, llm_string, [generation])
        # LangChain's keys carry no prefix of ours: remember exactly which to delete.
        UNPREFIXED_KEYS.update(lc_cache._key(q, llm_string) for q in (QUESTION, STORE_QUESTION))
        cases.append(Case("LangChain RedisCache.lookup", "lookup", lambda: lc_cache.lookup(QUESTION, llm_string)))
    if stores:
        cases += [
            Case("raw redis-py SET EX", "store", lambda: client.set(raw_store_key, body, ex=3600)),
            Case("django-redis cache.set", "store", lambda: dj.set(dj_store_key, answer, timeout=3600)),
            Case("ragcache cache_response", "store",
                 lambda: cache_service.cache_response(STORE_QUESTION, answer, model=MODEL, latency_ms=850.0),
                 steps_default),
        ]
        if langchain is not None:
            cases.append(Case("LangChain RedisCache.update", "store",
                              lambda: lc_cache.update(STORE_QUESTION, llm_string, [generation]), check=False))
    info["langchain"] = "installed" if langchain is not None else "not installed"
    return cases, info


def _never_called():
    raise AssertionError("get_or_call called the LLM on what should be a hit")


def _langchain_cache(client):
    """LangChain's RedisCache on the same client, or None when langchain_community is absent."""
    try:
        from langchain_community.cache import RedisCache
        from langchain_core.outputs import Generation
    except ImportError:
        return None
    return RedisCache(redis_=client, ttl=3600), Generation(text=make_answer()["choices"][0]["message"]["content"])


def run_interleaved(cases: list[Case], iterations: int, batch: int, warmup: int) -> float:
    """Round-robin over the cases in batches; the starting case rotates every round."""
    clock = time.perf_counter_ns
    started = time.perf_counter()
    for phase_iterations, record in ((warmup, False), (iterations, True)):
        done = 0
        round_no = 0
        while done < phase_iterations:
            n = min(batch, phase_iterations - done)
            shift = round_no % len(cases)
            for case in cases[shift:] + cases[:shift]:
                if case.prepare is not None:
                    case.prepare()
                fn, samples, failures = case.fn, case.samples if record else [], 0
                for _ in range(n):
                    t0 = clock()
                    value = fn()
                    samples.append(clock() - t0)
                    if not value:
                        failures += 1
                if case.check and record:
                    case.failures += failures
                elif case.check and failures:
                    raise SystemExit(f"{case.name}: {failures} failures during warm-up "
                                     "(a miss where a hit was expected?)")
            done += n
            round_no += 1
    return time.perf_counter() - started


def results_table(cases: list[Case]) -> list[dict]:
    medians = {case.name: _common.summarize(case.samples) for case in cases}
    base = {"lookup": medians.get("raw redis-py GET"), "store": medians.get("raw redis-py SET EX")}
    rows = []
    for case in cases:
        stats = medians[case.name]
        reference = base[case.kind]
        rows.append({
            "case": case.name,
            "kind": case.kind,
            **stats,
            "ratio": round(stats["median_us"] / reference["median_us"], 3) if reference else None,
            "vs": "raw GET" if case.kind == "lookup" else "raw SET EX",
            "failures": case.failures,
        })
    return rows


def print_table(rows: list[dict], title: str, extra_cols: tuple[str, ...] = ()) -> None:
    width = max(len(r["case"]) for r in rows)
    header = f"{'case':<{width}}  {'median µs':>10}  {'p99 µs':>10}  {'ratio':>6}  vs"
    for col in extra_cols:
        header += f"  {col:>12}"
    print(f"\n{title}\n{header}\n{'-' * len(header)}")
    for r in rows:
        ratio = f"{r['ratio']:.2f}x" if r.get("ratio") is not None else "-"
        line = f"{r['case']:<{width}}  {r['median_us']:>10.1f}  {r['p99_us']:>10.1f}  {ratio:>6}  {r['vs']}"
        for col in extra_cols:
            line += f"  {r.get(col, ''):>12}"
        print(line)


# --- round trips and SQL per hit --------------------------------------------------------

class RoundTripCounter:
    """Counts packets written to Redis: redis-py sends each command, or each pipeline,
    with one Connection.send_packed_command call."""

    def __init__(self) -> None:
        self.count = 0

    def __enter__(self) -> RoundTripCounter:
        import redis.connection

        original = redis.connection.Connection.send_packed_command
        self._original = original
        counter = self

        def counting(conn, command, check_health=True):
            counter.count += 1
            return original(conn, command, check_health)

        redis.connection.Connection.send_packed_command = counting
        return self

    def __exit__(self, *exc) -> None:
        import redis.connection

        redis.connection.Connection.send_packed_command = self._original


def count_costs(cases: list[Case], n: int = 1000) -> dict:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    wanted = [c for c in cases if c.name.startswith(("ragcache", "raw redis-py GET")) and "WARNING" not in c.name]
    costs = {}
    for case in wanted:
        case.fn()  # warm: scripts loaded, connection open, snapshot loaded
        with RoundTripCounter() as trips, CaptureQueriesContext(connection) as queries:
            for _ in range(n):
                case.fn()
        costs[case.name] = {
            "redis_round_trips_per_call": trips.count / n,
            "sql_queries_per_call": len(queries.captured_queries) / n,
        }
    return costs


# --- modes ------------------------------------------------------------------------------

def run_single(args, prefix: str) -> dict:
    cases, info = build_cases(prefix, args.steps_log)
    warmup = args.warmup if args.warmup is not None else max(500, args.iterations // 10)
    print(f"ragcache hot path: {len(cases)} cases x {args.iterations} iterations (+{warmup} warm-up), "
          f"batches of {args.batch}, interleaved; answer {info['answer_bytes']} bytes; "
          f"LangChain {info['langchain']}; step log default {args.steps_log.upper()}", flush=True)
    wall = run_interleaved(cases, args.iterations, args.batch, warmup)
    set_steps_level(args.steps_log)()
    rows = results_table(cases)
    print_table(rows, f"Single process ({wall:.1f} s wall)")
    costs = count_costs(cases)
    print("\nPer call (counted over 1000 calls after warm-up):")
    for name, cost in costs.items():
        print(f"  {name:<60} Redis round trips {cost['redis_round_trips_per_call']:.2f}   "
              f"SQL queries {cost['sql_queries_per_call']:.2f}")
    if info["langchain"] != "installed":
        print("  LangChain RedisCache: not installed (.venv/bin/pip install -e '.[bench]' to include it)")
    return {"mode": "single", "wall_seconds": round(wall, 2), "rows": rows, "per_call": costs,
            "answer_bytes": info["answer_bytes"], "langchain": info["langchain"]}


def run_worker(args) -> None:
    """One of --processes N: warm up, say ready, wait for go, run, print JSON."""
    prefix = _common.prepare_env()
    _common.setup_django(migrate=False)
    configure_logging(args.steps_log)
    cases, _ = build_cases(prefix, args.steps_log, stores=False)
    warmup = args.warmup if args.warmup is not None else max(500, args.iterations // 10)
    run_interleaved(cases, 0, args.batch, warmup)
    print("ready", flush=True)
    sys.stdin.readline()
    wall = run_interleaved(cases, args.iterations, args.batch, 0)
    print(json.dumps({"wall": wall, "cases": {c.name: {"samples": c.samples, "failures": c.failures}
                                              for c in cases}}), flush=True)


def run_concurrent(args, prefix: str) -> dict:
    build_cases(prefix, args.steps_log, stores=False)  # seed once before the workers start
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--iterations", str(args.iterations),
           "--batch", str(args.batch), "--steps-log", args.steps_log]
    if args.warmup is not None:
        cmd += ["--warmup", str(args.warmup)]
    workers = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=os.environ.copy())
               for _ in range(args.processes)]
    for worker in workers:
        line = worker.stdout.readline()
        if line.strip() != "ready":
            raise SystemExit(f"worker failed to start: {line!r}")
    started = time.perf_counter()
    for worker in workers:
        worker.stdin.write("go\n")
        worker.stdin.flush()
    outputs = [json.loads(worker.communicate()[0].strip().splitlines()[-1]) for worker in workers]
    wall = time.perf_counter() - started
    names = list(outputs[0]["cases"])
    pooled = []
    for name in names:
        case = Case(name, "lookup", lambda: None)
        case.samples = [s for out in outputs for s in out["cases"][name]["samples"]]
        case.failures = sum(out["cases"][name]["failures"] for out in outputs)
        pooled.append(case)
    rows = results_table(pooled)
    for row in rows:
        # Throughput of this case at this concurrency: calls / time spent in them, summed over processes.
        row["ops_per_s"] = round(sum(len(out["cases"][row["case"]]["samples"]) /
                                     (sum(out["cases"][row["case"]]["samples"]) / 1e9) for out in outputs))
    total_ops = sum(len(c.samples) for c in pooled)
    print_table(rows, f"{args.processes} processes at once ({wall:.1f} s wall, {total_ops / wall:,.0f} calls/s "
                      f"over all cases)", extra_cols=("ops_per_s",))
    return {"mode": "concurrent", "processes": args.processes, "wall_seconds": round(wall, 2),
            "calls_per_second_all_cases": round(total_ops / wall), "rows": rows}


# --- HTTP mode --------------------------------------------------------------------------

def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _load(port: int, path: str, requests: int, threads: int, time_cap: float, expect: bytes) -> dict:
    """Fixed request count (or the time cap), ``threads`` keep-alive clients."""
    import http.client

    lock = threading.Lock()
    state = {"left": requests, "done": 0, "bad": 0, "latencies": []}
    deadline = time.perf_counter() + time_cap

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        latencies = []
        bad = 0
        while True:
            with lock:
                if state["left"] <= 0 or time.perf_counter() > deadline:
                    break
                state["left"] -= 1
            t0 = time.perf_counter_ns()
            conn.request("GET", path)
            response = conn.getresponse()
            body = response.read()
            latencies.append(time.perf_counter_ns() - t0)
            if response.status != 200 or expect not in body:
                bad += 1
        conn.close()
        with lock:
            state["done"] += len(latencies)
            state["bad"] += bad
            state["latencies"].extend(latencies)

    pool = [threading.Thread(target=client) for _ in range(threads)]
    started = time.perf_counter()
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    elapsed = time.perf_counter() - started
    return {"done": state["done"], "bad": state["bad"], "seconds": elapsed, "latencies": state["latencies"]}


def run_http(args, prefix: str) -> dict:
    import urllib.parse

    from django.core.cache import caches

    port = _free_port()
    env = dict(os.environ, DJANGO_SETTINGS_MODULE="bench.http_settings", DEMO_LLM_DELAY_MS="0",
               BENCH_STEPS_LOG=args.steps_log, PYTHONPATH=str(_common.ROOT))
    cmd = [sys.executable, "-m", "gunicorn", "project.wsgi:application", "--bind", f"127.0.0.1:{port}",
           "--workers", str(args.http_workers), "--worker-class", "gthread", "--threads", str(args.http_threads),
           "--keep-alive", "30", "--log-level", "warning", "--chdir", str(_common.ROOT)]
    server = subprocess.Popen(cmd, env=env)
    demo_path = "/demo/ask.json?q=" + urllib.parse.quote(QUESTION)
    plain_path = "/bench/plain.json"
    try:
        _wait_for(port, server)
        first = _get(port, demo_path)  # a miss: the fake LLM (0 ms) answers and the answer is stored
        body = _get(port, demo_path)
        if b'"hit": true' not in body:
            raise SystemExit(f"the demo endpoint did not hit on the second request: {body[:200]!r}")
        caches["ragcache"].set(f"{prefix}:plain", body.decode(), timeout=3600)
        if _get(port, plain_path) != body:
            raise SystemExit("the plain view does not return the demo's bytes")
        del first
        for path, expect in ((demo_path, b'"hit": true'), (plain_path, b'"hit": true')):
            _load(port, path, args.http_requests // 5, args.http_clients, 30, expect)  # warm-up
        totals = {"demo": [], "plain": []}
        for round_no in range(args.http_rounds):
            order = [("demo", demo_path), ("plain", plain_path)]
            if round_no % 2:
                order.reverse()
            for name, path in order:
                totals[name].append(_load(port, path, args.http_requests, args.http_clients, args.http_time_cap,
                                          b'"hit": true'))
    finally:
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
    rows = {}
    for name, runs in totals.items():
        done = sum(r["done"] for r in runs)
        seconds = sum(r["seconds"] for r in runs)
        stats = _common.summarize([lat for r in runs for lat in r["latencies"]])
        rows[name] = {"requests": done, "bad": sum(r["bad"] for r in runs), "req_per_s": round(done / seconds, 1),
                      "median_ms": round(stats["median_us"] / 1000, 3), "p99_ms": round(stats["p99_us"] / 1000, 3)}
    ratio = rows["demo"]["req_per_s"] / rows["plain"]["req_per_s"]
    print(f"\nHTTP: gunicorn gthread {args.http_workers} workers x {args.http_threads} threads on 127.0.0.1:{port}, "
          f"{args.http_clients} keep-alive clients, {args.http_rounds} alternating rounds of {args.http_requests}")
    print(f"{'endpoint':<44} {'req/s':>9} {'median ms':>10} {'p99 ms':>8} {'bad':>5}")
    labels = {"demo": "/demo/ask.json?q=... (ragcache get_or_call hit)",
              "plain": "/bench/plain.json (django-redis get)"}
    for name, row in rows.items():
        print(f"{labels[name]:<44} {row['req_per_s']:>9.1f} {row['median_ms']:>10.3f} {row['p99_ms']:>8.3f} "
              f"{row['bad']:>5}")
    print(f"demo / plain = {ratio:.3f}x")
    return {"mode": "http", "rows": rows, "ratio_demo_to_plain": round(ratio, 3),
            "server": {"workers": args.http_workers, "threads": args.http_threads, "clients": args.http_clients}}


def _get(port: int, path: str) -> bytes:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise SystemExit(f"GET {path} -> {response.status}: {body[:300]!r}")
        return body
    finally:
        conn.close()


def _wait_for(port: int, server: subprocess.Popen) -> None:
    import socket

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit("gunicorn exited during start-up")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit("gunicorn did not start within 30 s")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=20_000, help="timed calls per case (default 20000)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up calls per case (default iterations/10)")
    parser.add_argument("--batch", type=int, default=100, help="calls per case per round-robin turn")
    parser.add_argument("--steps-log", choices=["info", "warning"], default="info",
                        help="level of the ragcache.steps logger for the headline cases (default info: the "
                             "shipped LOGGING keeps step lines; they go to a formatting sink)")
    parser.add_argument("--processes", type=int, default=1, help="run the hit cases in N processes at once")
    parser.add_argument("--http", action="store_true", help="HTTP mode: demo endpoint vs plain view, gunicorn")
    parser.add_argument("--http-requests", type=int, default=4000, help="requests per endpoint per round")
    parser.add_argument("--http-rounds", type=int, default=6)
    parser.add_argument("--http-clients", type=int, default=4, help="keep-alive client threads")
    parser.add_argument("--http-workers", type=int, default=2)
    parser.add_argument("--http-threads", type=int, default=2)
    parser.add_argument("--http-time-cap", type=float, default=60.0, help="seconds per round, at most")
    parser.add_argument("--json", default=str(_common.RESULTS / "hotpath.json"), help="where to write the results")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        return
    prefix = _common.prepare_env()
    _common.setup_django(migrate=True)
    configure_logging(args.steps_log)
    report: dict = {"machine": _common.machine_facts(), "prefix": prefix, "args": vars(args)}
    try:
        if args.http:
            report["http"] = run_http(args, prefix)
        elif args.processes > 1:
            report["concurrent"] = run_concurrent(args, prefix)
        else:
            report["single"] = run_single(args, prefix)
    finally:
        _cleanup(prefix)
    report["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    _common.write_json(Path(args.json), report)
    print(f"\nload average before {report['machine']['load_average']}, after "
          f"{report['machine']['load_average_after']}; JSON: {args.json}")


def _cleanup(prefix: str) -> None:
    if UNPREFIXED_KEYS:
        import redis

        client = redis.Redis.from_url(_common.REDIS_URL)
        client.unlink(*UNPREFIXED_KEYS)
        client.close()
    removed = _common.cleanup(prefix)
    print(f"cleanup: removed {removed} keys under {prefix}:*")


if __name__ == "__main__":
    main()
