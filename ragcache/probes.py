"""What /metrics and /ragcache/health read while they serve a request: the state of Redis,
the database and the Celery broker, taken by the process that answers.

Each value is either read or unknown. Unknown is ``None`` here and no sample in /metrics,
never a number: an unknown "last aggregation" exported as 0 reads as a run in 1970, and
an unreadable backlog exported as 0 reads as an empty one.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import redis
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily

from . import connection, metrics, store

T = TypeVar("T")

BROKER_TIMEOUT = 1.0  # seconds: a scrape must answer within Prometheus' scrape timeout


@dataclass(frozen=True)
class RedisState:
    """Redis as one request saw it. ``error`` is an exception class name (never an address).
    ``masters_full``: masters at maxmemory under ``noeviction``, which refuse writes.
    ``lag_s``: age of the oldest usage event not yet aggregated (0.0 when none waits)."""

    up: bool
    latency_s: float | None = None
    error: str | None = None
    backlog: int | None = None
    lag_s: float | None = None
    last_aggregation: float | None = None
    masters_full: int | None = None
    masters_up: int | None = None  # Redis Cluster: masters that answered, and those that did not
    masters_down: int | None = None


@dataclass(frozen=True)
class ServiceState:
    """The database or the broker: reachable or not, and the exception's class name."""

    up: bool
    error: str | None = None


@dataclass(frozen=True)
class Readings:
    redis: RedisState
    database: ServiceState
    broker: ServiceState | None  # None: no Celery broker configured


def read() -> Readings:
    """Read everything once; each part bounded by its own timeout."""
    return Readings(read_redis(), read_database(), read_broker())


def _known(read_one: Callable[[], T]) -> T | None:
    try:
        return read_one()
    except (store.RedisUnavailable, redis.RedisError, OSError):
        return None


def read_redis() -> RedisState:
    """A PING (past the circuit breaker, so the answer is about Redis now), then the usage
    stream state and the masters' memory, each None if it could not be read."""
    try:
        latency = store.ping()
    except store.RedisUnavailable as exc:
        metrics.REDIS_UP.set(0)
        return RedisState(up=False, error=type(exc.__cause__ or exc).__name__)
    metrics.REDIS_UP.set(1)
    masters = _known(masters_reachable)
    return RedisState(
        up=True,
        latency_s=latency,
        backlog=_known(store.backlog),
        lag_s=_known(usage_lag),
        last_aggregation=_known(store.last_aggregation),
        masters_full=_known(masters_full),
        masters_up=masters[0] if masters else None,
        masters_down=masters[1] if masters else None,
    )


def masters_reachable() -> tuple[int, int] | None:
    """(masters that answered, masters that did not) on a Redis Cluster, by the cluster's
    current slot map; None on a standalone Redis, which ragcache_redis_up describes alone."""
    if not connection.cluster_mode():
        return None
    nodes = store.nodes()
    up = sum(1 for node in nodes if node.get("up"))
    return up, len(nodes) - up


def usage_lag() -> float:
    """Seconds since the oldest usage event not yet aggregated was written, by the Redis
    clock (stream ids are its milliseconds); 0.0 when every stream is empty. Aggregation
    deletes events once they are in the database, so a stream's first entry is the oldest
    one still waiting. Raises RedisUnavailable."""

    def read() -> float:
        client = connection.client("bulk")
        pipe = client.pipeline(transaction=False)
        for stream in store.current_layout().streams:
            pipe.xrange(stream, count=1)
        oldest = min((_id_ms(entries[0][0]) for entries in pipe.execute() if entries), default=None)
        if oldest is None:
            return 0.0
        seconds, microseconds = client.time()
        return max(0.0, (int(seconds) * 1000 + int(microseconds) // 1000 - oldest) / 1000)

    return store.guarded(read)


def _id_ms(entry_id: Any) -> int:
    text = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    return int(text.split("-", 1)[0])


def masters_full() -> int | None:
    """How many masters refuse writes for memory (used_memory at maxmemory under the
    ``noeviction`` policy); None if no master's memory could be read. Under an eviction
    policy a master at maxmemory evicts and keeps accepting writes: that is a full cache
    working as designed, not an outage."""
    nodes = [node for node in store.nodes() if node.get("up")]
    if not nodes:
        return None
    return sum(1 for node in nodes if node.get("full") and node.get("maxmemory_policy") == "noeviction")


def read_database() -> ServiceState:
    """Read ragcache's flags row, as a policy load would. A connection broken by an earlier
    outage is replaced once before the database is called unreachable."""
    from django.db import DatabaseError, connections, router

    from .models import CacheFlags

    alias = router.db_for_read(CacheFlags)
    error = "DatabaseError"
    for attempt in (1, 2):
        try:
            CacheFlags.objects.using(alias).filter(pk=1).exists()
            return ServiceState(True)
        except DatabaseError as exc:
            error = type(exc).__name__
            db = connections[alias]
            if attempt == 2 or db.in_atomic_block:
                break
            try:
                db.close()
            except DatabaseError:
                pass
    return ServiceState(False, error)


def read_broker() -> ServiceState | None:
    """Connect to the Celery broker beat publishes to (``broker_write_url`` or
    ``broker_url``) within BROKER_TIMEOUT; None when the project configures none."""
    try:
        from celery import current_app
    except ImportError:
        return None
    conf = current_app.conf
    if not (conf.broker_write_url or conf.broker_url):
        return None
    try:
        with current_app.connection_for_write(
            connect_timeout=BROKER_TIMEOUT,
            transport_options={"socket_connect_timeout": BROKER_TIMEOUT, "socket_timeout": BROKER_TIMEOUT},
        ) as conn:
            conn.ensure_connection(max_retries=0, interval_start=0, interval_step=0, timeout=BROKER_TIMEOUT)
    except Exception as exc:  # noqa: BLE001 - any transport's failure means "not reachable"
        return ServiceState(False, type(exc).__name__)
    return ServiceState(True)


# --- /metrics ----------------------------------------------------------------------------

def gauge_values(readings: Readings) -> dict[str, float | None]:
    """The SCRAPE_GAUGES' values of one scrape; None: no sample."""
    r = readings.redis
    return {
        "ragcache_redis_up": 1.0 if r.up else 0.0,
        "ragcache_redis_masters_full": r.masters_full,
        "ragcache_usage_backlog": r.backlog,
        "ragcache_usage_lag_seconds": r.lag_s,
        "ragcache_last_aggregation_timestamp_seconds": r.last_aggregation,
        "ragcache_database_up": 1.0 if readings.database.up else 0.0,
        "ragcache_broker_up": None if readings.broker is None else (1.0 if readings.broker.up else 0.0),
        "ragcache_redis_masters_up": r.masters_up,
        "ragcache_redis_masters_down": r.masters_down,
    }


class ScrapeCollector:
    """One scrape's readings as gauge families: known values only."""

    def __init__(self, values: dict[str, float | None]) -> None:
        self.values = values

    def describe(self) -> list[GaugeMetricFamily]:
        return [GaugeMetricFamily(name, text) for name, text in metrics.SCRAPE_GAUGES.items()]

    def collect(self) -> Iterable[GaugeMetricFamily]:
        for name, text in metrics.SCRAPE_GAUGES.items():
            value = self.values.get(name)
            if value is not None:
                yield GaugeMetricFamily(name, text, value=float(value))


class _ProcessRegistry:
    """This process's default registry without the families a scrape reads afresh."""

    def __init__(self, skip: set[str]) -> None:
        self.skip = skip

    def collect(self) -> Iterable[Any]:
        for family in REGISTRY.collect():
            if family.name not in self.skip:
                yield family


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir")


def exposition(readings: Readings) -> bytes:
    """The /metrics body: every process's counters and histograms (multiprocess mode: the
    files of PROMETHEUS_MULTIPROC_DIR; else this process's registry) plus this scrape's
    readings, which were taken by the process answering, now."""
    registry = CollectorRegistry(auto_describe=False)
    if multiprocess_dir():
        from prometheus_client import multiprocess

        multiprocess.MultiProcessCollector(registry)
    else:
        registry.register(_ProcessRegistry(set(metrics.SCRAPE_GAUGES)))
    registry.register(ScrapeCollector(gauge_values(readings)))
    return generate_latest(registry)


def age(timestamp: float | None) -> float | None:
    return None if timestamp is None else round(time.time() - timestamp, 1)
