"""ragcache's Prometheus metrics, defined once.

Labels are bounded: policy names (admin-defined, few) and model names (capped to
``RAGCACHE['METRICS_MODELS']`` when set, else to the first 50 seen, then "other").
Never a user, scope, key or prompt.
"""
from __future__ import annotations

import threading
from typing import Any

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from .conf import get_config

LOOKUPS = Counter(
    "ragcache_lookups",
    "Cache lookups by policy and result (hit, miss, shadow_hit, stale_source, bypass, error).",
    ["policy", "result"],
)
STORES = Counter(
    "ragcache_stores", "Store attempts by policy and result (stored, refused, error).", ["policy", "result"]
)
REFUSALS = Counter("ragcache_refusals", "Answers refused for storage, by reason.", ["policy", "reason"])
LOOKUP_SECONDS = Histogram(
    "ragcache_lookup_seconds", "Time of a cache lookup, including the Redis round trip.", ["policy"],
    buckets=(0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)
TOKENS_AVOIDED = Counter(
    "ragcache_tokens_avoided", "Input (cached input included) and output tokens not paid for thanks to hits.",
    ["policy", "model"],
)
COST_AVOIDED = Counter("ragcache_cost_avoided", "Cost (entry's currency) not paid thanks to hits.", ["policy", "model"])
ENTRY_BYTES = Histogram(
    "ragcache_entry_bytes", "Size of stored entries (after compression).",
    buckets=(256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304),
)


class KnownGauge:
    """A label-less gauge with no sample until its value is known.

    prometheus_client's ``Gauge`` exports 0 from the moment it exists (in multiprocess
    mode, 0 for each process that never set it, under "max", "sum" or "all"): "unknown"
    as a number, which a rule takes for the truth (a last run in 1970). This one exports
    nothing until ``set()`` and nothing again after ``clear()``. It lives in this
    process's memory only, never in the multiprocess files; /metrics exports the
    scraping process's own readings instead (``SCRAPE_GAUGES``, ``ragcache.probes``)."""

    def __init__(self, name: str, documentation: str, registry=REGISTRY) -> None:
        self.name, self.documentation = name, documentation
        self._value: float | None = None
        if registry is not None:
            registry.register(self)

    def set(self, value: float) -> None:
        self._value = float(value)

    def clear(self) -> None:
        self._value = None

    def get(self) -> float | None:
        return self._value

    def describe(self) -> list[GaugeMetricFamily]:
        return [GaugeMetricFamily(self.name, self.documentation)]

    def collect(self) -> list[GaugeMetricFamily]:
        value = self._value
        return [] if value is None else [GaugeMetricFamily(self.name, self.documentation, value=value)]


# What one /metrics request reads from Redis, the database and the broker, in the process
# that serves it (ragcache.probes). A value the scrape could not read has no sample.
SCRAPE_GAUGES: dict[str, str] = {
    "ragcache_redis_up": "1 if Redis answered (at /metrics: this scrape's PING), else 0; no sample before any call.",
    "ragcache_redis_masters_full": "Redis masters at maxmemory under the noeviction policy (they refuse writes).",
    "ragcache_usage_backlog": "Usage events in Redis not yet aggregated.",
    "ragcache_usage_lag_seconds": "Age of the oldest usage event not yet aggregated (0: none waits).",
    "ragcache_last_aggregation_timestamp_seconds": "Unix time of the last successful aggregation run.",
    "ragcache_database_up": "1 if the database answered this scrape's read of ragcache's flags, else 0.",
    "ragcache_broker_up": "1 if the Celery broker accepted this scrape's connection, else 0.",
    # Redis Cluster only (a standalone Redis is ragcache_redis_up): counts, no per-node label.
    "ragcache_redis_masters_up": "Redis Cluster masters that answered this scrape (cluster mode only).",
    "ragcache_redis_masters_down": "Redis Cluster masters that did not answer this scrape (cluster mode only).",
}
# Set by the breaker (every process) and by aggregation runs; at /metrics the scrape's
# own readings take their place.
REDIS_UP = KnownGauge("ragcache_redis_up", SCRAPE_GAUGES["ragcache_redis_up"])
LAST_AGGREGATION = KnownGauge(
    "ragcache_last_aggregation_timestamp_seconds", SCRAPE_GAUGES["ragcache_last_aggregation_timestamp_seconds"]
)
AGGREGATION_RUNS = Counter("ragcache_aggregation_runs", "Aggregation runs by result (ok, busy, error).", ["result"])
AGGREGATION_SECONDS = Histogram(
    "ragcache_aggregation_seconds", "Duration of an aggregation run.",
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120),
)
AGGREGATED_EVENTS = Counter(
    "ragcache_aggregated_events", "Usage events read and acknowledged by aggregation (written, duplicate or malformed)."
)
EVENTS_LOST = Counter(
    "ragcache_usage_events_lost", "Usage events that could not be written (reason: redis_full, redis_unavailable).",
    ["reason"],
)
REDIS_ERRORS = Counter(
    "ragcache_redis_errors", "Failed Redis calls by kind (timeout, connection, oom, cluster, response, other).",
    ["kind"],
)
SOURCE_INVALIDATIONS = Counter("ragcache_source_invalidations", "Source ids invalidated (invalidate_sources).")
SOURCE_INVALIDATIONS_DEFERRED = Counter(
    "ragcache_source_invalidations_deferred",
    "Source ids whose invalidation after a commit failed (Redis unavailable) and waits for a retry (ragcache.sources).",
)
SOURCE_INVALIDATIONS_DROPPED = Counter(
    "ragcache_source_invalidations_dropped",
    "Deferred source invalidations given up (the process exited, or its retry queue overflowed): see the ERROR log.",
)
# Counters with a fixed label set start at 0, so the first failure is an increase a rule
# can see (a series born at 1 has no increase() within its first window).
for _result in ("ok", "busy", "error"):
    AGGREGATION_RUNS.labels(_result)
for _reason in ("redis_full", "redis_unavailable"):
    EVENTS_LOST.labels(_reason)
for _kind in ("timeout", "connection", "oom", "cluster", "response", "other"):
    REDIS_ERRORS.labels(_kind)
CORRUPT_ENTRIES = Counter(
    "ragcache_corrupt_entries", "Unreadable or foreign entries found at ragcache keys (deleted, served as misses).",
    ["policy"],
)

MAX_MODEL_LABELS = 50
MAX_MODEL_LABEL_LENGTH = 100
_seen_models: set[str] = set()
_models_lock = threading.Lock()


def model_label(model: str) -> str:
    """The ``model`` label value: the name if allowed, else "other". Every metric with a
    model label goes through here, so the number of series stays bounded (per process:
    without ``METRICS_MODELS`` each process keeps the first MAX_MODEL_LABELS it sees)."""
    model = str(model or "")
    if len(model) > MAX_MODEL_LABEL_LENGTH:
        return "other"
    allowed = get_config()["METRICS_MODELS"]
    if allowed is not None:
        return model if model in allowed else "other"
    if model in _seen_models:
        return model
    with _models_lock:
        if len(_seen_models) < MAX_MODEL_LABELS:
            _seen_models.add(model)
            return model
    return "other"



_children: dict[tuple, Any] = {}


def child(metric, *labelvalues: str):
    """``metric.labels(*labelvalues)``, remembered: labels() validates, takes a lock and
    builds a tuple on every call to return the same child each time (the hit path calls
    it four times). Label values are bounded (policies, results, capped models), so is
    this dict. Do not combine with ``metric.remove()``/``clear()``."""
    key = (metric, labelvalues)
    found = _children.get(key)
    if found is None:
        found = _children[key] = metric.labels(*labelvalues)
    return found
