"""The OpenAI-compatible gateway (POST /v1/chat/completions) on a live uvicorn server, in front
of the fake OpenAI upstream: the real ``openai`` SDK sync and async, JSON and streams; raw
bytes; isolation by key; every cache control allowed and refused; every error path; a client
that goes away mid-stream; usage by key name; WSGI."""
from __future__ import annotations

import http.server
import json
import logging
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import httpx
import openai
import orjson
import pytest
from asgiref.sync import async_to_sync
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from ragcache.aggregation import aggregate
from ragcache.models import CacheFlags, GatewayKey, ModelPrice, UsageRecord
from ragcache.policies import registry
from ragcache.services import cache_service

from .conftest import free_port
from .gateway_helpers import (
    MODEL,
    UPSTREAM_KEY,
    data_events,
    entries,
    events,
    locks,
    question,
    wait_for,
)

ALL_CONTROLS = ("no-cache", "no-store", "max-age", "policy", "sources")


def error_of(response: httpx.Response) -> dict:
    """The OpenAI-shaped error body (asserting its shape)."""
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


# --- the openai SDK, sync and async, JSON and streams ------------------------------------------------

def test_sdk_json_miss_then_hit(gateway):
    client = gateway.sdk(gateway.key())
    messages = question("sdk json")
    first = client.chat.completions.with_raw_response.create(model=MODEL, messages=messages, temperature=0)
    second = client.chat.completions.with_raw_response.create(model=MODEL, messages=messages, temperature=0)
    assert (first.headers["x-ragcache"], second.headers["x-ragcache"]) == ("MISS", "HIT")
    assert first.headers["x-ragcache-key"] == second.headers["x-ragcache-key"]
    assert len(second.headers["x-ragcache-key"]) == 16 and second.headers["x-ragcache-policy"] == "default"
    assert "age" not in first.headers and int(second.headers["age"]) >= 0
    a, b = first.parse(), second.parse()
    assert type(a) is ChatCompletion and type(b) is ChatCompletion
    assert b.model_dump() == a.model_dump() and b.choices[0].message.content.startswith("Answer ")
    assert gateway.fake.call_count(messages) == 1


def test_sdk_stream_miss_then_hit(gateway):
    client = gateway.sdk(gateway.key())
    messages = question("sdk stream")
    runs = []
    for _ in range(2):
        raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=messages, stream=True,
                                                               stream_options={"include_usage": True})
        chunks = list(raw.parse())
        assert all(type(c) is ChatCompletionChunk for c in chunks)
        runs.append((raw.headers["x-ragcache"], [c.model_dump() for c in chunks]))
    (miss, first), (hit, second) = runs
    assert (miss, hit) == ("MISS", "HIT")
    assert second == first and len(first) > 5
    assert first[-1]["choices"] == [] and first[-1]["usage"]["total_tokens"] > 0  # the usage chunk, replayed
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in first if c["choices"])
    assert text.startswith("Answer ")
    assert gateway.fake.call_count(messages) == 1


def test_async_sdk_json_and_stream(gateway):
    key = gateway.key()
    messages = question("async")

    async def run():
        client = gateway.async_sdk(key)
        json_runs, stream_runs = [], []
        for _ in range(2):
            raw = await client.chat.completions.with_raw_response.create(model=MODEL, messages=messages)
            json_runs.append((raw.headers["x-ragcache"], raw.parse().model_dump()))
        for _ in range(2):
            stream = await client.chat.completions.create(model=MODEL, messages=messages, stream=True)
            stream_runs.append([chunk.model_dump() async for chunk in stream])
        await client.close()
        return json_runs, stream_runs

    json_runs, stream_runs = async_to_sync(run)()
    assert [outcome for outcome, _ in json_runs] == ["MISS", "HIT"]
    assert json_runs[0][1] == json_runs[1][1]
    assert stream_runs[0] == stream_runs[1] and stream_runs[0][-1]["choices"][0]["finish_reason"] == "stop"
    assert gateway.fake.call_count(messages) == 2  # one JSON, one stream: they never share an entry


def test_tool_call_and_reasoning_streams_replay_whole(gateway):
    client = gateway.sdk(gateway.key())
    messages = question("weather")
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    runs = [[c.model_dump() for c in client.chat.completions.create(
        model=f"{MODEL}@tools,reasoning", messages=messages, tools=tools, stream=True)] for _ in range(2)]
    assert runs[1] == runs[0]
    deltas = [c["choices"][0]["delta"] for c in runs[0] if c["choices"]]
    assert any(d.get("reasoning_content") for d in deltas)
    assert any(d.get("tool_calls") for d in deltas) and runs[0][-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert gateway.fake.call_count(messages) == 1


# --- byte for byte ----------------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_a_hit_replays_the_miss_byte_for_byte(gateway, stream):
    key = gateway.key()
    messages = question("bytes")
    params = {"stream_options": {"include_usage": True}} if stream else {}
    miss = gateway.ask(key, messages, stream=stream, **params)
    hit = gateway.ask(key, messages, stream=stream, **params)
    assert (miss.status_code, hit.status_code) == (200, 200)
    assert (miss.headers["x-ragcache"], hit.headers["x-ragcache"]) == ("MISS", "HIT")
    assert hit.content == miss.content
    if stream:
        assert miss.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert miss.content.endswith(b"\n\ndata: [DONE]\n\n")
        chunks = [orjson.loads(d) for d in data_events(miss.content)[:-1]]
        assert len({c["id"] for c in chunks}) == 1 and chunks[-1]["usage"]["completion_tokens"] > 0
        # Each event's data is the upstream's chunk, unchanged (the fake writes orjson too).
        assert [c for c in chunks if c["choices"]][-1]["choices"][0]["finish_reason"] == "stop"
    else:
        assert orjson.loads(miss.content)["object"] == "chat.completion"


def test_identical_concurrent_streams_make_one_upstream_call(gateway):
    key = gateway.key()
    messages = question("fan-out")
    body = {"model": f"{MODEL}@delay=15", "messages": messages, "stream": True}
    with ThreadPoolExecutor(5) as pool:
        responses = list(pool.map(lambda _: gateway.post(key, body), range(5)))
    assert all(r.status_code == 200 for r in responses)
    outcomes = sorted(r.headers["x-ragcache"] for r in responses)
    assert outcomes.count("MISS") == 1 and outcomes.count("HIT") == 4
    texts = {b"".join(data_events(r.content)[:-1]) for r in responses}
    assert len(texts) == 1  # every client got the same chunks
    assert gateway.fake.call_count(messages) == 1


# --- isolation ----------------------------------------------------------------------------------------

def test_keys_with_different_scopes_never_share_answers(gateway, redis_client, ragcache_prefix):
    tenant_a = gateway.key("tenant-a", scope="acme")
    tenant_b = gateway.key("tenant-b", scope="globex")
    messages = question("isolation")
    a1 = gateway.ask(tenant_a, messages)
    b1 = gateway.ask(tenant_b, messages)
    # Nothing in the request can move a key into another scope: not "user", not a header.
    b2 = gateway.ask(tenant_b, messages, user="acme", headers={"X-Ragcache-Scope": "acme"})
    a2 = gateway.ask(tenant_a, messages)
    assert [r.headers["x-ragcache"] for r in (a1, b1, b2, a2)] == ["MISS", "MISS", "HIT", "HIT"]
    assert a2.json()["id"] == a1.json()["id"] != b1.json()["id"] == b2.json()["id"]
    assert gateway.fake.call_count(messages) == 2
    stored = entries(redis_client, ragcache_prefix)
    assert len(stored) == 2 and len({k.split(b":")[-2] for k in stored}) == 2  # two scope hashes


def test_a_per_tenant_policy_needs_a_key_with_a_scope(gateway, policy_factory):
    policy_factory("tenants", mode="on", enabled=True, scope="tenant", ttl_seconds=600)
    unscoped = gateway.key("no-scope", policies=("tenants",))
    scoped = gateway.key("scoped", scope="acme", policies=("tenants",))
    messages = question("tenant policy")
    refused = gateway.ask(unscoped, messages)
    assert refused.status_code == 403 and error_of(refused)["code"] == "scope_required"
    assert [gateway.ask(scoped, messages).headers["x-ragcache-policy"] for _ in range(2)] == ["tenants", "tenants"]
    assert gateway.fake.call_count(messages) == 1


# --- cache controls ---------------------------------------------------------------------------------

REFUSED = [
    ("no-cache", {"Cache-Control": "no-cache"}, "Cache-Control"),
    ("no-store", {"Cache-Control": "no-store"}, "Cache-Control"),
    ("max-age", {"Cache-Control": "max-age=60"}, "Cache-Control"),
    ("policy", {"X-Ragcache-Policy": "default"}, "X-Ragcache-Policy"),
    ("sources", {"X-Ragcache-Sources": "doc:1"}, "X-Ragcache-Sources"),
]


@pytest.mark.parametrize("control, headers, param", REFUSED, ids=[c for c, _, _ in REFUSED])
def test_a_control_the_key_does_not_allow_is_refused(gateway, control, headers, param):
    others = tuple(c for c in ALL_CONTROLS if c != control)  # every other control is allowed
    key = gateway.key(controls=others)
    messages = question("refused control")
    response = gateway.ask(key, messages, headers=headers)
    assert response.status_code == 403
    error = error_of(response)
    assert error["code"] == "cache_control_not_allowed" and error["param"] == param
    assert repr(control) in error["message"]
    assert gateway.fake.call_count(messages) == 0
    with pytest.raises(openai.PermissionDeniedError):
        gateway.sdk(key).chat.completions.create(model=MODEL, messages=messages, extra_headers=headers)


def test_no_cache_refreshes_and_stores(gateway):
    key = gateway.key(controls=("no-cache",))
    messages = question("refresh")
    first = gateway.ask(key, messages)
    refreshed = gateway.ask(key, messages, headers={"Cache-Control": "no-cache"})
    after = gateway.ask(key, messages)
    assert [r.headers["x-ragcache"] for r in (first, refreshed, after)] == ["MISS", "REFRESH", "HIT"]
    assert refreshed.headers["x-ragcache-reason"] == "no_cache"
    assert refreshed.json()["id"] != first.json()["id"] and after.json()["id"] == refreshed.json()["id"]
    assert gateway.fake.call_count(messages) == 2


def test_no_store_serves_a_hit_but_never_stores(gateway, redis_client, ragcache_prefix):
    key = gateway.key(controls=("no-store",))
    messages = question("no-store")
    for _ in range(2):
        assert gateway.ask(key, messages, headers={"Cache-Control": "no-store"}).headers["x-ragcache"] == "MISS"
    assert entries(redis_client, ragcache_prefix) == [] and gateway.fake.call_count(messages) == 2
    stored = gateway.ask(key, messages)
    again = gateway.ask(key, messages, headers={"Cache-Control": "no-store, max-stale"})  # unknown directive ignored
    assert (stored.headers["x-ragcache"], again.headers["x-ragcache"]) == ("MISS", "HIT")
    assert again.json() == stored.json()


def test_max_age_sets_a_shorter_ttl(gateway, redis_client, ragcache_prefix, policy_factory):
    policy_factory("default", mode="on", enabled=True, scope="global", ttl_seconds=3600)
    key = gateway.key(controls=("max-age",))
    messages = question("max-age")
    assert gateway.ask(key, messages, headers={"Cache-Control": "max-age=120"}).headers["x-ragcache"] == "MISS"
    (entry,) = entries(redis_client, ragcache_prefix)
    assert 110_000 < redis_client.pttl(entry) <= 120_000
    assert gateway.ask(key, messages).headers["x-ragcache"] == "HIT"


@pytest.mark.parametrize("value", ["max-age=0", "max-age=abc", "max-age=3601", "max-age", "max-age=-5",
                                   "max-age=60, max-age=70"])
def test_a_bad_max_age_is_a_400(gateway, policy_factory, value):
    policy_factory("default", mode="on", enabled=True, scope="global", ttl_seconds=3600)
    key = gateway.key(controls=("max-age",))
    messages = question("bad max-age")
    response = gateway.ask(key, messages, headers={"Cache-Control": value})
    assert response.status_code == 400
    assert error_of(response)["code"] == "invalid_cache_control" and gateway.fake.call_count(messages) == 0


def test_policy_header(gateway, policy_factory):
    policy_factory("short", mode="on", enabled=True, scope="global", ttl_seconds=60)
    key = gateway.key(policies=("default", "short", "planned"), controls=("policy",))
    messages = question("policy header")
    default = gateway.ask(key, messages)
    short = gateway.ask(key, messages, headers={"X-Ragcache-Policy": "short"})
    short_again = gateway.ask(key, messages, headers={"X-Ragcache-Policy": "short"})
    assert [r.headers["x-ragcache-policy"] for r in (default, short, short_again)] == ["default", "short", "short"]
    assert [r.headers["x-ragcache"] for r in (default, short, short_again)] == ["MISS", "MISS", "HIT"]
    not_allowed = gateway.ask(key, messages, headers={"X-Ragcache-Policy": "secret"})
    assert not_allowed.status_code == 403 and error_of(not_allowed)["code"] == "policy_not_allowed"
    unknown = gateway.ask(key, messages, headers={"X-Ragcache-Policy": "planned"})
    assert unknown.status_code == 400 and error_of(unknown)["code"] == "unknown_policy"
    empty = gateway.ask(key, messages, headers={"X-Ragcache-Policy": ""})
    assert empty.status_code == 400
    assert gateway.fake.call_count(messages) == 2


def test_a_keys_first_policy_is_its_default(gateway, policy_factory):
    policy_factory("short", mode="on", enabled=True, scope="global", ttl_seconds=60)
    key = gateway.key(policies=("short", "default"))
    assert gateway.ask(key, question("default policy")).headers["x-ragcache-policy"] == "short"


def test_sources_header_records_sources_and_invalidation_drops_the_answer(gateway):
    key = gateway.key(controls=("sources",))
    cited, other = question("cited"), question("other")
    headers = {"X-Ragcache-Sources": "doc:1, doc:2,doc:3"}
    assert gateway.ask(key, cited, headers=headers).headers["x-ragcache"] == "MISS"
    assert gateway.ask(key, other, headers={"X-Ragcache-Sources": "doc:9"}).headers["x-ragcache"] == "MISS"
    assert gateway.ask(key, cited, headers=headers).headers["x-ragcache"] == "HIT"
    assert cache_service.invalidate_sources(["doc:2"]) == 1
    after = gateway.ask(key, cited, headers=headers)
    assert after.headers["x-ragcache"] == "MISS" and after.headers["x-ragcache-reason"] == "stale_source"
    assert gateway.ask(key, other, headers={"X-Ragcache-Sources": "doc:9"}).headers["x-ragcache"] == "HIT"
    too_many = gateway.ask(key, cited, headers={"X-Ragcache-Sources": ",".join(f"d{i}" for i in range(40))})
    assert too_many.status_code == 400 and "at most 32" in error_of(too_many)["message"]
    assert (error_of(too_many)["code"], error_of(too_many)["param"]) == ("invalid_sources", "X-Ragcache-Sources")
    too_long = gateway.ask(key, cited, headers={"X-Ragcache-Sources": "d" * 600})
    assert too_long.status_code == 400 and error_of(too_long)["param"] == "X-Ragcache-Sources"
    assert gateway.ask(key, cited, headers={"X-Ragcache-Sources": ",,"}).status_code == 400


def test_sources_header_carries_utf8_ids(gateway):
    key = gateway.key(controls=("sources",))
    messages = question("utf-8 source")
    # httpx sends a str header as ASCII only; UTF-8 bytes are what a client puts on the wire.
    headers = {"X-Ragcache-Sources": "Ärzte:1, 文書:2".encode()}
    assert gateway.ask(key, messages, headers=headers).headers["x-ragcache"] == "MISS"
    assert gateway.ask(key, messages, headers=headers).headers["x-ragcache"] == "HIT"
    assert cache_service.invalidate_sources(["文書:2"]) == 1  # the id the client meant, not its mojibake
    assert gateway.ask(key, messages, headers=headers).headers["x-ragcache-reason"] == "stale_source"
    not_utf8 = gateway.ask(key, messages, headers={"X-Ragcache-Sources": b"doc:\xff"})
    assert not_utf8.status_code == 400 and error_of(not_utf8)["code"] == "invalid_header"


def test_unknown_cache_control_directives_need_no_permission(gateway):
    key = gateway.key()
    messages = question("directives")
    headers = {"Cache-Control": "max-stale=10, no-transform"}
    assert [gateway.ask(key, messages, headers=headers).headers["x-ragcache"] for _ in range(2)] == ["MISS", "HIT"]


def test_a_bypassed_policy_says_why(gateway, policy_factory):
    policy_factory("default", mode="off")
    key = gateway.key()
    response = gateway.ask(key, question("bypass"))
    assert response.status_code == 200
    assert (response.headers["x-ragcache"], response.headers["x-ragcache-reason"]) == ("BYPASS", "mode_off")


# --- authentication ----------------------------------------------------------------------------------

@pytest.mark.parametrize("authorization, code", [
    (None, "missing_api_key"), ("Basic dXNlcjpwYXNz", "missing_api_key"), ("Bearer", "missing_api_key"),
    ("Bearer rck_made-up-key", "invalid_api_key"), ("Bearer " + "x" * 2000, "invalid_api_key"),
], ids=["none", "basic", "empty", "unknown", "huge"])
def test_a_missing_or_unknown_key_is_a_401(gateway, authorization, code):
    gateway.key()
    messages = question("401")
    headers = {"Authorization": authorization} if authorization else {}
    response = gateway.post(None, {"model": MODEL, "messages": messages}, headers=headers)
    assert response.status_code == 401 and response.headers["www-authenticate"].startswith("Bearer")
    assert error_of(response)["code"] == code
    assert "made-up" not in response.text and gateway.fake.call_count(messages) == 0


def test_an_inactive_key_is_a_401_and_the_sdk_raises_authentication_error(gateway):
    key = gateway.key("retired", active=False)
    response = gateway.ask(key, question("inactive"))
    assert response.status_code == 401 and error_of(response)["code"] == "inactive_api_key"
    with pytest.raises(openai.AuthenticationError):
        gateway.sdk(key).chat.completions.create(model=MODEL, messages=question("inactive sdk"))
    with pytest.raises(openai.AuthenticationError):
        gateway.sdk("rck_wrong").chat.completions.create(model=MODEL, messages=question("wrong sdk"))


def test_a_key_made_elsewhere_works_at_once_and_deactivation_applies(gateway):
    messages = question("new key")
    row = GatewayKey(name="elsewhere")
    key = row.set_new_key()
    registry.reload()
    GatewayKey.objects.bulk_create([row])  # no signal: as if another process made it and Redis missed the news
    assert registry.fresh() is not None and row.key_hash not in registry.fresh().gateway_keys
    assert gateway.ask(key, messages).status_code == 200  # an unknown key reloads the snapshot
    row = GatewayKey.objects.get(name="elsewhere")
    row.is_active = False
    row.save()  # announced on commit: every process reloads
    assert gateway.ask(key, messages).status_code == 401


def test_last_used_is_written_at_most_once_a_minute_without_an_announcement(gateway):
    key = gateway.key("busy")
    sequence = CacheFlags.objects.get(pk=1).sequence
    gateway.ask(key, question("use 1"))
    first = GatewayKey.objects.get(name="busy").last_used_at
    gateway.ask(key, question("use 2"))
    assert first is not None and GatewayKey.objects.get(name="busy").last_used_at == first
    assert CacheFlags.objects.get(pk=1).sequence == sequence  # QuerySet.update: no reload storm


# --- bad input ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["get", "put", "delete"])
def test_other_methods_are_a_405(gateway, method):
    key = gateway.key()
    response = httpx.request(method.upper(), gateway.url, headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 405 and response.headers["allow"] == "POST"
    assert error_of(response)["code"] == "method_not_allowed"


BAD_BODIES = [
    (b"{not json", "invalid_json", None),
    (b'["a", "list"]', "invalid_json", None),
    (b"\xff\xfe\x00", "invalid_json", None),
    (b"[" * 100_000, "invalid_json", None),
    (b'{"messages": [{"role": "user", "content": "hi"}]}', "missing_required_parameter", "model"),
    (b'{"model": 42, "messages": [{"role": "user", "content": "hi"}]}', "invalid_type", "model"),
    (b'{"model": "' + b"m" * 300 + b'", "messages": [{"role": "user", "content": "hi"}]}', "invalid_type", "model"),
    (b'{"model": "demo-llm"}', "missing_required_parameter", "messages"),
    (b'{"model": "demo-llm", "messages": []}', "invalid_type", "messages"),
    (b'{"model": "demo-llm", "messages": "hi"}', "invalid_type", "messages"),
    (b'{"model": "demo-llm", "messages": ["hi"]}', "invalid_type", "messages[0]"),
    (b'{"model": "demo-llm", "messages": [{"content": "hi"}]}', "invalid_type", "messages[0].role"),
    (b'{"model": "demo-llm", "messages": [{"role": 1, "content": "hi"}]}', "invalid_type", "messages[0].role"),
    (b'{"model": "demo-llm", "messages": [{"role": "user", "content": 5}]}', "invalid_type", "messages[0].content"),
    (b'{"model": "demo-llm", "messages": [{"role": "user", "content": ["x"]}]}', "invalid_type",
     "messages[0].content"),
    (b'{"model": "demo-llm", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}', "invalid_type",
     "stream"),
]


@pytest.mark.parametrize("body, code, param", BAD_BODIES, ids=[f"{c}-{p}-{i}" for i, (_, c, p) in
                                                             enumerate(BAD_BODIES)])
def test_bad_bodies_are_openai_shaped_400s(gateway, body, code, param):
    key = gateway.key()
    response = gateway.post(key, body)
    assert response.status_code == 400
    error = error_of(response)
    assert (error["code"], error["param"], error["type"]) == (code, param, "invalid_request_error")
    assert gateway.fake.call_count() == 0


def test_bad_input_through_the_sdk_is_a_bad_request_error(gateway):
    client = gateway.sdk(gateway.key())
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=MODEL, messages=[{"content": "no role"}])
    assert raised.value.status_code == 400 and raised.value.code == "invalid_type"


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_a_body_that_is_not_sent_as_json_is_a_415(gateway, content_type):
    key = gateway.key()
    headers = {"Authorization": f"Bearer {key}"}
    if content_type:
        headers["Content-Type"] = content_type
    response = httpx.post(gateway.url, content=b'{"model": "demo-llm"}', headers=headers)
    assert response.status_code == 415 and error_of(response)["code"] == "unsupported_media_type"


def test_a_body_over_the_limit_is_a_413(gateway, settings):
    settings.RAGCACHE = {**settings.RAGCACHE, "GATEWAY_MAX_BODY_BYTES": 4096}
    key = gateway.key()
    big = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 5000}]}
    response = gateway.post(key, big)
    assert response.status_code == 413 and error_of(response)["code"] == "request_too_large"

    def chunked():  # no Content-Length: measured after reading
        yield orjson.dumps(big)

    response = httpx.post(gateway.url, content=chunked(), headers={"Authorization": f"Bearer {key}",
                                                                  "Content-Type": "application/json"})
    assert response.status_code == 413
    # Past Django's own DATA_UPLOAD_MAX_MEMORY_SIZE (2.5 MB) too, still OpenAI-shaped.
    settings.RAGCACHE = {**settings.RAGCACHE, "GATEWAY_MAX_BODY_BYTES": 10 * 1024 * 1024}
    huge = gateway.post(key, {"model": MODEL, "messages": [{"role": "user", "content": "y" * 3_000_000}]})
    assert huge.status_code == 413 and error_of(huge)["code"] == "request_too_large"
    assert gateway.fake.call_count() == 0


# --- upstream errors -----------------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_a_429_passes_through_and_is_never_cached(gateway, redis_client, ragcache_prefix, stream):
    key = gateway.key()
    messages = question("429")
    limited = gateway.ask(key, messages, stream=stream, model=f"{MODEL}@429,once")
    assert limited.status_code == 429
    assert error_of(limited)["code"] == "rate_limit_exceeded" and limited.headers["retry-after"] == "1"
    assert limited.headers["x-ratelimit-remaining-requests"] == "0" and "x-ragcache" not in limited.headers
    assert entries(redis_client, ragcache_prefix) == [] and locks(redis_client, ragcache_prefix) == []
    answered = gateway.ask(key, messages, stream=stream, model=f"{MODEL}@429,once")
    assert answered.status_code == 200 and answered.headers["x-ragcache"] == "MISS"
    assert gateway.fake.call_count(messages) == 2


def test_upstream_errors_reach_the_sdk_as_its_own_exceptions(gateway):
    client = gateway.sdk(gateway.key())
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model=f"{MODEL}@429", messages=question("sdk 429"))
    with pytest.raises(openai.InternalServerError) as raised:
        client.chat.completions.create(model=f"{MODEL}@500", messages=question("sdk 500"), stream=True)
    assert raised.value.status_code == 500
    with pytest.raises(openai.APIError, match="invalid content mid-stream"):
        list(client.chat.completions.create(model=f"{MODEL}@error", messages=question("sdk mid"), stream=True))


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_a_500_passes_through_and_is_never_cached(gateway, redis_client, ragcache_prefix, stream):
    key = gateway.key()
    messages = question("500")
    for _ in range(2):
        response = gateway.ask(key, messages, stream=stream, model=f"{MODEL}@500")
        assert response.status_code == 500 and error_of(response)["type"] == "server_error"
    assert gateway.fake.call_count(messages) == 2 and entries(redis_client, ragcache_prefix) == []


@pytest.mark.parametrize("behaviour, code", [("error", None), ("error-first", None),
                                             ("disconnect", "upstream_incomplete")])
def test_a_stream_that_fails_is_passed_on_as_an_error_event_and_never_stored(gateway, redis_client, ragcache_prefix,
                                                                             behaviour, code):
    key = gateway.key()
    messages = question(behaviour)
    response = gateway.ask(key, messages, stream=True, model=f"{MODEL}@{behaviour}")
    assert response.status_code == 200
    last = orjson.loads(data_events(response.content)[-1])
    assert set(last) == {"error"} and b"[DONE]" not in response.content
    if code:  # the gateway's own event: the upstream broke off
        assert last["error"]["code"] == code
    else:  # the upstream's error event, passed on
        assert last["error"]["type"] == "server_error"
    assert wait_for(lambda: not locks(redis_client, ragcache_prefix))
    assert entries(redis_client, ragcache_prefix) == []
    assert gateway.ask(key, messages, stream=True, model=f"{MODEL}@{behaviour},once").headers["x-ragcache"] == "MISS"
    assert gateway.fake.call_count(messages) == 2


@pytest.mark.parametrize("behaviour", ["length", "content-filter"])
def test_truncated_or_filtered_answers_are_served_but_not_stored(gateway, redis_client, ragcache_prefix, behaviour):
    key = gateway.key()
    for stream in (False, True):
        messages = question(f"{behaviour} {stream}")
        for _ in range(2):
            assert gateway.ask(key, messages, stream=stream, model=f"{MODEL}@{behaviour}").status_code == 200
        assert gateway.fake.call_count(messages) == 2
    assert entries(redis_client, ragcache_prefix) == []


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_an_upstream_timeout_is_a_504(gateway, settings, redis_client, ragcache_prefix, stream):
    settings.RAGCACHE = {**settings.RAGCACHE, "UPSTREAM": {**settings.RAGCACHE["UPSTREAM"], "TIMEOUT": 0.3}}
    key = gateway.key()
    messages = question("timeout")
    response = gateway.ask(key, messages, stream=stream, model=f"{MODEL}@first=3000")
    assert response.status_code == 504
    error = error_of(response)
    assert (error["code"], error["type"]) == ("upstream_timeout", "upstream_error")
    assert entries(redis_client, ragcache_prefix) == [] and locks(redis_client, ragcache_prefix) == []
    with pytest.raises(openai.APIStatusError) as raised:
        gateway.sdk(key).chat.completions.create(model=f"{MODEL}@first=3000", messages=messages)
    assert raised.value.status_code == 504


def test_a_timeout_between_chunks_ends_the_stream_with_an_error_event(gateway, settings, redis_client,
                                                                      ragcache_prefix):
    settings.RAGCACHE = {**settings.RAGCACHE, "UPSTREAM": {**settings.RAGCACHE["UPSTREAM"], "TIMEOUT": 0.3}}
    key = gateway.key()
    response = gateway.ask(key, question("stall"), stream=True, model=f"{MODEL}@delay=2000")
    assert response.status_code == 200
    assert orjson.loads(data_events(response.content)[-1])["error"]["code"] == "upstream_timeout"
    assert wait_for(lambda: not locks(redis_client, ragcache_prefix))
    assert entries(redis_client, ragcache_prefix) == []


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_an_unreachable_upstream_is_a_502(gateway, settings, stream, caplog):
    settings.RAGCACHE = {**settings.RAGCACHE, "UPSTREAM": {**settings.RAGCACHE["UPSTREAM"],
                                                           "BASE_URL": f"http://127.0.0.1:{free_port()}/v1"}}
    with caplog.at_level(logging.WARNING, logger="ragcache.gateway"):
        response = gateway.ask(gateway.key(), question("unreachable"), stream=stream)
    assert response.status_code == 502 and error_of(response)["code"] == "upstream_unreachable"
    assert "refused" not in response.text  # the cause is the operator's, in the log
    assert any("upstream unreachable (ConnectError" in r.getMessage() for r in caplog.records)


def test_an_upstream_that_refuses_the_gateways_key_is_a_502_not_a_401(gateway, settings):
    settings.DEMO_LLM_API_KEY = "sk-another-key"
    response = gateway.ask(gateway.key(), question("upstream auth"))
    assert response.status_code == 502 and error_of(response)["code"] == "upstream_auth_failed"


def test_no_upstream_configured_is_a_502(gateway, settings):
    settings.RAGCACHE = {**settings.RAGCACHE, "UPSTREAM": {}}
    response = gateway.ask(gateway.key(), question("no upstream"))
    assert response.status_code == 502 and error_of(response)["code"] == "upstream_not_configured"


def test_the_upstream_key_never_reaches_a_client_or_a_log(gateway, settings, caplog):
    caplog.set_level(logging.DEBUG)
    for name in ("ragcache", "httpx", "httpcore", "django", "uvicorn", "project"):
        logging.getLogger(name).addHandler(caplog.handler)
        logging.getLogger(name).setLevel(logging.DEBUG)
    try:
        key = gateway.key()
        responses = [gateway.ask(key, question("secret"), stream=stream, model=model)
                     for stream in (False, True) for model in (MODEL, f"{MODEL}@429", f"{MODEL}@error")]
        settings.DEMO_LLM_API_KEY = "sk-another-key"
        responses.append(gateway.ask(key, question("secret auth")))
        settings.RAGCACHE = {**settings.RAGCACHE, "UPSTREAM": {**settings.RAGCACHE["UPSTREAM"], "TIMEOUT": 0.2}}
        settings.DEMO_LLM_API_KEY = UPSTREAM_KEY
        responses.append(gateway.ask(key, question("secret timeout"), model=f"{MODEL}@first=2000"))
    finally:
        for name in ("ragcache", "httpx", "httpcore", "django", "uvicorn", "project"):
            logging.getLogger(name).removeHandler(caplog.handler)
    assert [r.status_code for r in responses] == [200, 429, 500, 200, 429, 200, 502, 504]
    for response in responses:
        assert UPSTREAM_KEY not in response.text and UPSTREAM_KEY not in str(response.headers)
    logged = "\n".join(f"{r.getMessage()} {r.args!r}" for r in caplog.records)
    assert len(caplog.records) > 10  # the loggers did record these requests
    assert UPSTREAM_KEY not in logged and key not in logged


# --- a client that goes away ------------------------------------------------------------------------

def _raw_request(gateway, key: str, body: dict) -> socket.socket:
    payload = json.dumps(body).encode()
    sock = socket.create_connection((gateway.server.host, gateway.server.port), timeout=10)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + key.encode()
                 + b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(payload)).encode()
                 + b"\r\n\r\n" + payload)
    return sock


def test_a_client_that_disconnects_mid_stream_leaves_nothing_stored_and_no_lock(gateway, redis_client,
                                                                                ragcache_prefix):
    key = gateway.key()
    messages = question("goes away")
    model = f"{MODEL}@long=400,delay=100"  # 40 s: "aborted" can only come from the disconnect
    sock = _raw_request(gateway, key, {"model": model, "messages": messages, "stream": True})
    received = b""
    while received.count(b"data: ") < 3:
        part = sock.recv(65536)
        assert part, "the server closed the connection"
        received += part
    assert b"x-ragcache: miss" in received.lower()
    sock.close()
    # The stream was closed: the upstream connection too, the lock released, nothing stored.
    # Generous bound: on a loaded machine the close takes a while to cross both servers.
    assert wait_for(lambda: [c.status for c in gateway.fake.calls(messages)] == ["aborted"], 30), [
        (c.status, c.chunks_sent) for c in gateway.fake.calls(messages)]
    assert wait_for(lambda: not locks(redis_client, ragcache_prefix))
    assert entries(redis_client, ragcache_prefix) == []
    # Refused as incomplete, or as upstream_error when the cancellation reached the upstream read.
    assert wait_for(lambda: any(e.get(b"r") == b"refused" and e.get(b"x") in (b"incomplete", b"upstream_error")
                                for e in events(redis_client, ragcache_prefix)))
    again = gateway.ask(key, messages, stream=True, model=f"{MODEL}@long=20")
    assert again.headers["x-ragcache"] == "MISS" and gateway.fake.call_count(messages) == 2


def test_a_client_that_closes_an_httpx_stream_early_leaves_nothing_stored(gateway, redis_client, ragcache_prefix):
    key = gateway.key()
    messages = question("closes early")
    body = {"model": f"{MODEL}@long=400,delay=100", "messages": messages, "stream": True}  # a 40 s stream
    with httpx.stream("POST", gateway.url, json=body, headers={"Authorization": f"Bearer {key}"}) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
    assert wait_for(lambda: [c.status for c in gateway.fake.calls(messages)] == ["aborted"], 30), [
        (c.status, c.chunks_sent) for c in gateway.fake.calls(messages)]
    assert wait_for(lambda: not locks(redis_client, ragcache_prefix))
    assert entries(redis_client, ragcache_prefix) == []


# --- usage and metrics ---------------------------------------------------------------------------------

def test_usage_records_carry_the_key_name_and_metrics_never_do(gateway, asgi_server):
    assert ModelPrice.objects.filter(model=MODEL).exists()  # seeded by the demo app after migrate
    registry.invalidate()
    acme, beta = gateway.key("acme-prod", scope="acme"), gateway.key("beta-test", scope="beta")
    messages = question("usage")
    for key in (acme, beta):
        for stream in (False, True):
            for _ in range(2):
                params = {"stream_options": {"include_usage": True}} if stream else {}
                response = gateway.ask(key, messages, stream=stream, **params)
                assert response.status_code == 200
    hit = gateway.ask(acme, messages)
    assert hit.headers["x-ragcache"] == "HIT" and int(hit.headers["x-ragcache-tokens-avoided"]) > 0
    amount, currency = hit.headers["x-ragcache-cost-avoided"].split()
    assert Decimal(amount) > 0 and currency == "USD"
    assert aggregate().status == "ok"
    records = UsageRecord.objects.all()
    assert {r.gateway_key for r in records} == {"acme-prod", "beta-test"}
    hits = records.filter(result="hit", gateway_key="acme-prod")
    assert hits.count() == 3 and all(r.tokens_avoided > 0 and r.cost_avoided > 0 for r in hits)
    assert records.filter(result="miss", gateway_key="beta-test").count() == 2
    metrics = httpx.get(asgi_server.url + "/metrics").text
    assert "ragcache_lookups_total" in metrics
    assert "acme-prod" not in metrics and "beta-test" not in metrics


# --- WSGI ---------------------------------------------------------------------------------------------------

def test_under_wsgi_the_view_works_and_a_stream_comes_whole(gateway, client):
    key = gateway.key()
    messages = question("wsgi")
    auth = {"HTTP_AUTHORIZATION": f"Bearer {key}"}

    def ask(stream: bool):
        return client.post("/v1/chat/completions", data=json.dumps({"model": MODEL, "messages": messages,
                                                                     "stream": stream}),
                           content_type="application/json", **auth)

    first, second = ask(False), ask(False)
    assert (first["X-Ragcache"], second["X-Ragcache"]) == ("MISS", "HIT") and first.content == second.content
    streamed = ask(True)
    assert not streamed.streaming and streamed["Content-Type"] == "text/event-stream; charset=utf-8"
    assert streamed["X-Ragcache"] == "MISS" and streamed.content.endswith(b"data: [DONE]\n\n")
    over_asgi = gateway.ask(key, messages, stream=True)  # the same entry, the same bytes, over ASGI
    assert over_asgi.headers["x-ragcache"] == "HIT" and over_asgi.content == streamed.content
    assert client.get("/v1/chat/completions", **auth).status_code == 405
    assert client.post("/v1/chat/completions", data="{", content_type="application/json", **auth).status_code == 400
    assert gateway.fake.call_count(messages) == 2


def test_a_thread_safe_shared_client_per_event_loop(gateway):
    """Requests from many threads at once (one server loop): no cross-loop client errors."""
    key = gateway.key()
    errors = []

    def work(index: int) -> None:
        try:
            response = gateway.ask(key, question(f"parallel {index}"), stream=index % 2 == 0)
            assert response.status_code == 200
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []


# --- an upstream that misbehaves with the gateway's key or its size -----------------------------------

class _EchoingUpstream(http.server.BaseHTTPRequestHandler):
    """An upstream (or a proxy before it) that repeats the request's credentials back: in an
    error message for ``@400``, inside the answer's text for JSON and for streams."""

    def do_POST(self):  # noqa: N802 - the http.server name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        credentials = self.headers.get("Authorization", "")
        if body["model"].endswith("@400"):
            payload = json.dumps({"error": {"message": f"Bad request made with {credentials}",
                                            "type": "invalid_request_error", "param": None, "code": None}}).encode()
            self._send(400, "application/json", payload)
        elif body.get("stream"):
            chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": body["model"],
                     "choices": [{"index": 0, "delta": {"role": "assistant", "content": f"You sent {credentials}"},
                                  "finish_reason": "stop"}]}
            self._send(200, "text/event-stream", f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode())
        else:
            answer = {"id": "c1", "object": "chat.completion", "created": 1, "model": body["model"],
                      "choices": [{"index": 0, "message": {"role": "assistant", "content": f"You sent {credentials}"},
                                   "finish_reason": "stop"}],
                      "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}}
            self._send(200, "application/json", json.dumps(answer).encode())

    def _send(self, status: int, content_type: str, payload: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):  # keep the test output quiet
        pass


@pytest.fixture
def echoing_upstream(gateway, settings):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _EchoingUpstream)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    settings.RAGCACHE = {**settings.RAGCACHE, "UPSTREAM": {**settings.RAGCACHE["UPSTREAM"],
                                                           "BASE_URL": f"http://127.0.0.1:{server.server_port}/v1"}}
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_an_upstream_echoing_the_gateways_key_never_passes_it_on(gateway, echoing_upstream, stream):
    key = gateway.key()
    refused = gateway.ask(key, question("echo 400"), stream=stream, model=f"{MODEL}@400")
    assert refused.status_code == 400
    assert error_of(refused)["message"] == "Bad request made with Bearer [redacted]"
    answered = gateway.ask(key, question("echo 200"), stream=stream)
    assert answered.status_code == 200 and "Bearer [redacted]" in answered.text
    for response in (refused, answered):
        assert UPSTREAM_KEY not in response.text


def test_an_upstream_answer_over_the_limit_is_a_502(gateway, settings, redis_client, ragcache_prefix):
    settings.RAGCACHE = {**settings.RAGCACHE, "GATEWAY_MAX_RESPONSE_BYTES": 4000}
    key = gateway.key()
    messages = question("huge answer")
    response = gateway.ask(key, messages, model=f"{MODEL}@long=2000")
    assert response.status_code == 502 and error_of(response)["code"] == "upstream_response_too_large"
    assert entries(redis_client, ragcache_prefix) == [] and locks(redis_client, ragcache_prefix) == []
    small = gateway.ask(key, question("small answer"), model=f"{MODEL}@long=5")
    assert small.status_code == 200 and small.headers["x-ragcache"] == "MISS"
