#!/usr/bin/env python
"""Async throughput: N concurrent coroutines on one event loop, raw ``redis.asyncio`` GET /
SET EX against ``aget_cached_response``, ``aget_or_call`` (hits) and ``acache_response``.

Run by ``bench/hotpath.py`` (group ``async``) as a subprocess, once on this tree and once
on ragcache 0.1 (``--root`` pointing at ``git archive 57fed38``), with the same private
redis-server, the same CPU and the same parameters, so "what 0.1 gives" is measured
rather than quoted. It prints one JSON line. It can run alone for a quick look:

    python bench/async_hits.py --redis-url redis://127.0.0.1:PORT/0   # a private server

Method: every case runs ``--ops`` calls per round, spread over ``--concurrency``
coroutines (each does ops/concurrency calls back to back); rounds repeat in a shuffled
order of the cases; throughput = the median over the rounds of calls / seconds (and,
beside it, all calls / all seconds). A round in which any call missed is left out (and
counted): a miss is cheaper than a hit. A round ends
when its calls are done *and* the step-log writer thread has written their lines, so a
case pays for its own log lines and no other case does. Before timing, the Redis
round trips of 200 calls of each ragcache case are counted (sync and asyncio
connections separately) and must be one per call for hits.

Imports nothing from the ``bench`` package but ``_common`` (stdlib only), so that it runs
unchanged against another tree's ``ragcache``.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import MODEL, QUESTION, STORE_QUESTION, make_answer  # noqa: E402

CASES = ("raw redis.asyncio GET", "aget_cached_response (hit)", "aget_cached_response (hit, step log at WARNING)",
         "aget_or_call (hit)", "raw redis.asyncio SET EX", "acache_response")
WARNING_CASES = {"aget_cached_response (hit, step log at WARNING)"}



def _never_called():
    """The "LLM" of the hit cases: only called on a miss, which counts as a failure (e.g.
    a socket timeout opened the breaker); it returns the same answer, so storing it again
    changes nothing."""
    return make_answer()


class Trips:
    """Counts redis-py packet writes (one per command or pipeline: one round trip), sync
    and asyncio, while active."""

    def __init__(self) -> None:
        import redis.asyncio.connection
        import redis.connection

        self.sync = 0
        self.asyncio = 0
        self._sync_cls = redis.connection.AbstractConnection
        self._async_cls = redis.asyncio.connection.AbstractConnection
        self._originals = (self._sync_cls.send_packed_command, self._async_cls.send_packed_command)

    def __enter__(self) -> Trips:
        original_sync, original_async = self._originals
        counter = self

        def counting(conn, command, check_health=True):
            counter.sync += 1
            return original_sync(conn, command, check_health)

        async def counting_async(conn, command, check_health=True):
            counter.asyncio += 1
            return await original_async(conn, command, check_health)

        self._sync_cls.send_packed_command = counting
        self._async_cls.send_packed_command = counting_async
        return self

    def __exit__(self, *exc) -> None:
        self._sync_cls.send_packed_command, self._async_cls.send_packed_command = self._originals


def flush_step_log() -> None:
    """Wait until queued step lines are written (ragcache 0.2's writer thread; 0.1 wrote
    them inline, so there is nothing to wait for)."""
    try:
        from ragcache import steplog
    except ImportError:
        return
    flush = getattr(steplog, "flush", None)
    if flush is not None:
        flush(10.0)


def _steps_level(name: str) -> None:
    """The step log at WARNING for the cases that say so, the shipped INFO otherwise (set
    between rounds, untimed)."""
    import logging

    logger = logging.getLogger("ragcache.steps")
    level = logging.WARNING if name in WARNING_CASES else logging.NOTSET
    if logger.level != level:
        logger.setLevel(level)


async def _round(fn, ok, concurrency: int, ops: int) -> tuple[float, int, int]:
    per = max(1, ops // concurrency)

    async def worker() -> int:
        bad = 0
        for _ in range(per):
            if not ok(await fn()):
                bad += 1
        return bad

    started = time.perf_counter()
    bad = sum(await asyncio.gather(*(worker() for _ in range(concurrency))))
    flush_step_log()
    return time.perf_counter() - started, per * concurrency, bad


def seed() -> None:
    """Store the answer the hits read (sync: the policy snapshot loads from the ORM)."""
    from ragcache.services import cache_service

    if not cache_service.cache_response(QUESTION, make_answer(), model=MODEL, latency_ms=850.0):
        raise SystemExit("ragcache refused to store the bench answer")
    if cache_service.get_cached_response(QUESTION, model=MODEL) is None:
        raise SystemExit("ragcache stored the bench answer but does not hit it")


async def measure(args) -> dict:
    import redis.asyncio

    from ragcache.services import cache_service

    answer = make_answer()
    body = json.dumps(answer).encode()
    prefix = os.environ["RAGCACHE_KEY_PREFIX"]
    raw_key, raw_set_key = f"{prefix}:araw:get", f"{prefix}:araw:set"
    client = redis.asyncio.Redis.from_url(args.redis_url)
    await client.set(raw_key, body, ex=3600)

    async def raw_get():
        return await client.get(raw_key)

    async def raw_set():
        return await client.set(raw_set_key, body, ex=3600)

    async def hit():
        return await cache_service.aget_cached_response(QUESTION, model=MODEL)

    async def get_or_call():
        return (await cache_service.aget_or_call(QUESTION, _never_called, model=MODEL)).hit

    async def store():
        return await cache_service.acache_response(STORE_QUESTION, answer, model=MODEL, latency_ms=850.0)

    fns = dict(zip(CASES, (raw_get, hit, hit, get_or_call, raw_set, store), strict=True))
    wanted = [name for name in CASES if name in args.cases]
    if await hit() is None:
        raise SystemExit("aget_cached_response does not hit the stored answer")

    trips = {}
    for name in wanted:
        if name.startswith("raw"):
            continue
        _steps_level(name)
        for _attempt in range(3):  # a socket timeout (busy machine) makes misses: count again
            await fns[name]()
            with Trips() as counter:
                results = [await fns[name]() for _ in range(200)]
            if all(results):
                break
            await asyncio.sleep(1.5)  # past the breaker's cooldown
        trips[name] = {"sync": counter.sync / 200, "asyncio": counter.asyncio / 200, "all_hits": all(results)}

    for name in wanted:  # warm-up: opens the pools' connections at this concurrency
        _steps_level(name)
        for concurrency in (10, args.concurrency):
            await _round(fns[name], bool, concurrency, args.concurrency * 5)
    rounds: dict[str, list[tuple[float, int, int]]] = {name: [] for name in wanted}
    rng = random.Random(args.seed)
    order = list(wanted)
    for _ in range(args.rounds):
        rng.shuffle(order)
        for name in order:
            _steps_level(name)
            rounds[name].append(await _round(fns[name], bool, args.concurrency, args.ops))
    await client.aclose()
    rows = []
    for name in wanted:
        # Rounds where a call missed are left out: a miss (e.g. the 0.1 s socket timeout
        # fired and the breaker skipped Redis) is faster than a hit and would flatter the
        # figure. Of the clean rounds, the median: a burst of other load on a shared
        # machine spoils a round or two, not the figure.
        clean = [r for r in rounds[name] if not r[2]]
        seconds = sum(r[0] for r in clean)
        calls = sum(r[1] for r in clean)
        rows.append({"case": name, "calls": calls, "seconds": round(seconds, 3),
                     "per_s": round(statistics.median(r[1] / r[0] for r in clean), 1) if clean else None,
                     "per_s_overall": round(calls / seconds, 1) if clean else None,
                     "failures": sum(r[2] for r in rounds[name]), "rounds_left_out": len(rounds[name]) - len(clean),
                     "round_trips": trips.get(name)})
    return {"rows": rows, "answer_bytes": len(body)}


def _setup(args) -> None:
    root = Path(args.root).resolve()
    sys.path.insert(0, str(root))
    os.chdir(root)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0, interactive=False)
    import logging.config

    import _common  # bench/_common.py, found through this script's directory
    from django.conf import settings

    logging.config.dictConfig(_common.shipped_logging(settings.LOGGING))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=str(Path(__file__).resolve().parent.parent),
                        help="the tree whose ragcache and project settings to use (default: this one)")
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL"), required=not os.environ.get("REDIS_URL"))
    parser.add_argument("--concurrency", type=int, default=100, help="coroutines on the loop (default 100)")
    parser.add_argument("--ops", type=int, default=1000, help="calls per case per round (default 1000)")
    parser.add_argument("--rounds", type=int, default=20, help="rounds (default 20)")
    parser.add_argument("--cases", default="|".join(CASES), help="case names separated by |")
    parser.add_argument("--seed", type=int, default=12)
    args = parser.parse_args(argv)
    args.cases = [c.strip() for c in args.cases.split("|") if c.strip()]
    unknown = set(args.cases) - set(CASES)
    if unknown:
        parser.error(f"unknown cases {sorted(unknown)}; known: {CASES}")
    os.environ["REDIS_URL"] = args.redis_url
    _setup(args)
    seed()
    result = asyncio.run(measure(args))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
