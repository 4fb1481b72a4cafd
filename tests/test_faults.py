"""Redis faults against a private redis-server: stopped, slow, restarted empty.

Each test points ragcache at a redis-server of its own (``private_redis``) and stops,
blocks or restarts it; the shared Redis is never touched. Assertions count calls into
redis-py (never wall-clock time per call): a deadline is only used to fail a test that
would otherwise wait for ever.
"""
from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections import Counter

import pytest
import redis as redis_lib
from django.db import connections
from prometheus_client import REGISTRY
from redis.backoff import NoBackoff
from redis.retry import Retry

from ragcache import connection, flows, keys, store
from ragcache.aggregation import aggregate
from ragcache.conf import get_config
from ragcache.models import UsageRecord, UsageRollup
from ragcache.policies import registry
from ragcache.services import cache_service
from ragcache.usage import event_header

pytestmark = [pytest.mark.django_db, pytest.mark.slow]

MODEL = "fault-model"


def answer_for(question: str) -> dict:
    return {
        "choices": [{"message": {"role": "assistant", "content": f"answer to {question}"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5},
    }


def content(response: dict) -> str:
    return response["choices"][0]["message"]["content"]


class RedisCalls:
    """Counts every command redis-py sends and every connection it opens, in any thread."""

    def __init__(self, monkeypatch) -> None:
        self.counts: Counter = Counter()
        self._lock = threading.Lock()
        for name in ("connect", "send_packed_command"):
            original = getattr(redis_lib.connection.AbstractConnection, name)
            monkeypatch.setattr(redis_lib.connection.AbstractConnection, name, self._counting(name, original))

    def _counting(self, name, original):
        def wrapper(conn, *args, **kwargs):
            with self._lock:
                self.counts[name] += 1
            return original(conn, *args, **kwargs)

        return wrapper

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def redis_up_gauge() -> float | None:
    return REGISTRY.get_sample_value("ragcache_redis_up")


def wait_for_hit(question: str, deadline_s: float = 5.0) -> int:
    """Call get_or_call until a hit is served; returns how many calls it took. Fails
    after ``deadline_s`` seconds (the issue's bound for "lookups resume")."""
    deadline = time.monotonic() + deadline_s
    calls = 0
    while True:
        calls += 1
        result = cache_service.get_or_call(question, lambda: answer_for(question), model=MODEL)
        assert content(result.response) == f"answer to {question}"
        if result.hit:
            return calls
        assert time.monotonic() < deadline, f"no hit within {deadline_s}s after Redis came back"
        time.sleep(0.02)


def calls_while_breaker_open(calls: RedisCalls, question: str, wanted: int = 20, limit_s: float = 3.0):
    """Make get_or_call calls (this thread only) until ``wanted`` calls ran entirely while
    the breaker was open and one call after its cooldown reached Redis again (the probe).
    Returns the redis-py calls made by each call inside the window, and by each probe."""
    in_window: list[int] = []
    probes: list[int] = []
    stop_at = time.monotonic() + limit_s
    while time.monotonic() < stop_at and (len(in_window) < wanted or not probes):
        open_until = connection.breaker.open_until
        before = calls.total
        result = cache_service.get_or_call(question, lambda: answer_for(question), model=MODEL)
        assert content(result.response) == f"answer to {question}"
        made = calls.total - before
        if open_until and time.monotonic() < open_until:
            in_window.append(made)  # began and ended while the breaker was open
        elif made:
            probes.append(made)
    return in_window, probes


@pytest.fixture(autouse=True)
def default_policy(policy_factory):
    # Created here, not taken from the data migration: a transactional test elsewhere may
    # have flushed the tables.
    return policy_factory("default", enabled=True, mode="on", scope="global", ttl_seconds=3600, rollout_percent=100)


@pytest.fixture(autouse=True)
def no_pending_cleanups():
    """``flows._later`` is per process: cleanups another test abandoned (against its own
    server) must not run in this one."""
    flows._later.clear()
    yield
    flows._later.clear()


@pytest.fixture
def fast_breaker(settings):
    settings.RAGCACHE = {**settings.RAGCACHE, "BREAKER_COOLDOWN": 0.2}


def test_redis_stopped_during_traffic_every_caller_gets_its_answer(private_redis, fast_breaker):
    """Threads call get_or_call while the server is stopped and started again: every call
    returns its own LLM answer, none raises, and hits resume within 5 s of the restart."""
    registry.current()  # snapshot loaded once, in this thread: workers never touch the DB
    questions = [f"fault question {i}" for i in range(6)]
    stop = threading.Event()
    errors: list[BaseException] = []
    outcomes: list[tuple[float, str, bool]] = []  # (monotonic time, question, hit)
    lock = threading.Lock()

    def worker(offset: int) -> None:
        i = offset
        try:
            while not stop.is_set():
                question = questions[i % len(questions)]
                i += 1
                try:
                    result = cache_service.get_or_call(question, lambda q=question: answer_for(q), model=MODEL)
                    got = content(result.response)
                    if got != f"answer to {question}":
                        raise AssertionError(f"{question!r} was answered with {got!r}")
                    with lock:
                        outcomes.append((time.monotonic(), question, result.hit))
                except BaseException as exc:  # noqa: BLE001 - any exception is the failure we look for
                    errors.append(exc)
                    return
                time.sleep(0.002)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.4)
        stopping_at = time.monotonic()
        private_redis.stop()
        stopped_at = time.monotonic()  # the process has exited
        time.sleep(1.0)
        starting_at = time.monotonic()
        private_redis.start()
        restarted_at = time.monotonic()
        # Within 5 s of the restart some thread must be served a hit again.
        deadline = restarted_at + 5.0
        while not any(hit and t > restarted_at for t, _, hit in list(outcomes)) and not errors:
            assert time.monotonic() < deadline, "no hit served within 5 s after Redis came back"
            time.sleep(0.02)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert not errors, errors[:3]
    before = [hit for t, _, hit in outcomes if t < stopping_at]
    during = [hit for t, _, hit in outcomes if stopped_at < t < starting_at]
    after = [hit for t, _, hit in outcomes if t > restarted_at]
    assert any(before), "warm-up served no hit"
    assert during and not any(during), "calls while Redis was down must all be answered by the LLM"
    assert any(after)
    assert redis_up_gauge() == 1.0


def test_breaker_skips_redis_while_open_and_probes_after_cooldown(private_redis, fast_breaker, monkeypatch):
    """While the breaker is open a call makes no redis-py call at all; after the cooldown
    one call probes; once Redis is back the probe closes the breaker and hits resume."""
    registry.current()
    cache_service.get_or_call("breaker warm-up", lambda: answer_for("breaker warm-up"), model=MODEL)
    assert cache_service.get_or_call("breaker warm-up", lambda: answer_for("x"), model=MODEL).hit
    calls = RedisCalls(monkeypatch)

    private_redis.stop()
    before = calls.total
    first = cache_service.get_or_call("breaker q", lambda: answer_for("breaker q"), model=MODEL)
    assert content(first.response) == "answer to breaker q" and not first.hit
    assert calls.total > before, "the first call after the outage must have tried Redis"
    assert connection.breaker.open_until > 0
    assert redis_up_gauge() == 0.0

    in_window, probes = calls_while_breaker_open(calls, "breaker q")
    assert len(in_window) >= 5
    assert in_window == [0] * len(in_window), "a call made while the breaker was open reached redis-py"
    assert probes, "after the cooldown a call must probe Redis"

    private_redis.start()
    assert wait_for_hit("breaker after restart") <= 50
    assert connection.breaker.open_until == 0
    assert redis_up_gauge() == 1.0


def _block_server(port: int, seconds: float) -> threading.Thread:
    """Send DEBUG SLEEP from a client of its own and return once the server is blocked."""
    def sleeper() -> None:
        client = redis_lib.Redis(port=port)
        try:
            client.execute_command("DEBUG", "SLEEP", seconds)
        finally:
            client.close()

    thread = threading.Thread(target=sleeper)
    thread.start()
    # No retries: redis-py's default client would retry a timeout with backoff.
    probe = redis_lib.Redis(port=port, socket_timeout=0.05, retry=Retry(NoBackoff(), 0))
    try:
        for _ in range(200):
            try:
                probe.ping()
            except redis_lib.TimeoutError:
                return thread  # the server no longer answers: it is sleeping
            time.sleep(0.005)
    finally:
        probe.close()
    raise AssertionError("DEBUG SLEEP did not block the server")


def test_slow_redis_lookup_times_out_to_a_miss_and_breaker_stops_waiting(
    private_redis, fast_breaker, monkeypatch, settings
):
    """DEBUG SLEEP blocks the server: a lookup fails after the socket timeout and is a
    miss; get_or_call answers from the LLM; while the breaker is open nothing waits on
    Redis again; after the sleep the pool works and caching resumes with right answers."""
    assert settings.CACHES["ragcache"]["OPTIONS"]["SOCKET_TIMEOUT"] == 0.1
    registry.current()
    assert cache_service.cache_response("slow q", answer_for("slow q"), model=MODEL)
    assert cache_service.get_cached_response("slow q", model=MODEL) is not None
    calls = RedisCalls(monkeypatch)

    sleeper = _block_server(private_redis.port, 2.0)
    try:
        before = calls.total
        for _ in range(get_config()["BREAKER_TIMEOUTS"]):  # timeouts in a row open the breaker
            assert connection.breaker.open_until == 0
            assert cache_service.get_cached_response("slow q", model=MODEL) is None  # timed out: a miss
        assert calls.total > before
        assert connection.breaker.open_until > 0
        result = cache_service.get_or_call("slow other", lambda: answer_for("slow other"), model=MODEL)
        assert content(result.response) == "answer to slow other" and not result.hit
        in_window, probes = calls_while_breaker_open(calls, "slow q", wanted=10, limit_s=0.6)
        assert len(in_window) >= 5 and in_window == [0] * len(in_window)
        assert probes  # after the cooldown one call waits on Redis once more, then the breaker re-opens
    finally:
        sleeper.join(10)

    # The server is awake: caching resumes without restarting anything, and no reply of
    # a timed-out command is ever read as the answer to a later one.
    deadline = time.monotonic() + 5
    while (cached := cache_service.get_cached_response("slow q", model=MODEL)) is None:
        assert time.monotonic() < deadline, "lookups did not resume after the sleep"
        time.sleep(0.02)
    assert cached.content == "answer to slow q"
    assert cache_service.cache_response("slow second", answer_for("slow second"), model=MODEL)
    for question in ("slow q", "slow second", "slow q"):
        assert cache_service.get_cached_response(question, model=MODEL).content == f"answer to {question}"
    pool = connection.client().connection_pool
    assert not pool._in_use_connections  # timed-out connections went back to the pool (or were dropped)


def test_a_pending_cleanup_never_makes_a_lookup_wait_past_the_socket_timeout(private_redis, fast_breaker,
                                                                             django_assert_num_queries):
    """A cleanup that could not run (``flows._later``: here the release of a lock a
    timed-out lookup may have taken) runs at the start of the next flow. It must run with
    the hot path's socket timeout: on a stalled server that lookup is a miss after the
    timeout, not a wait for the maintenance timeout (BULK_SOCKET_TIMEOUT, 10 s) ending in
    a hit once the server wakes. Sync and async drivers alike."""
    registry.current()
    assert cache_service.cache_response("slow q", answer_for("slow q"), model=MODEL)
    assert cache_service.get_cached_response("slow q", model=MODEL) is not None

    async def async_lookup():
        return await cache_service.aget_cached_response("slow q", model=MODEL)

    assert asyncio.run(async_lookup()) is not None  # the async driver is warm too
    policy, generation, scope, digest = cache_service.get_or_call(
        "slow q", lambda: answer_for("x"), model=MODEL).key.split(":e:", 1)[1].split(":")
    key = keys.CacheKey(store.current_layout(), policy, int(generation), scope, digest)
    for lookup in (lambda: cache_service.get_cached_response("slow q", model=MODEL),
                   lambda: asyncio.run(async_lookup())):
        connection.breaker.reset()
        flows._abandon(key, "a-token-of-nobody")  # what a lookup that timed out leaves behind
        sleeper = _block_server(private_redis.port, 2.0)
        try:
            with django_assert_num_queries(0):
                assert lookup() is None  # gave up after the socket timeout: a miss
            assert flows._later, "the cleanup that could not run was dropped"
        finally:
            sleeper.join(10)
        assert wait_for_hit("slow q") >= 1  # awake again: the cleanup runs, hits resume
        assert not flows._later


def test_lock_taken_by_a_timed_out_lookup_is_released(private_redis, fast_breaker, monkeypatch):
    """A get_or_call whose lookup timed out during DEBUG SLEEP is still run by Redis when
    it wakes, taking the single-flight lock with nobody to release it. The next successful
    call releases it, so the question's next caller leads at once instead of polling for
    LOCK_WAIT seconds as a follower. (The release it could not see is kept in
    ``flows._later`` and run by the next flow.)"""
    registry.current()
    cache_service.get_or_call("lock warm-up", lambda: answer_for("lock warm-up"), model=MODEL)  # scripts loaded
    client = redis_lib.Redis(port=private_redis.port)
    sleeper = _block_server(private_redis.port, 1.2)
    try:
        stalled = cache_service.get_or_call("asked while stalled", lambda: answer_for("asked while stalled"),
                                            model=MODEL)
        assert content(stalled.response) == "answer to asked while stalled" and not stalled.hit
    finally:
        sleeper.join(10)
    assert flows._later, "the timed-out lookup left no cleanup behind"
    wait_for_hit("lock warm-up")  # the first successful call after the sleep releases the lock
    assert not flows._later
    assert list(client.scan_iter(match=f"{store.current_layout().root}:*:l:*")) == []

    calls = RedisCalls(monkeypatch)
    result = cache_service.get_or_call("asked while stalled", lambda: answer_for("asked while stalled"),
                                       model=MODEL)
    assert content(result.response) == "answer to asked while stalled" and not result.hit
    assert calls.counts["send_packed_command"] <= 3  # lookup (leader) + store; a follower polls ~500 times
    assert cache_service.get_or_call("asked while stalled", lambda: answer_for("x"), model=MODEL).hit
    client.close()


def _pending_events(port: int) -> int:
    """Usage events waiting in every shard's stream."""
    client = redis_lib.Redis(port=port)
    try:
        pipe = client.pipeline(transaction=False)
        for stream in store.current_layout().streams:
            pipe.xlen(stream)
        return sum(pipe.execute())
    finally:
        client.close()


def _lookups_in_db() -> int:
    return UsageRecord.objects.filter(result__in=["hit", "miss", "shadow_hit"]).count()


def _rollup_lookups() -> int:
    return sum(UsageRollup.objects.filter(granularity="hour").values_list("lookups", flat=True))


def test_redis_restarted_empty_loses_only_the_unaggregated_window(private_redis):
    """Aggregated events are in the DB; entries are gone after the restart (miss, then
    stored again); exactly the events since the last aggregation are lost; aggregation
    re-creates its consumer group and nothing is counted twice."""
    registry.current()
    # Phase 1: 8 misses (+8 stores), 8 hits = 24 events, aggregated.
    for i in range(8):
        for _ in range(2):
            cache_service.get_or_call(f"restart {i}", lambda i=i: answer_for(f"restart {i}"), model=MODEL)
    assert _pending_events(private_redis.port) == 24
    first = aggregate()
    assert first.ingested == 24 and first.backlog == 0
    aggregated_ids = set(UsageRecord.objects.values_list("event_id", flat=True))
    assert len(aggregated_ids) == 24 and _lookups_in_db() == 16

    # Phase 2: 3 new questions (miss + store) and 3 hits, not yet aggregated when Redis dies.
    for i in range(8, 11):
        cache_service.get_or_call(f"restart {i}", lambda i=i: answer_for(f"restart {i}"), model=MODEL)
        cache_service.get_or_call(f"restart {i}", lambda i=i: answer_for(f"restart {i}"), model=MODEL)
    lost = _pending_events(private_redis.port)
    assert lost == 9

    private_redis.stop()
    private_redis.start()

    # Entries are gone: a miss, then the answer is stored again and served.
    assert cache_service.get_cached_response("restart 0", model=MODEL) is None
    again = cache_service.get_or_call("restart 0", lambda: answer_for("restart 0"), model=MODEL)
    assert not again.hit and content(again.response) == "answer to restart 0"
    assert cache_service.get_or_call("restart 0", lambda: answer_for("wrong"), model=MODEL).hit
    after_restart = _pending_events(private_redis.port)
    assert after_restart == 4  # miss (get_cached_response) + miss + store + hit

    second = aggregate()  # the consumer group is gone with the data: re-created
    assert second.ingested == after_restart and second.duplicates == 0
    ids = set(UsageRecord.objects.values_list("event_id", flat=True))
    assert aggregated_ids <= ids and len(ids) == 24 + after_restart
    assert UsageRecord.objects.count() == 24 + after_restart  # the 9 events of phase 2 are the loss
    assert _lookups_in_db() == 16 + 3 and _rollup_lookups() == _lookups_in_db()

    third = aggregate()
    assert third.ingested == 0 and third.duplicates == 0
    assert UsageRecord.objects.count() == 24 + after_restart and _rollup_lookups() == _lookups_in_db()


def test_restart_with_colliding_stream_ids_never_double_counts(private_redis):
    """If the new server reuses an id already aggregated (its clock behind the old one's),
    the unique event_id makes the event a duplicate: never counted twice."""
    registry.current()
    cache_service.get_or_call("collide", lambda: answer_for("collide"), model=MODEL)
    aggregate()
    old_ids = list(UsageRecord.objects.values_list("event_id", flat=True))
    assert len(old_ids) == 2

    private_redis.stop()
    private_redis.start()
    client = redis_lib.Redis(port=private_redis.port)
    streams = store.current_layout().streams
    try:
        fields = {"r": "miss", "h": event_header("default", MODEL, "global", "0" * 16)}
        for event_id in sorted(old_ids):  # "<shard>-<stream id>"
            shard, entry_id = event_id.split("-", 1)
            client.xadd(streams[int(shard)], fields, id=entry_id)
    finally:
        client.close()
    result = aggregate()
    assert result.duplicates == 2 and result.ingested == 0
    assert UsageRecord.objects.count() == 2 and _rollup_lookups() == _lookups_in_db() == 1


def test_faults_are_injected_on_a_private_server(private_redis):
    """ragcache talks to the test's own server here, so stopping it never touches the shared Redis."""
    with socket.create_connection(("127.0.0.1", private_redis.port), timeout=1):
        pass
    assert connection.client().connection_pool.connection_kwargs["port"] == private_redis.port
    assert connection.client("bulk").connection_pool.connection_kwargs["port"] == private_redis.port
