"""What a call gets back (``CallResult``, ``StreamInfo``) and how every outcome is
recorded: metrics, the per-policy hit rate, the step 62/63/68 lines and the usage event,
in this one place (the flows decide; these functions record what they decided)."""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from . import metrics
from .conf import get_config
from .entries import CachedResponse, Usage
from .plans import Plan, Request
from .steplog import log_step
from .steplog import logger as step_logger
from .usage import UsageEvent, parse_header, usage_tracker


@dataclass(slots=True)
class CallResult:
    """What ``get_or_call`` returns. ``response`` has the shape ``call()`` returned (or was
    stored with). ``outcome``: hit, miss, bypass, refresh or error (Redis unavailable);
    ``reason`` says why when there is one (see docs). ``key`` is the entry's Redis key."""

    response: Any
    hit: bool
    key: str | None
    cached: CachedResponse | None = None
    latency_ms: float = 0.0
    outcome: str = "miss"
    reason: str = ""
    stored: bool = False
    policy: str = ""
    key_id: str = ""  # the short key: what logs, usage records and headers show


@dataclass(slots=True)
class StreamInfo:
    """Known before a stream's first chunk: a hit, or what else."""

    hit: bool
    key: str | None
    outcome: str  # hit | miss | shared (a follower of an identical live stream) | bypass | refresh | error
    reason: str
    policy: str
    key_id: str
    cached: CachedResponse | None = None


# --- recording: metrics, hit rates, step lines and usage, in one place -------------------

class HitRates:
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


hit_rates = HitRates()


def record_lookup(request: Request, plan: Plan, result: str, reason: str = "", *, cached: CachedResponse | None = None,
                  lost: int = 0, since: float | None = None) -> None:
    """Count one lookup's outcome: ``result`` is hit, miss, shadow_hit, stale_source,
    bypass or error (the ``ragcache_lookups_total`` label). ``since``: when this lookup
    began (``ragcache_lookup_seconds`` times the lookup, not a follower's wait before it)."""
    name = plan.policy_name
    metrics.child(metrics.LOOKUPS, name, result).inc()
    if lost:
        metrics.child(metrics.EVENTS_LOST, "redis_full").inc()
    if result == "bypass" or result == "error":
        if step_logger.isEnabledFor(logging.DEBUG):
            log_step(62, {"policy": name, "cache_key": plan.key.short, "hit": False, "result": result,
                          "reason": reason}, logging.DEBUG)
            if result == "bypass" and reason != "no_cache":
                _log_tracked(plan, result, reason)
        return
    now = time.perf_counter()
    metrics.child(metrics.LOOKUP_SECONDS, name).observe(now - (request.started if since is None else since))
    hit_rates.record(name, result == "hit")
    if step_logger.isEnabledFor(logging.DEBUG):
        log_step(62, {"policy": name, "cache_key": plan.key.short, "hit": result == "hit", "result": result,
                      "reason": reason or None}, logging.DEBUG)
        if result == "miss" and reason:  # lock_timeout, leader_released, corrupt, ...
            _log_tracked(plan, result, reason)
    if result == "hit" and cached is not None:
        record_hit(request, plan, cached, (now - request.started) * 1000, reason)


def record_hit(request: Request, plan: Plan, cached: CachedResponse, waited_ms: float, reason: str = "") -> None:
    """Step 63 for a served hit (its event is already in the stream)."""
    cost = cached.cost
    prices = plan.snapshot.prices
    if cost is None and cached.usage_known and prices:
        price = prices.get(cached.model or request.model) or prices.get(request.model)
        if price is not None:
            cost = price.cost(Usage(cached.prompt_tokens, cached.cached_prompt_tokens, cached.completion_tokens, True))
    usage_tracker.track(UsageEvent(
        policy=plan.policy_name, result="hit", model=request.model, scope_hash=plan.key.scope, key_hash=plan.key.short,
        reason=reason, tokens_avoided=cached.tokens if cached.usage_known else 0, cost_avoided=cost,
        latency_avoided_ms=max(0.0, (cached.latency_ms or 0.0) - waited_ms), latency_ms=waited_ms,
        usage_known=cached.usage_known, gateway_key=request.gateway_key,
    ), written=True)


def _log_tracked(plan: Plan, result: str, reason: str) -> None:
    """Step 63 at DEBUG for a tracked result other than a hit (a bypass, a refusal, a miss
    with a reason); its event is written by a script in its own round trip."""
    if plan.snapshot.tracking_enabled and step_logger.isEnabledFor(logging.DEBUG):
        _, model, scope, key, gateway_key = parse_header(plan.header)
        usage_tracker.track(UsageEvent(policy=plan.policy_name, result=result, model=model, scope_hash=scope,
                                       key_hash=key, reason=reason, gateway_key=gateway_key), written=True)


def record_store(plan: Plan, status: str, *, ttl: int = 0, size: int = 0, reason: str = "") -> None:
    """Step 68: ``status`` is stored, refused or error (``ragcache_stores_total``)."""
    name = plan.policy_name
    metrics.child(metrics.STORES, name, status).inc()
    attrs: dict[str, Any] = {"cache_key": plan.key.short, "hit_rate": hit_rates.rate(name)}
    if status == "stored":
        metrics.ENTRY_BYTES.observe(size)
        attrs["expiry_time"] = datetime.fromtimestamp(time.time() + ttl, UTC).isoformat(timespec="seconds")
        attrs.update(policy=name, ttl=ttl, bytes=size)
    else:
        if status == "refused":
            metrics.child(metrics.REFUSALS, name, reason).inc()
            _log_tracked(plan, "refused", reason)
        attrs.update(policy=name, stored=False, reason=reason or status)
    log_step(68, attrs)

