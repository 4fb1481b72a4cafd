"""``POST /v1/chat/completions``: OpenAI's Chat Completions API in front of an upstream,
through ragcache (``cache_service.aget_or_call`` for JSON, ``aget_or_stream`` for SSE).

Request: ``Authorization: Bearer <gateway key>`` and a Chat Completions JSON body; the
optional cache controls are described in controls.py. The scope of every entry is the
key's, never anything in the request.

Response: the upstream's answer, or the stored one, with

- ``X-Ragcache``: ``HIT`` (a stored answer, or an identical request's stream received live),
  ``MISS``, ``REFRESH`` (``Cache-Control: no-cache``) or ``BYPASS`` (the cache was not used;
  ``X-Ragcache-Reason`` says why: kill_switch, disabled, mode_off, rollout,
  unknown_policy, redis_unavailable, ...);
- ``X-Ragcache-Key``: the short key id that logs and usage records show;
- ``X-Ragcache-Policy``; ``X-Ragcache-Reason`` when there is a reason;
- on a hit: ``Age`` (seconds since it was stored), and when known ``X-Ragcache-Tokens-Avoided``
  and ``X-Ragcache-Cost-Avoided`` (``"<amount> <currency>"``).

A hit is byte for byte what the miss delivered: each JSON document (the completion, or each
stream event's data) is written with orjson both times, and a stream is framed
``data: <json>\\n\\n`` per chunk and ends with ``data: [DONE]\\n\\n``.

Under ASGI streams are passed on chunk by chunk and a client that goes away cancels the
stream (nothing stored, the single-flight lock released, the upstream connection closed).
Under WSGI the view runs in an event loop of its own per request, so a stream is
collected whole and sent as one body (same bytes, no token-by-token delivery).
"""
from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import httpx
import orjson
from django.core.handlers.asgi import ASGIRequest
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt

from ..entries import CachedResponse, Usage
from ..exceptions import InvalidRequestError, ScopeRequiredError, StreamInterrupted
from ..policies import GatewayClient, Snapshot
from ..services import cache_service
from ..streaming import AsyncResponseStream
from . import auth, upstream
from .controls import Controls, read_controls
from .errors import UPSTREAM_ERROR, GatewayError, error_event, error_response
from .payload import ChatRequest, read_request

logger = logging.getLogger("ragcache.gateway")

DONE = b"data: [DONE]\n\n"
CACHE_HEADER = {"hit": "HIT", "shared": "HIT", "miss": "MISS", "refresh": "REFRESH"}  # else BYPASS


def frame(chunk: Any) -> bytes:
    """One SSE event of a chunk, the same bytes on a miss and on a hit."""
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


# --- response headers --------------------------------------------------------------------------

def _amount(value: Decimal) -> str:
    return format(value.quantize(Decimal("1e-12")).normalize(), "f")


def _savings(cached: CachedResponse, snapshot: Snapshot, model: str) -> dict[str, str]:
    if not cached.usage_known:
        return {}
    found = {"X-Ragcache-Tokens-Avoided": str(cached.tokens)}
    price = snapshot.prices.get(cached.model) or snapshot.prices.get(model)
    cost = cached.cost
    if cost is None and price is not None:
        cost = price.cost(Usage(cached.prompt_tokens, cached.cached_prompt_tokens, cached.completion_tokens, True))
    if cost is not None:
        found["X-Ragcache-Cost-Avoided"] = f"{_amount(cost)} {price.currency if price else ''}".strip()
    return found


def cache_headers(outcome: str, reason: str, policy: str, key_id: str, cached: CachedResponse | None,
                  snapshot: Snapshot, model: str) -> dict[str, str]:
    """The ``X-Ragcache*`` and ``Age`` headers of an answer."""
    if outcome == "shared":
        reason = reason or "shared_flight"
    headers = {"X-Ragcache": CACHE_HEADER.get(outcome, "BYPASS"), "X-Ragcache-Key": key_id,
               "X-Ragcache-Policy": policy}
    if outcome == "error" and not reason:
        reason = "redis_unavailable"
    if reason:
        headers["X-Ragcache-Reason"] = reason
    if outcome == "hit" and cached is not None:
        headers["Age"] = str(int(cached.age_seconds))
        headers.update(_savings(cached, snapshot, model))
    return headers


# --- the view ---------------------------------------------------------------------------------------

def _service_kwargs(chat: ChatRequest, client: GatewayClient, controls: Controls) -> dict[str, Any]:
    return {"model": chat.model, "params": chat.params, "policy": controls.policy, "scope": client.scope or None,
            "sources": controls.sources, "refresh": controls.refresh, "no_store": controls.no_store,
            "ttl": controls.ttl, "gateway_key": client.name}


def _scope_required(exc: ScopeRequiredError, client: GatewayClient) -> GatewayError:
    return GatewayError(403, f"The cache policy {exc.policy!r} caches per {exc.scope_kind}, and the gateway key "
                        f"{client.name!r} has no scope: give the key a scope.", code="scope_required")


def _method_not_allowed() -> HttpResponse:
    error = GatewayError(405, "Use POST for /v1/chat/completions.", code="method_not_allowed",
                         headers={"Allow": "POST"})
    return error_response(error)


@csrf_exempt
async def chat_completions(request: HttpRequest) -> HttpResponse:
    """``POST /v1/chat/completions`` (see the module docstring)."""
    if request.method != "POST":
        return _method_not_allowed()
    try:
        client, snapshot = await auth.authenticate(request)
        chat = read_request(request)
        controls = read_controls(request, client, snapshot)
        target = upstream.configured()
    except GatewayError as error:
        return error_response(error)
    asgi = isinstance(request, ASGIRequest)
    # Under WSGI this event loop ends with the request: its own client, closed below.
    http = upstream.shared_client() if asgi else upstream.new_client()
    try:
        if chat.stream:
            return await _stream(chat, client, controls, snapshot, http, target, collect=not asgi)
        return await _complete(chat, client, controls, snapshot, http, target)
    finally:
        if not asgi:
            await http.aclose()


def _upstream_status(error: upstream.UpstreamStatus) -> HttpResponse:
    response = HttpResponse(error.content, status=error.status, content_type="application/json")
    for name, value in error.headers.items():
        response[name] = value
    return response


# What a cached call can raise before any byte of the answer is sent: each is a response.
CALL_FAILURES = (upstream.UpstreamStatus, GatewayError, InvalidRequestError)


def _failure_response(exc: Exception, client: GatewayClient) -> HttpResponse:
    if isinstance(exc, upstream.UpstreamStatus):
        return _upstream_status(exc)
    if isinstance(exc, GatewayError):
        return error_response(exc)
    if isinstance(exc, ScopeRequiredError):
        return error_response(_scope_required(exc, client))
    return error_response(GatewayError(400, str(exc)[:500], code="invalid_request"))


def _log(client: GatewayClient, outcome: str, reason: str, key_id: str, stream: bool) -> None:
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("ragcache gateway: key=%s outcome=%s reason=%s cache_key=%s stream=%s", client.name, outcome,
                     reason or "-", key_id, stream)


async def _complete(chat: ChatRequest, client: GatewayClient, controls: Controls, snapshot: Snapshot,
                    http: httpx.AsyncClient, target: upstream.Upstream) -> HttpResponse:
    async def call() -> dict:
        return await upstream.complete(http, target, chat.raw)

    try:
        result = await cache_service.aget_or_call(chat.messages, call, **_service_kwargs(chat, client, controls))
    except CALL_FAILURES as exc:
        return _failure_response(exc, client)
    _log(client, result.outcome, result.reason, result.key_id, False)
    response = HttpResponse(orjson.dumps(result.response), content_type="application/json")
    for name, value in cache_headers(result.outcome, result.reason, result.policy, result.key_id, result.cached,
                                     snapshot, chat.model).items():
        response[name] = value
    return response


async def _stream(chat: ChatRequest, client: GatewayClient, controls: Controls, snapshot: Snapshot,
                  http: httpx.AsyncClient, target: upstream.Upstream, *, collect: bool) -> HttpResponse:
    async def call() -> upstream.ChunkStream:
        return await upstream.open_stream(http, target, chat.raw)

    try:
        stream = cache_service.aget_or_stream(chat.messages, call, **_service_kwargs(chat, client, controls))
        await stream  # the lookup, and on a miss the upstream's first chunk
    except CALL_FAILURES as exc:
        return _failure_response(exc, client)
    _log(client, stream.outcome, stream.reason, stream.key_id, True)
    headers = cache_headers(stream.outcome, stream.reason, stream.policy, stream.key_id, stream.cached, snapshot,
                            chat.model)
    if collect:
        body = b"".join([part async for part in frames(stream)])
        response: HttpResponse = HttpResponse(body, content_type="text/event-stream; charset=utf-8")
    else:
        response = StreamingHttpResponse(frames(stream), content_type="text/event-stream; charset=utf-8")
        response["X-Accel-Buffering"] = "no"
    response["Cache-Control"] = "no-cache"
    for name, value in headers.items():
        response[name] = value
    return response


async def frames(stream: AsyncResponseStream) -> AsyncIterator[bytes]:
    """The SSE bytes of ``stream``. A failure after the headers were sent becomes an
    OpenAI-shaped ``error`` event; the stream is closed however this ends (a client that
    went away: nothing stored, lock released, upstream closed)."""
    try:
        errored = False
        async for chunk in stream:
            if type(chunk) is dict and chunk.get("error"):
                errored = True
            yield frame(chunk)
        if not errored:
            yield DONE
    except GatewayError as error:
        yield error_event(error)
    except StreamInterrupted:
        yield error_event(GatewayError(502, "The identical request this stream was sharing broke off; retry.",
                                       type_=UPSTREAM_ERROR, code="stream_interrupted"))
    except Exception:  # noqa: BLE001 - the headers are sent: an error event, never a traceback
        logger.exception("ragcache gateway: a stream failed")
        yield error_event(GatewayError(500, "The gateway failed while streaming.", type_="server_error",
                                       code="gateway_error"))
    finally:
        await stream.aclose()
