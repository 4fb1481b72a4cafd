"""The public API: ``cache_service`` (steps 59-62 lookup, 68 store) and ``usage_tracker`` (63).

    from ragcache.services import cache_service

    result = cache_service.get_or_call(messages, lambda: llm(messages), model="gpt-4o-mini")
    result.response, result.hit

Every method has an async twin (``a`` prefix) that runs natively on ``redis.asyncio``:
both are thin drivers of the same flows (flows.py), so they decide alike.

Redis trouble never reaches the caller: a lookup becomes a miss, a store returns
``False``, and the LLM path keeps working. Mistakes in the call itself (no ``scope``
under a per-user policy, messages that are not JSON, too many sources) raise
``InvalidRequestError``, a ``ValueError``.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from . import effects, flows
from .entries import CachedResponse
from .keys import Messages
from .outcomes import CallResult
from .plans import make_request
from .streaming import AsyncResponseStream, ResponseStream
from .usage import UsageEvent, UsageTracker, usage_tracker

__all__ = [
    "AsyncResponseStream",
    "CacheService",
    "CachedResponse",
    "CallResult",
    "ResponseStream",
    "UsageEvent",
    "UsageTracker",
    "cache_service",
    "usage_tracker",
]

Params = Mapping[str, Any] | None


class CacheService:
    """Arguments shared by the methods:

    - ``messages``: a string (one user question) or a list of ``{"role", "content"}``
      dicts (every field of every message enters the key).
    - ``model``: the model name (enters the key; prices come from ``ModelPrice``).
    - ``policy``: a ``CachePolicy`` name. ``scope``: the user or tenant id (required under
      a policy scoped per user or tenant; hashed into the key).
    - ``params``: the request's other parameters; all enter the key except those the
      policy lists in ``ignored_params``. ``context_version``: any JSON value, e.g. your
      index's version.
    - ``sources``: ids of the documents the answer was built from (``"doc:42"``); see
      ``invalidate_sources``.
    - ``refresh`` (skip the lookup, call and store), ``no_store`` (never store), ``ttl``
      (seconds, only shorter than the policy's): per-call cache controls.
    """

    def __init__(self, tracker: UsageTracker | None = None) -> None:
        self.tracker = tracker or usage_tracker

    # --- lookup (steps 59-62) ---------------------------------------------------------------

    def get_cached_response(self, messages: Messages, *, model: str, policy: str = "default", scope: Any = None,
                            params: Params = None, context_version: Any = None) -> CachedResponse | None:
        """The cached answer, or ``None`` (miss, bypass, shadow mode, Redis trouble)."""
        request = make_request(messages, model=model, policy=policy, scope=scope, params=params,
                               context_version=context_version)
        return effects.run(flows.get_cached_response(request))

    async def aget_cached_response(self, messages: Messages, *, model: str, policy: str = "default",
                                   scope: Any = None, params: Params = None,
                                   context_version: Any = None) -> CachedResponse | None:
        request = make_request(messages, model=model, policy=policy, scope=scope, params=params,
                               context_version=context_version)
        return await effects.arun(flows.get_cached_response(request))

    # --- store (step 68) ------------------------------------------------------------------

    def cache_response(self, messages: Messages, response: Any, *, model: str, policy: str = "default",
                       scope: Any = None, params: Params = None, context_version: Any = None, ttl: int | None = None,
                       latency_ms: float | None = None, sources: Iterable[str] | None = None) -> bool:
        """Store ``response`` under the policy; ``True`` if stored. ``ttl`` (seconds) can only
        shorten the policy's TTL; ``latency_ms`` is what the call took (the latency a hit
        avoids). ``False`` when Redis is down, the policy is read-only or bypassed, or the
        answer is refused (see README, "admission"). Never raises because of Redis."""
        request = make_request(messages, model=model, policy=policy, scope=scope, params=params,
                               context_version=context_version, sources=sources, ttl=ttl)
        return effects.run(flows.cache_response(request, response, latency_ms))

    async def acache_response(self, messages: Messages, response: Any, *, model: str, policy: str = "default",
                              scope: Any = None, params: Params = None, context_version: Any = None,
                              ttl: int | None = None, latency_ms: float | None = None,
                              sources: Iterable[str] | None = None) -> bool:
        request = make_request(messages, model=model, policy=policy, scope=scope, params=params,
                               context_version=context_version, sources=sources, ttl=ttl)
        return await effects.arun(flows.cache_response(request, response, latency_ms))

    # --- get_or_call -----------------------------------------------------------------------

    def get_or_call(self, messages: Messages, call: Callable[[], Any], *, model: str, policy: str = "default",
                    scope: Any = None, params: Params = None, context_version: Any = None,
                    sources: Iterable[str] | None = None, refresh: bool = False, no_store: bool = False,
                    ttl: int | None = None, gateway_key: str = "") -> CallResult:
        """The cached answer, or ``call()``'s (stored if the policy and admission allow).
        Identical concurrent misses make one ``call()``; the others wait for its answer,
        and are all released at once if it is not stored. An exception from ``call()``
        propagates, is never cached, and releases the waiting callers."""
        request = make_request(messages, model=model, policy=policy, scope=scope, params=params,
                               context_version=context_version, sources=sources, refresh=refresh,
                               no_store=no_store, ttl=ttl, gateway_key=gateway_key)
        return effects.run(flows.get_or_call(request, call))

    async def aget_or_call(self, messages: Messages, call: Callable[[], Any], *, model: str, policy: str = "default",
                           scope: Any = None, params: Params = None, context_version: Any = None,
                           sources: Iterable[str] | None = None, refresh: bool = False, no_store: bool = False,
                           ttl: int | None = None, gateway_key: str = "") -> CallResult:
        """Like ``get_or_call``. ``call`` may be a coroutine function, or a plain function
        (run in a worker thread, so it never blocks the event loop)."""
        request = make_request(messages, model=model, policy=policy, scope=scope, params=params,
                               context_version=context_version, sources=sources, refresh=refresh,
                               no_store=no_store, ttl=ttl, gateway_key=gateway_key)
        return await effects.arun(flows.get_or_call(request, call))

    # --- get_or_stream -----------------------------------------------------------------------

    def get_or_stream(self, messages: Messages, call: Callable[[], Iterable[Any]], *, model: str,
                      policy: str = "default", scope: Any = None, params: Params = None, context_version: Any = None,
                      sources: Iterable[str] | None = None, refresh: bool = False, no_store: bool = False,
                      ttl: int | None = None, gateway_key: str = "") -> ResponseStream:
        """A stream of chunks: a faithful replay on a hit; on a miss, ``call()``'s chunks
        as they arrive (recorded, and stored if the stream completes and admission
        accepts it). ``call()`` returns an iterator of chunks (OpenAI ``ChatCompletionChunk``
        objects, dicts, or strings). Identical concurrent streams make one upstream call;
        the others receive its chunks live. ``.hit`` and ``.key`` are known on return."""
        request = make_request(messages, model=model, policy=policy, scope=scope, params=params,
                               context_version=context_version, sources=sources, kind="stream", refresh=refresh,
                               no_store=no_store, ttl=ttl, gateway_key=gateway_key)
        return ResponseStream(flows.get_or_stream(request, call))

    def aget_or_stream(self, messages: Messages, call: Callable[[], Any], *, model: str, policy: str = "default",
                       scope: Any = None, params: Params = None, context_version: Any = None,
                       sources: Iterable[str] | None = None, refresh: bool = False, no_store: bool = False,
                       ttl: int | None = None, gateway_key: str = "") -> AsyncResponseStream:
        """``get_or_stream`` for the event loop: ``call`` may return an async iterator (or
        be a coroutine function returning one). ``stream = await aget_or_stream(...)``
        runs the lookup (then ``stream.hit``); ``async for chunk in stream`` reads it."""
        request = make_request(messages, model=model, policy=policy, scope=scope, params=params,
                               context_version=context_version, sources=sources, kind="stream", refresh=refresh,
                               no_store=no_store, ttl=ttl, gateway_key=gateway_key)
        return AsyncResponseStream(flows.get_or_stream(request, call))

    # --- invalidation ---------------------------------------------------------------------------

    def invalidate_sources(self, ids: Iterable[str]) -> int:
        """After this returns, no answer stored with any of these source ids is served again,
        by any process, policy or scope; answers being computed from them are not stored.
        Its cost does not depend on how many answers cite them. Returns how many ids were
        invalidated. Raises ``InvalidRequestError`` for bad ids and ``RedisUnavailable``
        when Redis cannot be reached (the invalidation did not happen: retry)."""
        return effects.run(flows.invalidate_sources(ids))

    async def ainvalidate_sources(self, ids: Iterable[str]) -> int:
        return await effects.arun(flows.invalidate_sources(ids))


cache_service = CacheService()
