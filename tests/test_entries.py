"""The entry format and admission rules, without Redis: what is admitted, how it is
encoded (JSON, zlib above the threshold, never pickle) and how bad bytes are rejected."""
from __future__ import annotations

import json
import time
import zlib
from decimal import Decimal

import pytest

from ragcache import entries
from ragcache.entries import CorruptEntry, Refused
from ragcache.keys import KEY_SCHEMA_VERSION


def encode(response, **overrides):
    _, _, finish_reason, pt, ct, cost = entries.admit(response)
    kwargs = {
        "model": "m", "finish_reason": finish_reason, "prompt_tokens": pt, "completion_tokens": ct, "cost": cost,
        "latency_ms": 123.4567, "ttl_seconds": 60, "compress_threshold": 4096, "max_bytes": 1 << 20,
    }
    kwargs.update(overrides)
    return entries.encode(response, **kwargs)


def test_extract_openai_shape():
    response = {
        "choices": [{"message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1},
        "cost": "0.0005",
    }
    assert entries.extract(response) == (response, "hi", "stop", 3, 1, Decimal("0.0005"))


def test_extract_flat_shape_and_string():
    assert entries.extract({"content": "hi", "finish_reason": "stop"})[1:3] == ("hi", "stop")
    assert entries.extract("hi") == ("hi", "hi", None, 0, 0, None)


@pytest.mark.parametrize("usage", [{"prompt_tokens": -1, "completion_tokens": "7"}, {"prompt_tokens": True}, "n/a"])
def test_bad_token_counts_count_as_zero(usage):
    assert entries.extract({"content": "x", "usage": usage})[3:5] == (0, 0)


@pytest.mark.parametrize("cost", ["-1", "NaN", "Infinity", "free", float("inf")])
def test_bad_cost_is_ignored(cost):
    assert entries.extract({"content": "x", "cost": cost})[5] is None


@pytest.mark.parametrize(("response", "reason"), [
    (RuntimeError("x"), "error"),
    (KeyboardInterrupt(), "error"),
    ("", "empty"),
    (" \n ", "empty"),
    ({"content": None}, "empty"),
    ({"choices": []}, "empty"),
    ({"choices": ["not a dict"]}, "empty"),
    ({"choices": [{"message": "not a dict"}]}, "empty"),
    ({"content": "x", "finish_reason": "length"}, "truncated"),
    ({"choices": [{"message": {"content": "x"}, "finish_reason": "content_filter"}]}, "content_filter"),
    ({"content": "x", "error": "quota"}, "error"),
    (3.14, "unsupported"),
    (("a", "b"), "unsupported"),
])
def test_admit_refuses(response, reason):
    with pytest.raises(Refused) as info:
        entries.admit(response)
    assert info.value.reason == reason


@pytest.mark.parametrize("finish_reason", [None, "stop", "tool_calls", "end_turn"])
def test_admit_accepts_complete_answers(finish_reason):
    assert entries.admit({"content": "x", "finish_reason": finish_reason})[1] == "x"


def test_encode_decode_round_trip():
    response = {"content": "Grüße \U0001f600", "usage": {"prompt_tokens": 5, "completion_tokens": 2}, "cost": 0.25}
    meta, body, compressed = encode(response)
    assert compressed is False
    assert json.loads(body) == response  # plain JSON, not pickle
    parsed = json.loads(meta)
    assert parsed["v"] == KEY_SCHEMA_VERSION and parsed["n"] == len(body)
    assert meta.startswith(f'{{"v":{KEY_SCHEMA_VERSION},'.encode())  # what the lookup script checks
    cached = entries.decode(meta, body, "k")
    assert cached.response == response and cached.content == "Grüße \U0001f600"
    assert (cached.prompt_tokens, cached.completion_tokens, cached.cost) == (5, 2, Decimal("0.25"))
    assert cached.latency_ms == 123.457
    assert (cached.expires_at - cached.created_at).total_seconds() == pytest.approx(60, abs=0.01)
    assert abs(cached.created_at.timestamp() - time.time()) < 60


def test_encode_compresses_above_threshold():
    response = {"content": "abc " * 1000}
    meta, body, compressed = encode(response, compress_threshold=100)
    assert compressed is True and json.loads(meta)["z"] == 1
    assert json.loads(zlib.decompress(body)) == response
    assert entries.decode(meta, body, "k").response == response


def test_encode_size_limit_counts_stored_bytes():
    with pytest.raises(Refused) as info:
        encode({"content": "abc " * 1000}, compress_threshold=0, max_bytes=1000)
    assert info.value.reason == "too_large"
    _, body, _ = encode({"content": "abc " * 1000}, compress_threshold=100, max_bytes=1000)
    assert len(body) <= 1000


@pytest.mark.parametrize("response", [{"content": "x", "obj": object()}, {"content": "x", "n": float("nan")}])
def test_encode_refuses_non_json(response):
    with pytest.raises(Refused) as info:
        entries.encode(response, model="m", finish_reason=None, prompt_tokens=0, completion_tokens=0, cost=None,
                       latency_ms=None, ttl_seconds=1, compress_threshold=0, max_bytes=1000)
    assert info.value.reason == "not_serializable"


@pytest.mark.parametrize(("meta", "body"), [
    (b"not json", b'"x"'),
    (b"[1]", b'"x"'),
    (b'{"v":0,"n":3}', b'"x"'),
    (b'{"v":1,"at":1,"exp":2,"z":0,"n":3}', b"abc"),
    (b'{"v":1,"at":1,"exp":2,"z":1,"n":3}', b'"x"'),
    (b'{"v":1,"z":0,"n":3}', b'"x"'),
    (b'{"v":1,"at":"x","exp":2,"z":0,"n":3}', b'"x"'),
    (b'{"v":1,"at":1,"exp":2,"z":0,"n":2}', b"42"),
    (b'{"v":1,"at":1,"exp":2,"z":0,"cost":"abc","n":3}', b'"x"'),
    (b"\xff\xfe", b'"x"'),
])
def test_decode_rejects_bad_bytes(meta, body):
    with pytest.raises(CorruptEntry):
        entries.decode(meta, body, "k")
