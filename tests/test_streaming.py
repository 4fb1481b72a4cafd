"""The streaming core (cache_service.get_or_stream / aget_or_stream) end to end: the real
``openai`` SDK (and a raw SSE client) against the fake OpenAI upstream on a real socket,
the real Redis, the real database.

Faithful replay chunk by chunk; nothing stored for every failure mode; identical concurrent
streams make one upstream call and followers receive chunks live; failover when the leader
fails; the accounting of stream hits; sync and async."""
from __future__ import annotations

import asyncio
import threading
import time
import tracemalloc
import uuid
from decimal import Decimal

import httpx
import httpx_sse
import openai
import orjson
import pytest
from asgiref.sync import async_to_sync

from ragcache import keys, outcomes, plans
from ragcache.aggregation import aggregate
from ragcache.entries import StreamRecorder
from ragcache.exceptions import StreamInterrupted
from ragcache.models import ModelPrice, UsageRecord
from ragcache.plans import make_request
from ragcache.policies import registry
from ragcache.services import cache_service

from .gateway_helpers import wait_for

MODEL = "demo-llm"


@pytest.fixture
def policy(policy_factory):
    made = policy_factory("default", mode="on", enabled=True, scope="global", ttl_seconds=3600, rollout_percent=100,
                          max_entry_bytes=256 * 1024, replay_chunk_delay_ms=0)
    registry.reload()  # threads below never need the database
    return made


@pytest.fixture(autouse=True)
def fresh_hit_rates():
    outcomes.hit_rates._windows.clear()


def question(label: str) -> list[dict]:
    return [{"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": f"{label} ({uuid.uuid4().hex[:12]})"}]


def as_json(chunk) -> dict:
    """A chunk as JSON: SDK objects as the SDK read them, replayed chunks as they are."""
    return chunk if isinstance(chunk, dict) else chunk.model_dump(mode="json", exclude_unset=True)


def dumps(chunks) -> list[bytes]:
    return [orjson.dumps(as_json(c)) for c in chunks]


def sdk_stream(client, messages, model=MODEL, **params):
    return lambda: client.chat.completions.create(model=model, messages=messages, stream=True, **params)


def results(redis_client, prefix) -> list[tuple[str, str]]:
    """Every usage event (result, reason) of every shard, in time order."""
    pipe = redis_client.pipeline(transaction=False)
    for stream in keys.layout(prefix).streams:
        pipe.xrange(stream)
    events = [event for found in pipe.execute() for event in found]
    events.sort(key=lambda e: tuple(int(part) for part in e[0].split(b"-")))
    return [(f[b"r"].decode(), f.get(b"x", b"").decode()) for _id, f in events]


def lock_of(stream) -> str:
    return stream.key.replace(":e:", ":l:", 1)



# --- faithful replay -------------------------------------------------------------------------------

@pytest.mark.parametrize("model, params", [
    (MODEL, {}),
    (MODEL, {"stream_options": {"include_usage": True}}),
    (f"{MODEL}@reasoning", {"stream_options": {"include_usage": True}}),
    (f"{MODEL}@tools", {"tools": [{"type": "function", "function": {
        "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]}),
    (f"{MODEL}@keepalive,prompt-cache", {"n": 2, "stream_options": {"include_usage": True}}),
], ids=["plain", "usage", "reasoning", "tool-calls", "n2-keepalive"])
def test_hit_replays_the_recorded_chunks_exactly(fake_llm, policy, model, params):
    client = fake_llm.client()
    messages = question("replay")
    call = sdk_stream(client, messages, model, **params)

    miss = cache_service.get_or_stream(messages, call, model=model, params=params)
    assert (miss.hit, miss.outcome) == (False, "miss")
    missed = list(miss)
    hit = cache_service.get_or_stream(messages, call, model=model, params=params)
    assert (hit.hit, hit.outcome) == (True, "hit")
    replayed = list(hit)

    assert fake_llm.call_count(messages) == 1
    assert all(isinstance(c, openai.types.chat.ChatCompletionChunk) for c in missed)
    assert len(replayed) == len(missed) > 3
    assert dumps(replayed) == dumps(missed)  # same boundaries, same bytes, chunk by chunk
    assert len({c["id"] for c in replayed}) == 1  # the recorded call's id: a replay, not a new call
    deltas = [d for c in replayed for choice in c["choices"] for d in [choice["delta"]]]
    if "reasoning" in model:
        assert any(d.get("reasoning_content") for d in deltas)
    if "tools" in model:
        calls_ = [t for d in deltas for t in d.get("tool_calls") or ()]
        assert calls_[0]["function"]["name"] == "get_weather" and calls_[0]["id"].startswith("call_")
        assert replayed[-1]["choices"][0]["finish_reason"] == "tool_calls"
    if params.get("stream_options"):
        assert replayed[-1]["choices"] == [] and replayed[-1]["usage"]["total_tokens"] > 0
    else:
        assert all(c.get("usage") is None for c in replayed)
    if params.get("n") == 2:
        assert {choice["index"] for c in replayed for choice in c["choices"]} == {0, 1}


def test_replay_is_byte_for_byte_the_wire_data(fake_llm, policy):
    """Chunks read from the raw SSE wire (dicts): what the consumer gets on a miss and on a
    hit serialise to exactly the bytes of each ``data:`` line the upstream sent."""
    messages = question("wire")
    body = {"model": f"{MODEL}@reasoning", "messages": messages, "stream": True,
            "stream_options": {"include_usage": True}}
    wire: list[list[bytes]] = []

    def call():
        sent: list[bytes] = []
        wire.append(sent)

        def chunks():
            with httpx.Client() as http, httpx_sse.connect_sse(
                    http, "POST", fake_llm.base_url + "/chat/completions", json=body,
                    headers={"Authorization": f"Bearer {fake_llm.api_key}"}) as source:
                for event in source.iter_sse():
                    if event.data == "[DONE]":
                        return
                    sent.append(event.data.encode())
                    yield orjson.loads(event.data)
        return chunks()

    first = cache_service.get_or_stream(messages, call, model=body["model"])
    missed = [orjson.dumps(c) for c in first]
    second = cache_service.get_or_stream(messages, call, model=body["model"])
    replayed = [orjson.dumps(c) for c in second]
    assert second.hit and len(wire) == 1
    assert missed == wire[0] == replayed


def test_async_stream_miss_then_hit(fake_llm, policy):
    messages = question("async replay")
    params = {"stream_options": {"include_usage": True}}

    async def run():
        client = fake_llm.async_client()

        async def call():
            return await client.chat.completions.create(model=MODEL, messages=messages, stream=True, **params)

        collected = []
        for _ in range(2):
            stream = await cache_service.aget_or_stream(messages, call, model=MODEL, params=params)
            collected.append((stream.hit, [c async for c in stream]))
        await client.close()
        return collected

    (first_hit, missed), (second_hit, replayed) = async_to_sync(run)()
    assert (first_hit, second_hit) == (False, True)
    assert dumps(replayed) == dumps(missed) and len(missed) > 3
    assert fake_llm.call_count(messages) == 1


def test_plain_text_chunks_replay_too(policy):
    messages = question("text chunks")
    pieces = ["Paris", " is", " the", " capital", "."]
    first = cache_service.get_or_stream(messages, lambda: iter(pieces), model=MODEL)
    assert list(first) == pieces and not first.hit
    second = cache_service.get_or_stream(messages, lambda: iter(["never", "called"]), model=MODEL)
    assert second.hit and list(second) == pieces


# --- a miss passes chunks through as they arrive -----------------------------------------------

def test_miss_hands_on_each_chunk_before_the_upstream_sends_the_next(fake_llm, policy):
    client = fake_llm.client()
    messages = question("no buffering")
    stream = cache_service.get_or_stream(messages, sdk_stream(client, messages, f"{MODEL}@long=5,delay=80"),
                                         model=MODEL)
    seen = []
    for _chunk in stream:
        (record,) = fake_llm.calls(messages)
        seen.append((record.status, record.chunks_sent))
    # At the first chunk the upstream had sent one chunk and was still running; never more
    # than one chunk ahead of the consumer afterwards.
    assert seen[0] == ("running", 1)
    assert all(status == "running" and sent <= index + 2 for index, (status, sent) in enumerate(seen[:-1]))
    assert len(seen) > 5


# --- failure modes: passed through, never stored --------------------------------------------------

@pytest.mark.parametrize("behaviour, reason", [
    ("length", "truncated"),
    ("content-filter", "content_filter"),
    ("disconnect", "truncated"),  # the body ended without a finish_reason
    ("refusal", "refusal"),
])
def test_incomplete_or_unservable_streams_pass_through_and_are_not_stored(fake_llm, policy, redis_client,
                                                                          ragcache_prefix, behaviour, reason):
    client = fake_llm.client()
    messages = question(behaviour)
    model = f"{MODEL}@{behaviour}"
    stream = cache_service.get_or_stream(messages, sdk_stream(client, messages, model), model=model)
    chunks = list(stream)
    assert len(chunks) >= 2  # the consumer got everything the upstream sent
    assert redis_client.exists(stream.key, lock_of(stream)) == 0
    assert ("refused", reason) in results(redis_client, ragcache_prefix)
    again = cache_service.get_or_stream(messages, sdk_stream(client, messages, model), model=model)
    list(again)
    assert not again.hit and fake_llm.call_count(messages) == 2


def test_error_object_mid_stream_raises_and_stores_nothing(fake_llm, policy, redis_client, ragcache_prefix):
    client = fake_llm.client()
    messages = question("mid-stream error")
    model = f"{MODEL}@error"
    stream = cache_service.get_or_stream(messages, sdk_stream(client, messages, model), model=model)
    received = []
    with pytest.raises(openai.APIError, match="mid-stream"):
        for chunk in stream:
            received.append(chunk)
    assert len(received) == 3
    assert redis_client.exists(stream.key, lock_of(stream)) == 0
    assert ("refused", "upstream_error") in results(redis_client, ragcache_prefix)


def test_error_object_as_a_chunk_is_not_stored(fake_llm, policy, redis_client, ragcache_prefix):
    """A client that hands ``{"error": ...}`` on as a chunk (no SDK): passed through, refused."""
    messages = question("error chunk")
    body = {"model": f"{MODEL}@error", "messages": messages, "stream": True}

    def call():
        with httpx.Client() as http, httpx_sse.connect_sse(
                http, "POST", fake_llm.base_url + "/chat/completions", json=body,
                headers={"Authorization": "Bearer x"}) as source:
            return [orjson.loads(e.data) for e in source.iter_sse() if e.data != "[DONE]"]

    stream = cache_service.get_or_stream(messages, call, model=MODEL)
    chunks = list(stream)
    assert "error" in chunks[-1]
    assert redis_client.exists(stream.key) == 0
    assert ("refused", "error") in results(redis_client, ragcache_prefix)


def test_consumer_that_stops_early_stores_nothing_and_closes_the_upstream(fake_llm, policy, redis_client,
                                                                          ragcache_prefix):
    client = fake_llm.client()
    messages = question("stops early")
    model = f"{MODEL}@delay=50"
    with cache_service.get_or_stream(messages, sdk_stream(client, messages, model), model=model) as stream:
        for index, _chunk in enumerate(stream):
            if index == 1:
                break
    assert redis_client.exists(stream.key, lock_of(stream)) == 0
    assert ("refused", "incomplete") in results(redis_client, ragcache_prefix)
    (record,) = fake_llm.calls(messages)
    assert wait_for(lambda: record.status == "aborted")  # the upstream saw the client go
    assert record.chunks_sent < 10


def test_stream_closed_before_its_first_chunk_releases_the_lock_at_once(fake_llm, policy, redis_client,
                                                                        ragcache_prefix):
    """Regression: ConsumerGone thrown at the miss's Begin used to escape the flow, leaving
    the single-flight lock held for LOCK_TIMEOUT (60 s) and the upstream open."""
    client = fake_llm.client()
    messages = question("closed at once")
    model = f"{MODEL}@first=3000"
    stream = cache_service.get_or_stream(messages, sdk_stream(client, messages, model), model=model)
    assert redis_client.exists(lock_of(stream)) == 1
    stream.close()
    assert redis_client.exists(lock_of(stream), stream.key) == 0
    assert ("refused", "incomplete") in results(redis_client, ragcache_prefix)
    (record,) = fake_llm.calls(messages)
    assert wait_for(lambda: record.status == "aborted")
    assert record.chunks_sent == 0


def test_exception_in_the_consumer_stores_nothing(fake_llm, policy, redis_client):
    client = fake_llm.client()
    messages = question("consumer raises")
    with pytest.raises(RuntimeError, match="consumer"):
        with cache_service.get_or_stream(messages, sdk_stream(client, messages), model=MODEL) as stream:
            for _chunk in stream:
                raise RuntimeError("the consumer broke")
    assert redis_client.exists(stream.key, lock_of(stream)) == 0


def test_exception_from_the_upstream_iterator_propagates_and_stores_nothing(policy, redis_client, ragcache_prefix):
    messages = question("iterator raises")

    def chunks():
        yield {"choices": [{"index": 0, "delta": {"content": "Hel"}, "finish_reason": None}]}
        raise ConnectionResetError("upstream went away")

    stream = cache_service.get_or_stream(messages, chunks, model=MODEL)
    with pytest.raises(ConnectionResetError):
        list(stream)
    assert redis_client.exists(stream.key, lock_of(stream)) == 0
    assert ("refused", "upstream_error") in results(redis_client, ragcache_prefix)


def test_async_consumer_that_stops_early_stores_nothing(fake_llm, policy, redis_client, ragcache_prefix):
    messages = question("async stops early")
    model = f"{MODEL}@delay=50"

    async def run():
        client = fake_llm.async_client()

        async def call():
            return await client.chat.completions.create(model=model, messages=messages, stream=True)

        async with await cache_service.aget_or_stream(messages, call, model=model) as stream:
            async for _chunk in stream:
                break
        await client.close()
        return stream

    stream = async_to_sync(run)()
    assert redis_client.exists(stream.key, lock_of(stream)) == 0
    assert ("refused", "incomplete") in results(redis_client, ragcache_prefix)


def test_async_mid_stream_error_stores_nothing(fake_llm, policy, redis_client):
    messages = question("async error")
    model = f"{MODEL}@error"

    async def run():
        client = fake_llm.async_client()

        async def call():
            return await client.chat.completions.create(model=model, messages=messages, stream=True)

        stream = await cache_service.aget_or_stream(messages, call, model=model)
        try:
            with pytest.raises(openai.APIError):
                async for _chunk in stream:
                    pass
        finally:
            await client.close()
        return stream

    stream = async_to_sync(run)()
    assert redis_client.exists(stream.key, lock_of(stream)) == 0


def test_stream_over_max_entry_bytes_passes_through_and_is_not_stored(fake_llm, policy_factory, redis_client,
                                                                      ragcache_prefix):
    policy_factory("default", mode="on", enabled=True, scope="global", max_entry_bytes=4000,
                   compress_threshold_bytes=0)
    client = fake_llm.client()
    messages = question("too large")
    model = f"{MODEL}@long=200"
    stream = cache_service.get_or_stream(messages, sdk_stream(client, messages, model), model=model)
    chunks = list(stream)
    assert sum(len(b) for b in dumps(chunks)) > 4000
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert redis_client.exists(stream.key) == 0
    assert ("refused", "too_large") in results(redis_client, ragcache_prefix)


def test_recorder_drops_its_recording_past_the_limit():
    recorder = StreamRecorder(1000)
    for index in range(100):
        data = recorder.add({"choices": [{"index": 0, "delta": {"content": f"piece {index:04d} " * 4}}]})
        assert data  # still handed on (and published) after the limit
    assert recorder.chunks is None and recorder.refused.reason == "too_large"


def test_a_stream_over_the_limit_is_not_buffered(policy_factory):
    """Memory stays flat while a stream 20 times max_entry_bytes passes through (it would
    hold every chunk if the recording were kept)."""
    policy_factory("default", mode="on", enabled=True, scope="global", max_entry_bytes=50_000,
                   compress_threshold_bytes=0)
    registry.reload()
    messages = question("memory")
    piece = "x" * 400

    def chunks():
        for index in range(2500):  # about 1 MB of JSON
            yield {"id": "c", "choices": [{"index": 0, "delta": {"content": f"{index}{piece}"}, "finish_reason": None}]}
        yield {"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}

    tracemalloc.start()
    try:
        stream = cache_service.get_or_stream(messages, chunks, model=MODEL)
        baseline = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        count = sum(1 for _ in stream)
        peak = tracemalloc.get_traced_memory()[1] - baseline
    finally:
        tracemalloc.stop()
    assert count == 2501
    assert peak < 400_000, f"{peak} bytes held while streaming ~1 MB"


# --- identical concurrent streams ---------------------------------------------------------------------

def _consume(stream, started: float) -> dict:
    first = None
    chunks = []
    for chunk in stream:
        if first is None:
            first = time.monotonic() - started
        chunks.append(as_json(chunk))
    return {"outcome": stream.outcome, "first": first, "end": time.monotonic() - started, "chunks": chunks}


def test_ten_identical_streams_make_one_upstream_call_and_followers_get_chunks_live(
        fake_llm, policy, redis_client, ragcache_prefix):
    client = fake_llm.client()
    messages = question("fan-out")
    model = f"{MODEL}@first=300,delay=25"
    params = {"stream_options": {"include_usage": True}}
    barrier = threading.Barrier(10)
    out: list[dict | BaseException] = [None] * 10
    started = time.monotonic()

    def run(index):
        try:
            barrier.wait()
            out[index] = _consume(cache_service.get_or_stream(
                messages, sdk_stream(client, messages, model, **params), model=model, params=params), started)
        except BaseException as exc:  # noqa: BLE001 - reported below
            out[index] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not [o for o in out if isinstance(o, BaseException)], out
    assert fake_llm.call_count(messages) == 1
    (leader,) = [o for o in out if o["outcome"] == "miss"]
    followers = [o for o in out if o["outcome"] == "shared"]
    assert len(followers) == 9
    for follower in followers:
        assert follower["first"] < leader["end"]  # live, not after the leader's end
        assert follower["chunks"] == leader["chunks"]
    assert len(leader["chunks"]) > 10

    assert aggregate().status == "ok"
    shared = UsageRecord.objects.filter(result="hit", reason="shared_flight")
    usage = leader["chunks"][-1]["usage"]
    assert shared.count() == 9
    assert {(r.tokens_avoided, r.usage_known) for r in shared} == {(usage["total_tokens"], True)}


def test_async_identical_streams_make_one_upstream_call(fake_llm, policy):
    messages = question("async fan-out")
    model = f"{MODEL}@first=300,delay=20"

    async def run():
        client = fake_llm.async_client()

        async def call():
            return await client.chat.completions.create(model=model, messages=messages, stream=True)

        async def one():
            started = time.monotonic()
            stream = await cache_service.aget_or_stream(messages, call, model=model)
            first, chunks = None, []
            async for chunk in stream:
                first = first if first is not None else time.monotonic() - started
                chunks.append(as_json(chunk))
            return stream.outcome, first, time.monotonic() - started, chunks

        found = await asyncio.gather(*(one() for _ in range(10)))
        await client.close()
        return found

    found = async_to_sync(run)()
    assert fake_llm.call_count(messages) == 1
    outcomes = sorted(o[0] for o in found)
    assert outcomes == ["miss"] + ["shared"] * 9
    leader = next(o for o in found if o[0] == "miss")
    assert all(o[3] == leader[3] for o in found)
    assert all(o[1] < leader[2] for o in found if o[0] == "shared")


def test_followers_fail_over_to_their_own_call_when_the_leader_fails_before_any_chunk(
        fake_llm, policy, redis_client, ragcache_prefix):
    client = fake_llm.client()
    messages = question("failover")
    model = f"{MODEL}@error-first,once,first=400"
    barrier = threading.Barrier(4)
    out: list = [None] * 4

    def run(index):
        try:
            barrier.wait()
            stream = cache_service.get_or_stream(messages, sdk_stream(client, messages, model), model=model)
            out[index] = (stream.outcome, [as_json(c) for c in stream])
        except BaseException as exc:  # noqa: BLE001
            out[index] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    failed = [o for o in out if isinstance(o, BaseException)]
    assert len(failed) == 1 and isinstance(failed[0], openai.APIError)  # the leader's own error
    served = [o for o in out if not isinstance(o, BaseException)]
    assert [outcome for outcome, _ in served] == ["shared"] * 3
    assert all(chunks[-1]["choices"][0]["finish_reason"] == "stop" for _, chunks in served)
    assert fake_llm.call_count(messages) == 4  # the failed call, then one each
    events = results(redis_client, ragcache_prefix)
    assert events.count(("miss", "leader_failed")) == 3
    assert ("miss", "lock_timeout") not in events


def test_followers_of_a_leader_that_fails_mid_stream_are_interrupted(fake_llm, policy):
    client = fake_llm.client()
    messages = question("interrupted")
    model = f"{MODEL}@error,first=300,delay=30"
    barrier = threading.Barrier(3)
    out: list = [None] * 3

    def run(index):
        got = []
        try:
            barrier.wait()
            stream = cache_service.get_or_stream(messages, sdk_stream(client, messages, model), model=model)
            for chunk in stream:
                got.append(chunk)
            out[index] = ("completed", len(got))
        except BaseException as exc:  # noqa: BLE001
            out[index] = (type(exc), len(got))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(out, key=str) == sorted([(openai.APIError, 3), (StreamInterrupted, 3), (StreamInterrupted, 3)],
                                          key=str)
    assert fake_llm.call_count(messages) == 1


def test_a_dead_leader_is_not_waited_for_beyond_lock_wait(fake_llm, policy, settings, redis_client,
                                                          ragcache_prefix):
    """A lock whose owner died without ending its flight: the follower calls the upstream
    itself after LOCK_WAIT without news."""
    settings.RAGCACHE = {**settings.RAGCACHE, "LOCK_WAIT": 0.3}
    client = fake_llm.client()
    messages = question("dead leader")
    request = make_request(messages, model=MODEL, policy="default", scope=None, params=None, context_version=None,
                           kind="stream")
    lock = plans.plan(request, registry.current()).key.lock
    redis_client.set(lock, "a-dead-process", px=60_000)
    stream = cache_service.get_or_stream(messages, sdk_stream(client, messages), model=MODEL)
    assert stream.outcome == "shared"  # known before the first chunk: it follows the lock's owner
    chunks = [as_json(c) for c in stream]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    # It called the upstream itself: the stream says so once it knows.
    assert (stream.outcome, stream.reason, stream.hit) == ("miss", "leader_failed", False)
    assert fake_llm.call_count(messages) == 1
    assert ("miss", "leader_failed") in results(redis_client, ragcache_prefix)


# --- accounting of stream hits ------------------------------------------------------------------------

def test_stream_hits_record_the_tokens_and_cost_they_avoided(fake_llm, policy):
    ModelPrice.objects.create(model="acct-llm", input_per_1k=Decimal("0.5"), cached_input_per_1k=Decimal("0.25"),
                              output_per_1k=Decimal("1.5"))
    registry.invalidate()
    client = fake_llm.client(default_headers={"X-Fake-Behaviour": "prompt-cache"})
    known, unknown, silent = question("usage known"), question("usage not asked"), question("usage never sent")
    cases = [
        (known, "acct-llm", {"stream_options": {"include_usage": True}}),
        (unknown, "acct-llm", {}),
        (silent, "acct-llm@no-usage", {"stream_options": {"include_usage": True}}),
    ]
    usage = None
    for messages, model, params in cases:
        for attempt in range(2):
            chunks = list(cache_service.get_or_stream(messages, sdk_stream(client, messages, model, **params),
                                                      model=model, params=params))
            if messages is known and attempt == 0:
                usage = chunks[-1].usage  # the miss: the SDK's own chunk
        assert fake_llm.call_count(messages) == 1

    assert aggregate().status == "ok"
    records = list(UsageRecord.objects.filter(result="hit").order_by("ts"))
    assert len(records) == 3
    priced, not_asked, never_sent = records
    cached_tokens = usage.prompt_tokens_details.cached_tokens
    assert cached_tokens > 0
    assert (priced.tokens_avoided, priced.usage_known) == (usage.total_tokens, True)
    expected = (Decimal("0.5") * (usage.prompt_tokens - cached_tokens) + Decimal("0.25") * cached_tokens
                + Decimal("1.5") * usage.completion_tokens) / 1000
    assert priced.cost_avoided == expected
    for record in (not_asked, never_sent):  # no usage recorded: unknown, never a guess
        assert (record.usage_known, record.tokens_avoided, record.cost_avoided) == (False, 0, Decimal(0))
