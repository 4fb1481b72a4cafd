"""The policy page as an operator meets it: the purge button and its messages, the TTL in
words, the bounded count of stored entries, the note on lowering a TTL, "default" kept,
and the explain view ("why did this miss?") with its one-entry delete."""
from __future__ import annotations

import html
import re

import pytest
from django.contrib.auth.models import Permission, User
from django.urls import reverse

from ragcache import admin_policy, store
from ragcache.models import CachePolicy
from ragcache.policies import registry
from ragcache.services import cache_service

CHANGELIST_URL = reverse("admin:ragcache_cachepolicy_changelist")


@pytest.fixture(autouse=True)
def fast_password_hasher(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture(autouse=True)
def fresh_census():
    admin_policy._census.clear()
    yield
    admin_policy._census.clear()


def change_url(policy) -> str:
    return reverse("admin:ragcache_cachepolicy_change", args=[policy.pk])


def messages_of(response) -> list[str]:
    return [str(m) for m in response.wsgi_request._messages]


def text(page: bytes | str) -> str:
    page = page.decode() if isinstance(page, bytes) else page
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page)))


# --- purge ---------------------------------------------------------------------------------

def test_purge_button_posts_and_shows_the_new_generation(admin_client, policy_factory,
                                                         django_capture_on_commit_callbacks):
    faq = policy_factory("faq", ttl_seconds=7200)
    assert cache_service.cache_response("q", "x", model="m", policy="faq")
    page = admin_client.get(change_url(faq)).content.decode()
    purge_url = reverse("admin:ragcache_cachepolicy_purge", args=[faq.pk])
    assert f'action="{purge_url}"' in page and 'id="ragcache-purge"' in page
    assert admin_client.get(purge_url).status_code == 405  # a link prefetcher never purges
    old = faq.generation
    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(purge_url)
    assert response.status_code == 302 and response["Location"] == change_url(faq)
    faq.refresh_from_db()
    assert faq.generation > old
    (message,) = messages_of(response)
    assert message.startswith(f'Purged 1 policy: "faq" (generation {old} \u2192 {faq.generation}).')
    assert "at most 2 h" in message
    registry.invalidate()
    assert cache_service.get_cached_response("q", model="m", policy="faq") is None
    assert str(faq.generation) in text(admin_client.get(change_url(faq)).content)


def test_purge_action_message_reads_like_a_sentence(admin_client, policy_factory):
    a, b = policy_factory("a"), policy_factory("b")
    response = admin_client.post(CHANGELIST_URL, {"action": "purge_entries", "_selected_action": [a.pk, b.pk]})
    (message,) = messages_of(response)
    assert message.startswith('Purged 2 policies: "a" (generation ')
    assert "polic(y" not in message
    response = admin_client.post(CHANGELIST_URL, {"action": "disable_policies", "_selected_action": [a.pk]})
    assert messages_of(response)[-1] == 'Disabled 1 policy: "a".'


def test_purge_needs_change_permission(client, policy_factory):
    faq = policy_factory("faq")
    viewer = User.objects.create_user("viewer", password="x", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_cachepolicy"))
    client.force_login(viewer)
    page = client.get(change_url(faq)).content.decode()
    assert 'id="ragcache-purge"' not in page
    assert client.post(reverse("admin:ragcache_cachepolicy_purge", args=[faq.pk])).status_code == 403
    assert CachePolicy.objects.get(pk=faq.pk).generation == faq.generation


# --- TTL, entries, form -------------------------------------------------------------------

def test_ttl_in_words_on_the_list_and_the_page(admin_client, policy_factory):
    faq = policy_factory("faq", ttl_seconds=90061)
    listing = text(admin_client.get(CHANGELIST_URL).content)
    assert "1 d 1 h 1 min 1 s" in listing
    page = text(admin_client.get(change_url(faq)).content)
    assert "1 d 1 h 1 min 1 s" in page
    assert "Lowering it does not shorten entries already stored" in page


def test_list_selects_use_short_names(admin_client, policy_factory):
    policy_factory("faq")
    html = admin_client.get(CHANGELIST_URL).content.decode()
    select = re.search(r'<select name="form-0-mode".*?</select>', html, re.S).group(0)
    assert re.findall(r"<option[^>]*>([^<]*)</option>", select) == ["off", "shadow", "read_only", "on"]
    scope = re.search(r'<select name="form-0-scope".*?</select>', html, re.S).group(0)
    assert re.findall(r"<option[^>]*>([^<]*)</option>", scope) == ["global", "tenant", "user"]


def test_replay_pacing_is_on_the_form(admin_client, policy_factory):
    faq = policy_factory("faq")
    assert 'name="replay_chunk_delay_ms"' in admin_client.get(change_url(faq)).content.decode()


def test_stored_entries_counted_with_memory_and_cached_for_a_minute(admin_client, policy_factory):
    faq = policy_factory("faq")
    policy_factory("other")
    for i in range(3):
        assert cache_service.cache_response(f"question {i}", "an answer", model="m", policy="faq")
    assert cache_service.cache_response("question", "an answer", model="m", policy="other")
    page = text(admin_client.get(change_url(faq)).content)
    found = re.search(r"(\d+) entries, about ([\d.]+ (?:bytes|KiB))", page)
    assert found and found.group(1) == "3", page
    assert "at least" not in page
    assert cache_service.cache_response("question 3", "an answer", model="m", policy="faq")
    # Counted again only after a minute: the page shows the same count meanwhile.
    assert "3 entries" in text(admin_client.get(change_url(faq)).content)
    admin_policy._census.clear()
    assert "4 entries" in text(admin_client.get(change_url(faq)).content)


def test_stored_entries_say_at_least_when_the_count_stops(admin_client, policy_factory, monkeypatch):
    faq = policy_factory("faq")
    for i in range(5):
        assert cache_service.cache_response(f"question {i}", "an answer", model="m", policy="faq")
    monkeypatch.setattr(admin_policy, "CENSUS_LIMIT", 2)
    page = text(admin_client.get(change_url(faq)).content)
    assert "at least 2 entries" in page


def test_count_keys_bounds_the_keys_walked(redis_client, ragcache_prefix):
    root = store.current_layout().root
    redis_client.mset({f"{root}:filler:{i}": 1 for i in range(3000)})
    redis_client.mset({f"{root}:{{x}}:e:faq:1:global:{i}": 1 for i in range(3)})
    assert store.count_keys(f"{root}:{{*}}:e:faq:1:*", 100)[::2] == (3, True)
    # A walk of at most 1,000 keys per master cannot tell about all 3,003.
    assert store.count_keys(f"{root}:{{*}}:e:faq:1:*", 100, max_scanned=1000)[2] is False


def test_stored_entries_when_redis_is_down(admin_client, policy_factory, settings):
    faq = policy_factory("faq")
    caches = {**settings.CACHES}
    caches["ragcache"] = {**caches["ragcache"], "LOCATION": "redis://127.0.0.1:1/0"}
    settings.CACHES = caches
    store.reset_clients()
    response = admin_client.get(change_url(faq))
    assert response.status_code == 200
    assert "unknown: Redis is not answering" in text(response.content)


def test_lowering_the_ttl_says_stored_entries_keep_theirs(admin_client, policy_factory):
    faq = policy_factory("faq", ttl_seconds=86400)
    data = {"name": "faq", "description": "", "enabled": "on", "mode": "on", "scope": "global", "ttl_seconds": "3600",
            "max_entry_bytes": "262144", "compress_threshold_bytes": "4096", "rollout_percent": "100",
            "replay_chunk_delay_ms": "25", "ignored_params": "[]"}
    response = admin_client.post(change_url(faq), data)
    assert response.status_code == 302
    faq.refresh_from_db()
    assert (faq.ttl_seconds, faq.replay_chunk_delay_ms) == (3600, 25)
    assert any("went down from 1 d to 1 h" in m and "purge the policy" in m for m in messages_of(response))
    admin_client.get(change_url(faq))  # shows (and so clears) the messages so far
    response = admin_client.post(change_url(faq), {**data, "ttl_seconds": "7200"})
    assert not any("went down" in m for m in messages_of(response))


# --- default is kept ----------------------------------------------------------------------

def test_default_cannot_be_deleted_from_its_page(admin_client, policy_factory):
    default = policy_factory("default")
    page = admin_client.get(change_url(default)).content.decode()
    assert reverse("admin:ragcache_cachepolicy_delete", args=[default.pk]) not in page
    assert '"default" cannot be deleted' in page
    delete_url = reverse("admin:ragcache_cachepolicy_delete", args=[default.pk])
    for response in (admin_client.get(delete_url), admin_client.post(delete_url, {"post": "yes"})):
        assert response.status_code == 302 and response["Location"] == change_url(default)
        assert any("cannot be deleted" in m and "migrate would create it again" in m for m in messages_of(response))
    assert CachePolicy.objects.filter(name="default").exists()


def test_default_cannot_be_deleted_in_bulk(admin_client, policy_factory):
    default, faq = policy_factory("default"), policy_factory("faq")
    response = admin_client.post(CHANGELIST_URL, {"action": "delete_selected", "post": "yes",
                                                  "_selected_action": [default.pk, faq.pk]})
    assert response.status_code == 302
    assert any(m.startswith("Nothing was deleted.") for m in messages_of(response))
    assert CachePolicy.objects.filter(name__in=["default", "faq"]).count() == 2
    # Other policies are deleted as usual.
    response = admin_client.post(CHANGELIST_URL, {"action": "delete_selected", "post": "yes",
                                                  "_selected_action": [faq.pk]})
    assert response.status_code == 302 and not CachePolicy.objects.filter(name="faq").exists()


def test_other_policies_keep_their_delete_link(admin_client, policy_factory):
    faq = policy_factory("faq")
    page = admin_client.get(change_url(faq)).content.decode()
    assert reverse("admin:ragcache_cachepolicy_delete", args=[faq.pk]) in page
