"""What a cache entry is: the answer, its metadata, and the rules for admitting it.

An entry is a Redis hash: ``m``, small JSON metadata (copied into hit events, so a hit
knows what it avoided without a second read); ``b``, the answer as JSON (a response, or
the list of chunks of a recorded stream), zlib-compressed above the policy's threshold;
and ``s``, the stamps of its source documents, when it has any. Never pickle.

Everything read back from Redis is validated here before use (``decode``,
``parse_meta``): a value ragcache did not write, or numbers no answer can have, raise
``CorruptEntry`` and the caller treats the entry as a miss.
"""
from __future__ import annotations

import math
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson

from .keys import KEY_SCHEMA_VERSION

# finish_reason / stop_reason values that mean the answer is not a whole, servable one.
REFUSED_FINISH_REASONS = {
    "length": "truncated",  # OpenAI
    "max_tokens": "truncated",  # Anthropic stop_reason
    "model_context_window_exceeded": "truncated",  # Anthropic
    "content_filter": "content_filter",  # OpenAI
    "refusal": "refusal",  # Anthropic stop_reason
    "error": "error",
}
MAX_TOKENS = 2**31 - 1  # per field: what UsageRecord's columns hold
MAX_COST = Decimal(1_000_000)  # per answer, in the price's currency
MAX_LATENCY_MS = 86_400_000.0
# A decompressed body is never allowed to grow past this many bytes (a zip bomb planted in Redis).
MAX_BODY_BYTES = 256 * 1024 * 1024
META_PREFIX = f'{{"v":{KEY_SCHEMA_VERSION},'.encode()

KIND_RESPONSE = "r"
KIND_STREAM = "s"


class Refused(Exception):
    """The answer must not be cached; ``reason`` is a short, bounded label."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(detail or reason)
        self.reason = reason


class CorruptEntry(Exception):
    """Bytes at a ragcache key that ragcache did not write, or cannot read."""


@dataclass(slots=True)
class Usage:
    """Tokens of one answer. ``prompt_tokens`` counts uncached input tokens only;
    ``cached_prompt_tokens`` the input tokens the provider served from its own prompt
    cache (billed at a discount). ``known`` is False when the provider sent no usage."""

    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    completion_tokens: int = 0
    known: bool = False

    @property
    def total(self) -> int:
        return self.prompt_tokens + self.cached_prompt_tokens + self.completion_tokens


@dataclass(slots=True)
class Answer:
    """What admission took from a response: its JSON form, text, finish reason, usage, cost."""

    body: Any
    content: str | None
    finish_reason: str | None
    usage: Usage
    cost: Decimal | None


@dataclass(slots=True)
class CachedResponse:
    """A cached answer. ``response`` has the shape it was stored with: a ``str``, a dict,
    or (``kind == "stream"``) the list of recorded chunks. ``cost`` is in the currency of
    the stored answer (or of its ``ModelPrice``); ``latency_ms`` is the original call's."""

    response: Any
    content: str | None
    model: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cost: Decimal | None
    latency_ms: float | None
    created: float  # Unix time (seconds) when it was stored
    expires: float  # Unix time (seconds) when it expires
    key: str
    cached_prompt_tokens: int = 0
    usage_known: bool = True
    kind: str = "response"

    @property
    def tokens(self) -> int:
        """Every token the original call was billed for (input, cached input, output)."""
        return self.prompt_tokens + self.cached_prompt_tokens + self.completion_tokens

    @property
    def created_at(self) -> datetime:
        return datetime.fromtimestamp(self.created, UTC)

    @property
    def expires_at(self) -> datetime:
        return datetime.fromtimestamp(self.expires, UTC)

    @property
    def age_seconds(self) -> float:
        """How long ago it was stored (the HTTP ``Age`` of a hit)."""
        return max(0.0, time.time() - self.created)


# --- reading responses -----------------------------------------------------------------

def _as_json(value: Any) -> Any:
    # OpenAI / pydantic response objects expose model_dump(); plain values pass through.
    dump = getattr(value, "model_dump", None)
    if callable(dump) and not isinstance(value, (str, dict, list)):
        try:
            return dump(mode="json", exclude_unset=True)
        except TypeError:  # a model_dump() of another shape
            return dump()
    if isinstance(value, Mapping) and not isinstance(value, dict):
        return dict(value)
    return value


def _finite(value: Any) -> bool:
    """No NaN or infinity anywhere in a JSON value (orjson would write them as null)."""
    if type(value) is float:
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return True


def _token_count(usage: dict, name: str) -> int | None:
    value = usage.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_TOKENS:
        raise Refused("invalid_usage", f"usage.{name} must be a whole number from 0 to {MAX_TOKENS}, not {value!r}")
    return value


def usage_from(usage: Any) -> Usage:
    """Token counts from a provider's ``usage`` block, under the names providers use:
    OpenAI (``prompt_tokens`` including ``prompt_tokens_details.cached_tokens``,
    ``completion_tokens``), Anthropic (``input_tokens`` excluding ``cache_read_input_tokens``
    and ``cache_creation_input_tokens``, ``output_tokens``) and DeepSeek
    (``prompt_cache_hit_tokens``). Raises ``Refused("invalid_usage")`` for negative,
    fractional, absurd or contradictory counts."""
    if not isinstance(usage, dict):
        return Usage()
    prompt = _token_count(usage, "prompt_tokens")
    completion = _token_count(usage, "completion_tokens")
    details = usage.get("prompt_tokens_details")
    cached = _token_count(details, "cached_tokens") if isinstance(details, dict) else None
    if cached is None:
        cached = _token_count(usage, "prompt_cache_hit_tokens")
    if prompt is not None:  # OpenAI-style: prompt_tokens includes the cached ones
        cached = cached or 0
        if cached > prompt:
            raise Refused("invalid_usage", f"{cached} cached input tokens exceed prompt_tokens={prompt}")
        return Usage(prompt - cached, cached, completion or 0, True)
    anthropic_input = _token_count(usage, "input_tokens")
    if anthropic_input is None and completion is None and _token_count(usage, "output_tokens") is None:
        return Usage()
    read = _token_count(usage, "cache_read_input_tokens") or 0
    created = _token_count(usage, "cache_creation_input_tokens") or 0
    output = _token_count(usage, "output_tokens")
    return Usage((anthropic_input or 0) + created, read, output if output is not None else (completion or 0), True)


def cost_from(value: Any) -> Decimal | None:
    """A response's own ``cost`` (number or numeric string, in the price currency)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str, Decimal)):
        raise Refused("invalid_cost", f"cost must be a number, not {type(value).__name__}")
    try:
        cost = Decimal(str(value))
    except InvalidOperation:
        raise Refused("invalid_cost", f"cost must be a number, not {value!r}") from None
    if not cost.is_finite() or not 0 <= cost <= MAX_COST:
        raise Refused("invalid_cost", f"cost must be a finite amount from 0 to {MAX_COST}, not {value!r}")
    return cost


def _message_answered(message: Any) -> bool:
    """A choice's message carries an answer: text, tool calls, a function call or audio."""
    if not isinstance(message, dict):
        return False
    content = message.get("content")
    if isinstance(content, str) and content.strip():
        return True
    if isinstance(content, list) and content:  # content parts
        return True
    return bool(message.get("tool_calls") or message.get("function_call") or message.get("audio"))


def _check_finish(reason: Any) -> None:
    if isinstance(reason, str) and reason in REFUSED_FINISH_REASONS:
        raise Refused(REFUSED_FINISH_REASONS[reason], f"finish_reason={reason}")


def extract(response: Any) -> Answer:
    """Read a response (``str``, an OpenAI-style or Anthropic-style dict, or an object
    with ``model_dump()``) and apply the admission rules. Raises ``Refused`` with the
    reason: exceptions and error bodies, empty answers, any choice truncated or filtered
    (``finish_reason`` ``length`` / ``content_filter``, ``stop_reason`` ``max_tokens``),
    refusals, and usage or cost figures no answer can have."""
    if isinstance(response, BaseException):
        raise Refused("error", "exceptions are never cached")
    response = _as_json(response)
    if isinstance(response, str):
        if not response.strip():
            raise Refused("empty", "empty answer")
        return Answer(response, response, None, Usage(), None)
    if not isinstance(response, dict):
        raise Refused("unsupported", f"cannot cache a {type(response).__name__}; pass a str or a dict")
    if response.get("error"):
        raise Refused("error", "the response carries an error")
    content, finish_reason = None, response.get("finish_reason", response.get("stop_reason"))
    _check_finish(finish_reason)
    choices = response.get("choices")
    if isinstance(choices, list) and choices:
        for choice in choices:
            if not isinstance(choice, dict):
                raise Refused("unsupported", "choices must be a list of dicts")
            _check_finish(choice.get("finish_reason"))
            message = choice.get("message")
            if isinstance(message, dict) and message.get("refusal"):
                raise Refused("refusal", "the model refused")
            if not _message_answered(message) and not (isinstance(choice.get("text"), str) and choice["text"].strip()):
                raise Refused("empty", "a choice has no content, tool call or text")
        first = choices[0]
        message = first.get("message") if isinstance(first.get("message"), dict) else {}
        content = message.get("content") if isinstance(message.get("content"), str) else first.get("text")
        finish_reason = first.get("finish_reason", finish_reason)
    elif isinstance(response.get("content"), str):
        content = response["content"]
        if not content.strip():
            raise Refused("empty", "empty answer")
    elif isinstance(response.get("content"), list):  # Anthropic: content blocks
        texts = [b.get("text") for b in response["content"] if isinstance(b, dict) and b.get("type") == "text"]
        answered = [b for b in response["content"] if isinstance(b, dict) and b.get("type") in ("text", "tool_use")]
        if not answered or not any((t or "").strip() for t in texts) and not any(
                b.get("type") == "tool_use" for b in answered):
            raise Refused("empty", "no text or tool use in content")
        content = "".join(t for t in texts if isinstance(t, str)) or None
    else:
        raise Refused("empty", "no answer found (content, choices[].message or choices[].text)")
    return Answer(response, content, finish_reason, usage_from(response.get("usage")), cost_from(response.get("cost")))


admit = extract  # the 0.1 name


# --- encoding --------------------------------------------------------------------------

def encode(
    body: Any,
    *,
    kind: str,
    model: str,
    finish_reason: str | None,
    usage: Usage,
    cost: Decimal | None,
    latency_ms: float | None,
    ttl_seconds: int,
    compress_threshold: int,
    max_bytes: int,
) -> tuple[bytes, bytes]:
    """(meta, body) for the store script; raises ``Refused("too_large")`` past ``max_bytes``
    (measured after compression) and ``Refused("not_serializable")``."""
    try:
        # Only JSON's own types: orjson would write a datetime or a dataclass as a string or
        # an object, and a hit would hand back another shape than the call returned.
        data = orjson.dumps(body, option=orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS)
    except (TypeError, orjson.JSONEncodeError) as exc:
        raise Refused("not_serializable", str(exc)) from None
    if b"null" in data and not _finite(body):
        raise Refused("not_serializable", "NaN or Infinity is not JSON")
    compressed = 0
    if compress_threshold and len(data) > compress_threshold:
        data = zlib.compress(data, 6)
        compressed = 1
    if len(data) > max_bytes:
        raise Refused("too_large", f"{len(data)} bytes > max_entry_bytes={max_bytes}")
    now = time.time()
    meta = make_meta(kind=kind, model=model, finish_reason=finish_reason, usage=usage, cost=cost,
                     latency_ms=latency_ms, created=now, expires=now + ttl_seconds, compressed=bool(compressed),
                     size=len(data))
    return meta, data


def make_meta(*, kind: str, model: str, finish_reason: str | None, usage: Usage, cost: Decimal | None,
              latency_ms: float | None, created: float, expires: float, compressed: bool = False,
              size: int = 0) -> bytes:
    """An entry's metadata JSON (``v`` first: the lookup script checks the prefix)."""
    return orjson.dumps({
        "v": KEY_SCHEMA_VERSION,
        "k": kind,
        "model": model,
        "fr": finish_reason if isinstance(finish_reason, str) else None,
        "pt": usage.prompt_tokens,
        "cpt": usage.cached_prompt_tokens,
        "ct": usage.completion_tokens,
        "uk": int(usage.known),
        "cost": str(cost) if cost is not None else None,
        "lat": round(latency_ms, 3) if latency_ms is not None and math.isfinite(latency_ms) else None,
        "at": round(created, 3),
        "exp": round(expires, 3),
        "z": int(compressed),
        "n": size,
    })


@dataclass(slots=True)
class Meta:
    """An entry's validated metadata (also the ``e`` field of hit and store events)."""

    kind: str
    model: str
    finish_reason: str | None
    usage: Usage
    cost: Decimal | None
    latency_ms: float | None
    created_at: float
    expires_at: float
    compressed: bool
    size: int


def parse_meta(raw: bytes | str) -> Meta:
    """Validate an entry's metadata; raises ``CorruptEntry`` for anything ragcache would not write."""
    try:
        meta = orjson.loads(raw)
    except (orjson.JSONDecodeError, TypeError) as exc:
        raise CorruptEntry(f"metadata is not JSON: {exc}") from None
    if not isinstance(meta, dict) or meta.get("v") != KEY_SCHEMA_VERSION:
        raise CorruptEntry("metadata of another key schema")
    kind = meta.get("k")
    model = meta.get("model")
    finish_reason = meta.get("fr")
    if kind not in (KIND_RESPONSE, KIND_STREAM) or not isinstance(model, str) or len(model) > 256:
        raise CorruptEntry("metadata kind or model is not valid")
    if finish_reason is not None and (not isinstance(finish_reason, str) or len(finish_reason) > 64):
        raise CorruptEntry("metadata finish reason is not valid")
    pt, cpt, ct, size = meta.get("pt", 0), meta.get("cpt", 0), meta.get("ct", 0), meta.get("n")
    # type() is int: no bool, no float (orjson gives exactly int for integers).
    if not (type(pt) is int and type(cpt) is int and type(ct) is int and type(size) is int
            and 0 <= pt <= MAX_TOKENS and 0 <= cpt <= MAX_TOKENS and 0 <= ct <= MAX_TOKENS
            and 0 <= size <= MAX_BODY_BYTES):
        raise CorruptEntry("metadata counts are out of range")
    cost = meta.get("cost")
    if cost is not None:
        if not isinstance(cost, str):
            raise CorruptEntry("metadata cost is not a decimal string")
        try:
            cost = cost_from(cost)
        except Refused:
            raise CorruptEntry("metadata cost is out of range") from None
    latency, created, expires = meta.get("lat"), meta.get("at"), meta.get("exp")
    if not (_number(created, 1.0, 1e11) and _number(expires, 1.0, 1e11)
            and (latency is None or _number(latency, 0.0, MAX_LATENCY_MS))):
        raise CorruptEntry("metadata times are out of range")
    return Meta(kind, model, finish_reason, Usage(pt, cpt, ct, meta.get("uk", 1) == 1), cost,
                None if latency is None else float(latency), float(created), float(expires), meta.get("z") == 1, size)


def _number(value: Any, low: float, high: float) -> bool:
    return (type(value) is float or type(value) is int) and low <= value <= high


def _load_body(meta: Meta, body: bytes) -> Any:
    if meta.compressed:
        inflater = zlib.decompressobj()
        body = inflater.decompress(body, MAX_BODY_BYTES)
        if inflater.unconsumed_tail:
            raise CorruptEntry("compressed body larger than any entry")
    return orjson.loads(body)


def _stored_content(value: Any) -> str | None:
    """The text of a stored response, checking its shape (admission ran when it was stored)."""
    if type(value) is str:
        if value:
            return value
    elif type(value) is dict:
        choices = value.get("choices")
        if type(choices) is list and choices and type(choices[0]) is dict:
            message = choices[0].get("message")
            content = message.get("content") if type(message) is dict else choices[0].get("text")
            return content if isinstance(content, str) else None
        content = value.get("content")
        if isinstance(content, str) and content:
            return content
        if isinstance(content, list) and content:  # Anthropic content blocks
            return "".join(b["text"] for b in content if type(b) is dict and isinstance(b.get("text"), str)) or None
    raise CorruptEntry("the stored body is not a response")


def decode(meta_bytes: bytes, body: bytes, key: str) -> CachedResponse:
    """A ``CachedResponse`` from an entry's fields; raises ``CorruptEntry``."""
    meta = parse_meta(meta_bytes)
    try:
        value = _load_body(meta, body)
        if meta.kind == KIND_STREAM:
            if not isinstance(value, list) or not value:
                raise CorruptEntry("a stream entry holds no chunks")
            content = None
        else:
            content = _stored_content(value)
        return CachedResponse(
            response=value,
            content=content,
            model=meta.model,
            finish_reason=meta.finish_reason,
            prompt_tokens=meta.usage.prompt_tokens,
            completion_tokens=meta.usage.completion_tokens,
            cost=meta.cost,
            latency_ms=meta.latency_ms,
            created=meta.created_at,
            expires=meta.expires_at,
            key=key,
            cached_prompt_tokens=meta.usage.cached_prompt_tokens,
            usage_known=meta.usage.known,
            kind="stream" if meta.kind == KIND_STREAM else "response",
        )
    except CorruptEntry:
        raise
    # zlib.error, JSON errors, Refused (a stored answer that no longer passes admission).
    except (zlib.error, orjson.JSONDecodeError, ValueError, TypeError, Refused) as exc:
        raise CorruptEntry(f"unreadable entry: {type(exc).__name__}") from None


# --- streams ---------------------------------------------------------------------------

class StreamRecorder:
    """Records a chunk stream as it passes (sans-I/O: no Redis, no clock).

    ``add(chunk)`` returns the chunk's JSON (what followers receive) and keeps it while
    the recording stays under ``max_bytes``; past it the recording is dropped, so a long
    stream is never buffered without bound. ``finish()`` applies the admission rules to
    the whole stream: OpenAI ``chat.completion.chunk`` objects (every choice's
    ``finish_reason``, a usage chunk, ``error`` objects), or plain text chunks.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.chunks: list[Any] | None = []
        self.size = 0
        self.finish_reasons: dict[int, str] = {}
        self.usage: Usage = Usage()
        self.cost: Decimal | None = None
        self.error = False
        self.text = False
        self.answered = False
        self.refused: Refused | None = None

    def add(self, chunk: Any) -> bytes:
        value = _as_json(chunk)
        try:
            data = orjson.dumps(value)
            if b"null" in data and not _finite(value):
                raise TypeError("NaN")
        except (TypeError, orjson.JSONEncodeError):
            self.refused = Refused("not_serializable", "a chunk is not JSON")
            self.chunks = None
            return b""
        self._inspect(value)
        if self.chunks is not None:
            self.size += len(data)
            if self.size > self.max_bytes:
                self.chunks = None  # too large: stop recording, keep passing chunks through
                self.refused = self.refused or Refused("too_large", f"stream over max_entry_bytes={self.max_bytes}")
            else:
                self.chunks.append(value)
        return data

    def _inspect(self, value: Any) -> None:
        if isinstance(value, str):
            self.text = True
            self.answered = self.answered or bool(value.strip())
            return
        if not isinstance(value, dict):
            return
        if value.get("error"):
            self.error = True
        if value.get("usage"):
            try:
                self.usage = usage_from(value["usage"])
                if value.get("cost") is not None:
                    self.cost = cost_from(value["cost"])
            except Refused as refusal:
                self.refused = refusal
        for choice in value.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            if isinstance(delta, dict) and any(
                delta.get(name) for name in ("content", "tool_calls", "function_call", "reasoning_content",
                                             "reasoning", "audio")):
                self.answered = True
            if isinstance(delta, dict) and delta.get("refusal"):
                self.refused = self.refused or Refused("refusal", "the model refused")
            reason = choice.get("finish_reason")
            if isinstance(reason, str):
                self.finish_reasons[choice.get("index", 0) if isinstance(choice.get("index"), int) else 0] = reason

    @property
    def finish_reason(self) -> str | None:
        return self.finish_reasons.get(0) or next(iter(self.finish_reasons.values()), None)

    def finish(self) -> Answer:
        """The recording as an ``Answer`` (body: the list of chunks); raises ``Refused``."""
        if self.refused is not None:
            raise self.refused
        if self.error:
            raise Refused("error", "the stream carried an error")
        for reason in self.finish_reasons.values():
            _check_finish(reason)
        if not self.chunks or not self.answered:
            raise Refused("empty", "the stream carried no answer")
        if not self.text and not self.finish_reasons:
            raise Refused("truncated", "the stream ended without a finish_reason")
        return Answer(self.chunks, None, self.finish_reason, self.usage, self.cost)
