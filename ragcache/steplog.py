"""Structured step log lines in the seed cards' shape.

    RAG STEP 68 (RAG.cache.cacheservice.cache.response.store.in.redis): CacheService.cache_response Store in Redis \
| attrs={...}

(one line; wrapped here).

``attrs`` is JSON. Each record also carries ``rag_step``, ``rag_step_id`` and
``rag_attrs`` as attributes; ``JsonStepFormatter`` emits them as fields (see
docs/observability.md for the LOGGING setting). Callers pass only hashes, counts and
names: never prompt or answer text.
"""
from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

logger = logging.getLogger("ragcache.steps")

STEPS: dict[int, tuple[str, str]] = {
    59: ("RAG.cache.cacheservice.get.cached.response.check.cache", "CacheService.get_cached_response Check cache"),
    60: ("RAG.cache.policyregistry.resolve.resolve.policy", "PolicyRegistry.resolve Resolve cache policy"),
    61: ("RAG.cache.keys.cache.key.generate.cache.key", "keys.cache_key Generate cache key"),
    62: ("RAG.cache.cache.hit", "Cache hit?"),
    63: ("RAG.cache.usagetracker.track.track.cache.hit", "UsageTracker.track Track cache hit"),
    68: ("RAG.cache.cacheservice.cache.response.store.in.redis", "CacheService.cache_response Store in Redis"),
}


# One encoder for every line: json.dumps() with options builds a new one per call.
_ATTRS_JSON = json.JSONEncoder(default=str)


def format_step(step: int, attrs: dict[str, Any]) -> str:
    step_id, label = STEPS[step]
    return f"RAG STEP {step} ({step_id}): {label} | attrs={_ATTRS_JSON.encode(attrs)}"


def log_step(step: int, attrs: dict[str, Any], level: int = logging.INFO) -> None:
    if logger.isEnabledFor(level):
        # What Logger.log does, minus findCaller's walk up the stack (step 63 logs on
        # every hit): the caller it would find is always this function.
        logger.handle(logger.makeRecord(
            logger.name, level, __file__, _LOG_LINE, format_step(step, attrs), None, None, "log_step",
            {"rag_step": step, "rag_step_id": STEPS[step][0], "rag_attrs": attrs},
        ))


_LOG_LINE = log_step.__code__.co_firstlineno


class JsonStepFormatter(logging.Formatter):
    """One JSON object per line; step records add ``rag_step``, ``rag_step_id`` and
    ``rag_attrs`` as fields, so log pipelines can filter on them without parsing text."""

    STEP_FIELDS = ("rag_step", "rag_step_id", "rag_attrs")

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in self.STEP_FIELDS:
            if hasattr(record, name):
                data[name] = getattr(record, name)
        if record.exc_info:
            data["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)
