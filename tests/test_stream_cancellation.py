"""A stream's leader cancelled while it publishes a chunk to its followers (what a client that
disconnects does to the gateway under ASGI, when the cancellation lands on the PUBLISH
round trip): the flow must still release the single-flight lock and close the upstream.

Regression: only RedisUnavailable was handled around PUBLISH, so a cancellation there
escaped the flow with the lock held (for LOCK_TIMEOUT, extended while chunks flowed) and the
upstream iterator left open until garbage collection."""
from __future__ import annotations

import asyncio
import uuid

import pytest

from ragcache import effects, flows, plans
from ragcache.plans import make_request
from ragcache.policies import registry
from ragcache.scripts import PUBLISH


class Upstream:
    """A chunk iterator that records whether it was closed."""

    def __init__(self) -> None:
        self.closed = False
        self.sent = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        self.sent += 1
        return {"id": "c", "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {"content": f"piece {self.sent} "}, "finish_reason": None}]}

    def close(self) -> None:
        self.closed = True


def drive_until_publish_then_cancel(flow) -> None:
    """Run the flow with the sync driver's effects, answer Begin/Emit as a consumer would,
    and throw CancelledError into the flow at its first PUBLISH, as a cancelled task would."""
    value, error = None, None
    while True:
        effect = flow.throw(error) if error is not None else flow.send(value)
        value = error = None
        if type(effect) in (effects.Begin, effects.Emit):
            continue
        if type(effect) is effects.Run and effect.script is PUBLISH:
            error = asyncio.CancelledError()
            continue
        try:
            value = effects._execute(effect)
        except BaseException as exc:  # noqa: BLE001 - thrown into the flow, as the drivers do
            error = exc


def test_a_leader_cancelled_while_publishing_releases_its_lock_and_closes_the_upstream(policy_factory,
                                                                                      redis_client):
    policy_factory("default", mode="on", enabled=True, scope="global", ttl_seconds=600)
    upstream = Upstream()
    request = make_request([{"role": "user", "content": f"cancel {uuid.uuid4().hex}"}], model="m", policy="default",
                           scope=None, params=None, context_version=None, kind="stream")
    key = plans.plan(request, registry.current()).key
    with pytest.raises(asyncio.CancelledError):
        drive_until_publish_then_cancel(flows.get_or_stream(request, lambda: upstream))
    assert upstream.sent == 1 and upstream.closed
    assert redis_client.exists(key.lock, key.entry) == 0
