"""Who may do what: only staff with ragcache permissions see or edit policies and purge
them; view permission is read-only; /metrics and /ragcache/health follow their settings
and trust nothing the client says about its own address."""
from __future__ import annotations

import pytest
from django.contrib.auth.models import Permission, User
from django.urls import reverse

from ragcache.models import CacheFlags, CachePolicy

pytestmark = pytest.mark.django_db

CHANGELIST = reverse("admin:ragcache_cachepolicy_changelist")


@pytest.fixture(autouse=True)
def fast_password_hasher(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def policy(policy_factory):
    return policy_factory("faq", ttl_seconds=600)


def login_as(client, *codenames: str, staff: bool = True) -> User:
    user = User.objects.create_user("someone", password="pw-not-used", is_staff=staff)
    user.user_permissions.set(Permission.objects.filter(content_type__app_label="ragcache", codename__in=codenames))
    client.force_login(user)
    return user


def policy_urls(policy: CachePolicy) -> dict[str, str]:
    return {
        "changelist": CHANGELIST,
        "add": reverse("admin:ragcache_cachepolicy_add"),
        "change": reverse("admin:ragcache_cachepolicy_change", args=[policy.pk]),
        "delete": reverse("admin:ragcache_cachepolicy_delete", args=[policy.pk]),
        "history": reverse("admin:ragcache_cachepolicy_history", args=[policy.pk]),
    }


def purge(client, policy: CachePolicy):
    return client.post(CHANGELIST, {"action": "purge_entries", "_selected_action": [policy.pk]})


def changelist_edit(policy: CachePolicy, **changes) -> dict:
    """The list_editable formset POST for one policy row."""
    row = {"id": policy.pk, "enabled": "on", "mode": policy.mode, "ttl_seconds": policy.ttl_seconds,
           "scope": policy.scope, "rollout_percent": policy.rollout_percent, **changes}
    data = {"form-TOTAL_FORMS": "1", "form-INITIAL_FORMS": "1", "form-MIN_NUM_FORMS": "0",
            "form-MAX_NUM_FORMS": "1000", "_save": "Save"}
    data.update({f"form-0-{name}": value for name, value in row.items()})
    return data


def test_staff_without_ragcache_permissions_gets_403_everywhere(client, policy):
    generation = policy.generation
    login_as(client)
    for name, url in policy_urls(policy).items():
        assert client.get(url).status_code == 403, name
    assert purge(client, policy).status_code == 403
    assert client.post(policy_urls(policy)["change"], {"name": "faq", "ttl_seconds": "1"}).status_code == 403
    assert client.post(policy_urls(policy)["delete"], {"post": "yes"}).status_code == 403
    for model in ("cacheflags", "modelprice", "usagerecord", "usagerollup"):
        assert client.get(reverse(f"admin:ragcache_{model}_changelist")).status_code == 403, model
    flags = CacheFlags.load()
    assert client.post(reverse("admin:ragcache_cacheflags_change", args=[flags.pk]),
                       {"kill_switch": "on", "tracking_enabled": "on"}).status_code == 403
    policy.refresh_from_db()
    flags.refresh_from_db()
    assert (policy.generation, policy.ttl_seconds, flags.kill_switch) == (generation, 600, False)
    assert CachePolicy.objects.filter(name="faq").exists()
    assert b"ragcache" not in client.get(reverse("admin:index")).content.lower()


def test_view_permission_is_read_only(client, policy):
    generation = policy.generation
    login_as(client, "view_cachepolicy", "view_cacheflags")
    urls = policy_urls(policy)
    assert client.get(urls["changelist"]).status_code == 200
    page = client.get(urls["change"])
    assert page.status_code == 200 and b'name="_save"' not in page.content
    assert client.get(urls["add"]).status_code == 403
    assert client.get(urls["delete"]).status_code == 403
    assert client.post(urls["change"], {"name": "faq", "ttl_seconds": "1", "mode": "on",
                                        "scope": "global"}).status_code == 403
    assert client.post(urls["changelist"], changelist_edit(policy, ttl_seconds="1")).status_code == 403
    # Actions need change permission: the purge is not offered and a forged POST does nothing.
    assert b"purge_entries" not in client.get(urls["changelist"]).content
    response = purge(client, policy)
    assert response.status_code in (200, 302)
    assert not any("Purged" in str(m) for m in response.wsgi_request._messages)
    flags = CacheFlags.load()
    assert client.post(reverse("admin:ragcache_cacheflags_change", args=[flags.pk]),
                       {"kill_switch": "on", "tracking_enabled": "on"}).status_code == 403
    policy.refresh_from_db()
    flags.refresh_from_db()
    assert (policy.generation, policy.ttl_seconds, flags.kill_switch) == (generation, 600, False)


def test_change_permission_may_edit_and_purge_but_not_delete(client, policy, django_capture_on_commit_callbacks):
    generation = policy.generation
    login_as(client, "view_cachepolicy", "change_cachepolicy")
    with django_capture_on_commit_callbacks(execute=True):
        assert purge(client, policy).status_code == 302
        assert client.post(CHANGELIST, changelist_edit(policy, ttl_seconds="60")).status_code == 302
    policy.refresh_from_db()
    assert policy.generation > generation and policy.ttl_seconds == 60
    assert client.post(policy_urls(policy)["delete"], {"post": "yes"}).status_code == 403
    assert CachePolicy.objects.filter(pk=policy.pk).exists()


def test_permissions_without_staff_status_do_not_open_the_admin(client, policy):
    generation = policy.generation
    login_as(client, "view_cachepolicy", "change_cachepolicy", "delete_cachepolicy", staff=False)
    response = client.get(CHANGELIST)
    assert response.status_code == 302 and "/login/" in response["Location"]
    response = purge(client, policy)
    assert response.status_code == 302 and "/login/" in response["Location"]
    policy.refresh_from_db()
    assert policy.generation == generation


@pytest.mark.parametrize("path", ["/metrics", "/ragcache/health"])
def test_access_rule_ignores_forwarded_headers(client, settings, path):
    settings.RAGCACHE = {**settings.RAGCACHE, "METRICS_ALLOWED_IPS": ["10.1.2.3"]}
    spoofed = client.get(path, REMOTE_ADDR="10.9.9.9", HTTP_X_FORWARDED_FOR="10.1.2.3",
                         HTTP_X_REAL_IP="10.1.2.3", HTTP_FORWARDED="for=10.1.2.3")
    assert spoofed.status_code == 403
    assert client.get(path, REMOTE_ADDR="10.1.2.3").status_code == 200


@pytest.mark.parametrize("path", ["/metrics", "/ragcache/health"])
def test_bearer_token_must_match_exactly(client, settings, path):
    settings.RAGCACHE = {**settings.RAGCACHE, "METRICS_BEARER_TOKEN": "tok-123"}
    for header in ("Bearer tok-12", "Bearer tok-1234", "Basic tok-123", "Bearer tok-123\x00", "Bearer ŧok-123",
                   "Bearer", "tok-123", "Bearertok-123", ""):
        assert client.get(path, HTTP_AUTHORIZATION=header).status_code == 403, header
    # The scheme is case-insensitive (RFC 7235); the token is not.
    for header in ("Bearer tok-123", "bearer tok-123"):
        assert client.get(path, REMOTE_ADDR="10.9.9.9", HTTP_AUTHORIZATION=header).status_code == 200, header
    assert client.get(path, HTTP_AUTHORIZATION="Bearer TOK-123").status_code == 403
