"""The project's URLs plus the bench-only views of ``bench/hotpath.py``'s HTTP rows:

- ``/bench/ask-async.json?q=...``: the demo JSON endpoint (``/demo/ask.json``) as an async
  view: ``aget_or_call`` on ``redis.asyncio``, same question checks, same JSON.
- ``/bench/plain-async.json``: the "no ragcache" async baseline: one raw ``redis.asyncio``
  GET of the demo's bytes.
- ``/bench/plain.json``: the sync baseline: a django-redis ``get`` of the demo's bytes.

The plain views read keys the bench writes before the load starts (``PLAIN_KEY`` through
django-redis, ``PLAIN_RAW_KEY`` raw), both under the run's RAGCACHE_KEY_PREFIX.
"""
import asyncio
import json
import os
import weakref

import redis.asyncio
from django.conf import settings
from django.core.cache import caches
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import include, path
from django.views.decorators.csrf import csrf_exempt

from project.demo.llm import fake_llm
from project.demo.views import MODEL, _clean
from ragcache.exceptions import InvalidRequestError
from ragcache.services import cache_service

PREFIX = os.environ.get("RAGCACHE_KEY_PREFIX", "ragcache")
PLAIN_KEY = f"{PREFIX}:plain"
PLAIN_RAW_KEY = f"{PREFIX}:plain-raw"
_clients: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _client() -> redis.asyncio.Redis:
    """One redis.asyncio client per event loop (its connections belong to that loop)."""
    loop = asyncio.get_running_loop()
    client = _clients.get(loop)
    if client is None:
        client = _clients[loop] = redis.asyncio.Redis.from_url(settings.REDIS_URL)
    return client


def plain_view(request: HttpRequest) -> HttpResponse:
    return HttpResponse(caches["ragcache"].get(PLAIN_KEY), content_type="application/json")


async def plain_async_view(request: HttpRequest) -> HttpResponse:
    return HttpResponse(await _client().get(PLAIN_RAW_KEY), content_type="application/json")


@csrf_exempt
async def ask_async_view(request: HttpRequest) -> HttpResponse:
    """``/demo/ask.json`` with ``aget_or_call``: POST {"question": ...} or GET ?q=..."""
    if request.method == "POST":
        try:
            question = json.loads(request.body or b"{}").get("question", "")
        except (ValueError, AttributeError, RecursionError):
            return JsonResponse({"error": 'Send JSON like {"question": "..."}.'}, status=400)
    else:
        question = request.GET.get("q", "")
    try:
        question = _clean(question)
    except InvalidRequestError as exc:
        return JsonResponse({"error": str(exc)}, status=400)
    result = await cache_service.aget_or_call(question, lambda: fake_llm(question, model=MODEL), model=MODEL,
                                              policy="default")
    return JsonResponse({
        "answer": result.response["choices"][0]["message"]["content"],
        "hit": result.hit,
        "ms": round(result.latency_ms, 2),
    })


urlpatterns = [
    path("bench/plain.json", plain_view),
    path("bench/plain-async.json", plain_async_view),
    path("bench/ask-async.json", ask_async_view),
    path("", include("project.urls")),
]
