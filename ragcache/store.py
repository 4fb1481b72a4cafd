"""Every sync Redis call ragcache makes lives here (``astore`` is the async twin of the
hot-path part). Callers get plain Python values back, or ``RedisUnavailable`` when Redis
failed or the breaker is open; the cache flows turn that into a miss or ``False``.

Hot path: a script runs on a pooled connection directly (standalone Redis), skipping
redis-py's per-command wrapper (retry bookkeeping, hooks, option parsing: a fifth of a
hit's CPU). On a cluster the client routes each script to the master of its one slot.
Maintenance (aggregation reads, scans, fan-out writes) uses the ``bulk`` client, whose
socket timeout is ``BULK_SOCKET_TIMEOUT``, and visits every master on a cluster.
"""
from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Iterable, Sequence
from typing import Any

import redis

from . import connection
from .connection import BreakerOpen, RedisCommandError, RedisUnavailable, breaker_for
from .keys import Layout, layout
from .scripts import ALL, Script

__all__ = ["BreakerOpen", "RedisCommandError", "RedisUnavailable"]

logger = logging.getLogger("ragcache.store")

STREAM_GROUP = "ragcache-aggregators"
CONSUMER = "aggregator"  # one at a time (the aggregation lock), so one name: no consumer pile-up

_NOSCRIPT = redis.exceptions.NoScriptError


def current_layout() -> Layout:
    from .conf import get_config

    return layout(get_config()["KEY_PREFIX"])


def reset_clients() -> None:
    """Forget cached clients (settings changed, or tests)."""
    connection.reset()


def _pinned_raw(args: Sequence, retry: bool = True) -> Any:
    """One command on this thread's own connection (see connection.pinned). If the
    connection, reused, turns out dead (Redis restarted meanwhile), the command is retried
    once on a new one (the LOOKUP script treats a lock held by its own token as its own)."""
    conn = connection.pinned()
    reused = conn._sock is not None
    try:
        return _command(conn, args)
    except redis.ConnectionError:  # redis-py's TimeoutError is no ConnectionError: never retried
        if not (reused and retry):
            raise
        return _command(conn, args)  # disconnected by the failure: this connects afresh


def _command(conn, args: Sequence) -> Any:
    try:
        # What redis-py's pool checks before lending a connection: one the server closed
        # (a restart) or that holds unread data is replaced before it is used.
        if conn._sock is not None and conn.can_read():
            conn.disconnect()
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        conn.disconnect()
    try:
        conn.send_command(*args)
        return conn.read_response()
    except redis.ResponseError:
        raise  # an error reply, read in full: the connection is fine
    except BaseException:
        conn.disconnect()  # its reply may still come: never read it as the next command's
        raise


def _evalsha(script: Script, keys: Sequence[str], args: Sequence) -> Any:
    client = connection.client()
    if connection.cluster_mode():
        try:
            return client.evalsha(script.sha, len(keys), *keys, *args)
        except _NOSCRIPT:
            # A promoted replica or a restarted master has no scripts. EVAL runs it on the
            # slot's master and caches it there; SCRIPT LOAD would go to every master and
            # fail while another one is down.
            return client.eval(script.source, len(keys), *keys, *args)
    try:
        return _pinned_raw(("EVALSHA", script.sha, len(keys), *keys, *args), script.retry_safe)
    except _NOSCRIPT:
        _pinned_raw(("SCRIPT", "LOAD", script.source))
        return _pinned_raw(("EVALSHA", script.sha, len(keys), *keys, *args), script.retry_safe)


def guarded(fn, *args, shard: int | None = None, **kwargs):
    """Run ``fn`` under the breaker of ``shard`` (or of the whole server)."""
    breaker = breaker_for(shard)
    breaker.check()
    try:
        result = fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - translated: Redis trouble never reaches the caller as such
        raise connection.translate(exc, breaker) from exc
    breaker.succeeded()
    return result


# --- the cache's scripts -----------------------------------------------------------------

def run(script: Script, keys: Sequence[str], args: Sequence, shard: int | None = None) -> Any:
    return guarded(_evalsha, script, keys, args, shard=shard)


def run_each(commands: Sequence[tuple[Script, Sequence[str], Sequence]], bulk: bool = True) -> list[Any]:
    """Run many scripts (a fan-out over shards) pipelined: one round trip per master.
    Returns each reply, or the exception that command raised. ``bulk=False`` uses the
    hot-path client (its socket timeout) instead of the maintenance one."""
    if not commands:
        return []

    def pipelined():
        client = connection.client("bulk" if bulk else "main")
        replies = _pipeline(client, commands)
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, _NOSCRIPT)]
        if missing:  # a master without the scripts (promoted, restarted): EVAL loads them there
            for i, reply in zip(missing, _pipeline(client, [commands[i] for i in missing], load=True), strict=True):
                replies[i] = reply
        return replies

    return guarded(pipelined)


def _pipeline(client, commands, load: bool = False) -> list[Any]:
    """One pipeline (on a cluster: one per master, in parallel). ``execute_command``, not
    ``pipe.evalsha``: redis-py's cluster pipeline refuses the latter by name, yet routes an
    EVALSHA or EVAL with keys by its first key's slot like any keyed command."""
    pipe = client.pipeline(transaction=False)
    for script, keys, args in commands:
        pipe.execute_command("EVAL" if load else "EVALSHA", script.source if load else script.sha, len(keys),
                             *keys, *args)
    return pipe.execute(raise_on_error=False)


def wait_flight(key: str, after: str, block_ms: int, shard: int | None = None) -> list[tuple[str, dict]]:
    """Entries of a leader's flight stream after id ``after``, waiting up to ``block_ms``."""
    reply = guarded(connection.client("bulk").xread, {key: after}, count=1000, block=block_ms, shard=shard)
    return _flight_entries(reply)


def _flight_entries(reply) -> list[tuple[str, dict]]:
    if not reply:
        return []
    entries = next(iter(reply.values())) if isinstance(reply, dict) else reply[0][1]
    if entries and isinstance(entries[0], list) and len(entries) == 1 and isinstance(entries[0][0], list):
        entries = entries[0]  # RESP3 shape
    return [(_text(entry_id), fields or {}) for entry_id, fields in entries]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# --- maintenance -------------------------------------------------------------------------

def _masters(client) -> list[Any]:
    """One client per master: the cluster's primaries, or the standalone client itself."""
    if connection.cluster_mode():
        return [client.get_redis_connection(node) for node in client.get_primaries()]
    return [client]


def scan_delete(pattern: str, keep: str | None = None) -> int:
    """UNLINK keys matching ``pattern`` (always under ragcache's prefix) on every master,
    except those containing ``keep``. Never FLUSHDB: the Redis may be shared."""
    if not pattern.startswith(current_layout().root + ":"):
        raise ValueError("ragcache only deletes keys under its own KEY_PREFIX")

    def scan() -> int:
        deleted = 0
        for node in _masters(connection.client("bulk")):
            for batch in _scan(node, pattern):
                doomed = [k for k in batch if not (keep and keep in _text(k))]
                for key in doomed:  # one key per command: keys of a node span many slots
                    deleted += node.unlink(key)
        return deleted

    return guarded(scan)


def count_keys(pattern: str, limit: int, max_scanned: int | None = None) -> tuple[int, int, bool]:
    """(keys, bytes of their memory, complete) for at most ``limit`` keys matching
    ``pattern`` over every master: a bounded sample for the admin, never a full scan.
    ``max_scanned`` also bounds, per master, the keys SCAN walks through (matching or
    not, in steps of 1,000), so a large database costs no more than a small one.
    ``complete`` is False when either bound stopped the count."""

    def sample() -> tuple[int, int, bool]:
        seen, size, complete = 0, 0, True
        for node in _masters(connection.client("bulk")):
            cursor, walked = 0, 0
            while True:
                cursor, found = node.scan(cursor=cursor, match=pattern, count=1000)
                walked += 1000
                batch = found[: max(0, limit - seen)]
                if len(batch) < len(found):
                    complete = False
                if batch:  # MEMORY USAGE of a batch in one round trip
                    pipe = node.pipeline(transaction=False)
                    for key in batch:
                        pipe.memory_usage(key, samples=0)
                    sizes = pipe.execute()
                    seen += len(batch)
                    size += sum(int(n or 0) for n in sizes)
                if int(cursor) == 0 or not complete:
                    break
                if seen >= limit or (max_scanned is not None and walked >= max_scanned):
                    complete = False
                    break
            if not complete:
                break
        return seen, size, complete

    return guarded(sample)


def _scan(node, pattern: str) -> Iterable[list]:
    cursor = 0
    while True:
        cursor, keys = node.scan(cursor=cursor, match=pattern, count=1000)
        if keys:
            yield keys
        if int(cursor) == 0:
            return


def delete(key: str, shard: int | None = None) -> None:
    guarded(lambda: connection.client().unlink(key), shard=shard)


def entry_info(key: str, shard: int | None = None) -> dict[str, Any] | None:
    """An entry's metadata, stamps, size and time left, for the explain view; None if absent."""

    def read():
        client = connection.client()
        found = client.hmget(key, "m", "b", "s")
        if not found[0] and not found[1]:
            return None
        return {"meta": found[0], "body_bytes": len(found[1] or b""), "stamps": found[2],
                "ttl_ms": client.pttl(key), "memory": client.memory_usage(key, samples=0)}

    return guarded(read, shard=shard)


def backlog() -> int:
    """Usage events not yet aggregated, over every shard's stream."""

    def total() -> int:
        client = connection.client("bulk")
        pipe = client.pipeline(transaction=False)
        for stream in current_layout().streams:
            pipe.xlen(stream)
        return sum(n for n in pipe.execute(raise_on_error=False) if isinstance(n, int))

    return guarded(total)


def ensure_groups() -> None:
    """Create the consumer group on every shard's stream (MKSTREAM), once per process
    and again after a Redis restart (NOGROUP)."""

    def create():
        client = connection.client("bulk")
        pipe = client.pipeline(transaction=False)
        streams = current_layout().streams
        for stream in streams:
            pipe.xgroup_create(stream, STREAM_GROUP, id="0", mkstream=True)
        replies = pipe.execute(raise_on_error=False)
        foreign = [stream for stream, reply in zip(streams, replies, strict=True)
                   if isinstance(reply, Exception) and "WRONGTYPE" in str(reply)]
        if foreign:
            _remove_foreign(client, foreign)
            for stream in foreign:
                client.xgroup_create(stream, STREAM_GROUP, id="0", mkstream=True)
        for reply in replies:
            if isinstance(reply, Exception) and "BUSYGROUP" not in str(reply) and "WRONGTYPE" not in str(reply):
                raise reply

    guarded(create)


def _remove_foreign(client, keys: list[str]) -> None:
    logger.warning("ragcache: %d usage stream key(s) held data of another type; removed so that usage "
                   "events can be written and aggregated again", len(keys))
    for key in keys:  # one command per key: on a cluster they are in different slots
        client.unlink(key)


def read_events(count: int, pending: bool) -> list[tuple[int, str, dict | None]]:
    """About ``count`` events over all shards: our own pending ones (read by a run that
    died before acknowledging) or new ones, from the shards that have any. Returns
    (shard, stream id, fields with raw values; None for an event deleted while pending)."""

    def read() -> list[tuple[int, str, dict | None]]:
        client = connection.client("bulk")
        streams = current_layout().streams
        if pending:
            shards = list(range(len(streams)))
        else:
            pipe = client.pipeline(transaction=False)
            for stream in streams:
                pipe.xlen(stream)
            lengths = pipe.execute(raise_on_error=False)
            foreign = [streams[i] for i, length in enumerate(lengths) if isinstance(length, Exception)
                       and "WRONGTYPE" in str(length)]
            if foreign:  # a key of another type where a usage stream belongs: ours, so removed
                _remove_foreign(client, foreign)
                raise redis.ResponseError("NOGROUP: foreign data at a usage stream was removed")
            shards = [shard for shard, length in enumerate(lengths) if isinstance(length, int) and length]
        if not shards:
            return []
        per_shard = -(-count // len(shards))  # at most count (+ one per shard): AGGREGATE_BATCH bounds a batch
        pipe = client.pipeline(transaction=False)
        for shard in shards:
            pipe.execute_command("XREADGROUP", "GROUP", STREAM_GROUP, CONSUMER, "COUNT", per_shard,
                                 "STREAMS", streams[shard], "0" if pending else ">")
        events = []
        for shard, reply in zip(shards, pipe.execute(raise_on_error=False), strict=True):
            if isinstance(reply, Exception):
                if "NOGROUP" in str(reply):
                    raise redis.ResponseError("NOGROUP: the consumer groups are gone")
                raise reply
            for entry_id, fields in _stream_entries(reply):
                events.append((shard, entry_id, fields))
        return events

    return guarded(read)


def _stream_entries(reply) -> list[tuple[str, dict]]:
    if not reply:
        return []
    if isinstance(reply, dict):  # RESP3
        entries = next(iter(reply.values()))
    else:
        entries = reply[0][1]
    out = []
    for entry_id, flat in entries:
        if flat is None:  # deleted while pending
            out.append((_text(entry_id), None))
            continue
        if isinstance(flat, dict):
            out.append((_text(entry_id), flat))
        else:
            out.append((_text(entry_id), dict(zip(flat[::2], flat[1::2], strict=False))))
    return out


def acknowledge(ids_by_shard: dict[int, list[str]]) -> None:
    """Delete, then acknowledge: each stream then holds only events not yet aggregated. In
    this order a process that dies between the two leaves a deleted event pending (the next
    run reads it back without fields and acknowledges it), never an acknowledged event
    that stays in the stream for ever."""

    def ack():
        streams = current_layout().streams
        pipe = connection.client("bulk").pipeline(transaction=False)
        for shard, ids in ids_by_shard.items():
            if ids:
                pipe.xdel(streams[shard], *ids)
                pipe.xack(streams[shard], STREAM_GROUP, *ids)
        pipe.execute()

    guarded(ack)


def acquire_lock(lock_key: str, token: str, timeout: float) -> bool:
    return bool(guarded(connection.client().set, lock_key, token, nx=True, px=int(timeout * 1000)))


def extend_lock(lock_key: str, token: str, timeout: float) -> bool:
    from .scripts import LOCK

    return bool(guarded(_evalsha, LOCK, [lock_key], [token, int(timeout * 1000)]))


def release_lock(lock_key: str, token: str) -> None:
    """Release a maintenance lock we own; never raises (it expires by itself anyway)."""
    from .scripts import LOCK

    try:
        guarded(_evalsha, LOCK, [lock_key], [token, 0])
    except RedisUnavailable:
        pass


def ping() -> float:
    """Round-trip time of a PING in seconds, bypassing the breaker: health tells the truth.
    On a cluster, of the first master that answers: one master down is a partial outage
    (see ``nodes()``), not "Redis unreachable" (redis-py would ping only its default node)."""
    started = time.perf_counter()
    try:
        if connection.cluster_mode():
            started = _ping_any(_masters(connection.client()))
        else:
            connection.client().ping()
    except (redis.RedisError, OSError) as exc:
        connection.breaker.failed(exc)
        raise RedisUnavailable(str(exc)) from exc
    connection.breaker.succeeded()
    return time.perf_counter() - started


def _ping_any(masters: list[Any]) -> float:
    """PING each master until one answers; returns when that PING began."""
    error: BaseException = redis.ConnectionError("the cluster has no master")
    for master in masters:
        started = time.perf_counter()
        try:
            master.ping()
            return started
        except (redis.RedisError, OSError) as exc:
            error = exc
    raise error


def nodes() -> list[dict[str, Any]]:
    """Each master's address, reachability and memory state (for health and metrics). On a
    cluster, a master that does not answer makes the client map the slots again first, so
    that a replica promoted meanwhile is listed instead of the master it replaced."""
    client = connection.client("bulk")
    out = _nodes(client)
    if connection.cluster_mode() and not all(node["up"] for node in out):
        try:
            client.nodes_manager.initialize()
        except redis.exceptions.RedisClusterException:  # no node answered: what we saw stands
            return out
        out = _nodes(client)
    return out


def _nodes(client) -> list[dict[str, Any]]:
    out = []
    for node in _masters(client):
        kwargs = node.connection_pool.connection_kwargs
        address = f"{kwargs.get('host', kwargs.get('path', '?'))}:{kwargs.get('port', '')}"
        try:
            info = node.info("memory")
            maxmemory = int(info.get("maxmemory") or 0)
            used = int(info.get("used_memory") or 0)
            out.append({"address": address, "up": True, "used_memory": used, "maxmemory": maxmemory,
                        "maxmemory_policy": str(info.get("maxmemory_policy", "")),
                        "full": bool(maxmemory) and used >= maxmemory})
        except (redis.RedisError, OSError) as exc:
            out.append({"address": address, "up": False, "error": type(exc).__name__})
    return out


def record_aggregation(when: float) -> None:
    guarded(connection.client().set, current_layout().aggregation_last, repr(when))


def last_aggregation() -> float | None:
    """Unix time of the last aggregation run, or None when unknown (never run, or a value
    ragcache did not write: foreign bytes are not a timestamp)."""
    value = guarded(connection.client().get, current_layout().aggregation_last)
    if value is None:
        return None
    try:
        when = float(_text(value))
    except (ValueError, UnicodeDecodeError):
        return None
    return when if 0 < when < 1e11 else None


def load_scripts() -> None:
    """Load every script on every master (e.g. after a failover)."""
    client = connection.client("bulk")
    for script in ALL:
        guarded(client.script_load, script.source)


def new_token() -> str:
    """A lock owner's token: unique across hosts, processes and calls (random per process,
    drawn again after a fork, plus a counter)."""
    global _token_prefix
    pid = os.getpid()
    if _token_prefix[0] != pid:
        _token_prefix = (pid, os.urandom(6).hex())
    return f"{_token_prefix[1]}{next(_token_counter):x}"


_token_prefix: tuple[int, str] = (0, "")
_token_counter = itertools.count(1)
