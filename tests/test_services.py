"""CacheService against the real Redis: scope isolation, TTL, modes and flags, rollout,
admission, compression, corrupt entries, single-flight, Redis outages, zero SQL on a hit,
the step 68 log line and the async twins."""
from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
import zlib
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from asgiref.sync import async_to_sync

from ragcache import keys, outcomes, store
from ragcache.exceptions import InvalidRequestError, ScopeRequiredError
from ragcache.models import CacheFlags, CachePolicy
from ragcache.policies import registry
from ragcache.services import cache_service

MODEL = "gpt-4o-mini"
STEP_68_PREFIX = (
    "RAG STEP 68 (RAG.cache.cacheservice.cache.response.store.in.redis): "
    "CacheService.cache_response Store in Redis | attrs="
)


def openai_answer(text="Paris is the capital of France.", finish_reason="stop", **extra):
    return {
        "id": "chatcmpl-1",
        "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": 20, "completion_tokens": 9},
        **extra,
    }


def entry_keys(client, prefix):
    pattern = keys.layout(prefix).entry_pattern()
    return sorted(k.decode() for k in client.scan_iter(match=pattern, count=1000))


def cache_key(question, *, policy="default", scope_kind="global", scope=None, model=MODEL):
    """The key the service computes for a plain-string question with no params."""
    generation = CachePolicy.objects.get(name=policy).generation
    digest = keys.content_digest(keys.normalize_messages(question), model=model, params={}, context_version=None)
    return keys.CacheKey(store.current_layout(), policy, generation, keys.scope_hash(scope_kind, scope), digest)


def stream_events(client, prefix):
    """Every usage event of every shard, in time order: (id, fields)."""
    events = [(entry_id, fields) for stream in keys.layout(prefix).streams for entry_id, fields in
              client.xrange(stream)]
    return sorted(events, key=lambda e: tuple(int(part) for part in e[0].split(b"-")))


def stream_results(client, prefix):
    return [(f[b"r"].decode(), f.get(b"x", b"").decode()) for _id, f in stream_events(client, prefix)]


@pytest.fixture(autouse=True)
def fresh_hit_rates():
    """The step 68 line's hit rate is per process and policy: start each test from none."""
    outcomes.hit_rates._windows.clear()


class Counter:
    """A fake LLM call that counts its invocations."""

    def __init__(self, answer="an answer", delay=0.0):
        self.answer = answer
        self.delay = delay
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self):
        with self._lock:
            self.calls += 1
            n = self.calls
        if self.delay:
            time.sleep(self.delay)
        return self.answer if not callable(self.answer) else self.answer(n)


@pytest.fixture
def default_policy(policy_factory):
    return policy_factory("default", mode="on", enabled=True, scope="global", ttl_seconds=3600, rollout_percent=100)


@pytest.fixture
def ragcache_settings(settings):
    """Update single RAGCACHE settings for one test."""

    def update(**values):
        settings.RAGCACHE = {**settings.RAGCACHE, **values}

    return update


# --- basics ------------------------------------------------------------------------------------

def test_miss_then_hit_returns_the_stored_shape(default_policy):
    llm = Counter(openai_answer())
    first = cache_service.get_or_call("Capital of France?", llm, model=MODEL)
    second = cache_service.get_or_call("Capital of France?", llm, model=MODEL)
    assert (first.hit, second.hit) == (False, True)
    assert llm.calls == 1
    assert second.response == first.response == openai_answer()
    assert second.key == first.key
    cached = second.cached
    assert cached.content == "Paris is the capital of France."
    assert (cached.prompt_tokens, cached.completion_tokens, cached.tokens) == (20, 9, 29)
    assert cached.finish_reason == "stop"
    assert cached.model == MODEL
    assert cached.latency_ms is not None and cached.latency_ms >= 0


def test_string_response_round_trips(default_policy):
    assert cache_service.cache_response("q", "plain text answer", model=MODEL)
    hit = cache_service.get_cached_response("q", model=MODEL)
    assert hit.response == hit.content == "plain text answer"
    assert hit.tokens == 0 and hit.cost is None


def test_metadata_is_stored(default_policy, redis_client):
    answer = openai_answer(cost=0.0123)
    assert cache_service.cache_response("q", answer, model=MODEL, latency_ms=850.0)
    meta = json.loads(redis_client.hget(cache_key("q").redis_key, "m"))
    assert meta["v"] == keys.KEY_SCHEMA_VERSION
    assert meta["model"] == MODEL
    assert (meta["pt"], meta["ct"]) == (20, 9)
    assert meta["cost"] == "0.0123"
    assert meta["lat"] == 850.0
    assert meta["exp"] - meta["at"] == pytest.approx(3600, abs=0.01)
    hit = cache_service.get_cached_response("q", model=MODEL)
    assert hit.cost == Decimal("0.0123")
    assert hit.expires_at - hit.created_at == timedelta(seconds=3600)


def test_unicode_answer_round_trips(default_policy):
    text = "Köln · 東京 · emoji \U0001f600 · lone surrogate-free"
    assert cache_service.cache_response("q", {"content": text}, model=MODEL)
    assert cache_service.get_cached_response("q", model=MODEL).content == text


def test_unknown_policy_bypasses_the_cache(default_policy, redis_client, ragcache_prefix):
    llm = Counter("x")
    for _ in range(2):
        assert cache_service.get_or_call("q", llm, model=MODEL, policy="no-such-policy").hit is False
    assert llm.calls == 2
    assert cache_service.cache_response("q", "x", model=MODEL, policy="no-such-policy") is False
    assert entry_keys(redis_client, ragcache_prefix) == []


def test_call_errors_propagate_and_nothing_is_stored(default_policy, redis_client, ragcache_prefix):
    def broken():
        raise RuntimeError("LLM down")

    with pytest.raises(RuntimeError, match="LLM down"):
        cache_service.get_or_call("q", broken, model=MODEL)
    assert entry_keys(redis_client, ragcache_prefix) == []
    assert not redis_client.exists(cache_key("q").lock)  # the leader released its lock


# --- scope isolation -------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["user", "tenant"])
def test_one_scopes_answer_is_never_served_to_another(policy_factory, kind):
    policy_factory("private", scope=kind)
    alice = cache_service.get_or_call("my salary?", lambda: "Alice's salary", model=MODEL, policy="private",
                                      scope="alice")
    bob = cache_service.get_or_call("my salary?", lambda: "Bob's salary", model=MODEL, policy="private", scope="bob")
    assert (alice.hit, bob.hit) == (False, False)
    assert bob.response == "Bob's salary"
    assert cache_service.get_cached_response("my salary?", model=MODEL, policy="private", scope="bob").content == (
        "Bob's salary"
    )
    assert cache_service.get_cached_response("my salary?", model=MODEL, policy="private", scope="alice").content == (
        "Alice's salary"
    )
    assert cache_service.get_cached_response("my salary?", model=MODEL, policy="private", scope="carol") is None


def test_tenant_and_user_with_the_same_id_do_not_share(policy_factory):
    policy = policy_factory("shared-id", scope="tenant")
    assert cache_service.cache_response("q", "tenant 42's answer", model=MODEL, policy="shared-id", scope=42)
    assert cache_service.get_cached_response("q", model=MODEL, policy="shared-id", scope=42) is not None
    updated = policy_factory("shared-id", scope="user")  # same generation: only the scope kind differs
    assert updated.generation == policy.generation
    assert cache_service.get_cached_response("q", model=MODEL, policy="shared-id", scope=42) is None


@pytest.mark.parametrize("kind", ["user", "tenant"])
def test_scoped_policy_without_scope_raises(policy_factory, redis_client, ragcache_prefix, kind):
    policy_factory("private", scope=kind)
    llm = Counter("x")
    with pytest.raises(ScopeRequiredError) as info:
        cache_service.get_or_call("q", llm, model=MODEL, policy="private")
    assert isinstance(info.value, ValueError)
    assert kind in str(info.value) and "scope=" in str(info.value)
    assert llm.calls == 0
    with pytest.raises(ScopeRequiredError):
        cache_service.get_cached_response("q", model=MODEL, policy="private")
    with pytest.raises(ScopeRequiredError):
        cache_service.cache_response("q", "x", model=MODEL, policy="private")
    assert entry_keys(redis_client, ragcache_prefix) == []


def test_global_policy_needs_no_scope(default_policy):
    assert cache_service.get_or_call("q", lambda: "x", model=MODEL).response == "x"


# --- TTL -----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_entry_expires_after_its_ttl(policy_factory, redis_client):
    policy_factory("default", ttl_seconds=1)
    assert cache_service.cache_response("q", "x", model=MODEL)
    key = cache_key("q").redis_key
    assert 0 < redis_client.pttl(key) <= 1000
    assert cache_service.get_cached_response("q", model=MODEL) is not None
    time.sleep(1.3)
    assert cache_service.get_cached_response("q", model=MODEL) is None
    assert redis_client.exists(key) == 0


def test_per_call_ttl_is_capped_by_the_policy(policy_factory, redis_client):
    policy_factory("default", ttl_seconds=100)
    assert cache_service.cache_response("long", "x", model=MODEL, ttl=10_000)
    assert 0 < redis_client.pttl(cache_key("long").redis_key) <= 100_000
    assert cache_service.cache_response("short", "x", model=MODEL, ttl=5)
    assert 0 < redis_client.pttl(cache_key("short").redis_key) <= 5_000


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "60"])
def test_bad_per_call_ttl_is_a_clear_error(default_policy, bad):
    with pytest.raises(InvalidRequestError):
        cache_service.cache_response("q", "x", model=MODEL, ttl=bad)


def test_every_stored_key_has_an_expiry(policy_factory, redis_client, ragcache_prefix):
    policy_factory("default")
    policy_factory("private", scope="user", compress_threshold_bytes=10)
    cache_service.get_or_call("a", lambda: openai_answer(), model=MODEL)
    cache_service.cache_response("b", "x" * 5000, model=MODEL, ttl=30)
    cache_service.get_or_call("c", lambda: "y", model=MODEL, policy="private", scope=1)
    cache_service.get_or_call("c", lambda: "y", model=MODEL, policy="private", scope=1)
    # A leader that crashed mid-call leaves its lock and its flight behind.
    def crash():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache_service.get_or_call("d", crash, model=MODEL)
    cache_service.get_or_call("e", lambda: "z", model=MODEL, sources=["doc:1"])  # a source stamp
    every = [k.decode() for k in redis_client.scan_iter(match=f"{ragcache_prefix}:*")]
    assert len(entry_keys(redis_client, ragcache_prefix)) == 4
    assert any(":f:" in k for k in every) and any(":s:" in k for k in every)
    # The usage streams (drained by aggregation) and the policy version copies are the
    # only keys meant to live without a TTL.
    layout = keys.layout(ragcache_prefix)
    permanent = set(layout.streams) | set(layout.versions)
    for key in every:
        if key not in permanent:
            assert redis_client.pttl(key) > 0, key


def test_a_hit_does_not_extend_the_ttl(policy_factory, redis_client):
    policy_factory("default", ttl_seconds=100)
    assert cache_service.cache_response("q", "x", model=MODEL)
    key = cache_key("q").redis_key
    time.sleep(0.05)  # so that a refreshed TTL would be visibly longer
    before = redis_client.pttl(key)
    assert before < 100_000
    for _ in range(3):
        assert cache_service.get_or_call("q", lambda: "y", model=MODEL).hit
    assert cache_service.get_cached_response("q", model=MODEL) is not None
    assert 0 < redis_client.pttl(key) <= before


def test_restoring_an_entry_resets_its_value_and_ttl(policy_factory, redis_client):
    policy_factory("default", ttl_seconds=100)
    assert cache_service.cache_response("q", "old", model=MODEL, ttl=5)
    assert cache_service.cache_response("q", "new", model=MODEL)
    assert redis_client.pttl(cache_key("q").redis_key) > 5_000
    assert cache_service.get_cached_response("q", model=MODEL).content == "new"


# --- modes, flags, rollout -------------------------------------------------------------------

def test_read_only_serves_hits_but_never_stores(policy_factory, redis_client, ragcache_prefix):
    policy_factory("default", mode="on")
    assert cache_service.cache_response("old", "stored earlier", model=MODEL)
    policy_factory("default", mode="read_only")
    assert cache_service.get_cached_response("old", model=MODEL).content == "stored earlier"
    assert cache_service.get_or_call("old", lambda: "fresh", model=MODEL).hit is True
    assert cache_service.cache_response("new", "x", model=MODEL) is False
    llm = Counter("fresh")
    for _ in range(2):
        assert cache_service.get_or_call("new", llm, model=MODEL).hit is False
    assert llm.calls == 2
    assert entry_keys(redis_client, ragcache_prefix) == [cache_key("old").redis_key]
    assert not redis_client.exists(cache_key("new").lock)


def test_shadow_looks_up_and_records_but_always_calls(policy_factory, redis_client, ragcache_prefix):
    policy_factory("default", mode="on")
    assert cache_service.cache_response("q", "stored", model=MODEL)
    policy_factory("default", mode="shadow")
    assert cache_service.get_cached_response("q", model=MODEL) is None
    llm = Counter("fresh")
    result = cache_service.get_or_call("q", llm, model=MODEL)
    assert (result.hit, result.response, llm.calls) == (False, "fresh", 1)
    assert [r for r, _ in stream_results(redis_client, ragcache_prefix)].count("shadow_hit") == 2
    # Misses are stored, so shadow mode can measure would-be hits.
    assert cache_service.get_or_call("other", llm, model=MODEL).hit is False
    assert cache_key("other").redis_key in entry_keys(redis_client, ragcache_prefix)
    assert cache_service.get_or_call("other", llm, model=MODEL).hit is False
    assert llm.calls == 3


@pytest.mark.parametrize("change", [{"mode": "off"}, {"enabled": False}], ids=["mode off", "disabled"])
def test_off_and_disabled_do_nothing(policy_factory, redis_client, ragcache_prefix, change):
    policy_factory("default", mode="on", enabled=True)
    assert cache_service.cache_response("old", "stored", model=MODEL)
    events_before = stream_results(redis_client, ragcache_prefix)
    policy_factory("default", **change)
    assert cache_service.get_cached_response("old", model=MODEL) is None
    assert cache_service.cache_response("new", "x", model=MODEL) is False
    llm = Counter("fresh")
    assert cache_service.get_or_call("old", llm, model=MODEL).hit is False
    assert cache_service.get_or_call("new", llm, model=MODEL).hit is False
    assert llm.calls == 2
    assert entry_keys(redis_client, ragcache_prefix) == [cache_key("old").redis_key]
    new_events = stream_results(redis_client, ragcache_prefix)[len(events_before):]
    assert new_events and {r for r, _ in new_events} == {"bypass"}


def test_kill_switch_stops_lookups_and_stores(default_policy, redis_client, ragcache_prefix):
    assert cache_service.cache_response("old", "stored", model=MODEL)
    events_before = stream_results(redis_client, ragcache_prefix)
    CacheFlags.objects.update_or_create(pk=1, defaults={"kill_switch": True})
    registry.invalidate()
    assert cache_service.get_cached_response("old", model=MODEL) is None
    assert cache_service.cache_response("new", "x", model=MODEL) is False
    llm = Counter("fresh")
    assert cache_service.get_or_call("old", llm, model=MODEL).response == "fresh"
    assert llm.calls == 1
    assert entry_keys(redis_client, ragcache_prefix) == [cache_key("old").redis_key]
    # Each lookup is recorded once, as a bypass with its reason; the store is no lookup.
    assert stream_results(redis_client, ragcache_prefix)[len(events_before):] == [("bypass", "kill_switch")] * 2
    CacheFlags.objects.filter(pk=1).update(kill_switch=False)
    registry.invalidate()
    assert cache_service.get_cached_response("old", model=MODEL).content == "stored"


def test_tracking_off_records_no_events_but_still_caches(default_policy, redis_client, ragcache_prefix):
    CacheFlags.objects.update_or_create(pk=1, defaults={"tracking_enabled": False})
    registry.invalidate()
    assert cache_service.get_or_call("q", lambda: "x", model=MODEL).hit is False
    assert cache_service.get_or_call("q", lambda: "x", model=MODEL).hit is True
    assert cache_service.cache_response("r", "", model=MODEL) is False  # a refusal
    assert stream_results(redis_client, ragcache_prefix) == []


def test_rollout_is_deterministic_per_question(policy_factory, redis_client, ragcache_prefix):
    policy_factory("default", rollout_percent=30)
    questions = [f"question number {i}" for i in range(300)]
    stored = {}
    for q in questions:
        result = cache_service.get_or_call(q, lambda: "answer", model=MODEL)
        assert result.hit is False
        stored[q] = keys.rollout_bucket(result.key.rsplit(":", 1)[1]) < 30
    in_redis = set(entry_keys(redis_client, ragcache_prefix))
    for q in questions:
        assert (cache_key(q).redis_key in in_redis) == stored[q], q
        # The same question gets the same decision on every later call.
        assert cache_service.get_or_call(q, lambda: "other", model=MODEL).hit == stored[q]
        assert (cache_service.get_cached_response(q, model=MODEL) is not None) == stored[q]
    share = sum(stored.values()) / len(questions)
    assert 0.2 < share < 0.4


@pytest.mark.parametrize(("percent", "expected"), [(0, 0), (100, 20)])
def test_rollout_extremes(policy_factory, redis_client, ragcache_prefix, percent, expected):
    policy_factory("default", rollout_percent=percent)
    for i in range(20):
        cache_service.get_or_call(f"q{i}", lambda: "a", model=MODEL)
    assert len(entry_keys(redis_client, ragcache_prefix)) == expected


# --- admission ------------------------------------------------------------------------------

class Unserialisable:
    pass


REFUSALS = {
    "exception": (ValueError("boom"), "error"),
    "empty string": ("", "empty"),
    "whitespace": ("  \n\t ", "empty"),
    "empty content": ({"content": ""}, "empty"),
    "whitespace choice": (openai_answer(text="   "), "empty"),
    "no content": ({"choices": [{"message": {"role": "assistant"}}]}, "empty"),
    "second choice truncated": ({"choices": [{"message": {"content": "a"}, "finish_reason": "stop"},
                                             {"message": {"content": "b"}, "finish_reason": "length"}]}, "truncated"),
    "second choice filtered": ({"choices": [{"message": {"content": "a"}, "finish_reason": "stop"},
                                            {"message": {"content": "b"}, "finish_reason": "content_filter"}]},
                               "content_filter"),
    "anthropic max_tokens": ({"content": [{"type": "text", "text": "half"}], "stop_reason": "max_tokens"},
                             "truncated"),
    "refusal": ({"choices": [{"message": {"content": None, "refusal": "I can't."}, "finish_reason": "stop"}]},
                "refusal"),
    "negative usage": (openai_answer(usage={"prompt_tokens": -5, "completion_tokens": 1}), "invalid_usage"),
    "fractional usage": (openai_answer(usage={"prompt_tokens": 1.5, "completion_tokens": 1}), "invalid_usage"),
    "absurd usage": (openai_answer(usage={"prompt_tokens": 10**12, "completion_tokens": 1}), "invalid_usage"),
    "cached over prompt": (openai_answer(usage={"prompt_tokens": 5, "completion_tokens": 1,
                                                "prompt_tokens_details": {"cached_tokens": 9}}), "invalid_usage"),
    "negative cost": (openai_answer(cost="-1"), "invalid_cost"),
    "infinite cost": (openai_answer(cost=float("inf")), "invalid_cost"),
    "text cost": (openai_answer(cost="free"), "invalid_cost"),
    "truncated": (openai_answer(finish_reason="length"), "truncated"),
    "truncated flat": ({"content": "half an ans", "finish_reason": "length"}, "truncated"),
    "content filter": (openai_answer(finish_reason="content_filter"), "content_filter"),
    "error payload": ({"content": "x", "error": {"message": "rate limited"}}, "error"),
    "too large": ({"content": "x" * 3000}, "too_large"),
    "not serialisable": ({"content": "x", "extra": Unserialisable()}, "not_serializable"),
    "nan": ({"content": "x", "score": float("nan")}, "not_serializable"),
    "int": (42, "unsupported"),
    "list": (["a"], "unsupported"),
    "none": (None, "unsupported"),
    "bytes": (b"bytes", "unsupported"),
}


@pytest.mark.parametrize(("response", "reason"), list(REFUSALS.values()), ids=list(REFUSALS))
def test_admission_refusals(policy_factory, redis_client, ragcache_prefix, ragcache_log, response, reason):
    policy_factory("default", max_entry_bytes=2000, compress_threshold_bytes=0)
    assert cache_service.cache_response("q", response, model=MODEL) is False
    assert entry_keys(redis_client, ragcache_prefix) == []
    assert ("refused", reason) in stream_results(redis_client, ragcache_prefix)
    refusal_logs = [r.getMessage() for r in ragcache_log.records if r.getMessage().startswith(STEP_68_PREFIX)]
    assert len(refusal_logs) == 1
    attrs = json.loads(refusal_logs[0][len(STEP_68_PREFIX):])
    assert attrs["stored"] is False and attrs["reason"] == reason


def test_refused_answer_from_get_or_call_is_returned_not_stored(default_policy, redis_client, ragcache_prefix):
    llm = Counter(openai_answer(finish_reason="length"))
    for _ in range(2):
        result = cache_service.get_or_call("q", llm, model=MODEL)
        assert result.hit is False and result.response["choices"][0]["finish_reason"] == "length"
    assert llm.calls == 2
    assert entry_keys(redis_client, ragcache_prefix) == []
    assert not redis_client.exists(cache_key("q").lock)


def test_size_limit_applies_after_compression(policy_factory):
    policy_factory("default", max_entry_bytes=2000, compress_threshold_bytes=100)
    assert cache_service.cache_response("q", {"content": "y" * 50_000}, model=MODEL)
    assert cache_service.get_cached_response("q", model=MODEL).content == "y" * 50_000


def test_tool_call_answers_are_cached(default_policy):
    answer = {"choices": [{"message": {"role": "assistant", "content": None,
                                       "tool_calls": [{"id": "call_1", "type": "function",
                                                       "function": {"name": "weather", "arguments": "{}"}}]},
                           "finish_reason": "tool_calls"}], "usage": {"prompt_tokens": 9, "completion_tokens": 4}}
    llm = Counter(answer)
    assert cache_service.get_or_call("weather?", llm, model=MODEL).stored
    hit = cache_service.get_or_call("weather?", llm, model=MODEL)
    assert hit.hit and hit.response == answer and hit.cached.content is None and hit.cached.tokens == 13
    assert llm.calls == 1


def test_openai_like_object_with_model_dump(default_policy):
    class Completion:
        def model_dump(self):
            return openai_answer("from an SDK object")

    assert cache_service.cache_response("q", Completion(), model=MODEL)
    assert cache_service.get_cached_response("q", model=MODEL).content == "from an SDK object"


# --- compression ------------------------------------------------------------------------

def test_large_entries_are_zlib_compressed(policy_factory, redis_client):
    policy_factory("default", compress_threshold_bytes=200)
    answer = openai_answer("All work and no play. " * 200)
    assert cache_service.cache_response("big", answer, model=MODEL)
    body = redis_client.hget(cache_key("big").redis_key, "b")
    assert len(body) < 1000
    assert json.loads(zlib.decompress(body)) == answer
    assert json.loads(redis_client.hget(cache_key("big").redis_key, "m"))["z"] == 1
    assert cache_service.get_cached_response("big", model=MODEL).response == answer


def test_small_entries_are_plain_json(policy_factory, redis_client):
    policy_factory("default", compress_threshold_bytes=4096)
    assert cache_service.cache_response("small", "short answer", model=MODEL)
    assert json.loads(redis_client.hget(cache_key("small").redis_key, "b")) == "short answer"
    assert json.loads(redis_client.hget(cache_key("small").redis_key, "m"))["z"] == 0


def test_compression_threshold_zero_never_compresses(policy_factory, redis_client):
    policy_factory("default", compress_threshold_bytes=0)
    assert cache_service.cache_response("q", "z" * 10_000, model=MODEL)
    assert json.loads(redis_client.hget(cache_key("q").redis_key, "b")) == "z" * 10_000


def test_no_pickle_in_redis(default_policy, redis_client):
    assert cache_service.cache_response("q", openai_answer(), model=MODEL)
    fields = redis_client.hgetall(cache_key("q").redis_key)
    assert set(fields) == {b"m", b"b", b"s"}  # s: the source stamps, none here
    assert fields.pop(b"s") == b""
    for value in fields.values():
        assert not value.startswith(b"\x80")  # pickle protocol 2+ header
        json.loads(value)


# --- corrupt and foreign entries --------------------------------------------------------------

def _plant_string(client, key):
    client.delete(key)
    client.set(key, "not a ragcache entry", ex=60)


def _plant_list(client, key):
    client.delete(key)
    client.rpush(key, "a", "b")
    client.expire(key, 60)


def _plant_hash(meta, body):
    def plant(client, key):
        client.delete(key)
        client.hset(key, mapping={"m": meta, "b": body})
        client.expire(key, 60)

    return plant


def _truncate_body(client, key):
    client.hset(key, "b", client.hget(key, "b")[:-5])


def _garbage_body_same_length(client, key):
    client.hset(key, "b", b"\xff" * len(client.hget(key, "b")))


CORRUPTIONS = {
    "string at key": _plant_string,
    "list at key": _plant_list,
    "hash without meta": _plant_hash("", '"x"'),
    "hash with non-JSON meta": _plant_hash("garbage", '"x"'),
    "old schema meta": _plant_hash('{"v":0,"n":3}', '"x"'),
    "future schema meta": _plant_hash('{"v":2,"n":3}', '"x"'),
    "meta with our prefix but broken JSON": _plant_hash('{"v":2,"n":3 broken', "abc"),
    "meta missing fields": _plant_hash('{"v":2,"n":7}', '"hello"'),
    "negative tokens in meta": _plant_hash('{"v":2,"k":"r","model":"m","pt":-5,"at":1,"exp":2,"z":0,"n":7}',
                                           '"hello"'),
    "negative cost in meta": _plant_hash('{"v":2,"k":"r","model":"m","cost":"-1","at":1,"exp":2,"z":0,"n":7}',
                                         '"hello"'),
    "absurd latency in meta": _plant_hash('{"v":2,"k":"r","model":"m","lat":1e300,"at":1,"exp":2,"z":0,"n":7}',
                                          '"hello"'),
    "body not JSON": _plant_hash('{"v":2,"k":"r","model":"m","at":1,"exp":2,"z":0,"n":3}', "abc"),
    "body claims compression": _plant_hash('{"v":2,"k":"r","model":"m","at":1,"exp":2,"z":1,"n":3}', '"x"'),
    "truncated body": _truncate_body,
    "garbage body of the recorded length": _garbage_body_same_length,
}


@pytest.mark.parametrize("corrupt", list(CORRUPTIONS.values()), ids=list(CORRUPTIONS))
def test_corrupt_or_foreign_entry_is_a_miss_and_deleted(default_policy, redis_client, ragcache_log, corrupt):
    key = cache_key("q").redis_key
    assert cache_service.cache_response("q", openai_answer(), model=MODEL)
    corrupt(redis_client, key)
    assert cache_service.get_cached_response("q", model=MODEL) is None
    assert redis_client.exists(key) == 0
    warnings = [r for r in ragcache_log.records
                if r.levelno == logging.WARNING and "unreadable entry" in r.getMessage()]
    assert len(warnings) == 1
    # get_or_call recovers by itself: it calls, stores a good entry, and hits next time.
    assert cache_service.cache_response("q", openai_answer(), model=MODEL)
    corrupt(redis_client, key)
    llm = Counter(openai_answer("fresh"))
    assert cache_service.get_or_call("q", llm, model=MODEL).hit is False
    assert cache_service.get_or_call("q", llm, model=MODEL).response == openai_answer("fresh")
    assert llm.calls == 1


# --- single flight ----------------------------------------------------------------------------

def _run_threads(n, target):
    results, errors = [None] * n, [None] * n
    barrier = threading.Barrier(n)

    def run(i):
        barrier.wait()
        try:
            results[i] = target(i)
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertions
            errors[i] = exc

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    return results, errors


def test_concurrent_identical_misses_make_one_call(default_policy, ragcache_settings):
    ragcache_settings(LOCK_WAIT=20.0)
    registry.current()  # warm the snapshot in this thread; workers then need no SQL
    llm = Counter(lambda n: openai_answer(f"answer #{n}"), delay=0.5)
    results, errors = _run_threads(8, lambda i: cache_service.get_or_call("same question", llm, model=MODEL))
    assert errors == [None] * 8
    assert llm.calls == 1
    assert {r.response["choices"][0]["message"]["content"] for r in results} == {"answer #1"}
    assert sorted(r.hit for r in results) == [False] + [True] * 7


def test_waiting_followers_are_counted_once_each_in_metrics(default_policy, ragcache_settings):
    """Followers wait on the leader's flight; each request is still one lookup in the
    metrics (as in the usage stream), not one per read of the flight."""
    from prometheus_client import REGISTRY

    def lookups(result):
        return REGISTRY.get_sample_value("ragcache_lookups_total", {"policy": "default", "result": result}) or 0.0

    ragcache_settings(LOCK_WAIT=20.0)
    registry.current()
    before = {r: lookups(r) for r in ("hit", "miss")}
    llm = Counter(openai_answer("slow answer"), delay=0.5)
    results, errors = _run_threads(6, lambda i: cache_service.get_or_call("polled question", llm, model=MODEL))
    assert errors == [None] * 6 and llm.calls == 1
    assert lookups("miss") - before["miss"] == 1
    assert lookups("hit") - before["hit"] == 5


@pytest.mark.parametrize("mode", ["read_only", "shadow"])
def test_modes_that_never_serve_a_leaders_answer_do_not_queue(policy_factory, ragcache_settings, mode):
    """Read-only never stores and shadow always calls: a follower would wait for nothing,
    so identical concurrent misses must all call at once (the barrier breaks otherwise)."""
    policy_factory("default", mode=mode)
    ragcache_settings(LOCK_WAIT=20.0)
    registry.current()
    inside = threading.Barrier(4, timeout=10)

    def llm():
        inside.wait()  # every call must be running at the same time to get past this
        return "x"

    results, errors = _run_threads(4, lambda i: cache_service.get_or_call("same", llm, model=MODEL))
    assert errors == [None] * 4
    assert [r.response for r in results] == ["x"] * 4


def test_distinct_questions_do_not_wait_for_each_other(default_policy):
    registry.current()
    llm = Counter("x", delay=0.2)
    results, errors = _run_threads(4, lambda i: cache_service.get_or_call(f"q{i}", llm, model=MODEL))
    assert errors == [None] * 4
    assert llm.calls == 4 and not any(r.hit for r in results)


class Overlap:
    """Records how many calls run at the same time (the most seen at once)."""

    def __init__(self):
        self.running = 0
        self.most = 0
        self._lock = threading.Lock()

    def __enter__(self):
        with self._lock:
            self.running += 1
            self.most = max(self.most, self.running)

    def __exit__(self, *exc):
        with self._lock:
            self.running -= 1


def test_leader_failure_releases_every_follower_at_once(default_policy, ragcache_settings):
    """The leader's call raises: every waiting follower is released at the same moment and
    calls the LLM itself, side by side, instead of queueing for the lock one after another."""
    ragcache_settings(LOCK_WAIT=20.0)
    registry.current()
    overlap = Overlap()

    def flaky(n):
        with overlap:
            time.sleep(0.3)  # long enough for the others to become followers
        if n == 1:
            raise RuntimeError("leader's LLM call failed")
        return f"answer #{n}"

    llm = Counter(flaky)
    results, errors = _run_threads(6, lambda i: cache_service.get_or_call("same", llm, model=MODEL))
    failed = [e for e in errors if e is not None]
    assert len(failed) == 1 and "leader's LLM call failed" in str(failed[0])
    assert llm.calls == 6
    assert overlap.most == 5  # the five released followers called at the same time
    assert all(r.reason == "leader_released" for r in results if r is not None)


@pytest.mark.parametrize("uncacheable", ["truncated", "raises"])
def test_no_convoy_when_the_answer_cannot_be_cached(default_policy, ragcache_settings, uncacheable):
    """8 identical concurrent calls whose answer is not stored: followers are released the
    moment the leader finishes, and call side by side (not 8 calls one after another)."""
    ragcache_settings(LOCK_WAIT=20.0)
    registry.current()
    overlap = Overlap()

    def llm_call(n):
        with overlap:
            time.sleep(0.4)
        if uncacheable == "raises":
            raise RuntimeError("upstream error")
        return openai_answer("cut off", finish_reason="length")

    llm = Counter(llm_call)
    started = {}

    def one(i):
        started[i] = time.monotonic()
        try:
            return cache_service.get_or_call("convoy", llm, model=MODEL)
        finally:
            started[i] = time.monotonic() - started[i]

    results, errors = _run_threads(8, one)
    assert llm.calls == 8
    assert overlap.most == 7  # the leader, then all seven followers at once
    if uncacheable == "raises":
        assert all(isinstance(e, RuntimeError) for e in errors)
    else:
        assert errors == [None] * 8 and not any(r.stored for r in results)
    # Reported, not asserted as a timing: the worst caller waited about two calls, not eight.
    print(f"convoy ({uncacheable}): worst caller {max(started.values()):.2f} s for 0.4 s calls")


def test_follower_calls_itself_when_the_leader_vanishes(default_policy, ragcache_settings, redis_client):
    ragcache_settings(LOCK_WAIT=0.3)
    lock_key = cache_key("q").lock
    redis_client.set(lock_key, "a leader that died", px=60_000)
    llm = Counter("my own answer")
    result = cache_service.get_or_call("q", llm, model=MODEL)
    assert (result.hit, result.response, llm.calls) == (False, "my own answer", 1)
    # It stored its answer without touching the other owner's lock.
    assert cache_service.get_cached_response("q", model=MODEL).content == "my own answer"
    assert redis_client.get(lock_key) == b"a leader that died"


# --- Redis outages ----------------------------------------------------------------------------

@pytest.mark.slow
def test_redis_down_degrades_to_misses_and_recovers(private_redis, default_policy, ragcache_settings):
    ragcache_settings(BREAKER_COOLDOWN=0.2)
    llm = Counter(lambda n: f"answer #{n}")
    assert cache_service.get_or_call("q", llm, model=MODEL).hit is False
    assert cache_service.get_or_call("q", llm, model=MODEL).hit is True

    private_redis.stop()
    for _ in range(2):  # the first call trips the breaker, the second finds it open
        result = cache_service.get_or_call("q", llm, model=MODEL)
        assert result.hit is False and result.response.startswith("answer #")
        assert cache_service.cache_response("other", "x", model=MODEL) is False
        assert cache_service.get_cached_response("q", model=MODEL) is None
    assert llm.calls == 3

    private_redis.start()  # same port, empty data
    time.sleep(0.3)  # past the breaker's cooldown
    assert cache_service.get_or_call("q", llm, model=MODEL).hit is False
    result = cache_service.get_or_call("q", llm, model=MODEL)
    assert result.hit is True and result.response == "answer #4"
    assert cache_service.cache_response("other", "x", model=MODEL) is True


@pytest.mark.slow
def test_redis_down_before_first_use(private_redis, default_policy, ragcache_settings):
    ragcache_settings(BREAKER_COOLDOWN=0.2)
    private_redis.stop()
    assert cache_service.get_or_call("q", lambda: "x", model=MODEL).response == "x"
    assert cache_service.cache_response("q", "x", model=MODEL) is False
    private_redis.start()
    time.sleep(0.3)
    assert cache_service.get_or_call("q", lambda: "x", model=MODEL).hit is False
    assert cache_service.get_or_call("q", lambda: "y", model=MODEL).response == "x"


# --- zero SQL on the hit path -----------------------------------------------------------------

def test_a_hit_runs_no_sql(default_policy, django_assert_num_queries):
    cache_service.get_or_call("q", lambda: openai_answer(), model=MODEL)  # warm-up: loads the snapshot
    assert cache_service.get_cached_response("q", model=MODEL) is not None
    with django_assert_num_queries(0):
        hit = cache_service.get_cached_response("q", model=MODEL)
        result = cache_service.get_or_call("q", lambda: "never called", model=MODEL)
    assert hit is not None and result.hit is True
    with django_assert_num_queries(0):
        assert cache_service.get_or_call("another", lambda: "x", model=MODEL).hit is False
        assert cache_service.cache_response("third", "x", model=MODEL) is True


def test_a_scoped_hit_runs_no_sql(policy_factory, django_assert_num_queries):
    policy_factory("private", scope="user")
    cache_service.get_or_call("q", lambda: "x", model=MODEL, policy="private", scope=7)
    with django_assert_num_queries(0):
        assert cache_service.get_or_call("q", lambda: "y", model=MODEL, policy="private", scope=7).hit


# --- logs and privacy --------------------------------------------------------------------------

def test_step_68_log_line(policy_factory, ragcache_log):
    policy_factory("default", ttl_seconds=600)
    service = cache_service
    service.get_cached_response("warm-up", model=MODEL)  # one lookup: the hit rate is defined
    before = datetime.now(UTC)
    assert service.cache_response("q", openai_answer(), model=MODEL)
    lines = [r for r in ragcache_log.records if r.getMessage().startswith(STEP_68_PREFIX)]
    assert len(lines) == 1
    record = lines[0]
    assert record.levelno == logging.INFO and record.name == "ragcache.steps"
    attrs = json.loads(record.getMessage()[len(STEP_68_PREFIX):])
    assert re.fullmatch(r"[0-9a-f]{16}", attrs["cache_key"])
    assert attrs["cache_key"] == cache_key("q").short
    assert attrs["hit_rate"] == 0.0
    expiry = datetime.fromisoformat(attrs["expiry_time"])
    assert expiry.tzinfo is not None
    assert abs((expiry - before).total_seconds() - 600) < 5
    assert attrs["policy"] == "default"
    assert attrs["ttl"] == 600
    assert isinstance(attrs["bytes"], int) and attrs["bytes"] > 0
    assert record.rag_step == 68 and record.rag_attrs == attrs


def test_hit_rate_in_step_68_follows_lookups(default_policy, ragcache_log):
    service = cache_service
    service.cache_response("a", "x", model=MODEL)
    for _ in range(3):
        service.get_cached_response("a", model=MODEL)
    service.get_cached_response("miss", model=MODEL)
    service.cache_response("b", "x", model=MODEL)
    lines = [r.getMessage() for r in ragcache_log.records if r.getMessage().startswith(STEP_68_PREFIX)]
    assert json.loads(lines[-1][len(STEP_68_PREFIX):])["hit_rate"] == 0.75


def test_question_text_never_reaches_logs_or_redis_keys(policy_factory, redis_client, ragcache_prefix, ragcache_log):
    secret = "Quokka-Zebra private question"
    policy_factory("default", normalize_query=True)
    policy_factory("private", scope="user")
    cache_service.get_or_call(secret, lambda: openai_answer(), model=MODEL)
    cache_service.get_or_call(secret, lambda: openai_answer(), model=MODEL)
    cache_service.cache_response(secret + "?", "", model=MODEL)  # refusal path
    cache_service.get_or_call(secret, lambda: "x", model=MODEL, policy="private", scope="user-1")
    cache_service.get_or_call(secret, lambda: "x", model=MODEL, policy="no-such-policy")
    assert ragcache_log.records
    forms = {secret, secret.lower(), "quokka", "Quokka", "zebra"}  # none can occur in a hex digest
    for record in ragcache_log.records:
        text = record.getMessage() + json.dumps(getattr(record, "rag_attrs", {}), default=str)
        assert not any(f in text for f in forms), text
    names = [k.decode() for k in redis_client.scan_iter(match=f"{ragcache_prefix}:*")]
    assert names
    for name in names:
        assert not any(f in name for f in forms), name
    # Usage events carry hashes only.
    for _id, fields in stream_events(redis_client, ragcache_prefix):
        assert not any(f.encode() in v for f in forms for v in fields.values())


# --- async twins -----------------------------------------------------------------------------------

def test_async_twins(default_policy):
    async def scenario():
        assert await cache_service.aget_cached_response("q", model=MODEL) is None
        assert await cache_service.acache_response("q", openai_answer("async stored"), model=MODEL) is True
        hit = await cache_service.aget_cached_response("q", model=MODEL)
        assert hit.content == "async stored"

        calls = []

        async def llm():
            calls.append(1)
            await asyncio.sleep(0.01)
            return "from a coroutine"

        first = await cache_service.aget_or_call("a", llm, model=MODEL)
        second = await cache_service.aget_or_call("a", llm, model=MODEL)
        assert (first.hit, second.hit) == (False, True)
        assert first.response == second.response == "from a coroutine"
        assert len(calls) == 1
        sync_result = await cache_service.aget_or_call("b", lambda: "from a plain function", model=MODEL)
        assert sync_result.response == "from a plain function"
        assert (await cache_service.aget_or_call("b", lambda: "no", model=MODEL)).hit is True

    async_to_sync(scenario)()


def test_async_scope_error_and_call_error(policy_factory):
    policy_factory("private", scope="tenant")

    async def scenario():
        with pytest.raises(ScopeRequiredError):
            await cache_service.aget_or_call("q", lambda: "x", model=MODEL, policy="private")

        async def broken():
            raise RuntimeError("async LLM down")

        with pytest.raises(RuntimeError, match="async LLM down"):
            await cache_service.aget_or_call("q", broken, model=MODEL, policy="private", scope=1)
        result = await cache_service.aget_or_call("q", lambda: "ok", model=MODEL, policy="private", scope=1)
        assert result.hit is False  # the failed call stored nothing and left no lock behind

    async_to_sync(scenario)()


def test_async_concurrent_identical_misses_make_one_call(default_policy, ragcache_settings):
    ragcache_settings(LOCK_WAIT=20.0)
    registry.current()
    calls = []

    async def llm():
        calls.append(1)
        await asyncio.sleep(0.3)
        return "shared"

    async def scenario():
        return await asyncio.gather(*(cache_service.aget_or_call("same", llm, model=MODEL) for _ in range(4)))

    results = async_to_sync(scenario)()
    assert [r.response for r in results] == ["shared"] * 4
    assert len(calls) == 1
