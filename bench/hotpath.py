#!/usr/bin/env python
"""Hot-path benchmark: ragcache against the floor (raw redis-py / redis.asyncio) and its
peers (django-redis, LangChain's RedisCache), ratios from one run.

    make bench                                        # every default group, ~3-4 minutes
    make bench BENCH_ARGS="--only sync"               # the main table only (~1 minute)
    make bench BENCH_ARGS="--async"                   # = --only async (also --http, --remote)
    make bench BENCH_ARGS="--only profile"            # pyinstrument profile of one hit
    make bench BENCH_ARGS="--only callgrind"          # instructions per call (valgrind)

Groups: ``sync`` (the issue's table: per-call latency, interleaved), ``async`` (100
coroutines on one loop, throughput; and ragcache 0.1 measured the same way), ``http``
(demo endpoint vs a plain view under uvicorn and gunicorn, wrk), ``remote`` (through
bench/proxy.py holding each read 0.25 ms each way), and the opt-in ``profile`` and
``callgrind``.

Placement: a private redis-server (no persistence, free loopback port) pinned to
``--redis-cpu`` (1), the bench to ``--bench-cpu`` (0); servers under test share the
bench's CPU, wrk and the delay proxy share Redis's. Every table prints the placement read
back from the kernel, the load average before and after, and the date; the JSON of the
run goes to bench/results/ (git-ignored). Only ratios taken in one run mean anything on a
shared machine. See docs/performance.md.
"""
from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import json
import logging
import os
import random
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _common  # noqa: E402
from bench._common import MODEL, QUESTION, STORE_QUESTION, make_answer  # noqa: E402

STEPS_LOGGER = "ragcache.steps"
DEFAULT_GROUPS = ("sync", "async", "remote", "http")
ALL_GROUPS = (*DEFAULT_GROUPS, "profile", "callgrind")
V01 = "57fed38"  # ragcache 0.1 (the issue's "today" figures)
# The issue's 0.1 figures (quiet machine, client and server on different CPUs).
ISSUE_01 = {"aget_cached_response_per_s": 2552, "raw_asyncio_get_per_s": 13449, "ratio": 0.19}



def _llm_on_miss():
    """The "LLM" of the get_or_call hit case: called only on a miss (counted as a failure);
    it returns the stored answer, so storing it again changes nothing."""
    return make_answer()


# --- context ---------------------------------------------------------------------------------

class Ctx:
    """What every group shares: the private Redis, the placement, the key prefix."""

    def __init__(self, args, redis_server: _common.RedisServer, prefix: str) -> None:
        self.args, self.redis, self.prefix = args, redis_server, prefix
        self.placement = _common.Placement()
        self.placement.add("redis-server", redis_server.pid)
        self._raw = None

    def raw_client(self):
        import redis

        if self._raw is None:
            self._raw = redis.Redis.from_url(self.redis.url)
        return self._raw


# --- step log: levels, queue, writer ------------------------------------------------------------

class StepLog:
    """Switches between the step-log settings the cases need, outside the timed calls, and
    waits for the writer thread so that no case pays for another's log lines."""

    def __init__(self) -> None:
        from ragcache import steplog

        self.steplog = steplog
        self.logger = logging.getLogger(STEPS_LOGGER)

    def level(self, level: int) -> Callable[[], None]:
        def use() -> None:
            self.set_queue(True)
            if self.logger.level != level:
                self.logger.setLevel(level)
                self._prime()

        return use

    def inline(self) -> None:
        """The step line written on the request thread (``STEP_LOG_QUEUE`` False)."""
        self.level(logging.NOTSET)()
        self.set_queue(False)

    @staticmethod
    def set_queue(on: bool) -> None:
        from ragcache.conf import get_config

        config = get_config()
        if config.get("STEP_LOG_QUEUE") is not on:
            config["STEP_LOG_QUEUE"] = on

    @staticmethod
    def _prime() -> None:
        # setLevel() empties every logger's isEnabledFor cache: refill them here, untimed.
        for logger in list(logging.Logger.manager.loggerDict.values()):
            if isinstance(logger, logging.Logger):
                for lvl in (logging.DEBUG, logging.INFO, logging.WARNING):
                    logger.isEnabledFor(lvl)

    def writer(self):
        return getattr(self.steplog, "_writer", None)

    def queued(self) -> int:
        writer = self.writer()
        return getattr(writer, "last_queued", 0) if writer is not None else 0

    def drain(self) -> None:
        """Wait until the writer has written every queued line (a busy yield, so that the
        wait does not add a 1 ms sleep per call; the public ``flush()`` as a fallback)."""
        writer = self.writer()
        if writer is None or not hasattr(writer, "handled"):
            self.steplog.flush(10.0)
            return
        deadline = time.monotonic() + 10.0
        while writer.handled < writer.last_queued:
            if time.monotonic() > deadline:
                raise SystemExit("the step-log writer thread did not keep up within 10 s")
            time.sleep(0)

    def writer_cpu_ns(self) -> int | None:
        """CPU time the writer thread has used so far (its own clock), or None."""
        for thread in threading.enumerate():
            if thread.name == "ragcache-steplog":
                try:
                    return time.clock_gettime_ns(time.pthread_getcpuclockid(thread.ident))
                except (OSError, AttributeError):
                    return None
        return None

    def handled(self) -> int:
        writer = self.writer()
        return getattr(writer, "handled", 0) if writer is not None else 0


# --- cases ----------------------------------------------------------------------------------

@dataclass
class Case:
    name: str
    kind: str  # lookup | store
    fn: Callable[[], Any]
    before: Callable[[], None] | None = None
    after: Callable[[], None] | None = None
    ok: Callable[[Any], bool] = bool  # False: a miss where a hit was expected, a refused store
    ragcache: bool = False
    samples: list[int] = field(default_factory=list)
    failures: int = 0
    warmup_failures: int = 0


def build_cases(ctx_url: str, prefix: str, *, remote: dict | None = None) -> tuple[list[Case], dict]:
    """The cases of the sync table, or (``remote``: {"direct": url, "proxy0": url}) of the
    remote table, where Django's Redis is the delaying proxy."""
    import redis
    from django.core.cache import caches

    from ragcache.services import cache_service

    steps = StepLog()
    answer = make_answer()
    if not cache_service.cache_response(QUESTION, answer, model=MODEL, latency_ms=850.0):
        raise SystemExit("ragcache refused to store the bench answer: is the 'default' policy on?")
    seeded = cache_service.get_cached_response(QUESTION, model=MODEL)
    if seeded is None:
        raise SystemExit("ragcache stored the bench answer but does not hit it")
    client = redis.Redis.from_url(ctx_url)
    body = client.hget(seeded.key, "b")
    raw_key, raw_set_key = f"{prefix}:raw:get", f"{prefix}:raw:set"
    client.set(raw_key, body, ex=3600)
    dj = caches["ragcache"]
    dj_key, dj_set_key = f"{prefix}:dj:get", f"{prefix}:dj:set"
    dj.set(dj_key, answer, timeout=3600)
    info = {"answer_bytes": len(body), "answer_content_chars": len(answer["choices"][0]["message"]["content"])}
    info_level, warning_level = steps.level(logging.NOTSET), steps.level(logging.WARNING)

    def hit():
        return cache_service.get_cached_response(QUESTION, model=MODEL)

    def get_or_call_hit():
        return cache_service.get_or_call(QUESTION, _llm_on_miss, model=MODEL).hit

    def store():
        return cache_service.cache_response(STORE_QUESTION, answer, model=MODEL, latency_ms=850.0)

    def rc(name, kind, fn, before):
        return Case(name, kind, fn, before=before, after=steps.drain, ragcache=True)

    suffix = f" ({remote['delay_ms']:g} ms proxy)" if remote else ""
    cases = []
    if remote:
        direct = redis.Redis.from_url(remote["direct"])
        proxy0 = redis.Redis.from_url(remote["proxy0"])
        cases += [Case("raw redis-py GET, direct (no proxy)", "lookup", lambda: direct.get(raw_key)),
                  Case("raw redis-py GET, 0 ms proxy", "lookup", lambda: proxy0.get(raw_key))]
    cases += [
        Case(f"raw redis-py GET{suffix}", "lookup", lambda: client.get(raw_key)),
        Case(f"django-redis cache.get{suffix}", "lookup", lambda: dj.get(dj_key)),
    ]
    langchain = _langchain_cache(client)
    if langchain is not None:
        lc_cache, generation = langchain
        llm_string = f"model={MODEL}"
        lc_cache.update(QUESTION, llm_string, [generation])
        cases.append(Case(f"LangChain RedisCache.lookup{suffix}", "lookup",
                          lambda: lc_cache.lookup(QUESTION, llm_string)))
    cases += [
        rc(f"ragcache hit, shipped logging (step 63 at INFO, queued){suffix}", "lookup", hit, info_level),
        rc(f"ragcache hit, step log at WARNING{suffix}", "lookup", hit, warning_level),
    ]
    if not remote:
        cases.append(rc("ragcache hit, step 63 at INFO written inline (STEP_LOG_QUEUE off)", "lookup", hit,
                        steps.inline))

        def hit_until_written():
            found = hit()
            steps.drain()
            return found

        cases.append(rc("ragcache hit, INFO queued, timed until the writer has written its line", "lookup",
                        hit_until_written, info_level))
    cases.append(rc(f"ragcache get_or_call hit (INFO, queued){suffix}", "lookup", get_or_call_hit, info_level))
    if not remote:
        cases += [
            Case("raw redis-py SET EX", "store", lambda: client.set(raw_set_key, body, ex=3600)),
            Case("django-redis cache.set", "store", lambda: dj.set(dj_set_key, answer, timeout=3600)),
        ]
        if langchain is not None:
            cases.append(Case("LangChain RedisCache.update", "store",
                              lambda: lc_cache.update(STORE_QUESTION, llm_string, [generation]),
                              ok=lambda value: True))  # returns None; errors are logged, not raised
        cases.append(rc("ragcache cache_response (INFO, queued)", "store", store, info_level))
    info["langchain"] = _langchain_version() if langchain is not None else "not installed"
    return cases, info


def _langchain_cache(client):
    """LangChain's RedisCache (langchain-community) on ``client``, or None when absent."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # langchain-community announces its sunset on import
        try:
            from langchain_community.cache import RedisCache
            from langchain_core.outputs import Generation
        except ImportError:
            return None
    return RedisCache(redis_=client, ttl=3600), Generation(text=make_answer()["choices"][0]["message"]["content"])


def _langchain_version() -> str:
    from importlib.metadata import version

    return f"langchain-community {version('langchain-community')}, langchain-core {version('langchain-core')}"


def check_costs(cases: list[Case], n: int = 500) -> dict:
    """Redis round trips and SQL queries per call, counted (redis-py writes one packet per
    command or pipeline). A ragcache hit must cost exactly one round trip: the bench stops
    otherwise."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from bench.async_hits import Trips

    costs = {}
    for case in cases:
        if not (case.ragcache or case.name.startswith("raw")):
            continue
        for _attempt in range(3):  # a socket timeout on a busy machine turns a hit into a miss: count again
            if case.before:
                case.before()
            case.fn()
            with Trips() as trips, CaptureQueriesContext(connection) as queries:
                results = [case.fn() for _ in range(n)]
            if case.after:
                case.after()
            if all(case.ok(r) for r in results) or not case.ragcache:
                break
            time.sleep(1.5)  # past the breaker's cooldown
        costs[case.name] = {"redis_round_trips": trips.sync / n, "sql_queries": len(queries.captured_queries) / n}
        if case.ragcache and case.kind == "lookup" and trips.sync != n:
            raise SystemExit(f"{case.name}: {trips.sync} Redis round trips for {n} hits (expected {n})")
    return costs


def check_inline_toggle(cases: list[Case]) -> None:
    """The inline case must really bypass the queue (the bench switches ``STEP_LOG_QUEUE``
    in the cached settings dict; if ragcache ever caches it elsewhere, drop the row)."""
    steps = StepLog()
    for case in list(cases):
        if "inline" in case.name:
            steps.drain()
            case.before()
            queued = steps.queued()
            case.fn()
            if steps.queued() != queued:
                print(f"   note: '{case.name}' dropped: STEP_LOG_QUEUE cannot be switched off at run time here")
                cases.remove(case)
            steps.level(logging.NOTSET)()


def run_interleaved(cases: list[Case], iterations: int, warmup: int, seed: int) -> float:
    """Each iteration runs every case once, in a freshly shuffled order; ``before`` and
    ``after`` (level switches, waiting for the step-log writer) are not timed. A call that
    raises or fails its check (a miss where a hit was expected: e.g. the shipped 0.1 s
    socket timeout fired on a busy machine and ragcache answered "miss") is counted in
    ``failures`` and its time left out: a breaker-open miss is fast and would flatter the
    median. Warm-up failures are counted too, never fatal (the table shows them)."""
    rng = random.Random(seed)
    order = list(cases)
    clock = time.perf_counter_ns
    started = time.perf_counter()
    for i in range(warmup + iterations):
        rng.shuffle(order)
        timed = i >= warmup
        for case in order:
            if case.before is not None:
                case.before()
            t0 = clock()
            try:
                value = case.fn()
            except Exception:  # noqa: BLE001 - django-redis raises on a socket timeout
                value = None
                ok = False
            else:
                ok = case.ok(value)
            t1 = clock()
            if case.after is not None:
                case.after()
            if not ok:
                if timed:
                    case.failures += 1
                else:
                    case.warmup_failures += 1
            elif timed:
                case.samples.append(t1 - t0)
    return time.perf_counter() - started


def table_rows(cases: list[Case], placement: str, references: dict[str, str]) -> list[dict]:
    stats = {case.name: _common.summarize(case.samples) for case in cases}
    rows = []
    for case in cases:
        s = stats[case.name]
        ref_name = references[case.kind]
        ref = stats.get(ref_name)
        rows.append({"case": case.name, "kind": case.kind, **s,
                     "ratio": round(s["median_us"] / ref["median_us"], 3) if ref and s["median_us"] else None,
                     "vs": ref_name, "failures": case.failures, "warmup_failures": case.warmup_failures,
                     "placement": placement})
    return rows


def _print_failures(rows: list[dict]) -> None:
    failed = [r for r in rows if r["failures"] or r.get("warmup_failures")]
    if failed:
        print("   fail = timed calls that raised or missed (left out of the times); "
              + "; ".join(f"{r['case']}: {r['failures']} (+{r.get('warmup_failures', 0)} in warm-up)" for r in failed))


SYNC_COLUMNS = [("case", "case", ""), ("median_us", "median µs", ".1f"), ("p90_us", "p90 µs", ".1f"),
                ("p99_us", "p99 µs", ".1f"), ("ratio", "x raw", ".2f"), ("failures", "fail", "d")]


# --- group: sync ------------------------------------------------------------------------------

def run_sync(ctx: Ctx) -> dict:
    args = ctx.args
    load_before, started = _common.load_average(), _common.now()
    cases, info = build_cases(ctx.redis.url, ctx.prefix)
    check_inline_toggle(cases)
    costs = check_costs(cases)
    steps = StepLog()
    steps.level(logging.NOTSET)()
    steps.drain()
    cpu0, lines0 = steps.writer_cpu_ns(), steps.handled()
    wall = run_interleaved(cases, args.iterations, args.warmup, args.seed)
    steps.level(logging.NOTSET)()
    steps.drain()
    cpu1, lines1 = steps.writer_cpu_ns(), steps.handled()
    placement = ctx.placement.snapshot()
    rows = table_rows(cases, _common.Placement.text(placement),
                      {"lookup": "raw redis-py GET", "store": "raw redis-py SET EX"})
    writer = None
    if cpu0 is not None and cpu1 is not None and lines1 > lines0:
        writer = {"lines": lines1 - lines0, "cpu_us_per_line": round((cpu1 - cpu0) / (lines1 - lines0) / 1000, 2)}
    _common.header(f"Sync, one process: {len(cases)} cases x {args.iterations} iterations (+{args.warmup} warm-up), "
                   f"interleaved, order shuffled every iteration ({wall:.0f} s)",
                   _common.Placement.text(placement), load_before, _common.load_average(), started,
                   f"answer {info['answer_bytes']} bytes stored ({info['answer_content_chars']} characters of "
                   f"content); {info['langchain']}; logging: the demo project's LOGGING, handler writing to "
                   f"/dev/null")
    _common.print_rows(SYNC_COLUMNS, rows)
    _print_failures(rows)
    print("   per call, counted over 500 calls (Redis round trips = packets written by redis-py):")
    for name, cost in costs.items():
        print(f"     {name:<66} round trips {cost['redis_round_trips']:.3f}   SQL {cost['sql_queries']:.3f}")
    if writer:
        print(f"   step-log writer thread (off the request thread): {writer['cpu_us_per_line']:.1f} µs CPU per line "
              f"over {writer['lines']} lines")
    return {"started": started, "load_before": load_before, "load_after": _common.load_average(),
            "placement": placement, "wall_seconds": round(wall, 1), "iterations": args.iterations, **info,
            "rows": rows, "per_call": costs, "step_log_writer": writer}


# --- group: async -------------------------------------------------------------------------------

def _v01_tree() -> Path:
    tree = _common.RESULTS / f"ragcache-0.1-{V01}"
    if not (tree / "ragcache" / "services.py").exists():
        tree.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(_common.ROOT), "archive", V01], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    return tree


def _async_worker(ctx: Ctx, root: Path, cases: list[str], database: str) -> dict:
    args = ctx.args
    env = dict(os.environ, DATABASE_URL=database, RAGCACHE_KEY_PREFIX=f"{ctx.prefix}-{root.name}", DEBUG="0",
               DJANGO_SETTINGS_MODULE="project.settings", PYTHONPATH="")
    cmd = [sys.executable, str(Path(__file__).resolve().parent / "async_hits.py"), "--root", str(root),
           "--redis-url", ctx.redis.url, "--concurrency", str(args.async_concurrency), "--ops", str(args.async_ops),
           "--rounds", str(args.async_rounds), "--cases", "|".join(cases), "--seed", str(args.seed)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"async worker ({root}) failed:\n{done.stderr[-3000:]}")
    warnings_seen = [line for line in done.stderr.splitlines() if " WARNING " in line]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["warnings"] = warnings_seen[:20]
    result["warning_count"] = len(warnings_seen)
    return result


def run_async(ctx: Ctx) -> dict:
    from bench.async_hits import CASES

    args = ctx.args
    load_before, started = _common.load_average(), _common.now()
    current = _async_worker(ctx, _common.ROOT, list(CASES), os.environ["DATABASE_URL"])
    placement = ctx.placement.snapshot()
    rows = current["rows"]
    by_name = {r["case"]: r for r in rows}
    raw_get, raw_set = by_name["raw redis.asyncio GET"]["per_s"], by_name["raw redis.asyncio SET EX"]["per_s"]
    for row in rows:
        ref = raw_set if row["case"] in ("raw redis.asyncio SET EX", "acache_response") else raw_get
        row["ratio"] = round(row["per_s"] / ref, 3) if row["per_s"] and ref else None
        row["ratio_vs_raw_get"] = round(row["per_s"] / raw_get, 3) if row["per_s"] and raw_get else None
        row["placement"] = _common.Placement.text(placement)
        trips = row.get("round_trips") or {}
        row["trips"] = f"{trips.get('sync', 0) + trips.get('asyncio', 0):.2f}" if trips else "-"
    baseline = None
    if not args.no_baseline:
        tree = _v01_tree()
        old = _async_worker(ctx, tree, ["raw redis.asyncio GET", "aget_cached_response (hit)", "aget_or_call (hit)"],
                            f"sqlite:///{_common.RESULTS / 'bench-0.1.sqlite3'}")
        old_by = {r["case"]: r for r in old["rows"]}
        old_raw = old_by["raw redis.asyncio GET"]["per_s"]
        baseline = {"commit": V01, "rows": old["rows"], "raw_get_per_s": old_raw,
                    "aget_cached_response_per_s": old_by["aget_cached_response (hit)"]["per_s"],
                    "ratio": round(old_by["aget_cached_response (hit)"]["per_s"] / old_raw, 3),
                    "warnings": old["warnings"]}
        ours = by_name["aget_cached_response (hit)"]["per_s"]
        baseline["ours_over_01"] = round(ours / baseline["aget_cached_response_per_s"], 2)
        # The issue's 2,552 hits/s scaled by this run's raw GET throughput (the issue had 13,449).
        baseline["issue_figure_scaled"] = round(ISSUE_01["ratio"] * raw_get, 1)
        baseline["ours_over_issue_figure_scaled"] = round(ours / baseline["issue_figure_scaled"], 2)
    load_after = _common.load_average()
    _common.header(f"Async: {args.async_concurrency} concurrent coroutines on one event loop, "
                   f"{args.async_rounds} rounds x {args.async_ops} calls per case, order shuffled per round; "
                   f"calls/s = median round",
                   _common.Placement.text(placement), load_before, load_after, started,
                   "x raw: against raw GET (lookups) / raw SET EX (stores), same run; a round includes "
                   "writing its step-log lines")
    _common.print_rows([("case", "case", ""), ("per_s", "calls/s", ",.0f"), ("per_s_overall", "overall", ",.0f"),
                        ("ratio", "x raw", ".2f"),
                        ("ratio_vs_raw_get", "x raw GET", ".2f"), ("trips", "trips/call", ""),
                        ("failures", "fail", "d"), ("rounds_left_out", "rounds out", "d")], rows)
    if current["warnings"]:
        print(f"   the worker logged {current['warning_count']} warnings (first: {current['warnings'][0][24:]}); "
              f"fail = calls that missed; rounds out = rounds left out because a call in them missed")
    if baseline:
        print(f"   ragcache 0.1 ({V01}, sync_to_async), same loop, Redis and CPU, measured right after: "
              f"aget_cached_response {baseline['aget_cached_response_per_s']:,.0f}/s vs raw GET "
              f"{baseline['raw_get_per_s']:,.0f}/s = {baseline['ratio']:.2f}x")
        print(f"   0.2 / 0.1 aget_cached_response: {baseline['ours_over_01']:.2f}x   (issue's figure 2,552/s = "
              f"0.19x raw, scaled to this run's raw GET: {baseline['issue_figure_scaled']:,.0f}/s; 0.2 is "
              f"{baseline['ours_over_issue_figure_scaled']:.2f}x that)")
    return {"started": started, "load_before": load_before, "load_after": load_after, "placement": placement,
            "concurrency": args.async_concurrency, "rows": rows, "baseline_0_1": baseline,
            "warnings": current["warnings"], "warning_count": current["warning_count"]}


# --- group: remote --------------------------------------------------------------------------------

def _start_proxy(ctx: Ctx, delay_ms: float) -> tuple[subprocess.Popen, int]:
    cmd = [*_common.taskset(ctx.args.redis_cpu), sys.executable, str(Path(__file__).resolve().parent / "proxy.py"),
           "--upstream", f"127.0.0.1:{ctx.redis.port}", "--delay-ms", str(delay_ms)]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    line = process.stdout.readline()
    try:
        return process, json.loads(line)["port"]
    except (ValueError, KeyError):
        _common.stop(process)
        raise SystemExit(f"bench/proxy.py did not start: {line!r}") from None


def _stop_proxy(process: subprocess.Popen) -> dict:
    process.terminate()
    try:
        out, _ = process.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        _common.stop(process)
        return {}
    lines = [line for line in out.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def run_remote(ctx: Ctx) -> dict:
    args = ctx.args
    load_before, started = _common.load_average(), _common.now()
    proxy0, port0 = _start_proxy(ctx, 0.0)
    proxied, port = _start_proxy(ctx, args.remote_delay_ms)
    ctx.placement.add("proxy-0ms", proxy0.pid)
    ctx.placement.add(f"proxy-{args.remote_delay_ms:g}ms", proxied.pid)
    try:
        placement = ctx.placement.snapshot()
        env = dict(os.environ, REDIS_URL=f"redis://127.0.0.1:{port}/0")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--remote-worker", "--iterations",
               str(args.remote_iterations), "--warmup", str(max(100, args.remote_iterations // 10)),
               "--seed", str(args.seed), "--direct-url", ctx.redis.url, "--remote-delay-ms", str(args.remote_delay_ms),
               "--proxy0-url", f"redis://127.0.0.1:{port0}/0", "--prefix", ctx.prefix]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise SystemExit(f"remote worker failed:\n{done.stderr[-3000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        stats = {"0ms": _stop_proxy(proxy0), f"{args.remote_delay_ms:g}ms": _stop_proxy(proxied)}
        ctx.placement.remove("proxy-0ms")
        ctx.placement.remove(f"proxy-{args.remote_delay_ms:g}ms")
    rows = result["rows"]
    for row in rows:
        row["placement"] = _common.Placement.text(placement)
    by = {r["case"]: r for r in rows}
    direct = by["raw redis-py GET, direct (no proxy)"]["median_us"]
    through0 = by["raw redis-py GET, 0 ms proxy"]["median_us"]
    load_after = _common.load_average()
    held = stats.get(f"{args.remote_delay_ms:g}ms", {})
    _common.header(f"Remote Redis: through bench/proxy.py holding every read {args.remote_delay_ms:g} ms each way; "
                   f"{len(rows)} cases x {args.remote_iterations} iterations, interleaved",
                   _common.Placement.text(placement), load_before, load_after, started,
                   f"x raw: against raw GET through the same delayed proxy; proxy holds measured: median "
                   f"{held.get('held_us_median')} µs, p99 {held.get('held_us_p99')} µs per read")
    _common.print_rows(SYNC_COLUMNS, rows)
    _print_failures(rows)
    print(f"   the proxy's own cost (0 ms): {through0 - direct:+.1f} µs per GET over a direct GET "
          f"({through0:.1f} vs {direct:.1f} µs median)")
    for name, cost in result["per_call"].items():
        if "ragcache" in name:
            print(f"   {name}: {cost['redis_round_trips']:.3f} round trips per call")
    return {"started": started, "load_before": load_before, "load_after": load_after, "placement": placement,
            "delay_ms_each_way": args.remote_delay_ms, "rows": rows, "per_call": result["per_call"],
            "proxy": stats, "proxy_own_cost_us": round(through0 - direct, 1)}


def remote_worker(args) -> None:
    """Runs in a subprocess whose Django Redis (REDIS_URL) is the delaying proxy."""
    _common.prepare_env(os.environ["REDIS_URL"], args.prefix)
    _common.setup_django(migrate=False)
    _common.configure_shipped_logging()
    cases, info = build_cases(os.environ["REDIS_URL"], args.prefix,
                              remote={"direct": args.direct_url, "proxy0": args.proxy0_url,
                                      "delay_ms": args.remote_delay_ms})
    costs = check_costs(cases, n=200)
    run_interleaved(cases, args.iterations, args.warmup, args.seed)
    ref = f"raw redis-py GET ({args.remote_delay_ms:g} ms proxy)"
    rows = table_rows(cases, "", {"lookup": ref, "store": ref})
    print(json.dumps({"rows": rows, "per_call": costs, **info}), flush=True)


# --- groups: profile and callgrind -------------------------------------------------------------

IO_WAIT = {"recv_into", "recv", "read", "poll", "select", "sendall", "send"}


def _component(path: str) -> str:
    path = path.replace("\\", "/")
    if "/ragcache/" in path:
        return "ragcache/" + path.rsplit("/ragcache/", 1)[1]
    for marker, name in (("/redis/", "redis-py"), ("/logging/", "logging"),
                         ("/prometheus_client/", "prometheus_client"), ("/django_redis/", "django-redis"),
                         ("/django/", "django")):
        if marker in path:
            return name
    return "other Python"


def calls_by_component(fn: Callable[[], Any], n: int, ok: Callable[[Any], bool] = bool) -> dict[str, float]:
    """Function calls per call of ``fn`` by component, counted by cProfile: a count, so
    the same on a quiet and a busy machine (C functions are counted as "built-in") as
    long as every call was a hit: a miss after a socket timeout skips Redis, so the count
    is taken again (after the breaker's cooldown) until no call missed."""
    import cProfile
    import pstats

    for _attempt in range(5):
        profile = cProfile.Profile()
        profile.enable()
        failed = sum(1 for _ in range(n) if not ok(fn()))
        profile.disable()
        if not failed:
            break
        time.sleep(1.5)
    else:
        raise SystemExit(f"cProfile count: {failed} of {n} calls missed five times (Redis timing out?)")
    counts: dict[str, float] = {}
    for (path, _line, _name), (_cc, calls, *_rest) in pstats.Stats(profile).stats.items():
        component = "built-in (C) functions" if path == "~" else _component(path)
        if component == "other Python" and path.endswith("hotpath.py"):
            continue  # the bench's own lambda
        counts[component] = counts.get(component, 0) + calls
    return {k: round(v / n, 1) for k, v in sorted(counts.items(), key=lambda kv: -kv[1])}


def _by_component(frame, seconds: dict[str, float], parent: str = "other") -> None:
    """Self time of every frame of a pyinstrument tree, summed per component: socket
    calls, redis-py, each ragcache module, logging, prometheus_client, other; a built-in
    function's time goes to whoever called it (json.dumps from entries.py is entries.py)."""
    path = (frame.file_path or "").replace("\\", "/")
    if path.startswith("<built-in>") or not path:
        component = "socket calls (send, poll, recv: waiting for Redis)" if frame.function.split(".")[-1] \
            in IO_WAIT else parent
    elif "/ragcache/" in path:
        component = "ragcache/" + path.rsplit("/ragcache/", 1)[1]
    elif "/redis/" in path:
        component = "redis-py"
    elif "/logging/" in path:
        component = "logging"
    elif "/prometheus_client/" in path:
        component = "prometheus_client"
    else:
        component = "other" if parent == "bench" else parent
    self_time = frame.time - sum(child.time for child in frame.children)
    seconds[component] = seconds.get(component, 0.0) + self_time
    for child in frame.children:
        _by_component(child, seconds, component)


def run_profile(ctx: Ctx) -> dict:
    """pyinstrument over many hits (shipped logging, queue on) and over as many raw GETs:
    where a hit's time goes, by component, next to the floor."""
    try:
        from pyinstrument import Profiler
    except ImportError:
        print("\n== profile skipped: pyinstrument is not installed")
        return {"skipped": "pyinstrument not installed"}
    cases, _ = build_cases(ctx.redis.url, ctx.prefix)
    steps = StepLog()
    steps.level(logging.NOTSET)()
    n = ctx.args.profile_calls
    profiled = [c for c in cases if c.name in ("raw redis-py GET", "ragcache hit, shipped logging (step 63 at INFO, "
                                                                    "queued)")]
    result: dict = {"calls": n, "started": _common.now(), "load_before": _common.load_average(), "cases": {}}
    texts = []
    for case in profiled:
        for _ in range(500):
            case.fn()
        steps.drain()
        profiler = Profiler(interval=0.0001, async_mode="disabled")
        fn = case.fn
        profiler.start()
        for _ in range(n):
            fn()
        steps.drain()  # the writer thread is not sampled (pyinstrument samples this thread)
        session = profiler.stop()
        seconds: dict[str, float] = {}
        _by_component(session.root_frame(), seconds, "bench")
        per_call = {k: round(v / n * 1e6, 1) for k, v in sorted(seconds.items(), key=lambda kv: -kv[1])}
        result["cases"][case.name] = {"wall_us_per_call": round(session.duration / n * 1e6, 1),
                                      "cpu_us_per_call": round(session.cpu_time / n * 1e6, 1),
                                      "us_per_call_by_component": per_call}
        texts.append(f"### {case.name}\n" + profiler.output_text(unicode=False, color=False, show_all=False))
        result["cases"][case.name]["python_calls_per_call"] = calls_by_component(case.fn, 2000, case.ok)
        steps.drain()
    path = _common.RESULTS / "profile-hit.txt"
    path.write_text("\n\n".join(texts))
    result["load_after"] = _common.load_average()
    _common.header(f"Profile: pyinstrument, {n} calls each, 0.1 ms sampling of the calling thread (µs per call; "
                   f"the profiler's own overhead inflates Python code)",
                   _common.Placement.text(ctx.placement.snapshot()), result["load_before"], result["load_after"],
                   result["started"])
    names = list(result["cases"])
    components = list(dict.fromkeys(k for name in reversed(names)
                                    for k in result["cases"][name]["us_per_call_by_component"]))
    rows = [{"component": c, **{name: result["cases"][name]["us_per_call_by_component"].get(c) for name in names}}
            for c in components]
    rows.append({"component": "total (wall)", **{name: result["cases"][name]["wall_us_per_call"] for name in names}})
    rows.append({"component": "CPU time of the process", **{name: result["cases"][name]["cpu_us_per_call"]
                                                             for name in names}})
    _common.print_rows([("component", "component", "")] + [(name, name[:28], ".1f") for name in names], rows)
    calls = {name: result["cases"][name]["python_calls_per_call"] for name in names}
    components = list(dict.fromkeys(k for name in reversed(names) for k in calls[name]))
    print("   function calls per call, counted by cProfile over 2,000 calls (a count: repeatable):")
    _common.print_rows([("component", "component", "")] + [(name, name[:28], ".1f") for name in names],
                       [{"component": c, **{name: calls[name].get(c) for name in names}} for c in components]
                       + [{"component": "total", **{name: round(sum(calls[name].values()), 1) for name in names}}])
    print(texts[-1])
    print(f"   (both trees: {path})")
    return result


CALLGRIND_C = r"""
#include <valgrind/callgrind.h>
void rc_zero(void) { CALLGRIND_ZERO_STATS; }
void rc_toggle(void) { CALLGRIND_TOGGLE_COLLECT; }
void rc_dump(const char *name) { CALLGRIND_DUMP_STATS_AT(name); }
"""


def _callgrind_helper() -> Path:
    """A 3-function C library issuing callgrind's client requests (no-ops outside valgrind)."""
    out = _common.RESULTS / "callgrind_requests.so"
    if not out.exists():
        source = _common.RESULTS / "callgrind_requests.c"
        source.write_text(CALLGRIND_C)
        subprocess.run(["gcc", "-O1", "-shared", "-fPIC", "-o", str(out), str(source)], check=True)
    return out


def run_callgrind(ctx: Ctx) -> dict:
    import shutil

    if shutil.which("valgrind") is None or shutil.which("gcc") is None:
        print("\n== callgrind skipped: needs valgrind and gcc (Debian: apt-get install valgrind gcc)")
        return {"skipped": "valgrind or gcc missing"}
    helper = _callgrind_helper()
    outdir = _common.RESULTS / "callgrind"
    shutil.rmtree(outdir, ignore_errors=True)
    outdir.mkdir(parents=True)
    started = _common.now()
    cmd = ["valgrind", "--tool=callgrind", "--collect-atstart=no", "--separate-threads=yes",
           f"--callgrind-out-file={outdir}/cg.out", sys.executable, str(Path(__file__).resolve()),
           "--callgrind-worker", "--prefix", ctx.prefix, "--helper", str(helper),
           "--callgrind-calls", str(ctx.args.callgrind_calls)]
    print("\n== callgrind: running the cases under valgrind (slow: a few minutes) ...", flush=True)
    # Under valgrind everything runs ~50x slower: the shipped 0.1 s socket timeout would
    # fire and turn hits into (cheap) misses. Counting instructions needs no timeout.
    done = subprocess.run(cmd, env=dict(os.environ, PYTHONMALLOC="malloc", RAGCACHE_SOCKET_TIMEOUT="10",
                                        RAGCACHE_CONNECT_TIMEOUT="10"),
                          capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"callgrind worker failed:\n{done.stderr[-3000:]}")
    output = json.loads(done.stdout.strip().splitlines()[-1])
    names, failures = output["cases"], output["failures"]
    counts = _read_dumps(outdir)
    n = ctx.args.callgrind_calls
    rows = []
    for name in names:
        if name.endswith("empty loop"):
            continue
        empty = counts.get("async empty loop" if name.startswith("async ") else "empty loop", {})
        threads = counts.get(name, {})
        main = threads.get(1, 0) - empty.get(1, 0)
        # The writer's figure is net of the counting's own step line (~450 instructions a call).
        others = max(0, sum(v for t, v in threads.items() if t != 1) - sum(v for t, v in empty.items() if t != 1))
        rows.append({"case": name, "instructions_request_thread": round(main / n),
                     "instructions_other_threads": round(others / n), "instructions_total": round((main + others) / n),
                     "failures": failures.get(name, 0)})
    by = {r["case"]: r for r in rows}
    for row in rows:
        ref = by.get("async raw redis.asyncio GET" if row["case"].startswith("async ") else "raw redis-py GET", {})
        raw = ref.get("instructions_total")
        row["ratio"] = round(row["instructions_total"] / raw, 2) if raw else None
    print(f"   {started}; {n} calls per case after warm-up, PYTHONMALLOC=malloc, socket timeout 10 s, minus an "
          f"empty loop; per call, client side (the bench process; Redis's own work is not counted); fail = calls "
          f"that missed (then the row is not a hit's cost)")
    _common.print_rows([("case", "case", ""), ("instructions_request_thread", "request thread", ",d"),
                        ("instructions_other_threads", "writer thread", ",d"),
                        ("instructions_total", "total", ",d"), ("ratio", "x raw GET", ".2f"),
                        ("failures", "fail", "d")], rows)
    print("   x raw GET: against raw redis-py GET (sync rows) or raw redis.asyncio GET (async rows, one "
          "coroutine at a time)")
    objects = _by_object(outdir, n)
    if objects:
        # The empty loop's own instructions are not subtracted here (a few hundred a call).
        names = [c for c in OBJECT_CASES if c in objects]
        keys = list(dict.fromkeys(k for c in names for k in objects[c]))[:12]
        print("   request thread by shared object, self instructions per call (top 12):")
        _common.print_rows([("object", "object", "")] + [(c, c[:34], ",d") for c in names],
                           [{"object": k, **{c: objects[c].get(k, 0) for c in names}} for k in keys])
    print(f"   dumps: {outdir} (callgrind_annotate <file> for the C-level breakdown)")
    return {"started": started, "calls": n, "rows": rows, "by_object": objects}


OBJECT_CASES = ("raw redis-py GET", "ragcache hit, shipped logging (step 63 at INFO, queued)",
                "ragcache hit, step log at WARNING")


def _self_by_object(path: Path) -> dict[str, int]:
    """Self instructions by shared object, read from a callgrind dump: a cost line is the
    current function's own cost unless it follows a ``calls=`` line (then it is the
    inclusive cost of that call, which belongs to the callee)."""
    names: dict[str, str] = {}
    totals: dict[str, int] = {}
    current = "?"
    after_calls = False
    with path.open() as dump:
        for line in dump:
            if line.startswith(("ob=", "cob=")):
                ref, _, name = line.split("=", 1)[1].strip().partition(" ")
                if name:
                    names[ref] = name
                if line.startswith("ob="):
                    current = ref
            elif line.startswith("calls="):
                after_calls = True
            elif line[:1].isdigit() or line[:1] in "+-*":
                parts = line.split()
                if after_calls:
                    after_calls = False
                elif len(parts) >= 2:
                    totals[current] = totals.get(current, 0) + int(parts[1])
    return {names.get(ref, ref): count for ref, count in totals.items()}


def _by_object(outdir: Path, n: int) -> dict[str, dict[str, int]]:
    """Self instructions per call by shared object (libpython, libc, hiredis, orjson, ...)
    for a few cases' request thread."""
    import re

    result: dict[str, dict[str, int]] = {}
    for path in sorted(outdir.iterdir()):
        if not path.name.startswith("cg.out.") or not path.name.endswith("-01"):
            continue
        with path.open() as dump:
            trigger = next((line.split("Client Request: ", 1)[1].strip() for line in dump
                            if line.startswith("desc: Trigger: Client Request: ")), None)
        if trigger not in OBJECT_CASES:
            continue
        objects: dict[str, int] = {}
        for obj, count in _self_by_object(path).items():
            name = re.sub(r"\.cpython-\d+.*\.so$", ".so", os.path.basename(obj))
            objects[name] = objects.get(name, 0) + count
        result[trigger] = {k: round(v / n) for k, v in sorted(objects.items(), key=lambda kv: -kv[1])}
    return result


def _read_dumps(outdir: Path) -> dict[str, dict[int, int]]:
    """{trigger name: {thread number: instructions}} from callgrind's dump files."""
    counts: dict[str, dict[int, int]] = {}
    for path in sorted(outdir.iterdir()):
        if not path.name.startswith("cg.out"):
            continue
        thread = int(path.name.rsplit("-", 1)[1]) if "-" in path.name else 1
        trigger, total = None, 0
        with path.open() as dump:
            for line in dump:
                if line.startswith("desc: Trigger: Client Request: "):
                    trigger = line.split("Client Request: ", 1)[1].strip()
                elif line.startswith(("summary:", "totals:")):
                    total = int(line.split()[1])
        if trigger:
            counts.setdefault(trigger, {})[thread] = counts.setdefault(trigger, {}).get(thread, 0) + total
    return counts


def callgrind_worker(args) -> None:
    """Under valgrind: for each case, warm up, then count ``--callgrind-calls`` calls,
    waiting for the step-log writer inside the counted window so that its lines count.
    Callgrind zeroes and dumps per thread: the writer thread's counters are zeroed and
    dumped from inside it, by a step line whose attributes function makes the request
    (``log_step`` runs that function in the writer thread)."""
    from ragcache import steplog

    lib = ctypes.CDLL(args.helper)
    lib.rc_dump.argtypes = [ctypes.c_char_p]
    prefix = _common.prepare_env(os.environ["REDIS_URL"], args.prefix)
    _common.setup_django(migrate=False)
    _common.configure_shipped_logging()
    cases, _ = build_cases(os.environ["REDIS_URL"], prefix)
    check_inline_toggle(cases)
    cases.insert(0, Case("empty loop", "lookup", lambda: True))
    steps = StepLog()

    def in_writer(request: Callable[[], None]) -> None:
        StepLog.set_queue(True)

        def attrs() -> dict:
            request()
            return {}

        steplog.log_step(63, attrs, logging.CRITICAL)  # CRITICAL: passes any level set by a case
        steps.drain()

    def sync_batch(fn, ok):
        def batch(n: int) -> int:
            failed = 0
            for _ in range(n):
                if not ok(fn()):
                    failed += 1
            return failed
        return batch

    loop = asyncio.new_event_loop()

    def async_batch(afn):
        async def calls(n: int) -> int:
            failed = 0
            for _ in range(n):
                if not await afn():
                    failed += 1
            return failed
        return lambda n: loop.run_until_complete(calls(n))

    async def nop():
        return True

    runs = [(case.name, sync_batch(case.fn, case.ok), case.before, case.after) for case in cases]
    runs += [(f"async {name}", async_batch(afn), before, steps.drain) for name, afn, before in async_cases(steps)]
    runs.insert(len(cases), ("async empty loop", async_batch(nop), None, None))
    failures: dict[str, int] = {}
    for name, batch, before, after in runs:
        for _ in range(5):
            if before:
                before()
            batch(20)
            if after:
                after()
        steps.drain()
        in_writer(lambda: (lib.rc_zero(), lib.rc_toggle()))  # collection state is per thread
        if before:
            before()
        gc.collect()
        lib.rc_zero()
        lib.rc_toggle()
        failures[name] = batch(args.callgrind_calls)
        steps.drain()
        lib.rc_toggle()
        lib.rc_dump(name.encode())
        in_writer(lambda name=name: (lib.rc_toggle(), lib.rc_dump(name.encode())))
    loop.close()
    print(json.dumps({"cases": [name for name, *_ in runs], "failures": failures}), flush=True)


def async_cases(steps: StepLog) -> list[tuple[str, Callable[[], Any], Callable[[], None]]]:
    """One coroutine after the other (no concurrency): instructions of the async path."""
    import redis.asyncio

    from ragcache.services import cache_service

    prefix = os.environ["RAGCACHE_KEY_PREFIX"]
    client = redis.asyncio.Redis.from_url(os.environ["REDIS_URL"])

    async def raw_get():
        return await client.get(f"{prefix}:raw:get")

    async def hit():
        return await cache_service.aget_cached_response(QUESTION, model=MODEL)

    async def get_or_call():
        return (await cache_service.aget_or_call(QUESTION, _llm_on_miss, model=MODEL)).hit

    info = steps.level(logging.NOTSET)
    return [("raw redis.asyncio GET", raw_get, info), ("aget_cached_response (INFO, queued)", hit, info),
            ("aget_cached_response (step log at WARNING)", hit, steps.level(logging.WARNING)),
            ("aget_or_call hit (INFO, queued)", get_or_call, info)]


# --- summary --------------------------------------------------------------------------------

def print_summary(report: dict) -> None:
    """The issue's rows and the new ones, each with its ratio, the goal beside it (a
    printout, not a test) and the placement it was measured with."""
    rows: list[dict] = []

    def add(label: str, figure: str, ratio: str, goal: str = "", placement: dict | None = None) -> None:
        rows.append({"row": label, "figure": figure, "ratio": ratio, "goal": goal,
                     "placement": _common.Placement.text(placement or {})})

    sync = report.get("sync")
    if sync:
        by = {r["case"]: r for r in sync["rows"]}

        def r(prefix: str) -> dict:
            return next((row for name, row in by.items() if name.startswith(prefix)), {})

        lc, hit = r("LangChain RedisCache.lookup"), r("ragcache hit, shipped logging")
        for label, row in (("raw redis-py GET", r("raw redis-py GET")),
                           ("django-redis cache.get", r("django-redis cache.get")),
                           ("LangChain RedisCache.lookup", lc),
                           ("ragcache hit, shipped logging (step 63 at INFO)", hit),
                           ("ragcache hit, step log at WARNING", r("ragcache hit, step log at WARNING"))):
            if not row:
                continue
            goal = ""
            if row is hit:
                goal = _goal(hit["ratio"], 1.25) + (
                    f"; {'faster' if hit['median_us'] < lc['median_us'] else 'slower'} than LangChain" if lc else "")
            add(label, f"{row['median_us']:.1f} µs", f"{row['ratio']:.2f}x", goal, sync["placement"])
        stores = [r("raw redis-py SET EX"), r("LangChain RedisCache.update"), r("ragcache cache_response")]
        if all(stores):
            faster = "faster" if stores[2]["median_us"] < stores[1]["median_us"] else "slower"
            add("raw SET EX / LangChain update / ragcache cache_response",
                " / ".join(f"{s['median_us']:.1f}" for s in stores) + " µs",
                " / ".join(f"{s['ratio']:.2f}" for s in stores) + "x",
                f"{_goal(stores[2]['ratio'], 1.25)}; {faster} than LangChain", sync["placement"])
    if report.get("async"):
        group = report["async"]
        for row in group["rows"]:
            if row["case"].startswith("raw") or row["per_s"] is None:
                continue
            goal = "" if "WARNING" in row["case"] else _goal(row["ratio_vs_raw_get"], 0.6, at_least=True)
            add(f"async {row['case']}", f"{row['per_s']:,.0f}/s", f"{row['ratio_vs_raw_get']:.2f}x raw GET", goal,
                group["placement"])
        base = group.get("baseline_0_1")
        if base:
            add("async aget_cached_response, 0.2 / 0.1", f"{base['aget_cached_response_per_s']:,.0f}/s in 0.1",
                f"{base['ours_over_01']:.2f}x", _goal(base["ours_over_01"], 3.0, at_least=True), group["placement"])
    for pair in (report.get("http") or {}).get("pairs", []):
        demo, plain = pair["rows"]
        goal = _goal(pair["ratio"], 0.9, at_least=True)
        if not pair["every_demo_request_a_hit"]:
            misses = demo["requests"] - pair["demo_hits_counted_by_server"]
            goal = f"not judged: {misses} demo requests missed under load"
        add(f"HTTP {pair['server']}: demo / plain", f"{demo['req_per_s']:,.0f} / {plain['req_per_s']:,.0f} req/s",
            f"{pair['ratio']:.3f}x", goal, pair["placement"])
    remote = report.get("remote")
    if remote:
        for row in remote["rows"]:
            add(f"remote {row['case']}", f"{row['median_us']:.1f} µs", f"{row['ratio']:.2f}x", "",
                remote["placement"])
        add("remote: the proxy's own cost (0 ms)", f"{remote['proxy_own_cost_us']:+.1f} µs", "", "",
            remote["placement"])
    if rows:
        print("\n== Summary: issue 12's rows and the new ones, ratios from this run")
        _common.print_rows([("row", "row", ""), ("figure", "figure", ""), ("ratio", "ratio", ""),
                            ("goal", "goal (issue 12)", ""), ("placement", "placement", "")], rows)


def _goal(value: float | None, target: float, *, at_least: bool = False) -> str:
    if value is None:
        return ""
    met = value >= target if at_least else value <= target
    return f"goal {'≥' if at_least else '≤'} {target:g}x: {'met' if met else 'missed'}"


# --- main ---------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help=f"comma-separated groups among {', '.join(ALL_GROUPS)} "
                                                   f"(default: {', '.join(DEFAULT_GROUPS)})")
    parser.add_argument("--skip", default="", help="comma-separated groups to leave out")
    for group in ("sync", "async", "http", "remote"):
        parser.add_argument(f"--{group}", action="append_const", const=group, dest="shortcuts",
                            help=f"= --only {group} (combinable)")
    parser.add_argument("--iterations", type=int, default=5000, help="sync: timed calls per case (default 5000)")
    parser.add_argument("--warmup", type=int, default=500, help="sync: untimed iterations first (default 500)")
    parser.add_argument("--seed", type=int, default=2026, help="seed of the shuffled orders")
    parser.add_argument("--bench-cpu", type=int, default=0, help="CPU of the bench and the servers under test")
    parser.add_argument("--redis-cpu", type=int, default=1, help="CPU of redis-server, the proxy and wrk")
    parser.add_argument("--no-pin", action="store_true", help="do not pin anything (placement: any)")
    parser.add_argument("--socket-timeout", type=float, default=None,
                        help="RAGCACHE_SOCKET_TIMEOUT for the run (default: the demo settings' 0.1 s; a busy "
                             "machine can exceed it, and ragcache then answers misses, counted as failures)")
    parser.add_argument("--async-concurrency", type=int, default=100)
    parser.add_argument("--async-ops", type=int, default=1000, help="async: calls per case per round")
    parser.add_argument("--async-rounds", type=int, default=20)
    parser.add_argument("--no-baseline", action="store_true", help="async: skip measuring ragcache 0.1")
    parser.add_argument("--http-connections", type=int, default=16, help="wrk connections (default 16)")
    parser.add_argument("--http-seconds", type=float, default=5.0, help="seconds per wrk round (default 5)")
    parser.add_argument("--http-rounds", type=int, default=3, help="rounds per endpoint (default 3)")
    parser.add_argument("--http-warmup", type=float, default=2.0, help="seconds of warm-up per endpoint")
    parser.add_argument("--http-threads", type=int, default=4, help="gunicorn gthread threads (default 4)")
    parser.add_argument("--http-middleware", choices=["project", "none"], default="project",
                        help="the project's MIDDLEWARE (default) or none")
    parser.add_argument("--remote-delay-ms", type=float, default=0.25, help="proxy hold, each way (default 0.25)")
    parser.add_argument("--remote-iterations", type=int, default=2000)
    parser.add_argument("--profile-calls", type=int, default=20000, help="profile: hits profiled")
    parser.add_argument("--callgrind-calls", type=int, default=200, help="callgrind: calls counted per case")
    parser.add_argument("--json", default=str(_common.RESULTS / "hotpath.json"), help="where to write the results")
    for hidden in ("--remote-worker", "--callgrind-worker"):
        parser.add_argument(hidden, action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--direct-url", "--proxy0-url", "--prefix", "--helper"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    only = [g.strip() for g in args.only.split(",") if g.strip()] + (args.shortcuts or [])
    skip = {g.strip() for g in args.skip.split(",") if g.strip()}
    unknown = (set(only) | skip) - set(ALL_GROUPS)
    if unknown:
        parser.error(f"unknown groups {sorted(unknown)}; known: {', '.join(ALL_GROUPS)}")
    args.groups = [g for g in ALL_GROUPS if g in (only or DEFAULT_GROUPS) and g not in skip]
    if args.no_pin:
        args.bench_cpu = args.redis_cpu = None
    elif (os.cpu_count() or 1) < 2:
        print("one CPU only: nothing is pinned")
        args.bench_cpu = args.redis_cpu = None
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    if args.remote_worker:
        remote_worker(args)
        return
    if args.callgrind_worker:
        callgrind_worker(args)
        return
    _common.pin_self(args.bench_cpu)
    if args.socket_timeout is not None:
        os.environ["RAGCACHE_SOCKET_TIMEOUT"] = str(args.socket_timeout)
    redis_server = _common.RedisServer(args.redis_cpu)
    report: dict = {"machine": _common.machine_facts(), "git": _common.git_head(), "groups": args.groups,
                    "args": {k: v for k, v in vars(args).items() if not k.startswith(("direct", "proxy0", "helper"))}}
    print(f"ragcache bench {report['machine']['date']}: groups {', '.join(args.groups)}; code {report['git']}; "
          f"load average {_common.fmt_load(report['machine']['load_average'])}; {report['machine'].get('cpu', '?')}, "
          f"{report['machine']['cpus']} CPUs; Python {report['machine']['python']}, redis-py "
          f"{report['machine']['redis_py']} ({report['machine']['parser']}), private redis-server "
          f"{redis_server.version} on port {redis_server.port}; ragcache/django-redis socket timeout "
          f"{os.environ.get('RAGCACHE_SOCKET_TIMEOUT', '0.1')} s", flush=True)
    try:
        prefix = _common.prepare_env(redis_server.url)
        _common.setup_django(migrate=True)
        _common.configure_shipped_logging()
        ctx = Ctx(args, redis_server, prefix)
        runners = {"sync": run_sync, "async": run_async, "remote": run_remote, "http": _run_http,
                   "profile": run_profile, "callgrind": run_callgrind}
        for group in args.groups:
            report[group] = runners[group](ctx)
            sys.stdout.flush()
    finally:
        redis_server.stop()
    report["machine"]["load_average_after"] = _common.load_average()
    print_summary(report)
    _common.write_json(Path(args.json), report)
    print(f"\nload average {_common.fmt_load(report['machine']['load_average'])} at the start, "
          f"{_common.fmt_load(report['machine']['load_average_after'])} at the end; JSON: {args.json}")


def _run_http(ctx: Ctx) -> dict:
    from bench import http_bench

    return http_bench.run_group(ctx, ctx.args)


if __name__ == "__main__":
    main()
