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
import math
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import NamedTuple

from django.db import IntegrityError, connection, transaction
from django.utils import timezone as dj_timezone

from . import metrics, store
from .conf import get_config
from .policies import registry
from .steplog import log_step
from .steplog import logger as step_logger

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
            metrics.child(metrics.TOKENS_AVOIDED, event.policy, model).inc(event.tokens_avoided)
            if event.cost_avoided:
                metrics.child(metrics.COST_AVOIDED, event.policy, model).inc(float(event.cost_avoided))
            if step_logger.isEnabledFor(logging.INFO):
                log_step(63, self._attrs(event))
        elif step_logger.isEnabledFor(logging.DEBUG):
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
class UsageTally:
    """The additive figures of a rollup row (and of a report row)."""

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


# Column limits of UsageRecord (PostgreSQL enforces them): integer, and numeric(14, 6).
MAX_TOKENS = 2**31 - 1
MAX_COST = Decimal("99999999")


class _Row(NamedTuple):
    """One UsageRecord's column values. A batch of thousands is written with COPY (or
    bulk_create), so no model instance is built per event."""

    event_id: str
    ts: datetime
    policy: str
    result: str
    model: str
    scope_hash: str
    key_hash: str
    reason: str
    tokens_avoided: int
    cost_avoided: Decimal
    latency_avoided_ms: float


_MICRO = Decimal("0.000001")


def _record_from_event(event_id: str, fields: dict[str, str], prices: dict) -> _Row:
    result = fields["r"]
    if result not in _RESULT_COUNTER:
        raise ValueError(f"unknown result {result!r}")
    ts = datetime.fromtimestamp(int(fields["t"]) / 1_000_000, UTC)
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
    if not (0 <= tokens <= MAX_TOKENS and cost.is_finite() and 0 <= cost <= MAX_COST
            and math.isfinite(latency_avoided)):
        # Figures the columns cannot hold (a provider's absurd usage block, or bytes planted
        # in Redis) would fail this batch on every run; keep the event, drop the figures.
        logger.warning("ragcache: usage event %s has out-of-range figures; recorded with none avoided", event_id)
        tokens, cost, latency_avoided = 0, Decimal(0), 0.0
    return _Row(
        event_id,
        ts,
        fields.get("p", "")[:64],
        result,
        fields.get("m", "")[:128],
        fields.get("s", "")[:32],
        fields.get("k", "")[:32],
        fields.get("x", "")[:32],
        tokens,
        cost.quantize(_MICRO),
        latency_avoided,
    )


def _period_starts(ts: datetime) -> tuple[datetime, datetime]:
    hour = ts.replace(minute=0, second=0, microsecond=0)
    return hour, hour.replace(hour=0)


def _rollup(records) -> None:
    from .models import UsageRollup

    # Sum per (hour, policy, model, result) first, one dict update per record, keyed by
    # plain ints (hashing aware datetimes is slow); then fold those few sums into hour and
    # day tallies. Only hits carry figures, so other records just count.
    sums: dict[tuple, list] = {}
    for _, ts, policy, result, model, _, _, _, tokens, cost, latency in records:
        key = (ts.year, ts.month, ts.day, ts.hour, policy, model, result)
        found = sums.get(key)
        if found is None:
            sums[key] = [1, tokens, cost, latency]
        else:
            found[0] += 1
            if tokens or cost or latency:
                found[1] += tokens
                found[2] += cost
                found[3] += latency
    tallies: dict[tuple, UsageTally] = defaultdict(UsageTally)
    for key, (count, tokens, cost, latency) in sums.items():
        year, month, day, hour_of_day, policy, model, result = key
        hour = datetime(year, month, day, hour_of_day, tzinfo=UTC)
        for period in ((hour, UsageRollup.Granularity.HOUR), (hour.replace(hour=0), UsageRollup.Granularity.DAY)):
            tally = tallies[(*period, policy, model)]
            counter = _RESULT_COUNTER[result]
            setattr(tally, counter, getattr(tally, counter) + count)
            if result in LOOKUP_RESULTS:
                tally.lookups += count
            tally.tokens_avoided += tokens
            tally.cost_avoided += cost
            tally.latency_avoided_ms += latency
    _upsert_rollups(tallies)


_ROLLUP_KEY = ("period_start", "granularity", "policy", "model")
_ROLLUP_SUMS = tuple(f.name for f in dataclass_fields(UsageTally))


def _upsert_rollups(tallies: dict[tuple, UsageTally]) -> None:
    """Add the tallies to their rollup rows, creating missing rows: one INSERT ... ON
    CONFLICT DO UPDATE per 500 rows (PostgreSQL and SQLite) instead of an UPDATE, and
    maybe an INSERT, per row. Values go through each field's get_db_prep_save, as the
    ORM would send them."""
    from .models import UsageRollup

    if not tallies:
        return
    meta, quote = UsageRollup._meta, connection.ops.quote_name
    table = quote(meta.db_table)
    names = _ROLLUP_KEY + _ROLLUP_SUMS
    model_fields = [meta.get_field(name) for name in names]
    columns = [quote(f.column) for f in model_fields]
    key_columns = ", ".join(columns[:len(_ROLLUP_KEY)])
    increments = ", ".join(f"{c} = {table}.{c} + EXCLUDED.{c}" for c in columns[len(_ROLLUP_KEY):])
    rows = []
    for key, tally in tallies.items():
        values = (*key, *vars(tally).values())
        rows.append([f.get_db_prep_save(value, connection) for f, value in zip(model_fields, values, strict=True)])
    placeholders = "(" + ", ".join(["%s"] * len(names)) + ")"
    with connection.cursor() as cursor:
        for start in range(0, len(rows), 500):
            chunk = rows[start:start + 500]
            cursor.execute(
                f"INSERT INTO {table} ({', '.join(columns)}) VALUES {', '.join([placeholders] * len(chunk))} "
                f"ON CONFLICT ({key_columns}) DO UPDATE SET {increments}",
                [value for row in chunk for value in row],
            )


def _insert_records(rows: Iterable[_Row]) -> None:
    from .models import UsageRecord

    with connection.cursor() as cursor:
        raw = getattr(cursor, "cursor", None)
        if connection.vendor == "postgresql" and hasattr(raw, "copy"):
            # psycopg 3's COPY: several times faster than INSERT for thousands of rows, and
            # it streams: the server indexes the first rows while later ones are parsed.
            meta, quote = UsageRecord._meta, connection.ops.quote_name
            columns = ", ".join(quote(meta.get_field(name).column) for name in _Row._fields)
            # wrap_database_errors: the raw cursor would raise psycopg's own UniqueViolation,
            # which ingest()'s `except IntegrityError` (re-delivered events) never catches.
            sql = f"COPY {quote(meta.db_table)} ({columns}) FROM STDIN"
            with connection.wrap_database_errors, raw.copy(sql) as copy:
                for row in rows:
                    copy.write_row(row)
            return
    UsageRecord.objects.bulk_create([UsageRecord(**row._asdict()) for row in rows], batch_size=2000)


def ingest(entries: list[tuple[str, dict[str, str]]], result: AggregationResult) -> None:
    """Write one batch of events and its rollup increments, atomically. Events already in
    the database (a re-delivery after a crash before acknowledge) are skipped."""
    from .models import ModelPrice, UsageRecord

    prices = {p.model: p for p in ModelPrice.objects.all()}
    with transaction.atomic():
        # Usually no event of a batch is in the database yet: write them all at once, and
        # look up the ones already written (a re-delivery after a crash before acknowledge)
        # only when the unique event_id says there are some. Saves a query over thousands
        # of ids per batch; the outcome is the same either way.
        batch = _Batch(entries, set(), prices)
        try:
            with transaction.atomic():
                _insert_records(batch)
        except IntegrityError:
            ids = [event_id for event_id, _ in entries]
            seen = set(UsageRecord.objects.filter(event_id__in=ids).values_list("event_id", flat=True))
            batch = _Batch(entries, seen, prices)
            _insert_records(batch)
        _rollup(batch.records)
    for event_id, error in batch.malformed:
        logger.warning("ragcache: dropping malformed usage event %s (%s)", event_id, error)
    result.duplicates += batch.duplicates
    result.malformed += len(batch.malformed)
    result.ingested += len(batch.records)


class _Batch:
    """A batch's events parsed as they are written: iterating yields the rows to write and
    keeps them in ``records``; events already written (``seen``) and malformed ones are
    counted instead."""

    def __init__(self, entries, seen: set[str], prices: dict) -> None:
        self.entries, self.seen, self.prices = entries, seen, prices
        self.records: list[_Row] = []
        self.duplicates = 0
        self.malformed: list[tuple[str, str]] = []  # (event id, error)

    def __iter__(self) -> Iterator[_Row]:
        for event_id, fields in self.entries:
            if event_id in self.seen:
                self.duplicates += 1
                continue
            try:
                row = _record_from_event(event_id, fields, self.prices)
            except (KeyError, ValueError, TypeError, InvalidOperation, ArithmeticError, OSError,
                    RecursionError) as exc:
                self.malformed.append((event_id, type(exc).__name__))
                continue
            self.records.append(row)
            yield row


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
        store.unlock(lock_key, token)
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
