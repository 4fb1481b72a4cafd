"""The async twin of store.py's hot path, on ``redis.asyncio``: scripts, fan-outs and
flight reads, with the same breaker and the same errors. Nothing here hops threads."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis

from . import connection
from .connection import RedisCommandError, RedisUnavailable, breaker_for
from .scripts import Script
from .store import _NOSCRIPT, _flight_entries


async def _raw(pool, args: Sequence) -> Any:
    conn = await pool.get_connection()
    try:
        await conn.send_command(*args)
        return await conn.read_response()  # disconnects itself on errors and cancellation
    finally:
        await pool.release(conn)


async def _client(kind: str = "main") -> Any:
    """The loop's client. A cluster client maps its slots before any command is sent:
    when concurrent first commands make redis-py's asyncio RedisCluster initialise itself,
    some of them fail with ConnectionError. ``initialize()`` is a no-op once done (and
    maps again after a node failed)."""
    client = connection.async_client(kind)
    if connection.cluster_mode():
        try:
            await client.initialize()
        except redis.exceptions.RedisClusterException as exc:  # no node answered; not a RedisError
            raise redis.ConnectionError(str(exc)) from exc
    return client


async def _evalsha(script: Script, keys: Sequence[str], args: Sequence) -> Any:
    client = await _client()
    if connection.cluster_mode():
        try:
            return await client.evalsha(script.sha, len(keys), *keys, *args)
        except _NOSCRIPT:  # see store._evalsha
            return await client.eval(script.source, len(keys), *keys, *args)
    pool = client.connection_pool
    try:
        return await _raw(pool, ("EVALSHA", script.sha, len(keys), *keys, *args))
    except _NOSCRIPT:
        await _raw(pool, ("SCRIPT", "LOAD", script.source))
        return await _raw(pool, ("EVALSHA", script.sha, len(keys), *keys, *args))


async def guarded(coro_fn, *args, shard: int | None = None) -> Any:
    breaker = breaker_for(shard)
    breaker.check()
    try:
        result = await coro_fn(*args)
    except redis.ResponseError as exc:
        if connection.error_kind(exc) == "cluster":
            breaker.failed(exc)
            raise RedisUnavailable(str(exc)) from exc
        connection.metrics.child(connection.metrics.REDIS_ERRORS, connection.error_kind(exc)).inc()
        breaker.succeeded()
        raise RedisCommandError(str(exc)) from exc
    except (redis.RedisError, OSError) as exc:
        breaker.failed(exc)
        raise RedisUnavailable(str(exc)) from exc
    except Exception as exc:  # noqa: BLE001
        # redis.asyncio's cluster client can fail with more than RedisError when a master
        # dies: e.g. AttributeError ('NoneType' has no 'writelines') when a concurrent
        # command's failure closed the connection this one was about to write to. Still
        # Redis trouble, never the caller's (kind "other" in ragcache_redis_errors_total).
        breaker.failed(exc)
        raise RedisUnavailable(f"{type(exc).__name__}: {exc}") from exc
    breaker.succeeded()
    return result


async def run(script: Script, keys: Sequence[str], args: Sequence, shard: int | None = None) -> Any:
    return await guarded(_evalsha, script, keys, args, shard=shard)


async def run_each(commands: Sequence[tuple[Script, Sequence[str], Sequence]], bulk: bool = True) -> list[Any]:
    if not commands:
        return []

    async def pipelined():
        client = await _client("bulk" if bulk else "main")
        replies = await _pipeline(client, commands)
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, _NOSCRIPT)]
        if missing:  # see store.run_each
            retried = await _pipeline(client, [commands[i] for i in missing], load=True)
            for i, reply in zip(missing, retried, strict=True):
                replies[i] = reply
        return replies

    return await guarded(pipelined)


async def _pipeline(client, commands, load: bool = False) -> list[Any]:
    """See store._pipeline."""
    pipe = client.pipeline(transaction=False)
    for script, keys, args in commands:
        pipe.execute_command("EVAL" if load else "EVALSHA", script.source if load else script.sha, len(keys),
                             *keys, *args)
    return await pipe.execute(raise_on_error=False)


async def wait_flight(key: str, after: str, block_ms: int, shard: int | None = None) -> list[tuple[str, dict]]:
    async def read():
        return await (await _client("bulk")).xread({key: after}, count=1000, block=block_ms)

    return _flight_entries(await guarded(read, shard=shard))
