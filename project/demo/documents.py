"""Retrieval for the demo: which documents a question is about, and an answer citing them.

The demo caches answers keyed by the question alone and passes the documents it
retrieved as ``sources=``: the documents' text is not part of the key, so when one is
edited the key stays the same and it is the source stamp that makes the next identical
question miss (outcome ``miss``, reason ``stale_source``). Saving a ``Document`` in the
admin invalidates ``doc:<pk>`` (``ragcache.sources.track`` in apps.py).

- ``relevant(question)``: the documents sharing the most words with the question (at
  most ``LIMIT``), as ``Retrieved`` (``.sources``: ids for ``sources=`` or the gateway's
  ``X-Ragcache-Sources`` header; ``.context()``: their text, read now).
- ``answer_text(question, retrieved)``: what the fake LLMs say: a quote of each document,
  cited by title and id; deterministic, so a replay is recognisable.
- ``llm_call(question, retrieved)``: the ``call()`` the demo's ``get_or_call`` uses (views.py).
- ``ask(question)``: the whole path through ``cache_service.get_or_call`` with
  ``sources=``; returns the outcome, the reason and why a question missed.
- ``sources_json``: ``/demo/sources.json?q=``, which the page's script asks before it
  streams through the gateway, to send ``X-Ragcache-Sources``.

The documents' text is read inside ``call()`` (after the lookup read the stamps), so an
edit committed while an answer is being made is caught by the write guard.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse

from ragcache.services import CallResult, cache_service

from .models import Document

LIMIT = 3
MODEL = "demo-llm"
_WORD = re.compile(r"[a-z0-9]+")
_STOP = frozenset(
    "a an and are as at be by can do does for from how i in is it my of on or the to was what when where which "
    "who why will with you your".split())

WHY = {
    "stale_source": "a document it was built from was edited since it was stored (source invalidated)",
    "corrupt": "the stored entry was unreadable",
    "lock_timeout": "waited too long for an identical question in flight",
    "leader_released": "an identical question in flight was not stored",
    "no_cache": "you asked for a fresh answer",
    "redis_unavailable": "Redis is unavailable: answered without the cache",
}


def _words(text: str) -> set[str]:
    return {word for word in _WORD.findall(text.lower()) if word not in _STOP and len(word) > 2}


@dataclass
class Retrieved:
    """The documents a question is about (ids only: the text is read by ``context()``)."""

    ids: list[int] = field(default_factory=list)
    titles: list[str] = field(default_factory=list)

    @property
    def sources(self) -> list[str]:
        return [f"doc:{pk}" for pk in self.ids]

    def context(self) -> list[Document]:
        """The documents as they are now, in relevance order (deleted ones left out)."""
        found = Document.objects.in_bulk(self.ids)
        return [found[pk] for pk in self.ids if pk in found]


def relevant(question: str, limit: int = LIMIT) -> Retrieved:
    """The (at most ``limit``) documents sharing the most words with ``question``, best
    first; none when no word is shared."""
    asked = _words(question)
    scored = []
    for pk, title, body in Document.objects.values_list("pk", "title", "body"):
        score = len(asked & _words(title)) * 2 + len(asked & _words(body))
        if score:
            scored.append((-score, title, pk))
    scored.sort()
    best = scored[:limit]
    return Retrieved([pk for _, _, pk in best], [title for _, title, _ in best])


def answer_text(question: str, documents: list[Document]) -> str:
    """The fake LLM's answer: the first sentence of each document, cited by title and id."""
    if not documents:
        return "None of the demo documents is about that. Try asking about opening hours, refunds, shipping, " \
               "passwords or support."
    quotes = []
    for document in documents:
        first = re.split(r"(?<=[.!?])\s+", document.body.strip(), maxsplit=1)[0]
        quotes.append(f"According to \u201c{document.title}\u201d [doc:{document.pk}]: {first}")
    return " ".join(quotes)


def completion(text: str, question: str) -> dict:
    """An OpenAI-shaped completion (what ``call()`` returns and the cache stores)."""
    return {
        "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 40 + 2 * len(question.split()), "completion_tokens": 2 * len(text.split())},
    }


def llm_call(question: str, retrieved: Retrieved, *, fallback=None):
    """The ``call()`` for ``get_or_call``: after the fake LLM's delay, an answer quoting the
    documents as they are then (read inside the call, after the lookup read the stamps);
    ``fallback(question, model=MODEL)`` when no document is about the question."""
    def call() -> dict:
        if not retrieved.ids and fallback is not None:
            return fallback(question, model=MODEL)
        time.sleep(settings.DEMO_LLM_DELAY_MS / 1000)  # the "thinking" the cache saves
        return completion(answer_text(question, retrieved.context()), question)

    return call


def ask(question: str, *, refresh: bool = False) -> dict:
    """Answer ``question`` from the documents through the cache, citing them as sources.
    Returns ``answer``, ``hit``, ``ms``, ``outcome`` (hit, miss, refresh, bypass, error),
    ``reason``, ``why`` (a sentence, or ""), ``stored``, ``sources`` and ``titles``."""
    retrieved = relevant(question)
    result: CallResult = cache_service.get_or_call(question, llm_call(question, retrieved), model=MODEL,
                                                   policy="default", sources=retrieved.sources, refresh=refresh)
    return {
        "answer": result.response["choices"][0]["message"]["content"],
        "hit": result.hit,
        "ms": round(result.latency_ms, 2),
        "outcome": result.outcome,
        "reason": result.reason,
        "why": WHY.get(result.reason, result.reason),
        "stored": result.stored,
        "sources": retrieved.sources,
        "titles": retrieved.titles,
    }


def sources_json(request: HttpRequest) -> HttpResponse:
    """GET ?q=...: {"sources": ["doc:2", ...], "titles": [...]}: what a client streaming
    through the gateway sends as ``X-Ragcache-Sources`` (comma-separated)."""
    question = request.GET.get("q", "")
    if not question.strip() or len(question) > 4000:
        return JsonResponse({"error": "Send ?q=<a question of at most 4000 characters>."}, status=400)
    retrieved = relevant(question)
    return JsonResponse({"sources": retrieved.sources, "titles": retrieved.titles})
