"""The public API: ``cache_service`` (steps 59–62 lookup, 68 store) and ``usage_tracker``.

    from ragcache.services import cache_service

    result = cache_service.get_or_call(messages, lambda: llm(messages), model="gpt-4o-mini")
    result.response, result.hit

Redis trouble never reaches the caller: a lookup becomes a miss, a store returns
``False``, and the LLM path keeps working. Mistakes in the call itself (no ``scope``
under a per-user policy, messages that are not JSON) raise ``InvalidRequestError``.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from asgiref.sync import sync_to_async

from . import metrics, store
from .conf import get_config
from .entries import CachedResponse, CorruptEntry, Refused, admit, decode, encode
from .exceptions import InvalidRequestError, ScopeRequiredError
from .keys import CacheKey, Messages, content_digest, normalize_messages, rollout_bucket, scope_hash, select_params
from .policies import Policy, Snapshot, registry
from .steplog import log_step
from .steplog import logger as step_logger
from .usage import UsageEvent, UsageTracker, usage_tracker

__all__ = [
    "CacheService",
    "CachedResponse",
    "CallResult",
    "UsageEvent",
    "UsageTracker",
    "cache_service",
    "usage_tracker",
]

logger = logging.getLogger("ragcache.services")


@dataclass(frozen=True)
class CallResult:
    """What ``get_or_call`` returns. ``response`` has the shape ``call()`` returned."""

    response: Any
    hit: bool
    key: str | None
    cached: CachedResponse | None = None
    latency_ms: float = 0.0


# _Request and _Plan are built on every call: slots rather than frozen, whose __init__
# costs four times as much. Nothing mutates them.
@dataclass(slots=True)
class _Request:
    messages: Messages
    model: str
    policy: str
    scope: Any
    params: Mapping[str, Any] | None
    context_version: Any


@dataclass(slots=True)
class _Plan:
    snapshot: Snapshot
    policy: Policy | None
    key: CacheKey | None
    bypass: str = ""  # why the cache is not used for this request, if it is not

    def event(self, model: str) -> tuple[str, str, str, str]:
        return (self.policy.name, model, self.key.scope, self.key.short)


@dataclass
class _Lookup:
    plan: _Plan
    outcome: str  # hit | miss | leader | follower | bypass | error
    cached: CachedResponse | None = None
    lock_token: str = ""


class _HitRates:
    """Each policy's hit rate over this process's last HIT_RATE_WINDOW lookups."""

    def __init__(self) -> None:
        self._windows: dict[str, deque] = {}
        self._lock = threading.Lock()

    def record(self, policy: str, hit: bool) -> None:
        window = self._windows.get(policy)
        if window is None:
            with self._lock:
                window = self._windows.setdefault(policy, deque(maxlen=int(get_config()["HIT_RATE_WINDOW"])))
        window.append(hit)

    def rate(self, policy: str) -> float | None:
        window = self._windows.get(policy)
        return round(sum(window) / len(window), 4) if window else None


class CacheService:
    def __init__(self, tracker: UsageTracker | None = None) -> None:
        self.tracker = tracker or usage_tracker
        self.hit_rates = _HitRates()

    # --- planning: policy, key, flags (no I/O except a snapshot reload) -------------------

    def _plan(self, request: _Request, snapshot: Snapshot) -> _Plan:
        policy = snapshot.policies.get(request.policy)
        if policy is None:
            # A policy deleted while in use, or a typo: serve without cache, loudly.
            normalize_messages(request.messages)
            logger.warning("ragcache: no cache policy named %r; calls bypass the cache", request.policy)
            return _Plan(snapshot, None, None, "unknown_policy")
        if policy.scope != "global" and request.scope is None:
            raise ScopeRequiredError(policy.name, policy.scope)
        messages = normalize_messages(request.messages, normalize=policy.normalize_query)
        digest = content_digest(
            messages,
            model=request.model,
            params=select_params(request.params, policy.key_params),
            context_version=request.context_version,
        )
        key = CacheKey(
            get_config()["KEY_PREFIX"], policy.name, policy.generation, scope_hash(policy.scope, request.scope), digest
        )
        if step_logger.isEnabledFor(logging.DEBUG):
            log_step(61, {"policy": policy.name, "cache_key": key.short}, logging.DEBUG)
        if snapshot.kill_switch:
            return _Plan(snapshot, policy, key, "kill_switch")
        if not policy.active:
            return _Plan(snapshot, policy, key, "off")
        if rollout_bucket(digest) >= policy.rollout_percent:
            return _Plan(snapshot, policy, key, "rollout")
        return _Plan(snapshot, policy, key)

    def _current_plan(self, request: _Request) -> _Plan:
        plan = self._plan(request, registry.current())
        if plan.bypass:
            # No lookup will validate the snapshot for us; check it (at most once a second)
            # so that turning the cache back on is seen within a second.
            snapshot = registry.revalidate()
            if snapshot is not plan.snapshot:
                plan = self._plan(request, snapshot)
        if step_logger.isEnabledFor(logging.DEBUG):
            log_step(60, {
                "policy": request.policy,
                "mode": plan.policy.mode if plan.policy else None,
                "scope": plan.policy.scope if plan.policy else None,
                "bypass": plan.bypass or None,
            }, logging.DEBUG)
        return plan

    # --- lookup (steps 59–62) ---------------------------------------------------------------

    def _lookup(self, request: _Request, *, lock: bool = False) -> _Lookup:
        started = time.perf_counter()
        start_us = int(time.time() * 1_000_000)
        if step_logger.isEnabledFor(logging.DEBUG):
            log_step(59, {"policy": request.policy, "model": request.model, "single_flight": lock}, logging.DEBUG)
        plan = self._current_plan(request)
        for _attempt in range(2):
            if plan.bypass:
                self._count_bypass(plan, request)
                return _Lookup(plan, "bypass")
            policy, key = plan.policy, plan.key
            shadow = policy.mode == "shadow"
            tracking = plan.snapshot.tracking_enabled
            # Only "on" serves the leader's stored answer to followers; read-only never stores
            # and shadow always calls, so a lock there would only make identical requests queue.
            locking = lock and policy.mode == "on"
            token = store.new_token() if locking else ""
            try:
                reply = store.lookup(
                    key.redis_key,
                    key.lock_key,
                    config_version=plan.snapshot.version,
                    hit_result=("shadow_hit" if shadow else "hit") if tracking else "",
                    miss_result="miss" if tracking else "",
                    lock_ms=int(float(get_config()["LOCK_TIMEOUT"]) * 1000) if locking else 0,
                    lock_token=token,
                    start_us=start_us,
                    event=plan.event(request.model),
                )
            except store.RedisUnavailable:
                metrics.LOOKUPS.labels(policy.name, "error").inc()
                return _Lookup(plan, "error")
            if reply.status == "stale":
                plan = self._plan(request, registry.seen_version(reply.config_version))
                continue
            return self._finish_lookup(request, plan, reply, token, started, shadow)
        # The policies changed twice during one lookup; serve this one without cache.
        metrics.LOOKUPS.labels(plan.policy.name if plan.policy else "unknown", "error").inc()
        return _Lookup(plan, "error")

    def _finish_lookup(self, request, plan, reply, token, started, shadow) -> _Lookup:
        policy, key = plan.policy, plan.key
        cached = None
        if reply.status == "hit":
            try:
                cached = decode(reply.meta, reply.body, key.redis_key)
            except CorruptEntry as exc:
                self._discard_corrupt(key, str(exc))
        elif reply.foreign:
            self._discard_corrupt(key, "foreign bytes or another key schema", deleted=True)
        if reply.status == "follower":
            # Not an outcome yet: like the usage stream, metrics count this request once,
            # when the wait ends (a hit, the lock passed on, or a timeout).
            return _Lookup(plan, "follower")
        elapsed = time.perf_counter() - started
        metrics.child(metrics.LOOKUP_SECONDS, policy.name).observe(elapsed)
        if cached is None:
            outcome = "miss" if reply.status == "hit" else reply.status
            self._count_miss(policy.name, key)
            return _Lookup(plan, outcome, lock_token=token)
        result = "shadow_hit" if shadow else "hit"
        metrics.child(metrics.LOOKUPS, policy.name, result).inc()
        self.hit_rates.record(policy.name, True)
        if step_logger.isEnabledFor(logging.DEBUG):
            log_step(62, {"policy": policy.name, "cache_key": key.short, "hit": True}, logging.DEBUG)
        if not shadow:
            self._track_hit(plan, request.model, cached, elapsed, written=plan.snapshot.tracking_enabled)
        return _Lookup(plan, result, cached)

    def _count_miss(self, policy: str, key: CacheKey) -> None:
        metrics.child(metrics.LOOKUPS, policy, "miss").inc()
        self.hit_rates.record(policy, False)
        if step_logger.isEnabledFor(logging.DEBUG):
            log_step(62, {"policy": policy, "cache_key": key.short, "hit": False}, logging.DEBUG)

    def _track_hit(self, plan: _Plan, model: str, cached: CachedResponse, elapsed: float, *, written: bool) -> None:
        cost = cached.cost
        if cost is None:
            cost = plan.snapshot.cost(cached.model or model, cached.prompt_tokens, cached.completion_tokens)
        latency_ms = elapsed * 1000
        self.tracker.track(
            UsageEvent(
                policy=plan.policy.name,
                result="hit",
                model=model,
                scope_hash=plan.key.scope,
                key_hash=plan.key.short,
                tokens_avoided=cached.tokens,
                cost_avoided=cost,
                latency_avoided_ms=max(0.0, (cached.latency_ms or 0.0) - latency_ms),
                latency_ms=latency_ms,
            ),
            written=written,
        )

    def _discard_corrupt(self, key: CacheKey, why: str, *, deleted: bool = False) -> None:
        metrics.CORRUPT_ENTRIES.labels(key.policy).inc()
        logger.warning("ragcache: unreadable entry %s deleted (%s); served as a miss", key.short, why)
        if not deleted:
            try:
                store.delete(key.redis_key)
            except store.RedisUnavailable:
                pass

    def _count_bypass(self, plan: _Plan, request: _Request) -> None:
        name = plan.policy.name if plan.policy else "unknown"
        metrics.LOOKUPS.labels(name, "bypass").inc()
        if plan.bypass != "kill_switch" and plan.policy is not None and plan.snapshot.tracking_enabled:
            self.tracker.track(
                UsageEvent(policy=name, result="bypass", model=request.model, scope_hash=plan.key.scope,
                           key_hash=plan.key.short, reason=plan.bypass)
            )

    def get_cached_response(
        self,
        messages: Messages,
        *,
        model: str,
        policy: str = "default",
        scope: Any = None,
        params: Mapping[str, Any] | None = None,
        context_version: Any = None,
    ) -> CachedResponse | None:
        """The cached answer, or ``None`` (miss, bypass, shadow mode, or Redis trouble)."""
        lookup = self._lookup(_Request(messages, model, policy, scope, params, context_version))
        return lookup.cached if lookup.outcome == "hit" else None

    # --- store (step 68) ------------------------------------------------------------------

    def cache_response(
        self,
        messages: Messages,
        response: Any,
        *,
        model: str,
        policy: str = "default",
        scope: Any = None,
        params: Mapping[str, Any] | None = None,
        context_version: Any = None,
        ttl: int | None = None,
        latency_ms: float | None = None,
    ) -> bool:
        """Store ``response`` under the policy; ``True`` if stored. ``ttl`` (seconds) can
        only shorten the policy's TTL. Never raises because of Redis."""
        if ttl is not None and (not isinstance(ttl, int) or isinstance(ttl, bool) or ttl < 1):
            raise InvalidRequestError(f"ttl must be a positive number of seconds, not {ttl!r}.")
        request = _Request(messages, model, policy, scope, params, context_version)
        return self._store(request, self._current_plan(request), response, ttl=ttl, latency_ms=latency_ms)

    def _store(
        self, request: _Request, plan: _Plan, response: Any, *, ttl: int | None, latency_ms: float | None,
        lock_token: str = "",
    ) -> bool:
        for _attempt in range(2):
            if plan.bypass:
                return False
            policy, key = plan.policy, plan.key
            try:
                if policy.mode == "read_only":
                    raise Refused("read_only")
                body_response, _content, finish_reason, pt, ct, cost = admit(response)
                if cost is None:
                    cost = plan.snapshot.cost(request.model, pt, ct)
                ttl_seconds = min(ttl or policy.ttl_seconds, policy.ttl_seconds)
                meta, body, compressed = encode(
                    body_response, model=request.model, finish_reason=finish_reason, prompt_tokens=pt,
                    completion_tokens=ct, cost=cost, latency_ms=latency_ms, ttl_seconds=ttl_seconds,
                    compress_threshold=policy.compress_threshold_bytes, max_bytes=policy.max_entry_bytes,
                )
            except Refused as refusal:
                self._refuse(request, plan, refusal, lock_token)
                return False
            try:
                status, version = store.store(
                    key.redis_key, config_version=plan.snapshot.version, ttl_ms=ttl_seconds * 1000, meta=meta,
                    body=body, record=plan.snapshot.tracking_enabled, event=plan.event(request.model),
                    lock_key=key.lock_key if lock_token else "", lock_token=lock_token,
                )
            except store.RedisUnavailable:
                metrics.STORES.labels(policy.name, "error").inc()
                return False
            if status == "stale":
                plan = self._plan(request, registry.seen_version(version))
                continue
            size = len(meta) + len(body)
            metrics.STORES.labels(policy.name, "stored").inc()
            metrics.ENTRY_BYTES.observe(size)
            expiry = datetime.fromtimestamp(time.time() + ttl_seconds, UTC)
            log_step(68, {
                "cache_key": key.short,
                "hit_rate": self.hit_rates.rate(policy.name),
                "expiry_time": expiry.isoformat(timespec="seconds"),
                "policy": policy.name,
                "ttl": ttl_seconds,
                "bytes": size,
                "compressed": compressed,
            })
            return True
        return False

    def _refuse(self, request: _Request, plan: _Plan, refusal: Refused, lock_token: str) -> None:
        policy, key = plan.policy, plan.key
        metrics.STORES.labels(policy.name, "refused").inc()
        metrics.REFUSALS.labels(policy.name, refusal.reason).inc()
        log_step(68, {
            "cache_key": key.short, "policy": policy.name, "stored": False, "reason": refusal.reason,
            "hit_rate": self.hit_rates.rate(policy.name),
        })
        if lock_token:
            store.unlock(key.lock_key, lock_token)
        if refusal.reason != "read_only":
            self.tracker.track(UsageEvent(
                policy=policy.name, result="refused", model=request.model, scope_hash=key.scope,
                key_hash=key.short, reason=refusal.reason,
            ))

    # --- get_or_call ------------------------------------------------------------------------

    def _begin(self, request: _Request) -> _Lookup:
        return self._lookup(request, lock=True)

    def _follow(self, request: _Request, lookup: _Lookup) -> _Lookup:
        """A follower waits for the leader's answer; if the leader's lock goes away
        without an answer, the follower becomes leader; after LOCK_WAIT it calls itself."""
        config = get_config()
        deadline = time.monotonic() + float(config["LOCK_WAIT"])
        poll = float(config["LOCK_POLL_INTERVAL"])
        while time.monotonic() < deadline:
            time.sleep(poll)
            again = self._lookup(request, lock=True)
            if again.outcome != "follower":
                return again
        return self._lock_timed_out(request, lookup)

    async def _afollow(self, request: _Request, lookup: _Lookup) -> _Lookup:
        """``_follow`` for the event loop: it must sleep with ``asyncio.sleep``. A blocking
        wait inside sync_to_async would hold the thread-sensitive executor, so the leader's
        own store (queued on that executor) could not run until every follower timed out."""
        config = get_config()
        deadline = time.monotonic() + float(config["LOCK_WAIT"])
        poll = float(config["LOCK_POLL_INTERVAL"])
        while time.monotonic() < deadline:
            await asyncio.sleep(poll)
            again = await sync_to_async(self._lookup)(request, lock=True)
            if again.outcome != "follower":
                return again
        return await sync_to_async(self._lock_timed_out)(request, lookup)

    def _lock_timed_out(self, request: _Request, lookup: _Lookup) -> _Lookup:
        plan = lookup.plan
        self._count_miss(plan.policy.name, plan.key)
        if plan.snapshot.tracking_enabled:
            self.tracker.track(UsageEvent(
                policy=plan.policy.name, result="miss", model=request.model, scope_hash=plan.key.scope,
                key_hash=plan.key.short, reason="lock_timeout",
            ))
        return _Lookup(plan, "miss")

    def _result_from_hit(self, lookup: _Lookup, started: float) -> CallResult:
        return CallResult(lookup.cached.response, True, lookup.plan.key.redis_key, lookup.cached,
                          (time.perf_counter() - started) * 1000)

    def _after_call(
        self, request: _Request, lookup: _Lookup, response: Any, call_ms: float, started: float
    ) -> CallResult:
        plan = lookup.plan
        may_store = lookup.outcome in ("miss", "leader") and plan.policy is not None
        if may_store and plan.policy.mode != "read_only":
            self._store(request, plan, response, ttl=None, latency_ms=call_ms, lock_token=lookup.lock_token)
        elif lookup.lock_token:
            store.unlock(plan.key.lock_key, lookup.lock_token)
        key = plan.key.redis_key if plan.key else None
        return CallResult(response, False, key, None, (time.perf_counter() - started) * 1000)

    def _release(self, lookup: _Lookup) -> None:
        if lookup.lock_token and lookup.outcome == "leader":
            store.unlock(lookup.plan.key.lock_key, lookup.lock_token)

    def get_or_call(
        self,
        messages: Messages,
        call: Callable[[], Any],
        *,
        model: str,
        policy: str = "default",
        scope: Any = None,
        params: Mapping[str, Any] | None = None,
        context_version: Any = None,
    ) -> CallResult:
        """The cached answer, or ``call()``'s answer (stored under the policy's rules).
        Concurrent identical misses make one ``call()``; the others wait for its answer."""
        started = time.perf_counter()
        request = _Request(messages, model, policy, scope, params, context_version)
        lookup = self._begin(request)
        if lookup.outcome == "follower":
            lookup = self._follow(request, lookup)
        if lookup.outcome == "hit":
            return self._result_from_hit(lookup, started)
        call_started = time.perf_counter()
        try:
            response = call()
        except BaseException:
            self._release(lookup)
            raise
        call_ms = (time.perf_counter() - call_started) * 1000
        return self._after_call(request, lookup, response, call_ms, started)

    # --- async twins ------------------------------------------------------------------------

    async def aget_cached_response(self, messages: Messages, **kwargs: Any) -> CachedResponse | None:
        return await sync_to_async(self.get_cached_response)(messages, **kwargs)

    async def acache_response(self, messages: Messages, response: Any, **kwargs: Any) -> bool:
        return await sync_to_async(self.cache_response)(messages, response, **kwargs)

    async def aget_or_call(
        self,
        messages: Messages,
        call: Callable[[], Any],
        *,
        model: str,
        policy: str = "default",
        scope: Any = None,
        params: Mapping[str, Any] | None = None,
        context_version: Any = None,
    ) -> CallResult:
        """Like ``get_or_call``; ``call`` may be a coroutine function."""
        started = time.perf_counter()
        request = _Request(messages, model, policy, scope, params, context_version)
        lookup = await sync_to_async(self._begin)(request)
        if lookup.outcome == "follower":
            lookup = await self._afollow(request, lookup)
        if lookup.outcome == "hit":
            return self._result_from_hit(lookup, started)
        call_started = time.perf_counter()
        try:
            response = call()
            if inspect.isawaitable(response):
                response = await response
        except BaseException:
            await sync_to_async(self._release)(lookup)
            raise
        call_ms = (time.perf_counter() - call_started) * 1000
        return await sync_to_async(self._after_call)(request, lookup, response, call_ms, started)


cache_service = CacheService()
