"""The key recipe, proven through the real service and Redis: every ingredient that shapes
the answer changes the key (miss), everything else keeps it (hit)."""
from __future__ import annotations

import copy
import re

import pytest
from redis.crc import key_slot

from ragcache import keys
from ragcache.exceptions import InvalidRequestError
from ragcache.models import DEFAULT_IGNORED_PARAMS, CachePolicy
from ragcache.policies import registry
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
HEX64 = "[0-9a-f]{64}"


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
    policy_factory("default", mode="on", scope="global", ignored_params=list(DEFAULT_IGNORED_PARAMS),
                   normalize_query=False)
    assert cache_service.cache_response(response=ANSWER, **request()) is True
    hit = cache_service.get_cached_response(**request())
    assert hit is not None and hit.response == ANSWER
    return hit


# Every request parameter enters the key (Trust rule 3), not only an allow-list: the 0.1
# allow-list's params, and ones it dropped (n, penalties, newer OpenAI params, unknown ones).
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
    "n": 3,
    "presence_penalty": 0.5,
    "frequency_penalty": -0.5,
    "logit_bias": {"50256": -100},
    "logprobs": True,
    "top_logprobs": 2,
    "max_completion_tokens": 100,
    "reasoning_effort": "high",
    "parallel_tool_calls": False,
    "prediction": {"type": "content", "content": "x"},
    "request_id": "req-123",  # a param ragcache has never heard of: it may shape the answer
}

# Transport and bookkeeping fields that never shape the answer (the default ignored_params).
IGNORED_VALUES = {
    "stream": True,
    "user": "someone-else",
    "metadata": {"trace": "abc"},
    "timeout": 30,
    "extra_headers": {"X-Trace": "1"},
    "extra_query": {"debug": "1"},
    "store": True,
    "safety_identifier": "hashed-user",
    "prompt_cache_key": "k1",
    "prompt_cache_retention": "24h",
    "service_tier": "flex",
}


def test_every_default_ignored_param_has_a_probe_value():
    assert set(IGNORED_VALUES) == set(DEFAULT_IGNORED_PARAMS)
    assert not set(NEW_VALUES) & set(DEFAULT_IGNORED_PARAMS)


MISSES = {
    "system content": with_message(0, content="You answer from the legal handbook."),
    "user content": with_message(1, content="How many sick days do I get?"),
    "system role": with_message(0, role="developer"),
    "user role": with_message(1, role="assistant"),
    "message name": with_message(1, name="bob"),  # every field of every message
    "message order": request(messages=list(reversed(BASE["messages"]))),
    "extra message": request(messages=[*BASE["messages"], {"role": "assistant", "content": "Let me check."}]),
    "system message dropped": request(messages=BASE["messages"][1:]),
    "user text only": request(messages=BASE["messages"][1]["content"]),
    "content parts": with_message(1, content=[{"type": "text", "text": BASE["messages"][1]["content"]}]),
    "model": request(model="gpt-4o"),
    "context_version": request(context_version="kb-2024-07"),
    "context_version missing": request(context_version=None),
    "param removed": request(params={"max_tokens": 256, "tools": TOOLS}),
    "no params": request(params=None),
    "nested tool schema": with_params(tools=[{**TOOLS[0], "function": {**TOOLS[0]["function"], "name": "search"}}]),
    "a bool is not the number": with_params(max_tokens=True),
    "a string is not the number": with_params(temperature="0.2"),
    "nearly equal float": with_params(temperature=0.20000000000000004),
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
    "integral float equals int": with_params(max_tokens=256.0),
    "tuple equals list": with_params(tools=tuple(TOOLS)),
    **{f"ignored {name}": with_params(**{name: value}) for name, value in IGNORED_VALUES.items()},
    "all ignored at once": with_params(**IGNORED_VALUES),
}


@pytest.mark.parametrize("same", list(HITS.values()), ids=list(HITS))
def test_keeping_every_ingredient_hits(stored, same):
    hit = cache_service.get_cached_response(**same)
    assert hit is not None
    assert hit.response == ANSWER
    assert hit.key == stored.key


def test_the_policys_ignored_params_leave_the_key(policy_factory):
    policy_factory("narrow", ignored_params=["max_tokens", "seed"])
    assert cache_service.cache_response(response=ANSWER, policy="narrow", **request())
    assert cache_service.get_cached_response(policy="narrow", **with_params(max_tokens=1, seed=3)) is not None
    assert cache_service.get_cached_response(policy="narrow", **with_params(temperature=0.3)) is None
    # The policy's list replaces the default one: "user" now enters the key.
    assert cache_service.get_cached_response(policy="narrow", **with_params(user="u2")) is None


def test_empty_ignored_params_keys_every_param(policy_factory):
    policy_factory("strict", ignored_params=[])
    assert cache_service.cache_response(response=ANSWER, policy="strict", **request())
    assert cache_service.get_cached_response(policy="strict", **request()) is not None
    for name, value in IGNORED_VALUES.items():
        assert cache_service.get_cached_response(policy="strict", **with_params(**{name: value})) is None, name


def test_a_new_policy_ignores_the_default_params(db):
    policy = CachePolicy.objects.create(name="fresh")
    assert policy.ignored_params == DEFAULT_IGNORED_PARAMS
    registry.invalidate()
    assert cache_service.cache_response(response=ANSWER, policy="fresh", **request())
    assert cache_service.get_cached_response(policy="fresh", **with_params(user="x", stream=True)) is not None


def test_scope_is_an_ingredient(policy_factory):
    policy_factory("per-user", scope="user")
    assert cache_service.cache_response(response=ANSWER, policy="per-user", scope="u1", **request())
    assert cache_service.get_cached_response(policy="per-user", scope="u1", **request()) is not None
    assert cache_service.get_cached_response(policy="per-user", scope="u2", **request()) is None


def test_policy_generation_is_an_ingredient(stored):
    policy = CachePolicy.objects.get(name="default")
    assert f":default:{policy.generation}:" in stored.key
    old = policy.generation
    new = policy.purge()
    registry.invalidate()
    assert new > old
    assert cache_service.get_cached_response(**request()) is None
    assert cache_service.cache_response(response="new", **request())
    hit = cache_service.get_cached_response(**request())
    assert hit.response == "new" and f":default:{new}:" in hit.key and hit.key != stored.key


def test_policy_name_is_an_ingredient(stored, policy_factory):
    policy_factory("other")
    assert cache_service.get_cached_response(policy="other", **request()) is None


def test_a_call_and_a_stream_never_share_an_entry(stored):
    # The same question as a stream misses: entries of the two kinds have different shapes.
    assert cache_service.get_or_stream(call=lambda: iter(["x"]), **request()).hit is False


# --- normalisation ---------------------------------------------------------------------------

NORMALISED_VARIANTS = [
    "how many vacation days do i get?",
    "How   many\tvacation days do I get?  ",
    "HOW MANY VACATION DAYS DO I GET?",
    "\uff28ow many vacation days do I get?",  # fullwidth H: NFKC folds it
    "\nHow many vacation days do I get?\n\n",  # leading and trailing blank lines
]


@pytest.mark.parametrize("variant", NORMALISED_VARIANTS)
def test_normalisation_on_folds_case_width_and_spaces_inside_a_line(policy_factory, variant):
    policy_factory("default", normalize_query=True)
    assert cache_service.cache_response(response=ANSWER, **request())
    assert cache_service.get_cached_response(**with_message(1, content=variant)) is not None


@pytest.mark.parametrize("variant", NORMALISED_VARIANTS)
def test_normalisation_off_keeps_text_exact(policy_factory, variant):
    policy_factory("default", normalize_query=False)
    assert cache_service.cache_response(response=ANSWER, **request())
    assert cache_service.get_cached_response(**with_message(1, content=variant)) is None


# Trust rule 4: texts whose lines or indentation differ never share an entry.
NOT_MERGED = [
    "  How many vacation days do I get?",  # indentation
    "How many\nvacation days do I get?",  # a line break where there was a space
    "How many vacation\n days do I get?",
    "How many vacation days do we get?",  # different words
]


@pytest.mark.parametrize("variant", NOT_MERGED)
def test_normalisation_does_not_merge_different_texts(policy_factory, variant):
    policy_factory("default", normalize_query=True)
    assert cache_service.cache_response(response=ANSWER, **request())
    assert cache_service.get_cached_response(**with_message(1, content=variant)) is None


def test_normalisation_keeps_indentation(policy_factory):
    policy_factory("default", normalize_query=True)
    code = "for x in y:\n    if x:\n        f(x)\n    g(x)"
    assert cache_service.cache_response(code, ANSWER, model="m")
    assert cache_service.get_cached_response(code.replace("\n    g", "\n        g"), model="m") is None
    assert cache_service.get_cached_response(code.replace("\n    g", "\n\tg"), model="m") is None
    assert cache_service.get_cached_response(code.upper() + "  ", model="m") is not None


def test_normalisation_never_touches_urls_or_ids_in_content_parts(policy_factory):
    policy_factory("default", normalize_query=True)
    parts = [{"type": "text", "text": "Describe  THIS"},
             {"type": "image_url", "image_url": {"url": "https://example.test/A.png"}}]
    assert cache_service.cache_response([{"role": "user", "content": parts}], ANSWER, model="m")
    same = [{"type": "text", "text": "describe this"}, parts[1]]
    other = [parts[0], {"type": "image_url", "image_url": {"url": "https://example.test/a.png"}}]
    assert cache_service.get_cached_response([{"role": "user", "content": same}], model="m") is not None
    assert cache_service.get_cached_response([{"role": "user", "content": other}], model="m") is None


@pytest.mark.parametrize("normalize", [False, True])
def test_nfc_and_nfd_are_one_question(policy_factory, normalize):
    policy_factory("default", normalize_query=normalize)
    assert cache_service.cache_response(response=ANSWER, **with_message(1, content="Caf\u00e9 hours?"))
    assert cache_service.get_cached_response(**with_message(1, content="Cafe\u0301 hours?")) is not None


# --- the key's shape ---------------------------------------------------------------------------

def test_key_shape_has_no_caller_text(stored, ragcache_prefix):
    generation = CachePolicy.objects.get(name="default").generation
    match = re.fullmatch(
        rf"{re.escape(ragcache_prefix)}:{keys.KEY_SCHEMA_VERSION}:\{{(rc\d+\.\d+)\}}:e:default:{generation}"
        rf":global:({HEX64})", stored.key)
    assert match, stored.key
    tag, digest = match.groups()
    assert tag == keys.shard_tags()[keys.shard_of(digest)]
    for text in ("vacation", "handbook", "gpt-4o-mini", "kb-2024-06"):
        assert text not in stored.key


def test_scoped_key_shape(policy_factory, ragcache_prefix):
    policy = policy_factory("per-tenant", scope="tenant")
    result = cache_service.get_or_call("hello", lambda: "hi", model="m", policy="per-tenant", scope="acme-corp")
    assert re.fullmatch(
        rf"{re.escape(ragcache_prefix)}:{keys.KEY_SCHEMA_VERSION}:\{{rc\d+\.\d+\}}:e:per-tenant:"
        rf"{policy.generation}:[0-9a-f]{{24}}:{HEX64}", result.key), result.key
    assert "acme" not in result.key


def test_every_key_of_a_request_shares_one_hash_slot(ragcache_prefix):
    layout = keys.layout(ragcache_prefix)
    digest = keys.content_digest([{"role": "user", "content": "q"}], model="m", params={}, context_version=None)
    key = keys.CacheKey(layout, "default", 5, "global", digest)
    names = [key.entry, key.lock, key.flight("tok"), layout.streams[key.shard], layout.versions[key.shard],
             layout.stamp_bases[key.shard] + "abc"]
    assert len({key_slot(name.encode()) for name in names}) == 1
    assert key.entry.replace(":e:", ":l:") == key.lock
    assert key.short == digest[:16] and key.redis_key == key.entry


def test_shard_tags_spread_over_the_slot_ranges():
    tags = keys.shard_tags()
    assert len(tags) == len(set(tags)) == keys.SHARDS
    width = 16384 // keys.SHARDS
    assert [key_slot(tag.encode()) // width for tag in tags] == list(range(keys.SHARDS))


# --- the recipe's building blocks -----------------------------------------------------------

def test_canonical_json_is_order_independent():
    assert keys.canonical_json({"b": 1, "a": {"y": 2, "x": [1, {"d": 0, "c": 1}]}}) == keys.canonical_json(
        {"a": {"x": [1, {"c": 1, "d": 0}], "y": 2}, "b": 1}
    )


def test_canonical_json_keeps_list_order():
    assert keys.canonical_json([1, 2]) != keys.canonical_json([2, 1])


@pytest.mark.parametrize("bad", [object(), float("nan"), float("inf"), float("-inf"), b"bytes", {1, 2}, 2**64])
def test_the_recipe_rejects_non_json(bad):
    def digest(messages=(("role", "user"), ("content", "q")), params=None, context_version=None):
        return keys.content_digest(keys.normalize_messages([dict(messages)]), model="m",
                                   params=keys.key_params(params, ()), context_version=context_version)

    digest()
    with pytest.raises(InvalidRequestError):
        digest(params={"x": bad})
    with pytest.raises(InvalidRequestError):
        digest(messages=(("role", "user"), ("content", "q"), ("extra", bad)))
    with pytest.raises(InvalidRequestError):
        digest(context_version=bad)


def test_non_string_dict_keys_are_a_clear_error():
    with pytest.raises(InvalidRequestError, match="string keys"):
        keys.key_params({"logit_bias": {50256: -100}}, ())


@pytest.mark.parametrize("where", ["params", "nested", "message"])
def test_dict_keys_equal_in_nfc_are_a_clear_error_never_merged(where):
    # Merging them would keep one value and drop the other, by order: two different
    # requests would share an answer.
    both = {"caf\u00e9": 1, "cafe\u0301": 2}
    with pytest.raises(InvalidRequestError, match="NFC"):
        if where == "params":
            keys.key_params(both, ())
        elif where == "nested":
            keys.key_params({"tools": [{"parameters": both}]}, ())
        else:
            keys.normalize_messages([{"role": "user", "content": "q", "\u212aind": 1, "Kind": 2}])  # Kelvin sign
    assert keys.key_params({"cafe\u0301": 1}, ()) == keys.key_params({"caf\u00e9": 1}, ())
    assert keys.key_params({"cafe\u0301": 1, "user": "u"}, ("user",)) == {"caf\u00e9": 1}


def test_lone_surrogates_are_keyed_not_refused(policy_factory):
    # JSON allows a lone surrogate as an escape ("\ud800"); json.loads gives one. 0.1 keyed
    # such requests; orjson alone cannot write them (they have no UTF-8 form).
    def digest(text, params=None):
        return keys.content_digest(keys.normalize_messages(text), model="m", params=keys.key_params(params, ()),
                                   context_version=None)

    assert digest("a\ud800") == digest("a\ud800")
    assert digest("a\ud800") != digest("a\udc00") != digest("a")
    assert digest("a\ud800") != digest("a\\ud800")  # the six characters backslash-u-d-8-0-0
    assert digest("q", {"stop": ["\udfff"], "b": 1}) == digest("q", {"b": 1.0, "stop": ["\udfff"]})
    policy_factory("default")
    assert cache_service.cache_response("odd \ud800 text", ANSWER, model="m")
    assert cache_service.get_cached_response("odd \ud800 text", model="m").response == ANSWER
    assert cache_service.get_cached_response("odd \udbff text", model="m") is None


def test_integral_floats_equal_ints_in_the_digest():
    def digest(params):
        return keys.content_digest([{"role": "user", "content": "q"}], model="m",
                                   params=keys.key_params(params, ()), context_version=None)

    assert digest({"t": 0}) == digest({"t": 0.0}) == digest({"t": -0.0})
    assert digest({"t": 1}) == digest({"t": 1.0})
    assert digest({"t": [2, {"u": 3}]}) == digest({"t": [2.0, {"u": 3.0}]})
    assert digest({"t": 1}) != digest({"t": True})
    assert digest({"t": 0.5}) != digest({"t": 0})
    assert digest({"t": 1}) != digest({"t": "1"})


def test_non_json_param_is_a_clear_error(policy_factory):
    policy_factory("default")
    with pytest.raises(InvalidRequestError):
        cache_service.get_cached_response("q", model="m", params={"temperature": object()})


def test_non_json_ignored_param_is_fine(policy_factory):
    # Params the policy ignores never reach the encoder (e.g. a client object passed along).
    policy_factory("default", ignored_params=["http_client"])
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
    # NFKC (fullwidth A, no-break space), lower case, runs of spaces inside a line collapsed,
    # trailing ones dropped; line breaks, blank lines inside and indentation kept.
    assert keys.normalize_text("  \uff21BC\u00a0 def\n\nG ") == "  abc def\n\ng"
    assert keys.normalize_text("a\n\tb\n    c") == "a\n\tb\n    c"
    assert keys.normalize_text("x\r\ny") == keys.normalize_text("x\ny")  # one line break, however written


def test_nfc_applies_without_normalisation():
    assert keys.normalize_messages("cafe\u0301") == keys.normalize_messages("caf\u00e9")
    assert keys.normalize_messages("Caf\u00e9") != keys.normalize_messages("caf\u00e9")  # case kept


def test_rollout_bucket_is_stable_and_in_range():
    digests = [keys.content_digest([{"role": "user", "content": f"q{i}"}], model="m", params={}, context_version=None)
               for i in range(500)]
    buckets = [keys.rollout_bucket(d) for d in digests]
    assert all(0 <= b < 100 for b in buckets)
    assert buckets == [keys.rollout_bucket(d) for d in digests]
    assert len(set(buckets)) > 80  # spread over the range, not clumped


def test_digest_depends_on_kind_and_schema_version_not_generation_or_scope(monkeypatch):
    args = ([{"role": "user", "content": "q"}],)
    kwargs = {"model": "m", "params": {}, "context_version": None}
    before = keys.content_digest(*args, **kwargs)
    assert keys.content_digest(*args, **kwargs, kind="call") == before
    assert keys.content_digest(*args, **kwargs, kind="stream") != before
    monkeypatch.setattr(keys, "KEY_SCHEMA_VERSION", keys.KEY_SCHEMA_VERSION + 1)
    assert keys.content_digest(*args, **kwargs) != before
