"""Every Redis call ragcache makes lives here.

Nothing outside this module talks to Redis. Callers get plain Python values back, or
``RedisUnavailable`` when Redis failed or the circuit breaker is open; they turn that
into a miss / ``False``. The breaker never disables caching for good: after
``BREAKER_COOLDOWN`` seconds the next call probes Redis again.
"""
from __future__ import annotations

import itertools
import logging
import os
import socket
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any

import redis
from django_redis import get_redis_connection

from . import metrics
from .conf import get_config
from .keys import KEY_SCHEMA_VERSION

logger = logging.getLogger("ragcache.store")

STREAM_GROUP = "ragcache-aggregators"
# Entry metadata starts with this (see entries.encode); the lookup script checks it.
META_PREFIX = f'{{"v":{KEY_SCHEMA_VERSION},'

# KEYS: entry, stream, config-version, lock
# ARGV: 1 expected config version, 2 hit result ("" = don't record), 3 miss result
#       ("" = don't record), 4 lock ms (0 = no lock), 5 lock token, 6 client start (µs),
#       7 stream maxlen, 8 policy, 9 model, 10 scope hash, 11 key hash, 12 meta prefix
# One round trip answers the lookup, validates the caller's policy snapshot and appends
# the usage event; a follower of a single-flight lock records nothing yet. Anything at
# the key that ragcache did not write in this schema (wrong type, other schema, body
# length not the one recorded) is deleted and answered as a miss, flagged "foreign".
_LOOKUP_LUA = """
local cfg = redis.call('GET', KEYS[3]) or '0'
if cfg ~= ARGV[1] then return {'stale', cfg} end
local kind = redis.call('TYPE', KEYS[1])['ok']
local foreign = '0'
local now = redis.call('TIME')
local now_us = tonumber(now[1]) * 1000000 + tonumber(now[2])
if kind == 'hash' then
  local v = redis.call('HMGET', KEYS[1], 'm', 'b')
  local m, b = v[1], v[2]
  if m and b and string.sub(m, 1, #ARGV[12]) == ARGV[12] and tonumber(string.match(m, '"n":(%d+)')) == #b then
    if ARGV[2] ~= '' then
      redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[7], '*', 'r', ARGV[2], 'p', ARGV[8], 'm', ARGV[9],
        's', ARGV[10], 'k', ARGV[11], 't', string.format('%.0f', now_us), 'w', string.format('%.0f', math.max(0, now_us - tonumber(ARGV[6]))), 'e', m)
    end
    return {'hit', cfg, m, b}
  end
  kind = 'foreign'
end
if kind ~= 'none' then
  redis.call('DEL', KEYS[1])
  foreign = '1'
end
local status = 'miss'
if tonumber(ARGV[4]) > 0 then
  if redis.call('SET', KEYS[4], ARGV[5], 'NX', 'PX', ARGV[4]) then status = 'leader' else status = 'follower' end
end
if ARGV[3] ~= '' and status ~= 'follower' then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[7], '*', 'r', ARGV[3], 'p', ARGV[8], 'm', ARGV[9],
    's', ARGV[10], 'k', ARGV[11], 't', string.format('%.0f', now_us))
end
return {status, cfg, foreign}
"""

# KEYS: entry, stream, config-version, lock
# ARGV: 1 expected config version, 2 ttl ms, 3 meta, 4 body, 5 record ("1"/"0"),
#       6 stream maxlen, 7 policy, 8 model, 9 scope hash, 10 key hash, 11 lock token
# Value and expiry are written in one atomic script: there is never a key without TTL.
# The single-flight lock, if we hold it, is released in the same round trip.
_STORE_LUA = """
local cfg = redis.call('GET', KEYS[3]) or '0'
if cfg ~= ARGV[1] then return {'stale', cfg} end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'm', ARGV[3], 'b', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
if ARGV[5] == '1' then
  local now = redis.call('TIME')
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], '*', 'r', 'store', 'p', ARGV[7], 'm', ARGV[8],
    's', ARGV[9], 'k', ARGV[10], 't', string.format('%.0f', tonumber(now[1]) * 1000000 + tonumber(now[2])), 'e', ARGV[3])
end
if ARGV[11] ~= '' and redis.call('GET', KEYS[4]) == ARGV[11] then redis.call('DEL', KEYS[4]) end
return {'stored', cfg}
"""

# Delete a lock only if we still own it.
_UNLOCK_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# Extend a lock only if we still own it.
_EXTEND_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


class RedisUnavailable(Exception):
    """Redis failed, timed out, or the circuit breaker is open."""


class RedisCommandError(RedisUnavailable):
    """Redis answered with an error: the server is up, so the breaker stays closed."""


class BreakerOpen(RedisUnavailable):
    """The circuit breaker is open: nothing was sent to Redis."""


@dataclass(slots=True)  # one per lookup: slots build four times faster than frozen
class LookupReply:
    status: str  # hit | miss | leader | follower | stale
    config_version: str
    meta: bytes = b""
    body: bytes = b""
    foreign: bool = False  # something unreadable was at the key and has been deleted


class _Breaker:
    """Skip Redis for a short cooldown after a failure instead of paying the timeout
    on every request; the first call after the cooldown is the probe."""

    def __init__(self) -> None:
        self.open_until = 0.0
        self._lock = threading.Lock()

    def check(self) -> None:
        if self.open_until and time.monotonic() < self.open_until:
            raise BreakerOpen("circuit breaker open")

    def failed(self, exc: Exception) -> None:
        with self._lock:
            was_closed = not self.open_until
            self.open_until = time.monotonic() + float(get_config()["BREAKER_COOLDOWN"])
        metrics.REDIS_UP.set(0)
        if was_closed:
            logger.warning("ragcache: Redis unavailable (%s); serving without cache", type(exc).__name__)

    def succeeded(self) -> None:
        if self.open_until:
            with self._lock:
                self.open_until = 0.0
            logger.warning("ragcache: Redis is back; caching resumed")
        metrics.REDIS_UP.set(1)


breaker = _Breaker()
_clients: dict[str, Any] = {}
# Single-flight locks whose command failed or timed out. A timed-out script may still run
# when a stalled Redis wakes up, and take the lock for LOCK_TIMEOUT with nobody to store
# or release: the question's next callers would wait LOCK_WAIT for nothing. The next
# successful call releases them (only if the token is still ours).
_abandoned_locks: deque[tuple[str, str]] = deque(maxlen=1000)


def reset_clients() -> None:
    """Forget cached clients and scripts (settings changed, or tests)."""
    _clients.clear()
    _abandoned_locks.clear()
    breaker.open_until = 0.0


def _client() -> redis.Redis:
    client = _clients.get("main")
    if client is None:
        client = get_redis_connection(get_config()["CACHE_ALIAS"])
        _clients["main"] = client
        _clients["lookup"] = client.register_script(_LOOKUP_LUA)
        _clients["store"] = client.register_script(_STORE_LUA)
        _clients["unlock"] = client.register_script(_UNLOCK_LUA)
        _clients["extend"] = client.register_script(_EXTEND_LUA)
    return client


def _bulk_client() -> redis.Redis:
    """Same server, longer timeout: for aggregation batches and scans, not lookups."""
    client = _clients.get("bulk")
    if client is None:
        pool = _client().connection_pool
        kwargs = dict(pool.connection_kwargs, socket_timeout=10.0)
        client = redis.Redis(connection_pool=redis.ConnectionPool(connection_class=pool.connection_class, **kwargs))
        _clients["bulk"] = client
    return client


def _script(name: str):
    _client()
    return _clients[name]


def _evalsha(name: str, keys: list, args: list):
    """Run a registered script on a pooled connection directly. The hot path skips
    redis-py's per-command wrapper (retry bookkeeping, observability hooks, option
    parsing: about a fifth of a hit's CPU); the pool still checks the connection for
    unread data before lending it. Errors behave as through the client, whose connection
    retry is 0: the connection is dropped and the error raised. After NOSCRIPT (a restarted
    or flushed server) the script is loaded and run again."""
    script = _clients.get(name) or _script(name)
    try:
        return _raw_command(_clients["main"], "EVALSHA", script.sha, len(keys), *keys, *args)
    except redis.exceptions.NoScriptError:
        _clients["main"].script_load(script.script)
        return script(keys=keys, args=args)


def _raw_command(client: redis.Redis, *args):
    """One command on a connection of ``client``'s pool, its reply as the parser gives it
    (no redis-py response callback). On a connection error the connection is dropped."""
    pool = client.connection_pool
    conn = pool.get_connection()
    try:
        conn.send_command(*args)
        return conn.read_response()
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        conn.disconnect()
        raise
    finally:
        pool.release(conn)


def _guard(fn, *args, **kwargs):
    breaker.check()
    try:
        result = fn(*args, **kwargs)
    except redis.ResponseError as exc:
        raise RedisCommandError(str(exc)) from exc
    except (redis.RedisError, OSError) as exc:
        breaker.failed(exc)
        raise RedisUnavailable(str(exc)) from exc
    breaker.succeeded()
    if _abandoned_locks:
        _release_abandoned_locks()
    return result


def _abandon_lock(lock_key: str, token: str) -> None:
    if token:
        _abandoned_locks.append((lock_key, token))


def _release_abandoned_locks() -> None:
    # Runs after a reply arrived, i.e. after Redis has run everything queued before it.
    pending = []
    while _abandoned_locks and len(pending) < 100:
        pending.append(_abandoned_locks.popleft())
    try:
        pipe = _client().pipeline(transaction=False)
        for lock_key, token in pending:
            _script("unlock")(keys=[lock_key], args=[token], client=pipe)
        pipe.execute()
    except (redis.RedisError, OSError):
        _abandoned_locks.extendleft(reversed(pending))  # next success tries again


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def prefix() -> str:
    return get_config()["KEY_PREFIX"]


def config_version_key() -> str:
    return f"{prefix()}:policies:version"


def stream_key() -> str:
    return f"{prefix()}:usage"


def aggregation_lock_key() -> str:
    return f"{prefix()}:lock:aggregation"


# --- cache entries --------------------------------------------------------------------

def lookup(
    key: str,
    lock_key: str,
    *,
    config_version: str,
    hit_result: str,
    miss_result: str,
    lock_ms: int,
    lock_token: str,
    start_us: int,
    event: tuple[str, str, str, str],
) -> LookupReply:
    """One round trip: entry + snapshot check + usage event (+ single-flight lock)."""
    try:
        reply = _guard(
            _evalsha,
            "lookup",
            [key, stream_key(), config_version_key(), lock_key],
            [config_version, hit_result, miss_result, lock_ms, lock_token, start_us,
             get_config()["STREAM_MAXLEN"], *event, META_PREFIX],
        )
    except BreakerOpen:
        raise  # nothing was sent: no lock can have been taken
    except RedisUnavailable:
        _abandon_lock(lock_key, lock_token if lock_ms else "")
        raise
    status = _text(reply[0])
    if status == "hit":
        return LookupReply(status, _text(reply[1]), reply[2], reply[3])
    return LookupReply(status, _text(reply[1]), foreign=len(reply) > 2 and reply[2] == b"1")


def store(
    key: str,
    *,
    config_version: str,
    ttl_ms: int,
    meta: bytes,
    body: bytes,
    record: bool,
    event: tuple[str, str, str, str],
    lock_key: str = "",
    lock_token: str = "",
) -> tuple[str, str]:
    try:
        reply = _guard(
            _evalsha,
            "store",
            [key, stream_key(), config_version_key(), lock_key or key],
            [config_version, ttl_ms, meta, body, "1" if record else "0",
             get_config()["STREAM_MAXLEN"], *event, lock_token],
        )
    except RedisUnavailable:
        _abandon_lock(lock_key, lock_token)  # our lookup took it; the store would have released it
        raise
    return _text(reply[0]), _text(reply[1])


def delete(key: str) -> None:
    _guard(_client().delete, key)


def unlock(lock_key: str, token: str) -> None:
    """Release a lock we own. Never raises: if Redis cannot be reached, the release is
    retried after the next successful call (and the lock expires by itself anyway)."""
    try:
        _guard(_script("unlock"), keys=[lock_key], args=[token])
    except RedisUnavailable:
        _abandon_lock(lock_key, token)


_token_counter = itertools.count()
_token_prefix: tuple[int, str] = (0, "")


def new_token() -> str:
    """A lock owner's token, unique across hosts, processes and calls. get_or_call makes one
    per lookup (used only on a miss), so the host name and random part are drawn once per
    process (again after a fork) and a counter tells calls apart."""
    global _token_prefix
    pid = os.getpid()
    if _token_prefix[0] != pid:
        _token_prefix = (pid, f"{socket.gethostname()}:{pid}:{uuid.uuid4().hex[:16]}:")
    return f"{_token_prefix[1]}{next(_token_counter)}"


def scan_delete(pattern: str, keep: str | None = None) -> int:
    """UNLINK keys matching ``pattern`` (always under ragcache's prefix), except those
    starting with ``keep``. Never FLUSHDB: the Redis may be shared."""
    if not pattern.startswith(prefix() + ":"):
        raise ValueError("ragcache only deletes keys under its own KEY_PREFIX")
    client = _bulk_client()
    deleted = 0
    cursor = 0
    while True:
        cursor, keys = _guard(client.scan, cursor=cursor, match=pattern, count=1000)
        doomed = [k for k in keys if not (keep and _text(k).startswith(keep))]
        if doomed:
            deleted += _guard(client.unlink, *doomed)
        if cursor == 0:
            return deleted


# --- policy snapshot version ----------------------------------------------------------

def get_config_version() -> str:
    value = _guard(_client().get, config_version_key())
    return _text(value) if value is not None else "0"


def bump_config_version() -> str:
    return _text(_guard(_client().incr, config_version_key()))


# --- usage events ---------------------------------------------------------------------

def append_event(fields: dict[str, str]) -> str:
    return _text(_guard(
        _client().xadd, stream_key(), fields, maxlen=get_config()["STREAM_MAXLEN"], approximate=True
    ))


def backlog() -> int:
    return int(_guard(_client().xlen, stream_key()))


def ensure_group() -> None:
    try:
        _guard(_bulk_client().xgroup_create, stream_key(), STREAM_GROUP, id="0", mkstream=True)
    except RedisCommandError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


# The two stream reads take the parser's reply as it is: redis-py's callbacks would build
# a dict per event in Python, which _decode_entries then rebuilds decoded; aggregation
# reads every event once, so that was a quarter of its CPU.

def claim_pending(consumer: str, count: int) -> list[tuple[str, dict[str, str]]]:
    """Take over events read but never acknowledged (a worker died mid-batch)."""
    reply = _guard(_raw_command, _bulk_client(), "XAUTOCLAIM", stream_key(), STREAM_GROUP, consumer, 0, "0-0",
                   "COUNT", count)
    return _decode_entries(reply[1])


def read_new(consumer: str, count: int) -> list[tuple[str, dict[str, str]]]:
    reply = _guard(_raw_command, _bulk_client(), "XREADGROUP", "GROUP", STREAM_GROUP, consumer, "COUNT", count,
                   "STREAMS", stream_key(), ">")
    if not reply:
        return []
    # RESP3: {stream: entries}; RESP2: [[stream, entries]]
    return _decode_entries(next(iter(reply.values())) if isinstance(reply, dict) else reply[0][1])


def _decode_entries(entries) -> list[tuple[str, dict[str, str]]]:
    """[(id, [field, value, ...])] as Redis sends them -> [(id, {field: value})], as str."""
    entries = [(entry_id, flat) for entry_id, flat in entries if flat is not None]  # None: deleted while pending
    try:
        # One decode and one split for the whole batch rather than one call per field. A
        # value may itself hold NUL: then the count is off and each field is decoded alone.
        values = b"\x00".join(itertools.chain.from_iterable(flat for _, flat in entries)).decode().split("\x00")
        if len(values) != sum(len(flat) for _, flat in entries):
            raise ValueError("NUL inside a value")
    except (TypeError, ValueError):  # TypeError: str items, from a client that decodes itself
        values = [_text(item) for _, flat in entries for item in flat]
    decoded = []
    start = 0
    for entry_id, flat in entries:
        end = start + len(flat)
        decoded.append((_text(entry_id), dict(zip(values[start:end:2], values[start + 1:end:2], strict=False))))
        start = end
    return decoded


def acknowledge(ids: list[str]) -> None:
    """Ack and delete: the stream then holds only events not yet aggregated."""
    if not ids:
        return
    pipe = _bulk_client().pipeline(transaction=True)
    pipe.xack(stream_key(), STREAM_GROUP, *ids)
    pipe.xdel(stream_key(), *ids)
    _guard(pipe.execute)


def acquire_lock(lock_key: str, token: str, timeout: float) -> bool:
    return bool(_guard(_client().set, lock_key, token, nx=True, px=int(timeout * 1000)))


def extend_lock(lock_key: str, token: str, timeout: float) -> bool:
    return bool(_guard(_script("extend"), keys=[lock_key], args=[token, int(timeout * 1000)]))


def ping() -> float:
    """Round-trip time of a PING in seconds. Bypasses the breaker: health must tell the truth."""
    client = _client()
    started = time.perf_counter()
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        breaker.failed(exc)
        raise RedisUnavailable(str(exc)) from exc
    breaker.succeeded()
    return time.perf_counter() - started


def record_aggregation(when: float) -> None:
    _guard(_client().set, f"{prefix()}:aggregation:last", repr(when))


def last_aggregation() -> float | None:
    value = _guard(_client().get, f"{prefix()}:aggregation:last")
    return float(value) if value is not None else None
