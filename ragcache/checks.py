"""System checks: configuration mistakes are reported at startup, with the setting to fix."""
from __future__ import annotations

from urllib.parse import urlsplit

from django.conf import settings
from django.core.checks import Error, Warning, register

from .conf import DEFAULTS, get_config

NUMBERS = ("MAX_TTL", "LOCK_TIMEOUT", "LOCK_WAIT", "LOCK_POLL_INTERVAL", "BREAKER_COOLDOWN", "POLICY_MAX_AGE",
           "STREAM_MAXLEN", "AGGREGATE_BATCH", "AGGREGATION_LOCK_TIMEOUT", "RETENTION_DAYS", "HIT_RATE_WINDOW")


def _redis_target(url: str) -> tuple[str, int, int] | None:
    try:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):
            return None
        db = int((parts.path or "/0").strip("/") or 0)
        return parts.hostname or "localhost", parts.port or 6379, db
    except ValueError:
        return None


@register("ragcache")
def check_settings(app_configs=None, **kwargs):
    messages = []
    user = getattr(settings, "RAGCACHE", {})
    if not isinstance(user, dict):
        return [Error("RAGCACHE must be a dict.", hint="Set RAGCACHE = {...} in settings.", id="ragcache.E003")]
    for name in sorted(set(user) - set(DEFAULTS)):
        messages.append(Error(
            f"Unknown setting RAGCACHE[{name!r}].",
            hint=f"Valid keys: {', '.join(sorted(DEFAULTS))}.", id="ragcache.E003",
        ))
    config = get_config()
    for name in NUMBERS:
        value = config[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            messages.append(Error(
                f"RAGCACHE[{name!r}] must be a positive number, not {value!r}.",
                hint=f"Remove it to use the default ({DEFAULTS[name]!r}).", id="ragcache.E004",
            ))
    prefix = config["KEY_PREFIX"]
    if not isinstance(prefix, str) or not prefix or any(c in prefix for c in " *?[]:"):
        messages.append(Error(
            f"RAGCACHE['KEY_PREFIX'] must be a non-empty string without spaces, ':' or glob characters, not {prefix!r}.",
            hint="For example RAGCACHE['KEY_PREFIX'] = 'ragcache'.", id="ragcache.E005",
        ))

    alias = config["CACHE_ALIAS"]
    cache = settings.CACHES.get(alias)
    if cache is None:
        messages.append(Error(
            f"RAGCACHE['CACHE_ALIAS'] is {alias!r}, but CACHES has no such alias.",
            hint=f"Add CACHES[{alias!r}] with BACKEND 'django_redis.cache.RedisCache', or point CACHE_ALIAS at one.",
            id="ragcache.E001",
        ))
        return messages
    if not str(cache.get("BACKEND", "")).startswith("django_redis."):
        messages.append(Error(
            f"CACHES[{alias!r}] must use django-redis (BACKEND 'django_redis.cache.RedisCache').",
            hint="ragcache runs Lua scripts and streams on the raw Redis connection django-redis provides.",
            id="ragcache.E002",
        ))
    serializer = (cache.get("OPTIONS") or {}).get("SERIALIZER", "django_redis.serializers.pickle.PickleSerializer")
    if "pickle" in serializer.lower():
        messages.append(Warning(
            f"CACHES[{alias!r}] uses a pickle serializer.",
            hint=f"Set CACHES[{alias!r}]['OPTIONS']['SERIALIZER'] = 'django_redis.serializers.json.JSONSerializer': "
            "unpickling lets anyone who can write to Redis run code in your processes.",
            id="ragcache.W001",
        ))
    location = cache.get("LOCATION")
    broker = getattr(settings, "CELERY_BROKER_URL", None)
    if isinstance(location, str) and isinstance(broker, str):
        if _redis_target(location) is not None and _redis_target(location) == _redis_target(broker):
            messages.append(Warning(
                f"CACHES[{alias!r}] and CELERY_BROKER_URL use the same Redis database.",
                hint="Give the broker its own database number in CELERY_BROKER_URL (e.g. .../1) so cache "
                "maintenance and the broker never touch each other's keys.",
                id="ragcache.W002",
            ))
    return messages
