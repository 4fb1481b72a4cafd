"""The async twin of store.py's hot path, on ``redis.asyncio``: scripts, fan-outs and
flight reads, with the same breaker and the same errors. Nothing here hops threads."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import hiredis
import redis

from . import connection
from .connection import breaker_for
from .scripts import Script
from .store import _NOSCRIPT, _flight_entries


async def _pinned_raw(args: Sequence, retry: bool = True) -> Any:
    """One command on an idle connection of the loop's hot path (see connection.async_idle).
    A reused connection that turns out dead (Redis restarted while it sat idle; the loop had
    not seen the close yet) is retried once on a new connection, and the other idle ones,
    surely dead too, are dropped: a burst after a restart must not fail request by request."""
    idle, make = connection.async_idle()
    conn = idle.pop() if idle else make()
    reused = conn.is_connected
    try:
        return await _command(idle, conn, args)
    except (redis.ConnectionError, ConnectionError):  # redis-py's TimeoutError is neither: never retried
        if not (reused and retry):
            raise
        while idle:
            await idle.pop().disconnect(nowait=True)
        return await _command(idle, make(), args)


def _packed(conn, args: Sequence) -> Any:
    """The command in RESP, packed by hiredis in C (redis-py's asyncio connection packs in
    Python, one encode() per argument: a fifth of an async hit's time). Anything hiredis
    does not take (a bool, None) goes to redis-py, which raises its usual DataError."""
    try:
        return hiredis.pack_command(tuple(args))
    except TypeError:
        return conn.pack_command(*args)


async def _command(idle, conn, args: Sequence) -> Any:
    try:
        # As redis-py's pool does: a connection the server closed, or holding unread data,
        # is replaced before it is used (can_read disconnects a broken one itself).
        if conn.is_connected and await conn.can_read():
            await conn.disconnect(nowait=True)
    except (redis.ConnectionError, OSError):
        pass
    try:
        await conn.send_packed_command(_packed(conn, args))
        reply = await conn.read_response()  # disconnects itself on errors and cancellation
    except redis.ResponseError:
        _put_back(idle, conn)  # an error reply, read in full: the connection is fine
        raise
    except BaseException:
        if conn.is_connected:  # failed while sending: its reply may still come
            await conn.disconnect(nowait=True)
        raise
    _put_back(idle, conn)
    return reply


def _put_back(idle, conn) -> None:
    if len(idle) < connection.MAX_IDLE_ASYNC:
        idle.append(conn)


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
    """A script on a cluster (standalone Redis: see run())."""
    client = await _client()
    try:
        return await client.evalsha(script.sha, len(keys), *keys, *args)
    except _NOSCRIPT:  # see store._evalsha
        return await client.eval(script.source, len(keys), *keys, *args)


async def guarded(coro_fn, *args, shard: int | None = None) -> Any:
    """``store.guarded`` for coroutines: the same breaker and errors."""
    breaker = breaker_for(shard)
    breaker.check()
    try:
        result = await coro_fn(*args)
    except Exception as exc:  # noqa: BLE001 - translated (CancelledError is no Exception: it passes)
        raise connection.translate(exc, breaker) from exc
    breaker.succeeded()
    return result


async def run(script: Script, keys: Sequence[str], args: Sequence, shard: int | None = None) -> Any:
    if connection.cluster_mode():
        return await guarded(_evalsha, script, keys, args, shard=shard)
    breaker = breaker_for(None)  # the hot path, one coroutine frame less than guarded()
    breaker.check()
    try:
        try:
            result = await _pinned_raw(("EVALSHA", script.sha, len(keys), *keys, *args), script.retry_safe)
        except _NOSCRIPT:
            await _pinned_raw(("SCRIPT", "LOAD", script.source))
            result = await _pinned_raw(("EVALSHA", script.sha, len(keys), *keys, *args), script.retry_safe)
    except Exception as exc:  # noqa: BLE001
        raise connection.translate(exc, breaker) from exc
    breaker.succeeded()
    return result


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
        client = await _client("bulk")
        try:
            return await client.xread({key: after}, count=1000, block=block_ms)
        except redis.ConnectionError:  # not a TimeoutError: redis-py's is no ConnectionError
            if connection.cluster_mode():
                raise  # the cluster client maps its nodes again itself
            # A pooled connection that was idle while Redis restarted can pass redis-py's asyncio
            # pool check and fail on first use ("Connection closed by server", seen about once
            # in 25 restarts); its idle siblings died with it. Drop them and read once more:
            # XREAD changes nothing, so a retry is safe.
            await client.connection_pool.disconnect(inuse_connections=False)
            return await client.xread({key: after}, count=1000, block=block_ms)

    return _flight_entries(await guarded(read, shard=shard))
