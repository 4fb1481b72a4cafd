from __future__ import annotations

import json
from decimal import Decimal

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.db import DatabaseError
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.urls import reverse
from django.views.decorators.csrf import csrf_exempt

from ragcache.entries import Usage
from ragcache.exceptions import InvalidRequestError
from ragcache.policies import registry
from ragcache.services import cache_service

from . import documents
from .gateway_key import ensure_demo_key
from .llm import fake_llm

MAX_QUESTION = 4000
MODEL = "demo-llm"


MAX_BODY_BYTES = 64 * 1024  # /demo/ask.json: a question of MAX_QUESTION characters fits many times over
# Why a request did not use the cache, or how a miss came about, in plain words.
REASONS = {
    "kill_switch": "kill switch: the cache is off everywhere",
    "mode_off": "mode off: the policy does not use the cache",
    "disabled": "disabled: the policy is switched off",
    "rollout": "rollout: this question falls outside the policy's rollout percentage",
    "unknown_policy": "there is no such policy",
    "policies_unavailable": "the policies could not be loaded",
    "stale_source": "a source document it was built from changed",
    "redis_unavailable": "Redis is unavailable: answered without the cache",
}


def _ask(question: str) -> dict:
    """Ask through get_or_call; the outcome, its reason, the policy, and what a hit saved.
    The demo documents the question is about are its sources (documents.py): editing one
    in the admin makes the next identical question miss with reason stale_source."""
    retrieved = documents.relevant(question)
    result = cache_service.get_or_call(question, documents.llm_call(question, retrieved, fallback=fake_llm),
                                       model=MODEL, policy="default", sources=retrieved.sources)
    response = result.response
    answer = {
        "answer": response["choices"][0]["message"]["content"],
        "hit": result.hit,
        "outcome": result.outcome,
        "reason": result.reason,
        "reason_text": REASONS.get(result.reason, result.reason.replace("_", " ")),
        "policy": result.policy,
        "key_id": result.key_id,
        "ms": round(result.latency_ms, 2),
        "tokens_saved": 0,
        "cost_saved": None,
    }
    cached = result.cached
    if result.hit and cached is not None and cached.usage_known:
        snapshot = registry.current()
        cost = cached.cost
        if cost is None:
            cost = snapshot.cost(cached.model or MODEL, Usage(cached.prompt_tokens, cached.cached_prompt_tokens,
                                                             cached.completion_tokens, True))
        answer["tokens_saved"] = cached.tokens
        if cost is not None:
            answer["cost_saved"] = f"{cost.quantize(Decimal('0.000001'))} {snapshot.currency(cached.model or MODEL)}"
    return answer


def _clean(question: object) -> str:
    if not isinstance(question, str):
        raise InvalidRequestError('"question" must be a string.')
    question = question.strip()
    if not question:
        raise InvalidRequestError("Type a question.")
    if len(question) > MAX_QUESTION:
        raise InvalidRequestError(f"Questions are limited to {MAX_QUESTION} characters here.")
    return question


def _gateway_context() -> dict:
    """What the page's script needs to stream from the gateway (/v1/chat/completions)."""
    try:
        key, row = ensure_demo_key()
    except (DatabaseError, OSError):
        return {}
    model = getattr(settings, "DEMO_GATEWAY_MODEL", MODEL)
    return {"gateway": {"endpoint": reverse("ragcache_gateway:chat-completions"), "key": key, "model": model,
                        "active": row.is_active, "sources": reverse("demo-sources-json")}}


def demo_page(request: HttpRequest) -> HttpResponse:
    """The page streams answers from the gateway (its script); without script, the form
    posts here and the answer comes through get_or_call."""
    context: dict = {"question": "", "max_length": MAX_QUESTION, **_gateway_context()}
    if request.method == "POST":
        context["question"] = request.POST.get("question", "")
        try:
            context["result"] = _ask(_clean(context["question"]))
        except InvalidRequestError as exc:
            context["error"] = str(exc)
    return render(request, "demo/index.html", context)


@csrf_exempt
def ask_json(request: HttpRequest) -> HttpResponse:
    """POST {"question": "..."} or GET ?q=...: the same as the page, as JSON. Every error
    is JSON too: 400 for a bad or too large body (more than MAX_BODY_BYTES), 405 for
    another method."""
    if request.method not in ("GET", "POST"):
        response = JsonResponse({"error": f"Use POST (or GET ?q=...), not {request.method[:16]}."}, status=405)
        response["Allow"] = "GET, POST"
        return response
    if request.method == "POST":
        too_large = JsonResponse({"error": f"The body is larger than {MAX_BODY_BYTES} bytes; send "
                                           f'{{"question": "..."}} with at most {MAX_QUESTION} characters.'},
                                 status=400)
        length = request.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > MAX_BODY_BYTES:
            return too_large  # never read
        try:
            body = request.body
        except RequestDataTooBig:  # no Content-Length, and past DATA_UPLOAD_MAX_MEMORY_SIZE
            return too_large
        if len(body) > MAX_BODY_BYTES:
            return too_large
        try:
            question = json.loads(body or b"{}").get("question", "")
        except (ValueError, AttributeError, RecursionError):  # RecursionError: "[[[[..." bodies
            return JsonResponse({"error": 'Send JSON like {"question": "..."}.'}, status=400)
    else:
        question = request.GET.get("q", "")
    try:
        return JsonResponse(_ask(_clean(question)))
    except InvalidRequestError as exc:
        return JsonResponse({"error": str(exc)}, status=400)
