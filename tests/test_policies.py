"""Policy resolution: the in-process snapshot, the policy version every shard keeps a copy
of in Redis, and how edits reach every process (this one through on_commit, others through
the version each script returns). Generations only ever grow; the database refuses
policies ragcache cannot honour; a database outage keeps the last snapshot in use; the
``default`` policy survives a test-database flush."""
from __future__ import annotations

import logging
import time

import pytest
from django.core.management import call_command
from django.db import IntegrityError, connection, transaction
from django.db.models import F
from django.test import TransactionTestCase
from django.test.utils import CaptureQueriesContext

from ragcache import policies, store
from ragcache.models import CacheFlags, CachePolicy
from ragcache.policies import registry
from ragcache.services import cache_service

MODEL = "m"


def versions(redis_client) -> set[int]:
    """The policy version as every shard's copy has it (one value once announced)."""
    return {int(v or 0) for v in redis_client.mget(store.current_layout().versions)}


def version(redis_client) -> int:
    (value,) = versions(redis_client)
    return value


def generation_in_key(result) -> int:
    """The generation part of a CallResult's / CachedResponse's entry key."""
    return int(result.key.split(":e:", 1)[1].split(":")[1])


def announce_elsewhere() -> int:
    """What another process's edit does after it commits: take a new version and write it
    to every shard's copy. This process gets no signal, only Redis can tell it."""
    new_version = CacheFlags.next_sequence()
    policies.announce(new_version)
    return new_version


@pytest.fixture
def ragcache_settings(settings):
    def update(**values):
        settings.RAGCACHE = {**settings.RAGCACHE, **values}

    return update


def test_default_policy_exists_after_migrate(db):
    policy = CachePolicy.objects.get(name="default")
    assert policy.enabled and policy.mode == "on" and policy.scope == "global"
    assert policy.ttl_seconds == 24 * 3600
    assert policy.generation > 0
    assert CacheFlags.objects.filter(pk=1).exists()


def test_committed_edit_takes_a_new_version_and_takes_effect(policy_factory, redis_client,
                                                            django_capture_on_commit_callbacks):
    policy = policy_factory("default", mode="on")
    assert cache_service.cache_response("q", "x", model=MODEL)
    assert cache_service.get_cached_response("q", model=MODEL) is not None
    before = versions(redis_client)

    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        policy.mode = "off"
        policy.save()
    assert len(callbacks) == 1
    first = version(redis_client)  # every shard's copy has the same, new version
    assert first > max(before) and first == CacheFlags.objects.get().sequence
    # No registry.invalidate() here: the announcement alone makes this process reload.
    assert cache_service.get_cached_response("q", model=MODEL) is None

    with django_capture_on_commit_callbacks(execute=True):
        policy.mode = "on"
        policy.save()
    assert version(redis_client) > first
    assert cache_service.get_cached_response("q", model=MODEL) is not None


def test_uncommitted_edit_is_not_announced(policy_factory, redis_client, django_capture_on_commit_callbacks):
    policy = policy_factory("default")
    before = versions(redis_client)
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        policy.mode = "off"
        policy.save()
    assert len(callbacks) == 1
    assert versions(redis_client) == before


def test_flag_and_price_edits_are_announced(policy_factory, redis_client, django_capture_on_commit_callbacks):
    from ragcache.models import ModelPrice

    policy_factory("default")
    with django_capture_on_commit_callbacks(execute=True):
        flags = CacheFlags.load()
        flags.kill_switch = True
        flags.save()
    first = version(redis_client)
    assert registry.current().kill_switch is True
    with django_capture_on_commit_callbacks(execute=True):
        ModelPrice.objects.create(model=MODEL, input_per_1k="0.5", output_per_1k="1.5")
    assert version(redis_client) > first
    assert MODEL in registry.current().prices


def test_deleting_a_policy_is_announced(policy_factory, redis_client, django_capture_on_commit_callbacks):
    policy = policy_factory("temporary")
    assert cache_service.cache_response("q", "x", model=MODEL, policy="temporary")
    with django_capture_on_commit_callbacks(execute=True):
        policy.delete()
    # Calls naming a deleted policy bypass the cache instead of failing.
    assert cache_service.get_cached_response("q", model=MODEL, policy="temporary") is None
    result = cache_service.get_or_call("q", lambda: "y", model=MODEL, policy="temporary")
    assert (result.response, result.outcome, result.reason) == ("y", "bypass", "unknown_policy")


def test_another_process_edit_is_seen_on_the_next_lookup(policy_factory, redis_client):
    policy_factory("default", mode="on", ttl_seconds=3600)
    assert cache_service.cache_response("q", "x", model=MODEL)
    assert cache_service.get_cached_response("q", model=MODEL) is not None  # snapshot loaded
    old_generation = CachePolicy.objects.get(name="default").generation

    # The other process's edit, not yet announced: this process keeps its snapshot, no SQL.
    CachePolicy.objects.filter(name="default").update(mode="read_only", generation=F("generation") + 1)
    with CaptureQueriesContext(connection) as unannounced:
        assert cache_service.get_cached_response("q", model=MODEL) is not None  # still the old snapshot
    assert len(unannounced) == 0

    new_version = announce_elsewhere()
    with CaptureQueriesContext(connection) as reload:
        assert cache_service.get_cached_response("q", model=MODEL) is None  # new generation: old entry unreachable
    assert len(reload) > 0
    snapshot = registry.current()
    assert snapshot.version == new_version
    assert snapshot.policies["default"].generation == old_generation + 1
    assert snapshot.policies["default"].mode == "read_only"
    assert cache_service.cache_response("q", "y", model=MODEL) is False  # read-only now

    with CaptureQueriesContext(connection) as after:
        assert cache_service.get_cached_response("q", model=MODEL) is None
    assert len(after) == 0  # reloaded once, not on every lookup


def test_another_process_edit_is_seen_by_a_store(policy_factory, redis_client):
    policy_factory("default", mode="on")
    assert cache_service.cache_response("a", "x", model=MODEL)
    old = CachePolicy.objects.get(name="default").generation
    CachePolicy.objects.filter(name="default").update(generation=F("generation") + 7)
    announce_elsewhere()
    # The store script refuses a stale snapshot; cache_response reloads and stores under the new generation.
    assert cache_service.cache_response("b", "y", model=MODEL)
    assert generation_in_key(cache_service.get_cached_response("b", model=MODEL)) == old + 7


def test_turning_the_cache_back_on_elsewhere_is_seen_by_a_bypassing_process(policy_factory, redis_client):
    """With mode off no entry is read, but each bypass event returns its shard's version."""
    policy_factory("default", mode="off")
    assert cache_service.get_or_call("q", lambda: "x", model=MODEL).outcome == "bypass"
    CachePolicy.objects.filter(name="default").update(mode="on")
    announce_elsewhere()
    assert cache_service.get_or_call("q", lambda: "x", model=MODEL).outcome == "bypass"  # learns the version
    assert cache_service.get_or_call("q", lambda: "x", model=MODEL).stored is True
    assert cache_service.get_or_call("q", lambda: "y", model=MODEL).hit is True


def test_kill_switch_turned_off_elsewhere_is_seen(policy_factory, redis_client):
    policy_factory("default")
    CacheFlags.objects.filter(pk=1).update(kill_switch=True)
    registry.invalidate()
    assert cache_service.cache_response("q", "x", model=MODEL) is False
    assert cache_service.get_or_call("q", lambda: "x", model=MODEL).reason == "kill_switch"
    CacheFlags.objects.filter(pk=1).update(kill_switch=False)
    announce_elsewhere()
    assert cache_service.get_or_call("q", lambda: "x", model=MODEL).reason == "kill_switch"  # learns the version
    assert cache_service.cache_response("q", "x", model=MODEL) is True


def test_max_age_backstop_reloads_unannounced_edits(policy_factory, ragcache_settings):
    ragcache_settings(POLICY_MAX_AGE=0.2)
    policy_factory("default", mode="on")
    assert cache_service.cache_response("q", "x", model=MODEL)
    CachePolicy.objects.filter(name="default").update(mode="off")  # nobody tells Redis
    time.sleep(0.3)
    assert cache_service.get_cached_response("q", model=MODEL) is None


def test_redis_outage_then_recovery(private_redis, policy_factory, ragcache_settings):
    ragcache_settings(BREAKER_COOLDOWN=0.1)
    policy_factory("default")
    private_redis.stop()
    # The snapshot comes from the database alone: Redis being down does not change it.
    assert registry.current().version == CacheFlags.objects.get().sequence
    down = cache_service.get_or_call("q", lambda: "x", model=MODEL)
    assert (down.response, down.outcome, down.hit) == ("x", "error", False)
    private_redis.start()
    time.sleep(0.2)
    assert cache_service.get_or_call("q", lambda: "x", model=MODEL).stored is True
    assert cache_service.get_or_call("q", lambda: "y", model=MODEL).hit is True


def test_snapshot_reflects_policy_fields(policy_factory):
    policy_factory("tuned", enabled=False, mode="shadow", ttl_seconds=90, scope="tenant", ignored_params=["seed"],
                   normalize_query=True, max_entry_bytes=1234, compress_threshold_bytes=99, rollout_percent=7,
                   replay_chunk_delay_ms=15)
    p = registry.current().policies["tuned"]
    assert (p.enabled, p.mode, p.ttl_seconds, p.scope) == (False, "shadow", 90, "tenant")
    assert p.ignored_params == frozenset({"seed"})
    assert (p.normalize_query, p.max_entry_bytes, p.compress_threshold_bytes, p.rollout_percent) == (True, 1234, 99, 7)
    assert p.replay_chunk_delay_ms == 15
    assert p.generation == CachePolicy.objects.get(name="tuned").generation
    assert p.active is False


def test_concurrent_purges_each_move_the_generation_forward(policy_factory):
    policy = policy_factory("p")
    start = policy.generation
    stale_copy = CachePolicy.objects.get(pk=policy.pk)
    first = policy.bump_generation()  # the 0.1 name of purge()
    second = stale_copy.purge()
    assert start < first < second == stale_copy.generation
    policy.refresh_from_db()
    assert policy.generation == second


# --- Trust (issue 10), item 2: generations never go backwards ------------------------------------

def test_trust_2a_a_stale_instance_saved_after_a_purge_keeps_the_new_generation(policy_factory):
    policy = policy_factory("faq")
    loaded_before_purge = CachePolicy.objects.get(name="faq")
    old = loaded_before_purge.generation
    assert cache_service.cache_response("q", "pre-purge answer", model=MODEL, policy="faq")
    purged = policy.purge()
    assert purged > old

    loaded_before_purge.description = "edited after the purge"
    loaded_before_purge.save()  # 0.1 wrote generation=old back here (editable=False does not stop save())
    loaded_before_purge.ttl_seconds = 60
    loaded_before_purge.save(update_fields=["ttl_seconds", "generation"])
    loaded_before_purge.save(update_fields=["generation"])  # nothing else to write: a no-op
    row = CachePolicy.objects.get(name="faq")
    assert (row.generation, row.description, row.ttl_seconds) == (purged, "edited after the purge", 60)
    registry.invalidate()
    assert cache_service.get_cached_response("q", model=MODEL, policy="faq") is None


def test_trust_2b_default_deleted_and_added_again_never_reuses_a_generation(policy_factory):
    default = policy_factory("default")
    old = default.generation
    for i in range(11):
        assert cache_service.cache_response(f"question {i}", f"pre-purge answer {i}", model=MODEL)
    default.delete()
    registry.invalidate()
    again = CachePolicy.objects.create(name="default", generation=1)  # an explicit old value is ignored too
    registry.invalidate()
    assert again.generation > old
    assert CachePolicy.objects.get(name="default").generation == again.generation
    # 0.1 restarted at generation 1 and all 11 pre-purge entries hit again.
    assert sum(cache_service.get_cached_response(f"question {i}", model=MODEL) is not None for i in range(11)) == 0


def test_trust_2b_generations_stay_above_those_of_a_flushed_database(transactional_db, redis_client):
    """Generations are at least the time in milliseconds, so even a flushed database (whose
    sequence restarts) cannot give ``default`` a generation its entries already used."""
    before = CachePolicy.objects.get(name="default").generation
    assert cache_service.cache_response("q", "before the flush", model=MODEL)
    call_command("flush", interactive=False, verbosity=0)
    registry.invalidate()
    after = CachePolicy.objects.get(name="default").generation
    assert after > before
    assert cache_service.get_cached_response("q", model=MODEL) is None


# --- Trust, item 9: invariants in the database, and no phantom stores -----------------------------

@pytest.mark.parametrize("change", [
    {"ttl_seconds": 0}, {"rollout_percent": 150}, {"mode": "sometimes"}, {"scope": "team"},
    {"max_entry_bytes": 0}, {"max_entry_bytes": 65 * 1024 * 1024}, {"replay_chunk_delay_ms": 10**6},
], ids=["ttl 0", "rollout 150", "unknown mode", "unknown scope", "max bytes 0", "max bytes 65 MiB", "replay delay"])
def test_trust_9_the_database_refuses_a_policy_ragcache_cannot_honour(policy_factory, change):
    policy_factory("default", ttl_seconds=600)
    with pytest.raises(IntegrityError), transaction.atomic():
        CachePolicy.objects.filter(name="default").update(**change)
    row = CachePolicy.objects.get(name="default")
    assert (row.ttl_seconds, row.rollout_percent, row.mode, row.scope) == (600, 100, "on", "global")


def test_trust_9_a_store_is_true_only_for_an_entry_that_exists(policy_factory, ragcache_settings, redis_client):
    policy_factory("default", ttl_seconds=600)
    assert cache_service.cache_response("kept", "an answer", model=MODEL)
    entry = cache_service.get_cached_response("kept", model=MODEL)
    assert 0 < redis_client.pttl(entry.key) <= 600_000
    # A TTL that comes out as 0 anyway (here through RAGCACHE["MAX_TTL"] = 0): PEXPIRE 0
    # deletes the key, and 0.1 still answered True and counted a store.
    ragcache_settings(MAX_TTL=0)
    registry.invalidate()
    assert cache_service.cache_response("phantom", "an answer", model=MODEL) is False
    assert cache_service.get_or_call("phantom", lambda: "an answer", model=MODEL).stored is False
    refusals = [fields.get(b"x") for stream in store.current_layout().streams
                for _id, fields in redis_client.xrange(stream) if fields[b"r"] == b"refused"]
    assert refusals == [b"invalid_ttl", b"invalid_ttl"]
    ragcache_settings(MAX_TTL=3600)
    registry.invalidate()
    assert cache_service.get_cached_response("phantom", model=MODEL) is None


# --- Trust, item 14: a database outage -------------------------------------------------------------


def test_trust_14_a_database_outage_serves_hits_from_the_last_snapshot(
        transactional_db, policy_factory, ragcache_settings, ragcache_log, broken_database, monkeypatch):
    """0.1: 100 hits during an outage made 100 SQL attempts, each logging a traceback."""
    ragcache_settings(POLICY_MAX_AGE=0.05, POLICY_RETRY_INTERVAL=0.5)
    policy_factory("default")
    assert cache_service.cache_response("q", "an answer", model=MODEL)
    assert cache_service.get_cached_response("q", model=MODEL) is not None  # the snapshot is loaded
    attempts: list[float] = []
    real_load = policies.load_snapshot

    def counted_load():
        attempts.append(time.monotonic())
        return real_load()

    monkeypatch.setattr(policies, "load_snapshot", counted_load)
    broken_database()
    ragcache_log.clear()
    started, hits = time.monotonic(), 0
    for _ in range(100):
        hits += cache_service.get_cached_response("q", model=MODEL) is not None
        time.sleep(0.012)
    elapsed = time.monotonic() - started
    lines = [r for r in ragcache_log.records if "could not load cache policies" in r.getMessage()]

    assert hits == 100
    assert 2 <= len(attempts) <= elapsed / 0.5 + 1  # at most one attempt per POLICY_RETRY_INTERVAL
    assert all(later - earlier >= 0.49 for earlier, later in zip(attempts, attempts[1:], strict=False))
    assert len(lines) == len(attempts)  # one line per attempt, no traceback
    assert all(r.levelno == logging.WARNING and r.exc_info is None for r in lines)
    assert "keeping the previous ones" in lines[0].getMessage()

    broken_database.restore()
    time.sleep(0.5)
    ragcache_log.clear()
    assert cache_service.get_cached_response("q", model=MODEL) is not None
    assert registry.current().available and not [r for r in ragcache_log.records if r.levelno >= logging.WARNING]


def test_trust_14_the_first_attempt_after_the_outage_reloads_outside_any_request(
        transactional_db, policy_factory, ragcache_settings, ragcache_log, broken_database, monkeypatch):
    """No request boundary closes a dropped connection in a worker thread or a script: the
    registry closes it itself, so the first attempt after the outage reconnects. The outage
    is a connection the server terminated (PostgreSQL, as in a restart), or a database file
    that cannot be opened (SQLite)."""
    ragcache_settings(POLICY_MAX_AGE=0.05, POLICY_RETRY_INTERVAL=0.3)
    policy_factory("default")
    assert cache_service.cache_response("q", "an answer", model=MODEL)
    assert cache_service.get_cached_response("q", model=MODEL) is not None
    outcomes: list[str] = []
    real_load = policies.load_snapshot

    def counted_load():
        try:
            snapshot = real_load()
        except Exception as exc:
            outcomes.append(type(exc).__name__)
            raise
        outcomes.append("loaded")
        return snapshot

    monkeypatch.setattr(policies, "load_snapshot", counted_load)
    if connection.vendor == "postgresql":
        import psycopg

        backend = connection.cursor().connection.info.backend_pid
        settings = connection.settings_dict
        with psycopg.connect(host=settings["HOST"] or "127.0.0.1", port=settings["PORT"] or 5432,
                             user=settings["USER"], password=settings["PASSWORD"] or None,
                             dbname="postgres", autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (backend,))
        time.sleep(0.1)
    else:
        broken_database()
    time.sleep(0.06)
    assert cache_service.get_cached_response("q", model=MODEL) is not None  # attempt 1 fails, the hit is served
    assert outcomes == ["OperationalError"]
    if connection.vendor != "postgresql":
        broken_database.restore()
    time.sleep(0.35)
    ragcache_log.clear()
    assert cache_service.get_cached_response("q", model=MODEL) is not None
    assert outcomes == ["OperationalError", "loaded"]  # without closing the dead connection: "the connection is closed"
    assert not [r for r in ragcache_log.records if r.levelno >= logging.WARNING]


# --- Trust, item 21: `default` exists after a flush --------------------------------------------

def test_trust_21_default_exists_again_after_a_flush(transactional_db):
    CachePolicy.objects.filter(name="default").delete()
    assert not CachePolicy.objects.filter(name="default").exists()
    call_command("flush", interactive=False, verbosity=0)  # what TransactionTestCase runs after each test
    registry.invalidate()
    assert CachePolicy.objects.filter(name="default", enabled=True, mode="on", ttl_seconds=24 * 3600).exists()
    assert cache_service.get_or_call("q", lambda: "x", model=MODEL).stored is True
    assert cache_service.get_or_call("q", lambda: "y", model=MODEL).hit is True


@pytest.mark.django_db(transaction=True)
def test_trust_21_a_transactional_test_that_deletes_default():
    """The next test runs after pytest-django's flush of this one."""
    CachePolicy.objects.all().delete()
    assert not CachePolicy.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_trust_21_the_next_transactional_test_still_finds_default():
    assert CachePolicy.objects.filter(name="default").exists()
    first = cache_service.get_or_call("q", lambda: "x", model=MODEL)
    assert (first.outcome, first.stored) == ("miss", True)  # not a bypass ("unknown_policy")
    assert cache_service.get_or_call("q", lambda: "y", model=MODEL).hit is True


class TestTrust21DefaultInTransactionTestCase(TransactionTestCase):
    """Django's TransactionTestCase flushes after each test; test methods run in name order."""

    def test_1_deletes_every_policy(self):
        CachePolicy.objects.all().delete()
        self.assertFalse(CachePolicy.objects.exists())

    def test_2_still_finds_default_and_hits(self):
        registry.invalidate()
        self.assertTrue(CachePolicy.objects.filter(name="default").exists())
        self.assertTrue(cache_service.get_or_call("tc q", lambda: "x", model=MODEL).stored)
        self.assertTrue(cache_service.get_or_call("tc q", lambda: "y", model=MODEL).hit)
