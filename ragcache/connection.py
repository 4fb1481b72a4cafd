"""Redis clients and the circuit breaker.

Standalone Redis: the connection settings of the django-redis alias
``RAGCACHE["CACHE_ALIAS"]`` (its LOCATION and OPTIONS such as SOCKET_TIMEOUT), used by
redis-py's sync client and, for the async API, by ``redis.asyncio`` with the same
settings. Redis Cluster: ``RAGCACHE["REDIS_CLUSTER_URL"]`` (seed nodes: one URL, several
separated by commas, or a list), used by
``redis.cluster.RedisCluster`` and its asyncio twin, with the alias's timeouts when the
alias exists. Clients are made on first use and kept per process (async ones per event
loop: redis.asyncio connections belong to the loop that opened them).

The breaker: after a failure, calls skip Redis for ``BREAKER_COOLDOWN`` seconds; then
exactly one call probes it (half-open) while the others keep skipping, and its outcome
closes or re-opens the breaker. Caching is never switched off for good.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import weakref
from collections import deque
from functools import partial
from typing import Any

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
from redis.backoff import NoBackoff
from redis.retry import Retry

from . import metrics
from .conf import get_config
from .exceptions import RagcacheError

logger = logging.getLogger("ragcache.store")

DEFAULT_TIMEOUT = 0.1  # seconds, when neither the alias nor the URL says


class RedisUnavailable(RagcacheError):
    """Redis failed, timed out, or the circuit breaker is open. Raised to callers only by
    operations that must not pretend to succeed (``invalidate_sources``)."""


class RedisCommandError(RedisUnavailable):
    """Redis answered with an error: the server is up, so the breaker stays closed."""


class BreakerOpen(RedisUnavailable):
    """The circuit breaker is open: nothing was sent to Redis."""


def error_kind(exc: BaseException) -> str:
    """A bounded label for ``ragcache_redis_errors_total``."""
    text = str(exc)
    if isinstance(exc, redis.TimeoutError) or isinstance(exc, TimeoutError):
        return "timeout"
    if "OOM" in text or "maxmemory" in text:
        return "oom"
    if isinstance(exc, (redis.exceptions.ClusterError, redis.exceptions.RedisClusterException)) or any(
            word in text for word in ("CROSSSLOT", "MOVED", "ASK ", "CLUSTERDOWN", "slot")):
        return "cluster"
    if isinstance(exc, (redis.ConnectionError, OSError)):
        return "connection"
    if isinstance(exc, redis.ResponseError):
        return "response"
    return "other"


def operator_hint(exc: RedisUnavailable) -> str:
    """What an operator should read about ``exc``: Redis out of memory, an error reply, or
    Redis unreachable, with the setting or the Redis option to look at."""
    from .sources import redis_setting

    if isinstance(exc, RedisCommandError):
        if error_kind(exc) == "oom":
            return ("Redis refused the write: it is out of memory (maxmemory reached under the noeviction "
                    "policy). Raise maxmemory or set maxmemory-policy volatile-ttl (README, Redis memory).")
        return f"Redis answered with an error ({str(exc)[:200]})."
    return f"Redis is unavailable ({str(exc)[:200] or type(exc).__name__}). Check {redis_setting()} and that " \
           "Redis is running."


_warned: dict[str, float] = {}
WARN_EVERY = 10.0  # seconds: a cluster has a breaker per shard; one failed master must not log 256 lines


def _may_warn(what: str) -> bool:
    now = time.monotonic()
    if now - _warned.get(what, -WARN_EVERY) < WARN_EVERY:
        return False
    _warned[what] = now
    return True


class Breaker:
    """Opens at once when Redis refuses or drops connections; on timeouts only after
    ``BREAKER_TIMEOUTS`` in a row, since on a busy host one slow reply (or a reply waiting
    for a saturated event loop) says little, while opening makes every call skip the cache."""

    def __init__(self) -> None:
        self.open_until = 0.0
        self.probing = False
        self.timeouts = 0  # consecutive timeouts while closed
        self.seen = False  # no call has succeeded yet: ragcache_redis_up is not known
        self._lock = threading.Lock()

    def allow(self) -> bool:
        """Whether this call may use Redis (the first call after a cooldown is the probe)."""
        if not self.open_until:
            return True
        if time.monotonic() < self.open_until:
            return False
        with self._lock:
            if self.probing or not self.open_until or time.monotonic() < self.open_until:
                return not self.open_until
            self.probing = True
            return True

    def check(self) -> None:
        if not self.allow():
            raise BreakerOpen("circuit breaker open")

    def failed(self, exc: BaseException) -> None:
        kind = error_kind(exc)
        metrics.child(metrics.REDIS_ERRORS, kind).inc()
        with self._lock:
            was_closed = not self.open_until
            if was_closed and kind == "timeout":
                self.timeouts += 1
                if self.timeouts < int(get_config()["BREAKER_TIMEOUTS"]):
                    return  # not yet: the next call tries Redis again
            self.timeouts = 0
            self.open_until = time.monotonic() + float(get_config()["BREAKER_COOLDOWN"])
            self.probing = False
        metrics.REDIS_UP.set(0)
        if was_closed and _may_warn("down"):
            logger.warning("ragcache: Redis unavailable (%s); serving without cache", type(exc).__name__)

    def succeeded(self) -> None:
        if self.timeouts:
            self.timeouts = 0
        if self.open_until or not self.seen:
            if self.open_until:
                with self._lock:
                    self.open_until = 0.0
                    self.probing = False
                if _may_warn("up"):
                    logger.warning("ragcache: Redis is back; caching resumed")
            self.seen = True
            metrics.REDIS_UP.set(1)

    def reset(self) -> None:
        self.open_until = 0.0
        self.probing = False
        self.timeouts = 0
        self.seen = False


def translate(exc: Exception, breaker: Breaker) -> RedisUnavailable:
    """What a failed Redis call means for its caller, and for the breaker: an error reply
    (the server is up) is a ``RedisCommandError``; anything else is ``RedisUnavailable``.
    redis-py's cluster clients can fail with more than RedisError when a master dies
    (e.g. AttributeError when a concurrent failure closed the connection a command was
    about to use): still Redis trouble, never the caller's (kind "other" in the metric)."""
    if isinstance(exc, redis.ResponseError) and error_kind(exc) != "cluster":
        metrics.child(metrics.REDIS_ERRORS, error_kind(exc)).inc()
        breaker.succeeded()
        return RedisCommandError(str(exc))
    breaker.failed(exc)
    if isinstance(exc, (redis.RedisError, OSError)):
        return RedisUnavailable(str(exc))
    return RedisUnavailable(f"{type(exc).__name__}: {exc}")


class Breakers:
    """One breaker for a standalone Redis; one per virtual shard on a cluster, so that a
    failed master makes only its own shards skip Redis while hits on the others go on."""

    def __init__(self) -> None:
        self.standalone = Breaker()
        self.shards: list[Breaker] = []

    def __call__(self, shard: int | None = None) -> Breaker:
        if shard is None or not cluster_mode():
            return self.standalone
        if not self.shards:
            from .keys import SHARDS

            self.shards = [Breaker() for _ in range(SHARDS)]
        return self.shards[shard]

    def reset(self) -> None:
        self.standalone.reset()
        self.shards = []


breaker_for = Breakers()
breaker = breaker_for.standalone
_clients: dict[str, Any] = {}
_async_clients: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_clients_lock = threading.Lock()

# The connection settings an async standalone client takes over from the sync one.
_ASYNC_KWARGS = {
    "host", "port", "db", "username", "password", "socket_timeout", "socket_connect_timeout", "socket_keepalive",
    "socket_keepalive_options", "client_name", "health_check_interval", "path", "protocol", "ssl_keyfile",
    "ssl_certfile", "ssl_cert_reqs", "ssl_ca_certs", "ssl_ca_data", "ssl_check_hostname", "ssl_min_version",
    "ssl_ciphers", "lib_name", "lib_version",
}


# Each thread's own connection for the hot path (standalone Redis): borrowing from redis-py's
# pool costs a lock, a select() to check the connection, observability counters and a
# deprecation wrapper per call, about a third of a hit's client CPU. A thread uses its
# connection for one command at a time and drops it on any error mid-command, so a reply
# can never be left unread for the next command. Dropped after a fork and on reset().
_pinned = threading.local()
_generation = 0


def pinned() -> Any:
    """This thread's connection to the standalone Redis (made on first use)."""
    found = getattr(_pinned, "found", None)
    if found is not None and found[0] == _generation and found[1] == os.getpid():
        return found[2]
    if found is not None and found[1] == os.getpid():
        found[2].disconnect()  # settings changed: another server, perhaps
    pool = client("main").connection_pool
    conn = pool.connection_class(**pool.connection_kwargs)  # the alias's settings; not one of the pool's
    _pinned.found = (_generation, os.getpid(), conn)
    return conn


def reset() -> None:
    """Forget clients (settings changed, or tests). The breaker starts closed."""
    global _generation
    _generation += 1
    _warned.clear()
    with _clients_lock:
        for client in list(_clients.values()):
            try:
                client.close()
            except Exception:  # noqa: BLE001 - closing a client that may already be broken
                pass
        _clients.clear()
        _async_clients.clear()
    breaker_for.reset()


def cluster_mode() -> bool:
    return bool(get_config()["REDIS_CLUSTER_URL"])


def cluster_urls(value: Any = None) -> list[str]:
    """The seed nodes of ``RAGCACHE["REDIS_CLUSTER_URL"]``: one URL, several separated by
    commas, or a list. Several seeds let a new process start while one of them is down."""
    value = get_config()["REDIS_CLUSTER_URL"] if value is None else value
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, (list, tuple)):
        return []
    return [url.strip() for url in value if isinstance(url, str) and url.strip()]


def _seeds(node_class: Any) -> tuple[str, list[Any]]:
    """(the first seed's URL, the other seeds as cluster nodes) for RedisCluster.from_url."""
    from urllib.parse import urlsplit

    first, *others = cluster_urls()
    nodes = []
    for url in others:
        parts = urlsplit(url)
        nodes.append(node_class(parts.hostname, parts.port or 6379))
    return first, nodes


def _alias_options() -> dict[str, Any]:
    from django.conf import settings

    cache = (getattr(settings, "CACHES", None) or {}).get(get_config()["CACHE_ALIAS"])
    options = cache.get("OPTIONS") if isinstance(cache, dict) else None
    return options if isinstance(options, dict) else {}


def timeouts() -> tuple[float, float]:
    """(socket timeout, connect timeout) of hot-path calls, in seconds."""
    options = _alias_options()
    socket = options.get("SOCKET_TIMEOUT") or DEFAULT_TIMEOUT
    connect = options.get("SOCKET_CONNECT_TIMEOUT") or socket
    return float(socket), float(connect)


def _cluster_kwargs(socket_timeout: float) -> dict[str, Any]:
    _, connect = timeouts()
    # One attempt: a dead master's slots must answer "unavailable" within the timeout,
    # not after redis-py's retries; the breaker and the next call do the retrying.
    return {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": connect,
        "retry": Retry(NoBackoff(), 0),
        "require_full_coverage": False,
    }


def _make_sync(kind: str) -> Any:
    config = get_config()
    socket_timeout, _ = timeouts()
    if kind == "bulk":
        socket_timeout = float(config["BULK_SOCKET_TIMEOUT"])
    if config["REDIS_CLUSTER_URL"]:
        first, others = _seeds(redis.cluster.ClusterNode)
        try:
            return redis.cluster.RedisCluster.from_url(first, startup_nodes=others, **_cluster_kwargs(socket_timeout))
        except redis.exceptions.RedisClusterException as exc:  # no node answered; not a RedisError
            raise redis.ConnectionError(str(exc)) from exc
    from django_redis import get_redis_connection

    main = get_redis_connection(config["CACHE_ALIAS"])
    if kind == "main":
        return main
    pool = main.connection_pool
    kwargs = dict(pool.connection_kwargs, socket_timeout=socket_timeout)
    return redis.Redis(connection_pool=redis.ConnectionPool(connection_class=pool.connection_class, **kwargs))


def client(kind: str = "main") -> Any:
    """The sync client: ``main`` for the hot path, ``bulk`` (longer timeout) for
    maintenance and blocking reads."""
    found = _clients.get(kind)
    if found is None:
        with _clients_lock:
            found = _clients.get(kind)
            if found is None:
                found = _clients[kind] = _make_sync(kind)
    return found


def _make_async(kind: str) -> Any:
    config = get_config()
    socket_timeout, _ = timeouts()
    if kind == "bulk":
        socket_timeout = float(config["BULK_SOCKET_TIMEOUT"])
    if config["REDIS_CLUSTER_URL"]:
        first, others = _seeds(redis.asyncio.cluster.ClusterNode)
        return redis.asyncio.cluster.RedisCluster.from_url(first, startup_nodes=others,
                                                           **_cluster_kwargs(socket_timeout))
    sync_pool = client("main").connection_pool
    kwargs = {k: v for k, v in sync_pool.connection_kwargs.items() if k in _ASYNC_KWARGS}
    kwargs["socket_timeout"] = socket_timeout
    if "path" in kwargs:
        connection_class = redis.asyncio.UnixDomainSocketConnection
    elif any(k.startswith("ssl_") for k in kwargs) or sync_pool.connection_class is redis.SSLConnection:
        connection_class = redis.asyncio.SSLConnection
    else:
        connection_class = redis.asyncio.Connection
    pool = redis.asyncio.ConnectionPool(connection_class=connection_class, **kwargs)
    return redis.asyncio.Redis(connection_pool=pool)


MAX_IDLE_ASYNC = 64  # idle hot-path connections kept per event loop


def _per_loop() -> dict[str, Any]:
    """The running loop's clients. A loop's first use also starts a guard async generator:
    ``asyncio.run`` (and asgiref's ``async_to_sync``, uvicorn...) finalise a loop's async
    generators before closing it, and the guard then closes the loop's connections, while
    the loop can still run them. Without it, every short-lived loop (one ``async_to_sync``
    call, one ``asyncio.run``) would leave its connections open."""
    loop = asyncio.get_running_loop()
    per_loop = _async_clients.get(loop)
    if per_loop is None:
        for closed in [other for other in list(_async_clients) if other.is_closed()]:
            _async_clients.pop(closed, None)  # closed without finalising its generators: let GC have them
        per_loop = _async_clients[loop] = {}
        guard = per_loop["guard"] = _close_at_shutdown(per_loop)
        loop.create_task(guard.__anext__())  # started, so the loop finalises it at shutdown
    return per_loop


async def _close_at_shutdown(per_loop: dict[str, Any]):
    try:
        yield
    finally:
        for conn in per_loop.get("idle", ((),))[0]:
            try:
                await conn.disconnect()
            except Exception:  # noqa: BLE001 - closing what may already be broken
                pass
        for kind in ("main", "bulk"):
            client = per_loop.get(kind)
            if client is not None:
                try:
                    await client.aclose()
                except Exception:  # noqa: BLE001
                    pass
        per_loop.clear()
        _async_clients.pop(asyncio.get_running_loop(), None)


def async_idle() -> tuple[Any, Any]:
    """(idle connections, a maker of new ones) of the running loop's hot path: the async
    twin of ``pinned()``. Coroutines of one loop interleave, so each takes a connection
    for one command and puts it back; redis.asyncio's pool would add a lock, observability
    counters and a deprecation wrapper to every command."""
    per_loop = _per_loop()
    found = per_loop.get("idle")
    if found is None:
        pool = async_client("main").connection_pool
        found = per_loop["idle"] = (deque(), partial(pool.connection_class, **pool.connection_kwargs))
    return found


def async_client(kind: str = "main") -> Any:
    """The asyncio client of the running event loop (made on first use in that loop)."""
    per_loop = _per_loop()
    found = per_loop.get(kind)
    if found is None:
        found = per_loop[kind] = _make_async(kind)
    return found
