"""System checks: configuration mistakes are reported at startup, with the setting to fix.

Errors (ragcache.E00x) are settings ragcache cannot work with; warnings (ragcache.W00x)
are settings that work but are unsafe. A check never raises, whatever the settings hold.
"""
from __future__ import annotations

import ipaddress
import math
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qs, urlsplit

from django.conf import settings
from django.core.checks import CheckMessage, Error, Warning, register

from .conf import DEFAULTS, get_config

NUMBERS = ("LOCK_TIMEOUT", "LOCK_WAIT", "LOCK_POLL_INTERVAL", "BREAKER_COOLDOWN", "POLICY_MAX_AGE",
           "AGGREGATION_LOCK_TIMEOUT", "POLICY_RETRY_INTERVAL", "AGGREGATION_STALE_AFTER", "BULK_SOCKET_TIMEOUT")
# Passed to Redis or used as counts: a float such as 1e6 would fail there at run time.
INTEGERS = ("MAX_TTL", "STREAM_MAXLEN", "AGGREGATE_BATCH", "RETENTION_DAYS", "HIT_RATE_WINDOW", "MAX_ENTRY_BYTES",
            "BREAKER_TIMEOUTS",
            "MAX_SOURCES", "GATEWAY_MAX_BODY_BYTES", "GATEWAY_MAX_RESPONSE_BYTES")
# What an entry read must move within the socket timeout, at the least: a conservative
# floor for Redis copying the reply plus the network (bytes per second).
ENTRY_BYTES_PER_SECOND = 20 * 1024 * 1024
LOOPBACK = {"localhost", "127.0.0.1", "::1"}
DEFAULT_SERIALIZER = "django_redis.serializers.pickle.PickleSerializer"


def _redis_target(url: Any) -> tuple[str, int, int] | None:
    """(host, port, db) of a redis:// URL, loopback names folded into one; else None."""
    if not isinstance(url, str):
        return None
    try:
        parts = urlsplit(url.strip())
        if parts.scheme not in ("redis", "rediss"):
            return None
        db = (parts.path or "/").strip("/") or parse_qs(parts.query).get("db", ["0"])[0]
        host = parts.hostname or "localhost"
        return ("loopback" if host in LOOPBACK else host), parts.port or 6379, int(db)
    except ValueError:
        return None


def _urls(value: Any, separator: str) -> list[str]:
    """A URL setting as a list: one string (possibly ``separator``-joined) or a list."""
    if isinstance(value, str):
        return [part for part in value.split(separator) if part.strip()]
    if isinstance(value, (list, tuple, set)):
        return [part for part in value if isinstance(part, str)]
    return []


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A real, finite number: NaN and infinity pass ``> 0`` tests but crash ``int()`` at run time."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _strings(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value)


def _not_ip(entry: str) -> bool:
    """Whether a METRICS_ALLOWED_IPS entry is neither '*', an IP address nor a network in CIDR
    notation (host bits unset: '10.0.0.1/8' is refused, not read as '10.0.0.0/8')."""
    if entry == "*":
        return False
    try:
        ipaddress.ip_network(entry)
    except ValueError:
        return True
    return False


def _check_values(config: dict[str, Any]) -> list[CheckMessage]:
    messages: list[CheckMessage] = []
    for name in NUMBERS + INTEGERS:
        value = config[name]
        whole = name in INTEGERS
        if not (_is_int(value) if whole else _is_number(value)) or value <= 0:
            kind = "a positive whole number" if whole else "a positive (finite) number"
            messages.append(Error(
                f"RAGCACHE[{name!r}] must be {kind}, not {value!r}.",
                hint=f"Remove it to use the default ({DEFAULTS[name]!r}).", id="ragcache.E004",
            ))
    prefix = config["KEY_PREFIX"]
    if not isinstance(prefix, str) or not prefix or not prefix.isascii() or not prefix.isprintable() \
            or any(c in prefix for c in " *?[]{}:\\"):
        messages.append(Error(
            "RAGCACHE['KEY_PREFIX'] must be a non-empty printable ASCII string without spaces, ':', braces "
            f"(Redis Cluster hash tags) or glob characters, not {prefix!r}.",
            hint="For example RAGCACHE['KEY_PREFIX'] = 'ragcache'.", id="ragcache.E005",
        ))
    # Access and label settings: a wrong type here silently widens access (a string is
    # matched by substring) or crashes requests, so it is an error, not a warning.
    shapes = (
        ("CACHE_ALIAS", isinstance(config["CACHE_ALIAS"], str) and bool(config["CACHE_ALIAS"]),
         "a cache alias name, e.g. 'ragcache'"),
        ("METRICS_ALLOWED_IPS", _strings(config["METRICS_ALLOWED_IPS"]),
         "a list of client addresses or networks, e.g. ['127.0.0.1', '::1', '10.0.0.0/8'] (or ['*'] for any)"),
        ("STEP_LOG_QUEUE", isinstance(config["STEP_LOG_QUEUE"], bool), "True or False"),
        ("METRICS_BEARER_TOKEN", config["METRICS_BEARER_TOKEN"] is None
         or (isinstance(config["METRICS_BEARER_TOKEN"], str) and bool(config["METRICS_BEARER_TOKEN"])),
         "None or a non-empty string"),
        ("METRICS_MODELS", config["METRICS_MODELS"] is None or _strings(config["METRICS_MODELS"]),
         "None or a list of model names"),
    )
    for name, ok, expected in shapes:
        if not ok:
            messages.append(Error(
                f"RAGCACHE[{name!r}] must be {expected}, not {config[name]!r}.",
                hint=f"Fix RAGCACHE[{name!r}] or remove it to use the default ({DEFAULTS[name]!r}).",
                id="ragcache.E006",
            ))
    allowed = config["METRICS_ALLOWED_IPS"]
    bad = [entry for entry in allowed if _not_ip(entry)] if _strings(allowed) else []
    if bad:
        messages.append(Error(
            f"RAGCACHE['METRICS_ALLOWED_IPS'] has {', '.join(map(repr, bad))}, which is not an IP address or "
            "network: it allows no one.",
            hint="List addresses ('192.0.2.7', '::1') or networks in CIDR notation with the host bits zero "
            "('10.0.0.0/8', 'fd00::/8'); '*' allows any client.",
            id="ragcache.E006",
        ))
    timeout, wait = config["LOCK_TIMEOUT"], config["LOCK_WAIT"]
    if _is_number(timeout) and _is_number(wait) and 0 < timeout < wait:
        messages.append(Warning(
            f"RAGCACHE['LOCK_TIMEOUT'] ({timeout} s) is shorter than RAGCACHE['LOCK_WAIT'] ({wait} s): a waiting "
            "follower would outlive the leader's lock. When the leader's LLM call (or, for a stream, the gap "
            "between two chunks) takes longer than LOCK_TIMEOUT, its lock expires while followers still wait, and "
            "identical questions arriving after that take a new lock and call the LLM again.",
            hint=f"Raise RAGCACHE['LOCK_TIMEOUT'] to at least {wait} (LOCK_WAIT), or lower LOCK_WAIT; the defaults "
            f"are {DEFAULTS['LOCK_TIMEOUT']} and {DEFAULTS['LOCK_WAIT']}.",
            id="ragcache.W007",
        ))
    return messages


def _check_cache(alias: str, cache: Any) -> list[CheckMessage]:
    messages: list[CheckMessage] = []
    if not isinstance(cache, dict) or not str(cache.get("BACKEND", "")).startswith("django_redis."):
        return [Error(
            f"CACHES[{alias!r}] must use django-redis (BACKEND 'django_redis.cache.RedisCache').",
            hint="ragcache runs Lua scripts and streams on the raw Redis connection django-redis provides.",
            id="ragcache.E002",
        )]
    options = cache.get("OPTIONS") if isinstance(cache.get("OPTIONS"), dict) else {}
    serializer = options.get("SERIALIZER", DEFAULT_SERIALIZER)
    if "pickle" in str(serializer).lower():
        messages.append(Warning(
            f"CACHES[{alias!r}] uses a pickle serializer"
            + (" (django-redis's default)." if "SERIALIZER" not in options else "."),
            hint=f"Set CACHES[{alias!r}]['OPTIONS']['SERIALIZER'] = 'django_redis.serializers.json.JSONSerializer': "
            "unpickling lets anyone who can write to Redis run code in your processes.",
            id="ragcache.W001",
        ))
    caches = {_redis_target(url) for url in _urls(cache.get("LOCATION"), ",")} - {None}
    brokers = {_redis_target(url) for url in _urls(getattr(settings, "CELERY_BROKER_URL", None), ";")} - {None}
    if caches & brokers:
        messages.append(Warning(
            f"CACHES[{alias!r}]['LOCATION'] and CELERY_BROKER_URL use the same Redis database.",
            hint="Give the broker its own database number in CELERY_BROKER_URL (e.g. .../1) so cache "
            "maintenance and the broker never touch each other's keys.",
            id="ragcache.W002",
        ))
    for option in ("SOCKET_TIMEOUT", "SOCKET_CONNECT_TIMEOUT"):
        value = options.get(option)
        if value is not None and value != 0 and (not _is_number(value) or value < 0):
            # django-redis refuses a non-number, redis-py a negative or NaN timeout: at the
            # first connection, so every request would run without the cache.
            messages.append(Error(
                f"CACHES[{alias!r}]['OPTIONS'][{option!r}] must be a positive number of seconds, not {value!r}.",
                hint=f"Set CACHES[{alias!r}]['OPTIONS'][{option!r}] = 0.1 (seconds, an int or float; not a "
                "string such as '5s').",
                id="ragcache.E004",
            ))
        elif not _is_number(value) or value <= 0:
            messages.append(Warning(
                f"CACHES[{alias!r}]['OPTIONS'][{option!r}] is {'not set' if value is None else repr(value)}: "
                "a stalled Redis would hold every request for as long as the operating system waits.",
                hint=f"Set CACHES[{alias!r}]['OPTIONS'][{option!r}] = 0.1 (seconds): a lookup that takes longer "
                "is served as a miss, and the circuit breaker stops waiting on a Redis that is down.",
                id="ragcache.W003",
            ))
    return messages


@register("ragcache")
def check_settings(app_configs: Iterable[Any] | None = None, **kwargs: Any) -> list[CheckMessage]:
    user = getattr(settings, "RAGCACHE", {})
    if not isinstance(user, dict):
        return [Error("RAGCACHE must be a dict.", hint="Set RAGCACHE = {...} in settings.", id="ragcache.E003")]
    messages: list[CheckMessage] = []
    for name in sorted(set(user) - set(DEFAULTS), key=str):
        messages.append(Error(
            f"Unknown setting RAGCACHE[{name!r}].",
            hint=f"Valid keys: {', '.join(sorted(DEFAULTS))}.", id="ragcache.E003",
        ))
    config = get_config()
    messages.extend(_check_values(config))
    messages.extend(_check_upstream(config["UPSTREAM"]))
    if "LOCK_POLL_INTERVAL" in user:
        messages.append(Warning(
            "RAGCACHE['LOCK_POLL_INTERVAL'] has no effect since ragcache 0.2: identical concurrent misses "
            "wait on the leader's flight instead of polling.",
            hint="Remove RAGCACHE['LOCK_POLL_INTERVAL']; RAGCACHE['LOCK_WAIT'] still bounds the wait.",
            id="ragcache.W006",
        ))
    if config["REDIS_CLUSTER_URL"] is not None:
        messages.extend(_check_cluster(config["REDIS_CLUSTER_URL"]))
    alias = config["CACHE_ALIAS"]
    caches = getattr(settings, "CACHES", {})
    if not isinstance(alias, str):
        return messages  # E006 said so
    if alias not in caches and config["REDIS_CLUSTER_URL"]:
        return messages  # on a cluster the alias only lends its timeouts, if it exists
    if alias not in caches:
        messages.append(Error(
            f"RAGCACHE['CACHE_ALIAS'] is {alias!r}, but CACHES has no such alias.",
            hint=f"Add CACHES[{alias!r}] with BACKEND 'django_redis.cache.RedisCache', or point CACHE_ALIAS at one.",
            id="ragcache.E001",
        ))
        return messages
    messages.extend(_check_cache(alias, caches[alias]))
    messages.extend(_check_entry_size(config, caches[alias]))
    return messages


def _shown_url(url: Any) -> str:
    """``url`` for a message: its user information (which may hold a key) masked."""
    if not isinstance(url, str) or "@" not in url:
        return repr(url)
    scheme, separator, rest = url.partition("://")
    if not separator:
        scheme, rest = "", url
    return repr(scheme + separator + "***@" + rest.rsplit("@", 1)[-1])


def _check_upstream(upstream: Any) -> list[CheckMessage]:
    """The gateway's upstream, checked when it is set at all: wrong types or a URL that is not
    http(s) (ragcache.E010); no API key (ragcache.W008). Messages never show the key."""
    if upstream in (None, {}):
        return []
    problems = []
    if not isinstance(upstream, dict):
        problems.append(f"must be a dict, not {type(upstream).__name__}")
    else:
        unknown = sorted(set(upstream) - {"BASE_URL", "API_KEY", "TIMEOUT"}, key=str)
        if unknown:
            problems.append(f"has unknown keys {', '.join(map(repr, unknown))}")
        base = upstream.get("BASE_URL")
        if not isinstance(base, str) or urlsplit(base).scheme not in ("http", "https") or not urlsplit(base).netloc:
            problems.append(f"needs BASE_URL, an http(s) URL such as 'https://api.example/v1', not {_shown_url(base)}")
        if upstream.get("API_KEY") is not None and not isinstance(upstream.get("API_KEY"), str):
            problems.append("API_KEY must be a string or None")
        timeout = upstream.get("TIMEOUT")
        if timeout is not None and (not _is_number(timeout) or timeout <= 0):
            problems.append(f"TIMEOUT must be a positive number of seconds, not {timeout!r}")
    if problems:
        return [Error(
            f"RAGCACHE['UPSTREAM'] {'; '.join(problems)}.",
            hint="Set RAGCACHE['UPSTREAM'] = {'BASE_URL': 'https://.../v1', 'API_KEY': <from the environment>, "
            "'TIMEOUT': 60}, or remove it if you do not mount the gateway.",
            id="ragcache.E010",
        )]
    key = upstream.get("API_KEY")
    if key is None or not key.strip():
        return [Warning(
            f"RAGCACHE['UPSTREAM'] has a BASE_URL but {'no' if key is None else 'an empty'} API_KEY: the gateway "
            "calls the upstream without an Authorization header.",
            hint="Set RAGCACHE['UPSTREAM']['API_KEY'] (read it from the environment, never from the code). If the "
            "upstream needs no key (a local model server), add 'ragcache.W008' to SILENCED_SYSTEM_CHECKS.",
            id="ragcache.W008",
        )]
    return []


def _check_entry_size(config: dict[str, Any], cache: Any) -> list[CheckMessage]:
    """An entry must be readable within the socket timeout, or each lookup of it would
    time out and open the breaker for every other question (ragcache.E007)."""
    limit = config["MAX_ENTRY_BYTES"]
    options = cache.get("OPTIONS") if isinstance(cache, dict) and isinstance(cache.get("OPTIONS"), dict) else {}
    timeout = options.get("SOCKET_TIMEOUT")
    if not _is_int(limit) or limit <= 0 or not _is_number(timeout) or timeout <= 0:
        return []  # E004 / W003 say so
    readable = int(timeout * ENTRY_BYTES_PER_SECOND)
    if limit > readable:
        return [Error(
            f"RAGCACHE['MAX_ENTRY_BYTES'] is {limit} bytes, more than an entry read can carry within the "
            f"{timeout} s socket timeout (about {readable} bytes).",
            hint=f"Lower RAGCACHE['MAX_ENTRY_BYTES'] to at most {readable}, or raise the cache alias's "
            "OPTIONS['SOCKET_TIMEOUT']: an entry that cannot be read in time makes every lookup of it time "
            "out and opens the circuit breaker for all other questions.",
            id="ragcache.E007",
        )]
    return []


CLUSTER_CHECK_TIMEOUT = 1.0  # seconds: the checks run at every start; a dead seed must not hold it up


def _cluster_url_ok(url: str) -> bool:
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError for a port that is not a number
    except ValueError:
        return False
    return (parts.scheme in ("redis", "rediss") and bool(parts.hostname) and (port is None or port > 0)
            and (parts.path or "/").strip("/") in ("", "0"))


def _check_cluster(value: Any) -> list[CheckMessage]:
    """RAGCACHE['REDIS_CLUSTER_URL']: redis:// URLs (E008) of nodes in cluster mode (E009),
    at least one reachable (W004), whose cluster serves all 16384 slots (W005). Asks the
    seeds in turn, until one answers: a short CLUSTER INFO and CLUSTER SLOTS."""
    import redis

    from .connection import cluster_urls

    setting = "RAGCACHE['REDIS_CLUSTER_URL']"
    urls = cluster_urls(value)
    bad = [url for url in urls if not _cluster_url_ok(url)]
    if not urls or bad:
        return [Error(
            f"{setting} must be the redis:// URL of a cluster node (or several, separated by commas), not "
            f"{(bad[0] if bad else value)!r}.",
            hint=f"For example {setting} = 'redis://10.0.0.5:7000,redis://10.0.0.6:7000' (rediss:// for TLS; "
            "no database number: a cluster has only database 0). Remove it to use "
            "CACHES[RAGCACHE['CACHE_ALIAS']] instead.",
            id="ragcache.E008",
        )]
    failures = []
    for url in urls:
        parts = urlsplit(url)
        address = f"{parts.hostname}:{parts.port or 6379}"
        client = redis.Redis.from_url(url, socket_timeout=CLUSTER_CHECK_TIMEOUT,
                                      socket_connect_timeout=CLUSTER_CHECK_TIMEOUT)
        try:
            info = client.execute_command("CLUSTER", "INFO")
            slots = client.execute_command("CLUSTER", "SLOTS")
            break
        except redis.ResponseError as exc:
            return [Error(
                f"{setting} names {address}, which is not in cluster mode ({str(exc)[:80]}).",
                hint=f"Point {setting} at nodes of your Redis Cluster, or remove it to use a standalone Redis "
                "through CACHES[RAGCACHE['CACHE_ALIAS']].",
                id="ragcache.E009",
            )]
        except (redis.RedisError, OSError) as exc:
            failures.append(f"{address} ({type(exc).__name__})")
        finally:
            client.close()
    else:
        return [Warning(
            f"No seed node of {setting} answered: {', '.join(failures)}. ragcache serves without cache until "
            "one does.",
            hint=f"Check that the cluster is running and reachable from here, or fix {setting} (hosts, ports, "
            "password, rediss:// for TLS); list several nodes so that one down node does not matter.",
            id="ragcache.W004",
        )]
    text = info.decode() if isinstance(info, bytes) else str(info)
    state = dict(line.split(":", 1) for line in text.split() if ":" in line)
    covered = sum(int(entry[1]) - int(entry[0]) + 1 for entry in slots)
    if covered < 16384 or state.get("cluster_state") != "ok":
        return [Warning(
            f"The cluster at {setting} (asked {address}) serves {covered} of 16384 hash slots "
            f"(cluster_state: {state.get('cluster_state', '?')}): lookups of keys in the others miss and "
            "their stores fail.",
            hint="Assign every slot to a master (redis-cli --cluster fix / --cluster check), or point "
            f"{setting} at the cluster you meant.",
            id="ragcache.W005",
        )]
    return []
