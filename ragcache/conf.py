"""ragcache's settings: one ``RAGCACHE`` dict, read through one cached getter."""
from __future__ import annotations

from functools import cache
from typing import Any

from django.conf import settings
from django.core.signals import setting_changed
from django.dispatch import receiver

DEFAULTS: dict[str, Any] = {
    # django-redis cache alias whose connection settings ragcache uses (standalone Redis).
    "CACHE_ALIAS": "ragcache",
    # Redis Cluster seed nodes: "redis://10.0.0.5:7000", several separated by commas (or a
    # list) so that a process can start while one is down. When set, ragcache talks to the
    # cluster (redis-py's RedisCluster) instead of CACHE_ALIAS, with that alias's socket
    # timeouts if it exists.
    "REDIS_CLUSTER_URL": None,
    # Every Redis key ragcache writes starts with this; maintenance scans only this prefix.
    "KEY_PREFIX": "ragcache",
    # Upper bound for any policy's TTL (seconds).
    "MAX_TTL": 30 * 24 * 3600,
    # Upper bound for any policy's max_entry_bytes: an entry must be readable within the
    # socket timeout, or every lookup of it would time out (system check ragcache.E007).
    "MAX_ENTRY_BYTES": 2 * 1024 * 1024,
    # How many source documents one answer may cite (sources=).
    "MAX_SOURCES": 32,
    # Single-flight: how long a leader's lock lives (extended while a stream flows), and
    # how long followers wait for the leader's answer.
    "LOCK_TIMEOUT": 60.0,
    "LOCK_WAIT": 10.0,
    # No longer used (0.2 followers wait on the leader's flight instead of polling);
    # accepted so that 0.1 settings still pass the checks (ragcache.W006 says so).
    "LOCK_POLL_INTERVAL": 0.02,
    # After a Redis error, skip Redis for this long, then let one call probe it (seconds).
    # A refused or dropped connection opens the breaker at once; timeouts only after this
    # many in a row.
    "BREAKER_COOLDOWN": 1.0,
    "BREAKER_TIMEOUTS": 3,
    # Backstop (seconds) for policy edits Redis never heard of (e.g. QuerySet.update).
    "POLICY_MAX_AGE": 60.0,
    # While the database cannot load the policies, try again at most this often (seconds).
    "POLICY_RETRY_INTERVAL": 5.0,
    # Usage events: the streams' cap (each shard's stream keeps at most 1/16 of it, oldest
    # dropped past that: events spread evenly fill 1/16 of the cap in all, a shard with hot
    # questions holds 16x its even share; if every shard filled, 16x the cap), batch size,
    # aggregation lock, retention of raw records, and when health calls the aggregation
    # stalled (the age in seconds of the oldest event still waiting).
    "STREAM_MAXLEN": 1_000_000,
    "AGGREGATE_BATCH": 5000,
    "AGGREGATION_LOCK_TIMEOUT": 120.0,
    "RETENTION_DAYS": 30,
    "AGGREGATION_STALE_AFTER": 300.0,
    # Socket timeout (seconds) for maintenance: aggregation reads, scans, fan-out writes.
    "BULK_SOCKET_TIMEOUT": 10.0,
    # How many recent lookups per policy feed the hit rate in the step 68 log line.
    "HIT_RATE_WINDOW": 1000,
    # Step log lines are handed to a daemon thread that formats and writes them, so a hit
    # pays a queue append instead of the formatting (see steplog.py). False: inline.
    "STEP_LOG_QUEUE": True,
    # /metrics and /ragcache/health access: client IPs allowed, or a bearer token.
    "METRICS_ALLOWED_IPS": ["127.0.0.1", "::1"],
    "METRICS_BEARER_TOKEN": None,
    # Models reported by name in metrics; others are labelled "other" (bounded labels).
    "METRICS_MODELS": None,
    # The gateway's upstream (an OpenAI-compatible API): {"BASE_URL", "API_KEY", "TIMEOUT"}.
    "UPSTREAM": {},
    # Largest request body the gateway accepts, and largest JSON answer it takes from the
    # upstream (bytes; a stream is passed on chunk by chunk, never held whole).
    "GATEWAY_MAX_BODY_BYTES": 1024 * 1024,
    "GATEWAY_MAX_RESPONSE_BYTES": 32 * 1024 * 1024,
}


@cache
def get_config() -> dict[str, Any]:
    """The effective settings: DEFAULTS overlaid with ``settings.RAGCACHE``.

    Unknown keys and bad values are reported by the system checks (ragcache.E00x),
    not here, so a typo never crashes a request.
    """
    user = getattr(settings, "RAGCACHE", None) or {}
    config = dict(DEFAULTS)
    if isinstance(user, dict):
        config.update({k: v for k, v in user.items() if k in DEFAULTS})
    return config


@receiver(setting_changed)
def _reset_config(*, setting: str, **kwargs: Any) -> None:
    if setting in {"RAGCACHE", "CACHES"}:
        get_config.cache_clear()
        from . import connection

        connection.reset()
