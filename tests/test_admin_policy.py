"""The policy page as an operator meets it: the purge button and its messages, the TTL in
words, the bounded count of stored entries, the note on lowering a TTL, "default" kept,
and the explain view ("why did this miss?") with its one-entry delete."""
from __future__ import annotations

import html
import logging
import re

import pytest
from django.contrib import messages
from django.contrib.auth.models import Permission, User
from django.urls import reverse

from ragcache import admin_policy, store
from ragcache.models import CacheFlags, CachePolicy
from ragcache.policies import registry
from ragcache.services import cache_service

from .conftest import free_port

CHANGELIST_URL = reverse("admin:ragcache_cachepolicy_changelist")
EXPLAIN_URL = reverse("admin:ragcache_cachepolicy_explain")
ANSWER = {"choices": [{"message": {"role": "assistant", "content": "Paris."}, "finish_reason": "stop"}],
          "usage": {"prompt_tokens": 14, "completion_tokens": 2}}


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


@pytest.mark.parametrize("object_id", ["abc", "999999999", "1.5", "99999999999999999999999999", "%00"])
def test_purge_of_an_id_naming_no_policy_says_it_does_not_exist(admin_client, policy_factory, object_id):
    """POST .../abc/purge/ was a 500 (ValueError from the pk lookup); now it answers like
    the admin's change view: a warning and a redirect, nothing purged."""
    faq = policy_factory("faq")
    admin_client.raise_request_exception = False
    url = f"{CHANGELIST_URL}{object_id}/purge/"
    assert admin_client.get(url).status_code == 405
    response = admin_client.post(url)
    assert response.status_code == 302 and response["Location"] == CHANGELIST_URL
    (message,) = messages_of(response)
    assert "doesn\u2019t exist" in message and message.startswith("cache policy with ID")
    assert CachePolicy.objects.get(pk=faq.pk).generation == faq.generation


def levels_and_messages(response) -> list[tuple[int, str]]:
    return [(m.level, str(m)) for m in response.wsgi_request._messages]


@pytest.fixture
def redis_unreachable(settings):
    """ragcache's cache alias pointed at a free port nothing listens on."""
    caches = {**settings.CACHES}
    caches["ragcache"] = {**caches["ragcache"], "LOCATION": f"redis://127.0.0.1:{free_port()}/0"}
    settings.CACHES = caches
    store.reset_clients()
    yield
    store.reset_clients()


@pytest.mark.parametrize("how", ["button", "action"])
def test_purge_with_redis_unreachable_says_what_was_and_was_not_done(admin_client, policy_factory,
                                                                    redis_unreachable, how,
                                                                    django_capture_on_commit_callbacks):
    """It said "Purged ... unreachable from now on, in every process" (a success) while
    the announcement to the other processes had failed."""
    faq = policy_factory("faq", ttl_seconds=7200)
    old = faq.generation
    with django_capture_on_commit_callbacks(execute=True):
        if how == "button":
            response = admin_client.post(reverse("admin:ragcache_cachepolicy_purge", args=[faq.pk]))
        else:
            response = admin_client.post(CHANGELIST_URL, {"action": "purge_entries", "_selected_action": [faq.pk]})
    assert response.status_code == 302
    faq.refresh_from_db()
    assert faq.generation > old  # the database part was done
    (level, message), = levels_and_messages(response)
    assert level == messages.WARNING
    assert message.startswith(f'Purged 1 policy in the database only: "faq" (generation {old} \u2192 '
                              f'{faq.generation}). Redis is not answering, so the other processes were not told')
    assert "within RAGCACHE['POLICY_MAX_AGE'] (1 min)" in message and "at most 2 h" in message
    assert "Nothing was deleted from Redis" in message and "Check CACHES['ragcache']['LOCATION']" in message
    assert "in every process" not in message


def test_purge_with_redis_up_tells_every_process_itself(admin_client, policy_factory, redis_client):
    """Without running the on-commit announcement (a test transaction never commits), the
    admin's own announcement raises every shard's version copy: what its success says."""
    from .test_admin import version

    faq = policy_factory("faq")
    before = version(redis_client)
    response = admin_client.post(reverse("admin:ragcache_cachepolicy_purge", args=[faq.pk]))
    (level, message), = levels_and_messages(response)
    assert level == messages.SUCCESS and "in every process" in message
    assert version(redis_client) > before


def test_purge_of_a_missing_id_without_change_permission_is_refused(client, policy_factory):
    viewer = User.objects.create_user("viewer", password="x", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_cachepolicy"))
    client.force_login(viewer)
    assert client.post(f"{CHANGELIST_URL}abc/purge/").status_code == 403


@pytest.mark.parametrize("path", ["abc/change/", "abc/delete/", "abc/history/", "99999999999999999999999999/delete/"])
@pytest.mark.parametrize("model", ["cachepolicy", "gatewaykey", "modelprice", "usagerecord", "usagerollup"])
def test_other_admin_urls_with_a_bad_id_are_never_a_500(admin_client, model, path):
    admin_client.raise_request_exception = False
    url = f"/admin/ragcache/{model}/{path}"
    for method in (admin_client.get, admin_client.post):
        response = method(url)
        assert response.status_code in (302, 403, 404), (url, response.status_code)

# --- invalidate sources ----------------------------------------------------------------------

INVALIDATE_URL = reverse("admin:ragcache_invalidate_sources")


def test_invalidate_sources_splits_on_commas_and_line_breaks(admin_client, policy_factory):
    """"doc:1, doc:2" was taken as one id (nothing cited it, so nothing was invalidated)."""
    policy_factory("default")
    for n in (1, 2, 3, 4):
        assert cache_service.cache_response(f"q{n}", "x", model="m", sources=[f"doc:{n}"])
    response = admin_client.post(INVALIDATE_URL, {"sources": " doc:1, doc:2 ,,\r\ndoc:3,\n\n doc:1 "}, follow=True)
    assert messages_of(response) == [
        "Invalidated 3 sources (doc:1, doc:2, doc:3): cached answers citing them miss from now on, in every "
        "process, policy and scope."]
    registry.invalidate()
    assert [cache_service.get_cached_response(f"q{n}", model="m") is not None for n in (1, 2, 3, 4)] == \
        [False, False, False, True]
    page = text(admin_client.get(INVALIDATE_URL).content)
    assert "Separated by commas or line breaks (doc:42, doc:43)" in page and "at most 10,000 ids" in page


@pytest.mark.parametrize(("sources", "error"), [
    (", ,\n,", "Enter at least one source id."),
    (",".join(f"doc:{n}" for n in range(10_001)),
     "At most 10,000 source ids at a time; 10,001 were given."),
    ("doc:1, " + "y" * 513, "A source id is at most 512 characters; 1 is longer (the first starts 'yyyy"),
])
def test_invalidate_sources_limits_are_named(admin_client, policy_factory, sources, error):
    policy_factory("default")
    assert cache_service.cache_response("q1", "x", model="m", sources=["doc:1"])
    response = admin_client.post(INVALIDATE_URL, {"sources": sources})
    assert response.status_code == 200 and error in html.unescape(response.content.decode())
    registry.invalidate()
    assert cache_service.get_cached_response("q1", model="m") is not None  # nothing invalidated


def test_explain_names_sources_given_with_commas(admin_client, policy_factory):
    policy_factory("default")
    assert cache_service.cache_response("q", "x", model="m", sources=["doc:1", "doc:2"])
    entry = text(explain(admin_client, question="q", model="m", sources="doc:1, doc:2").content)
    assert "doc:1 : intact" in entry and "doc:2 : intact" in entry


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


# --- explain ------------------------------------------------------------------------------

def explain(client, **fields):
    data = {"policy": "default", "model": "gpt-4o-mini", "question": "What is the capital of France?",
            "params": "", "scope": "", "context_version": "", "kind": "call", "sources": "", **fields}
    return client.post(EXPLAIN_URL, data)


def test_explain_shows_recipe_entry_ttl_size_and_sources(admin_client, policy_factory):
    policy_factory("default", ttl_seconds=3600)
    assert cache_service.cache_response("What is the capital of France?", ANSWER, model="gpt-4o-mini",
                                        params={"temperature": 0, "user": "u1"}, sources=["doc:1", "doc:2"])
    response = explain(admin_client, params='{"temperature": 0, "user": "u1"}', sources="doc:1")
    assert response.status_code == 200 and "no-store" in response["Cache-Control"]
    page = text(response.content)
    assert "The cache is used" in page
    assert "A lookup now: hit The stored answer is served" in page
    recipe = text(re.search(r'<table id="explain-recipe">.*?</table>', response.content.decode(), re.S).group(0))
    assert '{"temperature":0}' in recipe and "user (the policy's ignored params)" in recipe
    assert "What is the capital of France?" in recipe  # shown back to the operator who pasted it
    entry = text(re.search(r'<table id="explain-entry">.*?</table>', response.content.decode(), re.S).group(0))
    assert re.search(r"Time left (59 min \d+ s|1 h)", entry), entry
    assert "Tokens a hit avoids 16" in entry and "whole response, model gpt-4o-mini" in entry
    assert "doc:1 : intact" in entry and "hash" in entry  # doc:2 named by its hash only
    assert 'id="explain-delete"' in response.content.decode()

    cache_service.invalidate_sources(["doc:2"])
    entry = text(explain(admin_client, params='{"temperature": 0}', sources="doc:1\ndoc:2").content)
    assert "doc:1 : intact" in entry and "doc:2 : invalidated" in entry
    assert "stale_source" in entry
    assert "A lookup now: miss A source the entry was built from was invalidated" in entry


def test_explain_a_miss_says_why(admin_client, policy_factory):
    default = policy_factory("default")
    assert cache_service.cache_response("q", "x", model="m")
    page = text(explain(admin_client, question="q", model="m", params='{"temperature": 1}').content)
    assert "No entry under this key." in page and "never stored" in page
    assert "A lookup now: miss Nothing is stored under this key" in page
    page = text(explain(admin_client, question="q", model="m", kind="stream").content)
    assert "asked as a whole response" in page
    default.purge()
    registry.invalidate()
    page = text(explain(admin_client, question="q", model="m").content)
    assert "earlier generation" in page and "purged" in page


@pytest.mark.parametrize(("setup", "words"), [
    ({"kill_switch": True}, "Bypass (kill switch): the global kill switch is on"),
    ({"mode": "off"}, "Bypass (mode off)"),
    ({"enabled": False}, "Bypass (disabled)"),
    ({"rollout_percent": 0}, "Bypass (rollout)"),
    ({"mode": "shadow"}, "nothing is served (shadow)"),
])
def test_explain_gives_the_bypass_reason_of_now(admin_client, policy_factory, setup, words):
    if setup.pop("kill_switch", False):
        flags = CacheFlags.load()
        flags.kill_switch = True
        flags.save()
    policy_factory("default", **setup)
    page = text(explain(admin_client).content)
    assert words in page
    assert ("A lookup now: bypass" in page) is (setup.get("mode") != "shadow")


def test_explain_deletes_that_one_entry(admin_client, policy_factory):
    policy_factory("default")
    assert cache_service.cache_response("q", "x", model="m")
    assert cache_service.cache_response("another q", "y", model="m")
    response = explain(admin_client, question="q", model="m", _delete="1")
    assert any(m.startswith("Deleted the entry with key id") for m in messages_of(response))
    assert "No entry under this key." in text(response.content)
    assert cache_service.get_cached_response("q", model="m") is None
    assert cache_service.get_cached_response("another q", model="m") is not None


def test_explain_is_view_only_for_viewers(client, policy_factory):
    policy_factory("default")
    assert cache_service.cache_response("q", "x", model="m")
    viewer = User.objects.create_user("viewer", password="x", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_cachepolicy"))
    client.force_login(viewer)
    response = explain(client, question="q", model="m")
    assert response.status_code == 200 and 'id="explain-delete"' not in response.content.decode()
    assert explain(client, question="q", model="m", _delete="1").status_code == 403
    assert cache_service.get_cached_response("q", model="m") is not None
    client.force_login(User.objects.create_user("nobody", password="x", is_staff=True))
    assert client.get(EXPLAIN_URL).status_code == 403


def test_explain_never_logs_the_question(admin_client, policy_factory, ragcache_log):
    policy_factory("default")
    secret = "my very private question about account 4711"
    assert cache_service.cache_response(secret, "x", model="m")
    ragcache_log.clear()
    logging.getLogger("django").setLevel(logging.DEBUG)
    try:
        explain(admin_client, question=secret, model="m")
        explain(admin_client, question=secret, model="m", _delete="1")
    finally:
        logging.getLogger("django").setLevel(logging.NOTSET)
    assert ragcache_log.records  # the step lines were there to look at
    assert all(secret not in record.getMessage() for record in ragcache_log.records)
    # GET never explains: a question in a URL would land in access logs.
    page = admin_client.get(EXPLAIN_URL, {"question": secret, "model": "m"}).content.decode()
    assert "explain-recipe" not in page


def test_explain_shows_errors_for_bad_input(admin_client, policy_factory):
    policy_factory("default", scope="user")
    page = text(explain(admin_client, params="[1, 2]").content)
    assert "Enter a JSON object" in page
    response = explain(admin_client)
    assert response.status_code == 200 and "scope" in text(response.content)
    assert "explain-recipe" not in response.content.decode()
    page = text(explain(admin_client, scope="42", question='[{"role": "user", "content": "hi"}]').content)
    assert '[{"content":"hi","role":"user"}]' in page


def test_explain_linked_from_the_policy_pages(admin_client, policy_factory):
    faq = policy_factory("faq")
    assert f'href="{EXPLAIN_URL}?policy=faq"' in admin_client.get(change_url(faq)).content.decode()
    assert f'href="{EXPLAIN_URL}"' in admin_client.get(CHANGELIST_URL).content.decode()
    form = admin_client.get(EXPLAIN_URL, {"policy": "faq"}).content.decode()
    assert re.search(r'<option value="faq" selected>', form)
