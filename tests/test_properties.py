"""Property-based tests (hypothesis) of the key recipe against the real Redis.

- A lookup under one scope never returns an entry stored under another.
- Equal canonical inputs always hit: dict key order, params the policy ignores, ``1`` vs
  ``1.0`` and Unicode NFC vs NFD do not matter.
- Keys stay short, printable ASCII, and no prompt or scope text reaches Redis or the logs.

Text strategies include NUL, lone surrogates, RTL marks, emoji and combining sequences.
Each example gets a nonce (as context_version) so examples never see each other's entries.
"""
from __future__ import annotations

import unicodedata
import uuid

import pytest
import redis as redis_lib
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ragcache import store
from ragcache.models import DEFAULT_IGNORED_PARAMS
from ragcache.services import cache_service

from .conftest import REDIS_URL

pytestmark = pytest.mark.django_db

MODEL = "prop-model"
ODD = ["\x00", "\ud800", "\udfff", "\u202e", "\u200f", "مرحبا", "שלום", "😀", "👩‍👩‍👧", "e\u0301", "\ufeff",
       "\n\t", " "]
# Every code point, surrogates included, plus the odd ones above more often.
text = st.lists(
    st.one_of(st.characters(exclude_categories=()), st.sampled_from(ODD)), max_size=30
).map("".join)
nonempty_text = text.filter(lambda t: t != "")
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.floats(allow_nan=False, allow_infinity=False) | text,
    # Dict keys distinct in NFC: two keys equal in Unicode are a clear error (tests/test_keys.py).
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3).filter(
        lambda d: len({unicodedata.normalize("NFC", k) for k in d}) == len(d)),
    max_leaves=8,
)
# Every param enters the key except the policy's ignored ones (the default list here).
IGNORED = ["user", "stream", "metadata", "timeout"]
assert set(IGNORED) <= set(DEFAULT_IGNORED_PARAMS)
params = st.dictionaries(st.sampled_from(["temperature", "top_p", "seed", "stop", "tools", "unrelated", *IGNORED]),
                         json_values, max_size=5)
noise_params = st.dictionaries(st.sampled_from(IGNORED), json_values, max_size=4)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool"]), "content": text},
    optional={"name": text, "tool_call_id": text},
)
messages = st.one_of(nonempty_text, st.lists(message, min_size=1, max_size=4))
scopes = st.one_of(st.integers(min_value=-(10**30), max_value=10**30), nonempty_text)

PROPERTY = settings(
    max_examples=60,
    deadline=None,
    database=None,  # nothing written into the working tree
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def permuted(value):
    """The same JSON value with every dict's keys in reverse order."""
    if isinstance(value, dict):
        return {k: permuted(value[k]) for k in reversed(list(value))}
    if isinstance(value, list):
        return [permuted(item) for item in value]
    return value


def equivalent(value):
    """An equal JSON value written differently: dict keys in reverse order, strings in
    Unicode NFD, whole numbers as floats and integral floats as ints (one JSON number)."""
    if isinstance(value, dict):
        return {unicodedata.normalize("NFD", k): equivalent(value[k]) for k in reversed(list(value))}
    if isinstance(value, list):
        return [equivalent(item) for item in value]
    if isinstance(value, str):
        return unicodedata.normalize("NFD", value)
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int) and abs(value) < 2**53:
        return float(value)
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    return value


def answer(nonce: str) -> dict:
    return {"choices": [{"message": {"content": f"answer {nonce} \u202e😀\x00"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 4}}


@pytest.fixture
def scoped_policies(policy_factory):
    ignored = list(DEFAULT_IGNORED_PARAMS)
    policy_factory("per-user", scope="user", ignored_params=ignored)
    policy_factory("per-tenant", scope="tenant", ignored_params=ignored)
    policy_factory("shared", scope="global", ignored_params=ignored)


@PROPERTY
@given(msgs=messages, prms=params, a=scopes, b=scopes, policy=st.sampled_from(["per-user", "per-tenant"]))
def test_lookup_under_one_scope_never_returns_another_scopes_entry(scoped_policies, msgs, prms, a, b, policy):
    # An int and its decimal string name the same user (scope ids are compared as text).
    if str(a) == str(b):
        b = f"{b}-other"
    nonce = uuid.uuid4().hex
    common = {"model": MODEL, "policy": policy, "params": prms, "context_version": nonce}
    assert cache_service.cache_response(msgs, answer(nonce), scope=a, **common)
    assert cache_service.get_cached_response(msgs, scope=b, **common) is None
    result = cache_service.get_or_call(msgs, lambda: answer("for b"), scope=b, **common)
    assert not result.hit and result.response == answer("for b")
    hit = cache_service.get_cached_response(msgs, scope=a, **common)
    assert hit is not None and hit.response == answer(nonce)
    # b's own answer is now stored; a still sees its own.
    assert cache_service.get_cached_response(msgs, scope=b, **common).response == answer("for b")
    assert cache_service.get_cached_response(msgs, scope=a, **common).response == answer(nonce)


@PROPERTY
@given(msgs=messages, prms=params, scope=scopes, noise=noise_params, policy=st.sampled_from(["per-user", "shared"]))
def test_equal_canonical_inputs_always_hit(scoped_policies, msgs, prms, scope, noise, policy):
    nonce = uuid.uuid4().hex
    scope = scope if policy == "per-user" else None
    stored = cache_service.get_or_call(msgs, lambda: answer(nonce), model=MODEL, policy=policy, scope=scope,
                                       params=prms, context_version=nonce)
    assert not stored.hit
    # The same messages and params written differently (key order, NFD, 1 vs 1.0), with
    # other values for the params the policy ignores: the same question.
    keyed = {k: v for k, v in prms.items() if k not in IGNORED}
    again = cache_service.get_or_call(
        equivalent(msgs), lambda: answer("second call"), model=MODEL, policy=policy, scope=scope,
        params={**permuted(noise), **equivalent(keyed)}, context_version=nonce,
    )
    assert again.hit and again.response == answer(nonce) and again.key == stored.key


def redis_contents(prefix: str) -> tuple[list[bytes], list[bytes]]:
    """Every key name under ``prefix``, and every value, field and stream entry stored there."""
    client = redis_lib.Redis.from_url(REDIS_URL)
    names: list[bytes] = []
    found: list[bytes] = []
    for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        names.append(key)
        kind = client.type(key)
        if kind == b"hash":
            for field, value in client.hgetall(key).items():
                found += [field, value]
        elif kind == b"string":
            found.append(client.get(key))
        elif kind == b"stream":
            for _, fields in client.xrange(key):
                for field, value in fields.items():
                    found += [field, value]
    client.close()
    return names, found


@PROPERTY
@given(before=text, after=text, prms=params, scope=scopes, as_list=st.booleans())
def test_keys_are_short_ascii_and_carry_no_caller_text(scoped_policies, ragcache_log, before, after, prms, scope,
                                                       as_list):
    marker = f"MARK{uuid.uuid4().hex[:12]}"
    scope_marker = f"SCOPE{uuid.uuid4().hex[:12]}"
    prompt = f"{before}{marker}{after}"
    msgs = [{"role": "user", "content": prompt}] if as_list else prompt
    scope = f"{scope}{scope_marker}"
    result = cache_service.get_or_call(msgs, lambda: answer("k"), model=MODEL, policy="per-user", scope=scope,
                                       params={**prms, "temperature": marker})
    assert cache_service.get_or_call(msgs, lambda: answer("x"), model=MODEL, policy="per-user", scope=scope,
                                     params={**prms, "temperature": marker}).hit
    key = result.key
    assert len(key.encode()) < 1024
    assert key.isascii() and key.isprintable() and " " not in key
    names, values = redis_contents(store.current_layout().root)
    assert names and values, "nothing was written"
    assert any(b":e:" in name for name in names) and any(name.endswith(b":u") for name in names)
    for name in names:
        assert len(name) < 1024 and name.isascii() and name.decode().isprintable()
    for blob in names + values:
        assert marker.encode() not in blob and scope_marker.encode() not in blob
    assert marker not in ragcache_log.text and scope_marker not in ragcache_log.text
