"""ragcache.integrations.langchain.RagcacheCache: langchain-tests' standard cache suites
(unmodified), then LangChain's own cache path with a local fake chat model, against the
real Redis: miss then hit, tool calls, model configurations, scopes, purge, tokens counted
once, and what the entry holds (JSON, never pickle)."""
from __future__ import annotations

import json
import time
import zlib
from decimal import Decimal
from typing import Any

import orjson
import pytest
from asgiref.sync import async_to_sync
from langchain_core.caches import InMemoryCache
from langchain_core.callbacks import UsageMetadataCallbackHandler
from langchain_core.globals import get_llm_cache, set_llm_cache
from langchain_core.language_models import BaseChatModel
from langchain_core.load import dumps
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.outputs import ChatGeneration, ChatResult, Generation
from langchain_tests.integration_tests import AsyncCacheTestSuite, SyncCacheTestSuite
from pydantic import Field

from ragcache import keys
from ragcache.aggregation import aggregate
from ragcache.exceptions import InvalidRequestError, ScopeRequiredError
from ragcache.integrations import langchain as integration
from ragcache.integrations.langchain import RagcacheCache, model_from_llm_string
from ragcache.models import CachePolicy, ModelPrice, UsageRecord
from ragcache.policies import registry
from ragcache.services import cache_service

USAGE = {"input_tokens": 20, "output_tokens": 9, "total_tokens": 29}


# --- langchain-tests' standard suites, unmodified --------------------------------------------------

class TestRagcacheCacheSync(SyncCacheTestSuite):
    @pytest.fixture
    def cache(self, policy_factory) -> RagcacheCache:
        policy_factory("default", mode="on", enabled=True, scope="global", rollout_percent=100)
        return RagcacheCache()  # empty: every test has its own key prefix (tests/conftest.py)


# aclear() runs the purge in Django's sync thread: that thread's database connection must
# see the policy, so these tests commit their data (transactional_db).
@pytest.mark.django_db(transaction=True)
class TestRagcacheCacheAsync(AsyncCacheTestSuite):
    @pytest.fixture
    def cache(self, policy_factory) -> RagcacheCache:
        policy_factory("default", mode="on", enabled=True, scope="global", rollout_percent=100)
        registry.current()
        return RagcacheCache()


# --- a chat model that counts its calls -----------------------------------------------------------

class CountingChatModel(BaseChatModel):
    """Answers every prompt with ``reply`` (usage included) and records each call."""

    model_name: str = "fake-gpt"
    temperature: float = 0.0
    reply: AIMessage = Field(default_factory=lambda: AIMessage(content="Paris is the capital of France."))
    finish_reason: str = "stop"
    delay: float = 0.0
    calls: list = Field(default_factory=list)

    @property
    def _llm_type(self) -> str:
        return "counting-fake-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "temperature": self.temperature}

    def _answer(self, messages) -> ChatResult:
        self.calls.append(messages)
        if self.delay:
            time.sleep(self.delay)
        message = self.reply.model_copy(update={
            "usage_metadata": dict(USAGE),
            "response_metadata": {"model_name": self.model_name, "finish_reason": self.finish_reason},
        })
        return ChatResult(generations=[ChatGeneration(message=message)],
                          llm_output={"token_usage": {"prompt_tokens": 20, "completion_tokens": 9}})

    def _generate(self, messages, stop=None, run_manager=None, **kwargs) -> ChatResult:
        return self._answer(messages)

    async def _agenerate(self, messages, stop=None, run_manager=None, **kwargs) -> ChatResult:
        return self._answer(messages)


@pytest.fixture
def default_policy(policy_factory):
    policy = policy_factory("default", mode="on", enabled=True, scope="global", ttl_seconds=3600, rollout_percent=100)
    registry.current()
    return policy


@pytest.fixture
def llm_cache(default_policy):
    """``set_llm_cache(RagcacheCache())`` for the test, then LangChain's previous cache."""
    previous = get_llm_cache()
    cache = RagcacheCache()
    set_llm_cache(cache)
    yield cache
    set_llm_cache(previous)


def entries(redis_client, prefix) -> dict[str, dict]:
    """Every entry under the test's prefix, raw: {key: {field: bytes}}."""
    pattern = keys.layout(prefix).entry_pattern()
    return {k.decode(): {f.decode(): v for f, v in redis_client.hgetall(k).items()}
            for k in redis_client.scan_iter(match=pattern, count=1000)}


def body_of(fields: dict) -> dict:
    meta = orjson.loads(fields["m"])
    raw = zlib.decompress(fields["b"]) if meta.get("z") == 1 else fields["b"]
    return orjson.loads(raw)


# --- LangChain's cache path ---------------------------------------------------------------------

def test_chat_model_miss_then_hit(llm_cache, redis_client, ragcache_prefix):
    model = CountingChatModel()
    first = model.invoke("What is the capital of France?")
    second = model.invoke("What is the capital of France?")
    assert len(model.calls) == 1
    assert first.content == second.content == "Paris is the capital of France."
    assert "ragcache" not in first.response_metadata
    assert second.response_metadata["ragcache"] == {"cache_hit": True, "usage_avoided": USAGE}
    model.invoke("And of Italy?")  # another prompt is a miss
    assert len(model.calls) == 2
    assert len(entries(redis_client, ragcache_prefix)) == 2


def test_async_chat_model_uses_the_async_api_only(llm_cache, monkeypatch):
    def no_sync(*args, **kwargs):
        raise AssertionError("the async path must not use the sync service")

    monkeypatch.setattr(cache_service, "get_cached_response", no_sync)
    monkeypatch.setattr(cache_service, "cache_response", no_sync)
    model = CountingChatModel()

    async def scenario():
        first = await model.ainvoke("What is the capital of France?")
        second = await model.ainvoke("What is the capital of France?")
        return first, second

    first, second = async_to_sync(scenario)()
    assert len(model.calls) == 1
    assert first.content == second.content
    assert second.response_metadata["ragcache"]["cache_hit"] is True


def test_tool_call_only_message_is_cached(llm_cache, redis_client, ragcache_prefix):
    reply = AIMessage(content="", tool_calls=[{"name": "get_weather", "args": {"city": "Paris"}, "id": "call_1"}])
    model = CountingChatModel(reply=reply, finish_reason="tool_calls")
    first = model.invoke("Weather in Paris?")
    second = model.invoke("Weather in Paris?")
    assert len(model.calls) == 1
    assert second.content == ""
    assert second.tool_calls == first.tool_calls == [
        {"name": "get_weather", "args": {"city": "Paris"}, "id": "call_1", "type": "tool_call"}]
    [fields] = entries(redis_client, ragcache_prefix).values()
    choice = body_of(fields)["choices"][0]
    assert choice["message"]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert choice["finish_reason"] == "tool_calls"


def test_empty_and_truncated_generations_are_not_cached(llm_cache, redis_client, ragcache_prefix):
    empty = CountingChatModel(reply=AIMessage(content=""))
    empty.invoke("Say nothing")
    empty.invoke("Say nothing")
    assert len(empty.calls) == 2
    truncated = CountingChatModel(finish_reason="length")
    truncated.invoke("Write a long essay")
    truncated.invoke("Write a long essay")
    assert len(truncated.calls) == 2
    assert entries(redis_client, ragcache_prefix) == {}


def test_model_configurations_never_share(llm_cache):
    cold, warm, other = (CountingChatModel(temperature=0.0), CountingChatModel(temperature=0.7),
                         CountingChatModel(model_name="other-model"))
    for model in (cold, warm, other, cold, warm, other):
        model.invoke("Tell me a joke")
    assert (len(cold.calls), len(warm.calls), len(other.calls)) == (1, 1, 1)
    # Call parameters are part of the configuration too.
    cold.invoke("Tell me a joke", stop=["\n"])
    assert len(cold.calls) == 2


def test_scopes_are_isolated(policy_factory):
    policy_factory("per-user", scope="user", ttl_seconds=3600)
    alice = CountingChatModel(cache=RagcacheCache("per-user", scope="alice"))
    bob = CountingChatModel(cache=RagcacheCache("per-user", scope="bob"))
    alice.invoke("My account balance?")
    bob.invoke("My account balance?")
    alice.invoke("My account balance?")
    assert (len(alice.calls), len(bob.calls)) == (1, 1)
    with pytest.raises(ScopeRequiredError):
        CountingChatModel(cache=RagcacheCache("per-user")).invoke("My account balance?")


def test_clear_purges_the_policy_and_never_flushes(default_policy, policy_factory, redis_client, ragcache_prefix):
    policy_factory("other", ttl_seconds=3600)
    cache, other = RagcacheCache(), RagcacheCache("other")
    generation = Generation(text="stored")
    cache.update("prompt", "llm", [generation])
    other.update("prompt", "llm", [generation])
    assert cache_service.cache_response("direct", "a direct caller's answer", model="m") is True
    sentinel = f"{ragcache_prefix}:not-a-cache-key"
    redis_client.set(sentinel, "kept")
    stored = set(entries(redis_client, ragcache_prefix))
    before = CachePolicy.objects.get(name="default").generation

    cache.clear()

    assert CachePolicy.objects.get(name="default").generation > before
    assert cache.lookup("prompt", "llm") is None
    # The whole policy: other callers of "default" lose their answers too; "other" keeps its own.
    assert cache_service.get_cached_response("direct", model="m") is None
    assert other.lookup("prompt", "llm") == [generation]
    # Nothing was deleted: old entries are unreachable and expire on their TTL.
    assert stored <= set(entries(redis_client, ragcache_prefix))
    assert redis_client.get(sentinel) == b"kept"
    # The policy caches again, under its new generation.
    cache.update("prompt", "llm", [generation])
    assert cache.lookup("prompt", "llm") == [generation]


def test_clear_of_an_unknown_policy_is_a_clear_error(db):
    with pytest.raises(InvalidRequestError, match="no cache policy named 'nope'"):
        RagcacheCache("nope").clear()
    # An unknown policy otherwise bypasses the cache: no error, nothing stored.
    cache = RagcacheCache("nope")
    cache.update("p", "l", [Generation(text="x")])
    assert cache.lookup("p", "l") is None


@pytest.mark.django_db(transaction=True)
async def test_aclear_purges(default_policy):
    cache = RagcacheCache()
    await cache.aupdate("prompt", "llm", [Generation(text="stored")])
    assert await cache.alookup("prompt", "llm") == [Generation(text="stored")]
    await cache.aclear()
    assert await cache.alookup("prompt", "llm") is None


# --- tokens: counted once -----------------------------------------------------------------------

def test_a_hit_does_not_count_tokens_again_in_langchain_callbacks(llm_cache):
    model = CountingChatModel()
    callback = UsageMetadataCallbackHandler()
    for _ in range(3):
        model.invoke("What is the capital of France?", config={"callbacks": [callback]})
    assert len(model.calls) == 1
    usage = callback.usage_metadata["fake-gpt"]
    assert (usage["input_tokens"], usage["output_tokens"], usage["total_tokens"]) == (20, 9, 29)


def test_langchain_itself_counts_cached_tokens_again(db):
    """The behaviour RagcacheCache corrects: with LangChain's InMemoryCache, each hit's
    usage_metadata is counted as if the tokens were spent again (only total_cost is zeroed)."""
    model = CountingChatModel(cache=InMemoryCache())
    callback = UsageMetadataCallbackHandler()
    for _ in range(3):
        model.invoke("What is the capital of France?", config={"callbacks": [callback]})
    assert len(model.calls) == 1
    assert callback.usage_metadata["fake-gpt"]["total_tokens"] == 3 * 29


def test_hits_count_the_original_tokens_once_as_avoided(llm_cache, db):
    ModelPrice.objects.create(model="fake-gpt", input_per_1k=Decimal("1"), output_per_1k=Decimal("2"))
    registry.invalidate()
    model = CountingChatModel(delay=0.05)
    for _ in range(3):
        model.invoke("What is the capital of France?")
    assert len(model.calls) == 1
    aggregate()
    hits = list(UsageRecord.objects.filter(result="hit"))
    assert len(hits) == 2
    for record in hits:
        assert record.model == "fake-gpt"
        assert record.tokens_avoided == 29
        assert record.cost_avoided == Decimal("0.038")  # (20 * 1 + 9 * 2) / 1000
        assert record.latency_avoided_ms >= 50  # the call's latency, measured from the miss
    assert UsageRecord.objects.filter(result="store").count() == 1
    assert UsageRecord.objects.filter(result="miss").count() == 1


def test_usage_of_several_generations_is_the_calls_not_their_sum():
    usage = {**USAGE, "input_token_details": {"cache_read": 5}}
    generations = [ChatGeneration(message=AIMessage(content=text, usage_metadata=usage)) for text in ("a", "b")]
    response = integration.to_response(generations, "m")
    assert response["usage"] == {"prompt_tokens": 20, "completion_tokens": 9,
                                 "prompt_tokens_details": {"cached_tokens": 5}}
    # Without usage_metadata, a provider's own token_usage is used as it is.
    plain = [Generation(text="a", generation_info={"token_usage": {"prompt_tokens": 3, "completion_tokens": 4}})]
    assert integration.to_response(plain, "m")["usage"] == {"prompt_tokens": 3, "completion_tokens": 4}
    assert "usage" not in integration.to_response([Generation(text="a")], "m")


def test_a_hit_reports_no_usage_anywhere():
    message = AIMessage(content="hi", usage_metadata=USAGE,
                        response_metadata={"model_name": "m", "token_usage": {"total_tokens": 29}, "usage": {"x": 1}})
    stored = ChatGeneration(message=message, generation_info={"finish_reason": "stop", "usage": {"x": 1}})
    [hit] = integration.from_response(integration.to_response([stored], "m"))
    assert hit.message.usage_metadata == {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}
    assert hit.message.response_metadata == {"model_name": "m",
                                             "ragcache": {"cache_hit": True, "usage_avoided": USAGE}}
    assert hit.generation_info == {"finish_reason": "stop"}
    assert hit.text == "hi" and hit.message.content == "hi"


# --- entries: LangChain's JSON, never pickle -------------------------------------------------------

def test_entries_are_json_never_pickle(llm_cache, redis_client, ragcache_prefix):
    model = CountingChatModel()
    model.invoke("What is the capital of France?")
    [(key, fields)] = entries(redis_client, ragcache_prefix).items()
    assert "France" not in key
    for value in fields.values():
        assert not value.startswith(b"\x80")  # a pickle stream's PROTO opcode
    body = body_of(fields)
    assert body["object"] == "langchain.generations" and body["model"] == "fake-gpt"
    revived = json.loads(body["langchain"])
    assert revived[0]["id"] == ["langchain", "schema", "output", "ChatGeneration"]
    assert orjson.loads(fields["m"])["pt"] == 20


def test_only_allowed_classes_are_revived(default_policy):
    cache = RagcacheCache()
    request = cache._request("prompt", "llm")
    # Planted under the same key by another caller: a message class a cache never holds.
    planted = {"object": "langchain.generations", "choices": [{"message": {"content": "x"}}],
               "langchain": dumps([ChatGeneration(message=HumanMessage(content="x"))])}
    assert cache_service.cache_response(response=planted, **request) is True
    assert cache.lookup("prompt", "llm") is None
    # An answer that is not a LangChain entry at all is a miss too.
    assert cache_service.cache_response(response="plain text", **cache._request("p2", "llm")) is True
    assert cache.lookup("p2", "llm") is None


def test_secrets_are_never_read_from_the_environment(default_policy, monkeypatch):
    monkeypatch.setenv("RAGCACHE_LC_SECRET", "s3cret-value")
    cache = RagcacheCache()
    text = json.dumps([{"lc": 1, "type": "constructor", "id": ["langchain", "schema", "output", "Generation"],
                        "kwargs": {"text": "hi", "generation_info": {
                            "k": {"lc": 1, "type": "secret", "id": ["RAGCACHE_LC_SECRET"]}}}}])
    planted = {"object": "langchain.generations", "choices": [{"message": {"content": "hi"}}], "langchain": text}
    assert cache_service.cache_response(response=planted, **cache._request("prompt", "llm")) is True
    [generation] = cache.lookup("prompt", "llm")
    assert generation.generation_info == {"k": None}


# --- keys and bad input ----------------------------------------------------------------------------

def test_model_from_llm_string():
    params = str(sorted({"_type": "fake", "model_name": "gpt-4o-mini", "temperature": 0.2, "stop": None}.items()))
    assert model_from_llm_string(params) == "gpt-4o-mini"
    serialized = json.dumps({"lc": 1, "type": "constructor", "id": ["langchain", "chat_models", "openai", "ChatOpenAI"],
                             "kwargs": {"model_name": "gpt-4o", "temperature": 0.0}}, sort_keys=True)
    assert model_from_llm_string(serialized + "---[('stop', None)]") == "gpt-4o"
    assert model_from_llm_string(serialized + "---[('model', 'o3'), ('stop', None)]") == "o3"  # the call wins
    assert model_from_llm_string("Sample LLM string configuration.") == "langchain"
    assert model_from_llm_string("[('model', 'bad\x1fname')]") == "langchain"
    assert model_from_llm_string(f"[('model', '{'x' * 200}')]") == "langchain"


def test_the_key_covers_prompt_and_llm_string(default_policy):
    cache = RagcacheCache()
    cache.update("prompt", "config A", [Generation(text="A")])
    assert cache.lookup("prompt", "config A") == [Generation(text="A")]
    assert cache.lookup("prompt", "config B") is None
    assert cache.lookup("prompt!", "config A") is None
    cache.update("", "config A", [Generation(text="for an empty prompt")])  # an empty prompt is a prompt
    assert cache.lookup("", "config A") == [Generation(text="for an empty prompt")]


def test_bad_input_is_a_clear_error(default_policy):
    with pytest.raises(InvalidRequestError):
        RagcacheCache(policy="")
    with pytest.raises(InvalidRequestError):
        RagcacheCache(scope=True)
    cache = RagcacheCache()
    with pytest.raises(InvalidRequestError):
        cache.update("prompt", "llm", ["not a generation"])
    with pytest.raises(InvalidRequestError):
        cache.lookup(None, "llm")


def test_redis_trouble_is_never_raised(policy_factory, private_redis):
    policy_factory("default", ttl_seconds=3600)
    registry.current()
    model = CountingChatModel(cache=RagcacheCache())
    model.invoke("hello")
    assert model.invoke("hello").response_metadata["ragcache"]["cache_hit"] is True
    private_redis.stop()
    for _ in range(2):
        assert model.invoke("hello").content == "Paris is the capital of France."
    assert len(model.calls) == 3
