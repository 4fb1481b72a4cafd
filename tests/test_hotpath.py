"""Guards for the hit path's cost (issue 6). Not timings: what makes a hit fast is that it
costs one Redis round trip, tracking included, and no SQL. These tests count both on the
real connections (Redis and the database are not mocked), so a change that adds a second
command or a query to a hit fails here, whatever the machine's speed."""
from __future__ import annotations

import logging

import pytest
import redis as redis_lib
from prometheus_client import REGISTRY
from redis.connection import AbstractConnection

from ragcache import metrics, store
from ragcache.policies import registry
from ragcache.services import cache_service
from ragcache.steplog import log_step

QUESTION = "How do I rotate the API keys of a production service without downtime?"
MODEL = "gpt-hotpath"


def answer(text: str = "Issue a new key, deploy it next to the old one, then revoke the old one.") -> dict:
    return {
        "choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 40, "completion_tokens": 20},
    }


class _Packets:
    """Counts Connection.send_packed_command calls: redis-py writes each command, or a
    whole pipeline, with one call and then reads the reply, so one call is one round trip."""

    def __init__(self, monkeypatch) -> None:
        self.sent: list[bytes] = []
        original = AbstractConnection.send_packed_command

        def counting(conn, command, check_health=True):
            self.sent.append(b"".join(command) if isinstance(command, (list, tuple)) else command)
            return original(conn, command, check_health)

        monkeypatch.setattr(AbstractConnection, "send_packed_command", counting)


def lookups(policy: str, result: str) -> float:
    return REGISTRY.get_sample_value("ragcache_lookups_total", {"policy": policy, "result": result}) or 0.0


@pytest.fixture
def warm(policy_factory):
    """The default policy, an entry, and one hit already made: connection open, Lua
    scripts loaded, policy snapshot in memory. What is left is the steady-state hit."""
    policy_factory("default")
    assert cache_service.cache_response(QUESTION, answer(), model=MODEL)
    assert cache_service.get_cached_response(QUESTION, model=MODEL) is not None
    assert cache_service.get_or_call(QUESTION, _never, model=MODEL).hit


def _never():
    raise AssertionError("the LLM was called on a hit")


@pytest.mark.django_db
def test_a_hit_with_tracking_on_is_one_round_trip_and_no_sql(warm, monkeypatch, redis_client,
                                                            django_assert_num_queries):
    assert registry.current().tracking_enabled
    events_before = redis_client.xlen(store.stream_key())
    hits_before = lookups("default", "hit")
    packets = _Packets(monkeypatch)
    with django_assert_num_queries(0):
        for _ in range(5):
            cached = cache_service.get_cached_response(QUESTION, model=MODEL)
            assert cached is not None and cached.content.startswith("Issue a new key")
    assert len(packets.sent) == 5, packets.sent
    assert all(b"EVALSHA" in packet for packet in packets.sent)
    # Tracking really happened inside those round trips: five hit events, five counted hits.
    assert redis_client.xlen(store.stream_key()) == events_before + 5
    last = redis_client.xrevrange(store.stream_key(), count=1)[0][1]
    assert last[b"r"] == b"hit" and last[b"e"].startswith(b'{"v":')
    assert lookups("default", "hit") == hits_before + 5


@pytest.mark.django_db
def test_a_get_or_call_hit_is_one_round_trip_and_no_sql(warm, monkeypatch, redis_client, django_assert_num_queries):
    events_before = redis_client.xlen(store.stream_key())
    packets = _Packets(monkeypatch)
    with django_assert_num_queries(0):
        results = [cache_service.get_or_call(QUESTION, _never, model=MODEL) for _ in range(5)]
    assert all(r.hit for r in results)
    assert results[0].response["choices"][0]["message"]["content"].startswith("Issue a new key")
    assert len(packets.sent) == 5, packets.sent
    assert redis_client.xlen(store.stream_key()) == events_before + 5


@pytest.mark.django_db
def test_a_hit_stays_one_round_trip_with_the_step_log_at_info(warm, monkeypatch, django_assert_num_queries):
    """The step 63 line is logged on every hit at INFO; logging must not add I/O to Redis or SQL."""
    logger = logging.getLogger("ragcache.steps")
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        packets = _Packets(monkeypatch)
        with django_assert_num_queries(0):
            assert cache_service.get_cached_response(QUESTION, model=MODEL) is not None
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert len(packets.sent) == 1
    step63 = [r for r in records if getattr(r, "rag_step", None) == 63]
    assert len(step63) == 1
    assert step63[0].getMessage().startswith("RAG STEP 63 (RAG.cache.usagetracker.track.track.cache.hit): ")
    assert step63[0].rag_attrs["result"] == "hit" and QUESTION not in step63[0].getMessage()


def test_log_step_record_names_its_origin_and_carries_attrs():
    """log_step builds the record itself (no stack walk); the record must still look like
    one from logger.log in log_step: same logger, level, function and extra fields."""
    logger = logging.getLogger("ragcache.steps")
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        log_step(68, {"cache_key": "abc", "hit_rate": None, "expiry_time": "2030-01-01T00:00:00+00:00"})
        log_step(61, {"policy": "p", "cache_key": "abc"}, logging.DEBUG)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    store_line, key_line = records
    assert (store_line.name, store_line.levelno, key_line.levelno) == ("ragcache.steps", logging.INFO, logging.DEBUG)
    assert store_line.funcName == "log_step" and store_line.pathname.endswith("steplog.py")
    assert (store_line.rag_step, store_line.rag_step_id) == (68, "RAG.cache.cacheservice.cache.response.store.in.redis")
    assert store_line.getMessage() == (
        "RAG STEP 68 (RAG.cache.cacheservice.cache.response.store.in.redis): CacheService.cache_response "
        'Store in Redis | attrs={"cache_key": "abc", "hit_rate": null, "expiry_time": "2030-01-01T00:00:00+00:00"}'
    )


@pytest.mark.django_db
def test_lookups_return_their_connection_to_the_pool(warm):
    """The hit path runs its script on a pooled connection directly; every lookup and
    store must give it back, whatever the outcome."""
    pool = store._client().connection_pool
    # The pool is shared with earlier tests (threaded ones open several connections), so
    # compare with what it held before: sequential calls must not open any more.
    before = len(pool._available_connections) + len(pool._in_use_connections)
    for i in range(20):
        cache_service.get_cached_response(QUESTION, model=MODEL)
        cache_service.get_cached_response(f"{QUESTION} miss {i}", model=MODEL)
        cache_service.cache_response(f"{QUESTION} store {i}", answer(), model=MODEL)
    assert not pool._in_use_connections
    assert len(pool._available_connections) <= max(before, 1)


@pytest.mark.slow
@pytest.mark.django_db
def test_a_server_that_lost_its_scripts_still_serves_hits(private_redis, policy_factory, monkeypatch):
    """After SCRIPT FLUSH (or a restart) EVALSHA answers NOSCRIPT: the hit path loads the
    script again and serves the hit in the same call, and later hits are one round trip."""
    policy_factory("default")
    assert cache_service.cache_response(QUESTION, answer(), model=MODEL)
    assert cache_service.get_cached_response(QUESTION, model=MODEL) is not None
    server = redis_lib.Redis(port=private_redis.port)
    try:
        server.script_flush()
        assert server.script_exists(store._script("lookup").sha) == [False]
        cached = cache_service.get_cached_response(QUESTION, model=MODEL)
        assert cached is not None and cached.content.startswith("Issue a new key")
        assert server.script_exists(store._script("lookup").sha) == [True]
        assert store.breaker.open_until == 0  # NOSCRIPT is not an outage
        server.script_flush()
        assert cache_service.cache_response(f"{QUESTION} again", answer("again"), model=MODEL)  # store reloads
        assert server.script_exists(store._script("store").sha) == [True]
        packets = _Packets(monkeypatch)
        assert cache_service.get_cached_response(QUESTION, model=MODEL) is not None  # lookup reloads
        assert cache_service.get_cached_response(f"{QUESTION} again", model=MODEL).content == "again"
        assert [b"EVALSHA" in p for p in packets.sent] == [True, False, True, True]  # NOSCRIPT, LOAD, again
        assert b"SCRIPT" in packets.sent[1]
    finally:
        server.close()


def test_metric_children_are_the_ones_labels_returns():
    """metrics.child caches labels(): the cached child must be the very object that
    prometheus_client exports, or increments would vanish from /metrics."""
    child = metrics.child(metrics.LOOKUPS, "hotpath-policy", "hit")
    assert child is metrics.LOOKUPS.labels("hotpath-policy", "hit")
    assert metrics.child(metrics.LOOKUPS, "hotpath-policy", "hit") is child
    before = lookups("hotpath-policy", "hit")
    child.inc()
    assert lookups("hotpath-policy", "hit") == before + 1


def test_stream_reads_decode_whole_batches_and_values_holding_nul(redis_client):
    """Aggregation reads raw stream replies and decodes a batch at once, joined on NUL; a
    value that holds NUL itself must still come back intact (and its neighbours too),
    from both the new-events read and the pending-events claim."""
    store.ensure_group()
    stream = store.stream_key()
    written = [
        {"r": "miss", "p": "default", "m": "gpt", "t": "1"},
        {"r": "hit", "p": "default", "m": "odd\x00model", "e": '{"v":1,"n":2}', "t": "2"},
        {"r": "store", "p": "caf\u00e9", "m": "gpt", "t": "3"},
    ]
    ids = [redis_client.xadd(stream, fields).decode() for fields in written]
    read = store.read_new("reader", 10)
    assert read == list(zip(ids, written, strict=True))
    assert store.read_new("reader", 10) == []
    claimed = store.claim_pending("claimer", 10)  # still pending: never acknowledged
    assert claimed == read
    redis_client.xadd(stream, {"r": "miss", "p": "default", "m": "gpt", "t": "4"})
    assert [fields["t"] for _, fields in store.read_new("reader", 10)] == ["4"]
