"""/ragcache/health tells the truth (up, down, and at once after recovery), and both
endpoints honour the access setting."""
from __future__ import annotations

import time

import pytest
import redis as redis_lib

from ragcache import connection
from ragcache.aggregation import aggregate
from ragcache.services import cache_service


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
    assert body["status"] == "ok" and body["problems"] == []
    assert body["redis"]["ok"] is True and body["redis"]["latency_ms"] >= 0
    assert body["redis"]["writes_refused"] is False
    assert body["database"] == {"ok": True}
    assert body["usage_backlog"] == 0 and body["usage_lag_s"] == 0
    assert body["last_aggregation"] >= int(started)
    assert 0 <= body["last_aggregation_age_s"] < 600
    assert "default" in body["policies_loaded"]
    assert body["kill_switch"] is False

    private_redis.stop()
    down = client.get("/ragcache/health")
    assert down.status_code == 503
    body = down.json()
    assert body["status"] == "unavailable" and "redis_unreachable" in body["problems"]
    assert body["redis"]["ok"] is False
    assert body["redis"]["error"] == "ConnectionError"  # a class name, no connection details
    # Unknown is absent, not null (null means "no run yet") and not 0.
    for unknown in ("usage_backlog", "usage_lag_s", "last_aggregation", "last_aggregation_age_s"):
        assert unknown not in body
    assert body["database"] == {"ok": True}  # the other dependencies are still told apart
    assert connection.breaker.open_until > 0  # the failure opened the breaker for 600 s...

    private_redis.start()  # same port
    recovered = client.get("/ragcache/health")
    assert recovered.status_code == 200  # ...but health pings past it
    body = recovered.json()
    assert body["redis"]["ok"] is True and body["redis"]["latency_ms"] >= 0
    assert body["usage_backlog"] == 0  # a fresh server: the old stream is gone, and health says so
    assert body["last_aggregation"] is None and body["last_aggregation_age_s"] is None
    assert connection.breaker.open_until == 0  # and the service path is closed again too


@pytest.mark.django_db
def test_health_says_redis_refuses_writes(client, private_redis, policy_factory):
    """maxmemory under noeviction: Redis answers, hits go on, writes are refused. Health
    stays 200 (ragcache still serves) but says "degraded" and why."""
    policy_factory("default")
    cache_service.get_or_call("q", lambda: {"content": "a", "usage": {"prompt_tokens": 1, "completion_tokens": 1}},
                              model="m")
    server = redis_lib.Redis(port=private_redis.port)
    server.config_set("maxmemory-policy", "noeviction")
    server.config_set("maxmemory", 1)
    try:
        full = client.get("/ragcache/health")
    finally:
        server.config_set("maxmemory", 0)
        server.close()
    assert full.status_code == 200
    body = full.json()
    assert body["status"] == "degraded" and body["problems"] == ["redis_refusing_writes"]
    assert body["redis"]["ok"] is True and body["redis"]["writes_refused"] is True
    assert body["usage_backlog"] == 2  # reads still work: the miss and store events wait
    assert client.get("/ragcache/health").json()["status"] == "ok"


@pytest.mark.django_db
def test_full_redis_under_an_eviction_policy_is_not_refusing_writes(client, private_redis):
    """allkeys-lru at maxmemory is a full cache working as designed: it evicts, it accepts writes."""
    server = redis_lib.Redis(port=private_redis.port)
    server.config_set("maxmemory-policy", "allkeys-lru")
    server.config_set("maxmemory", 1)
    try:
        body = client.get("/ragcache/health").json()
    finally:
        server.config_set("maxmemory", 0)
        server.close()
    assert body["status"] == "ok" and body["redis"]["writes_refused"] is False


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
    # RFC 6750 (via RFC 7235): the scheme is case-insensitive; the token is not.
    for scheme in ("bearer", "BEARER", "bEaReR"):
        assert client.get(path, REMOTE_ADDR="10.20.30.40",
                          HTTP_AUTHORIZATION=f"{scheme} s3cret-token").status_code == 200, scheme
    assert client.get(path, REMOTE_ADDR="10.20.30.40", HTTP_AUTHORIZATION="bearer S3CRET-TOKEN").status_code == 403
    assert client.get(path, REMOTE_ADDR="10.20.30.40", HTTP_AUTHORIZATION="Basic s3cret-token").status_code == 403
    assert client.get(path, REMOTE_ADDR="10.20.30.40", HTTP_AUTHORIZATION="Bearers3cret-token").status_code == 403
    assert client.get(path, REMOTE_ADDR="10.20.30.40", HTTP_AUTHORIZATION="Bearer ").status_code == 403
    assert client.get(path, REMOTE_ADDR="10.20.30.40", HTTP_AUTHORIZATION="Bearer wrong").status_code == 403
    assert client.get(path, REMOTE_ADDR="10.20.30.40", HTTP_AUTHORIZATION="s3cret-token").status_code == 403
    # With a token set, the token is the rule: even loopback must present it.
    assert client.get(path).status_code == 403


@pytest.mark.django_db
def test_health_says_usage_waits_too_long(client, settings, redis_client, policy_factory):
    """Usage events waiting longer than AGGREGATION_STALE_AFTER (by the Redis clock): still
    200, since the cache works, but "degraded", with the wait."""
    from ragcache import store
    from ragcache.usage import event_header

    settings.RAGCACHE = {**settings.RAGCACHE, "AGGREGATION_STALE_AFTER": 60.0}
    policy_factory("default")
    assert client.get("/ragcache/health").json()["status"] == "ok"
    seconds, micros = redis_client.time()
    redis_client.xadd(store.current_layout().streams[3], {"r": "miss", "h": event_header("default", "m", "s", "k")},
                      id=f"{seconds * 1000 + micros // 1000 - 90_000}-0")
    waiting = client.get("/ragcache/health")
    assert waiting.status_code == 200
    body = waiting.json()
    assert body["status"] == "degraded" and body["problems"] == ["aggregation_stale"]
    assert 90 <= body["usage_lag_s"] < 150 and body["usage_backlog"] == 1
    aggregate()
    assert client.get("/ragcache/health").json()["problems"] == []
