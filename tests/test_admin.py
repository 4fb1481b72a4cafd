"""The policy admin, driven through the Django test client as a logged-in superuser:
validation shows form errors (never a 500), actions go through save() and are announced."""
from __future__ import annotations

import json

import pytest
from django.urls import reverse

from ragcache import store
from ragcache.models import CacheFlags, CachePolicy
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
        "key_params": json.dumps(["temperature", "max_tokens"]),
        "normalize_query": "on",
    }
    data.update(changes)
    return {k: v for k, v in data.items() if v is not None}


def form_errors(response):
    assert response.status_code == 200, response.status_code
    return response.context["adminform"].form.errors


def version(redis_client) -> int:
    return int(redis_client.get(store.config_version_key()) or 0)


def test_add_valid_policy(admin_client, redis_client, django_capture_on_commit_callbacks):
    before = version(redis_client)
    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(ADD_URL, form_data())
    assert response.status_code == 302
    policy = CachePolicy.objects.get(name="faq")
    assert (policy.ttl_seconds, policy.normalize_query) == (3600, True)
    assert policy.key_params == ["temperature", "max_tokens"]
    assert policy.generation == 1
    assert version(redis_client) == before + 1
    # The new policy is usable at once, without any manual reload.
    assert cache_service.get_or_call("q", lambda: "x", model="m", policy="faq").hit is False
    assert cache_service.get_or_call("q", lambda: "y", model="m", policy="faq").hit is True


INVALID = {
    "ttl zero": ({"ttl_seconds": "0"}, "ttl_seconds"),
    "ttl negative": ({"ttl_seconds": "-5"}, "ttl_seconds"),
    "ttl above max": ({"ttl_seconds": str(30 * 24 * 3600 + 1)}, "ttl_seconds"),
    "ttl not a number": ({"ttl_seconds": "a day"}, "ttl_seconds"),
    "key_params a string": ({"key_params": json.dumps("temperature")}, "key_params"),
    "key_params an object": ({"key_params": json.dumps({"temperature": True})}, "key_params"),
    "key_params not JSON": ({"key_params": "[temperature"}, "key_params"),
    "key_params bad name": ({"key_params": json.dumps(["Temperature"])}, "key_params"),
    "key_params name with dash": ({"key_params": json.dumps(["max-tokens"])}, "key_params"),
    "key_params non-string": ({"key_params": json.dumps([1])}, "key_params"),
    "key_params duplicate": ({"key_params": json.dumps(["seed", "seed"])}, "key_params"),
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
    errors = form_errors(admin_client.post(ADD_URL, form_data(key_params=json.dumps(["seed", "seed"]))))
    assert "'seed' is listed twice." in errors["key_params"]
    errors = form_errors(admin_client.post(ADD_URL, form_data(key_params=json.dumps("seed"))))
    assert "JSON list" in errors["key_params"][0]


def test_max_ttl_follows_the_setting(admin_client, settings):
    settings.RAGCACHE = {**settings.RAGCACHE, "MAX_TTL": 3600}
    assert "ttl_seconds" in form_errors(admin_client.post(ADD_URL, form_data(ttl_seconds="3601")))
    assert admin_client.post(ADD_URL, form_data(ttl_seconds="3600")).status_code == 302


def test_empty_key_params_list_is_allowed(admin_client):
    assert admin_client.post(ADD_URL, form_data(key_params="[]")).status_code == 302
    assert CachePolicy.objects.get(name="faq").key_params == []


def test_change_form_renders_the_key_recipe(admin_client, policy_factory):
    policy = policy_factory("faq", scope="user", key_params=["seed"], normalize_query=True)
    response = admin_client.get(reverse("admin:ragcache_cachepolicy_change", args=[policy.pk]))
    assert response.status_code == 200
    body = response.content.decode()
    assert "key recipe" in body.lower()
    assert "<code>seed</code>" in body and "the caller&#x27;s user id (hashed)" in body
    assert "normalised" in body


def test_change_form_rejects_invalid_edit(admin_client, policy_factory):
    policy = policy_factory("faq", ttl_seconds=60)
    url = reverse("admin:ragcache_cachepolicy_change", args=[policy.pk])
    errors = form_errors(admin_client.post(url, form_data(ttl_seconds="0")))
    assert "ttl_seconds" in errors
    policy.refresh_from_db()
    assert policy.ttl_seconds == 60


def test_generation_is_not_editable(admin_client, policy_factory):
    policy = policy_factory("faq")
    url = reverse("admin:ragcache_cachepolicy_change", args=[policy.pk])
    assert admin_client.post(url, form_data(generation="99")).status_code == 302
    policy.refresh_from_db()
    assert policy.generation == 1


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
    faq.refresh_from_db()
    other.refresh_from_db()
    assert (faq.generation, other.generation) == (2, 1)
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
    assert version(redis_client) == before + 2
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
