"""/metrics: ragcache's own series, scraped through the Django test client, move by
exactly what a known sequence of calls did; labels stay bounded."""
from __future__ import annotations

import time
import uuid

import pytest
import redis as redis_lib
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from ragcache import connection, metrics, store
from ragcache.aggregation import aggregate
from ragcache.services import cache_service
from ragcache.usage import event_header

Samples = dict[tuple[str, frozenset], float]


def scrape(client, **extra) -> Samples:
    """Every sample of a /metrics scrape, keyed by (sample name, labels)."""
    response = client.get("/metrics", **extra)
    assert response.status_code == 200, response.content[:200]
    samples: Samples = {}
    for family in text_string_to_metric_families(response.content.decode()):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; a labelled series that does not exist yet counts as 0."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def exported_sample_names() -> set[str]:
    """The sample names ragcache's metrics produce: the live registry's, plus the gauges
    every /metrics scrape reads afresh (metrics.SCRAPE_GAUGES)."""
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
    }
    names = set(metrics.SCRAPE_GAUGES)
    for family in REGISTRY.collect():
        if family.name.startswith("ragcache_"):
            names.update(family.name + suffix for suffix in suffixes[family.type])
    return names


def gauges(samples: Samples) -> dict[str, float]:
    """The scrape-time gauges present in a scrape (label-less), by name."""
    return {name: v for (name, labels), v in samples.items() if name in metrics.SCRAPE_GAUGES and not labels}


def answer(text: str, prompt_tokens: int = 12, completion_tokens: int = 30, cost: str = "0.0042") -> dict:
    return {
        "choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
        "cost": cost,
    }


def wait_breaker_closed() -> None:
    # The breaker re-probes Redis after BREAKER_COOLDOWN (set tiny by the tests).
    deadline = time.monotonic() + 5
    breaker = connection.breaker
    while breaker.open_until and time.monotonic() < breaker.open_until and time.monotonic() < deadline:
        time.sleep(0.01)


@pytest.mark.django_db
def test_known_sequence_moves_counters_by_exact_deltas(client, private_redis, policy_factory, settings):
    settings.RAGCACHE = {**settings.RAGCACHE, "BREAKER_COOLDOWN": 0.05}
    policy = f"obs{uuid.uuid4().hex[:8]}"  # a label no other test touches: deltas are exact
    policy_factory(policy)
    model = "gpt-obs-test"
    question = [{"role": "user", "content": "What does the observability test measure?"}]
    before = scrape(client)
    assert value(before, "ragcache_redis_up") == 1

    # miss + store (the call's answer is admitted and written)
    first = cache_service.get_or_call(question, lambda: answer("It measures deltas."), model=model, policy=policy)
    assert first.hit is False
    # hit: avoids 12 + 30 tokens and the answer's cost
    second = cache_service.get_or_call(question, lambda: pytest.fail("must be a hit"), model=model, policy=policy)
    assert second.hit is True
    # refusal: a truncated answer is never stored
    truncated = answer("It measu")
    truncated["choices"][0]["finish_reason"] = "length"
    assert cache_service.cache_response("another question", truncated, model=model, policy=policy) is False

    middle = scrape(client)
    private_redis.stop()
    # Redis error: the lookup is a miss for the caller, an error for the metrics, and so is the store.
    assert cache_service.get_cached_response("a third question", model=model, policy=policy) is None
    wait_breaker_closed()
    assert cache_service.cache_response("a third question", answer("x"), model=model, policy=policy) is False
    down = scrape(client)
    private_redis.start()
    wait_breaker_closed()
    after = scrape(client)  # the scrape itself reads the backlog: Redis is seen up again

    assert delta(before, middle, "ragcache_lookups_total", policy=policy, result="miss") == 1
    assert delta(before, middle, "ragcache_lookups_total", policy=policy, result="hit") == 1
    assert delta(before, middle, "ragcache_lookups_total", policy=policy, result="error") == 0
    assert delta(before, middle, "ragcache_stores_total", policy=policy, result="stored") == 1
    assert delta(before, middle, "ragcache_stores_total", policy=policy, result="refused") == 1
    assert delta(before, middle, "ragcache_refusals_total", policy=policy, reason="truncated") == 1
    assert delta(before, middle, "ragcache_tokens_avoided_total", policy=policy, model=model) == 42
    assert delta(before, middle, "ragcache_cost_avoided_total", policy=policy, model=model) == pytest.approx(0.0042)
    # Only lookups that reached Redis are timed (miss + hit); one entry was written.
    assert delta(before, middle, "ragcache_lookup_seconds_count", policy=policy) == 2
    assert delta(before, middle, "ragcache_entry_bytes_count") == 1
    assert delta(before, middle, "ragcache_lookup_seconds_bucket", policy=policy, le="+Inf") == 2

    assert delta(middle, down, "ragcache_lookups_total", policy=policy, result="error") == 1
    assert delta(middle, down, "ragcache_stores_total", policy=policy, result="error") == 1
    assert delta(middle, down, "ragcache_lookup_seconds_count", policy=policy) == 0
    assert delta(middle, down, "ragcache_tokens_avoided_total", policy=policy, model=model) == 0
    assert value(down, "ragcache_redis_up") == 0
    assert value(after, "ragcache_redis_up") == 1
    # Nothing else moved on the way back up.
    assert delta(down, after, "ragcache_lookups_total", policy=policy, result="error") == 0
    assert delta(down, after, "ragcache_stores_total", policy=policy, result="stored") == 0


@pytest.mark.django_db
def test_backlog_lag_and_last_aggregation_are_read_at_scrape_time(client, policy_factory, redis_client):
    policy_factory("default")
    first = scrape(client)
    # A fresh prefix: nothing waits (known: 0 events, 0 s behind), and no run was ever
    # recorded, so the timestamp has no sample rather than a 0 that means 1970.
    assert gauges(first)["ragcache_usage_backlog"] == 0
    assert gauges(first)["ragcache_usage_lag_seconds"] == 0
    assert "ragcache_last_aggregation_timestamp_seconds" not in gauges(first)

    cache_service.get_or_call("backlog question", lambda: answer("backlog answer"), model="m")
    # One event written 90 s ago (by the Redis clock) to another shard's stream.
    seconds, micros = redis_client.time()
    old_id = f"{seconds * 1000 + micros // 1000 - 90_000}-0"
    stream = store.current_layout().streams[7]
    redis_client.xadd(stream, {"r": "miss", "h": event_header("default", "m", "s" * 16, "k" * 16)}, id=old_id)
    samples = scrape(client)
    assert value(samples, "ragcache_usage_backlog") == 3  # miss + store events, and the old one
    assert 90 <= value(samples, "ragcache_usage_lag_seconds") < 150
    started = time.time()
    result = aggregate()
    assert result.ingested == 3
    samples = scrape(client)
    assert value(samples, "ragcache_usage_backlog") == 0
    assert value(samples, "ragcache_usage_lag_seconds") == 0
    assert value(samples, "ragcache_last_aggregation_timestamp_seconds") >= int(started)
    assert value(samples, "ragcache_aggregation_runs_total", result="ok") >= 1
    assert value(samples, "ragcache_aggregation_seconds_count") >= 1


@pytest.mark.django_db
def test_redis_outage_scrape_has_no_sentinel_values(client, private_redis, policy_factory, settings):
    """While Redis is unreachable, what cannot be read has no sample: no 0 timestamp (an
    alert would read "57 years"), no 0 backlog or lag, no memory state. Redis down is
    said by ragcache_redis_up 0 alone; the database is still known to be up."""
    settings.RAGCACHE = {**settings.RAGCACHE, "BREAKER_COOLDOWN": 0.05}
    policy_factory("default")
    cache_service.get_or_call("outage question", lambda: answer("outage answer"), model="m")
    aggregate()
    cache_service.get_or_call("outage question", lambda: pytest.fail("must be a hit"), model="m")
    up = gauges(scrape(client))
    assert up["ragcache_redis_up"] == 1 and up["ragcache_database_up"] == 1
    assert up["ragcache_usage_backlog"] == 1  # the hit's event
    assert up["ragcache_last_aggregation_timestamp_seconds"] > 1.7e9
    assert up["ragcache_redis_masters_full"] == 0

    private_redis.stop()
    text = client.get("/metrics").content.decode()
    down = scrape(client)
    present = gauges(down)
    broker = present.pop("ragcache_broker_up", None)
    assert broker in (0.0, 1.0, None)  # the test settings' broker: its own server, not this one
    assert present == {"ragcache_redis_up": 0.0, "ragcache_database_up": 1.0}
    for name in ("ragcache_last_aggregation_timestamp_seconds", "ragcache_usage_backlog",
                 "ragcache_usage_lag_seconds", "ragcache_redis_masters_full"):
        assert f"\n{name} " not in text  # not even as a sample line of another shape
        assert f"# TYPE {name} gauge" not in text
    # Fixed label sets start at 0 and count the outage as it is.
    assert value(down, "ragcache_redis_errors_total", kind="connection") >= 1
    assert ("ragcache_aggregation_runs_total", frozenset({"result": "error"}.items())) in down

    private_redis.start()  # same port, empty: nothing waits and no run is recorded there
    wait_breaker_closed()
    back = gauges(scrape(client))
    assert back["ragcache_redis_up"] == 1 and back["ragcache_usage_backlog"] == 0
    assert back["ragcache_usage_lag_seconds"] == 0
    assert "ragcache_last_aggregation_timestamp_seconds" not in back


@pytest.mark.django_db
def test_redis_refusing_writes_is_a_metric_of_its_own(client, private_redis, policy_factory):
    """maxmemory reached under noeviction: Redis answers (up 1) but refuses writes; hits
    go on, stores are refused as redis_full and usage events are counted as lost."""
    policy_factory("default")
    cache_service.get_or_call("full question", lambda: answer("full answer"), model="m")
    before = scrape(client)
    assert gauges(before)["ragcache_redis_masters_full"] == 0
    server = redis_lib.Redis(port=private_redis.port)
    server.config_set("maxmemory-policy", "noeviction")
    server.config_set("maxmemory", 1)
    try:
        assert cache_service.get_or_call("full question", lambda: pytest.fail("a hit"), model="m").hit
        assert not cache_service.get_or_call("another question", lambda: answer("new"), model="m").stored
        during = scrape(client)
    finally:
        server.config_set("maxmemory", 0)
        server.close()
    assert gauges(during)["ragcache_redis_up"] == 1
    assert gauges(during)["ragcache_redis_masters_full"] == 1
    assert delta(before, during, "ragcache_usage_events_lost_total", reason="redis_full") >= 2
    assert delta(before, during, "ragcache_refusals_total", policy="default", reason="redis_full") == 1
    assert gauges(scrape(client))["ragcache_redis_masters_full"] == 0


@pytest.mark.django_db
def test_labels_never_carry_scope_key_or_prompt(client, policy_factory):
    policy = f"iso{uuid.uuid4().hex[:8]}"
    policy_factory(policy, scope="user")
    prompt = "zebra-unique-prompt-text-7731"
    scope = "user-alice-4417"
    first = cache_service.get_or_call(
        prompt, lambda: answer("zebra-answer-9914"), model="m", policy=policy, scope=scope
    )
    second = cache_service.get_or_call(prompt, lambda: answer("never"), model="m", policy=policy, scope=scope)
    assert second.hit is True
    text = client.get("/metrics").content.decode()
    assert f'policy="{policy}"' in text  # the sequence is in this scrape...
    scope_part, key_hash = first.key.split(":")[-2:]
    for secret in (prompt, "zebra-answer-9914", scope, scope_part, key_hash, key_hash[:16]):
        assert secret not in text  # ...but nothing that identifies a user, entry or prompt
    label_names = set()
    for family in text_string_to_metric_families(text):
        if family.name.startswith("ragcache_"):
            for sample in family.samples:
                label_names.update(sample.labels)
    assert label_names <= {"policy", "result", "model", "reason", "kind", "le"}


def test_contract_metric_names_and_types_are_exported():
    names = exported_sample_names()
    for name in ("ragcache_lookups_total", "ragcache_stores_total", "ragcache_tokens_avoided_total",
                 "ragcache_cost_avoided_total", "ragcache_aggregation_runs_total", "ragcache_lookup_seconds_bucket",
                 "ragcache_entry_bytes_bucket", "ragcache_aggregation_seconds_bucket", "ragcache_usage_backlog",
                 "ragcache_redis_up", "ragcache_last_aggregation_timestamp_seconds", "ragcache_usage_lag_seconds",
                 "ragcache_database_up", "ragcache_broker_up", "ragcache_redis_masters_full",
                 "ragcache_usage_events_lost_total", "ragcache_redis_errors_total"):
        assert name in names
    assert metrics.LOOKUPS._labelnames == ("policy", "result")
    assert metrics.STORES._labelnames == ("policy", "result")
    assert metrics.LOOKUP_SECONDS._labelnames == ("policy",)
    assert metrics.TOKENS_AVOIDED._labelnames == ("policy", "model")
    assert metrics.COST_AVOIDED._labelnames == ("policy", "model")
    assert metrics.AGGREGATION_RUNS._labelnames == ("result",)
    # Buckets resolve a 50 µs Redis hit and a 1 s stall.
    buckets = metrics.LOOKUP_SECONDS._upper_bounds
    assert buckets[0] == 0.00005 and 1.0 in buckets and buckets[-1] == float("inf")


def test_model_label_is_capped(monkeypatch, settings):
    monkeypatch.setattr(metrics, "_seen_models", set())
    monkeypatch.setattr(metrics, "MAX_MODEL_LABELS", 3)
    assert [metrics.model_label(m) for m in ("a", "b", "c", "d", "a")] == ["a", "b", "c", "other", "a"]
    assert metrics.model_label("x" * 101) == "other"
    settings.RAGCACHE = {**settings.RAGCACHE, "METRICS_MODELS": ["gpt-4o", "gpt-4o-mini"]}
    assert metrics.model_label("gpt-4o") == "gpt-4o"
    assert metrics.model_label("a") == "other"


@pytest.mark.django_db
def test_unknown_models_are_reported_as_other(client, policy_factory, settings):
    settings.RAGCACHE = {**settings.RAGCACHE, "METRICS_MODELS": ["known-model"]}
    policy = f"mdl{uuid.uuid4().hex[:8]}"
    policy_factory(policy)
    for model in ("known-model", "some-new-model-2031"):
        cache_service.get_or_call("q", lambda: answer("a", 1, 2, "0.5"), model=model, policy=policy)
        assert cache_service.get_or_call("q", lambda: answer("b"), model=model, policy=policy).hit
    samples = scrape(client)
    assert value(samples, "ragcache_tokens_avoided_total", policy=policy, model="known-model") == 3
    assert value(samples, "ragcache_tokens_avoided_total", policy=policy, model="other") == 3
    assert value(samples, "ragcache_cost_avoided_total", policy=policy, model="other") == 0.5
    assert ("ragcache_tokens_avoided_total", frozenset({"policy": policy, "model": "some-new-model-2031"}.items())) \
        not in samples


@pytest.mark.django_db
@pytest.mark.parametrize(("remote_addr", "status"), [
    ("10.0.0.1", 200), ("10.255.255.254", 200), ("11.0.0.1", 403), ("9.255.255.255", 403),
    ("::1", 200), ("::2", 403),
    ("192.168.7.77", 200), ("192.168.7.78", 403),
    ("2001:db8:ffff::1", 200), ("2001:db9::1", 403),
    ("::ffff:10.1.2.3", 200),  # a dual-stack server sees an IPv4 client as its IPv4-mapped address
    ("::ffff:11.1.2.3", 403),
    ("fe80::1%eth0", 403), ("", 403), ("not-an-ip", 403), ("10.0.0.1/8", 403),
])
def test_metrics_access_by_cidr_network(client, settings, remote_addr, status):
    """METRICS_ALLOWED_IPS holds addresses and networks (RFC 4632 / RFC 4291 prefixes)."""
    settings.RAGCACHE = {**settings.RAGCACHE, "METRICS_ALLOWED_IPS": [
        "10.0.0.0/8", "::1/128", "192.168.7.77", "2001:db8::/32"]}
    response = client.get("/metrics", REMOTE_ADDR=remote_addr)
    assert response.status_code == status, remote_addr
    if status == 403:
        assert b"ragcache_" not in response.content
    else:
        assert b"ragcache_" in response.content


@pytest.mark.django_db
def test_metrics_access_skips_an_entry_that_is_no_address(client, settings):
    """A bad entry (system check ragcache.E006) never makes a request fail: it matches nothing."""
    settings.RAGCACHE = {**settings.RAGCACHE, "METRICS_ALLOWED_IPS": ["bogus", "10.0.0.0/33", "10.1.2.3"]}
    assert client.get("/metrics", REMOTE_ADDR="10.1.2.3").status_code == 200
    assert client.get("/metrics", REMOTE_ADDR="10.1.2.4").status_code == 403
    settings.RAGCACHE = {**settings.RAGCACHE, "METRICS_ALLOWED_IPS": "10.1.2.30"}  # a string, not a list
    assert client.get("/metrics", REMOTE_ADDR="10.1.2.3").status_code == 403  # no substring match
