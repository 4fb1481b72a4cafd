"""The policy admin, driven through the Django test client as a logged-in superuser:
validation shows form errors (never a 500), actions go through save() and are announced,
a generation never goes backwards through the admin's read-then-write, and usage rows are
read-only (no "Delete selected")."""
from __future__ import annotations

import json

import pytest
from django.db.models.signals import pre_save
from django.urls import reverse
from django.utils import timezone

from ragcache import store
from ragcache.models import CacheFlags, CachePolicy, UsageRecord, UsageRollup
from ragcache.policies import registry
from ragcache.services import cache_service

ADD_URL = reverse("admin:ragcache_cachepolicy_add")
CHANGELIST_URL = reverse("admin:ragcache_cachepolicy_changelist")


@pytest.fixture(autouse=True)
def fast_password_hasher(settings):
    # admin_client creates a superuser per test; the default hasher is slow by design.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def form_data(**changes):
    data = {
        "name": "faq",
        "description": "Answers from the FAQ",
        "enabled": "on",
        "mode": "on",
        "scope": "global",
        "ttl_seconds": "3600",
        "max_entry_bytes": "262144",
        "compress_threshold_bytes": "4096",
        "rollout_percent": "100",
        "replay_chunk_delay_ms": "0",
        "ignored_params": json.dumps(["user", "metadata"]),
        "normalize_query": "on",
    }
    data.update(changes)
    return {k: v for k, v in data.items() if v is not None}


def form_errors(response):
    assert response.status_code == 200, response.status_code
    return response.context["adminform"].form.errors


def version(redis_client) -> int:
    """The policy version every shard's copy holds (0 before any announcement)."""
    (value,) = {int(v or 0) for v in redis_client.mget(store.current_layout().versions)}
    return value


def test_add_valid_policy(admin_client, redis_client, django_capture_on_commit_callbacks):
    before = version(redis_client)
    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(ADD_URL, form_data())
    assert response.status_code == 302
    policy = CachePolicy.objects.get(name="faq")
    assert (policy.ttl_seconds, policy.normalize_query) == (3600, True)
    assert policy.ignored_params == ["user", "metadata"]
    assert policy.generation > CachePolicy.objects.get(name="default").generation
    assert version(redis_client) > before
    # The new policy is usable at once, without any manual reload.
    assert cache_service.get_or_call("q", lambda: "x", model="m", policy="faq").hit is False
    assert cache_service.get_or_call("q", lambda: "y", model="m", policy="faq").hit is True


INVALID = {
    "ttl zero": ({"ttl_seconds": "0"}, "ttl_seconds"),
    "ttl negative": ({"ttl_seconds": "-5"}, "ttl_seconds"),
    "ttl above max": ({"ttl_seconds": str(30 * 24 * 3600 + 1)}, "ttl_seconds"),
    "ttl not a number": ({"ttl_seconds": "a day"}, "ttl_seconds"),
    "ignored_params a string": ({"ignored_params": json.dumps("user")}, "ignored_params"),
    "ignored_params an object": ({"ignored_params": json.dumps({"user": True})}, "ignored_params"),
    "ignored_params not JSON": ({"ignored_params": "[user"}, "ignored_params"),
    "ignored_params name starting with a digit": ({"ignored_params": json.dumps(["9lives"])}, "ignored_params"),
    "ignored_params name with a space": ({"ignored_params": json.dumps(["max tokens"])}, "ignored_params"),
    "ignored_params non-string": ({"ignored_params": json.dumps([1])}, "ignored_params"),
    "ignored_params duplicate": ({"ignored_params": json.dumps(["seed", "seed"])}, "ignored_params"),
    "ignored_params nested too deeply": ({"ignored_params": "[" * 100_000 + "]" * 100_000}, "ignored_params"),
    "rollout above 100": ({"rollout_percent": "101"}, "rollout_percent"),
    "rollout negative": ({"rollout_percent": "-1"}, "rollout_percent"),
    "duplicate name": ({"name": "default"}, "name"),
    "name not a slug": ({"name": "my policy!"}, "name"),
    "unknown mode": ({"mode": "sometimes"}, "mode"),
    "unknown scope": ({"scope": "team"}, "scope"),
    "max entry bytes zero": ({"max_entry_bytes": "0"}, "max_entry_bytes"),
}


@pytest.mark.parametrize(("changes", "field"), list(INVALID.values()), ids=list(INVALID))
def test_add_form_rejects_invalid_values(admin_client, changes, field):
    response = admin_client.post(ADD_URL, form_data(**changes))
    errors = form_errors(response)
    assert field in errors, errors
    assert not CachePolicy.objects.filter(name=form_data(**changes)["name"]).exclude(name="default").exists()


def test_validation_messages_are_clear(admin_client):
    errors = form_errors(admin_client.post(ADD_URL, form_data(ttl_seconds=str(10**8))))
    assert "At most 2592000 seconds (RAGCACHE['MAX_TTL'])." in errors["ttl_seconds"]
    errors = form_errors(admin_client.post(ADD_URL, form_data(ignored_params=json.dumps(["seed", "seed"]))))
    assert "'seed' is listed twice." in errors["ignored_params"]
    errors = form_errors(admin_client.post(ADD_URL, form_data(ignored_params=json.dumps("seed"))))
    assert "JSON list" in errors["ignored_params"][0]


def test_max_ttl_follows_the_setting(admin_client, settings):
    settings.RAGCACHE = {**settings.RAGCACHE, "MAX_TTL": 3600}
    assert "ttl_seconds" in form_errors(admin_client.post(ADD_URL, form_data(ttl_seconds="3601")))
    assert admin_client.post(ADD_URL, form_data(ttl_seconds="3600")).status_code == 302


def test_empty_ignored_params_list_is_allowed(admin_client):
    assert admin_client.post(ADD_URL, form_data(ignored_params="[]")).status_code == 302
    assert CachePolicy.objects.get(name="faq").ignored_params == []


def test_change_form_renders_the_key_recipe(admin_client, policy_factory):
    policy = policy_factory("faq", scope="user", ignored_params=["seed"], normalize_query=True)
    response = admin_client.get(reverse("admin:ragcache_cachepolicy_change", args=[policy.pk]))
    assert response.status_code == 200
    body = response.content.decode()
    assert "key recipe" in body.lower()
    assert "every request parameter except <code>seed</code>" in body
    assert "the caller&#x27;s user id (hashed)" in body
    assert "normalised" in body and f"Generation {policy.generation} is part of the key" in body


def test_change_form_rejects_invalid_edit(admin_client, policy_factory):
    policy = policy_factory("faq", ttl_seconds=60)
    url = reverse("admin:ragcache_cachepolicy_change", args=[policy.pk])
    errors = form_errors(admin_client.post(url, form_data(ttl_seconds="0")))
    assert "ttl_seconds" in errors
    policy.refresh_from_db()
    assert policy.ttl_seconds == 60


def test_generation_is_not_editable(admin_client, policy_factory):
    policy = policy_factory("faq")
    generation = policy.generation
    url = reverse("admin:ragcache_cachepolicy_change", args=[policy.pk])
    assert admin_client.post(url, form_data(generation="99")).status_code == 302
    policy.refresh_from_db()
    assert policy.generation == generation


def test_changelist_renders_with_list_editable(admin_client, policy_factory):
    policy_factory("faq")
    response = admin_client.get(CHANGELIST_URL)
    assert response.status_code == 200
    body = response.content.decode()
    for field in ("enabled", "mode", "ttl_seconds", "scope", "rollout_percent"):
        assert f'name="form-0-{field}"' in body
    assert "faq" in body and "default" in body


def _changelist_edit(policies, **changes):
    data = {"form-TOTAL_FORMS": str(len(policies)), "form-INITIAL_FORMS": str(len(policies)),
            "form-MIN_NUM_FORMS": "0", "form-MAX_NUM_FORMS": "1000", "_save": "Save"}
    for i, p in enumerate(policies):
        values = {"id": p.pk, "enabled": "on" if p.enabled else "", "mode": p.mode, "ttl_seconds": p.ttl_seconds,
                  "scope": p.scope, "rollout_percent": p.rollout_percent}
        values.update(changes.get(p.name, {}))
        for k, v in values.items():
            if v != "":
                data[f"form-{i}-{k}"] = str(v)
    return data


def test_changelist_edit_saves_and_announces(admin_client, policy_factory, redis_client,
                                             django_capture_on_commit_callbacks):
    policy_factory("faq", mode="on")
    assert cache_service.cache_response("q", "x", model="m", policy="faq")
    policies = list(CachePolicy.objects.order_by("name"))
    before = version(redis_client)
    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(CHANGELIST_URL, _changelist_edit(policies, faq={"mode": "off"}))
    assert response.status_code == 302
    assert CachePolicy.objects.get(name="faq").mode == "off"
    assert version(redis_client) > before
    assert cache_service.get_cached_response("q", model="m", policy="faq") is None


def test_changelist_edit_with_bad_ttl_shows_errors(admin_client, policy_factory):
    policy_factory("faq", ttl_seconds=60)
    policies = list(CachePolicy.objects.order_by("name"))
    response = admin_client.post(CHANGELIST_URL, _changelist_edit(policies, faq={"ttl_seconds": "0"}))
    assert response.status_code == 200
    assert any("ttl_seconds" in form.errors for form in response.context["cl"].formset.forms)
    assert CachePolicy.objects.get(name="faq").ttl_seconds == 60


def _action(admin_client, action, policies):
    return admin_client.post(CHANGELIST_URL, {"action": action, "_selected_action": [p.pk for p in policies]})


def test_purge_action_bumps_generation(admin_client, policy_factory, redis_client,
                                       django_capture_on_commit_callbacks):
    faq = policy_factory("faq")
    other = policy_factory("other")
    assert cache_service.cache_response("q", "x", model="m", policy="faq")
    assert cache_service.cache_response("q", "x", model="m", policy="other")
    before = version(redis_client)
    with django_capture_on_commit_callbacks(execute=True):
        response = _action(admin_client, "purge_entries", [faq])
    assert response.status_code == 302
    generations = (faq.generation, other.generation)
    faq.refresh_from_db()
    other.refresh_from_db()
    assert faq.generation > generations[0] and other.generation == generations[1]
    assert version(redis_client) > before  # went through save(), so every process is told
    assert cache_service.get_cached_response("q", model="m", policy="faq") is None
    assert cache_service.get_cached_response("q", model="m", policy="other") is not None
    messages = [str(m) for m in response.wsgi_request._messages]
    assert any("Purged 1" in m for m in messages)


@pytest.mark.parametrize(("action", "start", "end"), [("disable_policies", True, False),
                                                      ("enable_policies", False, True)])
def test_enable_disable_actions(admin_client, policy_factory, redis_client, django_capture_on_commit_callbacks,
                                action, start, end):
    a = policy_factory("a", enabled=start)
    b = policy_factory("b", enabled=start)
    untouched = policy_factory("c", enabled=start)
    before = version(redis_client)
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        assert _action(admin_client, action, [a, b]).status_code == 302
    assert len(callbacks) == 2  # one save() per policy
    assert version(redis_client) > before
    assert [p.enabled for p in CachePolicy.objects.filter(name__in="abc").order_by("name")] == [end, end, start]
    untouched.refresh_from_db()
    assert untouched.enabled is start
    assert cache_service.cache_response("q", "x", model="m", policy="a") is end


def test_flags_admin_kill_switch(admin_client, redis_client, django_capture_on_commit_callbacks, policy_factory):
    policy_factory("default")
    flags = CacheFlags.load()
    url = reverse("admin:ragcache_cacheflags_change", args=[flags.pk])
    assert admin_client.get(url).status_code == 200
    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(url, {"kill_switch": "on", "tracking_enabled": "on"})
    assert response.status_code == 302
    assert cache_service.cache_response("q", "x", model="m") is False
    assert admin_client.get(reverse("admin:ragcache_cacheflags_changelist")).status_code == 200


def test_admin_pages_require_login(client):
    response = client.get(CHANGELIST_URL)
    assert response.status_code == 302 and "/login/" in response["Location"]


# --- Trust (issue 10), item 2: no read-then-write of an old generation through the admin ---------

@pytest.fixture
def purge_while_the_admin_saves():
    """Another request purges the policy after the admin loaded it and before it writes it
    back: a pre_save receiver runs the purge at exactly that point of the admin's save."""
    purged: list[int] = []

    def purge_now(sender, instance, **kwargs):
        if instance.pk and instance.name == "faq" and not purged:
            purged.append(CachePolicy.objects.get(pk=instance.pk).purge())

    pre_save.connect(purge_now, sender=CachePolicy, dispatch_uid="test-purge-while-the-admin-saves")
    yield purged
    pre_save.disconnect(sender=CachePolicy, dispatch_uid="test-purge-while-the-admin-saves")


def test_trust_2a_the_change_view_never_writes_back_a_generation_it_read(admin_client, policy_factory,
                                                                        purge_while_the_admin_saves):
    policy = policy_factory("faq", ttl_seconds=60)
    loaded = policy.generation
    assert cache_service.cache_response("q", "pre-purge answer", model="m", policy="faq")
    url = reverse("admin:ragcache_cachepolicy_change", args=[policy.pk])
    assert admin_client.post(url, form_data(ttl_seconds="120")).status_code == 302
    (purged,) = purge_while_the_admin_saves
    row = CachePolicy.objects.get(pk=policy.pk)
    assert (row.generation, row.ttl_seconds) == (purged, 120) and purged > loaded
    registry.invalidate()
    assert cache_service.get_cached_response("q", model="m", policy="faq") is None


def test_trust_2a_list_editable_never_writes_back_a_generation_it_read(admin_client, policy_factory,
                                                                      purge_while_the_admin_saves):
    policy_factory("faq", ttl_seconds=60)
    assert cache_service.cache_response("q", "pre-purge answer", model="m", policy="faq")
    policies = list(CachePolicy.objects.order_by("name"))
    loaded = {p.name: p.generation for p in policies}
    response = admin_client.post(CHANGELIST_URL, _changelist_edit(policies, faq={"ttl_seconds": "90"}))
    assert response.status_code == 302
    (purged,) = purge_while_the_admin_saves
    after = {p.name: p.generation for p in CachePolicy.objects.all()}
    assert after == {**loaded, "faq": purged} and purged > loaded["faq"]
    assert CachePolicy.objects.get(name="faq").ttl_seconds == 90
    registry.invalidate()
    assert cache_service.get_cached_response("q", model="m", policy="faq") is None


def test_trust_2b_default_deleted_and_added_again_in_the_admin_starts_above_its_old_generation(
        admin_client, policy_factory):
    default = policy_factory("default")
    old = default.generation
    for i in range(11):
        assert cache_service.cache_response(f"question {i}", "pre-purge answer", model="m")
    CachePolicy.objects.filter(name="default").delete()  # the admin refuses to (tests/test_admin_policy.py)
    assert admin_client.post(ADD_URL, form_data(name="default")).status_code == 302
    registry.invalidate()
    assert CachePolicy.objects.get(name="default").generation > old
    assert [cache_service.get_cached_response(f"question {i}", model="m") for i in range(11)] == [None] * 11


# --- Trust, item 20: usage records and rollups are read-only, deletion included -------------------

@pytest.mark.parametrize("model", ["usagerecord", "usagerollup"])
def test_trust_20_usage_rows_cannot_be_deleted_from_the_admin(admin_client, model):
    now = timezone.now()
    for i in range(3):
        UsageRecord.objects.create(event_id=f"0-{i}", ts=now, policy="faq", result="hit")
        UsageRollup.objects.create(period_start=now.replace(minute=0, second=0, microsecond=0),
                                   granularity="hour", policy=f"p{i}", hits=1, lookups=1)
    rows = (UsageRecord if model == "usagerecord" else UsageRollup).objects
    pks = list(rows.values_list("pk", flat=True))
    changelist = reverse(f"admin:ragcache_{model}_changelist")

    page = admin_client.get(changelist)
    assert page.status_code == 200 and page.context["cl"].result_count == 3
    assert b"delete_selected" not in page.content  # "Delete selected" is not offered
    forged = admin_client.post(changelist, {"action": "delete_selected", "_selected_action": pks, "post": "yes"})
    assert forged.status_code in (200, 302)
    assert rows.count() == 3
    delete_url = reverse(f"admin:ragcache_{model}_delete", args=[pks[0]])
    assert admin_client.get(delete_url).status_code == 403
    assert admin_client.post(delete_url, {"post": "yes"}).status_code == 403
    assert rows.count() == 3
    assert b"deletelink" not in admin_client.get(reverse(f"admin:ragcache_{model}_change", args=[pks[0]])).content
