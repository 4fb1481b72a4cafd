"""Shared by the gateway tests: the gateway on the live uvicorn server (tests/upstream.py) in
front of the fake OpenAI upstream on that same server, and keys made for each test."""
from __future__ import annotations

import time
import uuid
from typing import Any

import httpx
import openai
import pytest

from ragcache import keys
from ragcache.gateway import auth
from ragcache.policies import registry

UPSTREAM_KEY = "sk-upstream-9f2b6c1d-never-shown"
MODEL = "demo-llm"


class Gateway:
    """The gateway at ``base_url`` (``.../v1``), with helpers to make keys and requests."""

    def __init__(self, server, fake_llm) -> None:
        self.server = server
        self.fake = fake_llm
        self.base_url = server.url + "/v1"
        self.url = self.base_url + "/chat/completions"

    def key(self, name: str | None = None, *, scope: str = "", policies: tuple[str, ...] = (),
            controls: tuple[str, ...] = (), active: bool = True) -> str:
        from ragcache.models import GatewayKey

        row = GatewayKey(name=name or f"k-{uuid.uuid4().hex[:8]}", scope=scope, policies=list(policies),
                         allowed_cache_controls=list(controls), is_active=active)
        key = row.set_new_key()
        row.save()
        registry.invalidate()
        return key

    def post(self, key: str | None, body: Any, *, headers: dict | None = None, timeout: float = 15.0,
             **kwargs: Any) -> httpx.Response:
        sent = dict(headers or {})
        if key is not None:
            sent.setdefault("Authorization", f"Bearer {key}")
        if isinstance(body, (bytes, str)):
            sent.setdefault("Content-Type", "application/json")
            return httpx.post(self.url, content=body, headers=sent, timeout=timeout, **kwargs)
        return httpx.post(self.url, json=body, headers=sent, timeout=timeout, **kwargs)

    def ask(self, key: str, messages: list, *, stream: bool = False, model: str = MODEL, headers: dict | None = None,
            **params: Any) -> httpx.Response:
        return self.post(key, {"model": model, "messages": messages, "stream": stream, **params}, headers=headers)

    def sdk(self, key: str, **options: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=key, max_retries=0, **options)

    def async_sdk(self, key: str, **options: Any) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.base_url, api_key=key, max_retries=0, **options)


@pytest.fixture
def gateway(asgi_server, fake_llm, settings, transactional_db):
    """The gateway, its upstream the fake LLM, which accepts only ``UPSTREAM_KEY``."""
    settings.RAGCACHE = {**settings.RAGCACHE,
                         "UPSTREAM": {"BASE_URL": fake_llm.base_url, "API_KEY": UPSTREAM_KEY, "TIMEOUT": 10}}
    settings.DEMO_LLM_API_KEY = UPSTREAM_KEY
    auth.forget_last_used()
    registry.invalidate()
    yield Gateway(asgi_server, fake_llm)
    auth.forget_last_used()


def question(label: str) -> list[dict]:
    return [{"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": f"{label} ({uuid.uuid4().hex[:12]})"}]


def wait_for(condition, seconds: float = 10.0) -> bool:
    """Poll until ``condition()`` holds (the bound only avoids a hang)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def entries(redis_client, prefix: str) -> list[bytes]:
    return list(redis_client.scan_iter(match=f"{prefix}:2:*:e:*", count=1000))


def locks(redis_client, prefix: str) -> list[bytes]:
    return list(redis_client.scan_iter(match=f"{prefix}:2:*:l:*", count=1000))


def events(redis_client, prefix: str) -> list[dict[bytes, bytes]]:
    """Every usage event of every shard."""
    pipe = redis_client.pipeline(transaction=False)
    for stream in keys.layout(prefix).streams:
        pipe.xrange(stream)
    return [fields for found in pipe.execute() for _id, fields in found]


def data_events(body: bytes) -> list[bytes]:
    """The ``data:`` payloads of an SSE body, in order."""
    return [block[len(b"data: "):] for block in body.split(b"\n\n") if block.startswith(b"data: ")]
