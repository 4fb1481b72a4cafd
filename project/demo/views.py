from __future__ import annotations

import json

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.csrf import csrf_exempt

from ragcache.exceptions import InvalidRequestError
from ragcache.services import cache_service

from .llm import fake_llm

MAX_QUESTION = 4000
MODEL = "demo-llm"


def _ask(question: str) -> dict:
    result = cache_service.get_or_call(question, lambda: fake_llm(question, model=MODEL), model=MODEL, policy="default")
    response = result.response
    return {
        "answer": response["choices"][0]["message"]["content"],
        "hit": result.hit,
        "ms": round(result.latency_ms, 2),
    }


def _clean(question: object) -> str:
    if not isinstance(question, str):
        raise InvalidRequestError('"question" must be a string.')
    question = question.strip()
    if not question:
        raise InvalidRequestError("Type a question.")
    if len(question) > MAX_QUESTION:
        raise InvalidRequestError(f"Questions are limited to {MAX_QUESTION} characters here.")
    return question


def demo_page(request: HttpRequest) -> HttpResponse:
    context: dict = {"question": "", "max_length": MAX_QUESTION}
    if request.method == "POST":
        context["question"] = request.POST.get("question", "")
        try:
            context["result"] = _ask(_clean(context["question"]))
        except InvalidRequestError as exc:
            context["error"] = str(exc)
    return render(request, "demo/index.html", context)


@csrf_exempt
def ask_json(request: HttpRequest) -> HttpResponse:
    """POST {"question": "..."} or GET ?q=...: the same as the page, as JSON."""
    if request.method == "POST":
        try:
            question = json.loads(request.body or b"{}").get("question", "")
        except (ValueError, AttributeError, RecursionError):  # RecursionError: "[[[[..." bodies
            return JsonResponse({"error": 'Send JSON like {"question": "..."}.'}, status=400)
    else:
        question = request.GET.get("q", "")
    try:
        return JsonResponse(_ask(_clean(question)))
    except InvalidRequestError as exc:
        return JsonResponse({"error": str(exc)}, status=400)
