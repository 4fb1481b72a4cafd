"""Usage tracking (step 63) and aggregation of usage events into the database.

Events go to a Redis Stream. A hit's event is appended by the lookup script itself
(same round trip); ``UsageTracker.track`` then only logs and counts metrics. The
aggregation reads the stream through a consumer group, writes ``UsageRecord`` rows
(unique on the stream id) and ``UsageRollup`` increments in one transaction, and only
then acknowledges and deletes the events: at-least-once delivery, exactly-once effect.
"""
from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation

from django.db import transaction
from django.db.models import F
from django.utils import timezone as dj_timezone

from . import metrics, store
from .conf import get_config
from .policies import registry
from .steplog import log_step

logger = logging.getLogger("ragcache.usage")

LOOKUP_RESULTS = ("hit", "miss", "shadow_hit")


@dataclass(frozen=True)
class UsageEvent:
    """One thing that happened to one request. Never carries prompt or answer text."""

    policy: str
    result: str  # hit | miss | shadow_hit | store | refused | bypass
    model: str = ""
    scope_hash: str = ""
    key_hash: str = ""
    reason: str = ""
    tokens_avoided: int = 0
    cost_avoided: Decimal | None = None
    latency_avoided_ms: float = 0.0
    latency_ms: float | None = None
    meta: str = ""  # the entry's metadata JSON, for hits and stores

    def fields(self) -> dict[str, str]:
        fields = {
            "r": self.result,
            "p": self.policy,
            "m": self.model,
            "s": self.scope_hash,
            "k": self.key_hash,
            "t": str(int(time.time() * 1_000_000)),
        }
        if self.reason:
            fields["x"] = self.reason
        if self.meta:
            fields["e"] = self.meta
        if self.latency_ms is not None:
            fields["w"] = str(int(self.latency_ms * 1000))
        return fields


class UsageTracker:
    """Step 63: record what a request did, and for a hit what it avoided."""

    def track(self, event: UsageEvent, *, written: bool = False) -> bool:
        """Count ``event`` in metrics and the step log; append it to the usage stream
        unless ``written`` (the lookup script already did, in the same round trip).
        Returns whether the event is in the stream. Never raises for Redis trouble."""
        if event.result == "hit":
            model = metrics.model_label(event.model)
            metrics.TOKENS_AVOIDED.labels(event.policy, model).inc(event.tokens_avoided)
            if event.cost_avoided:
                metrics.COST_AVOIDED.labels(event.policy, model).inc(float(event.cost_avoided))
            log_step(63, self._attrs(event))
        else:
            log_step(63, self._attrs(event), level=logging.DEBUG)
        if written:
            return True
        if not registry.current().tracking_enabled:
            return False
        try:
            store.append_event(event.fields())
        except store.RedisUnavailable:
            return False
        return True

    @staticmethod
    def _attrs(event: UsageEvent) -> dict:
        return {
            "policy": event.policy,
            "result": event.result,
            "model": event.model,
            "cache_key": event.key_hash,
            "tokens_avoided": event.tokens_avoided,
            "cost_avoided": str(event.cost_avoided) if event.cost_avoided is not None else None,
            "latency_ms": round(event.latency_ms, 3) if event.latency_ms is not None else None,
            "latency_avoided_ms": round(event.latency_avoided_ms, 3),
        }


usage_tracker = UsageTracker()


# --- aggregation ------------------------------------------------------------------------

@dataclass
class AggregationResult:
    status: str = "ok"  # ok | busy
    ingested: int = 0
    duplicates: int = 0
    malformed: int = 0
    pruned: int = 0
    backlog: int = 0
    seconds: float = 0.0


@dataclass
class _Tally:
    lookups: int = 0
    hits: int = 0
    misses: int = 0
    shadow_hits: int = 0
    stores: int = 0
    refusals: int = 0
    bypasses: int = 0
    tokens_avoided: int = 0
    cost_avoided: Decimal = field(default_factory=Decimal)
    latency_avoided_ms: float = 0.0


_RESULT_COUNTER = {
    "hit": "hits",
    "miss": "misses",
    "shadow_hit": "shadow_hits",
    "store": "stores",
    "refused": "refusals",
    "bypass": "bypasses",
}


def _record_from_event(event_id: str, fields: dict[str, str], prices: dict):
    from .models import UsageRecord

    result = fields["r"]
    if result not in _RESULT_COUNTER:
        raise ValueError(f"unknown result {result!r}")
    ts = datetime.fromtimestamp(int(fields["t"]) / 1_000_000, timezone.utc)
    tokens = 0
    cost = Decimal(0)
    latency_avoided = 0.0
    if result == "hit" and fields.get("e"):
        meta = json.loads(fields["e"])
        prompt_tokens, completion_tokens = int(meta.get("pt") or 0), int(meta.get("ct") or 0)
        tokens = prompt_tokens + completion_tokens
        if meta.get("cost") is not None:
            cost = Decimal(meta["cost"])
        else:
            price = prices.get(fields.get("m") or meta.get("model"))
            if price is not None:
                cost = price.cost(prompt_tokens, completion_tokens)
        if meta.get("lat") is not None:
            latency_avoided = max(0.0, float(meta["lat"]) - int(fields.get("w") or 0) / 1000)
    return UsageRecord(
        event_id=event_id,
        ts=ts,
        policy=fields.get("p", "")[:64],
        result=result,
        model=fields.get("m", "")[:128],
        scope_hash=fields.get("s", "")[:32],
        key_hash=fields.get("k", "")[:32],
        reason=fields.get("x", "")[:32],
        tokens_avoided=tokens,
        cost_avoided=cost.quantize(Decimal("0.000001")),
        latency_avoided_ms=latency_avoided,
    )


def _period_starts(ts: datetime) -> tuple[datetime, datetime]:
    hour = ts.replace(minute=0, second=0, microsecond=0)
    return hour, hour.replace(hour=0)


def _rollup(records) -> None:
    from .models import UsageRollup

    tallies: dict[tuple, _Tally] = defaultdict(_Tally)
    for record in records:
        hour, day = _period_starts(record.ts)
        for period in ((hour, UsageRollup.Granularity.HOUR), (day, UsageRollup.Granularity.DAY)):
            tally = tallies[(*period, record.policy, record.model)]
            counter = _RESULT_COUNTER[record.result]
            setattr(tally, counter, getattr(tally, counter) + 1)
            if record.result in LOOKUP_RESULTS:
                tally.lookups += 1
            tally.tokens_avoided += record.tokens_avoided
            tally.cost_avoided += record.cost_avoided
            tally.latency_avoided_ms += record.latency_avoided_ms
    for (period_start, granularity, policy, model), tally in tallies.items():
        values = vars(tally)
        updated = UsageRollup.objects.filter(
            period_start=period_start, granularity=granularity, policy=policy, model=model
        ).update(**{name: F(name) + value for name, value in values.items()})
        if not updated:
            UsageRollup.objects.create(
                period_start=period_start, granularity=granularity, policy=policy, model=model, **values
            )


def ingest(entries: list[tuple[str, dict[str, str]]], result: AggregationResult) -> None:
    """Write one batch of events and its rollup increments, atomically. Events already in
    the database (a re-delivery after a crash before acknowledge) are skipped."""
    from .models import ModelPrice, UsageRecord

    prices = {p.model: p for p in ModelPrice.objects.all()}
    with transaction.atomic():
        ids = [event_id for event_id, _ in entries]
        seen = set(UsageRecord.objects.filter(event_id__in=ids).values_list("event_id", flat=True))
        records = []
        for event_id, fields in entries:
            if event_id in seen:
                result.duplicates += 1
                continue
            try:
                records.append(_record_from_event(event_id, fields, prices))
            except (KeyError, ValueError, TypeError, InvalidOperation, ArithmeticError) as exc:
                result.malformed += 1
                logger.warning("ragcache: dropping malformed usage event %s (%s)", event_id, type(exc).__name__)
        UsageRecord.objects.bulk_create(records, batch_size=2000)
        _rollup(records)
        result.ingested += len(records)


def aggregate(max_events: int | None = None) -> AggregationResult:
    """Move pending usage events into the database; safe to run concurrently and again."""
    config = get_config()
    result = AggregationResult()
    started = time.perf_counter()
    lock_key, token = store.aggregation_lock_key(), store.new_token()
    timeout = float(config["AGGREGATION_LOCK_TIMEOUT"])
    if not store.acquire_lock(lock_key, token, timeout):
        result.status = "busy"
        metrics.AGGREGATION_RUNS.labels("busy").inc()
        return result
    try:
        store.ensure_group()
        batch = int(config["AGGREGATE_BATCH"])
        # Under the lock no other aggregation is reading, so every pending event belongs to
        # a run that died before acknowledging: take them first, then new ones.
        for read in (store.claim_pending, store.read_new):
            while max_events is None or result.ingested + result.duplicates < max_events:
                entries = read(token, batch)
                if not entries:
                    break
                ingest(entries, result)
                store.acknowledge([event_id for event_id, _ in entries])
                metrics.AGGREGATED_EVENTS.inc(len(entries))
                store.extend_lock(lock_key, token, timeout)
        result.pruned = prune()
        result.backlog = store.backlog()
        metrics.USAGE_BACKLOG.set(result.backlog)
    except Exception:
        metrics.AGGREGATION_RUNS.labels("error").inc()
        raise
    finally:
        try:
            store.unlock(lock_key, token)
        except store.RedisUnavailable:
            pass  # the lock expires by itself
    result.seconds = time.perf_counter() - started
    metrics.AGGREGATION_RUNS.labels("ok").inc()
    metrics.AGGREGATION_SECONDS.observe(result.seconds)
    store.record_aggregation(time.time())
    return result


def prune() -> int:
    from .models import UsageRecord

    cutoff = dj_timezone.now() - timedelta(days=int(get_config()["RETENTION_DAYS"]))
    deleted, _ = UsageRecord.objects.filter(ts__lt=cutoff).delete()
    return deleted
