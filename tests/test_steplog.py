"""Step log lines (59–63, 68): the seed cards' exact shape, JSON attrs, never prompt or
answer text; lookup steps only at DEBUG; a JSON formatter for log pipelines."""
from __future__ import annotations

import io
import json
import logging
import re
import sys
import uuid

import pytest

from ragcache.services import cache_service
from ragcache.steplog import JsonStepFormatter, format_step

PROMPT = "okapi-secret-prompt-5521 what is our refund policy?"
ANSWER = "okapi-secret-answer-8830: refunds within 30 days."
LINE = re.compile(r"^RAG STEP (\d+) \(([A-Za-z0-9_.]+)\): (.+?) \| attrs=(\{.*\})$")
SEED_68 = ("RAG.cache.cacheservice.cache.response.store.in.redis", "CacheService.cache_response Store in Redis")
SEED_63 = ("RAG.cache.usagetracker.track.track.cache.hit", "UsageTracker.track Track cache hit")


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def steps(self, step: int) -> list[logging.LogRecord]:
        return [r for r in self.records if getattr(r, "rag_step", None) == step]


@pytest.fixture
def steps_log():
    """Capture ragcache.steps records at the level the test chooses (the project's
    LOGGING stops 'ragcache' from propagating, so caplog's root handler sees nothing)."""
    logger = logging.getLogger("ragcache.steps")
    handler = Capture()
    old_level = logger.level
    logger.addHandler(handler)

    def at(level: int) -> Capture:
        logger.setLevel(level)
        return handler

    yield at
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def answer() -> dict:
    return {"choices": [{"message": {"content": ANSWER}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 9}, "cost": "0.001"}


@pytest.fixture
def policy(policy_factory) -> str:
    """A policy of the test's own: the step 68 hit rate is per policy and per process."""
    name = f"log{uuid.uuid4().hex[:8]}"
    policy_factory(name)
    return name


def run_miss_store_hit(policy: str) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": PROMPT}]
    assert cache_service.get_or_call(messages, answer, model="gpt-4o-mini", policy=policy).hit is False
    assert cache_service.get_or_call(messages, answer, model="gpt-4o-mini", policy=policy).hit is True


def parse(record: logging.LogRecord) -> tuple[int, str, str, dict]:
    match = LINE.match(record.getMessage())
    assert match, record.getMessage()
    return int(match[1]), match[2], match[3], json.loads(match[4])


def assert_no_text(records: list[logging.LogRecord]) -> None:
    formatter = JsonStepFormatter()
    for record in records:
        for rendered in (record.getMessage(), formatter.format(record)):
            for secret in ("okapi", "refund", "be brief"):
                assert secret not in rendered


@pytest.mark.django_db
def test_step_68_and_63_lines_have_the_seed_shape(policy, steps_log):
    log = steps_log(logging.INFO)
    run_miss_store_hit(policy)

    [store_line] = log.steps(68)
    assert store_line.levelno == logging.INFO
    step, step_id, label, attrs = parse(store_line)
    assert (step, step_id, label) == (68, *SEED_68)
    # The seed's attrs come first, in its order; then ours.
    assert list(attrs)[:3] == ["cache_key", "hit_rate", "expiry_time"]
    assert re.fullmatch(r"[0-9a-f]{16}", attrs["cache_key"])
    assert attrs["hit_rate"] == 0.0  # one lookup so far, a miss
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", attrs["expiry_time"])
    assert attrs["policy"] == policy and attrs["bytes"] > 0
    assert store_line.rag_attrs == attrs and store_line.rag_step_id == SEED_68[0]

    [hit_line] = log.steps(63)
    assert hit_line.levelno == logging.INFO
    step, step_id, label, attrs = parse(hit_line)
    assert (step, step_id, label) == (63, *SEED_63)
    assert attrs["result"] == "hit" and attrs["cache_key"] == store_line.rag_attrs["cache_key"]
    assert attrs["tokens_avoided"] == 16 and attrs["cost_avoided"] == "0.001"

    # At INFO the lookup steps stay quiet.
    assert not log.steps(61) and not log.steps(62)
    assert_no_text(log.records)


@pytest.mark.django_db
def test_lookup_steps_appear_at_debug(policy, steps_log):
    log = steps_log(logging.DEBUG)
    run_miss_store_hit(policy)

    keys = [parse(r)[3]["cache_key"] for r in log.steps(61)]
    assert len(keys) == 2 and keys[0] == keys[1]  # one key per lookup, the same question
    decisions = [parse(r)[3]["hit"] for r in log.steps(62)]
    assert decisions == [False, True]
    for record in log.steps(61) + log.steps(62):
        assert record.levelno == logging.DEBUG
        assert parse(record)[1] == {61: "RAG.cache.keys.cache.key.generate.cache.key", 62: "RAG.cache.cache.hit"}[
            record.rag_step]
    # Miss and store events are appended by the Redis scripts themselves; step 63 logs
    # the hit at INFO and other tracked results (here a refusal) at DEBUG.
    truncated = answer()
    truncated["choices"][0]["finish_reason"] = "length"
    assert cache_service.cache_response(PROMPT + " again", truncated, model="gpt-4o-mini", policy=policy) is False
    assert [(parse(r)[3]["result"], r.levelname) for r in log.steps(63)] == [("hit", "INFO"), ("refused", "DEBUG")]
    assert parse(log.steps(63)[1])[3]["reason"] == "truncated"
    # A bypass is tracked too (0.2 records every bypass, an unknown policy's included).
    assert cache_service.get_or_call(PROMPT, answer, model="gpt-4o-mini", policy="no-such-policy").hit is False
    bypass = log.steps(63)[-1]
    assert (bypass.levelname, parse(bypass)[3]["result"], parse(bypass)[3]["reason"]) == (
        "DEBUG", "bypass", "unknown_policy")
    # At DEBUG, step 59 opens each of the three lookups; step 60 (the plan) also precedes the store.
    assert len(log.steps(59)) == 3 and len(log.steps(60)) == 4
    assert all(r.levelno == logging.DEBUG for r in log.steps(59) + log.steps(60))
    assert_no_text(log.records)


def test_format_step_is_the_seed_shape_with_json_attrs():
    line = format_step(68, {"cache_key": "ab12", "hit_rate": 0.5, "expiry_time": "2030-01-01T00:00:00+00:00"})
    assert line == (
        'RAG STEP 68 (RAG.cache.cacheservice.cache.response.store.in.redis): CacheService.cache_response '
        'Store in Redis | attrs={"cache_key": "ab12", "hit_rate": 0.5, "expiry_time": "2030-01-01T00:00:00+00:00"}'
    )


@pytest.mark.django_db
def test_json_formatter_emits_step_fields(policy, steps_log):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonStepFormatter())
    logger = logging.getLogger("ragcache.steps")
    steps_log(logging.INFO)
    logger.addHandler(handler)
    try:
        run_miss_store_hit(policy)
    finally:
        logger.removeHandler(handler)

    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    by_step = {line["rag_step"]: line for line in lines}
    assert set(by_step) == {63, 68}
    assert by_step[68]["rag_step_id"] == SEED_68[0]
    assert by_step[68]["rag_attrs"]["hit_rate"] == 0.0
    assert by_step[63]["rag_attrs"]["result"] == "hit"
    assert by_step[63]["level"] == "INFO" and by_step[63]["logger"] == "ragcache.steps"
    assert by_step[63]["message"].startswith("RAG STEP 63 (" + SEED_63[0])
    assert "okapi" not in stream.getvalue()


def test_json_formatter_handles_plain_records_and_exceptions():
    formatter = JsonStepFormatter()
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        exc_info = sys.exc_info()
    record = logging.LogRecord("ragcache.store", logging.WARNING, __file__, 1, "Redis %s", ("down",), exc_info)
    data = json.loads(formatter.format(record))
    assert data["message"] == "Redis down" and data["level"] == "WARNING"
    assert "rag_step" not in data and "RuntimeError: boom" in data["exc_info"]
