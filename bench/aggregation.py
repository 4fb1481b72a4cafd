#!/usr/bin/env python
"""Aggregation throughput: enqueue N usage events, time ``ragcache.aggregation.aggregate()``.

    createdb -h 127.0.0.1 -U postgres ragcache_bench        # once; migrated by this script
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/ragcache_bench make bench-aggregate
    python bench/aggregation.py --events 50000 --profile    # cProfile of the run

Events are written with pipelined XADD in the exact field format the scripts use (r, h, w,
x, and the entry's metadata in 'e' for hits and stores) to the shard streams their keys
belong to, under a unique key prefix. Rows the run adds (policies "bench-*") are deleted at the end, and so are its
Redis keys. Without DATABASE_URL a bench-only SQLite file is used; the target
(>= 25,000 events/s) is for PostgreSQL. See docs/performance.md.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _common  # noqa: E402

POLICIES = ("bench-default", "bench-support", "bench-docs")
# Priced models get their cost from ModelPrice when the entry has none; one model is unpriced.
MODELS = ("bench-gpt-small", "bench-gpt-large", "bench-claude", "bench-unpriced")
PRICES = {"bench-gpt-small": ("0.000150", "0.000600"), "bench-gpt-large": ("0.002500", "0.010000"),
          "bench-claude": ("0.003000", "0.015000")}
# Share of each result in a realistic mix: mostly lookups, hits dominating.
MIX = (("hit", 55), ("miss", 25), ("store", 12), ("shadow_hit", 2), ("bypass", 4), ("refused", 2))


def _meta(rng: random.Random, model: str, now: float) -> bytes:
    from ragcache.entries import KIND_RESPONSE, Usage, make_meta

    pt, ct = rng.randint(20, 800), rng.randint(50, 1200)
    cost = None if rng.random() < 0.7 else Decimal(f"{(pt * 0.0025 + ct * 0.01) / 1000:.6f}")
    return make_meta(kind=KIND_RESPONSE, model=model, finish_reason="stop", usage=Usage(pt, 0, ct, True), cost=cost,
                     latency_ms=round(rng.uniform(200, 4000), 3), created=now - 60, expires=now + 86400,
                     size=rng.randint(300, 4000))


def make_events(count: int, seed: int = 63) -> list[tuple[str, dict]]:
    """(shard key, event fields) as the Lua scripts write them."""
    from ragcache.usage import event_header

    rng = random.Random(seed)
    results = [name for name, weight in MIX for _ in range(weight)]
    now = time.time()
    events = []
    for _ in range(count):
        result = rng.choice(results)
        model = rng.choice(MODELS)
        key = f"{rng.getrandbits(64):016x}"
        scope = "global" if rng.random() < 0.8 else f"{rng.getrandbits(96):024x}"
        fields = {"r": result, "h": event_header(rng.choice(POLICIES), model, scope, key)}
        if result in ("hit", "shadow_hit"):
            fields["w"] = str(rng.randint(80, 900))
            fields["e"] = _meta(rng, model, now)
        elif result == "store":
            fields["e"] = _meta(rng, model, now)
        elif result == "bypass":
            fields["x"] = rng.choice(("rollout", "mode_off"))
        elif result == "refused":
            fields["x"] = rng.choice(("truncated", "empty", "too_large"))
        events.append((key, fields))
    return events


def enqueue(events: list[tuple[str, dict]], chunk: int = 5000) -> float:
    import redis

    from ragcache import store
    from ragcache.keys import SHARDS

    client = redis.Redis.from_url(_common.REDIS_URL)
    streams = store.current_layout().streams
    started = time.perf_counter()
    try:
        for offset in range(0, len(events), chunk):
            pipe = client.pipeline(transaction=False)
            for key, fields in events[offset:offset + chunk]:
                pipe.xadd(streams[int(key[8:16], 16) % SHARDS], fields)
            pipe.execute()
    finally:
        client.close()
    return time.perf_counter() - started


def _database_label() -> str:
    from django.db import connection

    settings = connection.settings_dict
    return f"{connection.vendor} {settings.get('NAME')}"


def _clean_rows(created_prices: list[str]) -> None:
    from ragcache.models import ModelPrice, UsageRecord, UsageRollup

    UsageRecord.objects.filter(policy__startswith="bench-").delete()
    UsageRollup.objects.filter(policy__startswith="bench-").delete()
    ModelPrice.objects.filter(model__in=created_prices).delete()


def run(args, prefix: str) -> dict:
    from ragcache.aggregation import aggregate
    from ragcache.models import ModelPrice, UsageRecord, UsageRollup

    _clean_rows([])
    created_prices = []
    for model, (inp, out) in PRICES.items():
        _, created = ModelPrice.objects.get_or_create(
            model=model, defaults={"input_per_1k": Decimal(inp), "output_per_1k": Decimal(out)})
        if created:
            created_prices.append(model)
    try:
        events = make_events(args.events)
        enqueue_s = enqueue(events)
        print(f"enqueued {len(events):,} events in {enqueue_s:.2f} s "
              f"({len(events) / enqueue_s:,.0f}/s, pipelined XADD)")
        profiler = None
        if args.profile:
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
        started, cpu_started = time.perf_counter(), time.process_time()
        result = aggregate()
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        if profiler is not None:
            import pstats

            profiler.disable()
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(30)
        records = UsageRecord.objects.filter(policy__startswith="bench-").count()
        hour_lookups = sum(UsageRollup.objects.filter(policy__startswith="bench-", granularity="hour")
                           .values_list("lookups", flat=True))
        expected_lookups = sum(1 for _, e in events if e["r"] in ("hit", "miss", "shadow_hit"))
        ok = result.ingested == len(events) and records == len(events) and hour_lookups == expected_lookups
        rate = result.ingested / seconds if seconds else 0.0
        print(f"aggregate(): {result.ingested:,} events in {seconds:.2f} s = {rate:,.0f} events/s "
              f"(this process's CPU {cpu:.2f} s) "
              f"(target >= 25,000) on {_database_label()}; batch {args.batch or 'default'}; "
              f"rows check {'ok' if ok else 'FAILED'} (records {records:,}, hourly lookups {hour_lookups:,} "
              f"of {expected_lookups:,}); status {result.status}, malformed {result.malformed}, "
              f"duplicates {result.duplicates}, backlog {result.backlog}")
        return {"events": len(events), "enqueue_seconds": round(enqueue_s, 3), "aggregate_seconds": round(seconds, 3),
                "aggregate_cpu_seconds": round(cpu, 3),
                "events_per_second": round(rate), "database": _database_label(), "batch": args.batch,
                "ingested": result.ingested, "rows_check": ok}
    finally:
        _clean_rows(created_prices)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200_000, help="usage events to enqueue (default 200000)")
    parser.add_argument("--batch", type=int, default=None, help="RAGCACHE['AGGREGATE_BATCH'] for this run")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of aggregate()")
    parser.add_argument("--json", default=str(_common.RESULTS / "aggregation.json"), help="where to write results")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.batch:
        os.environ["RAGCACHE_AGGREGATE_BATCH"] = str(args.batch)
    prefix = _common.prepare_env()
    _common.setup_django(migrate=True)
    if args.batch:
        from django.conf import settings

        settings.RAGCACHE = {**settings.RAGCACHE, "AGGREGATE_BATCH": args.batch}
        from ragcache.conf import get_config

        get_config.cache_clear()
    report = {"machine": _common.machine_facts(), "prefix": prefix, "args": vars(args)}
    try:
        report["aggregation"] = run(args, prefix)
    finally:
        removed = _common.cleanup(prefix)
        print(f"cleanup: removed {removed} keys under {prefix}:*")
    report["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    _common.write_json(Path(args.json), report)
    print(f"load average before {report['machine']['load_average']}, after {report['machine']['load_average_after']}; "
          f"JSON: {args.json}")


if __name__ == "__main__":
    main()
