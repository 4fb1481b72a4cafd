"""Hostile and bad input: huge prompts and answers, odd Unicode, values JSON cannot hold,
foreign bytes in Redis, and admin input. The rule: a bad *request* raises
InvalidRequestError (a ValueError), a bad *response* is refused (False), bytes ragcache
did not write are a miss (deleted, counted), and no view answers 500.
"""
from __future__ import annotations

import base64
import json
import math
import os
from datetime import datetime
from decimal import Decimal

import pytest
from django.urls import reverse
from prometheus_client import REGISTRY

from ragcache import store
from ragcache.exceptions import InvalidRequestError
from ragcache.models import CachePolicy, UsageRecord
from ragcache.policies import registry
from ragcache.services import cache_service
from ragcache.usage import aggregate

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


def deeply_nested(depth: int = 100_000) -> list:
    root: list = []
    node = root
    for _ in range(depth):
        node.append([])
        node = node[0]
    return root


class Opaque:
    """A custom object json cannot encode."""


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
    assert list(redis_client.scan_iter(match=f"{store.prefix()}:v1:*")) == []


def test_large_compressible_answer_is_stored_compressed(policy, redis_client):
    text = "The same paragraph again and again. " * 30_000  # ~1 MB, compresses to a few KB
    assert cache_service.cache_response("big answer", answer(text), model=MODEL) is True
    (key,) = list(redis_client.scan_iter(match=f"{store.prefix()}:v1:*"))
    meta = json.loads(redis_client.hget(key, "m"))
    assert meta["z"] == 1 and meta["n"] < 256 * 1024 < len(text)
    assert cache_service.get_cached_response("big answer", model=MODEL).content == text


# --- odd Unicode --------------------------------------------------------------------------

@pytest.mark.parametrize("odd", list(ODD.values()), ids=list(ODD))
def test_odd_unicode_in_prompts_and_answers_round_trips(policy, odd):
    prompt = f"question {odd}"
    for response in (f"answer {odd}", answer(f"answer {odd}"), {"content": odd + "!"}):
        assert cache_service.cache_response(prompt, response, model=MODEL, context_version=repr(response)[:40])
        cached = cache_service.get_cached_response(prompt, model=MODEL, context_version=repr(response)[:40])
        assert cached is not None and cached.response == response
    # As a list of messages, and as the scope of a per-user policy, too.
    messages = [{"role": "system", "content": odd}, {"role": "user", "content": prompt}]
    assert not cache_service.get_or_call(messages, lambda: answer(odd), model=MODEL).hit
    assert cache_service.get_or_call(messages, lambda: answer("x"), model=MODEL).response == answer(odd)


def test_odd_unicode_scopes_are_isolated(policy_factory):
    policy_factory("per-user", scope="user")
    scopes = list(ODD.values())
    for scope in scopes:
        assert cache_service.cache_response("q", f"for {scope}", model=MODEL, policy="per-user", scope=scope)
    for scope in scopes:
        assert cache_service.get_cached_response("q", model=MODEL, policy="per-user", scope=scope).content == \
            f"for {scope}"


# --- values JSON cannot hold --------------------------------------------------------------

BAD_RESPONSES = {
    "datetime inside": {"content": "x", "created": datetime(2024, 1, 1)},
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
}


@pytest.mark.parametrize("response", list(BAD_RESPONSES.values()), ids=list(BAD_RESPONSES))
def test_unstorable_response_is_refused_never_raised(policy, redis_client, response):
    assert cache_service.cache_response("q", response, model=MODEL) is False
    result = cache_service.get_or_call("q", lambda: response, model=MODEL)
    assert result.response is response and not result.hit  # handed back untouched
    assert list(redis_client.scan_iter(match=f"{store.prefix()}:v1:*")) == []
    assert list(redis_client.scan_iter(match=f"{store.prefix()}:lock:*")) == []  # lock released


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
    body = {"v": 1, "model": MODEL, "fr": "stop", "pt": 1, "ct": 1, "cost": None, "lat": 1.0, "at": 1.0,
            "exp": 2.0, "z": 0, "n": 3, **fields}
    return json.dumps(body, separators=(",", ":"))


FOREIGN = {
    "string": lambda c, k: (c.delete(k), c.set(k, b"\x80\x04\x95 pickle bytes")),
    "list": lambda c, k: (c.delete(k), c.rpush(k, "a")),
    "set": lambda c, k: (c.delete(k), c.sadd(k, "a")),
    "stream": lambda c, k: (c.delete(k), c.xadd(k, {"a": "b"})),
    "older key schema (v 0)": plant_hash('{"v":0,"model":"m","n":3}', '"x"'),
    "older schema, same shape": plant_hash(meta().replace('"v":1', '"v":0'), '"x"'),
    "meta not JSON": plant_hash(b"\xff\xfe", '"x"'),
    "meta nested absurdly deep": plant_hash('{"v":1,"n":3,"x":' + "[" * 100_000 + "]" * 100_000 + "}", '"x"'),
    "body nested absurdly deep": plant_hash(meta(n=200_000), "[" * 100_000 + "]" * 100_000),
    "body not JSON": plant_hash(meta(), "abc"),
    "body not zlib": plant_hash(meta(z=1), "abc"),
    "body not a response": plant_hash(meta(), "123"),
    "tokens no int can hold": plant_hash(meta(pt=1e999, n=3), '"x"'),
    "time no clock can hold": plant_hash(meta(at=1e20), '"x"'),
    "body length lies": plant_hash(meta(n=99), '"x"'),
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


def test_absurd_usage_figures_in_an_entry_never_wedge_aggregation(policy, redis_client):
    """An entry whose metadata claims more tokens or cost than the usage tables can hold
    (a buggy provider's usage block, or bytes planted in Redis) is served, but its hit
    event must not make every later aggregation fail."""
    huge = {"content": "ok", "usage": {"prompt_tokens": 10**12, "completion_tokens": 10**12}, "cost": "1e12"}
    assert cache_service.cache_response("absurd", huge, model=MODEL)
    assert cache_service.get_cached_response("absurd", model=MODEL) is not None  # a hit event with those figures
    assert cache_service.cache_response("normal", answer("fine"), model=MODEL)
    assert cache_service.get_cached_response("normal", model=MODEL) is not None
    result = aggregate()
    assert result.backlog == 0 and result.malformed == 0
    # Both hits count as lookups; the absurd one avoided "nothing we can vouch for".
    hits = sorted(UsageRecord.objects.filter(result="hit").values_list("tokens_avoided", "cost_avoided"))
    assert hits == [(0, Decimal(0)), (12, Decimal(0))]
    assert aggregate().ingested == 0  # nothing left behind to fail again


# --- admin input and a policy deleted while in use ------------------------------------------

ADD_URL = reverse("admin:ragcache_cachepolicy_add")


def policy_form(**changes):
    data = {"name": "faq", "description": "", "enabled": "on", "mode": "on", "scope": "global",
            "ttl_seconds": "3600", "max_entry_bytes": "262144", "compress_threshold_bytes": "4096",
            "rollout_percent": "100", "key_params": '["temperature"]'}
    data.update(changes)
    return data


@pytest.mark.parametrize(("changes", "field"), [
    ({"ttl_seconds": str(10**20)}, "ttl_seconds"),
    ({"ttl_seconds": str(-(10**20))}, "ttl_seconds"),
    ({"ttl_seconds": "1e3"}, "ttl_seconds"),
    ({"ttl_seconds": "\x00"}, "ttl_seconds"),
    ({"key_params": "[" * 10_000}, "key_params"),
    ({"key_params": json.dumps(["a" * 65])}, "key_params"),
    ({"key_params": json.dumps([None])}, "key_params"),
    ({"key_params": json.dumps([["temperature"]])}, "key_params"),
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
def test_blank_key_params_means_no_params_not_a_500(admin_client, blank):
    assert admin_client.post(ADD_URL, policy_form(key_params=blank)).status_code == 302
    assert CachePolicy.objects.get(name="faq").key_params == []
    registry.invalidate()
    assert cache_service.cache_response("q", "a", model=MODEL, policy="faq", params={"temperature": 1})
    assert cache_service.get_cached_response("q", model=MODEL, policy="faq", params={"temperature": 2}) is not None


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
    assert "no cache policy named 'doomed'" in ragcache_log.text
    for url in (reverse("admin:ragcache_cachepolicy_changelist"), delete_url,
                reverse("admin:ragcache_cachepolicy_change", args=[doomed.pk])):
        assert admin_client.get(url, follow=True).status_code == 200


@pytest.fixture(autouse=True)
def fast_password_hasher(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
