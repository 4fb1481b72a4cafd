"""Gateway keys: ``manage.py ragcache_gateway_key`` and the admin. The key is shown once and
only its SHA-256 is stored; neither is shown afterwards."""
from __future__ import annotations

import hashlib
import io
import json

import pytest
from django.core.management import CommandError, call_command

from ragcache.gateway import auth
from ragcache.models import GatewayKey
from ragcache.policies import registry


@pytest.fixture(autouse=True)
def fresh_snapshot(db):
    registry.invalidate()
    auth.forget_last_used()


def run(*args: str) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command("ragcache_gateway_key", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def authenticated(client, key: str) -> bool:
    """Whether the gateway takes ``key``: a broken body after a good key is a 400, not a 401."""
    registry.invalidate()
    response = client.post("/v1/chat/completions", data="{", content_type="application/json",
                           HTTP_AUTHORIZATION=f"Bearer {key}")
    assert response.status_code in (400, 401)
    return response.status_code == 400


# --- the command ----------------------------------------------------------------------------------

def test_create_prints_the_key_once_alone_on_the_last_line(client):
    out, err = run("create", "acme-prod", "--scope", "tenant-42", "--policy", "default", "--allow", "no-cache",
                   "--allow", "sources")
    lines = out.rstrip("\n").split("\n")
    key = lines[-1]
    assert key.startswith("rck_") and len(key) > 40 and " " not in key
    assert out.count(key) == 1 and err == ""
    row = GatewayKey.objects.get(name="acme-prod")
    assert row.key_hash == hashlib.sha256(key.encode()).hexdigest() and key not in json.dumps(
        [row.name, row.key_prefix, row.scope, row.policies, row.allowed_cache_controls])
    assert (row.scope, row.policies, row.allowed_cache_controls, row.is_active) == (
        "tenant-42", ["default"], ["no-cache", "sources"], True)
    assert row.key_prefix == key[:10]
    assert authenticated(client, key) and not authenticated(client, key + "x")


def test_create_defaults_to_no_scope_default_policy_and_no_controls():
    out, _ = run("create", "plain")
    row = GatewayKey.objects.get(name="plain")
    assert (row.scope, row.policies, row.allowed_cache_controls) == ("", [], [])
    assert "scope (none); policies default; cache controls none" in out


def test_create_refuses_a_policy_that_does_not_exist():
    """A typo in --policy made a key whose every request bypassed the cache, with a warning
    easy to miss in a deployment script: now nothing is created."""
    with pytest.raises(CommandError) as raised:
        run("create", "early", "--policy", "default", "--policy", "nope")
    message = str(raised.value)
    assert "'nope'" in message and "default" in message.split("nope", 1)[1]  # names the known ones after it
    assert "'default'" not in message.split("Known", 1)[0]  # the existing one is not called unknown
    assert not GatewayKey.objects.exists()


def test_create_refuses_unknown_policies_without_listing_a_long_catalogue(policy_factory):
    for i in range(30):
        policy_factory(f"p{i:02d}")
    with pytest.raises(CommandError) as raised:
        run("create", "early", "--policy", "p99", "--policy", "p98")
    message = str(raised.value)
    assert "'p99'" in message and "'p98'" in message and "p00" in message and "p29" not in message
    assert "admin" in message  # where to see (or create) all of them
    assert not GatewayKey.objects.exists()


@pytest.mark.parametrize("args, message", [
    (["create", "bad name!"], "name"),
    (["create", "ok", "--allow", "everything"], "invalid choice"),
    (["create", "ok", "--scope", "s" * 200], "scope"),
    # An empty --scope (e.g. an unset shell variable) silently made an unscoped key sharing
    # answers with every other unscoped key.
    (["create", "ok", "--scope", ""], "--scope"),
    (["create", "ok", "--scope", "   "], "--scope"),
    (["create", "ok", "--scope", "tenant\x0042"], "--scope"),  # NUL: PostgreSQL refuses it at save
    (["create", "ok", "--scope", "tenant\n42"], "--scope"),
])
def test_create_refuses_bad_input(args, message):
    with pytest.raises(CommandError, match=message):
        run(*args)
    assert not GatewayKey.objects.exists()


def test_create_refuses_a_name_in_use():
    run("create", "taken")
    with pytest.raises(CommandError, match="exists already"):
        run("create", "taken")
    assert GatewayKey.objects.count() == 1


def test_list_shows_prefixes_never_keys_or_hashes():
    created, _ = run("create", "listed", "--allow", "no-store")
    key = created.rstrip("\n").split("\n")[-1]
    out, _ = run("list")
    row = GatewayKey.objects.get(name="listed")
    assert "listed" in out and row.key_prefix in out and "no-store" in out and "never" in out
    assert key not in out and row.key_hash not in out


def test_list_without_keys_says_how_to_make_one():
    out, _ = run("list")
    assert "ragcache_gateway_key create NAME" in out


def test_deactivate_makes_the_key_a_401(client):
    created, _ = run("create", "leaving")
    key = created.rstrip("\n").split("\n")[-1]
    assert authenticated(client, key)
    out, _ = run("deactivate", "leaving")
    assert "Deactivated" in out and not GatewayKey.objects.get(name="leaving").is_active
    assert not authenticated(client, key)
    again, _ = run("deactivate", "leaving")
    assert "already inactive" in again
    with pytest.raises(CommandError, match="No gateway key named"):
        run("deactivate", "nobody")


# --- the admin -----------------------------------------------------------------------------------------

def test_admin_add_shows_the_key_once_and_stores_only_its_hash(admin_client, client):
    response = admin_client.post("/admin/ragcache/gatewaykey/add/", {
        "name": "from-admin", "scope": "tenant-7", "policies": '["default"]',
        "allowed_cache_controls": ["no-cache", "max-age"], "is_active": "on",
    })
    assert response.status_code == 200 and "no-store" in response["Cache-Control"]
    row = GatewayKey.objects.get(name="from-admin")
    page = response.content.decode()
    key = page.split('id="gateway-key" type="text" readonly size="60" value="')[1].split('"')[0]
    assert key.startswith("rck_") and hashlib.sha256(key.encode()).hexdigest() == row.key_hash
    assert row.key_hash not in page and "Only its SHA-256 is stored" in page
    assert (row.scope, row.allowed_cache_controls) == ("tenant-7", ["no-cache", "max-age"])
    assert authenticated(client, key)
    # Never shown again: not on the change page, not in the list.
    for url in (f"/admin/ragcache/gatewaykey/{row.pk}/change/", "/admin/ragcache/gatewaykey/"):
        other = admin_client.get(url).content.decode()
        assert key not in other and row.key_hash not in other and row.key_prefix in other


def test_admin_add_refuses_a_control_that_does_not_exist(admin_client):
    response = admin_client.post("/admin/ragcache/gatewaykey/add/", {
        "name": "bad-controls", "policies": "[]", "allowed_cache_controls": ["everything"]})
    assert response.status_code == 200 and "Select a valid choice" in response.content.decode()
    assert not GatewayKey.objects.exists()


@pytest.mark.parametrize("field, value, message", [
    ("policies", '["default", "nope"]', "No cache policy named &#x27;nope&#x27;"),
    ("scope", "tenant\x1b7", "Enter a tenant or user id of printable characters"),
])
def test_admin_add_refuses_an_unknown_policy_or_an_unprintable_scope(admin_client, field, value, message):
    data = {"name": "bad-key", "scope": "", "policies": "[]", "is_active": "on", field: value}
    response = admin_client.post("/admin/ragcache/gatewaykey/add/", data)
    assert response.status_code == 200 and message in response.content.decode()
    assert not GatewayKey.objects.exists()


def test_admin_change_page_shows_last_use_and_no_secret(admin_client):
    run("create", "seen")
    row = GatewayKey.objects.get(name="seen")
    page = admin_client.get(f"/admin/ragcache/gatewaykey/{row.pk}/change/").content.decode()
    assert "Last used at" in page and "Key hash" not in page and 'name="key_hash"' not in page


def test_admin_active_toggle_and_deactivate_action(admin_client):
    for name in ("one", "two"):
        run("create", name)
    one, two = GatewayKey.objects.get(name="one"), GatewayKey.objects.get(name="two")
    changelist = "/admin/ragcache/gatewaykey/"
    response = admin_client.post(changelist, {
        "form-TOTAL_FORMS": "2", "form-INITIAL_FORMS": "2", "form-0-id": str(one.pk), "form-1-id": str(two.pk),
        "form-1-is_active": "on", "_save": "Save"})
    assert response.status_code == 302
    assert (GatewayKey.objects.get(pk=one.pk).is_active, GatewayKey.objects.get(pk=two.pk).is_active) == (False, True)
    response = admin_client.post(changelist, {"action": "deactivate_keys", "_selected_action": [str(two.pk)]},
                                 follow=True)
    assert "Deactivated 1 gateway key." in response.content.decode()
    assert not GatewayKey.objects.filter(is_active=True).exists()
