"""The key recipe, proven through the real service and Redis: every ingredient that shapes
the answer changes the key (miss), everything else keeps it (hit)."""
from __future__ import annotations

import copy
import re

import pytest

from ragcache import keys
from ragcache.exceptions import InvalidRequestError
from ragcache.models import DEFAULT_KEY_PARAMS
from ragcache.services import cache_service

TOOLS = [{
    "type": "function",
    "function": {"name": "lookup", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}},
}]
BASE = {
    "messages": [
        {"role": "system", "content": "You answer from the staff handbook."},
        {"role": "user", "content": "How many vacation days do I get?"},
    ],
    "model": "gpt-4o-mini",
    "params": {"temperature": 0.2, "max_tokens": 256, "tools": TOOLS},
    "context_version": "kb-2024-06",
}
ANSWER = "Twenty-five days a year."


def request(**changes):
    req = copy.deepcopy(BASE)
    req.update(changes)
    return req


def with_params(**changes):
    params = copy.deepcopy(BASE["params"])
    params.update(changes)
    return request(params=params)


def with_message(index, **changes):
    messages = copy.deepcopy(BASE["messages"])
    messages[index].update(changes)
    return request(messages=messages)


@pytest.fixture
def stored(policy_factory):
    policy_factory("default", mode="on", scope="global", key_params=list(DEFAULT_KEY_PARAMS), normalize_query=False)
    assert cache_service.cache_response(response=ANSWER, **request()) is True
    hit = cache_service.get_cached_response(**request())
    assert hit is not None and hit.response == ANSWER
    return hit


NEW_VALUES = {
    "temperature": 0.9,
    "top_p": 0.5,
    "max_tokens": 512,
    "seed": 7,
    "stop": ["\n"],
    "tools": [],
    "tool_choice": "none",
    "response_format": {"type": "json_object"},
    "system_prompt_version": "v2",
}


def test_every_default_key_param_has_a_probe_value():
    assert set(NEW_VALUES) == set(DEFAULT_KEY_PARAMS)


MISSES = {
    "system content": with_message(0, content="You answer from the legal handbook."),
    "user content": with_message(1, content="How many sick days do I get?"),
    "system role": with_message(0, role="developer"),
    "user role": with_message(1, role="assistant"),
    "message order": request(messages=list(reversed(BASE["messages"]))),
    "extra message": request(messages=[*BASE["messages"], {"role": "assistant", "content": "Let me check."}]),
    "system message dropped": request(messages=BASE["messages"][1:]),
    "user text only": request(messages=BASE["messages"][1]["content"]),
    "model": request(model="gpt-4o"),
    "context_version": request(context_version="kb-2024-07"),
    "context_version missing": request(context_version=None),
    "allowed param removed": request(params={"max_tokens": 256, "tools": TOOLS}),
    "no params": request(params=None),
    "nested tool schema": with_params(tools=[{**TOOLS[0], "function": {**TOOLS[0]["function"], "name": "search"}}]),
    **{f"param {name}": with_params(**{name: value}) for name, value in NEW_VALUES.items()},
}


@pytest.mark.parametrize("changed", list(MISSES.values()), ids=list(MISSES))
def test_changing_an_ingredient_misses(stored, changed):
    assert cache_service.get_cached_response(**changed) is None
    # ...and the original still hits: the change did not disturb it.
    assert cache_service.get_cached_response(**request()) is not None


HITS = {
    "identical": request(),
    "param order": request(params=dict(reversed(list(BASE["params"].items())))),
    "nested dict order": with_params(tools=[{
        "function": {"parameters": {"properties": {"q": {"type": "string"}}, "type": "object"}, "name": "lookup"},
        "type": "function",
    }]),
    "message key order": request(messages=[{"content": m["content"], "role": m["role"]} for m in BASE["messages"]]),
    "non-allowed param user": with_params(user="someone-else"),
    "non-allowed params stream and request_id": with_params(stream=True, request_id="req-123"),
}


@pytest.mark.parametrize("same", list(HITS.values()), ids=list(HITS))
def test_keeping_every_ingredient_hits(stored, same):
    hit = cache_service.get_cached_response(**same)
    assert hit is not None
    assert hit.response == ANSWER
    assert hit.key == stored.key


def test_only_the_policys_params_enter_the_key(policy_factory):
    policy_factory("narrow", key_params=["temperature"])
    assert cache_service.cache_response(response=ANSWER, policy="narrow", **request())
    assert cache_service.get_cached_response(policy="narrow", **with_params(max_tokens=1, seed=3)) is not None
    assert cache_service.get_cached_response(policy="narrow", **with_params(temperature=0.3)) is None


def test_empty_key_params_ignores_every_param(policy_factory):
    policy_factory("paramless", key_params=[])
    assert cache_service.cache_response(response=ANSWER, policy="paramless", **request())
    assert cache_service.get_cached_response(policy="paramless", **with_params(temperature=1.5)) is not None


def test_scope_is_an_ingredient(policy_factory):
    policy_factory("per-user", scope="user")
    assert cache_service.cache_response(response=ANSWER, policy="per-user", scope="u1", **request())
    assert cache_service.get_cached_response(policy="per-user", scope="u1", **request()) is not None
    assert cache_service.get_cached_response(policy="per-user", scope="u2", **request()) is None


def test_policy_generation_is_an_ingredient(stored, policy_factory):
    assert ":default:1:" in stored.key
    policy_factory("default", generation=2)
    assert cache_service.get_cached_response(**request()) is None
    assert cache_service.cache_response(response="new", **request())
    hit = cache_service.get_cached_response(**request())
    assert hit.response == "new" and ":default:2:" in hit.key


def test_policy_name_is_an_ingredient(stored, policy_factory):
    policy_factory("other")
    assert cache_service.get_cached_response(policy="other", **request()) is None


NORMALISED_VARIANTS = [
    "how many vacation days do i get?",
    "  How   many\tvacation\n days do I get?  ",
    "HOW MANY VACATION DAYS DO I GET?",
    "\uff28ow many vacation days do I get?",  # fullwidth H: NFKC folds it
]


@pytest.mark.parametrize("variant", NORMALISED_VARIANTS)
def test_normalisation_on_folds_case_width_and_whitespace(policy_factory, variant):
    policy_factory("default", normalize_query=True)
    assert cache_service.cache_response(response=ANSWER, **request())
    assert cache_service.get_cached_response(**with_message(1, content=variant)) is not None


@pytest.mark.parametrize("variant", NORMALISED_VARIANTS)
def test_normalisation_off_keeps_text_exact(policy_factory, variant):
    policy_factory("default", normalize_query=False)
    assert cache_service.cache_response(response=ANSWER, **request())
    assert cache_service.get_cached_response(**with_message(1, content=variant)) is None


def test_normalisation_does_not_merge_different_words(policy_factory):
    policy_factory("default", normalize_query=True)
    assert cache_service.cache_response(response=ANSWER, **request())
    assert cache_service.get_cached_response(**with_message(1, content="How many vacation days do we get?")) is None


def test_key_shape_has_no_caller_text(stored, ragcache_prefix):
    assert re.fullmatch(rf"{re.escape(ragcache_prefix)}:v1:default:1:global:[0-9a-f]{{64}}", stored.key)
    for text in ("vacation", "handbook", "gpt-4o-mini", "kb-2024-06"):
        assert text not in stored.key


def test_scoped_key_shape(policy_factory, ragcache_prefix):
    policy_factory("per-tenant", scope="tenant")
    result = cache_service.get_or_call("hello", lambda: "hi", model="m", policy="per-tenant", scope="acme-corp")
    assert re.fullmatch(rf"{re.escape(ragcache_prefix)}:v1:per-tenant:1:[0-9a-f]{{24}}:[0-9a-f]{{64}}", result.key)
    assert "acme" not in result.key


# --- the recipe's building blocks -----------------------------------------------------------

def test_canonical_json_is_order_independent():
    assert keys.canonical_json({"b": 1, "a": {"y": 2, "x": [1, {"d": 0, "c": 1}]}}) == keys.canonical_json(
        {"a": {"x": [1, {"c": 1, "d": 0}], "y": 2}, "b": 1}
    )


def test_canonical_json_keeps_list_order():
    assert keys.canonical_json([1, 2]) != keys.canonical_json([2, 1])


@pytest.mark.parametrize("bad", [{"x": object()}, {"x": float("nan")}, {"x": float("inf")}, {"x": b"bytes"}])
def test_canonical_json_rejects_non_json(bad):
    with pytest.raises(InvalidRequestError):
        keys.canonical_json(bad)


def test_non_json_allowed_param_is_a_clear_error(policy_factory):
    policy_factory("default")
    with pytest.raises(InvalidRequestError):
        cache_service.get_cached_response("q", model="m", params={"temperature": object()})


def test_non_json_ignored_param_is_fine(policy_factory):
    # Params the policy ignores never reach the encoder (e.g. a client object passed along).
    policy_factory("default", key_params=["temperature"])
    assert cache_service.get_cached_response("q", model="m", params={"http_client": object()}) is None


def test_scope_hash_depends_on_kind_and_id():
    assert keys.scope_hash("user", 42) != keys.scope_hash("tenant", 42)
    assert keys.scope_hash("user", 42) == keys.scope_hash("user", "42")  # ids compare as text
    assert keys.scope_hash("user", 42) != keys.scope_hash("user", 43)
    assert keys.scope_hash("user", None) == "global"


@pytest.mark.parametrize("bad", ["", True, 1.5, {"id": 1}, ["a"]])
def test_scope_must_be_a_plain_id(bad):
    with pytest.raises(InvalidRequestError):
        keys.scope_hash("user", bad)


@pytest.mark.parametrize("bad", [[], {}, None, 42, [{"content": "no role"}], [{"role": "user"}], ["text"]])
def test_malformed_messages_are_a_clear_error(policy_factory, bad):
    policy_factory("default")
    with pytest.raises(InvalidRequestError):
        cache_service.get_cached_response(bad, model="m")


@pytest.mark.parametrize("bad", ["", None, 7])
def test_model_is_required(policy_factory, bad):
    policy_factory("default")
    with pytest.raises(InvalidRequestError):
        cache_service.get_cached_response("q", model=bad)


def test_string_messages_equal_one_user_message():
    assert keys.normalize_messages("hi") == [{"role": "user", "content": "hi"}]


def test_normalize_text():
    assert keys.normalize_text("  \uff21BC\u00a0 def\n\nG ") == "abc def g"


def test_rollout_bucket_is_stable_and_in_range():
    digests = [keys.content_digest([{"role": "user", "content": f"q{i}"}], model="m", params={}, context_version=None)
               for i in range(500)]
    buckets = [keys.rollout_bucket(d) for d in digests]
    assert all(0 <= b < 100 for b in buckets)
    assert buckets == [keys.rollout_bucket(d) for d in digests]
    assert len(set(buckets)) > 80  # spread over the range, not clumped


def test_digest_ignores_generation_and_scope_but_not_schema_version(monkeypatch):
    args = ([{"role": "user", "content": "q"}],)
    kwargs = {"model": "m", "params": {}, "context_version": None}
    before = keys.content_digest(*args, **kwargs)
    monkeypatch.setattr(keys, "KEY_SCHEMA_VERSION", 2)
    assert keys.content_digest(*args, **kwargs) != before
