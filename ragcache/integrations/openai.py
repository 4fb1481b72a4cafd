"""The official ``openai`` SDK through ragcache: wrap a client once, call it as before.

    import openai
    from ragcache.integrations.openai import cache_status, cached

    client = cached(openai.OpenAI(), policy="default")          # or openai.AsyncOpenAI()
    completion = client.chat.completions.create(model="gpt-4o-mini", messages=[...])
    cache_status(completion).hit                                  # False, then True

    with client.chat.completions.create(model="gpt-4o-mini", messages=[...], stream=True,
                                        stream_options={"include_usage": True}) as stream:
        stream.hit                                                # known before the first chunk
        for chunk in stream:                                      # ChatCompletionChunk objects
            ...

``client.chat.completions.create(...)`` goes through ``cache_service.get_or_call`` (JSON) or
``get_or_stream`` (``stream=True``), sync or async after the client. It returns the SDK's own
types: a ``ChatCompletion``, or a stream of ``ChatCompletionChunk`` (``CachedStream`` /
``AsyncCachedStream``: iterate it, ``close()`` it, use it as a context manager, as the SDK's
``Stream``). On a miss they are the objects the SDK made; on a hit they are rebuilt from the
recorded JSON the way the SDK builds them, so ``model_dump()`` and ``to_json()`` are equal to
the original's, chunk by chunk. Every other attribute of the client, of ``client.chat`` and of
``client.chat.completions`` is the wrapped client's own (uncached), and
``with_options(...)`` returns a wrapped copy.

Keys. ``messages`` and ``model`` and every other argument of ``create()`` enter the key
(tools, ``response_format``, ``reasoning_effort``, ``stream_options``, ``n``, ``seed``, ...),
except those the policy lists in ``ignored_params`` (by default transport and bookkeeping:
``stream``, ``user``, ``metadata``, ``timeout``, ``extra_headers``, ...). A stream and a JSON
completion never share an entry.

Per call, ``cache={...}`` (LiteLLM's names) is read by the wrapper and never sent upstream:
``"no-cache": True`` (skip the lookup, call and store: a refresh), ``"no-store": True`` (serve
a hit, never store), ``"ttl": seconds`` (shorter than the policy's only), ``"policy": name``,
``"scope": id``, ``"sources": ["doc:42", ...]`` (see ``invalidate_sources``). A bad value
raises ``ragcache.exceptions.InvalidRequestError`` (a ``ValueError``) before any call.

Hit or miss: ``cache_status(obj)`` returns a ``CacheStatus`` for what ``create()`` returned
(``None`` for anything else). Streams also have ``.hit``, ``.outcome`` and ``.reason``. The
status is kept outside the model's fields, so ``model_dump()``, ``to_json()`` and ``==`` are
unchanged.

Errors. What the SDK raises (``openai.APIStatusError`` such as ``RateLimitError``,
``APITimeoutError``, ``APIConnectionError``, an ``APIError`` mid-stream) reaches the caller
unchanged, with the SDK's own retries; nothing is stored for it, and identical calls waiting
on it make their own. Redis trouble is never raised: the call goes to the upstream.
"""
from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import openai
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from ..exceptions import InvalidRequestError
from ..services import cache_service
from ..streaming import AsyncResponseStream, ResponseStream

__all__ = ["AsyncCachedOpenAI", "AsyncCachedStream", "CacheStatus", "CachedOpenAI", "CachedStream", "cache_status",
           "cached"]

STATUS_ATTRIBUTE = "_ragcache_status"
CONTROLS = ("no-cache", "no-store", "ttl", "policy", "scope", "sources")


@dataclass(frozen=True)
class CacheStatus:
    """How ragcache answered one ``create()`` call.

    ``outcome``: ``hit`` (a stored answer), ``shared`` (a stream received live from an
    identical call in flight; no upstream call unless that call failed first), ``miss``,
    ``refresh`` (``no-cache``), ``bypass`` (the policy is off, unknown, rolled out elsewhere,
    or the kill switch is on) or ``error`` (Redis unavailable). ``reason`` says why when there
    is one. ``stored`` is whether a JSON miss was stored (``None`` for streams, decided at
    their end). ``age_seconds``: how old a hit's answer is. ``key_id``: the short key that
    logs and usage records show.
    """

    hit: bool
    outcome: str
    reason: str
    policy: str
    key_id: str
    stored: bool | None = None
    age_seconds: float | None = None


def cache_status(obj: Any) -> CacheStatus | None:
    """The ``CacheStatus`` of a ``ChatCompletion`` or stream a wrapped client returned; None
    for any other object."""
    return getattr(obj, STATUS_ATTRIBUTE, None)


def _tag(obj: Any, status: CacheStatus) -> Any:
    # A plain instance attribute, outside pydantic's fields and extras: model_dump(), to_json()
    # and == ignore it.
    object.__setattr__(obj, STATUS_ATTRIBUTE, status)
    return obj


# --- requests ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Defaults:
    policy: str
    scope: Any
    context_version: Any


def _omitted(value: Any) -> bool:
    return isinstance(value, (openai.NotGiven, openai.Omit))


def _jsonable(value: Any) -> Any:
    """A request value as JSON for the key: SDK and pydantic objects as the SDK sends them."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, Mapping):
        return {key: _jsonable(item) for key, item in value.items() if not _omitted(item)}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    dump = getattr(value, "model_dump", None)
    if callable(dump) and not isinstance(value, type):
        return dump(mode="json", exclude_unset=True, by_alias=True)
    return value  # the key builder says clearly what it cannot key


def _controls(value: Any, defaults: _Defaults) -> dict[str, Any]:
    """The service's per-call kwargs from ``cache={...}``; raises ``InvalidRequestError``."""
    options: dict[str, Any] = {"policy": defaults.policy, "scope": defaults.scope}
    if value is None:
        return options
    if not isinstance(value, Mapping):
        raise InvalidRequestError(f'cache= must be a dict such as {{"no-cache": True}}, not {type(value).__name__}.')
    unknown = [name for name in value if name not in CONTROLS]
    if unknown:
        raise InvalidRequestError(f"Unknown cache control {unknown[0]!r}: use one of {', '.join(CONTROLS)}.")
    for name, kwarg in (("no-cache", "refresh"), ("no-store", "no_store")):
        if name in value:
            if not isinstance(value[name], bool):
                raise InvalidRequestError(f'cache["{name}"] must be True or False, not {value[name]!r}.')
            options[kwarg] = value[name]
    if "ttl" in value:
        ttl = value["ttl"]
        if not isinstance(ttl, int) or isinstance(ttl, bool) or ttl < 1:
            raise InvalidRequestError(f'cache["ttl"] must be a positive number of seconds, not {ttl!r}.')
        options["ttl"] = ttl
    if "policy" in value:
        if not isinstance(value["policy"], str) or not value["policy"]:
            raise InvalidRequestError(f'cache["policy"] must be the name of a cache policy, not {value["policy"]!r}.')
        options["policy"] = value["policy"]
    if "scope" in value:
        options["scope"] = value["scope"]
    if "sources" in value:
        options["sources"] = value["sources"]
    return options


@dataclass
class _Request:
    upstream: dict[str, Any]  # what create() sends: the caller's kwargs without cache=
    messages: Any
    model: str
    params: dict[str, Any]
    stream: bool
    options: dict[str, Any]


def _request(kwargs: dict[str, Any], defaults: _Defaults) -> _Request | None:
    """Split create()'s kwargs; None when they cannot be cached (the SDK then says what is wrong)."""
    options = _controls(kwargs.pop("cache", None), defaults)
    for name, value in kwargs.items():
        if isinstance(value, Iterator):  # e.g. messages=(m for m in ...): read once, for the key and the call
            kwargs[name] = list(value)
    model, messages = kwargs.get("model"), kwargs.get("messages")
    if not isinstance(model, str) or not model or messages is None or _omitted(messages):
        return None
    params = {name: _jsonable(value) for name, value in kwargs.items()
              if name not in ("messages", "model") and not _omitted(value)}
    return _Request(kwargs, _key_messages(messages), model, params, kwargs.get("stream") is True, options)


def _key_messages(messages: Any) -> Any:
    """Messages as the key reads them. OpenAI accepts an assistant message with
    ``tool_calls`` and no ``content``; for the key that is ``content: None``."""
    found = _jsonable(messages)
    if isinstance(found, list):
        return [{"content": None, **m} if isinstance(m, dict) and "content" not in m else m for m in found]
    return found


def _service_kwargs(request: _Request, defaults: _Defaults) -> dict[str, Any]:
    return {"model": request.model, "params": request.params, "context_version": defaults.context_version,
            **request.options}


def _completion_status(result: Any) -> CacheStatus:
    age = result.cached.age_seconds if result.hit and result.cached is not None else None
    return CacheStatus(result.hit, result.outcome, result.reason, result.policy, result.key_id, result.stored, age)


def _stream_status(stream: ResponseStream | AsyncResponseStream) -> CacheStatus:
    cached_ = stream.cached
    age = cached_.age_seconds if stream.hit and cached_ is not None else None
    return CacheStatus(stream.hit, stream.outcome, stream.reason, stream.policy, stream.key_id, None, age)


def _completion(response: Any) -> Any:
    if isinstance(response, dict):  # a hit: the recorded JSON, built the way the SDK builds it
        return ChatCompletion.construct(**response)
    return response


def _chunk(chunk: Any) -> Any:
    if isinstance(chunk, dict):  # replayed, or received from an identical stream in flight
        return ChatCompletionChunk.construct(**chunk)
    return chunk


# --- streams ------------------------------------------------------------------------------------

def _closing(stream: Any) -> Iterator[Any]:
    """The SDK stream's chunks; closing this generator closes the SDK stream (its connection)."""
    try:
        yield from stream
    finally:
        stream.close()


async def _aclosing(stream: Any) -> AsyncIterator[Any]:
    try:
        async for chunk in stream:
            yield chunk
    finally:
        await stream.close()


class _Status:
    status: CacheStatus

    @property
    def hit(self) -> bool:
        """True when the chunks are a replay of a stored stream."""
        return self.status.hit

    @property
    def outcome(self) -> str:
        """hit, shared, miss, refresh, bypass or error (see ``CacheStatus``)."""
        return self.status.outcome

    @property
    def reason(self) -> str:
        return self.status.reason


class CachedStream(_Status, Iterator[ChatCompletionChunk]):
    """A stream of ``ChatCompletionChunk`` like the SDK's ``Stream``: iterate it, ``close()``
    it or use ``with``. ``.hit``, ``.outcome``, ``.reason`` and ``.status`` (a
    ``CacheStatus``) are known before the first chunk. Closing it early stores nothing and
    closes the upstream connection."""

    def __init__(self, stream: ResponseStream) -> None:
        self._stream = stream
        self.status = _stream_status(stream)
        _tag(self, self.status)


    def __iter__(self) -> CachedStream:
        return self

    def __next__(self) -> ChatCompletionChunk:
        return _chunk(next(self._stream))

    def close(self) -> None:
        self._stream.close()

    def __enter__(self) -> CachedStream:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


class AsyncCachedStream(_Status, AsyncIterator[ChatCompletionChunk]):
    """The async twin of ``CachedStream`` (the SDK's ``AsyncStream``): ``async for``,
    ``await stream.close()``, ``async with``."""

    def __init__(self, stream: AsyncResponseStream) -> None:
        self._stream = stream
        self.status = _stream_status(stream)
        _tag(self, self.status)


    def __aiter__(self) -> AsyncCachedStream:
        return self

    async def __anext__(self) -> ChatCompletionChunk:
        return _chunk(await self._stream.__anext__())

    async def close(self) -> None:
        await self._stream.aclose()

    aclose = close

    async def __aenter__(self) -> AsyncCachedStream:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()


# --- the wrappers ---------------------------------------------------------------------------------

class _Proxy:
    """Delegates every attribute it does not define to the wrapped object."""

    def __init__(self, wrapped: Any) -> None:
        object.__setattr__(self, "_wrapped", wrapped)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._wrapped, name)

    def __repr__(self) -> str:
        return f"<ragcache {type(self).__name__} of {self._wrapped!r}>"


class _Completions(_Proxy):
    def __init__(self, completions: Any, defaults: _Defaults) -> None:
        super().__init__(completions)
        object.__setattr__(self, "_defaults", defaults)

    def create(self, **kwargs: Any) -> ChatCompletion | CachedStream:
        """``chat.completions.create`` through the cache (see the module docstring). Raises
        what the SDK raises, and ``InvalidRequestError`` for a bad ``cache=``."""
        request = _request(kwargs, self._defaults)
        if request is None:
            return self._wrapped.create(**kwargs)
        create, upstream = self._wrapped.create, request.upstream
        if request.stream:
            stream = cache_service.get_or_stream(request.messages, lambda: _closing(create(**upstream)),
                                                 **_service_kwargs(request, self._defaults))
            return CachedStream(stream)
        result = cache_service.get_or_call(request.messages, lambda: create(**upstream),
                                           **_service_kwargs(request, self._defaults))
        return _tag(_completion(result.response), _completion_status(result))


class _AsyncCompletions(_Proxy):
    def __init__(self, completions: Any, defaults: _Defaults) -> None:
        super().__init__(completions)
        object.__setattr__(self, "_defaults", defaults)

    async def create(self, **kwargs: Any) -> ChatCompletion | AsyncCachedStream:
        """The async ``create``: native on the event loop (``redis.asyncio``)."""
        request = _request(kwargs, self._defaults)
        if request is None:
            return await self._wrapped.create(**kwargs)
        create, upstream = self._wrapped.create, request.upstream
        if request.stream:
            async def call() -> AsyncIterator[Any]:
                return _aclosing(await create(**upstream))

            stream = cache_service.aget_or_stream(request.messages, call, **_service_kwargs(request, self._defaults))
            await stream
            return AsyncCachedStream(stream)

        async def call_json() -> Any:
            return await create(**upstream)

        result = await cache_service.aget_or_call(request.messages, call_json,
                                                  **_service_kwargs(request, self._defaults))
        return _tag(_completion(result.response), _completion_status(result))


class _Chat(_Proxy):
    def __init__(self, chat: Any, completions: _Proxy) -> None:
        super().__init__(chat)
        object.__setattr__(self, "completions", completions)


class CachedOpenAI(_Proxy):
    """An ``openai.OpenAI`` whose ``chat.completions.create`` goes through ragcache;
    ``.wrapped`` is the client itself."""

    _completions_class: type[_Proxy] = _Completions

    def __init__(self, client: Any, *, policy: str = "default", scope: Any = None,
                 context_version: Any = None) -> None:
        super().__init__(client)
        defaults = _Defaults(policy, scope, context_version)
        object.__setattr__(self, "_defaults", defaults)
        object.__setattr__(self, "chat", _Chat(client.chat, self._completions_class(client.chat.completions,
                                                                                     defaults)))

    @property
    def wrapped(self) -> Any:
        return self._wrapped

    def with_options(self, **options: Any) -> CachedOpenAI:
        """The wrapped client's ``with_options(...)``, wrapped alike."""
        defaults = self._defaults
        return type(self)(self._wrapped.with_options(**options), policy=defaults.policy, scope=defaults.scope,
                          context_version=defaults.context_version)

    copy = with_options


class AsyncCachedOpenAI(CachedOpenAI):
    """An ``openai.AsyncOpenAI`` whose ``chat.completions.create`` goes through ragcache."""

    _completions_class = _AsyncCompletions


def _is_async(client: Any) -> bool:
    if isinstance(client, openai.AsyncOpenAI):
        return True
    if isinstance(client, openai.OpenAI):
        return False
    try:
        create = client.chat.completions.create
    except AttributeError:
        raise TypeError(f"cached() wraps an openai.OpenAI or openai.AsyncOpenAI client, not a "
                        f"{type(client).__name__}.") from None
    return inspect.iscoroutinefunction(create)


def cached(client: Any, *, policy: str = "default", scope: Any = None,
           context_version: Any = None) -> CachedOpenAI | AsyncCachedOpenAI:
    """Wrap ``client`` (``openai.OpenAI`` or ``openai.AsyncOpenAI``, or a compatible client such
    as ``AzureOpenAI``) so that ``client.chat.completions.create`` goes through the cache under
    ``policy`` (a ``CachePolicy`` name), for ``scope`` (the user or tenant id a per-user or
    per-tenant policy needs) and ``context_version`` (e.g. your index's version; enters every
    key). Raises ``TypeError`` for anything else; ``ScopeRequiredError`` is raised at the first
    call under a scoped policy without a scope."""
    if not isinstance(policy, str) or not policy:
        raise InvalidRequestError("policy must be the name of a cache policy, e.g. policy='default'.")
    if isinstance(client, CachedOpenAI):
        client = client.wrapped
    wrapper = AsyncCachedOpenAI if _is_async(client) else CachedOpenAI
    return wrapper(client, policy=policy, scope=scope, context_version=context_version)
