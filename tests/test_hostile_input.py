"""Hostile and bad input: huge prompts and answers, odd Unicode, values JSON cannot hold,
foreign bytes in Redis, and admin input. The rule: a bad *request* raises
InvalidRequestError (a ValueError), a bad *response* is refused (False), bytes ragcache
did not write are a miss (deleted, counted), and no view answers 500. Absurd numbers in a
response (Trust rule 5) are refused where they enter.
"""
from __future__ import annotations

import base64
import json
import math
import os
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal

import pytest
from django.urls import reverse
from prometheus_client import REGISTRY

from ragcache import keys, store
from ragcache.aggregation import aggregate
from ragcache.exceptions import InvalidRequestError
from ragcache.models import CachePolicy, UsageRecord
from ragcache.policies import registry
from ragcache.services import cache_service

pytestmark = pytest.mark.django_db

MODEL = "hostile-model"
ODD = {
    "nul": "a\x00b",
    "lone surrogate": "x\ud800y",
    "low surrogate": "\udfff",
    "rtl override": "abc\u202edef",
    "rtl text": "مرحبا بالعالم",
    "emoji": "😀👩‍👩‍👧🏳️‍🌈",
    "combining": "e\u0301\u0301\u0301",
    "bom and zero width": "\ufeff\u200b\u200d",
    "control chars": "\x01\x1b[31m\x7f",
}


def answer(text: str) -> dict:
    return {"choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 7}}


def sample(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def entry_keys(client) -> list[bytes]:
    return list(client.scan_iter(match=store.current_layout().entry_pattern(), count=1000))


def lock_keys(client) -> list[bytes]:
    return list(client.scan_iter(match=f"{store.current_layout().root}:*:l:*", count=1000))


def deeply_nested(depth: int = 100_000) -> list:
    root: list = []
    node = root
    for _ in range(depth):
        node.append([])
        node = node[0]
    return root


class Opaque:
    """A custom object json cannot encode."""


@dataclass
class Point:
    x: int
    y: int


@pytest.fixture
def policy(policy_factory):
    return policy_factory("default", mode="on", enabled=True, scope="global", ttl_seconds=3600,
                          max_entry_bytes=256 * 1024, compress_threshold_bytes=4096)


# --- sizes --------------------------------------------------------------------------------

def test_one_megabyte_prompt_is_cached_under_a_short_key(policy, redis_client):
    prompt = ("long context " * 80_000)[:1_000_000] + ODD["emoji"]
    first = cache_service.get_or_call(prompt, lambda: answer("short answer"), model=MODEL)
    second = cache_service.get_or_call(prompt, lambda: answer("other"), model=MODEL)
    assert not first.hit and second.hit and second.response == answer("short answer")
    assert len(first.key) < 200
    assert not cache_service.get_cached_response(prompt[:-1], model=MODEL)  # one character less: another question


def test_answer_over_max_entry_bytes_is_refused_and_not_stored(policy, redis_client):
    # Random bytes barely compress: 1 MB of base64 stays far above 256 KB.
    huge = base64.b64encode(os.urandom(750_000)).decode()
    before = sample("ragcache_refusals_total", policy="default", reason="too_large")
    assert cache_service.cache_response("huge answer", answer(huge), model=MODEL) is False
    assert sample("ragcache_refusals_total", policy="default", reason="too_large") == before + 1
    assert cache_service.get_cached_response("huge answer", model=MODEL) is None
    result = cache_service.get_or_call("huge answer", lambda: answer(huge), model=MODEL)
    assert not result.hit and result.response["choices"][0]["message"]["content"] == huge
    assert entry_keys(redis_client) == []


def test_large_compressible_answer_is_stored_compressed(policy, redis_client):
    text = "The same paragraph again and again. " * 30_000  # ~1 MB, compresses to a few KB
    assert cache_service.cache_response("big answer", answer(text), model=MODEL) is True
    (key,) = entry_keys(redis_client)
    meta = json.loads(redis_client.hget(key, "m"))
    assert meta["z"] == 1 and meta["n"] < 256 * 1024 < len(text)
    assert cache_service.get_cached_response("big answer", model=MODEL).content == text


# --- odd Unicode --------------------------------------------------------------------------

# A lone surrogate has no UTF-8 form: it can be keyed (as a JSON escape), but an answer
# holding one cannot be written as the JSON ragcache stores, so it is refused, not mangled.
UNSTORABLE = {"lone surrogate", "low surrogate"}


@pytest.mark.parametrize("odd", list(ODD.values()), ids=list(ODD))
def test_odd_unicode_in_prompts_round_trips(policy, odd):
    prompt = f"question {odd}"
    for response in ("plain answer", answer("an answer"), {"content": "flat answer"}):
        assert cache_service.cache_response(prompt, response, model=MODEL, context_version=repr(response)[:40])
        cached = cache_service.get_cached_response(prompt, model=MODEL, context_version=repr(response)[:40])
        assert cached is not None and cached.response == response
    # As a list of messages, in params and in context_version too.
    messages = [{"role": "system", "content": odd}, {"role": "user", "content": prompt}]
    extra = {"params": {"stop": [odd], odd: odd}, "context_version": {"index": odd}}
    assert not cache_service.get_or_call(messages, lambda: answer("first"), model=MODEL, **extra).hit
    assert cache_service.get_or_call(messages, lambda: answer("x"), model=MODEL, **extra).response == answer("first")
    assert cache_service.get_cached_response(messages, model=MODEL) is None  # the params were keyed


@pytest.mark.parametrize("odd", list(ODD.values()), ids=list(ODD))
def test_odd_unicode_in_answers_round_trips_or_is_refused(policy, redis_client, odd):
    storable = odd not in {ODD[name] for name in UNSTORABLE}
    for n, response in enumerate((f"answer {odd}", answer(f"answer {odd}"), {"content": odd + "!"})):
        assert cache_service.cache_response(f"q{n}", response, model=MODEL) is storable
        cached = cache_service.get_cached_response(f"q{n}", model=MODEL)
        if storable:
            assert cached is not None and cached.response == response
        else:
            assert cached is None
            result = cache_service.get_or_call(f"q{n}", lambda r=response: r, model=MODEL)
            assert result.response is response and not result.stored  # handed back untouched
    assert len(entry_keys(redis_client)) == (3 if storable else 0)
    assert lock_keys(redis_client) == []


def test_odd_unicode_scopes_are_isolated(policy_factory):
    policy_factory("per-user", scope="user")
    scopes = list(ODD.values())
    for n, scope in enumerate(scopes):
        assert cache_service.cache_response("q", f"for scope {n}", model=MODEL, policy="per-user", scope=scope)
    for n, scope in enumerate(scopes):
        assert cache_service.get_cached_response("q", model=MODEL, policy="per-user", scope=scope).content == \
            f"for scope {n}"


# --- values JSON cannot hold --------------------------------------------------------------

BAD_RESPONSES = {
    # A hit must hand back what the call returned: values JSON holds only as another type
    # (a datetime as a string, a dataclass as an object) are refused, not converted.
    "datetime inside": {"content": "x", "created": datetime(2024, 1, 1)},
    "date inside": {"content": "x", "day": date(2024, 1, 1)},
    "dataclass inside": {"content": "x", "point": Point(1, 2)},
    "set inside": {"content": "x", "tags": {"a", "b"}},
    "custom object inside": {"content": "x", "obj": Opaque()},
    "decimal inside": {"content": "x", "score": Decimal("1.5")},
    "nan inside": {"content": "x", "score": math.nan},
    "infinity inside": {"content": "x", "score": math.inf},
    "tuple keys": {"content": "x", (1, 2): "y"},
    "deeply nested": {"content": "x", "tree": deeply_nested()},
    "a set": {"a", "b"},
    "a custom object": Opaque(),
    "a datetime": datetime(2024, 1, 1),
    "bytes": b"\x80\x04pickle?",
    "content not a string": {"content": 42},
    "only whitespace": "  \n\t ",
    "an exception": ValueError("boom"),
    "lone surrogate in the answer": {"content": "x\ud800y"},
    # Trust rule 5: numbers no answer can have are refused where they enter.
    "negative tokens": {"content": "x", "usage": {"prompt_tokens": -5, "completion_tokens": 1}},
    "fractional tokens": {"content": "x", "usage": {"prompt_tokens": 1.5}},
    "tokens no column can hold": {"content": "x", "usage": {"prompt_tokens": 10**12, "completion_tokens": 1}},
    "tokens as text": {"content": "x", "usage": {"prompt_tokens": "12"}},
    "more cached tokens than sent": {"content": "x", "usage": {"prompt_tokens": 5,
                                                              "prompt_tokens_details": {"cached_tokens": 9}}},
    "negative cost": {"content": "x", "cost": "-1"},
    "NaN cost": {"content": "x", "cost": math.nan},
    "absurd cost": {"content": "x", "cost": "1e12"},
    "cost not a number": {"content": "x", "cost": {"usd": 1}},
    "a truncated second choice": {"choices": [{"message": {"content": "a"}, "finish_reason": "stop"},
                                              {"message": {"content": "b"}, "finish_reason": "length"}]},
    "Anthropic max_tokens": {"content": [{"type": "text", "text": "cut"}], "stop_reason": "max_tokens"},
}


@pytest.mark.parametrize("response", list(BAD_RESPONSES.values()), ids=list(BAD_RESPONSES))
def test_unstorable_response_is_refused_never_raised(policy, redis_client, response):
    assert cache_service.cache_response("q", response, model=MODEL) is False
    result = cache_service.get_or_call("q", lambda: response, model=MODEL)
    assert result.response is response and not result.hit and not result.stored  # handed back untouched
    assert entry_keys(redis_client) == []
    assert lock_keys(redis_client) == []  # lock released


def circular() -> dict:
    value: dict = {}
    value["self"] = value
    return value


BAD_REQUESTS = {
    "param is a set": {"params": {"temperature": {0.1, 0.2}}},
    "param is NaN": {"params": {"temperature": math.nan}},
    "param is infinite": {"params": {"top_p": -math.inf}},
    "param is a datetime": {"params": {"seed": datetime(2024, 1, 1)}},
    "param is a custom object": {"params": {"tools": [Opaque()]}},
    "param nested absurdly deep": {"params": {"tools": deeply_nested()}},
    "param is circular": {"params": {"tools": circular()}},
    "param with mixed key types": {"params": {"tools": {1: "a", "b": 2}}},
    "param int too long to print": {"params": {"seed": 10**5000}},
    "params not a dict": {"params": ["temperature", 0.2]},
    "messages None": {"messages": None},
    "messages empty list": {"messages": []},
    "messages a dict": {"messages": {"role": "user", "content": "q"}},
    "message not a dict": {"messages": ["q"]},
    "message without content": {"messages": [{"role": "user"}]},
    "message role not a string": {"messages": [{"role": 1, "content": "q"}]},
    "message content a set": {"messages": [{"role": "user", "content": {"q"}}]},
    "message nested absurdly deep": {"messages": [{"role": "user", "content": deeply_nested()}]},
    "context_version a set": {"context_version": {"v1"}},
    "context_version nested absurdly deep": {"context_version": deeply_nested()},
    "context_version circular": {"context_version": circular()},
    "param keys equal in NFC": {"params": {"caf\u00e9": 1, "cafe\u0301": 2}},
    "model empty": {"model": ""},
    "model not a string": {"model": 4},
    "scope a float": {"policy": "per-user", "scope": 1.5},
    "scope a list": {"policy": "per-user", "scope": ["u1"]},
    "scope empty": {"policy": "per-user", "scope": ""},
    "scope a bool": {"policy": "per-user", "scope": True},
    "scope missing": {"policy": "per-user"},
    "scope int too long to print": {"policy": "per-user", "scope": 10**5000},
}


@pytest.mark.parametrize("bad", list(BAD_REQUESTS.values()), ids=list(BAD_REQUESTS))
def test_bad_request_input_is_a_clear_invalid_request_error(policy, policy_factory, bad):
    policy_factory("per-user", scope="user")
    kwargs = {"model": MODEL, **bad}
    messages = kwargs.pop("messages", "q")
    called = []
    with pytest.raises(InvalidRequestError) as raised:
        cache_service.get_or_call(messages, lambda: called.append(1) or "x", **kwargs)
    assert isinstance(raised.value, ValueError) and str(raised.value)
    assert called == []  # the mistake is reported before any LLM call is paid for
    with pytest.raises(InvalidRequestError):
        cache_service.get_cached_response(messages, **kwargs)
    with pytest.raises(InvalidRequestError):
        cache_service.cache_response(messages, "an answer", **kwargs)


# --- the demo JSON endpoint ---------------------------------------------------------------

ASK = "/demo/ask.json"
HOSTILE_BODIES = {
    "empty": b"",
    "not json": b"{question",
    "json null": b"null",
    "json list": b"[1, 2]",
    "json string": b'"question"',
    "json number": b"1e999",
    "not utf-8": b"\xff\xfe\xfd",
    "nested absurdly deep": b"[" * 100_000 + b"]" * 100_000,
    "question null": b'{"question": null}',
    "question an object": b'{"question": {"a": [1, 2]}}',
    "question a number": b'{"question": 1e999}',
    "question NUL": b'{"question": "a\\u0000b"}',
    "question lone surrogate": b'{"question": "x\\ud800y"}',
    "question rtl and emoji": json.dumps({"question": ODD["rtl override"] + ODD["emoji"]}).encode(),
    "question too long": json.dumps({"question": "q" * 4001}).encode(),
    "question one megabyte": json.dumps({"question": "q " * 500_000}).encode(),
    "body over Django's upload limit": json.dumps({"question": "q" * 3_000_000}).encode(),
    "question blank": b'{"question": "   "}',
}


@pytest.fixture
def demo(policy, settings):
    settings.DEMO_LLM_DELAY_MS = 0


@pytest.mark.parametrize("body", list(HOSTILE_BODIES.values()), ids=list(HOSTILE_BODIES))
def test_demo_endpoint_never_answers_500(demo, client, body):
    response = client.post(ASK, body, content_type="application/json")
    assert response.status_code in (200, 400), response.status_code
    payload = json.loads(response.content) if response["Content-Type"] == "application/json" else {}
    if response.status_code == 200:
        assert payload["answer"] and payload["hit"] in (True, False)
        again = client.post(ASK, body, content_type="application/json")
        assert again.status_code == 200 and json.loads(again.content)["hit"] is True
    elif payload:
        assert payload["error"]


@pytest.mark.parametrize("query", ["%00", "%ff%fe", "%ED%A0%80", "%E2%80%AE%F0%9F%98%80", "x" * 5000, ""])
def test_demo_endpoint_get_never_answers_500(demo, client, query):
    response = client.get(f"{ASK}?q={query}")
    assert response.status_code in (200, 400)


# --- foreign and corrupt bytes at a ragcache key ------------------------------------------

def plant_hash(meta: str | bytes, body: str | bytes):
    def plant(client, key):
        client.delete(key)
        client.hset(key, mapping={"m": meta, "b": body})

    return plant


def meta(**fields) -> str:
    """Entry metadata as ragcache writes it (``v`` first), with ``fields`` replaced."""
    body = {"v": keys.KEY_SCHEMA_VERSION, "k": "r", "model": MODEL, "fr": "stop", "pt": 1, "cpt": 0, "ct": 1,
            "uk": 1, "cost": None, "lat": 1.0, "at": 1.0, "exp": 2e10, "z": 0, "n": 3, **fields}
    return json.dumps(body, separators=(",", ":"))


FOREIGN = {
    "string": lambda c, k: (c.delete(k), c.set(k, b"\x80\x04\x95 pickle bytes")),
    "list": lambda c, k: (c.delete(k), c.rpush(k, "a")),
    "set": lambda c, k: (c.delete(k), c.sadd(k, "a")),
    "stream": lambda c, k: (c.delete(k), c.xadd(k, {"a": "b"})),
    "older key schema (v 0)": plant_hash('{"v":0,"model":"m","n":3}', '"x"'),
    "0.1 schema, same shape": plant_hash(meta(v=1), '"x"'),
    "meta not JSON": plant_hash(b"\xff\xfe", '"x"'),
    "meta JSON cut short": plant_hash(meta()[:-1], '"x"'),
    "meta nested absurdly deep": plant_hash(f'{{"v":{keys.KEY_SCHEMA_VERSION},"n":3,"x":' + "[" * 100_000
                                            + "]" * 100_000 + "}", '"x"'),
    "meta without body": lambda c, k: (c.delete(k), c.hset(k, "m", meta())),
    "body without meta": lambda c, k: (c.delete(k), c.hset(k, "b", '"x"')),
    "body nested absurdly deep": plant_hash(meta(n=200_000), "[" * 100_000 + "]" * 100_000),
    "body not JSON": plant_hash(meta(), "abc"),
    "body not zlib": plant_hash(meta(z=1), "abc"),
    "body not a response": plant_hash(meta(), "123"),
    "tokens no int can hold": plant_hash(meta(pt=1e999, n=3), '"x"'),
    "time no clock can hold": plant_hash(meta(at=1e20), '"x"'),
    "body length lies": plant_hash(meta(n=99), '"x"'),
    # Trust rule 5: numbers no answer has, behind a valid schema prefix and length.
    "negative tokens": plant_hash(meta(pt=-5), '"x"'),
    "tokens no column can hold": plant_hash(meta(ct=10**12), '"x"'),
    "fractional tokens": plant_hash(meta(cpt=0.5), '"x"'),
    "negative cost": plant_hash(meta(cost="-1"), '"x"'),
    "cost not a decimal string": plant_hash(meta(cost=0.5), '"x"'),
    "cost NaN": plant_hash(meta(cost="NaN"), '"x"'),
    "negative latency": plant_hash(meta(lat=-1), '"x"'),
    "unknown entry kind": plant_hash(meta(k="pickle"), '"x"'),
    "stream entry without chunks": plant_hash(meta(k="s", n=2), "{}"),
    "a refused answer planted": plant_hash(meta(n=2), '""'),
}


@pytest.mark.parametrize("plant", list(FOREIGN.values()), ids=list(FOREIGN))
def test_foreign_bytes_are_a_miss_deleted_and_counted(policy, redis_client, ragcache_log, plant):
    first = cache_service.get_or_call("planted", lambda: answer("real answer"), model=MODEL)
    key = first.key
    plant(redis_client, key)
    before = sample("ragcache_corrupt_entries_total", policy="default")
    assert cache_service.get_cached_response("planted", model=MODEL) is None
    assert redis_client.exists(key) == 0
    assert sample("ragcache_corrupt_entries_total", policy="default") == before + 1
    assert "unreadable entry" in ragcache_log.text
    # The next caller stores a good entry again.
    assert not cache_service.get_or_call("planted", lambda: answer("fresh"), model=MODEL).hit
    assert cache_service.get_or_call("planted", lambda: answer("x"), model=MODEL).response == answer("fresh")


def test_absurd_usage_figures_never_enter_and_never_wedge_aggregation(policy, redis_client, ragcache_log):
    """A response claiming more tokens or cost than the usage tables can hold (a buggy
    provider's usage block) is refused where it enters (Trust rule 5; 0.1 stored it). The
    same figures planted in Redis make a miss, recorded as one, and never make an
    aggregation fail."""
    huge = {"content": "ok", "usage": {"prompt_tokens": 10**12, "completion_tokens": 10**12}, "cost": "1e12"}
    before = sample("ragcache_refusals_total", policy="default", reason="invalid_usage")
    assert cache_service.cache_response("absurd", huge, model=MODEL) is False
    assert sample("ragcache_refusals_total", policy="default", reason="invalid_usage") == before + 1
    assert "invalid_usage" in ragcache_log.text and "prompt_tokens" in ragcache_log.text  # says what was wrong
    result = cache_service.get_or_call("absurd", lambda: huge, model=MODEL)
    assert result.response is huge and not result.stored
    assert entry_keys(redis_client) == []

    assert cache_service.cache_response("normal", answer("fine"), model=MODEL)
    key = cache_service.get_or_call("normal", lambda: answer("x"), model=MODEL).key  # one good hit
    assert cache_service.cache_response("planted", answer("fine"), model=MODEL)
    planted = cache_service.get_or_call("planted", lambda: answer("x"), model=MODEL).key  # two good hits
    redis_client.hset(planted, "m", meta(pt=10**12, ct=10**12, cost="1e12", n=len(redis_client.hget(planted, "b"))))
    assert cache_service.get_cached_response("planted", model=MODEL) is None  # the script saw a hit; decode did not
    assert redis_client.exists(planted) == 0 and redis_client.exists(key) == 1
    result = aggregate()
    assert result.backlog == 0 and result.malformed == 0
    hits = sorted(UsageRecord.objects.filter(result="hit").values_list("tokens_avoided", "cost_avoided"))
    assert hits == [(12, Decimal(0)), (12, Decimal(0))]
    assert UsageRecord.objects.filter(result="miss", reason="corrupt", tokens_avoided=0).count() == 1
    assert UsageRecord.objects.filter(result="refused", reason="invalid_usage").count() == 2
    assert aggregate().ingested == 0  # nothing left behind to fail again


# --- admin input and a policy deleted while in use ------------------------------------------

ADD_URL = reverse("admin:ragcache_cachepolicy_add")


def policy_form(**changes):
    data = {"name": "faq", "description": "", "enabled": "on", "mode": "on", "scope": "global",
            "ttl_seconds": "3600", "max_entry_bytes": "262144", "compress_threshold_bytes": "4096",
            "rollout_percent": "100", "replay_chunk_delay_ms": "0", "ignored_params": '["user"]'}
    data.update(changes)
    return data


@pytest.mark.parametrize(("changes", "field"), [
    ({"ttl_seconds": str(10**20)}, "ttl_seconds"),
    ({"ttl_seconds": str(-(10**20))}, "ttl_seconds"),
    ({"ttl_seconds": "1e3"}, "ttl_seconds"),
    ({"ttl_seconds": "\x00"}, "ttl_seconds"),
    ({"ignored_params": "[" * 10_000}, "ignored_params"),
    ({"ignored_params": json.dumps(["a" * 65])}, "ignored_params"),
    ({"ignored_params": json.dumps([None])}, "ignored_params"),
    ({"ignored_params": json.dumps([["user"]])}, "ignored_params"),
    ({"ignored_params": json.dumps(["user", "user"])}, "ignored_params"),
    ({"ignored_params": json.dumps({"user": True})}, "ignored_params"),
    ({"name": "x" * 65}, "name"),
    ({"name": "défaut"}, "name"),
    ({"max_entry_bytes": str(10**12)}, "max_entry_bytes"),
    ({"compress_threshold_bytes": "-1"}, "compress_threshold_bytes"),
])
def test_admin_rejects_hostile_policy_values(admin_client, changes, field):
    response = admin_client.post(ADD_URL, policy_form(**changes))
    assert response.status_code == 200
    assert field in response.context["adminform"].form.errors
    assert not CachePolicy.objects.filter(name=policy_form(**changes)["name"]).exists()


@pytest.mark.parametrize("blank", ["", "null"])
def test_blank_ignored_params_means_none_not_a_500(admin_client, blank):
    assert admin_client.post(ADD_URL, policy_form(ignored_params=blank)).status_code == 302
    assert CachePolicy.objects.get(name="faq").ignored_params == []
    registry.invalidate()
    # No param is ignored: every one enters the key, even "user" and "stream".
    assert cache_service.cache_response("q", "a", model=MODEL, policy="faq", params={"user": "u1"})
    assert cache_service.get_cached_response("q", model=MODEL, policy="faq", params={"user": "u1"}) is not None
    assert cache_service.get_cached_response("q", model=MODEL, policy="faq", params={"user": "u2"}) is None
    assert cache_service.get_cached_response("q", model=MODEL, policy="faq", params={"user": "u1",
                                                                                     "stream": True}) is None


def test_policy_deleted_while_in_use_bypasses_with_a_warning(admin_client, policy_factory, redis_client, ragcache_log,
                                                            django_capture_on_commit_callbacks):
    doomed = policy_factory("doomed", scope="global")
    assert not cache_service.get_or_call("q", lambda: answer("a"), model=MODEL, policy="doomed").hit
    assert cache_service.get_or_call("q", lambda: answer("a"), model=MODEL, policy="doomed").hit
    in_use = registry.current()  # what another process still holds
    assert "doomed" in in_use.policies

    delete_url = reverse("admin:ragcache_cachepolicy_delete", args=[doomed.pk])
    assert admin_client.get(delete_url).status_code == 200
    with django_capture_on_commit_callbacks(execute=True):
        assert admin_client.post(delete_url, {"post": "yes"}).status_code == 302
    registry._snapshot = in_use  # that other process has not reloaded yet

    before = sample("ragcache_lookups_total", policy="unknown", result="bypass")
    for _ in range(3):
        result = cache_service.get_or_call("q", lambda: answer("from the LLM"), model=MODEL, policy="doomed")
        assert not result.hit and result.response == answer("from the LLM")
    assert cache_service.cache_response("q", "x", model=MODEL, policy="doomed") is False
    assert cache_service.get_cached_response("q", model=MODEL, policy="doomed") is None
    assert sample("ragcache_lookups_total", policy="unknown", result="bypass") >= before + 3
    # Every bypass is recorded (Trust 18), under the name "unknown".
    layout = store.current_layout()
    bypasses = [fields for stream in layout.streams for _, fields in redis_client.xrange(stream)
                if fields[b"r"] == b"bypass"]
    assert len(bypasses) >= 3
    assert all(f[b"x"] == b"unknown_policy" and f[b"h"].startswith(b"unknown\x1f") for f in bypasses)
    assert "no cache policy named 'doomed'" in ragcache_log.text
    for url in (reverse("admin:ragcache_cachepolicy_changelist"), delete_url,
                reverse("admin:ragcache_cachepolicy_change", args=[doomed.pk])):
        assert admin_client.get(url, follow=True).status_code == 200


@pytest.fixture(autouse=True)
def fast_password_hasher(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
