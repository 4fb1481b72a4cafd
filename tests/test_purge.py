"""manage.py ragcache_purge: invalidation by moving the generation forward, optional
physical cleanup (on every master) that never leaves ragcache's own key prefix."""
from __future__ import annotations

import re
import time
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from ragcache import store
from ragcache.models import CachePolicy
from ragcache.services import cache_service

MODEL = "m"
PURGED = re.compile(r"Purged policy '([\w-]+)': generation (\d+) -> (\d+)\.")


def purge(*args):
    out = StringIO()
    call_command("ragcache_purge", *args, stdout=out)
    return out.getvalue()


def versions(redis_client) -> set[int]:
    return {int(v or 0) for v in redis_client.mget(store.current_layout().versions)}


def generations() -> dict[str, int]:
    return dict(CachePolicy.objects.values_list("name", "generation"))


def entry_keys(redis_client, policy: str = "*") -> set[bytes]:
    return set(redis_client.scan_iter(match=store.current_layout().entry_pattern(policy), count=1000))


@pytest.fixture
def two_policies(policy_factory):
    faq = policy_factory("faq")
    docs = policy_factory("docs")
    for policy in ("faq", "docs"):
        assert cache_service.cache_response("q", f"{policy} answer", model=MODEL, policy=policy)
    return faq, docs


def test_purge_one_policy(two_policies, redis_client, django_capture_on_commit_callbacks):
    faq, docs = two_policies
    before = versions(redis_client)
    with django_capture_on_commit_callbacks(execute=True):
        output = purge("--policy", "faq")
    ((name, old, new),) = PURGED.findall(output)
    assert output == f"Purged policy 'faq': generation {old} -> {new}.\n"
    faq_generation = faq.generation
    faq.refresh_from_db()
    docs_generation = docs.generation
    docs.refresh_from_db()
    assert (name, int(old)) == ("faq", faq_generation) and int(new) == faq.generation > faq_generation
    assert docs.generation == docs_generation
    (announced,) = versions(redis_client)  # every shard's copy: every process reloads
    assert announced > max(before)
    assert cache_service.get_cached_response("q", model=MODEL, policy="faq") is None
    assert cache_service.get_cached_response("q", model=MODEL, policy="docs").content == "docs answer"
    # The purged policy caches again, under its new generation.
    assert cache_service.cache_response("q", "fresh", model=MODEL, policy="faq")
    assert cache_service.get_cached_response("q", model=MODEL, policy="faq").content == "fresh"


def test_purge_repeated_policy_flags(two_policies, django_capture_on_commit_callbacks):
    before = generations()
    with django_capture_on_commit_callbacks(execute=True):
        output = purge("--policy", "faq", "--policy", "docs", "--policy", "faq")
    assert [name for name, _, _ in PURGED.findall(output)] == ["faq", "docs"]
    after = generations()
    assert after["faq"] > before["faq"] and after["docs"] > before["docs"] and after["default"] == before["default"]
    assert cache_service.get_cached_response("q", model=MODEL, policy="docs") is None


def test_purge_all(two_policies, django_capture_on_commit_callbacks):
    before = generations()
    with django_capture_on_commit_callbacks(execute=True):
        output = purge("--all")
    after = generations()
    assert set(after) == {"default", "faq", "docs"}
    assert all(after[name] > before[name] for name in after)
    assert sorted(name for name, _, _ in PURGED.findall(output)) == ["default", "docs", "faq"]
    for policy in ("faq", "docs"):
        assert cache_service.get_cached_response("q", model=MODEL, policy=policy) is None


def test_purge_all_without_policies(db):
    CachePolicy.objects.all().delete()
    assert purge("--all") == "No cache policies to purge.\n"


def test_unknown_policy_lists_existing_names(two_policies):
    before = generations()
    with pytest.raises(CommandError) as info:
        purge("--policy", "faq", "--policy", "nope")
    assert str(info.value) == "No cache policy named nope. Existing policies: default, docs, faq."
    # Nothing was purged: the valid name in the same call is untouched too.
    assert generations() == before


@pytest.mark.parametrize("args", [(), ("--delete-keys",), ("--all", "--policy", "faq")],
                         ids=["neither", "delete-keys only", "both"])
def test_exactly_one_of_policy_or_all(two_policies, args):
    before = generations()
    with pytest.raises(CommandError, match="--policy NAME .* or --all"):
        purge(*args)
    assert generations() == before


def test_delete_keys_removes_only_old_generations_of_that_policy(policy_factory, redis_client, ragcache_prefix,
                                                                 django_capture_on_commit_callbacks):
    policy_factory("faq")
    policy_factory("faq-extra")  # shares the name's start: must not match faq's pattern
    for i in range(3):
        assert cache_service.cache_response(f"q{i}", "a", model=MODEL, policy="faq")
    assert cache_service.cache_response("q", "a", model=MODEL, policy="faq-extra")
    assert cache_service.cache_response("q", "a", model=MODEL, policy="default")
    old_faq = entry_keys(redis_client, "faq")
    assert len(old_faq) == 3
    assert len({key.split(b"}")[0] for key in old_faq}) > 1  # entries of several shards
    # Keys outside ragcache's prefix, including one that merely starts with the same text.
    outside = [f"{ragcache_prefix}-outside:2:{{rc0.0}}:e:faq:1:global:abc", f"not-ragcache:{ragcache_prefix}:2:e:faq"]
    for key in outside:
        redis_client.set(key, "precious", ex=300)
    try:
        keep = set(redis_client.scan_iter(match=f"{ragcache_prefix}:*", count=1000)) - old_faq
        with django_capture_on_commit_callbacks(execute=True):
            output = purge("--policy", "faq", "--delete-keys")
        assert output.endswith(" Deleted 3 old entries (on every master).\n"), output
        assert PURGED.match(output)
        new_gen = CachePolicy.objects.get(name="faq").generation
        remaining = set(redis_client.scan_iter(match=f"{ragcache_prefix}:*", count=1000))
        assert not remaining & old_faq
        assert keep <= remaining  # faq-extra, default, the usage streams, the version copies
        for key in outside:
            assert redis_client.get(key) == b"precious"
        assert cache_service.get_cached_response("q", model=MODEL, policy="faq-extra") is not None
        assert cache_service.get_cached_response("q", model=MODEL, policy="default") is not None
        assert cache_service.cache_response("q0", "new", model=MODEL, policy="faq")
        (new_entry,) = entry_keys(redis_client, "faq")
        assert f":e:faq:{new_gen}:".encode() in new_entry
        # A second purge deletes only what the first generation left: the entry just written.
        with django_capture_on_commit_callbacks(execute=True):
            assert purge("--policy", "faq", "--delete-keys").endswith(" Deleted 1 old entry (on every master).\n")
    finally:
        redis_client.delete(*outside)


def test_delete_keys_with_all(two_policies, redis_client, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        output = purge("--all", "--delete-keys")
    lines = output.splitlines()
    assert len(lines) == 3
    deleted = {PURGED.match(line).group(1): line.rsplit(". ", 1)[1] for line in lines}
    assert deleted == {"default": "Deleted 0 old entries (on every master).",
                       "docs": "Deleted 1 old entry (on every master).",
                       "faq": "Deleted 1 old entry (on every master)."}
    assert entry_keys(redis_client) == set()


def test_scan_delete_refuses_patterns_outside_the_prefix(db):
    root = store.current_layout().root
    for pattern in ("*", "other:*", f"{root}*", f"{root.rsplit(':', 1)[0]}:*"):
        with pytest.raises(ValueError):
            store.scan_delete(pattern)


def test_a_purge_with_redis_down_warns_that_other_processes_were_not_told(private_redis, two_policies, settings):
    settings.RAGCACHE = {**settings.RAGCACHE, "BREAKER_COOLDOWN": 0.1}
    before = CachePolicy.objects.get(name="faq").generation
    private_redis.stop()
    out, err = StringIO(), StringIO()
    call_command("ragcache_purge", "--policy", "faq", stdout=out, stderr=err)
    assert CachePolicy.objects.get(name="faq").generation > before
    assert out.getvalue().startswith("Purged policy 'faq'")
    assert "in the database only" in err.getvalue() and "the other processes were not told" in err.getvalue()
    private_redis.start()
    time.sleep(0.2)  # past BREAKER_COOLDOWN: the next call tries Redis again
    err = StringIO()
    call_command("ragcache_purge", "--policy", "faq", stdout=StringIO(), stderr=err)
    assert err.getvalue() == ""  # Redis took the news: nothing to warn about


def test_delete_keys_with_redis_down_still_purges(private_redis, two_policies, settings):
    settings.RAGCACHE = {**settings.RAGCACHE, "BREAKER_COOLDOWN": 0.1}
    before = CachePolicy.objects.get(name="faq").generation
    private_redis.stop()
    with pytest.raises(CommandError, match="Generation bumped .* but Redis could not be scanned"):
        purge("--policy", "faq", "--delete-keys")
    assert CachePolicy.objects.get(name="faq").generation > before


def test_delete_keys_visits_every_master_of_a_cluster(cluster_backend, policy_factory,
                                                      django_capture_on_commit_callbacks):
    """On Redis Cluster the entries of one policy live on every master (256 shards spread
    over the slot ranges): --delete-keys scans each of them."""
    policy_factory("faq")
    for i in range(30):
        assert cache_service.cache_response(f"question {i}", "a", model=MODEL, policy="faq")
    pattern = store.current_layout().entry_pattern("faq")

    def per_master() -> list[int]:
        counts = []
        for node in cluster_backend.masters():
            client = node.client(timeout=5)
            try:
                counts.append(sum(1 for _ in client.scan_iter(match=pattern, count=1000)))
            finally:
                client.close()
        return counts

    before = per_master()
    assert len(before) == 3 and min(before) > 0 and sum(before) == 30
    with django_capture_on_commit_callbacks(execute=True):
        output = purge("--policy", "faq", "--delete-keys")
    assert output.endswith(" Deleted 30 old entries (on every master).\n"), output
    assert per_master() == [0, 0, 0]
    assert cache_service.get_cached_response("question 0", model=MODEL, policy="faq") is None
