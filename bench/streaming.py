#!/usr/bin/env python
"""Streaming measurements: time to first chunk (TTFC) and fan-out. Prints numbers; asserts nothing.

    python bench/streaming.py                      # 40 rounds, fake upstream first chunk after 50 ms
    python bench/streaming.py --rounds 100 --first-ms 0

The project's ASGI app runs under uvicorn in this process (tests/upstream.py) and serves the
fake OpenAI upstream (project/demo/fake_upstream.py); the real ``openai`` SDK reads it over a
loopback socket. Each round measures, back to back, with the same SDK client:

- upstream: the SDK straight to the fake (its own TTFC);
- miss: the same through ``cached(client)`` for a question never asked (lookup, lock, call,
  record, publish);
- hit: the same question again through ``cached(client)`` (a replay from Redis).

TTFC is from ``create(...)`` to the first ``ChatCompletionChunk`` in hand. The figure to read
is the paired difference miss - upstream (same round). Fan-out: N identical streams started
together (threads with the sync SDK, then tasks with the async SDK) against a slow upstream;
the fake counts the calls it received. Keys live under a unique prefix, removed at the end.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _common  # noqa: E402

POLICY = "bench-stream"


def _ms(values: list[float]) -> str:
    ordered = sorted(values)
    p90 = _common.percentile(ordered, 0.9)
    return (f"median {statistics.median(ordered) * 1000:8.3f} ms   p90 {p90 * 1000:8.3f} ms"
            f"   min {ordered[0] * 1000:8.3f} ms")


def ttfc(create, **kwargs) -> float:
    started = time.perf_counter()
    stream = create(**kwargs)
    with stream:
        next(iter(stream))
        took = time.perf_counter() - started
        for _chunk in stream:
            pass
    return took


def measure_ttfc(fake, rounds: int, first_ms: int) -> dict:
    from ragcache.integrations.openai import cached

    raw = fake.client()
    wrapped = cached(raw, policy=POLICY)
    model = f"demo-llm@first={first_ms},delay=0"
    samples: dict[str, list[float]] = {"upstream": [], "miss": [], "hit": []}
    for index in range(rounds + 3):
        asked = [{"role": "user", "content": f"bench question {index} {uuid.uuid4().hex}"}]
        fresh = [{"role": "user", "content": f"bench upstream {index} {uuid.uuid4().hex}"}]
        upstream = ttfc(raw.chat.completions.create, model=model, messages=fresh, stream=True)
        miss = ttfc(wrapped.chat.completions.create, model=model, messages=asked, stream=True)
        hit = ttfc(wrapped.chat.completions.create, model=model, messages=asked, stream=True)
        if index >= 3:  # warm-up rounds: connections, scripts loaded, policy snapshot
            samples["upstream"].append(upstream)
            samples["miss"].append(miss)
            samples["hit"].append(hit)
    samples["miss - upstream (paired)"] = [m - u for m, u in zip(samples["miss"], samples["upstream"], strict=True)]
    return samples


def measure_overhead(fake, rounds: int) -> dict:
    """ragcache's own share of a miss's TTFC, without the network: get_or_stream over chunks
    already in memory (the SDK's ChatCompletionChunk objects of a real stream), against
    taking the first of them directly."""
    from ragcache.services import cache_service

    recorded = list(fake.client().chat.completions.create(
        model="demo-llm", messages=[{"role": "user", "content": "overhead"}], stream=True,
        stream_options={"include_usage": True}))
    samples: dict[str, list[float]] = {"direct": [], "miss (core)": [], "hit (core)": []}
    for index in range(rounds + 3):
        messages = [{"role": "user", "content": f"overhead {index} {uuid.uuid4().hex}"}]
        started = time.perf_counter()
        next(iter(list(recorded)))
        direct = time.perf_counter() - started
        found = []
        for _ in range(2):
            started = time.perf_counter()
            stream = cache_service.get_or_stream(messages, lambda: iter(list(recorded)), model="demo-llm",
                                                 policy=POLICY)
            next(stream)
            found.append(time.perf_counter() - started)
            for _chunk in stream:
                pass
        if index >= 3:
            samples["direct"].append(direct)
            samples["miss (core)"].append(found[0])
            samples["hit (core)"].append(found[1])
    return samples


def fan_out_threads(fake, streams: int) -> dict:
    from project.demo import fake_upstream
    from ragcache.integrations.openai import cached

    client = cached(fake.client(), policy=POLICY)
    model = "demo-llm@first=300,delay=20"
    messages = [{"role": "user", "content": f"fan-out {uuid.uuid4().hex}"}]
    barrier = threading.Barrier(streams)
    out: list = [None] * streams

    def run(index: int) -> None:
        barrier.wait()
        started = time.perf_counter()
        stream = client.chat.completions.create(model=model, messages=messages, stream=True)
        first = None
        count = 0
        for _chunk in stream:
            first = first if first is not None else time.perf_counter() - started
            count += 1
        out[index] = (stream.outcome, first, time.perf_counter() - started, count)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(streams)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"calls": fake_upstream.call_count(messages), "results": out}


def fan_out_async(fake, streams: int) -> dict:
    from project.demo import fake_upstream
    from ragcache.integrations.openai import cached

    model = "demo-llm@first=300,delay=20"
    messages = [{"role": "user", "content": f"async fan-out {uuid.uuid4().hex}"}]

    async def main():
        client = cached(fake.async_client(), policy=POLICY)

        async def one():
            started = time.perf_counter()
            stream = await client.chat.completions.create(model=model, messages=messages, stream=True)
            first, count = None, 0
            async for _chunk in stream:
                first = first if first is not None else time.perf_counter() - started
                count += 1
            return stream.outcome, first, time.perf_counter() - started, count

        found = await asyncio.gather(*(one() for _ in range(streams)))
        await client.close()
        return found

    from asgiref.sync import async_to_sync

    found = async_to_sync(main)()
    return {"calls": fake_upstream.call_count(messages), "results": found}


def print_fan_out(title: str, found: dict, streams: int) -> None:
    results = found["results"]
    outcomes = {o: sum(1 for r in results if r[0] == o) for o in sorted({r[0] for r in results})}
    leader_end = max((r[2] for r in results if r[0] == "miss"), default=float("nan"))
    followers_first = [r[1] for r in results if r[0] == "shared"]
    print(f"\n{title}: {streams} identical streams -> {found['calls']} upstream call(s); outcomes {outcomes}")
    if followers_first:
        print(f"  followers' first chunk: median {statistics.median(followers_first) * 1000:.1f} ms, "
              f"max {max(followers_first) * 1000:.1f} ms; leader's stream ended at {leader_end * 1000:.1f} ms; "
              f"chunks each: {sorted({r[3] for r in results})}")


class UpstreamProcess:
    """The fake upstream in a uvicorn process of its own (``--separate``): the client's
    work then never competes with the server's for this process's GIL."""

    def __init__(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "DEMO_LLM_FIRST_CHUNK_MS": "0", "DEMO_LLM_CHUNK_DELAY_MS": "0"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "project.asgi:application", "--host", "127.0.0.1", "--port",
             str(self.port), "--log-level", "warning", "--no-access-log"], cwd=_common.ROOT, env=env)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError("the upstream process did not start") from None
                time.sleep(0.05)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--first-ms", type=int, default=50, help="the fake upstream's own time to first chunk")
    parser.add_argument("--streams", type=int, default=10, help="identical concurrent streams for the fan-out")
    parser.add_argument("--separate", action="store_true",
                        help="TTFC against the fake in a uvicorn process of its own (default: in this process)")
    args = parser.parse_args()

    prefix = _common.prepare_env()
    _common.setup_django(migrate=True)
    logging.disable(logging.INFO)  # the step lines of every hit and store would drown the figures
    from django.conf import settings

    from ragcache.models import CachePolicy
    from ragcache.policies import registry
    from tests.upstream import FakeLLM, LiveASGIServer

    settings.DEMO_LLM_FIRST_CHUNK_MS = 0
    settings.DEMO_LLM_CHUNK_DELAY_MS = 0
    CachePolicy.objects.update_or_create(name=POLICY, defaults={"mode": "on", "enabled": True, "scope": "global",
                                                                "ttl_seconds": 600, "rollout_percent": 100})
    registry.invalidate()
    registry.reload()
    print("machine:", _common.machine_facts())
    try:
        with LiveASGIServer() as server:
            fake = FakeLLM(server)
            where = "in this process"
            target = fake
            if args.separate:
                upstream = UpstreamProcess()
                target, where = FakeLLM(upstream), "in a process of its own"
            try:
                print(f"\nTime to first chunk, {args.rounds} rounds, upstream first chunk after {args.first_ms} ms "
                      f"(openai SDK, loopback, the fake upstream under uvicorn {where})")
                for name, values in measure_ttfc(target, args.rounds, args.first_ms).items():
                    print(f"  {name:26s} {_ms(values)}")
            finally:
                if args.separate:
                    upstream.stop()
            print(f"\nragcache's own time to first chunk, {args.rounds} rounds, chunks already in memory "
                  "(no network; Redis round trips included)")
            for name, values in measure_overhead(fake, args.rounds).items():
                print(f"  {name:26s} {_ms(values)}")
            print_fan_out("Fan-out (threads, sync SDK)", fan_out_threads(fake, args.streams), args.streams)
            print_fan_out("Fan-out (asyncio, async SDK)", fan_out_async(fake, args.streams), args.streams)
    finally:
        print(f"\ncleanup: {_common.cleanup(prefix)} keys removed")


if __name__ == "__main__":
    main()
