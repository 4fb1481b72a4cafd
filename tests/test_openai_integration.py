"""ragcache.integrations.openai: the real ``openai`` SDK, sync and async, JSON and streams,
against the fake OpenAI upstream on a real socket (no transport mocks)."""
from __future__ import annotations

import asyncio
import uuid

import openai
import pytest
from asgiref.sync import async_to_sync
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from ragcache import outcomes
from ragcache.aggregation import aggregate
from ragcache.exceptions import InvalidRequestError, ScopeRequiredError
from ragcache.integrations.openai import (
    AsyncCachedOpenAI,
    AsyncCachedStream,
    CachedOpenAI,
    CachedStream,
    CacheStatus,
    cache_status,
    cached,
)
from ragcache.models import UsageRecord
from ragcache.policies import registry
from ragcache.services import cache_service

from .gateway_helpers import wait_for

MODEL = "demo-llm"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]


@pytest.fixture
def policy(policy_factory):
    made = policy_factory("default", mode="on", enabled=True, scope="global", ttl_seconds=3600, rollout_percent=100)
    registry.reload()
    return made


@pytest.fixture(autouse=True)
def fresh_hit_rates():
    outcomes.hit_rates._windows.clear()


def question(label: str) -> list[dict]:
    return [{"role": "user", "content": f"{label} ({uuid.uuid4().hex[:12]})"}]



def stored_keys(redis_client, prefix) -> list[bytes]:
    return [k for k in redis_client.scan_iter(match=f"{prefix}:2:*:e:*", count=1000)]


# --- JSON completions -------------------------------------------------------------------------------

def test_json_completion_miss_then_hit_returns_the_sdks_type(fake_llm, policy):
    client = cached(fake_llm.client())
    messages = question("json")
    first = client.chat.completions.create(model=MODEL, messages=messages, temperature=0)
    second = client.chat.completions.create(model=MODEL, messages=messages, temperature=0)
    assert type(first) is ChatCompletion and type(second) is ChatCompletion
    assert cache_status(first) == CacheStatus(False, "miss", "", "default", cache_status(first).key_id, True, None)
    status = cache_status(second)
    assert (status.hit, status.outcome, status.stored) == (True, "hit", False) and status.age_seconds >= 0
    assert status.key_id == cache_status(first).key_id and len(status.key_id) == 16
    assert second.model_dump() == first.model_dump()
    assert second.to_json() == first.to_json() and second.to_dict() == first.to_dict()
    assert second == first
    assert second.choices[0].message.content.startswith("Answer ")
    assert second.usage.prompt_tokens_details.cached_tokens == 0
    assert fake_llm.call_count(messages) == 1


def test_the_status_is_not_part_of_the_model(fake_llm, policy):
    client = cached(fake_llm.client())
    completion = client.chat.completions.create(model=MODEL, messages=question("status"))
    raw = fake_llm.client().chat.completions.create(model=MODEL, messages=question("status, unwrapped"))
    assert cache_status(completion) is not None and cache_status(raw) is None
    assert "status" not in completion.to_json() and "status" not in str(completion.model_dump())
    assert completion.model_dump().keys() == raw.model_dump().keys()
    assert completion.model_fields_set == raw.model_fields_set and completion.model_extra == raw.model_extra
    assert cache_status(object()) is None and cache_status(completion.choices[0]) is None


def test_async_json_completion_miss_then_hit(fake_llm, policy):
    messages = question("async json")

    async def run():
        client = cached(fake_llm.async_client())
        assert isinstance(client, AsyncCachedOpenAI)
        first = await client.chat.completions.create(model=MODEL, messages=messages)
        second = await client.chat.completions.create(model=MODEL, messages=messages)
        await client.close()
        return first, second

    first, second = async_to_sync(run)()
    assert type(second) is ChatCompletion
    assert (cache_status(first).hit, cache_status(second).hit) == (False, True)
    assert second.model_dump() == first.model_dump()
    assert fake_llm.call_count(messages) == 1


def test_tool_call_and_reasoning_answers_are_cached(fake_llm, policy):
    client = cached(fake_llm.client())
    messages = question("weather")
    first = client.chat.completions.create(model=f"{MODEL}@tools,reasoning", messages=messages, tools=TOOLS)
    second = client.chat.completions.create(model=f"{MODEL}@tools,reasoning", messages=messages, tools=TOOLS)
    assert cache_status(second).hit and second.model_dump() == first.model_dump()
    call = second.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and second.choices[0].finish_reason == "tool_calls"
    assert second.choices[0].message.model_extra["reasoning_content"]
    # The conversation goes on with the SDK's own message object in the history.
    follow_up = [*messages, second.choices[0].message,
                 {"role": "tool", "tool_call_id": call.id, "content": "18 C and sunny"}]
    third = client.chat.completions.create(model=MODEL, messages=follow_up, tools=TOOLS)
    fourth = client.chat.completions.create(model=MODEL, messages=follow_up, tools=TOOLS)
    assert (cache_status(third).hit, cache_status(fourth).hit) == (False, True)


def test_assistant_message_without_content_can_be_keyed(fake_llm, policy):
    """OpenAI accepts an assistant message with tool_calls and no content."""
    client = cached(fake_llm.client())
    messages = [{"role": "user", "content": f"weather {uuid.uuid4().hex}"},
                {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function",
                                                      "function": {"name": "get_weather",
                                                                   "arguments": "{\"city\": \"Oslo\"}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "cold"}]
    client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS)
    again = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS)
    assert cache_status(again).hit


# --- streams ----------------------------------------------------------------------------------------------

def _read(stream) -> list:
    with stream:
        return list(stream)


@pytest.mark.parametrize("model, extra", [
    (MODEL, {}),
    (MODEL, {"stream_options": {"include_usage": True}}),
    (f"{MODEL}@reasoning", {"stream_options": {"include_usage": True}}),
    (f"{MODEL}@tools", {"tools": TOOLS}),
])
def test_stream_miss_then_hit_chunk_by_chunk(fake_llm, policy, model, extra):
    client = cached(fake_llm.client())
    messages = question("stream")
    first = client.chat.completions.create(model=model, messages=messages, stream=True, **extra)
    assert isinstance(first, CachedStream) and (first.hit, first.outcome) == (False, "miss")
    missed = _read(first)
    second = client.chat.completions.create(model=model, messages=messages, stream=True, **extra)
    assert (second.hit, second.outcome) == (True, "hit") and cache_status(second).hit
    replayed = _read(second)
    assert all(type(c) is ChatCompletionChunk for c in missed + replayed)
    assert [c.model_dump() for c in replayed] == [c.model_dump() for c in missed]
    assert [c.to_json() for c in replayed] == [c.to_json() for c in missed]
    assert fake_llm.call_count(messages) == 1
    finishes = [choice.finish_reason for c in replayed for choice in c.choices if choice.finish_reason]
    assert finishes == ["tool_calls" if "tools" in model else "stop"]
    if extra.get("stream_options"):  # honoured on the hit as on the miss
        assert replayed[-1].choices == [] and replayed[-1].usage.total_tokens > 0
        assert all(c.usage is None for c in replayed[:-1])
    else:
        assert all(c.usage is None for c in replayed)
    if "reasoning" in model:
        assert "".join(c.choices[0].delta.model_extra.get("reasoning_content") or "" for c in replayed if c.choices)
    if "tools" in model:
        fragments = [t.function.arguments for c in replayed if c.choices for t in c.choices[0].delta.tool_calls or ()]
        assert "".join(fragments).startswith('{"city"')


def test_include_usage_changes_the_answer_and_the_key(fake_llm, policy):
    client = cached(fake_llm.client())
    messages = question("usage or not")
    plain = _read(client.chat.completions.create(model=MODEL, messages=messages, stream=True))
    with_usage = client.chat.completions.create(model=MODEL, messages=messages, stream=True,
                                                stream_options={"include_usage": True})
    assert not with_usage.hit
    chunks = _read(with_usage)
    assert plain[-1].usage is None and chunks[-1].usage is not None
    assert fake_llm.call_count(messages) == 2


def test_async_stream_miss_then_hit(fake_llm, policy):
    messages = question("async stream")

    async def run():
        client = cached(fake_llm.async_client())
        out = []
        for _ in range(2):
            stream = await client.chat.completions.create(model=MODEL, messages=messages, stream=True,
                                                          stream_options={"include_usage": True})
            assert isinstance(stream, AsyncCachedStream)
            async with stream:
                out.append((stream.hit, [c async for c in stream]))
        await client.close()
        return out

    (hit1, missed), (hit2, replayed) = async_to_sync(run)()
    assert (hit1, hit2) == (False, True)
    assert [c.to_json() for c in replayed] == [c.to_json() for c in missed]
    assert replayed[-1].usage.total_tokens > 0
    assert fake_llm.call_count(messages) == 1


def test_stream_closed_early_stores_nothing_and_closes_the_upstream(fake_llm, policy, redis_client,
                                                                   ragcache_prefix):
    client = cached(fake_llm.client())
    messages = question("early close")
    with client.chat.completions.create(model=f"{MODEL}@delay=50", messages=messages, stream=True) as stream:
        next(stream)
    (record,) = fake_llm.calls(messages)
    assert wait_for(lambda: record.status == "aborted")  # the upstream saw the client go
    assert stored_keys(redis_client, ragcache_prefix) == []
    again = client.chat.completions.create(model=f"{MODEL}@delay=50", messages=messages, stream=True)
    assert not again.hit
    again.close()


def test_async_stream_closed_early_closes_the_upstream(fake_llm, policy, redis_client, ragcache_prefix):
    messages = question("async early close")

    async def run():
        client = cached(fake_llm.async_client())
        stream = await client.chat.completions.create(model=f"{MODEL}@delay=50", messages=messages, stream=True)
        await stream.__anext__()
        await stream.close()
        await client.close()

    async_to_sync(run)()
    (record,) = fake_llm.calls(messages)
    assert wait_for(lambda: record.status == "aborted")  # the upstream saw the client go
    assert stored_keys(redis_client, ragcache_prefix) == []


# --- the key ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change", [
    {"tools": TOOLS},
    {"response_format": {"type": "json_object"}},
    {"reasoning_effort": "low"},
    {"temperature": 0.7},
    {"seed": 7},
    {"n": 2},
    {"max_completion_tokens": 500},
    {"extra_body": {"top_k": 5}},
])
def test_every_answer_shaping_field_enters_the_key(fake_llm, policy, change):
    client = cached(fake_llm.client())
    messages = question("shaping")
    client.chat.completions.create(model=MODEL, messages=messages)
    other = client.chat.completions.create(model=MODEL, messages=messages, **change)
    assert not cache_status(other).hit
    assert fake_llm.call_count(messages) == 2


def test_transport_and_bookkeeping_fields_do_not(fake_llm, policy):
    client = cached(fake_llm.client())
    messages = question("transport")
    client.chat.completions.create(model=MODEL, messages=messages)
    same = client.chat.completions.create(model=MODEL, messages=messages, user="u-1", metadata={"ticket": "42"},
                                          timeout=30, extra_headers={"X-Trace": "abc"}, store=False)
    assert cache_status(same).hit
    assert fake_llm.call_count(messages) == 1


def test_json_and_stream_never_share_an_entry(fake_llm, policy):
    client = cached(fake_llm.client())
    messages = question("json vs stream")
    client.chat.completions.create(model=MODEL, messages=messages)
    stream = client.chat.completions.create(model=MODEL, messages=messages, stream=True)
    assert not stream.hit
    _read(stream)
    assert fake_llm.call_count(messages) == 2


# --- per-call controls ---------------------------------------------------------------------------------------

def test_no_cache_refreshes_and_stores(fake_llm, policy):
    client = cached(fake_llm.client())
    messages = question("no-cache")
    first = client.chat.completions.create(model=MODEL, messages=messages)
    refreshed = client.chat.completions.create(model=MODEL, messages=messages, cache={"no-cache": True})
    status = cache_status(refreshed)
    assert (status.hit, status.outcome, status.stored) == (False, "refresh", True)
    after = client.chat.completions.create(model=MODEL, messages=messages)
    assert cache_status(after).hit and after.id == refreshed.id != first.id
    assert fake_llm.call_count(messages) == 2
    assert all("cache" not in call.body for call in fake_llm.calls(messages))  # never sent upstream


def test_no_store_serves_a_hit_but_never_stores(fake_llm, policy, redis_client, ragcache_prefix):
    client = cached(fake_llm.client())
    fresh = question("no-store fresh")
    miss = client.chat.completions.create(model=MODEL, messages=fresh, cache={"no-store": True})
    assert cache_status(miss).stored is False and stored_keys(redis_client, ragcache_prefix) == []
    stream = client.chat.completions.create(model=MODEL, messages=fresh, stream=True, cache={"no-store": True})
    _read(stream)
    assert stored_keys(redis_client, ragcache_prefix) == []
    known = question("no-store known")
    client.chat.completions.create(model=MODEL, messages=known)
    hit = client.chat.completions.create(model=MODEL, messages=known, cache={"no-store": True})
    assert cache_status(hit).hit
    assert fake_llm.call_count(fresh) == 2 and fake_llm.call_count(known) == 1


def test_ttl_shortens_the_entry_lifetime(fake_llm, policy, redis_client, ragcache_prefix):
    client = cached(fake_llm.client())
    messages = question("ttl")
    client.chat.completions.create(model=MODEL, messages=messages, cache={"ttl": 60})
    (key,) = stored_keys(redis_client, ragcache_prefix)
    assert 0 < redis_client.pttl(key) <= 60_000
    longer = question("ttl longer than the policy")
    client.chat.completions.create(model=MODEL, messages=longer, cache={"ttl": 10 * 3600})
    ttls = sorted(redis_client.pttl(k) for k in stored_keys(redis_client, ragcache_prefix))
    assert ttls[-1] <= 3600 * 1000  # never longer than the policy's


def test_policy_and_scope_per_call(fake_llm, policy, policy_factory):
    policy_factory("per-user", mode="on", enabled=True, scope="user", ttl_seconds=600)
    registry.invalidate()
    client = cached(fake_llm.client())
    messages = question("per user")
    alice = client.chat.completions.create(model=MODEL, messages=messages, cache={"policy": "per-user", "scope": "a"})
    alice_again = client.chat.completions.create(model=MODEL, messages=messages,
                                                 cache={"policy": "per-user", "scope": "a"})
    bob = client.chat.completions.create(model=MODEL, messages=messages, cache={"policy": "per-user", "scope": "b"})
    assert cache_status(alice).policy == "per-user"
    assert (cache_status(alice_again).hit, cache_status(bob).hit) == (True, False)  # no answer across scopes
    with pytest.raises(ScopeRequiredError):
        client.chat.completions.create(model=MODEL, messages=messages, cache={"policy": "per-user"})
    scoped = cached(fake_llm.client(), policy="per-user", scope="a")
    assert cache_status(scoped.chat.completions.create(model=MODEL, messages=messages)).hit
    assert fake_llm.call_count(messages) == 2


def test_sources_are_passed_through_and_invalidate(fake_llm, policy):
    client = cached(fake_llm.client())
    messages = question("sources")
    client.chat.completions.create(model=MODEL, messages=messages, cache={"sources": ["doc:42"]})
    assert cache_status(client.chat.completions.create(model=MODEL, messages=messages)).hit
    cache_service.invalidate_sources(["doc:42"])
    after = client.chat.completions.create(model=MODEL, messages=messages)
    assert not cache_status(after).hit
    assert fake_llm.call_count(messages) == 2


@pytest.mark.parametrize("controls, message", [
    ("no-cache", "must be a dict"),
    ({"no_cache": True}, "Unknown cache control 'no_cache'"),
    ({"no-cache": "yes"}, 'cache["no-cache"] must be True or False'),
    ({"no-store": 1}, 'cache["no-store"] must be True or False'),
    ({"ttl": 0}, 'cache["ttl"] must be a positive number'),
    ({"ttl": "60"}, 'cache["ttl"] must be a positive number'),
    ({"policy": ""}, 'cache["policy"] must be the name'),
    ({"sources": "doc:1"}, "sources must be an iterable"),
])
def test_bad_cache_controls_are_clear_errors_before_any_call(fake_llm, policy, controls, message):
    client = cached(fake_llm.client())
    messages = question("bad controls")
    with pytest.raises(InvalidRequestError, match=message.replace("[", r"\[").replace("]", r"\]")):
        client.chat.completions.create(model=MODEL, messages=messages, cache=controls)
    assert fake_llm.call_count(messages) == 0


# --- upstream errors pass through, never cached ------------------------------------------------------------------

@pytest.mark.parametrize("behaviour, error, status", [
    ("429", openai.RateLimitError, 429),
    ("500", openai.InternalServerError, 500),
])
@pytest.mark.parametrize("stream", [False, True])
def test_upstream_errors_reach_the_caller_as_the_sdk_raises_them(fake_llm, policy, redis_client, ragcache_prefix,
                                                                 behaviour, error, status, stream):
    raw, wrapped = fake_llm.client(), cached(fake_llm.client())
    messages = question(f"error {behaviour}")
    model = f"{MODEL}@{behaviour}"
    with pytest.raises(error) as direct:
        raw.chat.completions.create(model=model, messages=messages, stream=stream)
    for _ in range(2):
        with pytest.raises(error) as through:
            wrapped.chat.completions.create(model=model, messages=messages, stream=stream)
        assert through.value.status_code == status
        assert through.value.body == direct.value.body and through.value.message == direct.value.message
    assert fake_llm.call_count(messages) == 3  # never served from the cache
    assert stored_keys(redis_client, ragcache_prefix) == []


def test_the_sdks_own_retries_still_happen(fake_llm, policy):
    wrapped = cached(fake_llm.client(max_retries=2))
    messages = question("retried")
    with pytest.raises(openai.RateLimitError):
        wrapped.chat.completions.create(model=f"{MODEL}@429", messages=messages)
    assert fake_llm.call_count(messages) == 3
    recovered = question("retried once")
    completion = wrapped.chat.completions.create(model=f"{MODEL}@429,once", messages=recovered)
    assert completion.choices[0].finish_reason == "stop" and fake_llm.call_count(recovered) == 2
    assert cache_status(wrapped.chat.completions.create(model=f"{MODEL}@429,once", messages=recovered)).hit


def test_timeouts_reach_the_caller_and_store_nothing(fake_llm, policy, redis_client, ragcache_prefix):
    client = cached(fake_llm.client(timeout=0.3))
    messages = question("timeout")
    with pytest.raises(openai.APITimeoutError):
        client.chat.completions.create(model=f"{MODEL}@first=2000", messages=messages)
    stream = client.chat.completions.create(model=f"{MODEL}@delay=2000", messages=messages, stream=True)
    with pytest.raises(openai.APITimeoutError):
        _read(stream)
    assert stored_keys(redis_client, ragcache_prefix) == []


def test_async_rate_limit_passes_through(fake_llm, policy):
    messages = question("async 429")

    async def run():
        client = cached(fake_llm.async_client())
        try:
            for stream in (False, True):
                with pytest.raises(openai.RateLimitError):
                    await client.chat.completions.create(model=f"{MODEL}@429", messages=messages, stream=stream)
        finally:
            await client.close()

    async_to_sync(run)()
    assert fake_llm.call_count(messages) == 2


def test_mid_stream_error_through_the_wrapper(fake_llm, policy, redis_client, ragcache_prefix):
    client = cached(fake_llm.client())
    messages = question("wrapper mid-stream")
    stream = client.chat.completions.create(model=f"{MODEL}@error", messages=messages, stream=True)
    got = []
    with pytest.raises(openai.APIError):
        for chunk in stream:
            got.append(chunk)
    assert len(got) == 3 and stored_keys(redis_client, ragcache_prefix) == []


# --- the rest of the client --------------------------------------------------------------------------------------

def test_everything_else_on_the_client_is_the_clients_own(fake_llm, policy):
    raw = fake_llm.client()
    client = cached(raw)
    assert isinstance(client, CachedOpenAI) and client.wrapped is raw
    assert client.api_key == raw.api_key and client.base_url == raw.base_url
    assert [m.id for m in client.models.list()] == ["demo-llm"]
    response = client.chat.completions.with_raw_response.create(model=MODEL, messages=question("raw"))
    assert response.http_request.url.path.endswith("/chat/completions")
    assert response.parse().choices[0].message.content
    other = client.with_options(timeout=12)
    assert isinstance(other, CachedOpenAI) and other.wrapped.timeout == 12
    messages = question("with options")
    other.chat.completions.create(model=MODEL, messages=messages)
    assert cache_status(client.chat.completions.create(model=MODEL, messages=messages)).hit
    assert cached(client).wrapped is raw  # wrapping twice wraps the client once


def test_cached_refuses_what_is_not_an_openai_client():
    with pytest.raises(TypeError, match="openai.OpenAI or openai.AsyncOpenAI"):
        cached(object())
    with pytest.raises(InvalidRequestError):
        cached(openai.OpenAI(api_key="x"), policy="")


def test_redis_trouble_never_reaches_the_caller(fake_llm, policy, private_redis):
    registry.reload()
    private_redis.stop()
    client = cached(fake_llm.client())
    messages = question("redis down")
    completion = client.chat.completions.create(model=MODEL, messages=messages)
    assert completion.choices[0].message.content and cache_status(completion).hit is False
    chunks = _read(client.chat.completions.create(model=MODEL, messages=messages, stream=True))
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_keys_never_contain_the_prompt(fake_llm, policy, redis_client, ragcache_prefix):
    client = cached(fake_llm.client())
    secret = f"my password is hunter2-{uuid.uuid4().hex}"
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": secret}])
    names = [k.decode() for k in redis_client.scan_iter(match=f"{ragcache_prefix}:*", count=1000)]
    assert names and not any("hunter2" in name for name in names)


# --- fan-out and accounting through the wrapper ------------------------------------------------------------------

def test_identical_wrapped_streams_make_one_upstream_call(fake_llm, policy):
    messages = question("wrapped fan-out")
    model = f"{MODEL}@first=300,delay=20"

    async def run():
        client = cached(fake_llm.async_client())

        async def one():
            stream = await client.chat.completions.create(model=model, messages=messages, stream=True,
                                                          stream_options={"include_usage": True})
            async with stream:
                return stream.outcome, [c.to_json() async for c in stream]

        found = await asyncio.gather(*(one() for _ in range(10)))
        await client.close()
        return found

    found = async_to_sync(run)()
    assert fake_llm.call_count(messages) == 1
    assert sorted(outcome for outcome, _ in found) == ["miss"] + ["shared"] * 9
    assert len({tuple(chunks) for _, chunks in found}) == 1  # every caller got the same chunks


def test_wrapped_hits_record_the_tokens_they_avoided(fake_llm, policy):
    client = cached(fake_llm.client())
    messages = question("accounting")
    first = client.chat.completions.create(model=MODEL, messages=messages)
    client.chat.completions.create(model=MODEL, messages=messages)
    streamed = question("accounting, streamed")
    chunks = _read(client.chat.completions.create(model=MODEL, messages=streamed, stream=True,
                                                  stream_options={"include_usage": True}))
    _read(client.chat.completions.create(model=MODEL, messages=streamed, stream=True,
                                         stream_options={"include_usage": True}))
    assert aggregate().status == "ok"
    hits = sorted((r.tokens_avoided, r.usage_known) for r in UsageRecord.objects.filter(result="hit"))
    assert hits == sorted([(first.usage.total_tokens, True), (chunks[-1].usage.total_tokens, True)])
    stores = UsageRecord.objects.filter(result="store").count()
    assert stores == 2
