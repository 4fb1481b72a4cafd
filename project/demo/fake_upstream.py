"""An OpenAI-compatible fake LLM: ``POST /fake-llm/v1/chat/completions`` (and ``GET
/fake-llm/v1/models``), served by this Django project itself so the demo and the tests work
offline. Point any OpenAI client at it::

    client = openai.OpenAI(base_url="http://127.0.0.1:8000/fake-llm/v1", api_key="anything")

It answers like OpenAI's Chat Completions API:

- JSON completions: ``id``, ``object: "chat.completion"``, ``created``, ``model`` (echoed),
  ``choices[]`` with ``message`` and ``finish_reason``, ``usage`` with
  ``prompt_tokens_details.cached_tokens`` and ``completion_tokens_details.reasoning_tokens``,
  ``service_tier``, ``system_fingerprint``.
- SSE streams (``stream: true``): ``data: {json}\\n\\n`` events of ``chat.completion.chunk``
  objects, all with the same ``id`` and ``created``; the first delta of each choice carries the
  role, each later one a token-sized piece; ``finish_reason`` only on each choice's closing
  chunk; with ``stream_options: {"include_usage": true}`` every chunk has ``"usage": null`` and
  a last chunk with ``choices: []`` carries the usage; then ``data: [DONE]``. A ``: keep-alive``
  comment line opens every stream (SSE clients skip comments).
- Errors in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: 400 for a body
  that is not JSON, a missing ``model`` or ``messages``, ``stream_options`` without ``stream``,
  or ``n`` out of 1..8; 401 without an ``Authorization: Bearer`` header (or with another key
  than ``settings.DEMO_LLM_API_KEY`` when that is set); 405 for other methods.

Answers are deterministic: the text is derived from a hash of ``messages`` (and the choice
index), never echoes them, and only a fingerprint of the messages is logged. ``id`` is
random per call, so a replayed answer is recognisable by its ``id``. ``max_tokens`` /
``max_completion_tokens`` below the answer's length cut it, with ``finish_reason: "length"``.
``response_format`` ``json_object`` or ``json_schema`` makes the content a JSON document.
The answer's ``model`` is the name asked for without its behaviours (``demo-llm`` for
``demo-llm@slow``), as OpenAI answers with the model that served the request.

Behaviours are chosen per request, by the model name (``"demo-llm@tools,delay=20"``: the
part after ``@``, which also enters any cache key) and/or the ``X-Fake-Behaviour`` header
(same syntax; a cache key usually ignores headers). Comma-separated:

==================  ===============================================================================
``documents``       answer from the demo's ``Document`` rows, as a model with its own retrieval
                    would: the documents sharing most words with the last user message, each
                    quoted and cited (``documents.answer_text``), read when the call is made
``tools``           the answer is a tool call (the first of the request's ``tools``, else
                    ``lookup``); streamed as ``tool_calls`` deltas; ``finish_reason: "tool_calls"``
``reasoning``       ``reasoning_content`` deltas (and ``message.reasoning_content``) before the answer
``refusal``         a ``refusal`` instead of content
``length``          truncated: ``finish_reason: "length"``
``content-filter``  cut short with ``finish_reason: "content_filter"``
``no-usage``        never send usage (even when ``include_usage`` asks for it)
``prompt-cache``    half the prompt tokens are reported as ``cached_tokens``
``long=N``          an answer of N token-sized pieces (default about 24)
``keepalive``       a ``: keep-alive`` comment line before every chunk
``error``           stream: an ``{"error": {...}}`` event after 3 chunks, then the end (no
                    ``[DONE]``); JSON: a 500
``error-first``     stream: the ``error`` event before any chunk; JSON: a 500
``disconnect``      stream: the connection ends after 3 chunks, without ``finish_reason`` or
                    ``[DONE]``; JSON: a 500
``429``, ``500``    that status, with an OpenAI-shaped error body (429: ``rate_limit_exceeded``
                    and ``retry-after`` headers)
``once``            the failure behaviours above apply to the first call for these messages
                    only (per process); later calls succeed
``slow``            ``first=1000,delay=100`` unless those are given
``delay=MS``        pause between chunks (header ``X-Fake-Delay-Ms``; setting
                    ``DEMO_LLM_CHUNK_DELAY_MS``)
``first=MS``        pause before the first chunk, after the response headers (header
                    ``X-Fake-First-Delay-Ms``; setting ``DEMO_LLM_FIRST_CHUNK_MS``)
==================  ===============================================================================

A JSON completion takes ``first + delay x pieces`` milliseconds, as a streamed one does.

For tests (the server runs in-process): ``fingerprint(messages)`` names a conversation;
``call_count(messages)`` is how many calls this process received for it, ``calls(messages)``
their ``FakeCall`` records (request body, chunks sent, whether the stream ended normally or
the client went away), ``reset()`` forgets everything.

Under ASGI streams are async generators (a client that disconnects cancels them); under
WSGI (``runserver``) they are plain generators, so streaming works there too.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.handlers.asgi import ASGIRequest
from django.db import DatabaseError
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.urls import path
from django.views.decorators.csrf import csrf_exempt

logger = logging.getLogger("project.demo.fake_upstream")

MAX_CHOICES = 8
MAX_PIECES = 100_000
FAILURES = ("error", "error-first", "disconnect", "429", "500")
SYSTEM_FINGERPRINT = "fp_ragcache_demo"
WORDS = (
    "cache", "answer", "Redis", "stream", "token", "policy", "scope", "latency", "model", "request",
    "source", "document", "index", "vector", "chunk", "prompt", "reply", "context", "budget", "tenant",
    "shard", "lease", "entry", "window", "replay", "record", "metric", "cost", "usage", "flight",
)
TOOL_VALUES = ("Paris", "Lisbon", "Oslo", "Kyoto", "Quito", "Accra", "Perth", "Lima")


# --- what this process received (for tests) ----------------------------------------------------

@dataclass
class FakeCall:
    """One request the fake received. ``status``: running, completed (the stream or JSON
    answer was sent whole, failures included), aborted (the client went away mid-stream)."""

    fingerprint: str
    stream: bool
    behaviours: tuple[str, ...]
    body: dict
    status: str = "running"
    chunks_sent: int = 0
    started: float = field(default_factory=time.monotonic)


_lock = threading.Lock()
_counts: OrderedDict[str, int] = OrderedDict()
_calls: deque[FakeCall] = deque(maxlen=10_000)


def fingerprint(messages: Any) -> str:
    """A short, stable name for a conversation (no text of it): 16 hex digits."""
    data = orjson.dumps(messages, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(data).hexdigest()[:16]


def call_count(messages: Any = None) -> int:
    """Calls received for ``messages`` (every call when None) since the last ``reset()``."""
    with _lock:
        if messages is None:
            return sum(_counts.values())
        return _counts.get(fingerprint(messages), 0)


def calls(messages: Any = None) -> list[FakeCall]:
    """The records of the calls received for ``messages`` (all when None), oldest first."""
    name = None if messages is None else fingerprint(messages)
    with _lock:
        return [c for c in _calls if name is None or c.fingerprint == name]


def reset() -> None:
    with _lock:
        _counts.clear()
        _calls.clear()


def _register(call: FakeCall) -> int:
    """Count the call; returns how many calls these messages had before it."""
    with _lock:
        before = _counts.get(call.fingerprint, 0)
        _counts[call.fingerprint] = before + 1
        _counts.move_to_end(call.fingerprint)
        while len(_counts) > 10_000:
            _counts.popitem(last=False)
        _calls.append(call)
        return before


# --- requests ---------------------------------------------------------------------------------

class BadRequest(Exception):
    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}


def error_response(error: BadRequest) -> HttpResponse:
    body = {"error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code}}
    response = HttpResponse(orjson.dumps(body), status=error.status, content_type="application/json")
    response["x-request-id"] = f"req_{uuid.uuid4().hex}"
    for name, value in error.headers.items():
        response[name] = value
    return response


def _setting_ms(name: str, default: int) -> int:
    value = getattr(settings, name, None)
    if value is None:
        value = os.environ.get(name, default)
    try:
        return max(0, int(value))
    except (TypeError, ValueError):
        return default


def _int_option(value: str, what: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise BadRequest(400, f"Fake LLM: {what} must be a whole number of milliseconds, not {value[:20]!r}.") from None
    if not 0 <= number <= 600_000:
        raise BadRequest(400, f"Fake LLM: {what} must be from 0 to 600000.")
    return number


@dataclass
class Plan:
    """What the fake will answer, decided from the request alone."""

    model: str
    behaviours: tuple[str, ...]
    options: dict[str, int]
    stream: bool
    include_usage: bool
    n: int
    max_tokens: int | None
    json_format: bool
    tools: list
    first_ms: int
    delay_ms: int
    messages: list
    failing: bool = True  # the failure behaviours apply (``once``: only to the first call)
    document_text: str | None = None  # ``documents``: the answer, read from the demo's documents

    def has(self, name: str) -> bool:
        return name in self.behaviours

    @property
    def served_model(self) -> str:
        return self.model.partition("@")[0]

    def failure(self) -> str | None:
        if not self.failing:
            return None
        return next((name for name in FAILURES if name in self.behaviours), None)


def _behaviours(text: str) -> tuple[tuple[str, ...], dict[str, int]]:
    names, options = [], {}
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        if "=" in part:
            name, value = part.split("=", 1)
            options[name.strip()] = _int_option(value.strip(), name.strip())
        else:
            names.append(part)
    return tuple(names), options


def parse(request: HttpRequest) -> Plan:
    """Validate the request as OpenAI would; raises ``BadRequest``."""
    auth = request.headers.get("Authorization", "")
    if not auth.startswith("Bearer ") or not auth[7:].strip():
        raise BadRequest(401, "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.",
                         code="missing_api_key")
    expected = getattr(settings, "DEMO_LLM_API_KEY", None)
    if expected and auth[7:].strip() != expected:
        raise BadRequest(401, "Incorrect API key provided.", code="invalid_api_key")
    try:
        body = orjson.loads(request.body)
    except orjson.JSONDecodeError:
        raise BadRequest(400, "We could not parse the JSON body of your request. Send a valid JSON object.") from None
    if not isinstance(body, dict):
        raise BadRequest(400, "The request body must be a JSON object.")
    model, messages = body.get("model"), body.get("messages")
    if model is None:
        raise BadRequest(400, "Missing required parameter: 'model'.", param="model", code="missing_required_parameter")
    if not isinstance(model, str) or not model:
        raise BadRequest(400, "Invalid type for 'model': expected a string.", param="model", code="invalid_type")
    if messages is None:
        raise BadRequest(400, "Missing required parameter: 'messages'.", param="messages",
                         code="missing_required_parameter")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
        raise BadRequest(400, "Invalid 'messages': expected a non-empty array of objects with a 'role'.",
                         param="messages", code="invalid_type")
    stream = body.get("stream") is True
    stream_options = body.get("stream_options")
    if stream_options is not None and not stream:
        raise BadRequest(400, "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                         param="stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise BadRequest(400, "Invalid type for 'stream_options': expected an object.", param="stream_options",
                         code="invalid_type")
    n = body.get("n", 1) if body.get("n") is not None else 1
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_CHOICES:
        raise BadRequest(400, f"Fake LLM: 'n' must be from 1 to {MAX_CHOICES}.", param="n")
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise BadRequest(400, "Invalid 'max_tokens': expected a positive integer.", param="max_tokens")
    response_format = body.get("response_format")
    json_format = isinstance(response_format, dict) and response_format.get("type") in ("json_object", "json_schema")
    tools = body.get("tools") if isinstance(body.get("tools"), list) else []

    name, _, suffix = model.partition("@")
    names, options = _behaviours(suffix)
    header_names, header_options = _behaviours(request.headers.get("X-Fake-Behaviour", ""))
    names += header_names
    options.update(header_options)
    if "slow" in names:
        options.setdefault("first", 1000)
        options.setdefault("delay", 100)
    for header, option in (("X-Fake-Delay-Ms", "delay"), ("X-Fake-First-Delay-Ms", "first")):
        if request.headers.get(header):
            options[option] = _int_option(request.headers[header], header)
    first = options.get("first", _setting_ms("DEMO_LLM_FIRST_CHUNK_MS", 300))
    delay = options.get("delay", _setting_ms("DEMO_LLM_CHUNK_DELAY_MS", 30))
    return Plan(model=model, behaviours=names, options=options, stream=stream,
                include_usage=bool(stream and isinstance(stream_options, dict) and stream_options.get("include_usage")),
                n=n, max_tokens=limit, json_format=json_format, tools=tools, first_ms=first, delay_ms=delay,
                messages=messages)


# --- answers ------------------------------------------------------------------------------------

def _pieces(text: str) -> list[str]:
    """Token-sized pieces, the way a tokenizer splits English: a word with its leading space,
    long words in pieces of at most 4 characters."""
    pieces: list[str] = []
    for index, word in enumerate(text.split(" ")):
        word = word if index == 0 else " " + word
        while len(word) > 5:
            pieces.append(word[:4])
            word = word[4:]
        if word:
            pieces.append(word)
    return pieces


def _seed(plan: Plan, index: int) -> bytes:
    return hashlib.sha256(orjson.dumps(plan.messages, option=orjson.OPT_SORT_KEYS) + b"#%d" % index).digest()


def _answer_text(plan: Plan, index: int) -> str:
    if plan.document_text is not None:
        text = plan.document_text
    else:
        seed = _seed(plan, index)
        size = plan.options.get("long")
        count = min(MAX_PIECES, size) if size else 14 + seed[0] % 8
        words = [WORDS[(seed[i % 32] + 7 * (i // 32)) % len(WORDS)] for i in range(count)]
        text = f"Answer {seed.hex()[:8]}: " + " ".join(words) + "."
    if plan.json_format:
        return orjson.dumps({"answer": text}).decode()
    return text


def _documents_answer(messages: list) -> str:
    """``documents``: an answer quoting the demo documents the last user message is about."""
    from . import documents  # the demo's retrieval; imported late, it reads the models

    asked = next((m.get("content") for m in reversed(messages) if m.get("role") == "user"), "")
    question = asked if isinstance(asked, str) else ""
    return documents.answer_text(question, documents.relevant(question).context())


def _reasoning_text(plan: Plan, index: int) -> str:
    seed = _seed(plan, index)
    return f"The question hashes to {seed.hex()[8:16]}; the answer names {WORDS[seed[1] % len(WORDS)]}."


def _tool_call(plan: Plan, index: int) -> tuple[str, str, str]:
    """(call id, function name, arguments JSON)."""
    seed = _seed(plan, index)
    name, argument = "lookup", "query"
    for tool in plan.tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            name = function["name"]
            properties = (function.get("parameters") or {}).get("properties") if isinstance(
                function.get("parameters"), dict) else None
            if isinstance(properties, dict) and properties:
                argument = next(iter(properties))
            break
    arguments = orjson.dumps({argument: TOOL_VALUES[seed[2] % len(TOOL_VALUES)]}).decode()
    return f"call_{seed.hex()[:24]}", name, arguments


@dataclass
class Choice:
    index: int
    kind: str  # content | tool | refusal
    pieces: list[str]
    reasoning: list[str]
    finish_reason: str
    tool: tuple[str, str, str] | None = None


def choices(plan: Plan) -> list[Choice]:
    made = []
    for index in range(plan.n):
        reasoning = _pieces(_reasoning_text(plan, index)) if plan.has("reasoning") else []
        if plan.has("tools"):
            call_id, name, arguments = _tool_call(plan, index)
            pieces = [arguments[i:i + 6] for i in range(0, len(arguments), 6)]
            choice = Choice(index, "tool", pieces, reasoning, "tool_calls", (call_id, name, arguments))
        elif plan.has("refusal"):
            choice = Choice(index, "refusal", _pieces("I can't help with that request."), reasoning, "stop")
        else:
            choice = Choice(index, "content", _pieces(_answer_text(plan, index)), reasoning, "stop")
        if plan.has("length"):
            choice.pieces, choice.finish_reason = choice.pieces[: max(1, len(choice.pieces) // 2)], "length"
        elif plan.has("content-filter"):
            choice.pieces, choice.finish_reason = choice.pieces[: max(1, len(choice.pieces) // 3)], "content_filter"
        elif plan.max_tokens is not None and len(choice.pieces) > plan.max_tokens:
            choice.pieces, choice.finish_reason = choice.pieces[: plan.max_tokens], "length"
        made.append(choice)
    return made


def usage(plan: Plan, made: list[Choice]) -> dict | None:
    if plan.has("no-usage"):
        return None
    prompt = 8 + sum(4 + len(orjson.dumps(m.get("content"))) // 4 for m in plan.messages)
    reasoning = sum(len(c.reasoning) for c in made)
    completion = sum(len(c.pieces) for c in made) + reasoning
    cached = prompt // 2 if plan.has("prompt-cache") else 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": reasoning, "audio_tokens": 0,
                                      "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
    }


def completion(plan: Plan, completion_id: str, created: int) -> dict:
    """The JSON answer (``stream: false``)."""
    made = choices(plan)
    out = []
    for choice in made:
        message: dict[str, Any] = {"role": "assistant", "content": None, "refusal": None, "annotations": []}
        if choice.kind == "tool":
            call_id, name, arguments = choice.tool
            message["tool_calls"] = [{"id": call_id, "type": "function",
                                      "function": {"name": name, "arguments": "".join(choice.pieces)}}]
        elif choice.kind == "refusal":
            message["refusal"] = "".join(choice.pieces)
        else:
            message["content"] = "".join(choice.pieces)
        if choice.reasoning:
            message["reasoning_content"] = "".join(choice.reasoning)
        out.append({"index": choice.index, "message": message, "logprobs": None,
                    "finish_reason": choice.finish_reason})
    body: dict[str, Any] = {"id": completion_id, "object": "chat.completion", "created": created,
                            "model": plan.served_model, "choices": out}
    found = usage(plan, made)
    if found is not None:
        body["usage"] = found
    body["service_tier"] = "default"
    body["system_fingerprint"] = SYSTEM_FINGERPRINT
    return body


# --- streams --------------------------------------------------------------------------------------

def _event(data: Any) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


def _deltas(choice: Choice) -> Iterator[dict]:
    """The deltas of one choice, in order (without the closing one)."""
    opening: dict[str, Any] = {"role": "assistant", "content": "", "refusal": None}
    if choice.kind == "tool":
        call_id, name, _ = choice.tool
        opening["content"] = None
        yield opening
        for piece in choice.reasoning:
            yield {"content": None, "reasoning_content": piece}
        yield {"tool_calls": [{"index": 0, "id": call_id, "type": "function",
                               "function": {"name": name, "arguments": ""}}]}
        for piece in choice.pieces:
            yield {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}
        return
    yield opening
    for piece in choice.reasoning:
        yield {"content": None, "reasoning_content": piece}
    for piece in choice.pieces:
        yield {"refusal": piece} if choice.kind == "refusal" else {"content": piece}


COMMENT, CHUNK, ERROR, DONE = "comment", "chunk", "error", "done"


def events(plan: Plan, completion_id: str, created: int) -> Iterator[tuple[str, bytes]]:
    """The SSE events of a stream, as (COMMENT | CHUNK | ERROR | DONE, bytes), without pauses."""
    made = choices(plan)
    head: dict[str, Any] = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                            "model": plan.served_model, "service_tier": "default",
                            "system_fingerprint": SYSTEM_FINGERPRINT}
    failure = plan.failure()
    yield COMMENT, b": keep-alive\n\n"
    if failure == "error-first":
        yield ERROR, _event({"error": {"message": "The server had an error while processing your request.",
                                       "type": "server_error", "param": None, "code": None}})
        return
    streams = [iter(_deltas(choice)) for choice in made]
    sent = 0
    live = list(range(len(made)))
    while live:
        for index in list(live):
            delta = next(streams[index], None)
            if delta is None:
                live.remove(index)
                continue
            chunk = {**head, "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}]}
            if plan.include_usage:
                chunk["usage"] = None
            if plan.has("keepalive"):
                yield COMMENT, b": keep-alive\n\n"
            yield CHUNK, _event(chunk)
            sent += 1
            if sent == 3 and failure == "error":
                yield ERROR, _event({"error": {"message": "The model produced invalid content mid-stream.",
                                               "type": "server_error", "param": None, "code": "stream_error"}})
                return
            if sent == 3 and failure == "disconnect":
                return
    for choice in made:
        chunk = {**head, "choices": [{"index": choice.index, "delta": {}, "logprobs": None,
                                      "finish_reason": choice.finish_reason}]}
        if plan.include_usage:
            chunk["usage"] = None
        yield CHUNK, _event(chunk)
    found = usage(plan, made)
    if plan.include_usage and found is not None:
        yield CHUNK, _event({**head, "choices": [], "usage": found})
    yield DONE, b"data: [DONE]\n\n"


def _stream_sync(plan: Plan, call: FakeCall, completion_id: str, created: int) -> Iterator[bytes]:
    try:
        first = True
        for kind, data in events(plan, completion_id, created):
            if kind in (CHUNK, ERROR):  # the model's output: paced like tokens
                pause = plan.first_ms if first else plan.delay_ms
                first = False
                if pause:
                    time.sleep(pause / 1000)
                call.chunks_sent += kind == CHUNK
            yield data
        call.status = "completed"
    finally:
        if call.status == "running":
            call.status = "aborted"


async def _stream_async(plan: Plan, call: FakeCall, completion_id: str, created: int) -> AsyncIterator[bytes]:
    try:
        first = True
        for kind, data in events(plan, completion_id, created):
            if kind in (CHUNK, ERROR):
                pause = plan.first_ms if first else plan.delay_ms
                first = False
                await asyncio.sleep(pause / 1000)
                call.chunks_sent += kind == CHUNK
            yield data
        call.status = "completed"
    finally:
        if call.status == "running":
            call.status = "aborted"
            logger.info("fake LLM: client went away after %d chunks (messages %s)", call.chunks_sent,
                        call.fingerprint)


# --- views ----------------------------------------------------------------------------------------

def _failure_response(failure: str) -> HttpResponse:
    if failure == "429":
        return error_response(BadRequest(
            429, "Rate limit reached for requests. Please try again in 1s.", type_="requests",
            code="rate_limit_exceeded", headers={"retry-after": "1", "retry-after-ms": "20",
                                                  "x-ratelimit-remaining-requests": "0"}))
    return error_response(BadRequest(500, "The server had an error while processing your request. Sorry about that!",
                                     type_="server_error"))


@csrf_exempt
async def chat_completions(request: HttpRequest) -> HttpResponse:
    """``POST /fake-llm/v1/chat/completions`` (see the module docstring)."""
    if request.method != "POST":
        return error_response(BadRequest(405, "Use POST for /v1/chat/completions.", code="method_not_allowed"))
    try:
        plan = parse(request)
    except BadRequest as error:
        return error_response(error)
    body = orjson.loads(request.body)
    call = FakeCall(fingerprint(plan.messages), plan.stream, plan.behaviours, body)
    earlier = _register(call)
    plan.failing = not (plan.has("once") and earlier)
    failure = plan.failure()
    if plan.has("documents"):
        try:
            plan.document_text = await sync_to_async(_documents_answer)(plan.messages)
        except DatabaseError:
            logger.warning("fake LLM: the demo documents could not be read")
            return error_response(BadRequest(500, "Fake LLM: the demo documents could not be read.",
                                             type_="server_error"))
    logger.info("fake LLM: call %d for messages %s (stream=%s, behaviours=%s)", earlier + 1, call.fingerprint,
                plan.stream, ",".join(plan.behaviours) or "-")
    completion_id, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    headers = {"x-request-id": f"req_{uuid.uuid4().hex}", "openai-processing-ms": str(plan.first_ms)}
    if failure in ("429", "500") or (failure and not plan.stream):
        await asyncio.sleep(plan.first_ms / 1000)
        call.status = "completed"
        return _failure_response(failure if failure in ("429", "500") else "500")
    if not plan.stream:
        await asyncio.sleep((plan.first_ms + plan.delay_ms * sum(len(c.pieces) for c in choices(plan))) / 1000)
        response = HttpResponse(orjson.dumps(completion(plan, completion_id, created)),
                                content_type="application/json")
        call.status = "completed"
    else:
        if isinstance(request, ASGIRequest):
            content: Any = _stream_async(plan, call, completion_id, created)
        else:
            content = _stream_sync(plan, call, completion_id, created)
        response = StreamingHttpResponse(content, content_type="text/event-stream; charset=utf-8")
        response["Cache-Control"] = "no-cache"
        response["X-Accel-Buffering"] = "no"
    for name, value in headers.items():
        response[name] = value
    return response


@csrf_exempt
async def models(request: HttpRequest) -> HttpResponse:
    """``GET /fake-llm/v1/models``: the one model name the fake advertises (any name works)."""
    body = {"object": "list", "data": [{"id": "demo-llm", "object": "model", "created": 1700000000,
                                        "owned_by": "ragcache-demo"}]}
    return HttpResponse(orjson.dumps(body), content_type="application/json")


# Mounted by project/urls.py: path("fake-llm/v1/", include("project.demo.fake_upstream")).
urlpatterns = [
    path("chat/completions", chat_completions, name="fake-llm-chat-completions"),
    path("models", models, name="fake-llm-models"),
]
