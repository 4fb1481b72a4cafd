#!/usr/bin/env python
"""Source invalidation costs (docs/invalidation.md), ratios from one run:

    .venv/bin/python bench/sources.py                  # ~1-2 minutes
    .venv/bin/python bench/sources.py --answers 10000  # a quicker invalidation part

1. A hit with 0 and with 5 sources (``get_or_call``; the 5 stamps are checked inside the
   lookup script), interleaved: every round runs both cases once, in a shuffled order.
2. ``invalidate_sources([id])`` when 1 answer cites the source and when ``--answers``
   (100,000) do. Those answers are written first with the STORE script, pipelined. The
   two cases alternate; before each timed call the shard stamps it deletes are put back
   (untimed), so every call deletes what a real first invalidation would.
3. ``MEMORY USAGE`` of one stamp key, and how many stamp keys a source has.

A private redis-server (no persistence, free loopback port) runs pinned to ``--redis-cpu``
and this script to ``--bench-cpu`` (taskset / sched_setaffinity); the placement read back
from the kernel and the load average are printed with the figures. Nothing touches the
shared Redis on 6379. ``--no-pin`` leaves both free.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = "gpt-4o-mini"
FIVE = [f"kb:article:{i}" for i in range(5)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_redis(cpu: int | None) -> tuple[subprocess.Popen, int, str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed")
    port, directory = free_port(), tempfile.mkdtemp(prefix="ragcache-bench-sources-")
    pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
    process = subprocess.Popen([*pin, binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no", "--dir", directory, "--logfile", "redis.log"],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return process, port, directory
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                raise SystemExit("the private redis-server did not start") from None
            time.sleep(0.05)


def cpus(pid: int = 0) -> str:
    try:
        found = sorted(os.sched_getaffinity(pid))
    except OSError:
        return "?"
    return "any" if len(found) == os.cpu_count() else ",".join(map(str, found))


def setup_django(port: int, directory: str) -> str:
    sys.path.insert(0, str(ROOT))
    prefix = f"ragbench-sources-{uuid.uuid4().hex[:8]}"
    os.environ.update({
        "DJANGO_SETTINGS_MODULE": "project.settings", "DEBUG": "0", "RAGCACHE_KEY_PREFIX": prefix,
        "REDIS_URL": f"redis://127.0.0.1:{port}/0", "DATABASE_URL": f"sqlite:///{directory}/bench.sqlite3",
        "RAGCACHE_SOCKET_TIMEOUT": "5", "RAGCACHE_CONNECT_TIMEOUT": "5", "RAGCACHE_LOG_LEVEL": "WARNING",
    })
    os.environ.pop("REDIS_CLUSTER_URL", None)
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0, interactive=False)
    from ragcache.models import CachePolicy
    from ragcache.policies import registry

    CachePolicy.objects.filter(name="default").update(enabled=True, mode="on", scope="global", ttl_seconds=86400,
                                                      rollout_percent=100)
    registry.invalidate()
    return prefix


def answer(text: str) -> dict:
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 40, "completion_tokens": 300}}


def stats(samples: list[int]) -> dict:
    ordered = sorted(samples)
    return {"median_us": statistics.median(ordered) / 1000, "p90_us": ordered[int(len(ordered) * 0.9)] / 1000,
            "p99_us": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] / 1000}


# --- 1. hits ------------------------------------------------------------------------------------

def bench_hits(rounds: int) -> dict:
    import redis

    from ragcache.services import cache_service

    body = "A stored answer of about two kilobytes. " * 50
    cases = {"0 sources": [], "5 sources": []}
    for name in cases:
        sources = FIVE if name == "5 sources" else None
        assert cache_service.cache_response(f"hit question, {name}", answer(body), model=MODEL, sources=sources)

    def ask(name: str) -> bool:
        sources = FIVE if name == "5 sources" else None
        return cache_service.get_or_call(f"hit question, {name}", lambda: answer(body), model=MODEL,
                                         sources=sources).hit

    raw = redis.Redis.from_url(os.environ["REDIS_URL"])
    raw.set("ragbench-raw", body.encode())
    cases["raw GET (floor)"] = []
    order = list(cases)
    for _ in range(200):  # warm-up
        for name in order[:2]:
            assert ask(name)
        raw.get("ragbench-raw")
    misses = 0
    for _ in range(rounds):
        random.shuffle(order)
        for name in order:
            started = time.perf_counter_ns()
            if name == "raw GET (floor)":
                raw.get("ragbench-raw")
                hit = True
            else:
                hit = ask(name)
            cases[name].append(time.perf_counter_ns() - started)
            misses += not hit
    raw.delete("ragbench-raw")
    raw.close()
    result = {name: stats(samples) for name, samples in cases.items()}
    result["misses"] = misses
    return result


# --- 2. invalidation ---------------------------------------------------------------------------------

def store_citing(source: str, count: int, batch: int = 2000) -> float:
    """Store ``count`` answers citing ``source`` with the STORE script, pipelined, as
    flows.store would (same keys, value, stamps). Returns seconds taken."""
    import redis

    from ragcache import plans
    from ragcache.entries import KIND_RESPONSE, encode, extract
    from ragcache.policies import registry
    from ragcache.scripts import STORE

    snapshot = registry.current()
    tuning = plans.tuning()
    client = redis.Redis.from_url(os.environ["REDIS_URL"])
    client.script_load(STORE.source)
    found = extract(answer("An answer citing the popular source."))
    started = time.perf_counter()
    pipe = client.pipeline(transaction=False)
    for i in range(count):
        request = plans.make_request(f"question {i} citing {source}", model=MODEL, policy="default", scope=None,
                                     params=None, context_version=None, sources=[source])
        plan = plans.plan(request, snapshot)
        key = plan.key
        meta, body = encode(found.body, kind=KIND_RESPONSE, model=MODEL, finish_reason="stop", usage=found.usage,
                            cost=None, latency_ms=900.0, ttl_seconds=86400, compress_threshold=10**9,
                            max_bytes=10**6)
        pipe.evalsha(STORE.sha, 5, key.entry, tuning.layout.streams[key.shard], tuning.layout.versions[key.shard],
                     key.lock, key.lock, snapshot.version, 86400 * 1000, meta, body, "0", tuning.stream_maxlen,
                     plan.header, "", f"{key.base}:s:", plan.sources, "", os.urandom(8).hex(), tuning.stamp_ttl_ms,
                     tuning.flight_ttl_ms)
        if (i + 1) % batch == 0:
            replies = pipe.execute()
            assert all(reply[0] == b"stored" for reply in replies), replies[:3]
    replies = pipe.execute()
    assert all(reply[0] == b"stored" for reply in replies)
    client.close()
    return time.perf_counter() - started


def stamp_keys(source: str) -> list[str]:
    from ragcache import plans
    from ragcache.keys import source_hash

    return [f"{base}{source_hash(source)}" for base in plans.tuning().layout.stamp_bases]


def bench_invalidation(answers: int, rounds: int) -> dict:
    import redis

    from ragcache.services import cache_service

    client = redis.Redis.from_url(os.environ["REDIS_URL"])
    memory_before = int(client.info("memory")["used_memory"])
    stored_s = store_citing("doc:popular", answers)
    memory_after = int(client.info("memory")["used_memory"])
    assert cache_service.cache_response("the only question citing doc:rare", answer("rare"), model=MODEL,
                                        sources=["doc:rare"])
    keys = {"doc:rare": stamp_keys("doc:rare"), "doc:popular": stamp_keys("doc:popular")}
    present = {source: [k for k in found if client.exists(k)] for source, found in keys.items()}
    stamp_bytes = [client.memory_usage(k, samples=0) for k in present["doc:popular"][:16]]
    values = {k: client.get(k) for found in present.values() for k in found}
    ttl_ms = client.pttl(present["doc:popular"][0])
    cases = {"1 answer cites it": ("doc:rare", [], []), f"{answers:,} answers cite it": ("doc:popular", [], [])}
    filler = [f"{key}:filler" for key in keys["doc:popular"]]
    order = list(cases)
    for _ in range(5):  # warm-up (script loaded, connections made)
        cache_service.invalidate_sources(["doc:warm-up"])
    for _ in range(rounds):
        random.shuffle(order)
        for name in order:
            source, samples, server = cases[name]
            pipe = client.pipeline(transaction=False)
            for key in present[source]:
                pipe.set(key, values[key], px=ttl_ms)
            for key in filler[: len(filler) - len(present[source])]:  # the same restore work in both cases
                pipe.set(key, b"0" * 16, px=ttl_ms)
            pipe.config_resetstat()
            pipe.execute()
            started = time.perf_counter_ns()
            cache_service.invalidate_sources([source])
            samples.append(time.perf_counter_ns() - started)
            # What the server spent running the scripts: independent of the client's scheduling.
            server.append(int(client.info("commandstats").get("cmdstat_evalsha", {}).get("usec", 0)))
    assert cache_service.get_cached_response("question 0 citing doc:popular", model=MODEL) is None
    client.close()
    result = {name: {**stats(samples), "server_us": statistics.median(server)}
              for name, (_, samples, server) in cases.items()}
    result.update({
        "stamp_keys": {source: len(found) for source, found in present.items()},
        "stamp_memory_usage_bytes": sorted(set(stamp_bytes)),
        "stamp_ttl_s": round(ttl_ms / 1000),
        "entries_stored_s": round(stored_s, 1),
        "entries_memory_mb": round((memory_after - memory_before) / 2**20, 1),
    })
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5000, help="hit rounds (each runs every case once)")
    parser.add_argument("--answers", type=int, default=100_000, help="answers citing the popular source")
    parser.add_argument("--invalidations", type=int, default=200, help="invalidation rounds")
    parser.add_argument("--redis-cpu", type=int, default=1)
    parser.add_argument("--bench-cpu", type=int, default=0)
    parser.add_argument("--no-pin", action="store_true")
    args = parser.parse_args()
    pin = not args.no_pin and (os.cpu_count() or 1) > 1
    process, port, directory = start_redis(args.redis_cpu if pin else None)
    try:
        if pin:
            os.sched_setaffinity(0, {args.bench_cpu})
        setup_django(port, directory)
        load_before = os.getloadavg()
        hits = bench_hits(args.rounds)
        invalidation = bench_invalidation(args.answers, args.invalidations)
        load_after = os.getloadavg()
        placement = f"bench@cpu{cpus()} redis-server@cpu{cpus(process.pid)}"
        print(f"ragcache bench/sources.py, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {placement}; "
              f"load {load_before[0]:.2f} -> {load_after[0]:.2f}")
        print(f"\nHits (get_or_call, interleaved, {args.rounds} rounds; misses: {hits.pop('misses')})")
        for name, row in hits.items():
            print(f"  {name:<18} median {row['median_us']:8.1f} µs   p90 {row['p90_us']:8.1f}   "
                  f"p99 {row['p99_us']:8.1f}")
        zero, five = hits["0 sources"]["median_us"], hits["5 sources"]["median_us"]
        print(f"  5 sources / 0 sources: {five / zero:.3f}x (+{five - zero:.1f} µs);"
              f"  0 sources / raw GET: {zero / hits['raw GET (floor)']['median_us']:.2f}x")
        facts = {k: invalidation.pop(k) for k in ("stamp_keys", "stamp_memory_usage_bytes", "stamp_ttl_s",
                                                  "entries_stored_s", "entries_memory_mb")}
        print(f"\ninvalidate_sources([id]) (interleaved, {args.invalidations} rounds each; "
              f"{args.answers:,} answers stored in {facts['entries_stored_s']} s, {facts['entries_memory_mb']} MB)")
        for name, row in invalidation.items():
            print(f"  {name:<26} median {row['median_us']:9.1f} µs   p90 {row['p90_us']:9.1f}   "
                  f"p99 {row['p99_us']:9.1f}   server (EVALSHA usec, median) {row['server_us']:7.1f}")
        one, many = invalidation.values()
        print(f"  {args.answers:,} answers / 1 answer: {many['median_us'] / one['median_us']:.3f}x "
              f"(server time {many['server_us'] / max(one['server_us'], 1):.3f}x)")
        print(f"\nStamp keys: {facts['stamp_keys']} (one per shard holding an answer citing the source, at most 256);"
              f" MEMORY USAGE of one: {facts['stamp_memory_usage_bytes']} bytes; TTL {facts['stamp_ttl_s']} s")
    finally:
        process.terminate()
        process.wait(10)
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
