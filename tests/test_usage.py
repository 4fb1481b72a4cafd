"""Step 63: a hit is tracked in the same Redis round trip as its lookup, the step log line
has the seed's shape without prompt text, tracking can be switched off, cost avoided
comes from the response's own cost or else from ModelPrice, and input tokens a provider
served from its own prompt cache are priced at their own rate."""
from __future__ import annotations

import json
import logging
import re
from decimal import Decimal

import pytest
from redis.connection import AbstractConnection

from ragcache import store
from ragcache.aggregation import aggregate
from ragcache.models import CacheFlags, ModelPrice, UsageRecord, UsageRollup
from ragcache.policies import registry
from ragcache.services import cache_service
from ragcache.usage import UsageEvent, parse_header, usage_tracker

from .test_aggregation import counter_value, report_json, stream_events

STEP_63 = re.compile(
    r"^RAG STEP 63 \(RAG\.cache\.usagetracker\.track\.track\.cache\.hit\): "
    r"UsageTracker\.track Track cache hit \| attrs=(\{.*\})$"
)
PROMPT = "What is the secret recipe of grandma's zucchini bread?"
ANSWER = "Zucchini, flour, walnuts and patience."


def response(cost=None, prompt_tokens=120, completion_tokens=30) -> dict:
    data = {
        "choices": [{"message": {"role": "assistant", "content": ANSWER}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
    }
    if cost is not None:
        data["cost"] = cost
    return data


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def step_log():
    """Records of the ragcache.steps logger (the project's LOGGING stops ragcache.* from
    propagating to the root logger, where caplog listens)."""
    logger = logging.getLogger("ragcache.steps")
    handler, level = _ListHandler(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler.records
    logger.removeHandler(handler)
    logger.setLevel(level)


def step63_attrs(records) -> list[dict]:
    found = []
    for record in records:
        match = STEP_63.match(record.getMessage())
        if match and record.levelno == logging.INFO:
            found.append(json.loads(match.group(1)))
    return found


@pytest.fixture
def count_round_trips(monkeypatch):
    """Count packets written to Redis by this process, on the real connections (Redis is
    not mocked: every command still goes to the server). One packet is one round trip:
    redis-py writes a command (or a whole pipeline) and then reads its reply."""
    sent: list[bytes] = []
    original = AbstractConnection.send_packed_command

    def counting(self, command, check_health=True):
        sent.append(b"".join(command) if isinstance(command, (list, tuple)) else command)
        return original(self, command, check_health)

    def start() -> list[bytes]:
        monkeypatch.setattr(AbstractConnection, "send_packed_command", counting)
        return sent

    yield start
    monkeypatch.undo()


def test_hit_is_tracked_in_the_lookup_round_trip(policy_factory, redis_client, count_round_trips):
    policy_factory("default")
    assert cache_service.cache_response(PROMPT, response(cost="0.0042"), model="gpt-x")
    # Warm up: connection open, Lua script loaded, policy snapshot in memory.
    assert cache_service.get_cached_response(PROMPT, model="gpt-x") is not None
    sent = count_round_trips()

    for lookup in (
        lambda: cache_service.get_cached_response(PROMPT, model="gpt-x"),
        lambda: cache_service.get_or_call(PROMPT, lambda: pytest.fail("a hit must not call the LLM"), model="gpt-x"),
    ):
        before = {(shard, entry_id) for shard, entry_id, _ in stream_events(redis_client)}
        sent.clear()
        result = lookup()
        trips = list(sent)
        assert result is not None and getattr(result, "hit", True)
        # Exactly one packet: the lookup script, which also appended the usage event.
        assert len(trips) == 1, trips
        assert trips[0].count(b"EVALSHA") == 1 and b"XADD" not in trips[0]
        events = [fields for shard, entry_id, fields in stream_events(redis_client) if (shard, entry_id) not in before]
        assert [fields[b"r"] for fields in events] == [b"hit"]
        assert parse_header(events[0][b"h"].decode())[:2] == ("default", "gpt-x")


def test_tracking_off_records_nothing_but_still_serves_hits(policy_factory, redis_client, count_round_trips):
    policy_factory("default")
    policy_factory("dark", mode="off")
    flags = CacheFlags.load()
    flags.tracking_enabled = False
    flags.save()
    registry.invalidate()

    assert cache_service.cache_response(PROMPT, response(), model="gpt-x")
    assert cache_service.get_cached_response("never asked", model="gpt-x") is None  # miss
    assert not cache_service.cache_response("cut", {"content": "half an ans", "finish_reason": "length"}, model="gpt-x")
    assert cache_service.get_or_call("bypassed", lambda: "fresh", model="gpt-x", policy="dark").response == "fresh"
    assert cache_service.get_cached_response(PROMPT, model="gpt-x") is not None  # warm
    sent = count_round_trips()
    hit = cache_service.get_cached_response(PROMPT, model="gpt-x")
    trips = len(sent)

    assert hit is not None and hit.content == ANSWER
    assert trips == 1
    assert store.backlog() == 0
    assert usage_tracker.track(UsageEvent(policy="default", result="miss", model="gpt-x")) is False
    assert store.backlog() == 0


def test_step_63_log_line_shape_and_no_prompt_text(policy_factory, step_log):
    policy_factory("default")
    cache_service.cache_response(PROMPT, response(cost="0.0042"), model="gpt-x", latency_ms=900.0)
    step_log.clear()
    result = cache_service.get_or_call(PROMPT, lambda: pytest.fail("hit expected"), model="gpt-x")

    lines = [r.getMessage() for r in step_log if r.getMessage().startswith("RAG STEP 63 ")]
    assert len(lines) == 1
    attrs = step63_attrs(step_log)[0]
    assert {"policy", "model", "cache_key", "tokens_avoided", "cost_avoided", "latency_ms"} <= set(attrs)
    assert attrs["policy"] == "default" and attrs["model"] == "gpt-x"
    assert attrs["cache_key"] == result.key.rsplit(":", 1)[1][:16]
    assert attrs["tokens_avoided"] == 150
    assert Decimal(attrs["cost_avoided"]) == Decimal("0.0042")
    assert 0 <= attrs["latency_ms"] < 900
    assert 0 < attrs["latency_avoided_ms"] <= 900
    for text in (PROMPT, ANSWER, "zucchini", "Zucchini"):
        assert text not in lines[0]


def test_cost_avoided_from_own_cost_else_model_price(policy_factory, step_log, redis_client):
    policy_factory("default")
    ModelPrice.objects.create(model="priced", input_per_1k=Decimal("0.5"), output_per_1k=Decimal("1.5"))
    registry.invalidate()  # the test transaction never commits, so no on_commit announcement

    # 1. The response carries its own cost: that wins over the price list.
    cache_service.cache_response("own cost", response(cost="0.0042"), model="priced")
    # 2. No cost in the response: the price list at store time (120*0.5 + 30*1.5) / 1000.
    cache_service.cache_response("price list", response(), model="priced")
    # 3. No cost and no price when stored; a price added later is used by the hit.
    cache_service.cache_response("priced later", response(), model="late")
    ModelPrice.objects.create(model="late", input_per_1k=Decimal("1"), output_per_1k=Decimal("2"))
    registry.invalidate()
    # 4. No cost and no price at all: nothing can be claimed.
    cache_service.cache_response("unpriced", response(), model="free")
    step_log.clear()
    for question, model in (("own cost", "priced"), ("price list", "priced"), ("priced later", "late"),
                            ("unpriced", "free")):
        assert cache_service.get_cached_response(question, model=model) is not None

    logged = [attrs["cost_avoided"] for attrs in step63_attrs(step_log)]
    assert [Decimal(x) for x in logged[:3]] == [Decimal("0.0042"), Decimal("0.105"), Decimal("0.18")]
    assert logged[3] is None

    result = aggregate()
    assert result.ingested == 8 and result.malformed == 0
    hits = UsageRecord.objects.filter(result="hit")
    assert sorted(h.cost_avoided for h in hits) == [Decimal(0), Decimal("0.0042"), Decimal("0.105"), Decimal("0.18")]
    assert [h.tokens_avoided for h in hits] == [150, 150, 150, 150]


def test_track_records_an_event_of_its_own(policy_factory):
    """usage_tracker.track() is public: an event it is given is recorded, figures included."""
    policy_factory("default")
    assert usage_tracker.track(UsageEvent(policy="default", result="miss", model="gpt-x", key_hash="0" * 16))
    assert usage_tracker.track(UsageEvent(
        policy="default", result="hit", model="gpt-x", key_hash="1" * 16, tokens_avoided=100,
        cost_avoided=Decimal("0.5"), latency_avoided_ms=250.0, usage_known=True))
    assert store.backlog() == 2
    assert aggregate().ingested == 2
    hit = UsageRecord.objects.get(result="hit")
    assert (hit.tokens_avoided, hit.cost_avoided, hit.latency_avoided_ms, hit.key_hash) == (
        100, Decimal("0.5"), 250.0, "1" * 16)
    assert UsageRecord.objects.get(result="miss").key_hash == "0" * 16


# --- Trust (issue 10), item 16: cached input tokens at their own price -----------------------------

PRICES = {"input_per_1k": Decimal("0.0025"), "cached_input_per_1k": Decimal("0.00125"),
          "output_per_1k": Decimal("0.01")}
CACHED_USAGE = {
    "openai": {"prompt_tokens": 10000, "prompt_tokens_details": {"cached_tokens": 9000}, "completion_tokens": 500},
    "anthropic": {"input_tokens": 1000, "cache_read_input_tokens": 9000, "output_tokens": 500},
    "deepseek": {"prompt_tokens": 10000, "prompt_cache_hit_tokens": 9000, "prompt_cache_miss_tokens": 1000,
                 "completion_tokens": 500},
}


def hit_three_times(policy_factory, settings, model: str, usage: dict, **prices) -> float:
    """Store an answer with ``usage`` under ``model`` (priced with ``prices``), hit it three
    times, aggregate; returns what ragcache_cost_avoided_total grew by."""
    settings.RAGCACHE = {**settings.RAGCACHE, "METRICS_MODELS": [model]}
    policy_factory("default")
    ModelPrice.objects.create(model=model, **prices)
    registry.invalidate()
    before = counter_value("ragcache_cost_avoided_total", policy="default", model=model)
    response = {"choices": [{"message": {"role": "assistant", "content": ANSWER}, "finish_reason": "stop"}],
                "usage": usage}
    assert cache_service.cache_response("a long shared context", response, model=model)
    for _ in range(3):
        assert cache_service.get_cached_response("a long shared context", model=model) is not None
    assert aggregate().ingested == 4
    return counter_value("ragcache_cost_avoided_total", policy="default", model=model) - before


@pytest.mark.parametrize("provider", list(CACHED_USAGE))
def test_trust_16_cached_input_tokens_are_priced_at_their_own_rate(policy_factory, settings, provider):
    """10,000 prompt tokens of which 9,000 were read from the provider's prompt cache:
    (1,000 x 0.0025 + 9,000 x 0.00125 + 500 x 0.01) / 1,000 = 0.01875 per hit. 0.1 priced
    every input token at the full rate: 0.03, overstated by 60 %."""
    model = f"gpt-cached-{provider}"
    metric = hit_three_times(policy_factory, settings, model, CACHED_USAGE[provider], **PRICES)
    hits = UsageRecord.objects.filter(result="hit")
    assert [(h.cost_avoided, h.tokens_avoided) for h in hits] == [(Decimal("0.01875"), 10500)] * 3
    rollup = UsageRollup.objects.get(granularity="hour", model=model)
    assert (rollup.hits, rollup.cost_avoided, rollup.tokens_avoided) == (3, Decimal("0.05625"), 31500)
    assert report_json()["totals"]["cost_avoided"] == "0.056250000000"  # exact: the tables' 12 places
    assert f"{metric:.6f}" == "0.056250"


def test_trust_16_without_a_cached_price_cached_tokens_cost_the_input_price(policy_factory, settings):
    metric = hit_three_times(policy_factory, settings, "gpt-no-cached-price", CACHED_USAGE["openai"],
                             input_per_1k=Decimal("0.0025"), output_per_1k=Decimal("0.01"))
    # (10,000 x 0.0025 + 500 x 0.01) / 1,000 = 0.03 per hit.
    assert set(UsageRecord.objects.filter(result="hit").values_list("cost_avoided", flat=True)) == {Decimal("0.03")}
    assert UsageRollup.objects.get(granularity="day").cost_avoided == Decimal("0.09")
    assert f"{metric:.6f}" == "0.090000"
