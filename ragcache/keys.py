"""The key recipe: what makes two requests "the same question".

A key covers every input that shapes the answer: all messages (every role, in order),
the model, the request params the policy lets in, and the caller's context version.
They are encoded as canonical JSON (sorted keys, no whitespace, ASCII escapes) with a
schema version and hashed with SHA-256, so no caller text ever reaches Redis or a log.

    <prefix>:v<schema>:<policy>:<generation>:<scope hash or "global">:<digest>
"""
from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .exceptions import InvalidRequestError

KEY_SCHEMA_VERSION = 1

Messages = str | list[Mapping[str, Any]]

_WHITESPACE_RE = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """NFKC, lower case, inner whitespace collapsed, ends stripped."""
    return _WHITESPACE_RE.sub(" ", unicodedata.normalize("NFKC", text).lower()).strip()


def normalize_messages(messages: Messages, *, normalize: bool = False) -> list[dict[str, Any]]:
    """Turn the accepted message shapes into one list of ``{"role", "content"}`` dicts."""
    if isinstance(messages, str):  # the common case, without the per-message checks
        return [{"role": "user", "content": normalize_text(messages) if normalize else messages}]
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError(
            "messages must be a non-empty string or a non-empty list of {'role': ..., 'content': ...} dicts."
        )
    result = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str) or "content" not in message:
            raise InvalidRequestError(
                f"messages[{index}] must be a dict with a string 'role' and a 'content'."
            )
        entry = dict(message)
        if normalize and isinstance(entry["content"], str):
            entry["content"] = normalize_text(entry["content"])
        result.append(entry)
    return result


# One encoder for every key: json.dumps() with options builds a new one per call.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def canonical_json(value: Any) -> bytes:
    """Deterministic JSON: the same logical value always gives the same bytes."""
    try:
        return _CANONICAL.encode(value).encode("ascii")
    except (TypeError, ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
        raise InvalidRequestError(
            f"ragcache can only key JSON-serialisable messages and params (no NaN/Infinity): {exc}"
        ) from None


def select_params(params: Mapping[str, Any] | None, allowed: Iterable[str]) -> dict[str, Any]:
    if params is None:
        return {}
    if not isinstance(params, Mapping):
        raise InvalidRequestError("params must be a dict of request parameters, or None.")
    allowed = set(allowed)
    return {name: value for name, value in params.items() if name in allowed}


def content_digest(
    messages: list[dict[str, Any]], *, model: str, params: dict[str, Any], context_version: Any
) -> str:
    """SHA-256 hex of the canonical request; independent of policy generation and scope."""
    if not isinstance(model, str) or not model:
        raise InvalidRequestError("model must be a non-empty string, e.g. model='gpt-4o-mini'.")
    payload = {
        "v": KEY_SCHEMA_VERSION,
        "messages": messages,
        "model": model,
        "params": params,
        "context_version": context_version,
    }
    return hashlib.sha256(canonical_json(payload)).hexdigest()


def scope_hash(scope_kind: str, scope: Any) -> str:
    """A short, non-reversible id of the caller's scope; "global" when there is none."""
    if scope is None:
        return "global"
    if not isinstance(scope, (str, int)) or isinstance(scope, bool) or scope == "":
        raise InvalidRequestError("scope must be a non-empty string or an int (a user or tenant id).")
    try:
        text = f"{scope_kind}\x00{scope}"
    except ValueError:  # an int too long to print (over 4300 digits)
        raise InvalidRequestError("scope is not a usable id: an int with thousands of digits.") from None
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:24]


def rollout_bucket(digest: str) -> int:
    """0..99, fixed per question: the same question always gets the same rollout decision."""
    return int(digest[:8], 16) % 100


@dataclass(frozen=True)
class CacheKey:
    prefix: str
    policy: str
    generation: int
    scope: str
    digest: str

    @property
    def redis_key(self) -> str:
        return f"{self.prefix}:v{KEY_SCHEMA_VERSION}:{self.policy}:{self.generation}:{self.scope}:{self.digest}"

    @property
    def lock_key(self) -> str:
        return f"{self.prefix}:lock:{self.policy}:{self.generation}:{self.scope}:{self.digest}"

    @property
    def short(self) -> str:
        """What logs and usage records show: enough to correlate, nothing to reverse."""
        return self.digest[:16]
