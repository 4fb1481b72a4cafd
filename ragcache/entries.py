"""What a cache entry is: the answer, its metadata, and the rules for admitting it.

An entry is a Redis hash with two fields: ``m``, small JSON metadata (also copied into
hit events, so a hit knows what it avoided without a second read), and ``b``, the
answer as JSON, zlib-compressed above the policy's threshold. Never pickle.
"""
from __future__ import annotations

import json
import time
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from .keys import KEY_SCHEMA_VERSION

REFUSED_FINISH_REASONS = {"length": "truncated", "content_filter": "content_filter"}


class Refused(Exception):
    """The answer must not be cached; ``reason`` is a short, bounded label."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(detail or reason)
        self.reason = reason


class CorruptEntry(Exception):
    """Bytes at a ragcache key that ragcache did not write, or cannot read."""


@dataclass(frozen=True)
class CachedResponse:
    """A cached answer. ``response`` has the shape it was stored with (str or dict)."""

    response: Any
    content: str
    model: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cost: Decimal | None
    latency_ms: float | None
    created_at: datetime
    expires_at: datetime
    key: str

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def _as_dict(response: Any) -> Any:
    # OpenAI / pydantic response objects expose model_dump(); plain dicts pass through.
    dump = getattr(response, "model_dump", None)
    if callable(dump) and not isinstance(response, (str, dict)):
        return dump()
    return response


def extract(response: Any) -> tuple[Any, str, str | None, int, int, Decimal | None]:
    """(response as JSON-able value, content, finish_reason, prompt, completion, cost)."""
    if isinstance(response, BaseException):
        raise Refused("error", "exceptions are never cached")
    response = _as_dict(response)
    if isinstance(response, str):
        return response, response, None, 0, 0, None
    if not isinstance(response, dict):
        raise Refused("unsupported", f"cannot cache a {type(response).__name__}; pass a str or a dict")
    if response.get("error"):
        raise Refused("error", "the response carries an error")
    content = response.get("content")
    finish_reason = response.get("finish_reason")
    choices = response.get("choices")
    if content is None and isinstance(choices, list) and choices and isinstance(choices[0], dict):
        message = choices[0].get("message") or {}
        content = message.get("content") if isinstance(message, dict) else None
        finish_reason = choices[0].get("finish_reason", finish_reason)
    if not isinstance(content, str):
        raise Refused("empty", "no text content found (content or choices[0].message.content)")
    usage = response.get("usage") if isinstance(response.get("usage"), dict) else {}
    prompt_tokens = _count(usage.get("prompt_tokens"))
    completion_tokens = _count(usage.get("completion_tokens"))
    cost = None
    if response.get("cost") is not None:
        try:
            cost = Decimal(str(response["cost"]))
        except InvalidOperation:
            cost = None
        if cost is not None and (not cost.is_finite() or cost < 0):
            cost = None
    return response, content, finish_reason, prompt_tokens, completion_tokens, cost


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def admit(response: Any) -> tuple[Any, str, str | None, int, int, Decimal | None]:
    """Extract and apply the admission rules; raises ``Refused`` with the reason."""
    extracted = extract(response)
    content, finish_reason = extracted[1], extracted[2]
    if not content.strip():
        raise Refused("empty", "empty answer")
    if finish_reason in REFUSED_FINISH_REASONS:
        raise Refused(REFUSED_FINISH_REASONS[finish_reason], f"finish_reason={finish_reason}")
    return extracted


def encode(
    response: Any,
    *,
    model: str,
    finish_reason: str | None,
    prompt_tokens: int,
    completion_tokens: int,
    cost: Decimal | None,
    latency_ms: float | None,
    ttl_seconds: int,
    compress_threshold: int,
    max_bytes: int,
) -> tuple[bytes, bytes, bool]:
    """(meta, body, compressed) for the store script; raises ``Refused``."""
    try:
        body = json.dumps(response, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode(
            "utf-8", "surrogatepass"
        )
    except (TypeError, ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
        raise Refused("not_serializable", str(exc)) from None
    compressed = 0
    if compress_threshold and len(body) > compress_threshold:
        body = zlib.compress(body, 6)
        compressed = 1
    if len(body) > max_bytes:
        raise Refused("too_large", f"{len(body)} bytes > max_entry_bytes={max_bytes}")
    now = time.time()
    meta = {
        "v": KEY_SCHEMA_VERSION,
        "model": model,
        "fr": finish_reason,
        "pt": prompt_tokens,
        "ct": completion_tokens,
        "cost": str(cost) if cost is not None else None,
        "lat": round(latency_ms, 3) if latency_ms is not None else None,
        "at": round(now, 3),
        "exp": round(now + ttl_seconds, 3),
        "z": compressed,
        "n": len(body),
    }
    return json.dumps(meta, separators=(",", ":")).encode(), body, bool(compressed)


def parse_meta(meta: bytes | str) -> dict[str, Any]:
    try:
        parsed = json.loads(meta)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise CorruptEntry(f"metadata is not JSON: {exc}") from None
    if not isinstance(parsed, dict) or parsed.get("v") != KEY_SCHEMA_VERSION:
        raise CorruptEntry("metadata of another key schema")
    return parsed


def decode(meta_bytes: bytes, body: bytes, key: str) -> CachedResponse:
    meta = parse_meta(meta_bytes)
    try:
        raw = zlib.decompress(body) if meta.get("z") else body
        response = json.loads(raw.decode("utf-8", "surrogatepass"))
        _, content, finish_reason, pt, ct, _ = extract(response)
        cost = Decimal(meta["cost"]) if meta.get("cost") is not None else None
        return CachedResponse(
            response=response,
            content=content,
            model=str(meta.get("model") or ""),
            finish_reason=finish_reason,
            prompt_tokens=int(meta.get("pt") or pt),
            completion_tokens=int(meta.get("ct") or ct),
            cost=cost,
            latency_ms=float(meta["lat"]) if meta.get("lat") is not None else None,
            created_at=datetime.fromtimestamp(float(meta["at"]), UTC),
            expires_at=datetime.fromtimestamp(float(meta["exp"]), UTC),
            key=key,
        )
    # ArithmeticError, OSError: numbers no clock or int can hold (e.g. "pt": 1e999, "at": 1e20);
    # RecursionError: absurdly deep JSON. Whatever the bytes, the caller gets a miss.
    except (zlib.error, ValueError, UnicodeDecodeError, KeyError, TypeError, ArithmeticError, OSError,
            RecursionError, Refused) as exc:
        raise CorruptEntry(f"unreadable entry: {type(exc).__name__}") from None
