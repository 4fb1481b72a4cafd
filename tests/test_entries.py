"""The entry format and admission rules, without Redis: what is admitted, how it is
encoded (JSON, zlib above the threshold, never pickle) and how bad bytes are rejected."""
from __future__ import annotations

import json
import time
import zlib
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

import orjson
import pytest

from ragcache import entries
from ragcache.entries import Answer, CorruptEntry, Refused, Usage
from ragcache.keys import KEY_SCHEMA_VERSION


@dataclass
class Point:
    x: int
    y: int


def encode(response, **overrides):
    answer = entries.admit(response)
    kwargs = {
        "kind": entries.KIND_RESPONSE, "model": "m", "finish_reason": answer.finish_reason, "usage": answer.usage,
        "cost": answer.cost, "latency_ms": 123.4567, "ttl_seconds": 60, "compress_threshold": 4096,
        "max_bytes": 1 << 20,
    }
    kwargs.update(overrides)
    return entries.encode(answer.body, **kwargs)


def test_extract_openai_shape():
    response = {
        "choices": [{"message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1},
        "cost": "0.0005",
    }
    assert entries.extract(response) == Answer(response, "hi", "stop", Usage(3, 0, 1, True), Decimal("0.0005"))


def test_extract_flat_shape_and_string():
    answer = entries.extract({"content": "hi", "finish_reason": "stop"})
    assert (answer.content, answer.finish_reason) == ("hi", "stop")
    assert entries.extract("hi") == Answer("hi", "hi", None, Usage(0, 0, 0, False), None)


def test_missing_usage_is_unknown_not_zero():
    assert entries.extract({"content": "x"}).usage == Usage(0, 0, 0, False)
    assert entries.extract({"content": "x", "usage": "n/a"}).usage.known is False
    assert entries.extract({"content": "x", "usage": {}}).usage.known is False


@pytest.mark.parametrize(("usage", "expected"), [
    # OpenAI: prompt_tokens includes the cached ones; Usage.prompt_tokens is the uncached part.
    ({"prompt_tokens": 10000, "completion_tokens": 50, "prompt_tokens_details": {"cached_tokens": 9000}},
     Usage(1000, 9000, 50, True)),
    # DeepSeek's name for the same thing.
    ({"prompt_tokens": 100, "completion_tokens": 5, "prompt_cache_hit_tokens": 60}, Usage(40, 60, 5, True)),
    # Anthropic: input_tokens excludes cache reads; cache writes are billed as input.
    ({"input_tokens": 12, "output_tokens": 7, "cache_read_input_tokens": 300, "cache_creation_input_tokens": 20},
     Usage(32, 300, 7, True)),
    ({"prompt_tokens": 3.0, "completion_tokens": 1}, Usage(3, 0, 1, True)),  # a whole float is a count
])
def test_usage_names_of_each_provider(usage, expected):
    assert entries.extract({"content": "x", "usage": usage}).usage == expected


# Trust rule 5: absurd numbers are refused where they enter (0.1 counted them as zero).
@pytest.mark.parametrize("usage", [
    {"prompt_tokens": -1, "completion_tokens": 7},
    {"prompt_tokens": 3, "completion_tokens": "7"},
    {"prompt_tokens": True},
    {"prompt_tokens": 1.5},
    {"prompt_tokens": float("nan")},
    {"prompt_tokens": 2**31},
    {"input_tokens": -3, "output_tokens": 1},
    {"prompt_tokens": 10, "prompt_tokens_details": {"cached_tokens": 11}},  # more cached than sent
])
def test_bad_token_counts_are_refused(usage):
    with pytest.raises(Refused) as info:
        entries.extract({"content": "x", "usage": usage})
    assert info.value.reason == "invalid_usage"
    assert "usage" in str(info.value) or "cached" in str(info.value)  # a message that says what was wrong


@pytest.mark.parametrize("cost", ["-1", "NaN", "Infinity", "free", float("inf"), -0.5, True, [1], "1e9"])
def test_bad_cost_is_refused(cost):
    with pytest.raises(Refused) as info:
        entries.extract({"content": "x", "cost": cost})
    assert info.value.reason == "invalid_cost"


@pytest.mark.parametrize(("cost", "expected"), [
    (0, Decimal(0)), ("0.25", Decimal("0.25")), (1.4e-6, Decimal("1.4E-6")),
])
def test_good_cost_is_exact(cost, expected):
    assert entries.extract({"content": "x", "cost": cost}).cost == expected


@pytest.mark.parametrize(("response", "reason"), [
    (RuntimeError("x"), "error"),
    (KeyboardInterrupt(), "error"),
    ("", "empty"),
    (" \n ", "empty"),
    ({"content": None}, "empty"),
    ({"choices": []}, "empty"),
    ({"choices": ["not a dict"]}, "unsupported"),
    ({"choices": [{"message": "not a dict"}]}, "empty"),
    ({"choices": [{"message": {"content": None, "tool_calls": []}}]}, "empty"),
    ({"content": "x", "finish_reason": "length"}, "truncated"),
    ({"choices": [{"message": {"content": "x"}, "finish_reason": "content_filter"}]}, "content_filter"),
    ({"choices": [{"message": {"content": None, "refusal": "I can't."}, "finish_reason": "stop"}]}, "refusal"),
    # Any choice, not only the first (Trust rule 3).
    ({"choices": [{"message": {"content": "x"}, "finish_reason": "stop"},
                  {"message": {"content": "y"}, "finish_reason": "length"}]}, "truncated"),
    ({"choices": [{"message": {"content": "x"}, "finish_reason": "stop"},
                  {"message": {"content": "y"}, "finish_reason": "content_filter"}]}, "content_filter"),
    ({"choices": [{"message": {"content": "x"}, "finish_reason": "stop"}, {"message": {"content": ""}}]}, "empty"),
    # Anthropic stop_reason.
    ({"content": [{"type": "text", "text": "x"}], "stop_reason": "max_tokens"}, "truncated"),
    ({"content": [{"type": "text", "text": "x"}], "stop_reason": "refusal"}, "refusal"),
    ({"content": [{"type": "text", "text": " "}], "stop_reason": "end_turn"}, "empty"),
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
    assert entries.admit({"content": "x", "finish_reason": finish_reason}).content == "x"


@pytest.mark.parametrize("message", [
    {"role": "assistant", "content": None,
     "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
    {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}},
])
def test_tool_call_only_answers_are_cacheable(message):
    response = {"choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}]}
    answer = entries.admit(response)
    assert answer.body == response and answer.content is None and answer.finish_reason == "tool_calls"
    meta, body = encode(response)
    assert entries.decode(meta, body, "k").response == response


def test_anthropic_tool_use_is_cacheable():
    response = {"content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}], "stop_reason": "tool_use"}
    assert entries.admit(response).content is None


def test_encode_decode_round_trip():
    response = {"content": "Grüße \U0001f600", "usage": {"prompt_tokens": 5, "completion_tokens": 2}, "cost": 0.25}
    meta, body = encode(response)
    parsed = json.loads(meta)
    assert parsed["z"] == 0
    assert json.loads(body) == response  # plain JSON, not pickle
    assert parsed["v"] == KEY_SCHEMA_VERSION and parsed["n"] == len(body)
    assert meta.startswith(f'{{"v":{KEY_SCHEMA_VERSION},'.encode())  # what the lookup script checks
    cached = entries.decode(meta, body, "k")
    assert cached.response == response and cached.content == "Grüße \U0001f600"
    assert (cached.prompt_tokens, cached.completion_tokens, cached.cost) == (5, 2, Decimal("0.25"))
    assert cached.usage_known is True and cached.kind == "response"
    assert cached.latency_ms == 123.457
    assert (cached.expires_at - cached.created_at).total_seconds() == pytest.approx(60, abs=0.01)
    assert abs(cached.created_at.timestamp() - time.time()) < 60


def test_cached_input_tokens_round_trip():
    response = {"content": "x", "usage": {"prompt_tokens": 100, "completion_tokens": 3,
                                          "prompt_tokens_details": {"cached_tokens": 80}}}
    cached = entries.decode(*encode(response), "k")
    assert (cached.prompt_tokens, cached.cached_prompt_tokens, cached.completion_tokens) == (20, 80, 3)
    assert cached.tokens == 103


def test_encode_compresses_above_threshold():
    response = {"content": "abc " * 1000}
    meta, body = encode(response, compress_threshold=100)
    assert json.loads(meta)["z"] == 1
    assert json.loads(zlib.decompress(body)) == response
    assert entries.decode(meta, body, "k").response == response


def test_encode_size_limit_counts_stored_bytes():
    with pytest.raises(Refused) as info:
        encode({"content": "abc " * 1000}, compress_threshold=0, max_bytes=1000)
    assert info.value.reason == "too_large"
    _, body = encode({"content": "abc " * 1000}, compress_threshold=100, max_bytes=1000)
    assert len(body) <= 1000


@pytest.mark.parametrize("response", [
    {"content": "x", "obj": object()},
    {"content": "x", "n": float("nan")},
    {"content": "x", "deep": [{"n": float("-inf")}]},
    {"content": "x", "created": datetime(2024, 1, 1)},  # a hit would return a str
    {"content": "x", "point": Point(1, 2)},  # a hit would return a dict
    {"content": "x\ud800"},  # no UTF-8 form
])
def test_encode_refuses_non_json(response):
    with pytest.raises(Refused) as info:
        entries.encode(response, kind=entries.KIND_RESPONSE, model="m", finish_reason=None, usage=Usage(), cost=None,
                       latency_ms=None, ttl_seconds=1, compress_threshold=0, max_bytes=1000)
    assert info.value.reason == "not_serializable"


def _meta(**fields):
    """Metadata as ragcache writes it, with ``fields`` replaced (None: removed)."""
    meta = {"v": KEY_SCHEMA_VERSION, "k": "r", "model": "m", "fr": None, "pt": 1, "cpt": 0, "ct": 1, "uk": 1,
            "cost": None, "lat": None, "at": 1.0, "exp": 2.0, "z": 0, "n": 3}
    for name, value in fields.items():
        if value is None:
            meta.pop(name)
        else:
            meta[name] = value
    return orjson.dumps(meta)


def test_valid_metadata_decodes():
    assert entries.decode(_meta(), b'"x"', "k").content == "x"
    assert entries.decode(_meta(cost="0.5", lat=12.5), b'"x"', "k").cost == Decimal("0.5")


@pytest.mark.parametrize(("meta", "body"), [
    (b"not json", b'"x"'),
    (b"[1]", b'"x"'),
    (b"\xff\xfe", b'"x"'),
    (_meta(v=1), b'"x"'),  # another key schema
    (_meta(v=0), b'"x"'),
    (_meta(), b"abc"),  # body not JSON
    (_meta(z=1), b'"x"'),  # says compressed, is not
    (_meta(at=None), b'"x"'),
    (_meta(at="x"), b'"x"'),
    (_meta(exp=float("inf")), b'"x"'),
    (_meta(n=2), b"42"),  # not an answer
    (_meta(cost="abc"), b'"x"'),
    (_meta(cost="-1"), b'"x"'),  # Trust rule 5: numbers no answer can have
    (_meta(cost=0.5), b'"x"'),  # cost is written as a decimal string
    (_meta(pt=-5), b'"x"'),
    (_meta(ct=1.5), b'"x"'),
    (_meta(cpt=True), b'"x"'),
    (_meta(pt=2**40), b'"x"'),
    (_meta(lat=-1), b'"x"'),
    (_meta(k="x"), b'"x"'),
    (_meta(model=7), b'"x"'),
    (_meta(fr=["stop"]), b'"x"'),
    (_meta(k="s"), b'"x"'),  # a stream entry holds a list of chunks
    (_meta(), b'""'),  # a stored answer that no longer passes admission
])
def test_decode_rejects_bad_bytes(meta, body):
    with pytest.raises(CorruptEntry):
        entries.decode(meta, body, "k")



# --- recorded streams: the same admission rules -------------------------------------------------

def chunk(content=None, finish_reason=None, index=0, **delta):
    if content is not None:
        delta["content"] = content
    return {"object": "chat.completion.chunk", "choices": [{"index": index, "delta": delta,
                                                             "finish_reason": finish_reason}]}


def record(chunks, max_bytes=1 << 20):
    recorder = entries.StreamRecorder(max_bytes)
    for item in chunks:
        assert orjson.loads(recorder.add(item)) == item  # what followers receive: the chunk's JSON
    return recorder.finish()


def test_a_complete_stream_is_admitted_with_its_usage():
    usage_chunk = {"object": "chat.completion.chunk", "choices": [],
                   "usage": {"prompt_tokens": 9, "completion_tokens": 2}}
    chunks = [chunk("Hel"), chunk("lo"), chunk(finish_reason="stop"), usage_chunk]
    answer = record(chunks)
    assert answer.body == chunks and answer.finish_reason == "stop"
    assert answer.usage == Usage(9, 0, 2, True)
    assert record(["plain ", "text"]).usage.known is False


def test_a_tool_call_stream_is_admitted():
    call = [{"index": 0, "id": "c1", "type": "function", "function": {"name": "f", "arguments": ""}}]
    assert record([chunk(tool_calls=call), chunk(finish_reason="tool_calls")]).finish_reason == "tool_calls"


@pytest.mark.parametrize(("chunks", "reason"), [
    ([chunk("x"), chunk(finish_reason="length")], "truncated"),
    ([chunk("x", index=0), chunk("y", index=1), chunk(finish_reason="stop", index=0),
      chunk(finish_reason="content_filter", index=1)], "content_filter"),  # any choice
    ([chunk("x")], "truncated"),  # ended without a finish_reason: broken off
    ([chunk(""), chunk(finish_reason="stop")], "empty"),
    ([chunk("x"), {"error": {"message": "overloaded"}}], "error"),
    ([chunk(refusal="no"), chunk(finish_reason="stop")], "refusal"),
    ([chunk("x"), chunk(finish_reason="stop"), {"choices": [], "usage": {"prompt_tokens": -1}}], "invalid_usage"),
    ([chunk("x"), chunk(finish_reason="stop"), {"choices": [], "usage": {"prompt_tokens": 1}, "cost": "NaN"}],
     "invalid_cost"),
])
def test_stream_refusals(chunks, reason):
    with pytest.raises(Refused) as info:
        record(chunks)
    assert info.value.reason == reason


def test_a_stream_past_max_bytes_is_refused_but_still_passed_on():
    recorder = entries.StreamRecorder(100)
    data = [recorder.add(chunk("x" * 40)) for _ in range(5)]
    assert all(data) and recorder.chunks is None  # every chunk handed on, the recording dropped
    recorder.add(chunk(finish_reason="stop"))
    with pytest.raises(Refused) as info:
        recorder.finish()
    assert info.value.reason == "too_large"


def test_a_chunk_that_is_not_json_refuses_the_stream():
    recorder = entries.StreamRecorder(1 << 20)
    recorder.add(chunk("x"))
    assert recorder.add({"n": float("nan")}) == b""
    recorder.add(chunk(finish_reason="stop"))
    with pytest.raises(Refused) as info:
        recorder.finish()
    assert info.value.reason == "not_serializable"
