"""The demo page and its JSON twin go through get_or_call with policy "default"."""
from __future__ import annotations

import json

import pytest

from ragcache.models import CacheFlags, ModelPrice
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
    assert set(first.json()) == {"answer", "hit", "outcome", "reason", "reason_text", "policy", "key_id", "ms",
                                 "tokens_saved", "cost_saved"}
    assert (first.json()["outcome"], second.json()["outcome"]) == ("miss", "hit")
    assert first.json()["policy"] == "default" and first.json()["key_id"] == second.json()["key_id"]


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


def test_a_hit_says_what_it_saved_priced_by_the_demo_models_price(client):
    # The demo app seeds this price after migrate (project/demo/apps.py); here it is made by hand.
    ModelPrice.objects.update_or_create(model="demo-llm", defaults={"input_per_1k": "0.0025",
                                                                    "output_per_1k": "0.01", "currency": "USD"})
    first = client.get("/demo/ask.json", {"q": "What does a hit save?"}).json()
    second = client.get("/demo/ask.json", {"q": "What does a hit save?"}).json()
    assert (first["tokens_saved"], first["cost_saved"]) == (0, None)
    # The fake LLM counts 12 + 2 per question word prompt tokens, 2 per answer word completion tokens.
    prompt, completion = 12 + 2 * 5, len(second["answer"].split()) * 2
    assert second["tokens_saved"] == prompt + completion
    expected = (prompt * 0.0025 + completion * 0.01) / 1000
    amount, currency = second["cost_saved"].split()
    assert currency == "USD" and float(amount) == pytest.approx(expected, abs=1e-6)
    page = client.post("/demo/", {"question": "What does a hit save?"}).content.decode()
    assert f"This hit saved {second['tokens_saved']} tokens and {second['cost_saved']}" in page


@pytest.mark.parametrize(("setup", "reason", "words"), [
    ({"mode": "off"}, "mode_off", "mode off"),
    ({"enabled": False}, "disabled", "disabled"),
    ({"rollout_percent": 0}, "rollout", "rollout"),
    ({"kill_switch": True}, "kill_switch", "kill switch"),
])
def test_a_bypass_says_why(client, policy_factory, setup, reason, words):
    if setup.pop("kill_switch", False):
        flags = CacheFlags.load()
        flags.kill_switch = True
        flags.save()
    policy_factory("default", **setup)
    answer = client.get("/demo/ask.json", {"q": "Why no cache?"}).json()
    assert (answer["outcome"], answer["reason"], answer["hit"]) == ("bypass", reason, False)
    page = client.post("/demo/", {"question": "Why no cache?"}).content.decode()
    assert "bypass: the cache was not used" in page and f"({words}" in page


def test_ask_json_refuses_a_3_mb_body_with_json(client):
    body = json.dumps({"question": "x" * (3 * 1024 * 1024)})
    response = client.post("/demo/ask.json", body, content_type="application/json")
    assert response.status_code == 400 and response["Content-Type"] == "application/json"
    assert "larger than" in response.json()["error"]


def test_ask_json_refuses_a_3_mb_body_over_real_http_chunked_or_not(asgi_server):
    """Under uvicorn (what `make run` serves): with a Content-Length and chunked without one."""
    import httpx

    body = json.dumps({"question": "x" * (3 * 1024 * 1024)}).encode()
    url = asgi_server.url + "/demo/ask.json"
    with httpx.Client(timeout=30) as http:
        sized = http.post(url, content=body, headers={"Content-Type": "application/json"})
        chunked = http.post(url, content=iter([body[:1024], body[1024:]]), headers={"Content-Type": "application/json"})
        put = http.put(url, content=body, headers={"Content-Type": "application/json"})
    assert "chunked" in chunked.request.headers.get("Transfer-Encoding", "")
    for response in (sized, chunked):
        assert response.status_code == 400 and response.headers["Content-Type"] == "application/json"
        assert "larger than" in response.json()["error"]
    assert put.status_code == 405 and put.json()["error"].startswith("Use POST")


@pytest.mark.parametrize("method", ["put", "patch", "delete"])
def test_ask_json_other_methods_get_a_json_405(client, method):
    response = getattr(client, method)("/demo/ask.json", json.dumps({"question": "x"}), content_type="application/json")
    assert response.status_code == 405 and response["Allow"] == "GET, POST"
    assert response.json()["error"].startswith("Use POST")
