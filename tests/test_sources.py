"""Source invalidation (issue 15): ``sources=``, ``invalidate_sources``, the write guard,
``ragcache.sources.track`` and its retry queue, the operators' tools, usage and metrics.

Tests taking ``backend`` run on the standalone Redis and on the local Redis Cluster
(tests/cluster.py), under the one-slot guard. Django wiring tests use real transactions
(``transactional_db``): ``on_commit`` callbacks run when the database really commits.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time

import pytest
import redis as redis_lib
from asgiref.sync import async_to_sync
from django.contrib.auth.models import Permission, User
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import transaction

from project.demo import documents
from project.demo.models import Document
from ragcache import sources, store
from ragcache.aggregation import aggregate
from ragcache.connection import RedisUnavailable
from ragcache.exceptions import InvalidRequestError
from ragcache.keys import SHARDS, layout, source_hash
from ragcache.models import UsageRecord, UsageRollup
from ragcache.services import cache_service

from .conftest import REDIS_URL, PrivateRedis, free_port
from .gateway_helpers import gateway  # noqa: F401 (a fixture)
from .test_contract import LLM, ROOT, answer, database_url, redis_cluster_url, sample  # noqa: F401 (a fixture)

MODEL = "gpt-4o-mini"


class PublishedDocument(Document):
    """A proxy: saving through it sends signals with this class as the sender."""

    class Meta:
        proxy = True
        app_label = "demo"


@pytest.fixture
def on_policy(policy_factory):
    return policy_factory("default", mode="on", enabled=True, scope="global", ttl_seconds=3600, rollout_percent=100)


@pytest.fixture
def guarded(one_slot_guard):
    """The one-slot guard (every command names one hash slot), and no cluster errors."""
    before = sample("ragcache_redis_errors_total", kind="cluster")
    yield one_slot_guard
    assert sample("ragcache_redis_errors_total", kind="cluster") == before


@pytest.fixture(autouse=True)
def empty_retry_queue(monkeypatch):
    """The retry queue is per process: each test starts and ends with it empty."""
    monkeypatch.setattr(sources, "_pending", {})
    yield
    sources._pending.clear()


def text(result) -> str:
    return result.response["choices"][0]["message"]["content"]


def refusals(reason: str) -> float:
    return sample("ragcache_refusals_total", policy="default", reason=reason)


# --- the mechanism, on both backends ---------------------------------------------------------------

def test_invalidating_one_of_three_sources_misses_and_other_answers_still_hit(backend, on_policy, guarded):
    three = cache_service.get_or_call("q three", LLM("from a, b and c"), model=MODEL,
                                      sources=["doc:a", "doc:b", "doc:c"])
    other = cache_service.get_or_call("q other", LLM("from d"), model=MODEL, sources=["doc:d"])
    shares = cache_service.get_or_call("q shares c", LLM("from c and e"), model=MODEL, sources=["doc:c", "doc:e"])
    assert three.stored and other.stored and shares.stored
    assert cache_service.get_or_call("q three", LLM(), model=MODEL, sources=["doc:a", "doc:b", "doc:c"]).hit

    assert cache_service.invalidate_sources(["doc:b"]) == 1

    llm = LLM("rebuilt from the new doc:b")
    after = cache_service.get_or_call("q three", llm, model=MODEL, sources=["doc:a", "doc:b", "doc:c"])
    assert (after.hit, after.outcome, after.reason, llm.calls) == (False, "miss", "stale_source", 1)
    assert after.stored and text(after) == "rebuilt from the new doc:b"
    untouched = [cache_service.get_or_call(q, LLM("must not be called"), model=MODEL, sources=s)
                 for q, s in (("q other", ["doc:d"]), ("q shares c", ["doc:c", "doc:e"]))]
    assert [(r.hit, text(r)) for r in untouched] == [(True, "from d"), (True, "from c and e")]
    again = cache_service.get_or_call("q three", LLM("must not be called"), model=MODEL,
                                      sources=["doc:a", "doc:b", "doc:c"])
    assert again.hit and text(again) == "rebuilt from the new doc:b"


def test_the_stale_entry_is_deleted_and_invalidation_cost_needs_no_scan(backend, on_policy, guarded, raw_client,
                                                                        ragcache_prefix):
    result = cache_service.get_or_call("q", LLM("old"), model=MODEL, sources=["doc:1"])
    stamp_keys = [f"{base}{source_hash('doc:1')}" for base in layout(ragcache_prefix).stamp_bases]
    assert sum(raw_client.exists(key) for key in stamp_keys) == 1  # a stamp only where an entry cites it
    for i in range(40):
        cache_service.cache_response(f"popular {i}", answer(), model=MODEL, sources=["doc:popular"])
    cache_service.invalidate_sources(["doc:warm-up"])  # loads the script on every master
    sent = []
    for source in ("doc:1", "doc:popular"):  # cited by 1 answer, by 40
        commands = guarded.commands
        cache_service.invalidate_sources([source])
        sent.append(guarded.commands - commands)
    # One DELETE per shard, whatever cites the source (a cluster pipeline packs each twice).
    assert sent[0] == sent[1] and sent[0] in (SHARDS, 2 * SHARDS)
    assert sum(raw_client.exists(key) for key in stamp_keys) == 0
    assert raw_client.exists(result.key) == 1  # nothing touched the entry itself...
    assert cache_service.get_cached_response("q", model=MODEL) is None
    assert raw_client.exists(result.key) == 0  # ...its first stale lookup deleted it


@pytest.fixture
def raw_client(request, backend):
    """A plain client of the backend under test (single-key commands only)."""
    if backend == "cluster":
        client = redis_lib.cluster.RedisCluster.from_url(request.getfixturevalue("redis_cluster").url)
    else:
        client = redis_lib.Redis.from_url(REDIS_URL)
    yield client
    client.close()


def test_write_guard_a_source_invalidated_during_a_slow_call(backend, on_policy, guarded):
    """The answer goes to the caller but is not stored; the next identical call is a miss."""
    started, invalidated = threading.Event(), threading.Event()

    def slow_call():
        started.set()
        assert invalidated.wait(10)
        time.sleep(0.05)
        return answer("built from the old doc:2")

    def editor():
        assert started.wait(10)
        cache_service.invalidate_sources(["doc:2"])
        invalidated.set()

    thread = threading.Thread(target=editor)
    thread.start()
    refused = refusals("stale_source")
    result = cache_service.get_or_call("guarded q", slow_call, model=MODEL, sources=["doc:1", "doc:2", "doc:3"])
    thread.join(10)
    assert text(result) == "built from the old doc:2" and not result.hit
    assert result.stored is False
    assert refusals("stale_source") - refused == 1
    llm = LLM("built from the new doc:2")
    next_call = cache_service.get_or_call("guarded q", llm, model=MODEL, sources=["doc:1", "doc:2", "doc:3"])
    assert (next_call.hit, llm.calls, next_call.stored) == (False, 1, True)


def test_write_guard_on_a_stream(backend, on_policy, guarded):
    def upstream():
        yield "old "
        cache_service.invalidate_sources(["doc:s"])  # mid-stream
        yield "text"

    stream = cache_service.get_or_stream("streamed q", upstream, model=MODEL, sources=["doc:s"])
    assert "".join(stream) == "old text" and not stream.hit
    replay = cache_service.get_or_stream("streamed q", lambda: iter(["new"]), model=MODEL, sources=["doc:s"])
    assert not replay.hit and "".join(replay) == "new"
    assert cache_service.get_or_stream("streamed q", lambda: iter(["x"]), model=MODEL, sources=["doc:s"]).hit


def invalidating(source: str, content: str = "built before the edit"):
    """A call() during which ``source`` is invalidated (between the lookup and the store)."""
    def call():
        cache_service.invalidate_sources([source])
        return answer(content)
    return call


def test_write_guard_covers_calls_whose_lookup_read_no_stamps(backend, policy_factory, guarded):
    """A refresh (no lookup), a shadow hit and a follower calling the LLM itself after its
    leader let go: their stamps are read before call(), so the guard holds for them too."""
    policy_factory("default", mode="on", enabled=True, scope="global", ttl_seconds=3600, rollout_percent=100)
    refreshed = cache_service.get_or_call("refreshed", invalidating("doc:r"), model=MODEL, sources=["doc:r"],
                                          refresh=True)
    assert (refreshed.outcome, refreshed.stored) == ("refresh", False)
    assert cache_service.get_cached_response("refreshed", model=MODEL) is None

    started = threading.Event()

    def failing_leader():
        started.set()
        time.sleep(0.4)
        raise RuntimeError("the leader's upstream failed")

    def lead():
        with pytest.raises(RuntimeError):
            cache_service.get_or_call("followed", failing_leader, model=MODEL, sources=["doc:f"])

    leader = threading.Thread(target=lead)
    leader.start()
    assert started.wait(10)
    follower = cache_service.get_or_call("followed", invalidating("doc:f"), model=MODEL, sources=["doc:f"])
    leader.join(10)
    assert (follower.reason, follower.stored) == ("leader_released", False)
    assert cache_service.get_cached_response("followed", model=MODEL) is None

    assert cache_service.cache_response("shadowed", answer("stored under mode on"), model=MODEL, sources=["doc:h"])
    policy_factory("default", mode="shadow")
    shadow = cache_service.get_or_call("shadowed", invalidating("doc:h", "shadow call"), model=MODEL,
                                       sources=["doc:h"])
    assert (shadow.hit, shadow.reason, shadow.stored) == (False, "shadow", False)
    policy_factory("default", mode="on")
    assert cache_service.get_cached_response("shadowed", model=MODEL) is None  # neither answer is served


def test_async_twins(backend, on_policy, guarded):
    async def scenario():
        stored = await cache_service.aget_or_call("async q", LLM("async v1").acall, model=MODEL,
                                                  sources=["doc:x", "doc:y"])
        hit = await cache_service.aget_or_call("async q", LLM().acall, model=MODEL, sources=["doc:x", "doc:y"])
        count = await cache_service.ainvalidate_sources(["doc:y"])
        stale = await cache_service.aget_or_call("async q", LLM("async v2").acall, model=MODEL,
                                                 sources=["doc:x", "doc:y"])

        async def guarded_call():
            await cache_service.ainvalidate_sources(["doc:x"])
            return answer("async, built before the edit")

        refused = await cache_service.aget_or_call("async guarded", guarded_call, model=MODEL, sources=["doc:x"])

        async def chunks():
            yield "a"
            await cache_service.ainvalidate_sources(["doc:z"])
            yield "b"

        stream = cache_service.aget_or_stream("async stream", chunks, model=MODEL, sources=["doc:z"])
        streamed = [chunk async for chunk in stream]
        replay = cache_service.aget_or_stream("async stream", lambda: iter(["c"]), model=MODEL, sources=["doc:z"])
        replayed = [chunk async for chunk in replay]
        return stored, hit, count, stale, refused, streamed, replay.hit, replayed

    stored, hit, count, stale, refused, streamed, replay_hit, replayed = async_to_sync(scenario)()
    assert stored.stored and hit.hit and count == 1
    assert (stale.hit, stale.reason, stale.stored, text(stale)) == (False, "stale_source", True, "async v2")
    assert (refused.hit, refused.stored) == (False, False)
    assert streamed == ["a", "b"] and (replay_hit, replayed) == (False, ["c"])


def test_a_process_that_never_saw_the_source_sees_the_invalidation(
        backend, transactional_db, on_policy, ragcache_prefix, redis_cluster_url):  # noqa: F811
    """Nothing about a source lives in process memory: a fresh process invalidates a source
    it never saw cited, and this process's next lookup misses; and a fresh process sees an
    invalidation made here."""
    assert cache_service.get_or_call("cited", LLM("from doc:7 and doc:8"), model=MODEL,
                                     sources=["doc:7", "doc:8"]).stored
    assert cache_service.get_or_call("cited too", LLM("from doc:9"), model=MODEL, sources=["doc:9"]).stored
    script = (
        "import django, json, sys; django.setup()\n"
        "from ragcache.services import cache_service\n"
        "found = lambda q: cache_service.get_cached_response(q, model=sys.argv[1]) is not None\n"
        "before = found(sys.argv[2])\n"
        "count = cache_service.invalidate_sources(sys.argv[3:]) if len(sys.argv) > 3 else 0\n"
        "print(json.dumps({'before': before, 'count': count, 'after': found(sys.argv[2])}))\n"
    )
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "project.settings", "DATABASE_URL": database_url(),
           "RAGCACHE_KEY_PREFIX": ragcache_prefix, "REDIS_URL": REDIS_URL, "REDIS_CLUSTER_URL": redis_cluster_url,
           "RAGCACHE_SOCKET_TIMEOUT": "2", "RAGCACHE_CONNECT_TIMEOUT": "2"}
    env.pop("DATABASE_TEST_NAME", None)

    def fresh_process(*args: str) -> dict:
        done = subprocess.run([sys.executable, "-c", script, MODEL, *args], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    assert fresh_process("cited", "doc:8") == {"before": True, "count": 1, "after": False}
    assert cache_service.get_cached_response("cited", model=MODEL) is None
    assert cache_service.get_cached_response("cited too", model=MODEL) is not None
    cache_service.invalidate_sources(["doc:9"])
    assert fresh_process("cited too") == {"before": False, "count": 0, "after": False}


def test_usage_events_rollups_report_and_metrics_count_stale_sources(backend, on_policy, client, guarded):
    """Lookups missed because of an invalidated source are their own outcome everywhere:
    the metric, the usage record, the rollup, ragcache_report and /metrics."""
    stale_before = sample("ragcache_lookups_total", policy="default", result="stale_source")
    miss_before = sample("ragcache_lookups_total", policy="default", result="miss")
    refused_before = refusals("stale_source")
    invalidated_before = sample("ragcache_source_invalidations_total")
    cache_service.get_or_call("counted", LLM("v1"), model=MODEL, sources=["doc:c1", "doc:c2"])  # miss, store
    cache_service.get_or_call("counted", LLM(), model=MODEL, sources=["doc:c1", "doc:c2"])  # hit
    cache_service.invalidate_sources(["doc:c2", "doc:c3"])
    cache_service.get_or_call("counted", LLM("v2"), model=MODEL, sources=["doc:c1", "doc:c2"])  # stale, store
    cache_service.get_or_call("guarded", invalidating("doc:c1"), model=MODEL, sources=["doc:c1"])  # miss, refused

    assert sample("ragcache_lookups_total", policy="default", result="stale_source") - stale_before == 1
    assert sample("ragcache_lookups_total", policy="default", result="miss") - miss_before == 2
    assert refusals("stale_source") - refused_before == 1
    assert sample("ragcache_source_invalidations_total") - invalidated_before == 3

    aggregate()
    records = sorted(UsageRecord.objects.values_list("result", "reason"))
    assert records == sorted([("miss", ""), ("store", ""), ("hit", ""), ("stale_source", "stale_source"),
                              ("store", ""), ("miss", ""), ("refused", "stale_source")])
    day = UsageRollup.objects.get(granularity="day", policy="default")
    assert (day.lookups, day.hits, day.misses, day.stale_sources, day.stores, day.refusals) == (4, 1, 2, 1, 2, 1)

    out = _call("ragcache_report", "--format", "json")
    totals = json.loads(out)["totals"]
    assert (totals["lookups"], totals["stale_sources"], totals["hit_rate"]) == (4, 1, 0.25)
    header, _rule, row = _call("ragcache_report").splitlines()[1:4]
    column = header.index("stale sources")
    assert "stale sources" in header and row[column:column + len("stale sources")].strip() == "1"

    exposition = client.get("/metrics").content.decode()
    assert 'ragcache_lookups_total{policy="default",result="stale_source"}' in exposition
    assert 'ragcache_refusals_total{policy="default",reason="stale_source"}' in exposition


def _call(*args: str) -> str:
    from io import StringIO

    out = StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


# --- validation -------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [
    "doc:1",  # a string, not an iterable of ids
    b"doc:1",
    42,
    [""],
    [42],
    [None],
    [["doc:1"]],  # unhashable: an error, not a TypeError
    [b"doc:1"],
    ["x" * 513],
    [f"doc:{i}" for i in range(33)],  # MAX_SOURCES is 32
])
def test_bad_sources_are_a_clear_error(on_policy, bad):
    llm = LLM()
    with pytest.raises(InvalidRequestError) as raised:
        cache_service.get_or_call("q", llm, model=MODEL, sources=bad)
    assert "source" in str(raised.value) and llm.calls == 0
    with pytest.raises(InvalidRequestError):
        cache_service.cache_response("q", answer(), model=MODEL, sources=bad)
    with pytest.raises(InvalidRequestError):
        cache_service.get_or_stream("q", lambda: iter(["a"]), model=MODEL, sources=bad)


def test_max_sources_is_a_setting_and_duplicates_count_once(on_policy, settings):
    settings.RAGCACHE = {**settings.RAGCACHE, "MAX_SOURCES": 3}
    assert cache_service.get_or_call("q", LLM(), model=MODEL, sources=["a", "b", "c", "a", "b"]).stored
    with pytest.raises(InvalidRequestError, match=r"at most 3 sources \(RAGCACHE\['MAX_SOURCES'\]\)"):
        cache_service.get_or_call("q2", LLM(), model=MODEL, sources=["a", "b", "c", "d"])


def test_invalidate_sources_takes_any_number_and_validates_each(on_policy):
    """An invalidation is not an answer's citation list: MAX_SOURCES does not cap it."""
    ids = [f"doc:{i}" for i in range(2500)]  # more than one DELETE batch per shard
    assert cache_service.cache_response("q", answer(), model=MODEL, sources=["doc:2499"])
    assert cache_service.invalidate_sources(ids) == 2500
    assert cache_service.get_cached_response("q", model=MODEL) is None
    assert cache_service.invalidate_sources([]) == 0
    for bad in ("doc:1", [1], [""], [["doc:1"]]):
        with pytest.raises(InvalidRequestError):
            cache_service.invalidate_sources(bad)


def test_invalidation_fails_loudly_when_a_shard_refuses_it(on_policy, tmp_path, settings):
    """A pipeline reports each command's error instead of raising: an invalidation that
    some shard refused (here: a server that became a read-only replica) must raise, never
    report success."""
    primary, replica = PrivateRedis(tmp_path / "a"), PrivateRedis(tmp_path / "b")
    for server in (primary, replica):
        server.directory.mkdir()
        server.start()
    try:
        caches = {**settings.CACHES}
        caches["ragcache"] = {**caches["ragcache"], "LOCATION": replica.url}
        settings.CACHES = caches
        redis_lib.Redis(port=replica.port).replicaof("127.0.0.1", primary.port)
        with pytest.raises(RedisUnavailable, match="read only replica.*incomplete"):
            cache_service.invalidate_sources(["doc:1"])
        with pytest.raises(CommandError, match=r"nothing was invalidated\. Check CACHES\['ragcache'\]\['LOCATION'\]"):
            call_command("ragcache_invalidate", "doc:1")
    finally:
        primary.stop()
        replica.stop()
        store.reset_clients()


# --- Django wiring: track() ----------------------------------------------------------------------------

@pytest.fixture
def doc(transactional_db):
    return Document.objects.create(title="Refund policy", body="Refunds within 30 days.")


def cache_answer_citing(document: Document, question: str = "refunds?") -> None:
    assert cache_service.cache_response(question, answer(f"cites {document.source_id}"), model=MODEL,
                                        sources=[document.source_id, "doc:unrelated"])


def cached(question: str = "refunds?") -> bool:
    return cache_service.get_cached_response(question, model=MODEL) is not None


def test_demo_document_is_tracked_once_however_often_track_runs(transactional_db):
    from django.db.models.signals import post_delete, post_save

    def receivers(signal) -> int:
        return sum(1 for receiver in signal.receivers if receiver[0][0] in ("ragcache.sources.post_save",
                                                                             "ragcache.sources.post_delete"))

    assert Document in sources.tracked()  # by the demo app's ready()
    first = sources.tracked()[Document]
    sources.track(Document, source=lambda d: f"doc:{d.pk}")
    sources.track(Document, source=lambda d: f"doc:{d.pk}")
    try:
        assert receivers(post_save) == 1 and receivers(post_delete) == 1
    finally:
        sources.track(Document, source=first)
    with pytest.raises(TypeError):
        sources.track(object, source=str)
    with pytest.raises(TypeError):
        sources.track(Document, source="doc:1")


def test_track_invalidates_on_save_after_the_commit(backend, on_policy, doc, guarded):
    cache_answer_citing(doc)
    invalidations = sample("ragcache_source_invalidations_total")
    with transaction.atomic():
        doc.body = "Refunds within 14 days."
        doc.save()
        assert cached(), "invalidated before the transaction committed"
    assert not cached()
    assert sample("ragcache_source_invalidations_total") - invalidations == 1  # one save, one invalidation


def test_track_invalidates_on_delete_and_autocommit_save(backend, on_policy, doc, guarded):
    cache_answer_citing(doc, "a")
    doc.save()  # autocommit: on_commit runs at once
    assert not cached("a")
    cache_answer_citing(doc, "b")
    Document.objects.filter(pk=doc.pk).delete()
    assert not cached("b")


def test_track_does_nothing_for_a_rolled_back_transaction(backend, on_policy, doc, guarded):
    cache_answer_citing(doc)
    invalidations = sample("ragcache_source_invalidations_total")
    with pytest.raises(RuntimeError), transaction.atomic():
        doc.body = "an edit that never happened"
        doc.save()
        doc.delete()
        raise RuntimeError("rolled back")
    assert cached()
    assert sample("ragcache_source_invalidations_total") == invalidations
    with transaction.atomic():  # a savepoint rolled back inside a committed transaction
        Document.objects.create(title="kept", body="kept")
        try:
            with transaction.atomic():
                doc.save()
                raise RuntimeError("inner rollback")
        except RuntimeError:
            pass
    assert cached()


def test_track_covers_proxies_and_bulk_updates_need_invalidate(backend, on_policy, doc, guarded):
    cache_answer_citing(doc, "proxy")
    PublishedDocument.objects.get(pk=doc.pk).save()
    assert not cached("proxy")

    cache_answer_citing(doc, "bulk")
    Document.objects.filter(pk=doc.pk).update(body="changed behind the signals' back")
    assert cached("bulk")  # QuerySet.update() sends no signal: the documented gap
    with transaction.atomic():
        Document.objects.filter(pk=doc.pk).update(body="changed again")
        sources.invalidate(f"doc:{pk}" for pk in [doc.pk])
        assert cached("bulk")
    assert not cached("bulk")


def test_track_with_on_commit_callbacks_captured(on_policy, django_capture_on_commit_callbacks):
    """In a test transaction nothing commits: the invalidation is an on_commit callback."""
    document = Document.objects.create(title="t", body="b")
    cache_answer_citing(document)
    with django_capture_on_commit_callbacks() as callbacks:
        document.save()
    assert len(callbacks) == 1 and cached()
    callbacks[0]()
    assert not cached()


def test_redis_down_at_commit_is_retried_not_lost(transactional_db, on_policy, private_redis, monkeypatch,
                                                   ragcache_log):
    """The invalidation of a commit made while Redis is unavailable is queued, logged at
    ERROR and counted, then sent by the retry thread once Redis answers again."""
    monkeypatch.setattr(sources, "RETRY_SECONDS", 3600)  # the thread retries when woken below
    document = Document.objects.create(title="t", body="b")
    deferred, dropped = (sample("ragcache_source_invalidations_deferred_total"),
                         sample("ragcache_source_invalidations_dropped_total"))
    private_redis.stop()
    document.save()  # committed; its invalidation fails
    assert sources.pending() == (document.source_id,)
    assert sample("ragcache_source_invalidations_deferred_total") - deferred == 1
    line = next(r.getMessage() for r in ragcache_log.records
                if r.name == "ragcache.sources" and r.levelno == logging.ERROR)
    assert "Redis unavailable" in line and f"manage.py ragcache_invalidate {document.source_id}" in line
    assert sources._retrier is not None and sources._retrier.is_alive()

    private_redis.start()  # an empty server on the same port: an answer citing the document is cached again
    store.reset_clients()
    cache_answer_citing(document)
    assert sources.pending() and cached()
    monkeypatch.setattr(sources, "RETRY_SECONDS", 0.05)
    sources._wake.set()
    deadline = time.monotonic() + 15
    while sources.pending():
        assert time.monotonic() < deadline, "the retry thread never sent the invalidation"
        time.sleep(0.05)
    assert not cached()
    assert sample("ragcache_source_invalidations_dropped_total") == dropped
    assert any("deferred source invalidation(s) done" in r.getMessage() for r in ragcache_log.records)


def test_deferred_invalidations_go_first_and_exit_logs_the_lost_ones(transactional_db, on_policy, private_redis,
                                                                       monkeypatch, ragcache_log):
    monkeypatch.setattr(sources, "RETRY_SECONDS", 3600)  # no thread retry within this test
    first = Document.objects.create(title="first", body="b")
    second = Document.objects.create(title="second", body="b")
    private_redis.stop()
    first.save()
    assert sources.pending() == (first.source_id,)
    dropped = sample("ragcache_source_invalidations_dropped_total")
    sources._at_exit()  # the process would exit now: the loss is logged and counted
    assert sample("ragcache_source_invalidations_dropped_total") - dropped == 1
    assert any(r.levelno == logging.ERROR and "LOST" in r.getMessage() and first.source_id in r.getMessage()
               for r in ragcache_log.records)

    private_redis.start()  # an empty server on the same port
    store.reset_clients()
    cache_answer_citing(first, "first")
    cache_answer_citing(second, "second")
    second.save()  # sends the deferred doc:<first> too, before its own
    assert sources.pending() == ()
    assert not cached("first") and not cached("second")


def test_retry_keeps_an_id_deferred_again_meanwhile(monkeypatch):
    """An id deferred again while a retry was sending it stays queued (sequence numbers)."""
    sources._pending.update({"doc:1": 1, "doc:2": 2})
    sent = {"doc:1": 1, "doc:2": 2}
    sources._pending["doc:2"] = 3  # deferred again during the send
    sources._forget(sent)
    assert sources.pending() == ("doc:2",)


# --- operators' tools ------------------------------------------------------------------------------------

def test_ragcache_invalidate_command(backend, on_policy, guarded, tmp_path):
    cache_service.cache_response("q1", answer(), model=MODEL, sources=["doc:1"])
    cache_service.cache_response("q2", answer(), model=MODEL, sources=["doc:2"])
    cache_service.cache_response("q3", answer(), model=MODEL, sources=["doc:3"])
    out = _call("ragcache_invalidate", "doc:1", "doc:1")
    assert "Invalidated 1 source: doc:1." in out and "miss from now on" in out
    assert not cached("q1") and cached("q2")
    listing = tmp_path / "ids.txt"
    listing.write_text("# changed today\ndoc:2\n\ndoc:3\n")
    assert "Invalidated 2 sources: doc:2, doc:3." in _call("ragcache_invalidate", "--file", str(listing))
    assert not cached("q2") and not cached("q3")
    with pytest.raises(CommandError, match="at least one source id"):
        call_command("ragcache_invalidate")
    with pytest.raises(CommandError, match="non-empty string"):
        call_command("ragcache_invalidate", "x" * 600)
    with pytest.raises(CommandError, match="Cannot read source ids"):
        call_command("ragcache_invalidate", "--file", str(tmp_path / "missing.txt"))


def test_ragcache_invalidate_command_with_redis_down_names_the_setting(on_policy, private_redis):
    private_redis.stop()
    with pytest.raises(CommandError) as raised:
        call_command("ragcache_invalidate", "doc:1")
    assert "nothing was invalidated" in str(raised.value)
    assert "CACHES['ragcache']['LOCATION']" in str(raised.value)


def test_an_unreachable_cluster_is_redis_unavailable_not_a_crash(on_policy, settings):
    """No seed node answers: redis-py raises RedisClusterException, which is not a
    RedisError; ragcache turns it into "Redis unavailable" like any outage."""
    settings.RAGCACHE = {**settings.RAGCACHE, "REDIS_CLUSTER_URL": f"redis://127.0.0.1:{free_port()}"}
    store.reset_clients()
    try:
        with pytest.raises(CommandError, match=r"nothing was invalidated\. Check RAGCACHE\['REDIS_CLUSTER_URL'\]"):
            call_command("ragcache_invalidate", "doc:1")
        store.reset_clients()  # the breaker is open after that failure
        assert cache_service.get_or_call("q", LLM("answered without the cache"), model=MODEL).outcome == "error"
        store.reset_clients()
        assert async_to_sync(cache_service.aget_cached_response)("q", model=MODEL) is None
    finally:
        store.reset_clients()


def staff(username: str, *codenames: str) -> User:
    user = User.objects.create_user(username, password="pw", is_staff=True)
    user.user_permissions.set(Permission.objects.filter(content_type__app_label="ragcache", codename__in=codenames))
    return user


def test_admin_invalidate_sources_page(on_policy, client):
    cache_service.cache_response("q1", answer(), model=MODEL, sources=["doc:1"])
    cache_service.cache_response("q2", answer(), model=MODEL, sources=["doc:2"])
    url = "/admin/ragcache/cachepolicy/invalidate-sources/"

    client.force_login(staff("viewer", "view_cachepolicy"))
    assert client.get(url).status_code == 403
    assert client.post(url, {"sources": "doc:1"}).status_code == 403
    assert "Invalidate sources" not in client.get("/admin/ragcache/").content.decode()
    assert cached("q1")

    client.force_login(staff("operator", "view_cachepolicy", "change_cachepolicy"))
    assert 'href="/admin/ragcache/cachepolicy/invalidate-sources/"' in client.get("/admin/ragcache/").content.decode()
    assert "Invalidate sources" in client.get("/admin/ragcache/cachepolicy/").content.decode()
    page = client.get(url)
    assert page.status_code == 200 and 'name="sources"' in page.content.decode()
    done = client.post(url, {"sources": "doc:1\n\n  doc:9  \ndoc:1\n"}, follow=True)
    assert "Invalidated 2 sources (doc:1, doc:9)" in done.content.decode()
    assert not cached("q1") and cached("q2")
    for bad, error in (("   \n ", "This field is required"), ("x" * 600, "at most 512 characters")):
        response = client.post(url, {"sources": bad})
        assert response.status_code == 200 and error in response.content.decode()
    assert cached("q2")


def test_admin_invalidate_with_redis_down_is_a_message_not_a_500(on_policy, client, private_redis):
    client.force_login(User.objects.create_superuser("root", password="pw"))
    private_redis.stop()
    response = client.post("/admin/ragcache/cachepolicy/invalidate-sources/", {"sources": "doc:1"}, follow=True)
    assert response.status_code == 200
    assert "Redis is unavailable: nothing was invalidated" in response.content.decode()


def test_entry_sources_shows_an_entrys_sources_and_their_state(backend, on_policy, guarded):
    result = cache_service.get_or_call("explained", LLM(), model=MODEL, sources=["doc:1", "doc:2"])
    state = sources.entry_sources(result.key, ids=["doc:2", "doc:other"])
    assert [(s.hash, s.id, s.fresh) for s in state] == [(source_hash("doc:1"), None, True),
                                                         (source_hash("doc:2"), "doc:2", True)]
    cache_service.invalidate_sources(["doc:2"])
    state = sources.entry_sources(result.key)
    assert [(s.fresh, s.current) for s in state] == [(True, state[0].recorded), (False, None)]
    plain = cache_service.get_or_call("no sources", LLM(), model=MODEL)
    assert sources.entry_sources(plain.key) == []
    assert sources.entry_sources(result.key.replace(result.key[-8:], "0" * 8)) is None
    with pytest.raises(InvalidRequestError):
        sources.entry_sources("not-a-key")


# --- the demo ------------------------------------------------------------------------------------------

def test_demo_answers_from_documents_and_says_why_an_edit_made_it_miss(backend, transactional_db, on_policy,
                                                                        settings, client):
    settings.DEMO_LLM_DELAY_MS = 0
    refunds = Document.objects.create(title="Refund policy", body="Orders can be refunded within 30 days. More.")
    Document.objects.create(title="Shipping", body="Standard shipping takes 3 days.")
    question = "How many days do I have for a refund?"
    assert documents.relevant(question).sources[0] == refunds.source_id

    first = documents.ask(question)
    assert (first["outcome"], first["stored"], first["sources"][0]) == ("miss", True, refunds.source_id)
    assert f"\u201cRefund policy\u201d [{refunds.source_id}]: Orders can be refunded within 30 days." in first["answer"]
    assert documents.ask(question)["hit"] is True

    client.force_login(User.objects.create_superuser("editor", password="pw"))
    edited = client.post(f"/admin/demo/document/{refunds.pk}/change/",
                         {"title": "Refund policy", "body": "Orders can be refunded within 14 days."})
    assert edited.status_code == 302

    after = documents.ask(question)
    assert (after["hit"], after["outcome"], after["reason"]) == (False, "miss", "stale_source")
    assert "edited" in after["why"] and "within 14 days" in after["answer"]
    assert documents.ask(question)["hit"] is True
    unrelated = documents.ask("Where is shipping free?")
    assert unrelated["sources"] and refunds.source_id not in unrelated["sources"]

    assert client.get("/demo/sources.json", {"q": question}).json()["sources"][0] == refunds.source_id
    assert client.get("/demo/sources.json").status_code == 400


def test_demo_page_streaming_path_sends_sources_and_says_why(gateway, client):  # noqa: F811
    """The page's script asks /demo/sources.json for the question's documents and sends them
    as X-Ragcache-Sources; after an edit the gateway answers MISS with reason stale_source,
    which the page shows."""
    refunds = Document.objects.create(title="Refund policy", body="Orders can be refunded within 30 days.")
    page = client.get("/demo/").content.decode()
    assert '"sources": "/demo/sources.json"' in page and "X-Ragcache-Sources" in page
    assert "stale_source" in page  # the reason's words are on the page
    question = "How many days for a refund?"
    ids = client.get("/demo/sources.json", {"q": question}).json()["sources"]
    assert refunds.source_id in ids
    key = gateway.key(controls=("sources",))
    ask = lambda: gateway.ask(key, [{"role": "user", "content": question}],  # noqa: E731
                              headers={"X-Ragcache-Sources": ",".join(ids)})
    assert [ask().headers["X-Ragcache"] for _ in range(2)] == ["MISS", "HIT"]
    refunds.body = "Orders can be refunded within 14 days."
    refunds.save()
    after = ask()
    assert (after.headers["X-Ragcache"], after.headers.get("X-Ragcache-Reason")) == ("MISS", "stale_source")
    assert ask().headers["X-Ragcache"] == "HIT"


def test_seeded_demo_documents_exist_after_migrate(db):
    assert Document.objects.count() >= 5
    assert documents.relevant("How do I reset my password?").titles[0] == "Password reset"
