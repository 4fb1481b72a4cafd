"""The demo page and its JSON twin go through get_or_call with policy "default"."""
from __future__ import annotations

import json

import pytest

from ragcache.services import cache_service


@pytest.fixture(autouse=True)
def demo(settings, policy_factory):
    settings.DEMO_LLM_DELAY_MS = 0
    policy_factory("default", mode="on", enabled=True, scope="global")


def test_page_renders(client):
    response = client.get("/demo/")
    assert response.status_code == 200
    body = response.content.decode()
    assert "<form" in body and 'name="question"' in body
    assert "cache hit" not in body and "cache miss" not in body


def test_same_question_twice_is_a_miss_then_a_hit(client):
    first = client.post("/demo/", {"question": "What is a cache?"})
    second = client.post("/demo/", {"question": "What is a cache?"})
    assert first.status_code == second.status_code == 200
    assert first.context["result"]["hit"] is False and second.context["result"]["hit"] is True
    assert "cache miss: called the LLM" in first.content.decode()
    assert "cache hit" in second.content.decode()
    assert first.context["result"]["answer"] == second.context["result"]["answer"]
    assert "(demo answer " in second.context["result"]["answer"]
    assert isinstance(second.context["result"]["ms"], float)
    # The page really used the shared service and policy "default".
    assert cache_service.get_cached_response("What is a cache?", model="demo-llm") is not None


@pytest.mark.parametrize("question", ["", "   \n  "])
def test_empty_question_is_a_friendly_error(client, question):
    response = client.post("/demo/", {"question": question})
    assert response.status_code == 200
    assert response.context["error"] == "Type a question."
    assert "Type a question." in response.content.decode()
    assert "result" not in response.context


def test_overlong_question_is_refused(client):
    response = client.post("/demo/", {"question": "x" * 4001})
    assert response.status_code == 200
    assert "limited to 4000 characters" in response.context["error"]


def test_ask_json_post(client):
    ask = lambda: client.post("/demo/ask.json", json.dumps({"question": "Why Redis?"}),  # noqa: E731
                              content_type="application/json")
    first, second = ask(), ask()
    assert first.status_code == second.status_code == 200
    assert (first.json()["hit"], second.json()["hit"]) == (False, True)
    assert first.json()["answer"] == second.json()["answer"]
    assert set(first.json()) == {"answer", "hit", "ms"}


def test_ask_json_get(client):
    assert client.get("/demo/ask.json", {"q": "Why Redis?"}).json()["hit"] is False
    assert client.get("/demo/ask.json", {"q": "Why Redis?"}).json()["hit"] is True


@pytest.mark.parametrize("body", [b"{not json", b'["a list"]', b'"a string"', b"\xff\xfe"],
                         ids=["broken", "list", "string", "not utf-8"])
def test_ask_json_rejects_bad_json(client, body):
    response = client.post("/demo/ask.json", body, content_type="application/json")
    assert response.status_code == 400
    assert "question" in response.json()["error"]


def test_ask_json_empty_question(client):
    response = client.post("/demo/ask.json", json.dumps({"question": " "}), content_type="application/json")
    assert response.status_code == 400
    assert response.json() == {"error": "Type a question."}


def test_demo_keeps_working_with_the_cache_off(client, policy_factory):
    policy_factory("default", mode="off")
    for _ in range(2):
        assert client.get("/demo/ask.json", {"q": "x"}).json()["hit"] is False


@pytest.mark.parametrize("question", [None, 42, ["a"], {"q": "a"}])
def test_ask_json_rejects_a_question_that_is_not_a_string(client, question):
    response = client.post("/demo/ask.json", data=json.dumps({"question": question}), content_type="application/json")
    assert response.status_code == 400
    assert response.json() == {"error": '"question" must be a string.'}
