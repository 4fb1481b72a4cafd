"""The two drivers of the cache flows: one sync, one async.

A flow (flows.py) is a generator that decides everything and yields an *effect* each
time it needs the outside world: run a Redis script, wait for a leader's flight, sleep,
call the LLM, take the next chunk, hand a chunk to the consumer, reload the policies.
A driver executes the effect and sends the result back (or throws the exception in), so
the cache's logic is written once and these two small loops are all that differ
between ``get_or_call`` and ``aget_or_call``. (The shape of sans-I/O libraries such as
h11: the protocol decides, the caller does the I/O.)

The async driver never hops threads for Redis (``redis.asyncio``); only a caller's
sync ``call()``, a sync chunk iterator and a policy reload (the ORM) run in a worker
thread. Cancellation is thrown into the flow like any error, so its cleanup (releasing
a single-flight lock) runs in both drivers.
"""
from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from typing import Any

from asgiref.sync import sync_to_async

from . import astore, store
from .exceptions import InvalidRequestError
from .scripts import Script


class Run:
    """Run one script on the shard its keys belong to."""

    __slots__ = ("script", "keys", "args", "shard")

    def __init__(self, script: Script, keys: Sequence[str], args: Sequence, shard: int | None) -> None:
        self.script, self.keys, self.args, self.shard = script, keys, args, shard


class RunEach:
    """Run many scripts pipelined (a fan-out over shards); replies or exceptions.
    ``bulk``: on the maintenance client (its longer timeout); False for work done inside a
    request, which must never wait longer than the hot path's socket timeout."""

    __slots__ = ("commands", "bulk")

    def __init__(self, commands: list[tuple[Script, Sequence[str], Sequence]], bulk: bool = True) -> None:
        self.commands = commands
        self.bulk = bulk


class WaitFlight:
    """Read a leader's flight stream after ``after``, waiting up to ``block_ms``."""

    __slots__ = ("key", "after", "block_ms", "shard")

    def __init__(self, key: str, after: str, block_ms: int, shard: int) -> None:
        self.key, self.after, self.block_ms, self.shard = key, after, block_ms, shard


class Sleep:
    __slots__ = ("seconds",)

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds


class Call:
    """Call the caller's ``call()``; ``stream=True`` makes the result an iterator."""

    __slots__ = ("fn", "stream")

    def __init__(self, fn: Callable[[], Any], stream: bool = False) -> None:
        self.fn, self.stream = fn, stream


class Next:
    """The next chunk of an iterator (sync or async), or ``END``."""

    __slots__ = ("iterator",)

    def __init__(self, iterator: Any) -> None:
        self.iterator = iterator


class Close:
    """Close an upstream iterator the flow stops reading early (``close()``, or ``aclose()``
    for an async one), so that its connection is released at once."""

    __slots__ = ("iterator",)

    def __init__(self, iterator: Any) -> None:
        self.iterator = iterator


class Reload:
    """Load the policy snapshot from the database (the ORM: a thread in async code).
    ``version``: the newer policy version Redis showed (see PolicyRegistry.reload)."""

    __slots__ = ("version",)

    def __init__(self, version: int = 0) -> None:
        self.version = version


class Emit:
    """Hand one chunk to the stream's consumer (handled by the stream objects)."""

    __slots__ = ("chunk",)

    def __init__(self, chunk: Any) -> None:
        self.chunk = chunk


class Begin:
    """A stream knows whether it is a hit (handled by the stream objects)."""

    __slots__ = ("info",)

    def __init__(self, info: Any) -> None:
        self.info = info


class Done:
    """What ``step`` returns when the flow has ended (its return value)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


END = object()
RELOAD = Reload()

Flow = Generator[Any, Any, Any]


class ConsumerGone(Exception):
    """Thrown into a stream's flow when its consumer stops reading early."""


# --- upstream iterators ------------------------------------------------------------------

class _Closing:
    """The iterator of a chunk source that is not its own iterator (e.g. the openai SDK's
    ``Stream``): ``close()`` closes the iterator and the source, so that an upstream
    connection is released even when no chunk was read yet."""

    __slots__ = ("iterator", "source")

    def __init__(self, source: Any, iterator: Any) -> None:
        self.source, self.iterator = source, iterator

    def __iter__(self) -> _Closing:
        return self

    def __next__(self) -> Any:
        return next(self.iterator)

    def close(self) -> None:
        try:
            close = getattr(self.iterator, "close", None)
            if close is not None:
                close()
        finally:
            close = getattr(self.source, "close", None)
            if close is not None:
                close()


class _AClosing:
    """``_Closing`` for an async source (e.g. the SDK's ``AsyncStream``)."""

    __slots__ = ("iterator", "source")

    def __init__(self, source: Any, iterator: Any) -> None:
        self.source, self.iterator = source, iterator

    def __aiter__(self) -> _AClosing:
        return self

    async def __anext__(self) -> Any:
        return await self.iterator.__anext__()

    async def aclose(self) -> None:
        try:
            close = getattr(self.iterator, "aclose", None)
            if close is not None:
                await close()
        finally:
            close = getattr(self.source, "close", None) or getattr(self.source, "aclose", None)
            result = close() if close is not None else None
            if inspect.isawaitable(result):
                await result


def _iterator(source: Any) -> Any:
    iterator = iter(source)
    return iterator if iterator is source else _Closing(source, iterator)


def _aiterator(source: Any) -> Any:
    iterator = source.__aiter__()
    return iterator if iterator is source else _AClosing(source, iterator)


def _not_a_stream(result: Any) -> bool:
    """Iterable, but a whole answer rather than its chunks: a str would replay as single
    characters, a dict as its keys."""
    return isinstance(result, (str, bytes, bytearray, Mapping))


# --- sync --------------------------------------------------------------------------------

def _execute(effect: Any) -> Any:
    kind = type(effect)
    if kind is Run:
        return store.run(effect.script, effect.keys, effect.args, effect.shard)
    if kind is Call:
        result = effect.fn()
        if effect.stream:
            if not hasattr(result, "__iter__") or _not_a_stream(result):
                raise InvalidRequestError(
                    "call() must return an iterator of chunks (not a str, bytes or dict); for an async "
                    "iterator use aget_or_stream.")
            return _iterator(result)
        if inspect.isawaitable(result):
            close = getattr(result, "close", None)
            if close:
                close()
            raise InvalidRequestError("call() returned an awaitable: use the async API (aget_or_call).")
        return result
    if kind is Next:
        return next(effect.iterator, END)
    if kind is WaitFlight:
        return store.wait_flight(effect.key, effect.after, effect.block_ms, effect.shard)
    if kind is Sleep:
        time.sleep(effect.seconds)
        return None
    if kind is RunEach:
        return store.run_each(effect.commands, bulk=effect.bulk)
    if kind is Close:
        close = getattr(effect.iterator, "close", None)
        if close is not None:
            close()
        return None
    if kind is Reload:
        from .policies import registry

        return registry.reload(effect.version)
    raise TypeError(f"unknown effect {effect!r}")


def step(flow: Flow, value: Any = None, error: BaseException | None = None) -> Any:
    """Advance ``flow``, executing effects, until it yields ``Emit`` or ``Begin`` (returned)
    or ends (returns ``Done``)."""
    while True:
        try:
            effect = flow.throw(error) if error is not None else flow.send(value)
        except StopIteration as stop:
            return Done(stop.value)
        if type(effect) is Emit or type(effect) is Begin:
            return effect
        value = error = None
        try:
            value = _execute(effect)
        except BaseException as exc:  # noqa: BLE001 - thrown into the flow, which decides
            error = exc


def run(flow: Flow) -> Any:
    """Run a flow that does not stream to its end; returns its value."""
    effect = step(flow)
    if type(effect) is Done:
        return effect.value
    raise TypeError(f"flow yielded {effect!r} outside a stream")


# --- async -------------------------------------------------------------------------------

async def _call(fn: Callable[[], Any]) -> Any:
    if inspect.iscoroutinefunction(fn):
        return await fn()
    # A plain function may block (a sync HTTP client): run it off the event loop, in a
    # thread of its own (not thread_sensitive, so concurrent calls run side by side).
    result = await sync_to_async(fn, thread_sensitive=False)()
    if inspect.isawaitable(result):  # e.g. lambda: client.chat.completions.create(...)
        result = await result
    return result


async def _aexecute(effect: Any) -> Any:
    kind = type(effect)
    if kind is Run:
        return await astore.run(effect.script, effect.keys, effect.args, effect.shard)
    if kind is Call:
        result = await _call(effect.fn)
        if effect.stream:
            if hasattr(result, "__aiter__"):
                return _aiterator(result)
            if hasattr(result, "__iter__") and not _not_a_stream(result):
                return _iterator(result)
            raise InvalidRequestError(
                "call() must return an iterator or an async iterator of chunks (not a str, bytes or dict).")
        return result
    if kind is Next:
        iterator = effect.iterator
        if hasattr(iterator, "__anext__"):
            try:
                return await iterator.__anext__()
            except StopAsyncIteration:
                return END
        return await sync_to_async(next, thread_sensitive=False)(iterator, END)
    if kind is WaitFlight:
        return await astore.wait_flight(effect.key, effect.after, effect.block_ms, effect.shard)
    if kind is Sleep:
        await asyncio.sleep(effect.seconds)
        return None
    if kind is RunEach:
        return await astore.run_each(effect.commands, bulk=effect.bulk)
    if kind is Close:
        iterator = effect.iterator
        if hasattr(iterator, "aclose"):
            await iterator.aclose()
        elif hasattr(iterator, "close"):
            await sync_to_async(iterator.close, thread_sensitive=False)()
        return None
    if kind is Reload:
        from .policies import registry

        return await sync_to_async(registry.reload, thread_sensitive=True)(effect.version)
    raise TypeError(f"unknown effect {effect!r}")


async def astep(flow: Flow, value: Any = None, error: BaseException | None = None) -> Any:
    """``step`` for the event loop."""
    while True:
        try:
            effect = flow.throw(error) if error is not None else flow.send(value)
        except StopIteration as stop:
            return Done(stop.value)
        if type(effect) is Emit or type(effect) is Begin:
            return effect
        value = error = None
        try:
            value = await _aexecute(effect)
        except BaseException as exc:  # noqa: BLE001 - CancelledError included: the flow cleans up, then re-raises
            error = exc


async def arun(flow: Flow) -> Any:
    effect = await astep(flow)
    if type(effect) is Done:
        return effect.value
    raise TypeError(f"flow yielded {effect!r} outside a stream")
