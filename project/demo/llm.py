"""A fake, deliberately slow LLM: deterministic answers with token counts."""
from __future__ import annotations

import hashlib
import time

from django.conf import settings


def fake_llm(question: str, *, model: str = "demo-llm", delay_ms: int | None = None) -> dict:
    time.sleep((settings.DEMO_LLM_DELAY_MS if delay_ms is None else delay_ms) / 1000)
    digest = hashlib.sha256(question.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    words = len(question.split())
    answer = f"(demo answer {digest}) You asked a {words}-word question; a real model would answer it here."
    return {
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 12 + words * 2, "completion_tokens": len(answer.split()) * 2},
    }
