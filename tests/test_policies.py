"""Policy resolution: the in-process snapshot, its Redis config version, and how edits reach
every process (this one through on_commit, others through the version the lookup returns)."""
from __future__ import annotations

import time

import pytest
from django.db import connection
from django.db.models import F
from django.test.utils import CaptureQueriesContext

from ragcache import store
from ragcache.models import CacheFlags, CachePolicy
from ragcache.policies import UNKNOWN_VERSION, registry
from ragcache.services import cache_service

MODEL = "m"


def version(redis_client) -> int:
    return int(redis_client.get(store.config_version_key()) or 0)


@pytest.fixture
def ragcache_settings(settings):
    def update(**values):
        settings.RAGCACHE = {**settings.RAGCACHE, **values}

    return update


def test_default_policy_exists_after_migrate(db):
    policy = CachePolicy.objects.get(name="default")
    assert policy.enabled and policy.mode == "on" and policy.scope == "global"
    assert policy.ttl_seconds == 24 * 3600
    assert CacheFlags.objects.filter(pk=1).exists()


def test_committed_edit_bumps_the_version_and_takes_effect(policy_factory, redis_client,
                                                           django_capture_on_commit_callbacks):
    policy = policy_factory("default", mode="on")
    assert cache_service.cache_response("q", "x", model=MODEL)
    assert cache_service.get_cached_response("q", model=MODEL) is not None
    before = version(redis_client)

    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        policy.mode = "off"
        policy.save()
    assert len(callbacks) == 1
    assert version(redis_client) == before + 1
    # No registry.invalidate() here: the announcement alone makes this process reload.
    assert cache_service.get_cached_response("q", model=MODEL) is None

    with django_capture_on_commit_callbacks(execute=True):
        policy.mode = "on"
        policy.save()
    assert version(redis_client) == before + 2
    assert cache_service.get_cached_response("q", model=MODEL) is not None


def test_uncommitted_edit_is_not_announced(policy_factory, redis_client, django_capture_on_commit_callbacks):
    policy = policy_factory("default")
    before = version(redis_client)
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        policy.mode = "off"
        policy.save()
    assert len(callbacks) == 1
    assert version(redis_client) == before


def test_flag_and_price_edits_are_announced(policy_factory, redis_client, django_capture_on_commit_callbacks):
    from ragcache.models import ModelPrice

    policy_factory("default")
    before = version(redis_client)
    with django_capture_on_commit_callbacks(execute=True):
        flags = CacheFlags.load()
        flags.kill_switch = True
        flags.save()
    assert version(redis_client) == before + 1
    assert registry.current().kill_switch is True
    with django_capture_on_commit_callbacks(execute=True):
        ModelPrice.objects.create(model=MODEL, input_per_1k="0.5", output_per_1k="1.5")
    assert version(redis_client) == before + 2
    assert MODEL in registry.current().prices


def test_deleting_a_policy_is_announced(policy_factory, redis_client, django_capture_on_commit_callbacks):
    policy = policy_factory("temporary")
    assert cache_service.cache_response("q", "x", model=MODEL, policy="temporary")
    with django_capture_on_commit_callbacks(execute=True):
        policy.delete()
    # Calls naming a deleted policy bypass the cache instead of failing.
    assert cache_service.get_cached_response("q", model=MODEL, policy="temporary") is None
    assert cache_service.get_or_call("q", lambda: "y", model=MODEL, policy="temporary").response == "y"


def test_another_process_edit_is_seen_on_the_next_lookup(policy_factory, redis_client):
    """Simulates a second process: the database changes and the version is INCR'd by
    another client; this process's snapshot must reload on its very next lookup."""
    policy_factory("default", mode="on", ttl_seconds=3600)
    assert cache_service.cache_response("q", "x", model=MODEL)
    assert cache_service.get_cached_response("q", model=MODEL) is not None  # snapshot loaded

    # The other process's edit: no signal runs here, so only Redis can tell us.
    CachePolicy.objects.filter(name="default").update(mode="read_only", generation=F("generation") + 1)
    with CaptureQueriesContext(connection) as unannounced:
        assert cache_service.get_cached_response("q", model=MODEL) is not None  # still the old snapshot
    assert len(unannounced) == 0

    redis_client.incr(store.config_version_key())
    with CaptureQueriesContext(connection) as reload:
        assert cache_service.get_cached_response("q", model=MODEL) is None  # generation 2: old entry unreachable
    assert len(reload) > 0
    snapshot = registry.current()
    assert snapshot.version == str(version(redis_client))
    assert snapshot.policies["default"].generation == 2
    assert snapshot.policies["default"].mode == "read_only"
    assert cache_service.cache_response("q", "y", model=MODEL) is False  # read-only now

    with CaptureQueriesContext(connection) as after:
        assert cache_service.get_cached_response("q", model=MODEL) is None
    assert len(after) == 0  # reloaded once, not on every lookup


def test_another_process_edit_is_seen_by_a_store(policy_factory, redis_client):
    policy_factory("default", mode="on")
    assert cache_service.cache_response("a", "x", model=MODEL)
    CachePolicy.objects.filter(name="default").update(generation=5)
    redis_client.incr(store.config_version_key())
    # The store script refuses a stale snapshot, reloads, and writes under generation 5.
    assert cache_service.cache_response("b", "y", model=MODEL)
    assert cache_service.get_cached_response("b", model=MODEL).key.split(":")[3] == "5"


@pytest.mark.slow
def test_turning_the_cache_back_on_is_seen_within_a_second(policy_factory, redis_client):
    """With mode off no lookup reaches Redis, so the version is re-checked at most once a second."""
    policy_factory("default", mode="off")
    assert cache_service.get_or_call("q", lambda: "x", model=MODEL).hit is False
    CachePolicy.objects.filter(name="default").update(mode="on")
    redis_client.incr(store.config_version_key())
    time.sleep(1.1)
    cache_service.get_or_call("q", lambda: "x", model=MODEL)
    assert cache_service.get_or_call("q", lambda: "y", model=MODEL).hit is True


@pytest.mark.slow
def test_kill_switch_turned_off_elsewhere_is_seen(policy_factory, redis_client):
    policy_factory("default")
    CacheFlags.objects.filter(pk=1).update(kill_switch=True)
    registry.invalidate()
    assert cache_service.cache_response("q", "x", model=MODEL) is False
    CacheFlags.objects.filter(pk=1).update(kill_switch=False)
    redis_client.incr(store.config_version_key())
    time.sleep(1.1)  # paths without a lookup re-check the version at most once a second
    assert cache_service.cache_response("q", "x", model=MODEL) is True


def test_max_age_backstop_reloads_unannounced_edits(policy_factory, ragcache_settings):
    ragcache_settings(POLICY_MAX_AGE=0.2)
    policy_factory("default", mode="on")
    assert cache_service.cache_response("q", "x", model=MODEL)
    CachePolicy.objects.filter(name="default").update(mode="off")  # nobody tells Redis
    time.sleep(0.3)
    assert cache_service.get_cached_response("q", model=MODEL) is None


def test_snapshot_when_redis_is_down_is_revalidated_later(private_redis, policy_factory, ragcache_settings):
    ragcache_settings(BREAKER_COOLDOWN=0.1)
    policy_factory("default")
    private_redis.stop()
    assert registry.current().version == UNKNOWN_VERSION
    private_redis.start()
    time.sleep(0.2)
    # The first lookup sees 'stale' (unknown != Redis's version), reloads, and proceeds.
    assert cache_service.get_or_call("q", lambda: "x", model=MODEL).hit is False
    assert registry.current().version != UNKNOWN_VERSION
    assert cache_service.get_or_call("q", lambda: "y", model=MODEL).hit is True


def test_snapshot_reflects_policy_fields(policy_factory):
    policy_factory("tuned", enabled=False, mode="shadow", ttl_seconds=90, scope="tenant", key_params=["seed"],
                   normalize_query=True, max_entry_bytes=1234, compress_threshold_bytes=99, rollout_percent=7)
    p = registry.current().policies["tuned"]
    assert (p.enabled, p.mode, p.ttl_seconds, p.scope) == (False, "shadow", 90, "tenant")
    assert p.key_params == frozenset({"seed"})
    assert (p.normalize_query, p.max_entry_bytes, p.compress_threshold_bytes, p.rollout_percent) == (True, 1234, 99, 7)
    assert p.active is False


def test_bump_generation_counts_concurrent_purges(policy_factory):
    policy = policy_factory("p")
    stale_copy = CachePolicy.objects.get(pk=policy.pk)
    policy.bump_generation()
    stale_copy.bump_generation()  # F() expression: both bumps count
    assert stale_copy.generation == 3
    policy.refresh_from_db()
    assert policy.generation == 3
