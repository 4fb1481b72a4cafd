"""The gateway's own errors, answered in OpenAI's shape.

Every refusal the gateway makes itself is a ``GatewayError``; ``error_response`` turns
it into ``{"error": {"message", "type", "param", "code"}}`` with its HTTP status, the
body OpenAI's SDKs parse into ``openai.APIStatusError`` subclasses (400
``BadRequestError``, 401 ``AuthenticationError``, 403 ``PermissionDeniedError``, ...).
Messages never quote a key, a prompt or the upstream's configuration.
"""
from __future__ import annotations

import orjson
from django.http import HttpResponse

INVALID_REQUEST = "invalid_request_error"
UPSTREAM_ERROR = "upstream_error"


class GatewayError(Exception):
    """A request the gateway answers itself with ``status`` (a 4xx, or 502/504 for the upstream)."""

    def __init__(self, status: int, message: str, *, type_: str = INVALID_REQUEST, code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_response(error: GatewayError) -> HttpResponse:
    """The JSON response of ``error`` (``application/json``, never cached by HTTP caches)."""
    response = HttpResponse(orjson.dumps(error.body()), status=error.status, content_type="application/json")
    response["Cache-Control"] = "no-store"
    for name, value in error.headers.items():
        response[name] = value
    return response


def error_event(error: GatewayError) -> bytes:
    """``error`` as one SSE event, for a failure after a stream's headers were sent: the
    OpenAI SDKs raise ``openai.APIError`` when they read it."""
    return b"data: " + orjson.dumps(error.body()) + b"\n\n"
