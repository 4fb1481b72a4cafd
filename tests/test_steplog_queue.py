"""The step log queue (the shipped default): lines are formatted and written by a daemon
thread, in order, with the time, thread and process of the request that logged them."""
from __future__ import annotations

import json
import logging
import threading

import pytest

from ragcache import steplog
from ragcache.services import cache_service

STEP_63 = "RAG STEP 63 (RAG.cache.usagetracker.track.track.cache.hit): UsageTracker.track Track cache hit | attrs="


@pytest.fixture
def queued(settings, ragcache_log):
    settings.RAGCACHE = {**settings.RAGCACHE, "STEP_LOG_QUEUE": True}
    yield ragcache_log
    assert steplog.flush()


def test_queued_lines_arrive_in_order_with_the_requests_thread_and_time(policy_factory, queued):
    policy_factory("default")
    assert cache_service.cache_response("q", "an answer", model="m")
    for _ in range(50):
        assert cache_service.get_cached_response("q", model="m") is not None
    assert steplog.flush(5)
    lines = [r for r in queued.records if r.getMessage().startswith(STEP_63)]
    assert len(lines) == 50
    assert all(r.threadName == threading.current_thread().name and r.thread == threading.get_ident() for r in lines)
    assert all(a.created <= b.created for a, b in zip(lines, lines[1:], strict=False))
    attrs = json.loads(lines[0].getMessage()[len(STEP_63):])
    assert attrs["result"] == "hit" and attrs["tokens_avoided"] is None and lines[0].rag_attrs == attrs


def test_a_broken_handler_does_not_stop_the_writer(policy_factory, queued):
    class Broken(logging.Handler):
        def emit(self, record):
            raise RuntimeError("disk full")

    broken = Broken()
    broken.handleError = lambda record: None  # noqa: ARG005 - a handler that fails quietly
    logging.getLogger("ragcache").addHandler(broken)
    try:
        policy_factory("default")
        cache_service.cache_response("q", "an answer", model="m")
        cache_service.get_cached_response("q", model="m")
        assert steplog.flush(5)
        assert [r for r in queued.records if r.getMessage().startswith(STEP_63)]
    finally:
        logging.getLogger("ragcache").removeHandler(broken)
