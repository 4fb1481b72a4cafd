"""Usage events (step 63): what one request did, and for a hit what it avoided.

Events go to the usage stream of the request's virtual shard. The lookup and store
scripts append them in the same round trip as the cache operation itself; ``UsageTracker``
then only writes the step 63 log line and counts metrics. Events never carry prompt or
answer text: a header of policy, model, hashed scope, short key and gateway key name.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from decimal import Decimal
from functools import partial

from . import metrics
from .steplog import log_step
from .steplog import logger as step_logger

logger = logging.getLogger("ragcache.usage")

SEPARATOR = "\x1f"  # between the header's fields; removed from the values themselves


def event_header(policy: str, model: str, scope: str, key: str, gateway_key: str = "") -> str:
    """The ``h`` field of an event (see scripts.py)."""
    if SEPARATOR in model or SEPARATOR in gateway_key:
        model, gateway_key = model.replace(SEPARATOR, " "), gateway_key.replace(SEPARATOR, " ")
    return f"{policy}{SEPARATOR}{model[:128]}{SEPARATOR}{scope}{SEPARATOR}{key}{SEPARATOR}{gateway_key[:64]}"


def parse_header(header: str) -> tuple[str, str, str, str, str]:
    """(policy, model, scope hash, short key, gateway key); raises ValueError."""
    parts = header.split(SEPARATOR)
    if len(parts) != 5:
        raise ValueError("an event header has five fields")
    return parts[0], parts[1], parts[2], parts[3], parts[4]


@dataclass(slots=True)
class UsageEvent:
    """One thing that happened to one request.

    ``result``: hit, miss, shadow_hit, stale_source, store, refused or bypass; ``reason``
    says why (bypass: kill_switch, disabled, mode_off, rollout, unknown_policy, no_cache;
    miss: corrupt, lock_timeout, leader_released; refused: the admission rule).
    ``tokens_avoided`` counts tokens, ``cost_avoided`` is in the price's currency,
    latencies are milliseconds.
    """

    policy: str
    result: str
    model: str = ""
    scope_hash: str = ""
    key_hash: str = ""
    reason: str = ""
    tokens_avoided: int = 0
    cost_avoided: Decimal | None = None
    latency_avoided_ms: float = 0.0
    latency_ms: float | None = None
    usage_known: bool = True
    gateway_key: str = ""

    @property
    def header(self) -> str:
        return event_header(self.policy, self.model, self.scope_hash, self.key_hash, self.gateway_key)


class UsageTracker:
    """Step 63: record what a request did, and for a hit what it avoided."""

    def track(self, event: UsageEvent, *, written: bool = False) -> bool:
        """Record ``event``: count it in metrics, write its step 63 line (INFO for hits,
        DEBUG otherwise) and append it to its shard's usage stream. ``written=True``
        skips the append: the cache's own events are written by its scripts, in the
        round trip they belong to. Returns whether the event is in a stream (False when
        tracking is off or Redis refused it); never raises for Redis trouble."""
        if event.result == "hit":
            model = metrics.model_label(event.model)
            if event.tokens_avoided:
                metrics.child(metrics.TOKENS_AVOIDED, event.policy, model).inc(event.tokens_avoided)
            if event.cost_avoided:
                metrics.child(metrics.COST_AVOIDED, event.policy, model).inc(float(event.cost_avoided))
            if step_logger.isEnabledFor(logging.INFO):
                log_step(63, partial(self._attrs, event))
        elif step_logger.isEnabledFor(logging.DEBUG):
            log_step(63, partial(self._attrs, event), level=logging.DEBUG)
        if written:
            return True
        return self._append(event)

    @staticmethod
    def _append(event: UsageEvent) -> bool:
        from . import store
        from .entries import KIND_RESPONSE, Usage, make_meta
        from .keys import shard_of
        from .plans import tuning
        from .policies import registry
        from .scripts import EVENT

        snapshot = registry.current()
        if not snapshot.tracking_enabled:
            return False
        shard = shard_of(event.key_hash.ljust(16, "0")) if len(event.key_hash) >= 16 else 0
        layout = store.current_layout()
        fields = ["r", event.result, "h", event.header, "x", event.reason]
        if event.result == "hit":  # what it avoided travels as entry metadata, as the scripts write it
            now = time.time()
            fields += ["e", make_meta(
                kind=KIND_RESPONSE, model=event.model, finish_reason=None,
                usage=Usage(event.tokens_avoided, 0, 0, event.usage_known), cost=event.cost_avoided,
                latency_ms=event.latency_avoided_ms, created=now, expires=now)]
        try:
            reply = store.run(EVENT, [layout.streams[shard], layout.versions[shard]],
                              ["1", tuning().stream_maxlen, *fields], shard=shard)
        except store.RedisUnavailable:
            metrics.child(metrics.EVENTS_LOST, "redis_unavailable").inc()
            return False
        if reply[1]:
            metrics.child(metrics.EVENTS_LOST, "redis_full").inc()
            return False
        return True

    @staticmethod
    def _attrs(event: UsageEvent) -> dict:
        return {
            "policy": event.policy,
            "result": event.result,
            "reason": event.reason or None,
            "model": event.model,
            "cache_key": event.key_hash,
            "tokens_avoided": event.tokens_avoided if event.usage_known else None,
            "cost_avoided": str(event.cost_avoided) if event.cost_avoided is not None else None,
            "latency_ms": round(event.latency_ms, 3) if event.latency_ms is not None else None,
            "latency_avoided_ms": round(event.latency_avoided_ms, 3),
        }


usage_tracker = UsageTracker()
