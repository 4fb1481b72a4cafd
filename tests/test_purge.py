"""manage.py ragcache_purge: invalidation by generation bump, optional physical cleanup that
never leaves ragcache's own key prefix."""
from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from ragcache import store
from ragcache.models import CachePolicy
from ragcache.services import cache_service

MODEL = "m"


def purge(*args):
    out = StringIO()
    call_command("ragcache_purge", *args, stdout=out)
    return out.getvalue()


def version(redis_client) -> int:
    return int(redis_client.get(store.config_version_key()) or 0)


@pytest.fixture
def two_policies(policy_factory):
    faq = policy_factory("faq")
    docs = policy_factory("docs")
    for policy in ("faq", "docs"):
        assert cache_service.cache_response("q", f"{policy} answer", model=MODEL, policy=policy)
    return faq, docs


def test_purge_one_policy(two_policies, redis_client, django_capture_on_commit_callbacks):
    faq, docs = two_policies
    before = version(redis_client)
    with django_capture_on_commit_callbacks(execute=True):
        output = purge("--policy", "faq")
    assert "Purged policy 'faq': generation 1 -> 2." in output
    faq.refresh_from_db()
    docs.refresh_from_db()
    assert (faq.generation, docs.generation) == (2, 1)
    assert version(redis_client) == before + 1  # saved: every process reloads
    assert cache_service.get_cached_response("q", model=MODEL, policy="faq") is None
    assert cache_service.get_cached_response("q", model=MODEL, policy="docs").content == "docs answer"
    # The purged policy caches again, under its new generation.
    assert cache_service.cache_response("q", "fresh", model=MODEL, policy="faq")
    assert cache_service.get_cached_response("q", model=MODEL, policy="faq").content == "fresh"


def test_purge_repeated_policy_flags(two_policies, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        output = purge("--policy", "faq", "--policy", "docs", "--policy", "faq")
    assert output.count("Purged policy") == 2
    assert dict(CachePolicy.objects.filter(name__in=["faq", "docs"]).values_list("name", "generation")) == {
        "faq": 2, "docs": 2}
    assert cache_service.get_cached_response("q", model=MODEL, policy="docs") is None


def test_purge_all(two_policies, django_capture_on_commit_callbacks):
    generations = dict(CachePolicy.objects.values_list("name", "generation"))
    with django_capture_on_commit_callbacks(execute=True):
        output = purge("--all")
    after = dict(CachePolicy.objects.values_list("name", "generation"))
    assert set(after) == {"default", "faq", "docs"}
    assert all(after[name] == generations[name] + 1 for name in after)
    assert output.count("Purged policy") == 3
    for policy in ("faq", "docs"):
        assert cache_service.get_cached_response("q", model=MODEL, policy=policy) is None


def test_unknown_policy_lists_existing_names(two_policies):
    with pytest.raises(CommandError) as info:
        purge("--policy", "faq", "--policy", "nope")
    message = str(info.value)
    assert "nope" in message and "default, docs, faq" in message
    # Nothing was purged: the valid name in the same call is untouched too.
    assert CachePolicy.objects.get(name="faq").generation == 1


@pytest.mark.parametrize("args", [(), ("--delete-keys",), ("--all", "--policy", "faq")],
                         ids=["neither", "delete-keys only", "both"])
def test_exactly_one_of_policy_or_all(two_policies, args):
    with pytest.raises(CommandError, match="--policy NAME .* or --all"):
        purge(*args)
    assert set(CachePolicy.objects.values_list("generation", flat=True)) == {1}


def test_delete_keys_removes_only_old_generations_of_that_policy(policy_factory, redis_client, ragcache_prefix,
                                                                 django_capture_on_commit_callbacks):
    policy_factory("faq")
    policy_factory("faq-extra")  # shares the name's start: must not match faq's pattern
    for i in range(3):
        assert cache_service.cache_response(f"q{i}", "a", model=MODEL, policy="faq")
    assert cache_service.cache_response("q", "a", model=MODEL, policy="faq-extra")
    assert cache_service.cache_response("q", "a", model=MODEL, policy="default")
    old_faq = sorted(redis_client.scan_iter(match=f"{ragcache_prefix}:v1:faq:1:*"))
    assert len(old_faq) == 3
    # Another process may already be writing under the new generation: keep it.
    new_gen = f"{ragcache_prefix}:v1:faq:2:global:{'0' * 64}"
    redis_client.set(new_gen, "x", ex=60)
    # Keys outside ragcache's prefix, including one that merely starts with the same text.
    outside = [f"{ragcache_prefix}-outside:v1:faq:1:global:abc", f"not-ragcache:{ragcache_prefix}:v1:faq:1:x"]
    for key in outside:
        redis_client.set(key, "precious", ex=300)
    try:
        keep = {k for k in redis_client.scan_iter(match=f"{ragcache_prefix}:*")} - set(old_faq)
        with django_capture_on_commit_callbacks(execute=True):
            output = purge("--policy", "faq", "--delete-keys")
        assert "Deleted 3 old key(s)." in output
        remaining = set(redis_client.scan_iter(match=f"{ragcache_prefix}:*"))
        assert not remaining & set(old_faq)
        assert keep <= remaining  # faq-extra, default, the new generation, the usage stream, the version
        assert new_gen.encode() in remaining
        for key in outside:
            assert redis_client.get(key) == b"precious"
        assert cache_service.get_cached_response("q", model=MODEL, policy="faq-extra") is not None
        assert cache_service.get_cached_response("q", model=MODEL, policy="default") is not None
    finally:
        redis_client.delete(*outside)


def test_delete_keys_with_all(two_policies, redis_client, ragcache_prefix, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        output = purge("--all", "--delete-keys")
    assert output.count("Deleted 1 old key(s).") == 2  # faq and docs; default had none
    assert list(redis_client.scan_iter(match=f"{ragcache_prefix}:v1:*")) == []


def test_scan_delete_refuses_patterns_outside_the_prefix(db):
    for pattern in ("*", "other:*", f"{store.prefix()}*"):
        with pytest.raises(ValueError):
            store.scan_delete(pattern)


def test_delete_keys_with_redis_down_still_bumps(private_redis, two_policies, settings):
    settings.RAGCACHE = {**settings.RAGCACHE, "BREAKER_COOLDOWN": 0.1}
    private_redis.stop()
    with pytest.raises(CommandError, match="Generation bumped"):
        purge("--policy", "faq", "--delete-keys")
    assert CachePolicy.objects.get(name="faq").generation == 2
