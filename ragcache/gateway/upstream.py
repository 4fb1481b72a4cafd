"""The upstream: an OpenAI-compatible ``/chat/completions``, reached with ``httpx``.

Configured by ``RAGCACHE["UPSTREAM"] = {"BASE_URL": "https://.../v1", "API_KEY": "...",
"TIMEOUT": 60}`` (``TIMEOUT``: seconds allowed for connecting and for each read, so a
stream may run longer as long as chunks keep coming). The API key is sent as
``Authorization: Bearer`` and nowhere else: never to the client, never to a log, never in
an error message. Nothing of the client's request but its JSON body is forwarded.

One ``httpx.AsyncClient`` per event loop (``shared_client``): under ASGI that is one
connection pool per process. ``new_client`` makes a private one (the WSGI path, whose
event loop lives for one request).

What the upstream does, as the gateway answers it:

- a 2xx JSON completion: the parsed object (``complete``);
- a 2xx SSE stream: ``open_stream`` waits for the first event, then returns a
  ``ChunkStream`` of the events' parsed JSON objects, parsed with httpx-sse; ``[DONE]`` ends
  it; an ``{"error": ...}`` event is handed on as a chunk (so it reaches the client, and the
  cache's admission refuses the stream) and ends it;
- a 4xx/5xx: ``UpstreamStatus`` (passed through: status, OpenAI-shaped body, rate-limit
  headers), except 401/403/407, which say the *gateway's* key was refused: a 502;
- a timeout: ``GatewayError`` 504; unreachable, a broken or malformed answer: 502.
"""
from __future__ import annotations

import asyncio
import logging
import weakref
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
from httpx_sse import EventSource

from ..conf import get_config
from .errors import UPSTREAM_ERROR, GatewayError

logger = logging.getLogger("ragcache.gateway")

DEFAULT_TIMEOUT = 60.0
MAX_ERROR_BODY = 256 * 1024
PASSED_HEADERS = ("retry-after", "retry-after-ms", "x-request-id")
PASSED_HEADER_PREFIXES = ("x-ratelimit-",)
USER_AGENT = "ragcache-gateway"


@dataclass(frozen=True, slots=True)
class Upstream:
    url: str  # .../chat/completions
    api_key: str
    timeout: httpx.Timeout

    def headers(self, *, stream: bool) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT,
                   "Accept": "text/event-stream" if stream else "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def __repr__(self) -> str:  # never the key
        return f"Upstream(url={self.url!r})"

    def redact(self, data: str) -> str:
        """``data`` from the upstream with the gateway's own key taken out: an upstream
        (or a proxy in front of it) may echo a request's credentials in an error message,
        and the key must never reach a client."""
        key = self.api_key
        if key and len(key) >= 8 and key in data:
            return data.replace(key, "[redacted]")
        return data


def configured() -> Upstream:
    """The upstream from ``RAGCACHE["UPSTREAM"]``; raises ``GatewayError`` 502 when it has no ``BASE_URL``."""
    config = get_config()["UPSTREAM"] or {}
    base = config.get("BASE_URL") if isinstance(config, dict) else None
    if not isinstance(base, str) or not base.strip():
        raise GatewayError(502, "The gateway has no upstream configured.", type_=UPSTREAM_ERROR,
                           code="upstream_not_configured")
    timeout = config.get("TIMEOUT")
    seconds = float(timeout) if isinstance(timeout, (int, float)) and not isinstance(timeout, bool) \
        and timeout > 0 else DEFAULT_TIMEOUT
    api_key = config.get("API_KEY") or ""
    return Upstream(base.strip().rstrip("/") + "/chat/completions", str(api_key),
                    httpx.Timeout(seconds, connect=min(seconds, 10.0)))


# --- clients ---------------------------------------------------------------------------------

_clients: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def new_client() -> httpx.AsyncClient:
    """A client of its own (close it with ``await client.aclose()``)."""
    return httpx.AsyncClient(follow_redirects=False, limits=httpx.Limits(max_connections=1000,
                                                                         max_keepalive_connections=100))


def shared_client() -> httpx.AsyncClient:
    """The running event loop's client, made on first use in that loop."""
    loop = asyncio.get_running_loop()
    client = _clients.get(loop)
    if client is None or client.is_closed:
        client = _clients[loop] = new_client()
    return client


# --- errors ------------------------------------------------------------------------------------

class UpstreamStatus(Exception):
    """A 4xx/5xx from the upstream, to pass on as it came: ``status``, ``content`` (an
    OpenAI-shaped error body) and the headers a client needs (``retry-after``, ...)."""

    def __init__(self, status: int, content: bytes, headers: dict[str, str]) -> None:
        super().__init__(f"upstream answered {status}")
        self.status, self.content, self.headers = status, content, headers


# The client's message stays generic; the cause goes to the operator's log (httpx's own
# messages name the error, e.g. "[Errno 111] Connection refused", never a header).

def _timeout(exc: Exception) -> GatewayError:
    logger.warning("ragcache gateway: upstream timeout (%s); RAGCACHE['UPSTREAM']['TIMEOUT'] bounds the wait",
                   type(exc).__name__)
    return GatewayError(504, "The upstream did not answer in time.", type_=UPSTREAM_ERROR, code="upstream_timeout")


def _unreachable(exc: Exception) -> GatewayError:
    logger.warning("ragcache gateway: upstream unreachable (%s: %s); check RAGCACHE['UPSTREAM']['BASE_URL']",
                   type(exc).__name__, str(exc)[:200])
    return GatewayError(502, "The upstream could not be reached.", type_=UPSTREAM_ERROR, code="upstream_unreachable")


def _protocol(what: str) -> GatewayError:
    logger.warning("ragcache gateway: the upstream %s", what)
    return GatewayError(502, f"The upstream {what}.", type_=UPSTREAM_ERROR, code="upstream_protocol_error")


def _openai_error_body(content: bytes, status: int, upstream: Upstream) -> bytes:
    """``content`` when it is an OpenAI-shaped error (without the gateway's key), else a body
    of that shape that says only the status (an upstream's HTML error page is not passed on)."""
    try:
        found = orjson.loads(upstream.redact(content.decode("utf-8", "replace")))
    except orjson.JSONDecodeError:
        found = None
    if isinstance(found, dict) and isinstance(found.get("error"), dict):
        return orjson.dumps(found)
    return orjson.dumps({"error": {"message": f"The upstream answered HTTP {status}.", "type": UPSTREAM_ERROR,
                                   "param": None, "code": f"upstream_{status}"}})


async def _read_limited(response: httpx.Response) -> bytes:
    data = bytearray()
    async for part in response.aiter_bytes():
        data += part
        if len(data) >= MAX_ERROR_BODY:
            break
    return bytes(data[:MAX_ERROR_BODY])


async def _check_status(response: httpx.Response, upstream: Upstream) -> None:
    """Raise for anything but a 2xx (reading at most ``MAX_ERROR_BODY`` of the body)."""
    status = response.status_code
    if 200 <= status < 300:
        return
    if status in (401, 403, 407):
        logger.warning("ragcache gateway: the upstream refused the gateway's own credentials (HTTP %d); check "
                       "RAGCACHE['UPSTREAM']['API_KEY']", status)
        raise GatewayError(502, "The upstream refused the gateway's credentials.", type_=UPSTREAM_ERROR,
                           code="upstream_auth_failed")
    if status < 400:
        raise _protocol(f"answered HTTP {status}")
    try:
        content = await _read_limited(response)
    except httpx.TimeoutException as exc:
        raise _timeout(exc) from None
    except httpx.HTTPError as exc:
        raise _unreachable(exc) from None
    headers = {name: value for name, value in response.headers.items()
               if name in PASSED_HEADERS or name.startswith(PASSED_HEADER_PREFIXES)}
    raise UpstreamStatus(status, _openai_error_body(content, status, upstream), headers)


async def _send(client: httpx.AsyncClient, upstream: Upstream, body: bytes, *, stream: bool) -> httpx.Response:
    """POST ``body`` upstream; the response with its body still unread (the caller closes it)."""
    request = client.build_request("POST", upstream.url, content=body, headers=upstream.headers(stream=stream),
                                   timeout=upstream.timeout)
    try:
        return await client.send(request, stream=True)
    except httpx.TimeoutException as exc:
        raise _timeout(exc) from None
    except httpx.HTTPError as exc:
        raise _unreachable(exc) from None


# --- JSON ------------------------------------------------------------------------------------------

async def complete(client: httpx.AsyncClient, upstream: Upstream, body: bytes) -> dict[str, Any]:
    """POST ``body`` (a JSON request with ``stream`` false or absent); the parsed answer.
    Raises ``UpstreamStatus`` or ``GatewayError`` (502, 504)."""
    response = await _send(client, upstream, body, stream=False)
    try:
        await _check_status(response, upstream)
        limit = int(get_config()["GATEWAY_MAX_RESPONSE_BYTES"])
        content = bytearray()
        async for part in response.aiter_bytes():
            content += part
            if len(content) > limit:  # never held without bound in memory
                logger.warning("ragcache gateway: an upstream answer exceeded RAGCACHE['GATEWAY_MAX_RESPONSE_BYTES'] "
                               "(%d bytes)", limit)
                raise GatewayError(502, f"The upstream's answer is larger than {limit} bytes.", type_=UPSTREAM_ERROR,
                                   code="upstream_response_too_large")
    except httpx.TimeoutException as exc:
        raise _timeout(exc) from None
    except httpx.HTTPError as exc:
        raise _unreachable(exc) from None
    finally:
        await response.aclose()
    try:
        answer = orjson.loads(upstream.redact(content.decode("utf-8", "replace")))
    except orjson.JSONDecodeError:
        raise _protocol("answered with a body that is not JSON") from None
    if not isinstance(answer, dict):
        raise _protocol("answered with JSON that is not an object")
    return answer


# --- streams ----------------------------------------------------------------------------------------

class ChunkStream:
    """The chunks (parsed JSON objects) of one upstream SSE stream, the first one already
    received. An async iterator; ``aclose()`` releases the connection, whether or not a
    chunk was read. Raises ``GatewayError`` 504 / 502 when the upstream stalls, breaks off,
    or ends without ``[DONE]`` (and without an error event)."""

    def __init__(self, response: httpx.Response, events: Any, first: dict) -> None:
        self._response = response
        self._events = events
        self._first: dict | None = first
        self._closed = False

    def __aiter__(self) -> ChunkStream:
        return self

    async def __anext__(self) -> dict:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        if self._closed:
            raise StopAsyncIteration
        try:
            return await self._events.__anext__()
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._events.aclose()
        finally:
            await self._response.aclose()


async def _events(response: httpx.Response, upstream: Upstream):
    """The data of the response's events as parsed JSON objects, until ``[DONE]`` or an error event."""
    source = EventSource(response).aiter_sse()
    ended = False
    try:
        async for event in source:
            data = event.data
            if data == "[DONE]":
                ended = True
                break
            if not data or event.event not in ("message", "error"):
                continue  # keep-alives, pings
            try:
                chunk = orjson.loads(upstream.redact(data))
            except orjson.JSONDecodeError:
                raise _protocol("sent a stream event that is not JSON") from None
            if event.event == "error" and not (isinstance(chunk, dict) and "error" in chunk):
                chunk = {"error": chunk}
            if not isinstance(chunk, dict):
                raise _protocol("sent a stream event that is not a JSON object")
            yield chunk
            if chunk.get("error"):
                ended = True
                break
    except httpx.TimeoutException as exc:
        raise _timeout(exc) from None
    except httpx.HTTPError:
        raise GatewayError(502, "The upstream broke off the stream.", type_=UPSTREAM_ERROR,
                           code="upstream_disconnected") from None
    finally:
        await source.aclose()
    if not ended:
        raise GatewayError(502, "The upstream ended the stream before it was complete.", type_=UPSTREAM_ERROR,
                           code="upstream_incomplete")


async def open_stream(client: httpx.AsyncClient, upstream: Upstream, body: bytes) -> ChunkStream:
    """POST ``body`` (a JSON request with ``stream: true``) and wait for the first event, so
    that a failure before any chunk is still an HTTP status. Raises ``UpstreamStatus`` or
    ``GatewayError`` (502, 504)."""
    response = await _send(client, upstream, body, stream=True)
    events = None
    try:
        await _check_status(response, upstream)
        content_type = response.headers.get("content-type", "").partition(";")[0].strip().lower()
        if content_type != "text/event-stream":
            raise _protocol("answered a stream request without an event stream")
        events = _events(response, upstream)
        try:
            first = await events.__anext__()
        except StopAsyncIteration:
            raise _protocol("ended the stream before its first chunk") from None
    except BaseException:
        if events is not None:
            await events.aclose()
        await response.aclose()
        raise
    return ChunkStream(response, events, first)
