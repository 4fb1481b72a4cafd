"""The stream objects ``get_or_stream`` and ``aget_or_stream`` return.

Both drive the same flow (flows.get_or_stream): the lookup happens when the object is
made (``await``-ed for the async one), so ``.hit`` and ``.key`` are known before the first
chunk; each chunk is pulled from the upstream only when the consumer asks for it, so
nothing is buffered. Closing the stream early (``close()``, ``break`` in a ``with`` block,
a client that disconnects) stores nothing and releases the single-flight lock.
"""
from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from .effects import Begin, ConsumerGone, Done, Flow, astep, step
from .outcomes import StreamInfo


class _Info:
    info: StreamInfo | None

    @property
    def hit(self) -> bool:
        """True when the chunks are a replay of a stored stream."""
        return self._known().hit

    @property
    def key(self) -> str | None:
        """The entry's Redis key (None under an unknown policy)."""
        return self._known().key

    @property
    def outcome(self) -> str:
        """hit, miss, shared (receiving an identical live stream), bypass, refresh or error."""
        return self._known().outcome

    @property
    def reason(self) -> str:
        return self._known().reason

    @property
    def key_id(self) -> str:
        return self._known().key_id

    @property
    def policy(self) -> str:
        return self._known().policy

    @property
    def cached(self):
        """The ``CachedResponse`` of a hit (its usage, cost and age), else None."""
        return self._known().cached

    def _known(self) -> StreamInfo:
        if self.info is None:
            raise RuntimeError("await aget_or_stream(...) first: the lookup has not run yet")
        return self.info


class ResponseStream(_Info, Iterator[Any]):
    """An iterator of chunks with ``.hit`` and ``.key``; a context manager that closes it."""

    def __init__(self, flow: Flow) -> None:
        self._flow = flow
        self._done = False
        self.info = None
        effect = step(flow)  # runs the lookup (and the LLM call on a miss) up to Begin
        if type(effect) is not Begin:
            raise TypeError("a stream flow must begin with Begin")
        self.info = effect.info

    def __iter__(self) -> ResponseStream:
        return self

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        try:
            effect = step(self._flow)
            while type(effect) is Begin:  # a follower whose leader failed calls the LLM itself
                self.info = effect.info
                effect = step(self._flow)
        except BaseException:
            self._done = True
            raise
        if type(effect) is Done:
            self._done = True
            raise StopIteration
        return effect.chunk

    def close(self) -> None:
        """Stop early: nothing is stored; followers of this stream fail over."""
        if self._done:
            return
        self._done = True
        try:
            step(self._flow, error=ConsumerGone())
        except ConsumerGone:
            pass

    def __enter__(self) -> ResponseStream:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_done", True):
            try:
                self.close()
            except Exception:  # noqa: BLE001 - never raise from a finaliser; the lock expires anyway
                pass


class AsyncResponseStream(_Info, AsyncIterator[Any]):
    """An async iterator of chunks. ``await`` it to run the lookup and learn ``.hit`` and
    ``.key`` first; ``async for`` awaits it by itself. An async context manager."""

    def __init__(self, flow: Flow) -> None:
        self._flow = flow
        self._done = False
        self._begun = False
        self.info = None

    async def _begin(self) -> None:
        if not self._begun:
            self._begun = True
            effect = await astep(self._flow)
            self.info = effect.info

    def __await__(self):
        return self._await().__await__()

    async def _await(self) -> AsyncResponseStream:
        await self._begin()
        return self

    def __aiter__(self) -> AsyncResponseStream:
        return self

    async def __anext__(self) -> Any:
        await self._begin()
        if self._done:
            raise StopAsyncIteration
        try:
            effect = await astep(self._flow)
            while type(effect) is Begin:  # a follower whose leader failed calls the LLM itself
                self.info = effect.info
                effect = await astep(self._flow)
        except BaseException:
            self._done = True
            raise
        if type(effect) is Done:
            self._done = True
            raise StopAsyncIteration
        return effect.chunk

    async def aclose(self) -> None:
        """Stop early: nothing is stored; followers of this stream fail over."""
        if self._done or not self._begun:
            self._done = True
            return
        self._done = True
        try:
            await astep(self._flow, error=ConsumerGone())
        except ConsumerGone:
            pass

    async def __aenter__(self) -> AsyncResponseStream:
        await self._begin()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.aclose()
