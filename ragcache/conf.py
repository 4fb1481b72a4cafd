"""ragcache's settings: one ``RAGCACHE`` dict, read through one cached getter."""
from __future__ import annotations

from functools import cache
from typing import Any

from django.conf import settings
from django.core.signals import setting_changed
from django.dispatch import receiver

DEFAULTS: dict[str, Any] = {
    # django-redis cache alias whose connection pool ragcache uses.
    "CACHE_ALIAS": "ragcache",
    # Every Redis key ragcache writes starts with this; purge scans only this prefix.
    "KEY_PREFIX": "ragcache",
    # Upper bound for any policy's TTL (seconds).
    "MAX_TTL": 30 * 24 * 3600,
    # Single-flight: how long the leader's lock lives, how long followers wait for it.
    "LOCK_TIMEOUT": 60.0,
    "LOCK_WAIT": 10.0,
    "LOCK_POLL_INTERVAL": 0.02,
    # After a Redis error, skip Redis for this long before probing again (seconds).
    "BREAKER_COOLDOWN": 1.0,
    # Policies are re-validated against Redis on every lookup; this is a backstop for
    # edits made without save() (e.g. QuerySet.update) when Redis is unreachable.
    "POLICY_MAX_AGE": 60.0,
    # Usage events: stream cap (oldest dropped past it), batch size, lock, retention.
    "STREAM_MAXLEN": 1_000_000,
    "AGGREGATE_BATCH": 5000,
    "AGGREGATION_LOCK_TIMEOUT": 120.0,
    "RETENTION_DAYS": 30,
    # How many recent lookups per policy feed the hit rate in the step 68 log line.
    "HIT_RATE_WINDOW": 1000,
    # /metrics and /ragcache/health access: client IPs allowed, or a bearer token.
    "METRICS_ALLOWED_IPS": ["127.0.0.1", "::1"],
    "METRICS_BEARER_TOKEN": None,
    # Models reported by name in metrics; others are labelled "other" (bounded labels).
    "METRICS_MODELS": None,
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
        from . import store

        store.reset_clients()
