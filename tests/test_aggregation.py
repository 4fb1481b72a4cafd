"""Aggregation of usage events into UsageRecord / UsageRollup, against the real Redis and
database: a known mix driven through cache_service must come out as the exact tally, and
re-runs, crashes before acknowledge and malformed events never change it."""
from __future__ import annotations

import io
import json
import re
from collections import defaultdict
from datetime import timedelta
from decimal import Decimal

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from ragcache import metrics, store, usage
from ragcache.models import ModelPrice, UsageRecord, UsageRollup
from ragcache.policies import registry
from ragcache.services import cache_service
from ragcache.usage import AggregationResult, UsageEvent, aggregate, usage_tracker

from .conftest import free_port

COUNTS = ("lookups", "hits", "misses", "shadow_hits", "stores", "refusals", "bypasses", "tokens_avoided")
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
                assert not first.hit
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

    # Shadow mode: the lookup counts a would-be hit, the LLM is still called, nothing is served.
    question = f"{tag} shadow question"
    assert not cache_service.get_or_call(question, lambda: answer(PRICED, "S"), model=PRICED, policy="shadowy").hit
    count("shadowy", PRICED, lookups=1, misses=1, stores=1)
    assert not cache_service.get_or_call(question, lambda: answer(PRICED, "S"), model=PRICED, policy="shadowy").hit
    count("shadowy", PRICED, lookups=1, shadow_hits=1)
    # Mode off: every call bypasses the cache.
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
    """Events in the stream: one per lookup (hit, miss or shadow hit), store, refusal, bypass."""
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
        assert row["cost_avoided"] == str(tally["cost_avoided"].quantize(Decimal("0.000001"))), key
        lookups = tally["lookups"]
        assert row["hit_rate"] == round(tally["hits"] / lookups if lookups else 0.0, 4)
    totals = report["totals"]
    for name in COUNTS:
        assert totals[name] == sum(t[name] for t in expected.values()), name
    total_cost = sum((t["cost_avoided"] for t in expected.values()), Decimal(0))
    assert totals["cost_avoided"] == str(total_cost.quantize(Decimal("0.000001")))


def test_known_mix_rolls_up_to_the_exact_tally(policy_factory, redis_client):
    expected = drive_known_mix(policy_factory)
    events = event_total(expected)
    assert redis_client.xlen(store.stream_key()) == events

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

    # Latency avoided: each hit saves the original call's time minus its own, never below 0.
    hit_records = UsageRecord.objects.filter(result="hit")
    assert all(r.latency_avoided_ms >= 0 for r in hit_records)
    assert sum(r.latency_avoided_ms for r in UsageRecord.objects.all()) == pytest.approx(
        sum(r.latency_avoided_ms for r in UsageRollup.objects.filter(granularity="hour")))


def test_crash_before_acknowledge_is_not_double_counted(policy_factory, redis_client):
    expected = drive_known_mix(policy_factory, "crash")
    events = event_total(expected)
    # A worker reads a batch and commits it, then dies before acknowledging it.
    store.ensure_group()
    batch = store.read_new("worker-that-died", 17)
    usage.ingest(batch, AggregationResult())
    assert UsageRecord.objects.count() == 17
    assert redis_client.xpending(store.stream_key(), store.STREAM_GROUP)["pending"] == 17

    result = aggregate()
    assert (result.ingested, result.duplicates) == (events - 17, 17)
    assert UsageRecord.objects.count() == events
    assert redis_client.xpending(store.stream_key(), store.STREAM_GROUP)["pending"] == 0
    assert redis_client.xlen(store.stream_key()) == 0 and result.backlog == 0
    assert rollup_totals("hour") == expected
    assert rollup_totals("day") == expected


def test_crash_before_commit_leaves_events_pending_and_then_counts_them_once(policy_factory, redis_client):
    expected = drive_known_mix(policy_factory, "uncommitted")
    store.ensure_group()
    store.read_new("worker-that-died-mid-transaction", 25)  # read, never written, never acknowledged
    assert redis_client.xpending(store.stream_key(), store.STREAM_GROUP)["pending"] == 25
    result = aggregate()
    assert (result.ingested, result.duplicates) == (event_total(expected), 0)
    assert rollup_totals("hour") == expected


def test_malformed_events_are_dropped_counted_and_acknowledged(policy_factory, redis_client):
    policy_factory("default")
    stream = store.stream_key()
    now_us = str(int(timezone.now().timestamp() * 1_000_000))
    good = {"r": "miss", "p": "default", "m": "gpt", "s": "global", "k": "abc", "t": now_us}
    redis_client.xadd(stream, good)
    redis_client.xadd(stream, {**good, "r": "exploded"})  # unknown result
    redis_client.xadd(stream, {k: v for k, v in good.items() if k != "t"})  # no time
    redis_client.xadd(stream, {**good, "r": "hit", "e": "{not json"})  # broken entry metadata
    redis_client.xadd(stream, {**good, "r": "hit", "e": json.dumps({"pt": 1, "ct": 1, "cost": "NaN-ish"})})
    redis_client.xadd(stream, good)

    result = aggregate()
    assert (result.ingested, result.malformed, result.backlog) == (2, 4, 0)
    assert list(UsageRecord.objects.values_list("result", flat=True)) == ["miss", "miss"]
    assert redis_client.xpending(stream, store.STREAM_GROUP)["pending"] == 0
    assert redis_client.xlen(stream) == 0
    assert aggregate().malformed == 0  # dropped for good, not retried forever


def test_backlog_is_bounded_by_stream_maxlen_and_visible(settings, policy_factory, redis_client):
    settings.RAGCACHE = {**settings.RAGCACHE, "STREAM_MAXLEN": 50}
    policy_factory("default")
    for i in range(600):
        assert usage_tracker.track(UsageEvent(policy="default", result="miss", model="gpt", key_hash=f"{i:016x}"))
    backlog = store.backlog()
    assert backlog == redis_client.xlen(store.stream_key())
    # MAXLEN ~ trims whole stream nodes, so the cap is approximate but holds.
    assert 50 <= backlog < 600
    oldest = redis_client.xrange(store.stream_key(), count=1)[0][1][b"k"].decode()
    assert int(oldest, 16) > 0  # the oldest events were the ones dropped

    result = aggregate()
    assert result.ingested == backlog and result.backlog == 0
    assert metrics.USAGE_BACKLOG._value.get() == 0


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
    backlog = redis_client.xlen(store.stream_key())
    assert store.acquire_lock(store.aggregation_lock_key(), "someone-else", 30)
    out = io.StringIO()
    call_command("ragcache_aggregate", stdout=out)
    assert out.getvalue().startswith("busy")
    assert redis_client.xlen(store.stream_key()) == backlog and UsageRecord.objects.count() == 0


def test_aggregate_command_fails_clearly_without_redis(settings, db):
    caches = {**settings.CACHES}
    caches["ragcache"] = {**caches["ragcache"], "LOCATION": f"redis://127.0.0.1:{free_port()}/0"}
    settings.CACHES = caches
    with pytest.raises(CommandError, match="Redis is unavailable"):
        call_command("ragcache_aggregate", stdout=io.StringIO())
