"""Reading and checking a Chat Completions request body before anything else sees it.

The body is forwarded to the upstream as the client sent it (its bytes), so the checks
here are only those that protect the gateway and the cache key: a JSON object of at most
``RAGCACHE["GATEWAY_MAX_BODY_BYTES"]`` bytes, sent as ``application/json``, with a
``model`` string, ``messages`` as OpenAI shapes them, and a boolean ``stream``. Everything
else (``temperature``, ``tools``, ...) is the upstream's to judge; it all enters the cache
key except the policy's ``ignored_params``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest

from ..conf import get_config
from .errors import GatewayError

MAX_MODEL_LENGTH = 256  # what an entry's metadata accepts


@dataclass(frozen=True, slots=True)
class ChatRequest:
    raw: bytes  # the body, forwarded as it came
    model: str
    messages: list[dict[str, Any]]  # as the cache key reads them
    params: dict[str, Any]  # every other field of the body
    stream: bool


def _bad(message: str, *, param: str | None = None, code: str | None = None, status: int = 400) -> GatewayError:
    return GatewayError(status, message, param=param, code=code)


def _too_large(limit: int) -> GatewayError:
    return _bad(f"The request body is larger than the gateway accepts ({limit} bytes).", code="request_too_large",
                status=413)


def _body(request: HttpRequest) -> bytes:
    limit = int(get_config()["GATEWAY_MAX_BODY_BYTES"])
    length = request.headers.get("Content-Length", "")
    if length.isdigit() and int(length) > limit:
        raise _too_large(limit)
    try:
        body = request.body
    except RequestDataTooBig:  # past Django's DATA_UPLOAD_MAX_MEMORY_SIZE
        raise _too_large(limit) from None
    if len(body) > limit:
        raise _too_large(limit)
    return body


def _check_messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty array of message objects.", param="messages",
                   code="invalid_type" if messages is not None else "missing_required_parameter")
    keyed = []
    for index, message in enumerate(messages):
        param = f"messages[{index}]"
        if not isinstance(message, dict):
            raise _bad(f"{param} must be an object with a 'role'.", param=param, code="invalid_type")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise _bad(f"{param}.role must be a non-empty string.", param=f"{param}.role", code="invalid_type")
        content = message.get("content")
        if not (content is None or isinstance(content, str) or isinstance(content, list)):
            raise _bad(f"{param}.content must be a string, an array of content parts, or null.",
                       param=f"{param}.content", code="invalid_type")
        if isinstance(content, list) and not all(isinstance(part, dict) for part in content):
            raise _bad(f"{param}.content must hold content part objects.", param=f"{param}.content",
                       code="invalid_type")
        # OpenAI accepts an assistant message with tool_calls and no content: for the key
        # (which wants every message's content) that is content null.
        keyed.append(message if "content" in message else {"content": None, **message})
    return keyed


def read_request(request: HttpRequest) -> ChatRequest:
    """The checked request. Raises ``GatewayError``: 415 (not JSON), 413 (too large), 400
    (not a JSON object, no ``model``, bad ``messages``, ``stream`` not a boolean)."""
    if request.content_type != "application/json":
        raise _bad("Send the request body as JSON with 'Content-Type: application/json'.",
                   code="unsupported_media_type", status=415)
    raw = _body(request)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise _bad("We could not parse the JSON body of your request. Send a valid JSON object.",
                   code="invalid_json") from None
    if not isinstance(body, dict):
        raise _bad("The request body must be a JSON object.", code="invalid_json")
    model = body.get("model")
    if model is None:
        raise _bad("Missing required parameter: 'model'.", param="model", code="missing_required_parameter")
    if not isinstance(model, str) or not model or len(model) > MAX_MODEL_LENGTH:
        raise _bad(f"'model' must be a non-empty string of at most {MAX_MODEL_LENGTH} characters.", param="model",
                   code="invalid_type")
    messages = _check_messages(body.get("messages"))
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _bad("'stream' must be true or false.", param="stream", code="invalid_type")
    params = {name: value for name, value in body.items() if name not in ("model", "messages")}
    return ChatRequest(raw, model, messages, params, stream is True)
