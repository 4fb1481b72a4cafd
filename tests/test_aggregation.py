"""Aggregation of usage events into UsageRecord / UsageRollup, against the real Redis and
database: a known mix driven through cache_service must come out as the exact tally, and
re-runs, crashes before acknowledge and malformed events never change it. Events live in
256 per-shard streams read by one consumer ("aggregator") of one group."""
from __future__ import annotations

import io
import json
import re
from collections import defaultdict
from datetime import timedelta
from decimal import Decimal

import pytest
import redis
from django.core.management import CommandError, call_command
from django.utils import timezone
from prometheus_client import REGISTRY

from ragcache import store
from ragcache.aggregation import AggregationResult, aggregate, ingest
from ragcache.models import CacheFlags, ModelPrice, UsageRecord, UsageRollup
from ragcache.policies import registry
from ragcache.services import cache_service
from ragcache.usage import UsageEvent, event_header, usage_tracker

from .conftest import free_port

COUNTS = ("lookups", "hits", "misses", "shadow_hits", "stale_sources", "stores", "refusals", "bypasses",
          "unknown_usage_hits", "tokens_avoided")
PROMPT_TOKENS, COMPLETION_TOKENS = 200, 40
PRICED, OWN_COST = "gpt-priced", "gpt-own"
# gpt-priced: (200 * 0.5 + 40 * 1.5) / 1000; gpt-own responses carry their own cost.
COST_PER_HIT = {PRICED: Decimal("0.16"), OWN_COST: Decimal("0.0031")}


def answer(model: str, text: str, finish_reason: str = "stop") -> dict:
    data = {
        "choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": COMPLETION_TOKENS},
    }
    if model == OWN_COST:
        data["cost"] = "0.0031"
    return data


def empty_tally() -> dict:
    return {**dict.fromkeys(COUNTS, 0), "cost_avoided": Decimal(0)}


# --- the streams, read directly ----------------------------------------------------------------

def stream_events(redis_client) -> list[tuple[int, str, dict]]:
    """Every event still in a shard's stream: (shard, stream id, fields)."""
    pipe = redis_client.pipeline(transaction=False)
    for stream in store.current_layout().streams:
        pipe.xrange(stream)
    return [(shard, entry_id.decode(), fields) for shard, entries in enumerate(pipe.execute())
            for entry_id, fields in entries]


def pending_total(redis_client) -> int:
    """Events read by the aggregator's group but not acknowledged, over every shard."""
    pipe = redis_client.pipeline(transaction=False)
    for stream in store.current_layout().streams:
        pipe.xpending(stream, store.STREAM_GROUP)
    return sum(reply["pending"] for reply in pipe.execute(raise_on_error=False) if isinstance(reply, dict))


def consumer_names(redis_client) -> list[set[str]]:
    """Per shard, the names of the consumers of the aggregator's group (XINFO CONSUMERS)."""
    pipe = redis_client.pipeline(transaction=False)
    for stream in store.current_layout().streams:
        pipe.xinfo_consumers(stream, store.STREAM_GROUP)
    return [{c["name"].decode() if isinstance(c["name"], bytes) else c["name"] for c in reply}
            if isinstance(reply, list) else set() for reply in pipe.execute(raise_on_error=False)]


def counter_value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# --- a known mix, counted by the test itself --------------------------------------------------

def drive_known_mix(policy_factory, tag: str = "") -> dict[tuple[str, str], dict]:
    """Hits, misses, stores, refusals, shadow hits and bypasses through cache_service, over
    several policies and models. Returns the tally the test expects, counted here from what
    was done (not from anything ragcache recorded)."""
    policy_factory("default")
    policy_factory("faq")
    policy_factory("shadowy", mode="shadow")
    policy_factory("dark", mode="off")
    policy_factory("ro", mode="read_only")
    ModelPrice.objects.update_or_create(
        model=PRICED, defaults={"input_per_1k": Decimal("0.5"), "output_per_1k": Decimal("1.5")}
    )
    registry.invalidate()
    expected: dict[tuple[str, str], dict] = defaultdict(empty_tally)

    def count(policy: str, model: str, **deltas) -> None:
        for name, delta in deltas.items():
            expected[(policy, model)][name] += delta

    for policy in ("default", "faq"):
        for model in (PRICED, OWN_COST):
            for i, hits in enumerate((2, 1, 0)):
                question = f"{tag} {policy} {model} question {i}"
                first = cache_service.get_or_call(question, lambda q=question, m=model: answer(m, f"A: {q}"),
                                                  model=model, policy=policy)
                assert not first.hit and first.stored
                count(policy, model, lookups=1, misses=1, stores=1)
                for _ in range(hits):
                    again = cache_service.get_or_call(question, lambda: pytest.fail("hit expected"),
                                                      model=model, policy=policy)
                    assert again.hit
                    count(policy, model, lookups=1, hits=1, tokens_avoided=PROMPT_TOKENS + COMPLETION_TOKENS,
                          cost_avoided=COST_PER_HIT[model])
            stored = cache_service.cache_response(f"{tag} {policy} {model} cut", answer(model, "half", "length"),
                                                  model=model, policy=policy)
            assert not stored
            count(policy, model, refusals=1)
            unseen = f"{tag} {policy} {model} unseen"
            assert cache_service.get_cached_response(unseen, model=model, policy=policy) is None
            count(policy, model, lookups=1, misses=1)

    # Shadow mode: looks up, counts would-be hits, always calls the LLM and stores its answer.
    question = f"{tag} shadow question"
    assert not cache_service.get_or_call(question, lambda: answer(PRICED, "S"), model=PRICED, policy="shadowy").hit
    count("shadowy", PRICED, lookups=1, misses=1, stores=1)
    assert not cache_service.get_or_call(question, lambda: answer(PRICED, "S"), model=PRICED, policy="shadowy").hit
    count("shadowy", PRICED, lookups=1, shadow_hits=1, stores=1)
    # Mode off: every call bypasses the cache (and is recorded as a bypass).
    for i in range(2):
        assert cache_service.get_or_call(f"{tag} dark {i}", lambda: "x", model=OWN_COST, policy="dark").response == "x"
        count("dark", OWN_COST, bypasses=1)
    # Read-only: lookups miss and nothing is stored (a read-only refusal is not an event).
    for _ in range(2):
        assert not cache_service.get_or_call(f"{tag} ro", lambda: answer(PRICED, "R"), model=PRICED, policy="ro").hit
        count("ro", PRICED, lookups=1, misses=1)
    assert not cache_service.cache_response(f"{tag} ro", answer(PRICED, "R"), model=PRICED, policy="ro")
    return dict(expected)


def event_total(expected: dict) -> int:
    """Events in the streams: one per lookup (hit, miss or shadow hit), store, refusal, bypass."""
    return sum(t["lookups"] + t["stores"] + t["refusals"] + t["bypasses"] for t in expected.values())


def rollup_totals(granularity: str, *, with_latency: bool = False) -> dict[tuple[str, str], dict]:
    """UsageRollup rows of one granularity summed per (policy, model) over all periods
    (a test may straddle an hour or a day boundary); latency avoided too if asked."""
    extra = {"latency_avoided_ms": 0.0} if with_latency else {}
    totals: dict[tuple[str, str], dict] = defaultdict(lambda: {**empty_tally(), **extra})
    for row in UsageRollup.objects.filter(granularity=granularity):
        tally = totals[(row.policy, row.model)]
        for name in COUNTS:
            tally[name] += getattr(row, name)
        tally["cost_avoided"] += row.cost_avoided
        if with_latency:
            tally["latency_avoided_ms"] += row.latency_avoided_ms
    return dict(totals)


def report_json(*args: str) -> dict:
    out = io.StringIO()
    call_command("ragcache_report", "--format", "json", *args, stdout=out)
    return json.loads(out.getvalue())


def assert_report_equals(report: dict, expected: dict) -> None:
    rows = {(row["policy"], row["model"]): row for row in report["rows"]}
    assert set(rows) == set(expected)
    for key, tally in expected.items():
        row = rows[key]
        for name in COUNTS:
            assert row[name] == tally[name] and type(row[name]) is int, (key, name)
        assert Decimal(row["cost_avoided"]) == tally["cost_avoided"], key  # exact, not rounded
        lookups = tally["lookups"]
        assert row["hit_rate"] == round(tally["hits"] / lookups if lookups else 0.0, 4)
    totals = report["totals"]
    for name in COUNTS:
        assert totals[name] == sum(t[name] for t in expected.values()), name
    total_cost = sum((t["cost_avoided"] for t in expected.values()), Decimal(0))
    assert Decimal(totals["cost_avoided"]) == total_cost


# --- tests --------------------------------------------------------------------------------------

def test_known_mix_rolls_up_to_the_exact_tally(policy_factory, redis_client):
    expected = drive_known_mix(policy_factory)
    events = event_total(expected)
    assert store.backlog() == events == len(stream_events(redis_client))
    assert len({shard for shard, _, _ in stream_events(redis_client)}) > 1  # spread over shards

    first = aggregate()
    assert (first.status, first.ingested, first.duplicates, first.malformed, first.backlog) == ("ok", events, 0, 0, 0)
    assert UsageRecord.objects.count() == events
    assert rollup_totals("hour") == expected
    assert rollup_totals("day") == expected
    snapshot = list(UsageRollup.objects.order_by("pk").values())

    second = aggregate()
    assert (second.ingested, second.duplicates, second.malformed) == (0, 0, 0)
    assert UsageRecord.objects.count() == events
    assert list(UsageRollup.objects.order_by("pk").values()) == snapshot

    assert_report_equals(report_json(), expected)
    only_faq = report_json("--policy", "faq")
    assert {row["policy"] for row in only_faq["rows"]} == {"faq"}
    assert only_faq["totals"]["hits"] == sum(t["hits"] for k, t in expected.items() if k[0] == "faq") == 6

    # Event ids name the shard and the stream entry; bypasses say why.
    assert all(re.fullmatch(r"\d{1,3}-\d+-\d+", r.event_id) for r in UsageRecord.objects.all())
    assert set(UsageRecord.objects.filter(result="bypass").values_list("reason", flat=True)) == {"mode_off"}
    # Latency avoided: each hit saves the original call's time minus its own, never below 0.
    hit_records = UsageRecord.objects.filter(result="hit")
    assert all(r.latency_avoided_ms >= 0 for r in hit_records)
    assert sum(r.latency_avoided_ms for r in UsageRecord.objects.all()) == pytest.approx(
        sum(r.latency_avoided_ms for r in UsageRollup.objects.filter(granularity="hour")))


def test_crash_before_acknowledge_is_not_double_counted(policy_factory, redis_client):
    expected = drive_known_mix(policy_factory, "crash")
    events = event_total(expected)
    # A run reads events and commits 17 of them, then dies before acknowledging any.
    store.ensure_groups()
    read = store.read_events(5000, pending=False)
    assert len(read) == events
    ingest(read[:17], AggregationResult())
    assert UsageRecord.objects.count() == 17
    assert pending_total(redis_client) == events

    result = aggregate()  # the same consumer reads its own pending events first
    assert (result.ingested, result.duplicates) == (events - 17, 17)
    assert UsageRecord.objects.count() == events
    assert pending_total(redis_client) == 0
    assert store.backlog() == 0 and result.backlog == 0
    assert rollup_totals("hour") == expected
    assert rollup_totals("day") == expected


def test_crash_before_commit_leaves_events_pending_and_then_counts_them_once(policy_factory, redis_client):
    expected = drive_known_mix(policy_factory, "uncommitted")
    store.ensure_groups()
    read = store.read_events(5000, pending=False)  # read, never written, never acknowledged
    assert pending_total(redis_client) == len(read) == event_total(expected)
    result = aggregate()
    assert (result.ingested, result.duplicates) == (event_total(expected), 0)
    assert rollup_totals("hour") == expected


def test_malformed_events_are_dropped_counted_and_acknowledged(policy_factory, redis_client):
    policy_factory("default")
    stream = store.current_layout().streams[7]
    good = {"r": "miss", "h": event_header("default", "gpt", "global", "abcd")}
    redis_client.xadd(stream, good)
    redis_client.xadd(stream, {**good, "r": "exploded"})  # unknown result
    redis_client.xadd(stream, {"r": "miss"})  # no header
    redis_client.xadd(stream, {**good, "h": "default\x1fgpt"})  # a header of two fields
    # A hit whose entry metadata does not validate: the client could not read it either, so
    # it called the LLM: recorded as a miss ("corrupt"), never as a hit.
    redis_client.xadd(stream, {**good, "r": "hit", "e": "{not json"})
    redis_client.xadd(stream, {**good, "r": "hit", "e": json.dumps({"v": 2, "k": "r", "model": "gpt", "pt": -5})})
    redis_client.xadd(stream, good)

    result = aggregate()
    assert (result.ingested, result.malformed, result.backlog) == (4, 3, 0)
    assert sorted(UsageRecord.objects.values_list("result", "reason")) == [
        ("miss", ""), ("miss", ""), ("miss", "corrupt"), ("miss", "corrupt")]
    assert UsageRollup.objects.get(granularity="hour").hits == 0
    assert pending_total(redis_client) == 0
    assert store.backlog() == 0
    assert aggregate().malformed == 0  # dropped for good, not retried forever


def test_backlog_is_bounded_by_stream_maxlen_and_visible(settings, policy_factory, redis_client):
    # Each of the 256 shards' streams is capped at STREAM_MAXLEN / 16 = 50 events.
    settings.RAGCACHE = {**settings.RAGCACHE, "STREAM_MAXLEN": 16 * 50}
    policy_factory("default")
    for i in range(600):  # every key of shard 0 (the shard comes from the key's digits 8 to 16)
        assert usage_tracker.track(UsageEvent(policy="default", result="miss", model="gpt",
                                              key_hash=f"{i:08x}00000000"))
    backlog = store.backlog()
    assert backlog == redis_client.xlen(store.current_layout().streams[0])
    # MAXLEN ~ trims whole stream nodes, so the cap is approximate but holds.
    assert 50 <= backlog < 600
    oldest = redis_client.xrange(store.current_layout().streams[0], count=1)[0][1][b"h"].decode()
    assert int(oldest.split("\x1f")[3][:8], 16) > 0  # the oldest events were the ones dropped

    result = aggregate()
    assert result.ingested == backlog and result.backlog == 0 == store.backlog()


def test_a_batch_reads_at_most_aggregate_batch_events(settings, policy_factory, redis_client):
    """AGGREGATE_BATCH bounds each batch (one transaction), however the events spread over shards."""
    settings.RAGCACHE = {**settings.RAGCACHE, "AGGREGATE_BATCH": 100}
    policy_factory("default")
    streams = store.current_layout().streams
    pipe = redis_client.pipeline(transaction=False)
    for i in range(1000):
        pipe.xadd(streams[i % 4], {"r": "miss", "h": event_header("default", "gpt", "global", f"{i:04x}")})
    pipe.execute()
    store.ensure_groups()
    assert len(store.read_events(100, pending=False)) == 100  # 25 from each of the 4 shards with events
    assert pending_total(redis_client) == 100
    result = aggregate()
    assert (result.ingested, result.duplicates, result.backlog) == (1000, 0, 0)


def test_each_gateway_key_has_its_own_rollup_rows(policy_factory):
    policy_factory("default")
    for key, calls in (("team-a", 3), ("team-b", 2), ("", 1)):
        for _ in range(calls):
            cache_service.get_or_call("shared question", lambda: "an answer", model="m", gateway_key=key)
    assert aggregate().ingested == 7  # a miss and a store, then five hits
    hours = {row.gateway_key: (row.lookups, row.hits, row.stores)
             for row in UsageRollup.objects.filter(granularity="hour")}
    assert hours == {"team-a": (3, 2, 1), "team-b": (2, 2, 0), "": (1, 1, 0)}
    assert set(UsageRecord.objects.values_list("gateway_key", flat=True)) == {"team-a", "team-b", ""}
    (row,) = report_json()["rows"]  # the report sums them per policy and model
    assert (row["lookups"], row["hits"], row["stores"]) == (6, 5, 1)


def test_retention_prunes_old_records_and_keeps_rollups(settings, db):
    settings.RAGCACHE = {**settings.RAGCACHE, "RETENTION_DAYS": 30}
    now = timezone.now()
    for i, age in enumerate((31, 45, 29, 0)):
        UsageRecord.objects.create(event_id=f"1-{i}", ts=now - timedelta(days=age), policy="default", result="hit")
    for age in (31, 45, 29, 0):
        UsageRollup.objects.create(period_start=(now - timedelta(days=age)).replace(minute=0, second=0, microsecond=0),
                                   granularity="hour", policy="default", hits=1, lookups=1)
    result = aggregate()
    assert result.pruned == 2
    assert sorted(UsageRecord.objects.values_list("event_id", flat=True)) == ["1-2", "1-3"]
    assert UsageRollup.objects.count() == 4


def test_aggregate_command_prints_figures(policy_factory):
    expected = drive_known_mix(policy_factory, "command")
    out = io.StringIO()
    call_command("ragcache_aggregate", stdout=out)
    match = re.fullmatch(
        r"ingested=(\d+) duplicates=(\d+) malformed=(\d+) pruned=(\d+) backlog=(\d+) seconds=\d+\.\d{3}\n",
        out.getvalue(),
    )
    assert match, out.getvalue()
    assert [int(x) for x in match.groups()] == [event_total(expected), 0, 0, 0, 0]


def test_aggregate_command_says_busy_when_another_run_holds_the_lock(policy_factory, redis_client):
    drive_known_mix(policy_factory, "busy")
    backlog = store.backlog()
    assert store.acquire_lock(store.current_layout().aggregation_lock, "someone-else", 30)
    out = io.StringIO()
    call_command("ragcache_aggregate", stdout=out)
    assert out.getvalue().startswith("busy")
    assert store.backlog() == backlog and UsageRecord.objects.count() == 0


def test_aggregate_command_fails_clearly_without_redis(settings, db):
    caches = {**settings.CACHES}
    caches["ragcache"] = {**caches["ragcache"], "LOCATION": f"redis://127.0.0.1:{free_port()}/0"}
    settings.CACHES = caches
    with pytest.raises(CommandError, match="Redis is unavailable") as raised:
        call_command("ragcache_aggregate", stdout=io.StringIO())
    assert "CACHES['ragcache']['LOCATION']" in str(raised.value)


def test_aggregate_command_says_redis_is_out_of_memory_not_unreachable(private_redis, policy_factory, db):
    policy_factory("default")
    cache_service.get_or_call("q", lambda: "a", model="m")  # pending events: the miss and the store
    server = redis.Redis(port=private_redis.port)
    server.config_set("maxmemory-policy", "noeviction")
    server.config_set("maxmemory", 1)
    try:
        with pytest.raises(CommandError) as raised:
            call_command("ragcache_aggregate", stdout=io.StringIO())
    finally:
        server.config_set("maxmemory", 0)
        server.close()
    message = str(raised.value)
    assert "out of memory" in message and "maxmemory" in message
    assert "unavailable" not in message and "LOCATION" not in message
    call_command("ragcache_aggregate", stdout=io.StringIO())  # memory back: the events were kept
    assert sorted(UsageRecord.objects.values_list("result", flat=True)) == ["miss", "store"]


# --- Trust (issue 10) ----------------------------------------------------------------------------

def test_trust_17_tiny_costs_are_summed_before_rounding(policy_factory, settings):
    """A cost of 1.4e-6 hit 1000 times: rollup, report and ragcache_cost_avoided_total all
    say 0.0014 (0.1 rounded each hit and reported 0.001 in the rollup)."""
    settings.RAGCACHE = {**settings.RAGCACHE, "METRICS_MODELS": ["gpt-tiny"]}
    policy_factory("tiny")
    labels = {"policy": "tiny", "model": "gpt-tiny"}
    before = counter_value("ragcache_cost_avoided_total", **labels)
    assert cache_service.cache_response("q", {"content": "a", "cost": 1.4e-6}, model="gpt-tiny", policy="tiny")
    for _ in range(1000):
        assert cache_service.get_cached_response("q", model="gpt-tiny", policy="tiny") is not None
    metric = counter_value("ragcache_cost_avoided_total", **labels) - before

    result = aggregate()
    assert result.ingested == 1001 and result.malformed == 0
    hour = UsageRollup.objects.get(granularity="hour", policy="tiny")
    day = UsageRollup.objects.get(granularity="day", policy="tiny")
    assert hour.hits == day.hits == 1000
    assert hour.cost_avoided == day.cost_avoided == Decimal("0.0014")
    assert set(UsageRecord.objects.filter(result="hit").values_list("cost_avoided", flat=True)) == {
        Decimal("0.0000014")}
    report = report_json("--policy", "tiny")
    assert report["totals"]["cost_avoided"] == report["rows"][0]["cost_avoided"] == "0.001400000000"
    # The counter is a float: it agrees to the rollup's 12 decimal places.
    assert Decimal(repr(metric)).quantize(Decimal("1e-12")) == hour.cost_avoided
    assert f"{metric:.6f}" == "0.001400"


def test_trust_18_every_lookup_is_recorded_once_with_its_outcome_and_reason(policy_factory, redis_client):
    """Kill-switch bypasses reached no usage table in 0.1; every lookup now gives one record."""
    policy_factory("default")
    policy_factory("shadowy", mode="shadow")
    policy_factory("dark", mode="off")
    policy_factory("asleep", enabled=False)
    policy_factory("nobody", rollout_percent=0)
    assert cache_service.cache_response("cached", "an answer", model="m")
    assert cache_service.cache_response("cited", "an answer", model="m", sources=["doc:1"])
    assert cache_service.cache_response("cached", "an answer", model="m", policy="shadowy")
    assert cache_service.invalidate_sources(["doc:1"]) == 1
    stores = store.backlog()
    assert stores == 3

    expected = []

    def lookup(question, policy, result, reason=""):
        cache_service.get_or_call(question, lambda: "fresh", model="m", policy=policy, no_store=True)
        expected.append((policy if policy != "typo" else "unknown", result, reason))

    lookup("cached", "default", "hit")
    lookup("unseen", "default", "miss")
    lookup("cached", "shadowy", "shadow_hit")
    lookup("cited", "default", "stale_source", "stale_source")
    lookup("cached", "dark", "bypass", "mode_off")
    lookup("cached", "asleep", "bypass", "disabled")
    lookup("cached", "nobody", "bypass", "rollout")
    lookup("cached", "typo", "bypass", "unknown_policy")
    CacheFlags.objects.filter(pk=1).update(kill_switch=True)
    registry.invalidate()
    lookup("cached", "default", "bypass", "kill_switch")
    assert store.backlog() == stores + len(expected)

    assert aggregate().ingested == stores + len(expected)
    recorded = list(UsageRecord.objects.exclude(result="store").values_list("policy", "result", "reason"))
    assert sorted(recorded) == sorted(expected)
    rollups = rollup_totals("hour")
    assert sum(t["lookups"] for t in rollups.values()) == 4  # hit, miss, shadow hit, stale source
    assert sum(t["bypasses"] for t in rollups.values()) == 5
    assert (rollups[("default", "m")]["hits"], rollups[("default", "m")]["stale_sources"]) == (1, 1)


def test_trust_19_aggregation_uses_one_consumer_name_over_many_runs(policy_factory, redis_client):
    """0.1 created a consumer per run (one a minute, ~525,000 a year) and never deleted them."""
    policy_factory("default")
    for run in range(6):
        for i in range(20):
            cache_service.get_or_call(f"run {run} question {i}", lambda: "an answer", model="m")
        assert aggregate().ingested == 40
    names = consumer_names(redis_client)
    assert len(names) == 256
    assert set().union(*names) == {store.CONSUMER} == {"aggregator"}
    assert max(len(per_shard) for per_shard in names) == 1
    assert UsageRecord.objects.count() == 240
