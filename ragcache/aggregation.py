"""Aggregation: usage events from every shard's stream into ``UsageRecord`` and ``UsageRollup``.

Each shard's stream is read through one consumer group by one consumer (the aggregation
lock lets one run at a time). A batch's records (unique on shard and stream id) and its
rollup increments are written in one transaction; only then are the events acknowledged
and deleted: at-least-once delivery, exactly-once effect. A run killed mid-batch leaves
its events pending; the next run reads them first.

Costs are summed as exact decimals (12 places) from the events' own figures, never from
rounded ones, so rollups, reports and the ``ragcache_cost_avoided_total`` metric agree.
"""
from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import NamedTuple

from django.db import IntegrityError, connection, transaction
from django.db.models import F
from django.utils import timezone as dj_timezone

from . import metrics, store
from .conf import get_config
from .entries import CorruptEntry, parse_meta
from .usage import parse_header

logger = logging.getLogger("ragcache.usage")

LOOKUP_RESULTS = ("hit", "miss", "shadow_hit", "stale_source")
_PLACES = Decimal("0.000000000001")
MAX_ROW_TOKENS = 2**62


@dataclass
class AggregationResult:
    status: str = "ok"  # ok | busy
    ingested: int = 0
    duplicates: int = 0
    malformed: int = 0
    voided: int = 0
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
    stale_sources: int = 0
    stores: int = 0
    refusals: int = 0
    bypasses: int = 0
    unknown_usage_hits: int = 0
    tokens_avoided: int = 0
    cost_avoided: Decimal = field(default_factory=Decimal)
    latency_avoided_ms: float = 0.0


_RESULT_COUNTER = {
    "hit": "hits",
    "miss": "misses",
    "shadow_hit": "shadow_hits",
    "stale_source": "stale_sources",
    "store": "stores",
    "refused": "refusals",
    "bypass": "bypasses",
}


class _Row(NamedTuple):
    """One UsageRecord's column values: a batch is written with COPY (or bulk_create)."""

    event_id: str
    ts: datetime
    policy: str
    result: str
    model: str
    scope_hash: str
    key_hash: str
    reason: str
    gateway_key: str
    tokens_avoided: int
    usage_known: bool
    cost_avoided: Decimal
    latency_avoided_ms: float


def _text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _event_time(entry_id: str) -> datetime:
    return datetime.fromtimestamp(int(entry_id.split("-", 1)[0]) / 1000, UTC)


def row_from_event(shard: int, entry_id: str, fields: dict, prices: dict) -> _Row:
    """One event as a record; raises ValueError (or KeyError) for a malformed event. A hit
    whose entry metadata does not validate is a miss (reason ``corrupt``): the client
    found it unreadable too, and called the LLM."""
    result = _text(fields[b"r"])
    if result not in _RESULT_COUNTER:
        raise ValueError(f"unknown result {result[:32]!r}")
    policy, model, scope, key, gateway_key = parse_header(_text(fields[b"h"]))
    reason = _text(fields.get(b"x", b""))
    tokens, cost, latency_avoided, known = 0, Decimal(0), 0.0, True
    if result == "hit":
        try:
            meta = parse_meta(fields[b"e"])
        except (CorruptEntry, KeyError):
            result, reason = "miss", "corrupt"
        else:
            known = meta.usage.known
            tokens = meta.usage.total
            if meta.cost is not None:
                cost = meta.cost
            elif known:
                price = prices.get(model) or prices.get(meta.model)
                if price is not None:
                    cost = price.cost(meta.usage.prompt_tokens, meta.usage.completion_tokens,
                                      meta.usage.cached_prompt_tokens)
            waited_ms = int(_text(fields.get(b"w", b"0")) or 0) / 1000
            if meta.latency_ms is not None:
                latency_avoided = max(0.0, meta.latency_ms - waited_ms)
    return _Row(
        f"{shard}-{entry_id}", _event_time(entry_id), policy[:64], result, model[:128], scope[:32], key[:32],
        reason[:32], gateway_key[:64], tokens, known, cost.quantize(_PLACES), latency_avoided,
    )


class _Batch:
    """A batch's events parsed as they are written: iterating yields rows to write and keeps
    them in ``records``; events already written (``seen``), malformed ones and voids
    (corrections of a hit found corrupt by its client) are set aside."""

    def __init__(self, events: list, seen: set[str], prices: dict) -> None:
        self.events, self.seen, self.prices = events, seen, prices
        self.records: list[_Row] = []
        self.duplicates = 0
        self.malformed: list[tuple[str, str]] = []
        self.voids: list[str] = []  # event ids of hits to turn into misses

    def __iter__(self):
        voids = {f"{shard}-{_text(fields[b'ref'])}" for shard, _, fields in self.events
                 if fields and fields.get(b"r") == b"void" and b"ref" in fields}
        for shard, entry_id, fields in self.events:
            event_id = f"{shard}-{entry_id}"
            if event_id in self.seen:
                self.duplicates += 1
                continue
            if fields is None:
                continue  # deleted while pending
            if fields.get(b"r") == b"void":
                ref = f"{shard}-{_text(fields.get(b'ref', b''))}"
                if not any(row.event_id == ref for row in self.records):
                    self.voids.append(ref)  # the hit was aggregated in an earlier batch
                continue
            try:
                row = row_from_event(shard, entry_id, fields, self.prices)
            except (KeyError, ValueError, TypeError, ArithmeticError, OSError) as exc:
                self.malformed.append((event_id, type(exc).__name__))
                continue
            if row.event_id in voids and row.result == "hit":
                row = row._replace(result="miss", reason="corrupt", tokens_avoided=0, cost_avoided=Decimal(0),
                                   latency_avoided_ms=0.0)
            self.records.append(row)
            yield row


def _tallies(rows) -> dict[tuple, UsageTally]:
    """Hour and day tallies per (policy, model, gateway key) of some records."""
    from .models import UsageRollup

    sums: dict[tuple, list] = {}
    for row in rows:
        ts = row.ts
        key = (ts.year, ts.month, ts.day, ts.hour, row.policy, row.model, row.gateway_key, row.result,
               row.usage_known)
        found = sums.get(key)
        if found is None:
            sums[key] = [1, row.tokens_avoided, row.cost_avoided, row.latency_avoided_ms]
        else:
            found[0] += 1
            found[1] += row.tokens_avoided
            found[2] += row.cost_avoided
            found[3] += row.latency_avoided_ms
    tallies: dict[tuple, UsageTally] = defaultdict(UsageTally)
    for (year, month, day, hour_of_day, policy, model, gateway_key, result, known), (count, tokens, cost,
                                                                                     latency) in sums.items():
        hour = datetime(year, month, day, hour_of_day, tzinfo=UTC)
        for period in ((hour, UsageRollup.Granularity.HOUR), (hour.replace(hour=0), UsageRollup.Granularity.DAY)):
            tally = tallies[(*period, policy, model, gateway_key)]
            counter = _RESULT_COUNTER[result]
            setattr(tally, counter, getattr(tally, counter) + count)
            if result in LOOKUP_RESULTS:
                tally.lookups += count
            if result == "hit" and not known:
                tally.unknown_usage_hits += count
            tally.tokens_avoided += tokens
            tally.cost_avoided += cost
            tally.latency_avoided_ms += latency
    return tallies


_ROLLUP_KEY = ("period_start", "granularity", "policy", "model", "gateway_key")
_ROLLUP_SUMS = tuple(f.name for f in dataclass_fields(UsageTally))


def _upsert_rollups(tallies: dict[tuple, UsageTally]) -> None:
    """Add the tallies to their rollup rows, creating missing rows: one INSERT ... ON
    CONFLICT DO UPDATE per 500 rows (PostgreSQL and SQLite), values prepared as the ORM
    would send them."""
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
        values = (*key, *(getattr(tally, name) for name in _ROLLUP_SUMS))
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


def _insert_records(rows) -> None:
    from .models import UsageRecord

    with connection.cursor() as cursor:
        raw = getattr(cursor, "cursor", None)
        if connection.vendor == "postgresql" and hasattr(raw, "copy"):
            # psycopg 3's COPY: several times faster than INSERT for thousands of rows.
            meta, quote = UsageRecord._meta, connection.ops.quote_name
            columns = ", ".join(quote(meta.get_field(name).column) for name in _Row._fields)
            sql = f"COPY {quote(meta.db_table)} ({columns}) FROM STDIN"
            # wrap_database_errors: a duplicate must raise Django's IntegrityError.
            with connection.wrap_database_errors, raw.copy(sql) as copy:
                for row in rows:
                    copy.write_row(row)
            return
    UsageRecord.objects.bulk_create([UsageRecord(**row._asdict()) for row in rows], batch_size=2000)


def _void_aggregated(event_ids: list[str]) -> int:
    """Turn hits already aggregated into misses (their client found the entry corrupt),
    taking their figures out of the rollups. Idempotent: a record is only turned once."""
    from .models import UsageRecord, UsageRollup

    voided = 0
    for record in UsageRecord.objects.filter(event_id__in=event_ids, result="hit"):
        hour = record.ts.replace(minute=0, second=0, microsecond=0)
        for start, granularity in ((hour, "hour"), (hour.replace(hour=0), "day")):
            UsageRollup.objects.filter(
                period_start=start, granularity=granularity, policy=record.policy, model=record.model,
                gateway_key=record.gateway_key,
            ).update(
                hits=F("hits") - 1, misses=F("misses") + 1, tokens_avoided=F("tokens_avoided") - record.tokens_avoided,
                cost_avoided=F("cost_avoided") - record.cost_avoided,
                latency_avoided_ms=F("latency_avoided_ms") - record.latency_avoided_ms,
                unknown_usage_hits=F("unknown_usage_hits") - (0 if record.usage_known else 1),
            )
        UsageRecord.objects.filter(pk=record.pk).update(result="miss", reason="corrupt", tokens_avoided=0,
                                                         cost_avoided=0, latency_avoided_ms=0)
        voided += 1
    return voided


def ingest(events: list[tuple[int, str, dict]], result: AggregationResult) -> None:
    """Write one batch of events and its rollup increments, atomically. Events already in
    the database (re-delivered after a crash before acknowledge) are skipped."""
    from .models import ModelPrice, UsageRecord

    prices = {p.model: p for p in ModelPrice.objects.all()}
    with transaction.atomic():
        batch = _Batch(events, set(), prices)
        try:
            with transaction.atomic():
                _insert_records(batch)
        except IntegrityError:
            ids = [f"{shard}-{entry_id}" for shard, entry_id, _ in events]
            seen = set(UsageRecord.objects.filter(event_id__in=ids).values_list("event_id", flat=True))
            batch = _Batch(events, seen, prices)
            _insert_records(batch)
        _upsert_rollups(_tallies(batch.records))
        if batch.voids:
            result.voided += _void_aggregated(batch.voids)
    for event_id, error in batch.malformed:
        logger.warning("ragcache: dropping malformed usage event %s (%s)", event_id, error)
    result.duplicates += batch.duplicates
    result.malformed += len(batch.malformed)
    result.ingested += len(batch.records)


_groups_ready: set[str] = set()


def aggregate(max_events: int | None = None) -> AggregationResult:
    """Move pending usage events into the database; safe to run concurrently and again.
    Raises ``store.RedisUnavailable`` when Redis cannot be read, and database errors."""
    config = get_config()
    result = AggregationResult()
    started = time.perf_counter()
    layout = store.current_layout()
    token = store.new_token()
    timeout = float(config["AGGREGATION_LOCK_TIMEOUT"])
    if not store.acquire_lock(layout.aggregation_lock, token, timeout):
        result.status = "busy"
        metrics.AGGREGATION_RUNS.labels("busy").inc()
        return result
    try:
        if layout.root not in _groups_ready:
            store.ensure_groups()
            _groups_ready.add(layout.root)
        batch = int(config["AGGREGATE_BATCH"])
        # Pending events first (a run that died before acknowledging), then new ones.
        for pending in (True, False):
            while max_events is None or result.ingested + result.duplicates < max_events:
                try:
                    events = store.read_events(batch, pending)
                except store.RedisCommandError as exc:
                    if "NOGROUP" not in str(exc):
                        raise
                    store.ensure_groups()  # Redis restarted: the groups went with it
                    events = store.read_events(batch, pending)
                if not events:
                    break
                ingest(events, result)
                by_shard: dict[int, list[str]] = defaultdict(list)
                for shard, entry_id, _ in events:
                    by_shard[shard].append(entry_id)
                store.acknowledge(by_shard)
                metrics.AGGREGATED_EVENTS.inc(len(events))
                store.extend_lock(layout.aggregation_lock, token, timeout)
        result.pruned = prune()
        result.backlog = store.backlog()
    except Exception:
        metrics.AGGREGATION_RUNS.labels("error").inc()
        raise
    finally:
        store.release_lock(layout.aggregation_lock, token)
    result.seconds = time.perf_counter() - started
    metrics.AGGREGATION_RUNS.labels("ok").inc()
    metrics.AGGREGATION_SECONDS.observe(result.seconds)
    now = time.time()
    store.record_aggregation(now)
    metrics.LAST_AGGREGATION.set(now)
    return result


def prune() -> int:
    from .models import UsageRecord

    cutoff = dj_timezone.now() - timedelta(days=int(get_config()["RETENTION_DAYS"]))
    deleted, _ = UsageRecord.objects.filter(ts__lt=cutoff).delete()
    return deleted
