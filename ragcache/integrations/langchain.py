"""LangChain's LLM cache on ragcache: ``set_llm_cache(RagcacheCache())``.

    from langchain_core.globals import set_llm_cache
    from ragcache.integrations.langchain import RagcacheCache

    set_llm_cache(RagcacheCache())  # policy "default"; or per model: ChatOpenAI(cache=RagcacheCache(...))

Needs langchain-core (``pip install "ragcache[langchain]"``) and a configured Django
project, like the rest of ragcache.

Keys. LangChain gives a cache ``(prompt, llm_string)``: the prompt (for a chat model, its
messages serialised by LangChain) and the model's configuration as a string (class,
model name, temperature, stop words, bound tools, ...). Both enter ragcache's key:
``messages`` is the prompt, ``params`` is ``{"llm_string": llm_string}`` and ``model`` is
the model name read from ``llm_string`` (``"langchain"`` when it names none; the name
also prices, through ``ModelPrice``, the tokens a hit avoids). So two configurations
never share an answer, and ragcache's scopes, policies and admission rules apply as for
any other call.

Entries. The generations are stored as an OpenAI-shaped dict: ``choices`` (one per
generation: its text, tool calls and finish reason, what ragcache's admission rules
read, so a tool-call-only answer is cached and a truncated one is not), ``usage`` (the
tokens the call used) and ``langchain`` (the generations as LangChain's ``dumps`` wrote
them). They are read back with LangChain's ``loads``, restricted to ``ALLOWED_OBJECTS``
(generation and AI message classes), secrets never read from the environment. An entry
that does not read back is a miss. Never pickle.

Tokens. A hit counts the original call's tokens once, as avoided: they are stored in the
entry's ``usage`` and ragcache's usage records count them on every hit. What a hit
returns to LangChain reports zero tokens (``usage_metadata`` zeroed, the provider's raw
``token_usage`` / ``usage`` removed), so LangChain callbacks (``UsageMetadataCallbackHandler``,
``get_usage_metadata_callback``, tracers) do not count them as spent a second time; the
original counts are in ``response_metadata["ragcache"]["usage_avoided"]``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from asgiref.sync import sync_to_async

try:
    from langchain_core.caches import BaseCache
    from langchain_core.load import dumps, loads
    from langchain_core.messages import AIMessage, AIMessageChunk
    from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, Generation, GenerationChunk
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        'ragcache.integrations.langchain needs langchain-core: pip install "ragcache[langchain]"') from exc

from ..entries import MAX_LATENCY_MS
from ..exceptions import InvalidRequestError
from ..keys import scope_hash
from ..services import cache_service

__all__ = ["ALLOWED_OBJECTS", "RagcacheCache", "model_from_llm_string"]

logger = logging.getLogger("ragcache.integrations.langchain")

# The only classes an entry may revive: what BaseChatModel and BaseLLM hand a cache.
ALLOWED_OBJECTS = (Generation, GenerationChunk, ChatGeneration, ChatGenerationChunk, AIMessage, AIMessageChunk)
DEFAULT_MODEL = "langchain"
OBJECT = "langchain.generations"  # the stored dict's "object"

_USAGE_KEYS = frozenset({"token_usage", "usage", "usage_metadata"})
_ZERO_USAGE = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}
_MODEL_FIELDS = ("model", "model_name", "model_id")
# ('model', 'gpt-4o-mini') in the repr of sorted invocation params.
_PARAM_RE = re.compile(r"\('(model|model_name|model_id)', '([^'\\]{1,128})'\)")
_MODEL_NAME_RE = re.compile(r"[\x21-\x7e][\x20-\x7e]{0,127}")  # printable ASCII, at most 128
_MAX_PENDING = 1024  # misses whose call time is remembered, per cache


# --- keys ----------------------------------------------------------------------------------

@lru_cache(maxsize=256)
def model_from_llm_string(llm_string: str) -> str:
    """The model name an ``llm_string`` names, or ``"langchain"``.

    A serialisable model's ``llm_string`` is its JSON serialisation, ``---``, then the
    call's parameters; another model's is the repr of its sorted invocation parameters.
    Call parameters win over the model's own fields (``invoke(..., model=...)``). Names
    that are not printable ASCII of at most 128 characters are not used."""
    head: Any = None
    params = llm_string
    try:
        head, end = json.JSONDecoder().raw_decode(llm_string)
        params = llm_string[end:]
    except ValueError:
        pass
    found = {m.group(1): m.group(2) for m in _PARAM_RE.finditer(params)}
    kwargs = head.get("kwargs") if isinstance(head, dict) else None
    for source in (found, kwargs if isinstance(kwargs, dict) else {}):
        for field in _MODEL_FIELDS:
            name = source.get(field)
            if isinstance(name, str) and _MODEL_NAME_RE.fullmatch(name):
                return name
    return DEFAULT_MODEL


# --- entries -------------------------------------------------------------------------------

def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _usage(generations: Sequence[Generation]) -> dict[str, Any] | None:
    """The tokens the call used, in OpenAI's names: from the first AI message with
    ``usage_metadata`` (a chat model puts the whole call's usage on each of its
    generations, so they are never added up), else from a ``token_usage`` / ``usage``
    dict in the generation info or response metadata; ``None`` when nothing reports it."""
    for generation in generations:
        message = getattr(generation, "message", None)
        metadata = message.usage_metadata if isinstance(message, AIMessage) else None
        if metadata:
            prompt, completion = _count(metadata.get("input_tokens")), _count(metadata.get("output_tokens"))
            usage: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion}
            details = metadata.get("input_token_details") or {}
            cached = _count(details.get("cache_read"))
            if 0 < cached <= prompt:  # LangChain's input_tokens include cache reads, as OpenAI's do
                usage["prompt_tokens_details"] = {"cached_tokens": cached}
            return usage
    for generation in generations:
        message = getattr(generation, "message", None)
        for source in (generation.generation_info, getattr(message, "response_metadata", None)):
            for name in ("token_usage", "usage"):
                if isinstance(source, Mapping) and isinstance(source.get(name), Mapping):
                    return dict(source[name])
    return None


def _choice(index: int, generation: Generation) -> dict[str, Any]:
    """What admission reads of one generation, as an OpenAI choice."""
    message: dict[str, Any] = {"role": "assistant", "content": generation.text}
    info = generation.generation_info or {}
    finish = info.get("finish_reason", info.get("stop_reason"))
    ai = getattr(generation, "message", None)
    if isinstance(ai, AIMessage):
        if finish is None:
            finish = ai.response_metadata.get("finish_reason", ai.response_metadata.get("stop_reason"))
        if not generation.text and isinstance(ai.content, list) and ai.content:  # non-text content blocks
            message["content"] = [{"type": str(part.get("type", "unknown")) if isinstance(part, Mapping) else "text"}
                                  for part in ai.content]
        if ai.tool_calls:
            message["tool_calls"] = [
                {"id": call.get("id"), "type": "function",
                 "function": {"name": call["name"], "arguments": json.dumps(call.get("args", {}), default=str)}}
                for call in ai.tool_calls
            ]
        for name in ("function_call", "refusal"):
            if ai.additional_kwargs.get(name):
                message[name] = ai.additional_kwargs[name]
    return {"index": index, "message": message, "finish_reason": finish if isinstance(finish, str) else None}


def to_response(generations: Sequence[Generation], model: str) -> dict[str, Any]:
    """The dict stored for ``generations``. Raises ``InvalidRequestError`` for anything
    but a sequence of LangChain ``Generation`` objects."""
    if isinstance(generations, (str, bytes)) or not isinstance(generations, Sequence) or not all(
            isinstance(g, Generation) for g in generations):
        raise InvalidRequestError("A LangChain cache stores a list of langchain_core.outputs.Generation objects.")
    generations = list(generations)
    response: dict[str, Any] = {
        "object": OBJECT,
        "model": model,
        "choices": [_choice(i, g) for i, g in enumerate(generations)],
        "langchain": dumps(generations),
    }
    usage = _usage(generations)
    if usage is not None:
        response["usage"] = usage
    return response


def _as_hit(generation: Generation) -> Generation:
    """A chat generation as a hit returns it: zero tokens spent, the original counts kept
    in ``response_metadata["ragcache"]``. Other generations are returned as stored."""
    message = getattr(generation, "message", None)
    if not isinstance(generation, ChatGeneration) or not isinstance(message, AIMessage):
        return generation
    avoided = message.usage_metadata
    metadata = {k: v for k, v in message.response_metadata.items() if k not in _USAGE_KEYS}
    metadata["ragcache"] = {"cache_hit": True, "usage_avoided": dict(avoided) if avoided else None}
    message = message.model_copy(update={"response_metadata": metadata,
                                         "usage_metadata": dict(_ZERO_USAGE) if avoided else None})
    info = generation.generation_info
    if info is not None:
        info = {k: v for k, v in info.items() if k not in _USAGE_KEYS}
    return type(generation)(message=message, generation_info=info)


def from_response(response: Any) -> list[Generation] | None:
    """The generations of a stored dict, as a hit returns them; ``None`` if it holds none
    that read back under ``ALLOWED_OBJECTS``."""
    text = response.get("langchain") if isinstance(response, dict) and response.get("object") == OBJECT else None
    if not isinstance(text, str):
        return None
    try:
        generations = loads(text, allowed_objects=ALLOWED_OBJECTS, secrets_map=None, secrets_from_env=False)
    except (ValueError, TypeError, KeyError, NotImplementedError) as exc:  # JSON and validation errors are ValueErrors
        logger.warning("ragcache: a LangChain cache entry did not read back (%s); treated as a miss",
                       type(exc).__name__)
        return None
    if not isinstance(generations, list) or not generations or not all(isinstance(g, Generation)
                                                                       for g in generations):
        return None
    return [_as_hit(g) for g in generations]


# --- the cache -----------------------------------------------------------------------------

class RagcacheCache(BaseCache):
    """A ``langchain_core.caches.BaseCache`` storing answers through ``cache_service``.

    ``policy``: the ``CachePolicy`` name (its mode, TTL, scope and admission rules apply;
    an unknown policy bypasses the cache). ``scope``: the user or tenant id, a non-empty
    string or an int; required under a policy scoped per user or tenant (lookups then
    raise ``ScopeRequiredError`` without it). As ``set_llm_cache`` is process-wide, give
    a per-user cache to the model instead: ``ChatOpenAI(cache=RagcacheCache("per-user",
    scope=user.pk))``.

    ``lookup`` / ``alookup`` return the cached list of generations or ``None``;
    ``update`` / ``aupdate`` store one (admission may refuse it: nothing is stored);
    Redis trouble is never raised (a miss, nothing stored). The async methods run on
    ragcache's async Redis client, in the event loop. ``clear`` / ``aclear`` purge the
    policy. Raises ``InvalidRequestError`` (a ``ValueError``) for a bad ``policy`` or
    ``scope``.
    """

    def __init__(self, policy: str = "default", scope: str | int | None = None) -> None:
        if not isinstance(policy, str) or not policy:
            raise InvalidRequestError("policy must be the name of a cache policy, e.g. RagcacheCache('default').")
        scope_hash("global", scope)  # raises InvalidRequestError for an unusable scope
        self.policy = policy
        self.scope = scope
        self._pending: OrderedDict[bytes, float] = OrderedDict()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"RagcacheCache(policy={self.policy!r}, scope={'None' if self.scope is None else '...'})"

    def _request(self, prompt: str, llm_string: str) -> dict[str, Any]:
        if not isinstance(prompt, str) or not isinstance(llm_string, str):
            raise InvalidRequestError("A LangChain cache is called with the prompt and llm_string as strings.")
        # A list holding the prompt keys exactly like the string form, and also accepts "".
        return {"messages": [{"role": "user", "content": prompt}], "model": model_from_llm_string(llm_string),
                "policy": self.policy, "scope": self.scope, "params": {"llm_string": llm_string}}

    # The time of a miss, so that the answer stored after it carries the call's latency
    # (what a hit avoids). Bounded; a hash of the pair, never its text.
    @staticmethod
    def _pair(prompt: str, llm_string: str) -> bytes:
        digest = hashlib.blake2b(digest_size=16)
        digest.update(prompt.encode("utf-8", "surrogatepass"))
        digest.update(b"\x00")
        digest.update(llm_string.encode("utf-8", "surrogatepass"))
        return digest.digest()

    def _missed(self, prompt: str, llm_string: str) -> None:
        pair = self._pair(prompt, llm_string)
        with self._lock:
            self._pending[pair] = time.perf_counter()
            self._pending.move_to_end(pair)
            while len(self._pending) > _MAX_PENDING:
                self._pending.popitem(last=False)

    def _latency_ms(self, prompt: str, llm_string: str) -> float | None:
        with self._lock:
            started = self._pending.pop(self._pair(prompt, llm_string), None)
        if started is None:
            return None
        latency = (time.perf_counter() - started) * 1000
        return latency if latency <= MAX_LATENCY_MS else None

    def _found(self, prompt: str, llm_string: str, cached: Any) -> list[Generation] | None:
        generations = from_response(cached.response) if cached is not None else None
        if generations is None:
            self._missed(prompt, llm_string)
        return generations

    # --- BaseCache ---------------------------------------------------------------------------

    def lookup(self, prompt: str, llm_string: str) -> list[Generation] | None:
        """The cached generations for ``(prompt, llm_string)``, or ``None``."""
        cached = cache_service.get_cached_response(**self._request(prompt, llm_string))
        return self._found(prompt, llm_string, cached)

    async def alookup(self, prompt: str, llm_string: str) -> list[Generation] | None:
        """``lookup`` on the event loop (ragcache's async Redis client)."""
        cached = await cache_service.aget_cached_response(**self._request(prompt, llm_string))
        return self._found(prompt, llm_string, cached)

    def update(self, prompt: str, llm_string: str, return_val: Sequence[Generation]) -> None:
        """Store ``return_val`` (a list of ``Generation``) for ``(prompt, llm_string)``."""
        request = self._request(prompt, llm_string)
        response = to_response(return_val, request["model"])
        cache_service.cache_response(response=response, latency_ms=self._latency_ms(prompt, llm_string), **request)

    async def aupdate(self, prompt: str, llm_string: str, return_val: Sequence[Generation]) -> None:
        """``update`` on the event loop (ragcache's async Redis client)."""
        request = self._request(prompt, llm_string)
        response = to_response(return_val, request["model"])
        await cache_service.acache_response(response=response, latency_ms=self._latency_ms(prompt, llm_string),
                                            **request)

    def clear(self, **kwargs: Any) -> None:
        """Purge the policy: every answer cached under it becomes unreachable at once, for
        every caller of the policy (every scope, every model, LangChain or not), not only
        this cache's. Moves the policy's generation forward (``CachePolicy.purge()``);
        entries expire on their TTL and the Redis database is never flushed. Keyword
        arguments are ignored. Raises ``InvalidRequestError`` if the policy does not exist."""
        from ..models import CachePolicy
        from ..policies import registry

        try:
            policy = CachePolicy.objects.get(name=self.policy)
        except CachePolicy.DoesNotExist:
            raise InvalidRequestError(f"There is no cache policy named {self.policy!r} to clear.") from None
        policy.purge()
        registry.invalidate()  # this process sees it at once; others when the transaction commits

    async def aclear(self, **kwargs: Any) -> None:
        """``clear`` from the event loop (the database work runs in Django's sync thread)."""
        await sync_to_async(self.clear, thread_sensitive=True)(**kwargs)
