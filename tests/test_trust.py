"""Regression tests for the defect kinds of the Trust issue that live in the cache core:
wrong answers (policy changes mid-call, key gaps, normalisation), never raise / never
poison (validated reads, oversized entries, a full Redis), and concurrency (lock leaks,
cancellation, blocking calls on the event loop, the breaker's half-open probe, a
follower's latency). Each against the real Redis; private servers for the faults."""
from __future__ import annotations

import asyncio
import threading
import time
from decimal import Decimal

import pytest
import redis as redis_lib
from django.core.checks import run_checks
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from prometheus_client import REGISTRY

from ragcache import aggregation, keys, store
from ragcache.models import CacheFlags, CachePolicy, ModelPrice, UsageRecord
from ragcache.policies import registry
from ragcache.services import cache_service

MODEL = "gpt-trust"


def answer(text="An answer.", finish_reason="stop"):
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish_reason}],
            "usage": {"prompt_tokens": 30, "completion_tokens": 10}}


def entry_keys(client, prefix):
    return sorted(k.decode() for k in client.scan_iter(match=keys.layout(prefix).entry_pattern(), count=1000))


def lock_keys(client, prefix):
    return [k.decode() for k in client.scan_iter(match=f"{keys.layout(prefix).root}:*:l:*", count=1000)]


def sample(name, **labels):
    return REGISTRY.get_sample_value(name, labels) or 0.0


class Gate:
    """A slow LLM call the test can hold open: ``entered`` once it runs, ``release`` to finish."""

    def __init__(self, response):
        self.response = response
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls = 0

    def __call__(self):
        self.calls += 1
        self.entered.set()
        assert self.release.wait(10)
        return self.response


def in_thread(fn):
    box = {}

    def run():
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


@pytest.fixture
def default_policy(policy_factory):
    policy = policy_factory("default", ttl_seconds=3600)
    registry.current()  # warm: threads of these tests then need no SQL
    return policy


# --- 1. A policy change during a call never stores the answer under the new state ---------------

CHANGES = {
    "purge": lambda policy: policy.purge(),
    "scope global -> user": lambda policy: _save(policy, scope="user"),
    "mode read_only": lambda policy: _save(policy, mode="read_only"),
    "ttl shortened": lambda policy: _save(policy, ttl_seconds=5),
    "kill switch on and off": lambda policy: (_flags(kill_switch=True), _flags(kill_switch=False)),
}


def _save(policy, **fields):
    fresh = CachePolicy.objects.get(pk=policy.pk)
    for name, value in fields.items():
        setattr(fresh, name, value)
    fresh.save()


def _flags(**fields):
    flags = CacheFlags.load()
    for name, value in fields.items():
        setattr(flags, name, value)
    flags.save()


@pytest.mark.parametrize("change", list(CHANGES.values()), ids=list(CHANGES))
def test_a_policy_change_during_a_call_stores_nothing_and_never_raises(
        default_policy, redis_client, ragcache_prefix, django_capture_on_commit_callbacks, change):
    llm = Gate(answer("pre-change answer"))
    thread, box = in_thread(lambda: cache_service.get_or_call("q", llm, model=MODEL))
    assert llm.entered.wait(5)
    with django_capture_on_commit_callbacks(execute=True):  # the edit commits: every process is told
        change(default_policy)
    llm.release.set()
    thread.join(10)
    assert "error" not in box, box.get("error")
    result = box["result"]
    assert result.response == answer("pre-change answer") and not result.stored
    assert entry_keys(redis_client, ragcache_prefix) == []  # nowhere: neither old nor new state
    assert lock_keys(redis_client, ragcache_prefix) == []  # and the lock was released
    registry.invalidate()
    policy = CachePolicy.objects.get(name="default")
    scope = 1 if policy.scope != "global" else None
    assert cache_service.get_cached_response("q", model=MODEL, scope=scope) is None


def test_a_purge_before_the_store_refuses_it_but_the_next_call_stores(default_policy,
                                                                        django_capture_on_commit_callbacks):
    llm = Gate(answer())
    thread, box = in_thread(lambda: cache_service.get_or_call("q", llm, model=MODEL))
    assert llm.entered.wait(5)
    with django_capture_on_commit_callbacks(execute=True):
        default_policy.purge()
    llm.release.set()
    thread.join(10)
    assert not box["result"].stored
    assert cache_service.get_or_call("q", lambda: answer("after"), model=MODEL).stored
    assert cache_service.get_cached_response("q", model=MODEL).content == "after"


# --- 3. Key gaps: every answer-shaping param enters the key, equal numbers are one key ------------

@pytest.mark.parametrize(("first", "second"), [
    ({"n": 1}, {"n": 3}),
    ({"presence_penalty": 0}, {"presence_penalty": 1.5}),
    ({"frequency_penalty": 0.1}, {"frequency_penalty": 0.2}),
    ({"reasoning_effort": "low"}, {"reasoning_effort": "high"}),
    ({"max_completion_tokens": 100}, {"max_completion_tokens": 200}),
    ({"logit_bias": {"50256": -100}}, {}),
    ({"modalities": ["text"]}, {"modalities": ["text", "audio"]}),
    ({"verbosity": "low"}, {"verbosity": "high"}),
    ({"temperature": 1}, {"temperature": True}),  # a bool is not the number 1
])
def test_every_answer_shaping_param_enters_the_key(default_policy, first, second):
    assert cache_service.cache_response("q", answer("first"), model=MODEL, params=first)
    assert cache_service.get_cached_response("q", model=MODEL, params=second) is None
    assert cache_service.get_cached_response("q", model=MODEL, params=first).content == "first"


@pytest.mark.parametrize(("first", "second"), [
    ({"temperature": 0}, {"temperature": 0.0}),
    ({"top_p": 1}, {"top_p": 1.0}),
    ({"seed": 7, "user": "alice"}, {"seed": 7, "user": "bob"}),
    ({"stream": False, "metadata": {"a": 1}}, {"stream": True}),
    ({"timeout": 5, "extra_headers": {"X": "1"}}, {}),
    ({"a": 1, "b": 2}, {"b": 2, "a": 1}),
])
def test_equal_requests_share_one_key(default_policy, first, second):
    assert cache_service.cache_response("q", answer("shared"), model=MODEL, params=first)
    assert cache_service.get_cached_response("q", model=MODEL, params=second).content == "shared"


def test_a_policy_can_declare_more_params_as_not_shaping_the_answer(policy_factory):
    policy_factory("default", ignored_params=["user", "request_id"])
    assert cache_service.cache_response("q", answer("x"), model=MODEL, params={"request_id": "r1"})
    assert cache_service.get_cached_response("q", model=MODEL, params={"request_id": "r2"}).content == "x"
    assert cache_service.get_cached_response("q", model=MODEL, params={"request_id": "r2", "n": 2}) is None


# --- 4. Normalisation never merges texts whose lines or indentation differ --------------------------

CODE_A = "def f(x):\n    if x:\n        return 1\n    return 2"
CODE_B = "def f(x):\n    if x:\n        return 1\n        return 2"


def test_normalisation_keeps_lines_and_indentation(policy_factory):
    policy_factory("default", normalize_query=True)
    assert cache_service.cache_response(CODE_A, answer("A's review"), model=MODEL)
    assert cache_service.get_cached_response(CODE_B, model=MODEL) is None
    assert cache_service.get_cached_response("def f(x):\n    if x:\n        return 1\n    return 2",
                                             model=MODEL).content == "A's review"
    assert cache_service.get_cached_response(CODE_A.replace("\n", " "), model=MODEL) is None
    # What it does merge: case, runs of spaces inside a line, trailing spaces, NFKC.
    assert cache_service.cache_response("What is  the TTL?  ", answer("ttl"), model=MODEL)
    assert cache_service.get_cached_response("what is the ttl?", model=MODEL).content == "ttl"
    assert cache_service.get_cached_response("what is the ttl?\nreally", model=MODEL) is None


@pytest.mark.parametrize("normalize", [False, True])
def test_canonically_equal_unicode_is_one_question(policy_factory, normalize):
    policy_factory("default", normalize_query=normalize)
    nfc, nfd = "caf\u00e9 opening hours", "cafe\u0301 opening hours"
    assert nfc != nfd
    assert cache_service.cache_response(nfc, answer("9 to 5"), model=MODEL)
    assert cache_service.get_cached_response(nfd, model=MODEL).content == "9 to 5"
    assert cache_service.get_cached_response([{"role": "user", "content": nfd}], model=MODEL).content == "9 to 5"


# --- 5. Everything read back is validated; a corrupt hit is recorded as a miss -----------------------

@pytest.mark.parametrize("plant", ["meta", "body"])
def test_a_corrupt_entry_is_recorded_as_a_miss_not_a_hit(default_policy, redis_client, plant):
    assert cache_service.cache_response("q", answer(), model=MODEL)
    key = cache_service.get_or_call("q", lambda: None, model=MODEL).key
    before = aggregation.aggregate()
    assert before.ingested >= 2
    if plant == "meta":  # numbers no answer has, behind a valid schema prefix and length
        meta = redis_client.hget(key, "m").replace(b'"pt":30', b'"pt":-5')
        redis_client.hset(key, "m", meta)
    else:  # the recorded length, unreadable bytes
        redis_client.hset(key, "b", b"\xff" * len(redis_client.hget(key, "b")))
    corrupt_before = sample("ragcache_corrupt_entries_total", policy="default")
    llm_result = cache_service.get_or_call("q", lambda: answer("fresh"), model=MODEL)
    assert llm_result.hit is False and llm_result.response == answer("fresh")
    assert sample("ragcache_corrupt_entries_total", policy="default") == corrupt_before + 1
    aggregation.aggregate()
    last_lookup = UsageRecord.objects.filter(result__in=["hit", "miss"]).order_by("-ts", "-id").first()
    assert (last_lookup.result, last_lookup.reason, last_lookup.tokens_avoided) == ("miss", "corrupt", 0)
    assert UsageRecord.objects.filter(result="hit").count() == 1  # only the good hit before the damage


def test_negative_prices_are_refused_with_a_message(db):
    price = ModelPrice(model="m", input_per_1k=Decimal("-1"), output_per_1k=Decimal("1"))
    with pytest.raises(ValidationError) as info:
        price.full_clean()
    assert "input_per_1k" in info.value.message_dict
    with pytest.raises(IntegrityError), transaction.atomic():
        ModelPrice.objects.create(model="m", input_per_1k=Decimal("1"), output_per_1k=Decimal("-0.5"))


# --- 7. One large entry never blacks out the cache -----------------------------------------------------

def test_an_entry_larger_than_the_timeouts_can_carry_is_refused(policy_factory, redis_client, ragcache_prefix):
    policy = policy_factory("default", compress_threshold_bytes=0)
    CachePolicy.objects.filter(pk=policy.pk).update(max_entry_bytes=64 * 1024 * 1024)  # past the form's check
    registry.invalidate()
    assert cache_service.cache_response("small", answer(), model=MODEL)
    huge = answer("x" * (48 * 1024 * 1024))
    assert cache_service.cache_response("huge", huge, model=MODEL) is False  # RAGCACHE['MAX_ENTRY_BYTES']
    assert len(entry_keys(redis_client, ragcache_prefix)) == 1
    assert cache_service.get_cached_response("small", model=MODEL) is not None


def test_max_entry_bytes_is_bounded_in_the_admin_and_by_a_system_check(policy_factory, settings):
    policy = policy_factory("default")
    policy.max_entry_bytes = 64 * 1024 * 1024
    with pytest.raises(ValidationError) as info:
        policy.full_clean()
    assert "RAGCACHE['MAX_ENTRY_BYTES']" in str(info.value)
    settings.RAGCACHE = {**settings.RAGCACHE, "MAX_ENTRY_BYTES": 64 * 1024 * 1024}
    caches = {**settings.CACHES}
    caches["ragcache"] = {**caches["ragcache"], "OPTIONS": {**caches["ragcache"]["OPTIONS"], "SOCKET_TIMEOUT": 0.1}}
    settings.CACHES = caches
    errors = [m for m in run_checks() if m.id == "ragcache.E007"]
    assert len(errors) == 1 and "SOCKET_TIMEOUT" in errors[0].hint


# --- 8. A full Redis still serves hits; lost events are counted -----------------------------------------

@pytest.mark.slow
def test_a_full_redis_still_serves_hits(private_redis, default_policy):
    for i in range(20):
        assert cache_service.cache_response(f"q{i}", answer(f"a{i}"), model=MODEL)
    client = redis_lib.Redis(port=private_redis.port)
    client.config_set("maxmemory-policy", "noeviction")  # Redis's default: refuse writes when full
    client.config_set("maxmemory", client.info("memory")["used_memory"] // 2)
    with pytest.raises(redis_lib.exceptions.OutOfMemoryError):
        client.set("one more", "z")
    lost_before = sample("ragcache_usage_events_lost_total", reason="redis_full")
    streams = store.current_layout().streams
    events_before = sum(client.xlen(s) for s in streams)
    hits = [cache_service.get_or_call(f"q{i}", lambda: answer("called"), model=MODEL) for i in range(20)]
    assert [r.hit for r in hits] == [True] * 20
    lost = sample("ragcache_usage_events_lost_total", reason="redis_full") - lost_before
    written = sum(client.xlen(s) for s in streams) - events_before
    assert lost >= 15 and lost + written == 20  # every event is either in a stream or counted as lost
    stored = cache_service.get_or_call("new question", lambda: answer("new"), model=MODEL)
    assert stored.response == answer("new") and stored.stored is False
    client.close()


# --- 11. Every lock taken is released on every path -----------------------------------------------------

def test_kill_switch_flipped_during_a_call_leaves_no_lock(default_policy, redis_client, ragcache_prefix,
                                                          django_capture_on_commit_callbacks):
    llm = Gate(answer())
    thread, box = in_thread(lambda: cache_service.get_or_call("q", llm, model=MODEL))
    assert llm.entered.wait(5)
    assert len(lock_keys(redis_client, ragcache_prefix)) == 1
    with django_capture_on_commit_callbacks(execute=True):
        _flags(kill_switch=True)
    with django_capture_on_commit_callbacks(execute=True):
        _flags(kill_switch=False)
    llm.release.set()
    thread.join(10)
    assert lock_keys(redis_client, ragcache_prefix) == []
    again = cache_service.get_or_call("q", lambda: answer("again"), model=MODEL)
    assert again.reason != "lock_timeout" and again.stored


@pytest.mark.slow
def test_a_call_cancelled_during_its_lookup_leaves_no_lock(private_redis, default_policy, settings):
    settings.RAGCACHE = {**settings.RAGCACHE, "BREAKER_COOLDOWN": 0.05, "LOCK_WAIT": 5.0}
    caches = {**settings.CACHES}  # a timeout longer than the caller's patience: it cancels mid-lookup
    caches["ragcache"] = {**caches["ragcache"], "OPTIONS": {**caches["ragcache"]["OPTIONS"], "SOCKET_TIMEOUT": 2.0}}
    settings.CACHES = caches
    assert cache_service.get_cached_response("warm", model=MODEL) is None  # scripts loaded
    client = redis_lib.Redis(port=private_redis.port)
    stall = threading.Thread(target=lambda: redis_lib.Redis(port=private_redis.port).execute_command(
        "DEBUG", "SLEEP", "0.5"), daemon=True)
    stall.start()
    time.sleep(0.05)

    async def cancelled():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(cache_service.aget_or_call("q", lambda: answer(), model=MODEL), 0.2)

    asyncio.run(cancelled())
    stall.join(5)
    time.sleep(0.1)  # the stalled server has now run whatever it had received
    locks = [k for k in client.scan_iter(match="*:l:*")]
    # Whatever the late script did, the next call of this process releases what was ours.
    result = cache_service.get_or_call("q", lambda: answer("fresh"), model=MODEL)
    assert result.reason != "lock_timeout" and result.stored
    assert [k for k in client.scan_iter(match="*:l:*")] == []
    print(f"locks left by the cancelled lookup before cleanup: {len(locks)}")
    client.close()


def test_async_cancellation_during_the_call_releases_the_lock(default_policy, redis_client, ragcache_prefix):
    async def slow():
        await asyncio.sleep(5)

    async def scenario():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(cache_service.aget_or_call("q", slow, model=MODEL), 0.2)

    asyncio.run(scenario())
    assert lock_keys(redis_client, ragcache_prefix) == []


# --- 12. aget_or_call never blocks the event loop with a plain function -------------------------------

def test_plain_function_calls_run_off_the_event_loop(default_policy):
    running, most = [0], [0]
    lock = threading.Lock()

    def blocking_llm(n):
        def call():
            with lock:
                running[0] += 1
                most[0] = max(most[0], running[0])
            time.sleep(0.5)
            with lock:
                running[0] -= 1
            return answer(f"answer {n}")
        return call

    async def scenario():
        return await asyncio.gather(*(cache_service.aget_or_call(f"q{n}", blocking_llm(n), model=MODEL)
                                      for n in range(3)))

    results = asyncio.run(scenario())
    assert [r.response for r in results] == [answer(f"answer {n}") for n in range(3)]
    assert most[0] == 3  # all three ran at once: none blocked the loop


# --- 13. Half-open means one probe ----------------------------------------------------------------------

@pytest.mark.slow
def test_after_the_cooldown_one_call_probes_a_stalled_redis(private_redis, default_policy, settings):
    settings.RAGCACHE = {**settings.RAGCACHE, "BREAKER_COOLDOWN": 0.3}
    assert cache_service.get_cached_response("warm", model=MODEL) is None
    stall = threading.Thread(target=lambda: redis_lib.Redis(port=private_redis.port).execute_command(
        "DEBUG", "SLEEP", "2.5"), daemon=True)
    stall.start()
    time.sleep(0.05)
    calls, lock, stop = [], threading.Lock(), time.monotonic() + 2.0

    def worker():
        while time.monotonic() < stop:
            started = time.monotonic()
            assert cache_service.get_cached_response("q", model=MODEL) is None
            took = time.monotonic() - started
            with lock:
                calls.append((started, took))
            time.sleep(0.005)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    stall.join(5)
    waits = sorted((s, s + t) for s, t in calls if t >= PrivateRedisTimeout.WAITED)
    first_open = waits[0][1]
    probes = [w for w in waits if w[0] > first_open]
    assert probes, "the breaker never probed again"
    for earlier, later in zip(probes, probes[1:], strict=False):
        assert later[0] >= earlier[1] - 0.01, "two probes waited on the stalled server at once"
    print(f"{len(calls)} calls; {len(waits)} waited on the socket; {len(probes)} probes after the first opening")


class PrivateRedisTimeout:
    WAITED = 0.08  # a call that waited on the 0.1 s socket timeout


# --- 15. A follower's latency avoided excludes its own wait -------------------------------------------

def test_a_followers_latency_avoided_excludes_its_wait(default_policy, settings):
    settings.RAGCACHE = {**settings.RAGCACHE, "LOCK_WAIT": 10.0}

    def slow():
        time.sleep(1.0)
        return answer("slow answer")

    leader, _ = in_thread(lambda: cache_service.get_or_call("q", slow, model=MODEL))
    time.sleep(0.1)
    follower = cache_service.get_or_call("q", lambda: pytest.fail("the follower called"), model=MODEL)
    leader.join(10)
    assert follower.hit
    aggregation.aggregate()
    hit = UsageRecord.objects.get(result="hit")
    # The leader's call took ~1000 ms; the follower waited ~900 of them: ~100 ms avoided.
    assert hit.latency_avoided_ms < 300, hit.latency_avoided_ms
    assert follower.cached.latency_ms >= 1000


# --- 6. Foreign bytes at ragcache's own bookkeeping keys never make a page fail ------------------------

def test_foreign_bytes_at_bookkeeping_keys(admin_client, default_policy, redis_client):
    layout = store.current_layout()
    redis_client.set(layout.aggregation_last, b"\xff\xfe not a time")
    redis_client.set(layout.versions[0], b"nonsense")
    redis_client.xadd(layout.streams[0], {"r": "hit", "h": "\x00", "e": "{"})
    assert store.last_aggregation() is None
    assert admin_client.get("/ragcache/health").status_code in (200, 503)
    assert admin_client.get("/metrics").status_code == 200
    assert admin_client.get("/admin/ragcache/usagerollup/report/").status_code == 200
    result = aggregation.aggregate()
    assert result.malformed == 1



# --- Keys and flights: OpenAI's tool-call turns; a flight never outgrows max_entry_bytes -----------------

def test_an_assistant_tool_call_turn_without_content_is_keyed(default_policy):
    messages = [{"role": "user", "content": "weather in Oslo?"},
                {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                                      "function": {"name": "weather", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "-3 C"}]
    assert cache_service.cache_response(messages, answer("Cold."), model=MODEL)
    assert cache_service.get_cached_response(messages, model=MODEL).content == "Cold."
    with_content = [messages[0], {**messages[1], "content": None}, messages[2]]
    assert cache_service.get_cached_response(with_content, model=MODEL) is None  # None is not absent


def test_a_streams_flight_never_outgrows_max_entry_bytes(policy_factory, redis_client, ragcache_prefix):
    policy_factory("default", max_entry_bytes=2000, compress_threshold_bytes=0)

    def chunks():
        for i in range(50):
            yield {"choices": [{"index": 0, "delta": {"content": f"{i:03d} " + "x" * 150}, "finish_reason": None}]}
        yield {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}

    stream = cache_service.get_or_stream("long", chunks, model=MODEL)
    assert len(list(stream)) == 51  # the consumer gets every chunk
    flights = [k for k in redis_client.scan_iter(match=f"{keys.layout(ragcache_prefix).root}:*:f:*")]
    assert len(flights) == 1
    published = sum(len(fields[b"c"]) for _, fields in redis_client.xrange(flights[0]) if b"c" in fields)
    assert 0 < published <= 2000
    assert [f[b"s"] for _, f in redis_client.xrange(flights[0]) if b"s" in f] == [b"failed"]  # followers told
    assert entry_keys(redis_client, ragcache_prefix) == [] and lock_keys(redis_client, ragcache_prefix) == []


def test_a_chunk_that_cannot_be_relayed_ends_the_flight(default_policy, redis_client, ragcache_prefix):
    """A follower must never count a stream with a chunk missing as a whole answer."""
    def chunks():
        yield {"choices": [{"index": 0, "delta": {"content": "a"}, "finish_reason": None}]}
        yield {"choices": [{"index": 0, "delta": {"content": "b"}, "finish_reason": None}], "score": float("nan")}
        yield {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}

    assert len(list(cache_service.get_or_stream("nan", chunks, model=MODEL))) == 3
    (flight,) = redis_client.scan_iter(match=f"{keys.layout(ragcache_prefix).root}:*:f:*")
    entries = redis_client.xrange(flight)
    assert [f.get(b"s") for _, f in entries if b"s" in f] == [b"failed"]
    assert sum(1 for _, f in entries if b"c" in f) == 1  # only the chunk before it
    assert entry_keys(redis_client, ragcache_prefix) == []


@pytest.mark.parametrize(("upstream", "says"), [
    ({"BASE_URL": "ftp://x"}, "BASE_URL"),
    ({"BASE_URL": "https://api.example/v1", "TIMEOUT": 0}, "TIMEOUT"),
    ({"BASE_URL": "https://api.example/v1", "KEY": "x"}, "unknown keys"),
    ("https://api.example/v1", "must be a dict"),
])
def test_a_misconfigured_upstream_is_a_system_check_error(settings, upstream, says):
    settings.RAGCACHE = {**settings.RAGCACHE, "UPSTREAM": upstream}
    errors = [m for m in run_checks() if m.id == "ragcache.E010"]
    assert len(errors) == 1 and says in errors[0].msg and "RAGCACHE['UPSTREAM']" in errors[0].hint
    assert "sk-" not in errors[0].msg  # the check never prints a key


def test_a_valid_upstream_passes_the_checks(settings):
    settings.RAGCACHE = {**settings.RAGCACHE, "UPSTREAM": {"BASE_URL": "http://127.0.0.1:1/v1", "API_KEY": "sk-x"}}
    assert not [m for m in run_checks() if m.id == "ragcache.E010"]


def test_stamps_made_by_a_lookup_live_an_hour_unless_an_answer_cites_them(default_policy, redis_client,
                                                                        ragcache_prefix):
    pattern = f"{keys.layout(ragcache_prefix).root}:*:s:*"
    refused = cache_service.get_or_call("q", lambda: answer("cut", finish_reason="length"), model=MODEL,
                                        sources=["doc:1"])
    assert not refused.stored
    (stamp,) = redis_client.scan_iter(match=pattern)
    assert 0 < redis_client.pttl(stamp) <= 3600_000  # nothing cites it: it goes within the hour
    assert cache_service.get_or_call("q", lambda: answer("whole"), model=MODEL, sources=["doc:1"]).stored
    assert redis_client.pttl(stamp) > 30 * 24 * 3600_000  # now an entry cites it: it outlives the entry


def test_a_run_that_dies_between_delete_and_acknowledge_leaves_nothing_behind(default_policy, redis_client):
    """acknowledge() deletes first: a crash in between leaves deleted events pending, which
    the next run acknowledges; never acknowledged events stuck in a stream for ever."""
    for i in range(5):
        cache_service.get_or_call(f"q{i}", lambda: answer(), model=MODEL)
    store.ensure_groups()
    events = store.read_events(100, pending=False)  # read by a run that then dies...
    assert len(events) == 10
    for shard, entry_id, _ in events:  # ...after its XDEL, before its XACK
        redis_client.xdel(store.current_layout().streams[shard], entry_id)
    result = aggregation.aggregate()
    assert store.backlog() == 0 and result.backlog == 0
    streams = store.current_layout().streams
    assert sum(redis_client.xpending(s, store.STREAM_GROUP)["pending"] for s in streams if redis_client.exists(s)) == 0


@pytest.mark.slow
def test_one_slow_reply_among_good_ones_does_not_open_the_breaker(private_redis, default_policy):
    """On a busy host a reply can miss the socket timeout once; that is a miss, not an
    outage: only BREAKER_TIMEOUTS timeouts in a row open the breaker."""
    from ragcache import connection

    assert cache_service.cache_response("q", answer(), model=MODEL)
    sleeper = threading.Thread(target=lambda: redis_lib.Redis(port=private_redis.port).execute_command(
        "DEBUG", "SLEEP", "0.25"), daemon=True)
    sleeper.start()
    time.sleep(0.05)
    assert cache_service.get_cached_response("q", model=MODEL) is None  # this one timed out
    sleeper.join(5)
    assert connection.breaker.open_until == 0 and connection.breaker.timeouts == 1
    assert cache_service.get_cached_response("q", model=MODEL) is not None  # the next one is served
    assert connection.breaker.timeouts == 0


def test_the_retired_poll_interval_setting_is_a_warning_naming_it(settings):
    settings.RAGCACHE = {**settings.RAGCACHE, "LOCK_POLL_INTERVAL": 0.05}
    (warning,) = [m for m in run_checks() if m.id == "ragcache.W006"]
    assert "LOCK_POLL_INTERVAL" in warning.msg and "LOCK_WAIT" in warning.hint


def test_a_policy_version_from_another_database_never_switches_the_cache_off(
        default_policy, redis_client, django_assert_num_queries, django_capture_on_commit_callbacks):
    """Redis's version copies ahead of this database's sequence (another database under the
    same KEY_PREFIX, a restored backup): lookups reload once and go on hitting, without SQL."""
    assert cache_service.cache_response("q", answer(), model=MODEL)
    foreign = CacheFlags.load().sequence + 10_000_000
    for key in store.current_layout().versions:
        redis_client.set(key, foreign)
    first = cache_service.get_or_call("q", lambda: answer("called"), model=MODEL)  # reloads once
    assert first.hit, (first.outcome, first.reason)
    with django_assert_num_queries(0):
        for _ in range(20):
            assert cache_service.get_or_call("q", lambda: answer("called"), model=MODEL).hit
    # An edit in this database is still seen by other processes: it takes a version above Redis's.
    with django_capture_on_commit_callbacks(execute=True):
        default_policy.purge()
    assert int(redis_client.get(store.current_layout().versions[0])) > foreign
    assert cache_service.get_cached_response("q", model=MODEL) is None  # the purge reached this process


@pytest.mark.slow
def test_short_lived_event_loops_leave_no_connection_behind(private_redis, default_policy):
    """async_to_sync and asyncio.run make a loop per call: each loop's connections close with it."""
    from asgiref.sync import async_to_sync

    from ragcache import connection

    client = redis_lib.Redis(port=private_redis.port)
    assert cache_service.cache_response("q", answer(), model=MODEL)
    before = client.info("clients")["connected_clients"]
    for _ in range(30):
        assert async_to_sync(cache_service.aget_cached_response)("q", model=MODEL) is not None
    for _ in range(30):
        assert asyncio.run(cache_service.aget_or_call("q", lambda: answer("called"), model=MODEL)).hit
    assert client.info("clients")["connected_clients"] <= before + 1
    assert len(connection._async_clients) == 0  # no closed loop kept alive
    client.close()


def test_foreign_data_at_a_shards_bookkeeping_keys_is_repaired(default_policy, redis_client):
    """A key of another type where a policy version copy or a usage stream belongs: the scripts
    and the aggregation remove it (it is ragcache's key) instead of failing on it for ever."""
    assert cache_service.cache_response("q", answer(), model=MODEL)
    key = cache_service.get_or_call("q", lambda: answer("called"), model=MODEL).key
    shard = keys.shard_of(key.rsplit(":", 1)[1])
    layout = store.current_layout()
    redis_client.delete(layout.versions[shard])
    redis_client.hset(layout.versions[shard], "x", "y")
    assert cache_service.get_or_call("q", lambda: answer("called"), model=MODEL).hit
    assert redis_client.type(layout.versions[shard]) == b"none"
    redis_client.delete(layout.streams[shard])
    redis_client.set(layout.streams[shard], "not a stream")
    assert aggregation.aggregate().status == "ok"
    assert cache_service.get_or_call("q", lambda: answer("called"), model=MODEL).hit
    assert aggregation.aggregate().ingested >= 1  # events flow again


@pytest.mark.parametrize("whole", ["a whole answer", {"content": "a whole answer"}, b"bytes"])
def test_a_stream_call_must_return_chunks(default_policy, whole):
    from ragcache.exceptions import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="iterator of chunks"):
        list(cache_service.get_or_stream("q", lambda: whole, model=MODEL))

    async def scenario():
        with pytest.raises(InvalidRequestError, match="iterator"):
            await cache_service.aget_or_stream("q2", lambda: whole, model=MODEL)

    asyncio.run(scenario())


@pytest.mark.slow
def test_a_burst_right_after_a_redis_restart_finds_no_dead_connection(private_redis, default_policy):
    """Connections that sat idle while Redis restarted are dead: the first command on one is
    retried on a new connection, so the burst after a restart is served, not bypassed."""
    async def burst(tag):
        return await asyncio.gather(*(cache_service.aget_or_call(f"{tag} {i % 5}", lambda: answer(), model=MODEL)
                                      for i in range(20)))

    async def scenario():
        await burst("before")  # 20 idle connections in this loop
        assert cache_service.get_or_call("sync", lambda: answer(), model=MODEL).outcome == "miss"
        private_redis.stop()
        down = await burst("during")  # served without the cache; the breaker opens
        assert {r.outcome for r in down} == {"error"}
        private_redis.start()  # same port, empty
        await asyncio.sleep(1.2)  # past the breaker's cooldown
        store.ping()  # what /ragcache/health does: Redis answers, the breaker closes
        after = await burst("after")
        sync_after = cache_service.get_or_call("sync", lambda: answer(), model=MODEL)
        return after, sync_after

    after, sync_after = asyncio.run(scenario())
    assert [r.outcome for r in after].count("error") == 0, [(r.outcome, r.reason) for r in after]
    assert sync_after.outcome == "miss", sync_after.reason  # not "error": the sync connection was replaced too


def test_a_lookup_run_twice_with_the_same_token_leads(default_policy, redis_client):
    """A retried LOOKUP (its first reply lost with a dead connection) finds the lock it took
    the first time: it leads, instead of following itself."""
    from ragcache import plans, scripts

    request = plans.make_request("q", model=MODEL, policy="default", scope=None, params=None,
                                 context_version=None)
    key = plans.plan(request, registry.current()).key
    t = plans.tuning()
    keys_ = [key.entry, t.layout.streams[key.shard], t.layout.versions[key.shard], key.lock]

    def lookup(token):
        return store.run(scripts.LOOKUP, keys_, [
            registry.current().version, "0", "hit", 60_000, token, t.stream_maxlen, "h", 0, b'{"v":2,',
            t.layout.stamp_bases[key.shard], "", "", t.guard_stamp_ttl_ms], key.shard)

    assert lookup("token-a")[0] == b"leader"
    assert lookup("token-a")[0] == b"leader"  # the same lookup again
    follower = lookup("token-b")
    assert (follower[0], follower[2]) == (b"follower", b"token-a")
    assert not scripts.PUBLISH.retry_safe and scripts.LOOKUP.retry_safe
