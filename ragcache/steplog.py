"""Structured step log lines in the seed cards' shape.

    RAG STEP 68 (RAG.cache.cacheservice.cache.response.store.in.redis): CacheService.cache_response Store in Redis | attrs={...}

``attrs`` is JSON. Each record also carries ``rag_step``, ``rag_step_id`` and
``rag_attrs`` as attributes, so a JSON log formatter can emit them as fields.
Callers pass only hashes, counts and names: never prompt or answer text.
"""
from __future__ import annotations

import json
import logging
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


def format_step(step: int, attrs: dict[str, Any]) -> str:
    step_id, label = STEPS[step]
    return f"RAG STEP {step} ({step_id}): {label} | attrs={json.dumps(attrs, default=str)}"


def log_step(step: int, attrs: dict[str, Any], level: int = logging.INFO) -> None:
    if logger.isEnabledFor(level):
        logger.log(
            level,
            format_step(step, attrs),
            extra={"rag_step": step, "rag_step_id": STEPS[step][0], "rag_attrs": attrs},
        )
