"""The key recipe (what makes two requests "the same question") and the key layout.

A request's digest covers every input that shapes the answer: all messages (every role,
in order, every field), the model, every request parameter except those the policy marks
as not shaping the answer, the caller's ``context_version``, the kind of call (a whole
response or a stream) and the key schema version. They are encoded as canonical JSON
(sorted keys, no whitespace, UTF-8, Unicode NFC, integral floats written as integers) and
hashed with SHA-256, so no caller text ever reaches Redis or a log.

Layout: every key a Redis script touches carries the hash tag of one of ``SHARDS``
virtual shards, picked from the digest. Each shard has its own usage stream and its own
copy of the shared state the scripts read (the policy version, the source stamps), so
every script touches one hash slot: standalone Redis and Redis Cluster use one layout.

    <prefix>:<schema>:{<tag>}:e:<policy>:<generation>:<scope>:<digest>   entry (hash)
    <prefix>:<schema>:{<tag>}:l:<policy>:<generation>:<scope>:<digest>   single-flight lock
    <prefix>:<schema>:{<tag>}:f:<token>                                  a leader's live flight
    <prefix>:<schema>:{<tag>}:u                                          usage stream
    <prefix>:<schema>:{<tag>}:c                                          policy version copy
    <prefix>:<schema>:{<tag>}:s:<source hash>                            source stamp
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import unicodedata
from collections.abc import Iterable, Mapping
from functools import cache
from typing import Any

import orjson
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from .exceptions import InvalidRequestError

KEY_SCHEMA_VERSION = 2
SHARDS = 256

Messages = str | list[Mapping[str, Any]]


# --- canonical request -----------------------------------------------------------------

_SPACES_RE = re.compile(r"[ \t\f\v]+")


def normalize_text(text: str) -> str:
    """``normalize_query``: NFKC and lower case; inside each line, runs of spaces and
    tabs become one space and trailing ones go. Line breaks and each line's indentation
    are kept, so texts whose lines or indentation differ (code, poems, tables) never
    share an entry. Leading and trailing blank lines are dropped."""
    lines = unicodedata.normalize("NFKC", text).lower().splitlines()
    kept = []
    for line in lines:
        body = line.lstrip(" \t")
        indent = line[: len(line) - len(body)]
        kept.append(indent + _SPACES_RE.sub(" ", body).rstrip())
    return "\n".join(kept).strip("\n")


def _canonical(value: Any, normalize: bool) -> Any:
    """JSON values as the key sees them: strings in NFC (and normalised when asked),
    floats that are whole numbers as ints (``1.0`` and ``1`` are one JSON number), no NaN
    or infinity. Returns ``value`` itself when nothing changes."""
    if type(value) is str:
        if normalize:
            return normalize_text(value)
        return value if value.isascii() else unicodedata.normalize("NFC", value)
    if isinstance(value, bool) or value is None or isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidRequestError("ragcache cannot key NaN or Infinity: use finite numbers in messages and params.")
        return int(value) if value.is_integer() and abs(value) < 2**63 else value
    if isinstance(value, Mapping):
        return _distinct({_key(k): _canonical(v, normalize) for k, v in value.items()}, len(value))
    if isinstance(value, (list, tuple)):
        return [_canonical(item, normalize) for item in value]
    if isinstance(value, str):  # a str subclass
        return _canonical(str(value), normalize)
    dump = getattr(value, "model_dump", None)  # pydantic objects (e.g. OpenAI SDK params)
    if callable(dump):
        return _canonical(dump(mode="json", exclude_unset=True), normalize)
    raise InvalidRequestError(
        f"ragcache can only key JSON values (str, number, bool, None, list, dict), not {type(value).__name__}."
    )


TOO_DEEP = "ragcache can only key JSON values nested at most a few hundred levels deep (and not circular)."


def _distinct(result: dict[str, Any], count: int) -> dict[str, Any]:
    """``result``, unless two of the ``count`` keys it was made from are equal in NFC: the
    key must not keep one of them and drop the other (which one would depend on order)."""
    if len(result) != count:
        raise InvalidRequestError("ragcache cannot key a dict with two keys that are equal in Unicode (NFC), "
                                  "e.g. 'e\\u0301' and '\\u00e9'.")
    return result


def _key(name: Any) -> str:
    if not isinstance(name, str):
        raise InvalidRequestError(f"ragcache can only key dicts with string keys, not {name!r}.")
    return name if name.isascii() else unicodedata.normalize("NFC", name)


def normalize_messages(messages: Messages, *, normalize: bool = False) -> list[dict[str, Any]]:
    """The accepted message shapes as one canonical list of dicts (see ``_canonical``).

    Raises ``InvalidRequestError`` for anything else: ``messages`` must be a non-empty
    string (one user message) or a non-empty list of dicts with a string ``role``.
    """
    if isinstance(messages, str):
        if not messages:
            raise InvalidRequestError("messages must be a non-empty string or a non-empty list of message dicts.")
        return [{"role": "user", "content": _canonical(messages, normalize)}]
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InvalidRequestError(
            "messages must be a non-empty string or a non-empty list of {'role': ..., 'content': ...} dicts."
        )
    result = []
    for index, message in enumerate(messages):
        if hasattr(message, "model_dump") and not isinstance(message, Mapping):
            message = message.model_dump(mode="json", exclude_unset=True)
        # 'content' may be left out only beside tool or function calls (OpenAI's assistant turns).
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str) or (
                "content" not in message and not message.get("tool_calls") and not message.get("function_call")):
            raise InvalidRequestError(f"messages[{index}] must be a dict with a string 'role' and a 'content'.")
        try:
            entry = {_key(k): _canonical(v, False) for k, v in message.items() if k != "content"}
            if "content" in message:  # optional: e.g. an assistant message with only tool_calls
                entry["content"] = _canonical_content(message["content"], normalize)
        except RecursionError:  # nested absurdly deep, or circular
            raise InvalidRequestError(TOO_DEEP) from None
        _distinct(entry, len(message))
        result.append(entry)
    return result


def _canonical_content(content: Any, normalize: bool) -> Any:
    """A message's content; normalisation touches only its text (a string, or the
    ``text`` of content parts), never URLs, ids or other fields."""
    if not normalize or isinstance(content, str):
        return _canonical(content, normalize)
    if isinstance(content, (list, tuple)):
        return [
            {**_canonical(part, False), "text": _canonical(part["text"], True)}
            if isinstance(part, Mapping) and isinstance(part.get("text"), str) else _canonical(part, False)
            for part in content
        ]
    return _canonical(content, False)


def key_params(params: Mapping[str, Any] | None, ignored: Iterable[str]) -> dict[str, Any]:
    """Every request parameter except the ``ignored`` ones (transport and bookkeeping)."""
    if params is None:
        return {}
    if not isinstance(params, Mapping):
        raise InvalidRequestError("params must be a dict of request parameters, or None.")
    try:
        result = {_key(name): _canonical(value, False) for name, value in params.items() if name not in ignored}
    except RecursionError:  # nested absurdly deep, or circular
        raise InvalidRequestError(TOO_DEEP) from None
    if len(result) != len(params):  # some were ignored, or two names were equal in NFC
        _distinct(result, sum(1 for name in params if name not in ignored))
    return result


def canonical_json(value: Any) -> bytes:
    """Deterministic JSON: the same logical value always gives the same bytes."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except (TypeError, orjson.JSONEncodeError) as exc:  # e.g. an int beyond 64 bits, or nesting past 254
        if "surrogates" in str(exc):
            return _escaped_json(value)
        raise InvalidRequestError(f"ragcache can only key plain JSON values: {exc}") from None


def _escaped_json(value: Any) -> bytes:
    """A value holding a lone surrogate (JSON allows one as an escape, ``"\\ud800"``; it has
    no UTF-8 form): written with ASCII escapes. orjson never writes a surrogate escape, so
    no other value's canonical JSON can equal this one."""
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                          allow_nan=False).encode("ascii")
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidRequestError(f"ragcache can only key plain JSON values: {exc}") from None


def content_digest(
    messages: list[dict[str, Any]], *, model: str, params: dict[str, Any], context_version: Any, kind: str = "call"
) -> str:
    """SHA-256 hex of the canonical request (independent of policy, generation and scope).

    ``kind`` is ``"call"`` (a whole response) or ``"stream"`` (a recorded chunk stream):
    the two are stored in different shapes, so they never share an entry.
    """
    if not isinstance(model, str) or not model:
        raise InvalidRequestError("model must be a non-empty string, e.g. model='gpt-4o-mini'.")
    try:
        context = _canonical(context_version, False)
    except RecursionError:  # nested absurdly deep, or circular
        raise InvalidRequestError(TOO_DEEP) from None
    payload = {
        "v": KEY_SCHEMA_VERSION,
        "kind": kind,
        "messages": messages,
        "model": model,
        "params": params,
        "context_version": context,
    }
    return hashlib.sha256(canonical_json(payload)).hexdigest()


def scope_hash(scope_kind: str, scope: Any) -> str:
    """A short, non-reversible id of the caller's scope; ``"global"`` when there is none."""
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


def source_hash(source: str) -> str:
    """The id of a source document in keys and entries (16 hex digits of SHA-256)."""
    return hashlib.sha256(source.encode("utf-8", "surrogatepass")).hexdigest()[:16]


# --- shards ----------------------------------------------------------------------------

def shard_of(digest: str) -> int:
    """The virtual shard of a digest (independent of the rollout bucket's digits)."""
    return int(digest[8:16], 16) % SHARDS


@cache
def shard_tags() -> tuple[str, ...]:
    """One hash tag per virtual shard, chosen so that shard ``i``'s slot lies in the
    ``i``-th of ``SHARDS`` equal slot ranges. Redis Cluster assigns masters contiguous
    slot ranges, so the shards (and with them keys and usage events) spread evenly over
    however many masters there are. Deterministic: every process finds the same tags."""
    width = REDIS_CLUSTER_HASH_SLOTS // SHARDS
    tags = []
    for shard in range(SHARDS):
        attempt = 0
        while True:
            tag = f"rc{shard}.{attempt}"
            if key_slot(tag.encode()) // width == shard:
                tags.append(tag)
                break
            attempt += 1
    return tuple(tags)


class Layout:
    """Key names under one prefix. Built once per prefix and cached (see ``layout()``)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.root = f"{prefix}:{KEY_SCHEMA_VERSION}"
        self.bases = tuple(f"{self.root}:{{{tag}}}" for tag in shard_tags())
        self.streams = tuple(f"{base}:u" for base in self.bases)
        self.versions = tuple(f"{base}:c" for base in self.bases)
        self.stamp_bases = tuple(f"{base}:s:" for base in self.bases)
        self.aggregation_lock = f"{self.root}:aggregation:lock"
        self.aggregation_last = f"{self.root}:aggregation:last"

    def entry_pattern(self, policy: str | None = None) -> str:
        """SCAN pattern of every entry (of one policy): for maintenance, never the hot path."""
        return f"{self.root}:{{*}}:e:{policy or '*'}:*"

    def key_pattern(self) -> str:
        return f"{self.root}:*"


@cache
def layout(prefix: str) -> Layout:
    return Layout(prefix)


class CacheKey:
    """The keys of one request under one policy state. ``short`` is what logs, usage
    records and response headers show: enough to correlate, nothing to reverse."""

    __slots__ = ("policy", "generation", "scope", "digest", "shard", "base", "entry", "lock", "short")

    def __init__(self, layout: Layout, policy: str, generation: int, scope: str, digest: str) -> None:
        self.policy = policy
        self.generation = generation
        self.scope = scope
        self.digest = digest
        self.shard = shard_of(digest)
        self.base = layout.bases[self.shard]
        tail = f"{policy}:{generation}:{scope}:{digest}"
        self.entry = f"{self.base}:e:{tail}"
        self.lock = f"{self.base}:l:{tail}"
        self.short = digest[:16]

    @property
    def redis_key(self) -> str:  # the 0.1 name
        return self.entry

    def flight(self, token: str) -> str:
        return f"{self.base}:f:{token}"
