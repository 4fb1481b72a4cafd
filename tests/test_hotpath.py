"""Guards for the hit path's cost (issue 6). Not timings: what makes a hit fast is that it
costs one Redis round trip, tracking included, and no SQL. These tests count both on the
real connections (Redis and the database are not mocked), for the sync and the async
drivers, so a change that adds a second command or a query to a hit fails here,
whatever the machine's speed."""
from __future__ import annotations

import asyncio
import logging

import pytest
import redis as redis_lib
import redis.asyncio.connection
from prometheus_client import REGISTRY
from redis.connection import AbstractConnection

from ragcache import connection, metrics, policies, scripts, store
from ragcache.keys import SHARDS
from ragcache.models import CacheFlags
from ragcache.policies import registry
from ragcache.services import cache_service
from ragcache.steplog import log_step
from ragcache.usage import parse_header

QUESTION = "How do I rotate the API keys of a production service without downtime?"
MODEL = "gpt-hotpath"
CHUNKS = ["Issue a new key, ", "deploy it, ", "revoke the old one."]


def answer(text: str = "Issue a new key, deploy it next to the old one, then revoke the old one.") -> dict:
    return {
        "choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 40, "completion_tokens": 20},
    }


def _packet(command) -> bytes:
    return b"".join(command) if isinstance(command, (list, tuple)) else (
        command.encode() if isinstance(command, str) else command)


class _Packets:
    """Counts Connection.send_packed_command calls, sync and ``redis.asyncio``: redis-py
    writes each command, or a whole pipeline, with one call and then reads the reply, so
    one call is one round trip. (Counting: the real method still runs.)"""

    def __init__(self, monkeypatch) -> None:
        self.sent: list[bytes] = []
        self.sent_async: list[bytes] = []
        original = AbstractConnection.send_packed_command
        original_async = redis.asyncio.connection.AbstractConnection.send_packed_command

        def counting(conn, command, check_health=True):
            self.sent.append(_packet(command))
            return original(conn, command, check_health)

        async def counting_async(conn, command, check_health=True):
            self.sent_async.append(_packet(command))
            return await original_async(conn, command, check_health)

        monkeypatch.setattr(AbstractConnection, "send_packed_command", counting)
        monkeypatch.setattr(redis.asyncio.connection.AbstractConnection, "send_packed_command", counting_async)

    def clear(self) -> None:
        self.sent.clear()
        self.sent_async.clear()


class _Reloads:
    """Counts policy snapshot loads: the only SQL a lookup can run. django_assert_num_queries
    sees the test thread's connection only; a reload in the async driver would run in a
    worker thread, so the async guards count loads as well."""

    def __init__(self, monkeypatch) -> None:
        self.count = 0
        original = policies.load_snapshot

        def counting():
            self.count += 1
            return original()

        monkeypatch.setattr(policies, "load_snapshot", counting)


def lookups(policy: str, result: str) -> float:
    return REGISTRY.get_sample_value("ragcache_lookups_total", {"policy": policy, "result": result}) or 0.0


def events(client) -> int:
    """Usage events over every shard's stream."""
    pipe = client.pipeline(transaction=False)
    for stream in store.current_layout().streams:
        pipe.xlen(stream)
    return sum(pipe.execute())


def last_event(client, key: str) -> dict:
    layout = store.current_layout()
    shard = next(i for i, base in enumerate(layout.bases) if key.startswith(base + ":"))
    return client.xrevrange(layout.streams[shard], count=1)[0][1]


@pytest.fixture
def warm(policy_factory):
    """The default policy, an entry, and one hit already made: connection open, Lua
    scripts loaded, policy snapshot in memory. What is left is the steady-state hit."""
    policy_factory("default")
    assert cache_service.cache_response(QUESTION, answer(), model=MODEL)
    assert cache_service.get_cached_response(QUESTION, model=MODEL) is not None
    assert cache_service.get_or_call(QUESTION, _never, model=MODEL).hit
    stream = cache_service.get_or_stream(QUESTION, lambda: iter(CHUNKS), model=MODEL)
    assert not stream.hit and list(stream) == CHUNKS
    assert cache_service.get_or_stream(QUESTION, _never, model=MODEL).hit


def _never():
    raise AssertionError("the LLM was called on a hit")


@pytest.mark.django_db
def test_a_hit_with_tracking_on_is_one_round_trip_and_no_sql(warm, monkeypatch, redis_client,
                                                            django_assert_num_queries):
    assert registry.current().tracking_enabled
    events_before = events(redis_client)
    hits_before = lookups("default", "hit")
    packets = _Packets(monkeypatch)
    with django_assert_num_queries(0):
        for _ in range(5):
            cached = cache_service.get_cached_response(QUESTION, model=MODEL)
            assert cached is not None and cached.content.startswith("Issue a new key")
    assert len(packets.sent) == 5, packets.sent
    assert all(packet.count(b"EVALSHA") == 1 and scripts.LOOKUP.sha.encode() in packet for packet in packets.sent)
    assert packets.sent_async == []
    # Tracking really happened inside those round trips: five hit events, five counted hits.
    assert events(redis_client) == events_before + 5
    last = last_event(redis_client, cached.key)
    assert last[b"r"] == b"hit" and last[b"e"].startswith(b'{"v":2,')
    assert parse_header(last[b"h"].decode())[:2] == ("default", MODEL)
    assert lookups("default", "hit") == hits_before + 5


@pytest.mark.django_db
def test_a_get_or_call_hit_is_one_round_trip_and_no_sql(warm, monkeypatch, redis_client, django_assert_num_queries):
    events_before = events(redis_client)
    packets = _Packets(monkeypatch)
    with django_assert_num_queries(0):
        results = [cache_service.get_or_call(QUESTION, _never, model=MODEL) for _ in range(5)]
    assert all(r.hit for r in results)
    assert results[0].response["choices"][0]["message"]["content"].startswith("Issue a new key")
    assert len(packets.sent) == 5, packets.sent
    assert events(redis_client) == events_before + 5


@pytest.mark.django_db
def test_a_get_or_stream_hit_is_one_round_trip_and_no_sql(warm, monkeypatch, redis_client, django_assert_num_queries):
    events_before = events(redis_client)
    packets = _Packets(monkeypatch)
    with django_assert_num_queries(0):
        for _ in range(3):
            stream = cache_service.get_or_stream(QUESTION, _never, model=MODEL)
            assert stream.hit and list(stream) == CHUNKS
    assert len(packets.sent) == 3, packets.sent
    assert events(redis_client) == events_before + 3


@pytest.mark.django_db
def test_a_kill_switch_bypass_is_one_round_trip_no_sql_and_recorded(warm, monkeypatch, redis_client,
                                                                     django_assert_num_queries):
    """Trust 18: a bypass is recorded like any lookup (0.1 never recorded kill-switch
    bypasses); its event costs the one round trip that also tells the process when the
    switch is turned off again."""
    flags = CacheFlags.load()
    flags.kill_switch = True
    flags.save()
    registry.invalidate()
    assert registry.current().kill_switch
    events_before = events(redis_client)
    packets = _Packets(monkeypatch)
    with django_assert_num_queries(0):
        results = [cache_service.get_or_call(QUESTION, lambda: answer("from the LLM"), model=MODEL)
                   for _ in range(3)]
    assert [(r.hit, r.outcome, r.reason) for r in results] == [(False, "bypass", "kill_switch")] * 3
    assert len(packets.sent) == 3 and all(scripts.EVENT.sha.encode() in p for p in packets.sent), packets.sent
    assert events(redis_client) == events_before + 3
    last = last_event(redis_client, results[0].key)
    assert (last[b"r"], last[b"x"]) == (b"bypass", b"kill_switch")


# --- the async driver: the same guards on redis.asyncio connections -------------------------------------

@pytest.mark.django_db
def test_async_hits_are_one_round_trip_each_and_no_sql(warm, monkeypatch, redis_client, django_assert_num_queries):
    events_before = events(redis_client)
    hits_before = lookups("default", "hit")
    reloads = _Reloads(monkeypatch)
    snapshot = registry.current()
    packets = _Packets(monkeypatch)
    counted = {}

    async def scenario():
        # Warm this loop's client first (a new connection says hello); then count.
        assert await cache_service.aget_cached_response(QUESTION, model=MODEL) is not None
        packets.clear()
        for _ in range(3):
            cached = await cache_service.aget_cached_response(QUESTION, model=MODEL)
            assert cached is not None and cached.content.startswith("Issue a new key")
        counted["get"] = list(packets.sent_async)
        packets.clear()
        for _ in range(3):
            result = await cache_service.aget_or_call(QUESTION, _never, model=MODEL)
            assert result.hit and result.outcome == "hit"
        counted["call"] = list(packets.sent_async)
        packets.clear()
        for _ in range(3):
            stream = await cache_service.aget_or_stream(QUESTION, _never, model=MODEL)
            assert stream.hit
            assert [chunk async for chunk in stream] == CHUNKS
        counted["stream"] = list(packets.sent_async)
        counted["sync"] = list(packets.sent)

    with django_assert_num_queries(0):
        asyncio.run(scenario())
    for name in ("get", "call", "stream"):
        assert len(counted[name]) == 3, (name, counted[name])
        assert all(p.count(b"EVALSHA") == 1 and scripts.LOOKUP.sha.encode() in p for p in counted[name]), name
    assert counted["sync"] == []  # the async driver never falls back on the sync client
    assert reloads.count == 0 and registry.current() is snapshot
    assert events(redis_client) == events_before + 10
    assert lookups("default", "hit") == hits_before + 10


@pytest.mark.django_db
def test_async_lookups_return_their_connection_for_the_next_one(warm):
    async def scenario():
        for i in range(10):
            assert await cache_service.aget_cached_response(QUESTION, model=MODEL) is not None
            assert await cache_service.aget_cached_response(f"{QUESTION} miss {i}", model=MODEL) is None
            assert await cache_service.acache_response(f"{QUESTION} store {i}", answer(), model=MODEL)
        idle, _make = connection.async_idle()
        assert len(idle) == 1  # sequential calls reuse one connection
        results = await asyncio.gather(*(cache_service.aget_cached_response(QUESTION, model=MODEL)
                                         for _ in range(20)))
        assert all(r is not None for r in results)
        assert 1 < len(idle) <= 20  # concurrent calls each had one, and all came back

    asyncio.run(scenario())


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
    pool = connection.client().connection_pool
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
        assert server.script_exists(scripts.LOOKUP.sha) == [False]
        cached = cache_service.get_cached_response(QUESTION, model=MODEL)
        assert cached is not None and cached.content.startswith("Issue a new key")
        assert server.script_exists(scripts.LOOKUP.sha) == [True]
        assert connection.breaker.open_until == 0  # NOSCRIPT is not an outage
        server.script_flush()
        assert cache_service.cache_response(f"{QUESTION} again", answer("again"), model=MODEL)  # store reloads
        assert server.script_exists(scripts.STORE.sha) == [True]
        packets = _Packets(monkeypatch)
        assert cache_service.get_cached_response(QUESTION, model=MODEL) is not None  # lookup reloads
        assert cache_service.get_cached_response(f"{QUESTION} again", model=MODEL).content == "again"
        assert [b"EVALSHA" in p for p in packets.sent] == [True, False, True, True]  # NOSCRIPT, LOAD, again
        assert b"SCRIPT" in packets.sent[1]

        server.script_flush()  # the async driver recovers the same way

        async def scenario():
            assert (await cache_service.aget_cached_response(QUESTION, model=MODEL)).content.startswith("Issue")
            packets.clear()
            assert (await cache_service.aget_cached_response(f"{QUESTION} again", model=MODEL)).content == "again"
            assert len(packets.sent_async) == 1

        asyncio.run(scenario())
        assert server.script_exists(scripts.LOOKUP.sha) == [True]
        assert connection.breaker.open_until == 0
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


def test_stream_reads_return_raw_values_and_values_holding_nul(redis_client):
    """Aggregation reads every shard's stream through one consumer group; values come back
    as the raw bytes written (one holding NUL too, and its neighbours intact), from both
    the new-events read and the pending-events read, until they are acknowledged."""
    store.ensure_groups()
    store.ensure_groups()  # idempotent (BUSYGROUP is not an error)
    streams = store.current_layout().streams
    assert len(streams) == SHARDS
    written = {
        3: {b"r": b"miss", b"h": b"default\x1fgpt\x1fglobal\x1fk1\x1f", b"t": b"1"},
        200: {b"r": b"hit", b"h": b"default\x1fodd\x00model\x1fglobal\x1fk2\x1f", b"e": b'{"v":2,"n":2}', b"t": b"2"},
        255: {b"r": b"store", b"h": "caf\u00e9\x1fgpt\x1fglobal\x1fk3\x1f".encode(), b"t": b"3"},
    }
    ids = {shard: redis_client.xadd(streams[shard], fields).decode() for shard, fields in written.items()}
    read = store.read_events(10, pending=False)
    assert sorted(read) == sorted((shard, ids[shard], fields) for shard, fields in written.items())
    assert store.read_events(10, pending=False) == []
    pending = store.read_events(10, pending=True)  # still pending: never acknowledged
    assert sorted(pending) == sorted(read)
    redis_client.xadd(streams[3], {"r": "miss", "h": "default\x1fgpt\x1fglobal\x1fk4\x1f", "t": "4"})
    assert [fields[b"t"] for _, _, fields in store.read_events(10, pending=False)] == [b"4"]
    store.acknowledge({3: [ids[3]], 200: [ids[200]], 255: [ids[255]]})
    assert [fields[b"t"] for _, _, fields in store.read_events(10, pending=True)] == [b"4"]
    assert redis_client.xlen(streams[200]) == 0  # acknowledged events are deleted
