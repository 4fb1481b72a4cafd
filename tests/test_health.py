"""/ragcache/health tells the truth (up, down, and at once after recovery), and both
endpoints honour the access setting."""
from __future__ import annotations

import time

import pytest

from ragcache import store
from ragcache.usage import aggregate


@pytest.mark.slow
@pytest.mark.django_db
def test_health_up_down_and_recovered(client, private_redis, policy_factory, settings):
    # A long cooldown: if health went through the breaker it would still say "down"
    # right after recovery, which is the bug the seeds' origin project shipped.
    settings.RAGCACHE = {**settings.RAGCACHE, "BREAKER_COOLDOWN": 600.0}
    policy_factory("default")
    started = time.time()
    aggregate()

    up = client.get("/ragcache/health")
    assert up.status_code == 200
    body = up.json()
    assert body["status"] == "ok"
    assert body["redis"]["ok"] is True and body["redis"]["latency_ms"] >= 0
    assert body["usage_backlog"] == 0
    assert body["last_aggregation"] >= int(started)
    assert 0 <= body["last_aggregation_age_s"] < 600
    assert "default" in body["policies_loaded"]
    assert body["kill_switch"] is False

    private_redis.stop()
    down = client.get("/ragcache/health")
    assert down.status_code == 503
    body = down.json()
    assert body["status"] == "unavailable"
    assert body["redis"]["ok"] is False
    assert body["redis"]["error"]  # an exception class name, no connection details
    assert "usage_backlog" not in body
    assert store.breaker.open_until > 0  # the failure opened the breaker for 600 s...

    private_redis.start()  # same port
    recovered = client.get("/ragcache/health")
    assert recovered.status_code == 200  # ...but health pings past it
    body = recovered.json()
    assert body["redis"]["ok"] is True and body["redis"]["latency_ms"] >= 0
    assert body["usage_backlog"] == 0  # a fresh server: the old stream is gone, and health says so
    assert body["last_aggregation"] is None
    assert store.breaker.open_until == 0  # and the service path is closed again too


@pytest.mark.django_db
def test_health_and_metrics_allow_loopback_by_default(client):
    assert client.get("/ragcache/health").status_code == 200
    assert client.get("/metrics").status_code == 200
    assert client.get("/ragcache/health", REMOTE_ADDR="::1").status_code == 200


@pytest.mark.django_db
@pytest.mark.parametrize("path", ["/metrics", "/ragcache/health"])
def test_other_ips_are_forbidden(client, path):
    response = client.get(path, REMOTE_ADDR="10.20.30.40")
    assert response.status_code == 403
    assert b"ragcache_" not in response.content and b"redis" not in response.content


@pytest.mark.django_db
@pytest.mark.parametrize("path", ["/metrics", "/ragcache/health"])
def test_allowed_ips_setting(client, settings, path):
    settings.RAGCACHE = {**settings.RAGCACHE, "METRICS_ALLOWED_IPS": ["10.20.30.40"]}
    assert client.get(path, REMOTE_ADDR="10.20.30.40").status_code == 200
    assert client.get(path, REMOTE_ADDR="127.0.0.1").status_code == 403


@pytest.mark.django_db
@pytest.mark.parametrize("path", ["/metrics", "/ragcache/health"])
def test_bearer_token(client, settings, path):
    settings.RAGCACHE = {**settings.RAGCACHE, "METRICS_BEARER_TOKEN": "s3cret-token"}
    ok = client.get(path, REMOTE_ADDR="10.20.30.40", HTTP_AUTHORIZATION="Bearer s3cret-token")
    assert ok.status_code == 200
    if path == "/metrics":
        assert b"ragcache_redis_up" in ok.content
    assert client.get(path, REMOTE_ADDR="10.20.30.40", HTTP_AUTHORIZATION="Bearer wrong").status_code == 403
    assert client.get(path, REMOTE_ADDR="10.20.30.40", HTTP_AUTHORIZATION="s3cret-token").status_code == 403
    # With a token set, the token is the rule: even loopback must present it.
    assert client.get(path).status_code == 403
