"""The fake OpenAI upstream (project/demo/fake_upstream.py) speaks OpenAI's wire format: the
raw bytes on a real socket (ASGI, uvicorn), and the same stream under WSGI (Django's test
client), so the tests built on it test against something realistic."""
from __future__ import annotations

import logging
import time
import uuid

import httpx
import orjson
import pytest

from project.demo import fake_upstream

AUTH = {"Authorization": "Bearer sk-test"}


def question(label: str) -> list[dict]:
    return [{"role": "user", "content": f"{label} {uuid.uuid4().hex}"}]


def post(fake_llm, body, headers=AUTH, **kwargs) -> httpx.Response:
    return httpx.post(fake_llm.base_url + "/chat/completions", content=orjson.dumps(body) if not isinstance(
        body, bytes) else body, headers={"Content-Type": "application/json", **headers}, timeout=10, **kwargs)


def sse_lines(raw: bytes) -> list[bytes]:
    assert raw.endswith(b"\n\n")
    return raw[:-2].split(b"\n\n")


def test_json_completion_has_openais_shape(fake_llm):
    messages = question("json")
    response = post(fake_llm, {"model": "gpt-4o-mini", "messages": messages})
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    body = response.json()
    assert list(body) == ["id", "object", "created", "model", "choices", "usage", "service_tier", "system_fingerprint"]
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == "gpt-4o-mini" and isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "stop" and choice["message"]["role"] == "assistant"
    assert choice["message"]["content"].startswith("Answer ")
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens_details"] == {"cached_tokens": 0, "audio_tokens": 0}
    again = post(fake_llm, {"model": "gpt-4o-mini", "messages": messages}).json()
    assert again["choices"] == body["choices"] and again["id"] != body["id"]  # deterministic answer, new id
    assert fake_llm.call_count(messages) == 2 and fake_upstream.fingerprint(messages) in {
        c.fingerprint for c in fake_llm.calls()}


def test_sse_stream_has_openais_framing(fake_llm):
    body = {"model": "demo-llm", "messages": question("sse"), "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", fake_llm.base_url + "/chat/completions", json=body, headers=AUTH) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(response.iter_bytes())
    events = sse_lines(raw)
    assert events[0] == b": keep-alive"  # a comment line
    assert events[-1] == b"data: [DONE]"
    assert all(e.startswith(b"data: {") for e in events[1:-1])
    chunks = [orjson.loads(e[6:]) for e in events[1:-1]]
    assert len({(c["id"], c["created"]) for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    *content, closing, usage = chunks
    assert content[0]["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
    assert all(c["choices"][0]["finish_reason"] is None and c["usage"] is None for c in content)
    assert closing["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == len(content) - 1
    assert b"".join(orjson.dumps(c) for c in chunks)  # compact JSON, as OpenAI sends it
    assert events[1][6:] == orjson.dumps(chunks[0])


def test_without_include_usage_there_is_no_usage_chunk(fake_llm):
    body = {"model": "demo-llm", "messages": question("no usage"), "stream": True}
    raw = httpx.post(fake_llm.base_url + "/chat/completions", json=body, headers=AUTH).content
    chunks = [orjson.loads(e[6:]) for e in sse_lines(raw)[1:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop" and "usage" not in chunks[-1]


def test_tool_call_deltas(fake_llm):
    tools = [{"type": "function", "function": {"name": "get_weather",
                                               "parameters": {"type": "object", "properties": {"city": {}}}}}]
    body = {"model": "demo-llm@tools", "messages": question("tools"), "stream": True, "tools": tools}
    raw = httpx.post(fake_llm.base_url + "/chat/completions", json=body, headers=AUTH).content
    deltas = [orjson.loads(e[6:])["choices"][0] for e in sse_lines(raw)[1:-1]]
    first_call = deltas[1]["delta"]["tool_calls"][0]
    assert first_call["function"] == {"name": "get_weather", "arguments": ""} and first_call["id"].startswith("call_")
    arguments = "".join(d["delta"]["tool_calls"][0]["function"]["arguments"] for d in deltas[2:-1])
    assert list(orjson.loads(arguments)) == ["city"]
    assert deltas[-1]["finish_reason"] == "tool_calls"


def test_reasoning_deltas_and_max_tokens(fake_llm):
    body = {"model": "demo-llm@reasoning", "messages": question("think"), "max_tokens": 3}
    message = post(fake_llm, body).json()["choices"][0]
    assert message["finish_reason"] == "length" and message["message"]["reasoning_content"]
    body["stream"] = True
    raw = post(fake_llm, body).content
    deltas = [orjson.loads(e[6:])["choices"][0]["delta"] for e in sse_lines(raw)[1:-1]]
    assert any("reasoning_content" in d for d in deltas)


@pytest.mark.parametrize("behaviour, finish", [("length", "length"), ("content-filter", "content_filter")])
def test_cut_answers(fake_llm, behaviour, finish):
    body = {"model": f"demo-llm@{behaviour}", "messages": question(behaviour)}
    assert post(fake_llm, body).json()["choices"][0]["finish_reason"] == finish


def test_error_object_mid_stream(fake_llm):
    body = {"model": "demo-llm@error", "messages": question("error"), "stream": True}
    events = sse_lines(post(fake_llm, body).content)
    error = orjson.loads(events[-1][6:])
    assert set(error) == {"error"} and set(error["error"]) == {"message", "type", "param", "code"}
    assert len(events) == 1 + 3 + 1 and b"[DONE]" not in events[-1]


@pytest.mark.parametrize("behaviour, status, kind", [("429", 429, "requests"), ("500", 500, "server_error")])
def test_status_errors_have_openais_error_body(fake_llm, behaviour, status, kind):
    for stream in (False, True):
        response = post(fake_llm, {"model": f"demo-llm@{behaviour}", "messages": question("x"), "stream": stream})
        assert response.status_code == status
        assert response.json()["error"]["type"] == kind
    if status == 429:
        assert response.headers["retry-after"] == "1" and response.json()["error"]["code"] == "rate_limit_exceeded"


def test_once_fails_the_first_call_only(fake_llm):
    messages = question("once")
    codes = [post(fake_llm, {"model": "demo-llm@500,once", "messages": messages}).status_code for _ in range(3)]
    assert codes == [500, 200, 200]


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    ({"messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
    ({"model": "m"}, 400, "messages"),
    ({"model": "m", "messages": []}, 400, "messages"),
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": True}},
     400, "stream_options"),
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 0}, 400, "n"),
    ({"model": "m@delay=abc", "messages": [{"role": "user", "content": "hi"}]}, 400, None),
])
def test_bad_requests_get_openai_shaped_400s(fake_llm, body, status, param):
    response = post(fake_llm, body)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


def test_authentication_and_method(fake_llm, settings):
    body = {"model": "m", "messages": question("auth")}
    assert post(fake_llm, body, headers={}).status_code == 401
    settings.DEMO_LLM_API_KEY = "sk-right"
    assert post(fake_llm, body, headers={"Authorization": "Bearer sk-wrong"}).json()["error"]["code"] == (
        "invalid_api_key")
    assert post(fake_llm, body, headers={"Authorization": "Bearer sk-right"}).status_code == 200
    assert httpx.get(fake_llm.base_url + "/chat/completions").status_code == 405


def test_client_that_goes_away_is_seen(fake_llm):
    messages = question("gone")
    body = {"model": "demo-llm@delay=50", "messages": messages, "stream": True}
    with httpx.stream("POST", fake_llm.base_url + "/chat/completions", json=body, headers=AUTH) as response:
        next(response.iter_bytes())
    (record,) = fake_llm.calls(messages)
    deadline = time.monotonic() + 5
    while record.status != "aborted" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert record.status == "aborted" and record.chunks_sent < 5


def test_logs_name_a_fingerprint_never_the_prompt(fake_llm, caplog):
    secret = f"my card number is 4111-{uuid.uuid4().hex}"
    with caplog.at_level(logging.INFO, logger="project.demo.fake_upstream"):
        post(fake_llm, {"model": "m", "messages": [{"role": "user", "content": secret}]})
    assert fake_upstream.fingerprint([{"role": "user", "content": secret}]) in caplog.text
    assert "4111" not in caplog.text


def test_streams_under_wsgi_too(client, settings):
    """Django's test client is a WSGI-style handler: the stream is a plain generator there."""
    settings.DEMO_LLM_FIRST_CHUNK_MS = settings.DEMO_LLM_CHUNK_DELAY_MS = 0
    response = client.post("/fake-llm/v1/chat/completions", data={"model": "demo-llm", "messages": question("wsgi"),
                                                                  "stream": True},
                           content_type="application/json", headers=AUTH)
    assert response.status_code == 200 and response.streaming
    raw = b"".join(response.streaming_content)
    events = sse_lines(raw)
    assert events[0] == b": keep-alive" and events[-1] == b"data: [DONE]"


def test_the_answer_names_the_model_without_its_behaviours(fake_llm):
    body = post(fake_llm, {"model": "demo-llm@long=3", "messages": question("served")}).json()
    assert body["model"] == "demo-llm"  # as OpenAI answers "gpt-4o-2024-08-06" for "gpt-4o"
    raw = post(fake_llm, {"model": "demo-llm@long=3", "messages": question("served"), "stream": True}).content
    assert b'"model":"demo-llm",' in raw and b"demo-llm@" not in raw


@pytest.mark.django_db(transaction=True)
def test_documents_answers_from_the_demo_documents(fake_llm):
    from project.demo.models import Document

    document = Document.objects.create(title="Bicycle storage", body="Bicycles go in the yard. It is locked at night.")
    asked = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where do bicycles go?"}]
    answer = post(fake_llm, {"model": "demo-llm@documents", "messages": asked}).json()
    text = answer["choices"][0]["message"]["content"]
    assert text.startswith("According to \u201cBicycle storage\u201d") and "Bicycles go in the yard." in text
    assert f"[doc:{document.pk}]" in text and "locked at night" not in text  # the first sentence only
    nothing = post(fake_llm, {"model": "demo-llm@documents", "messages": question("zzyzx qqq")}).json()
    assert nothing["choices"][0]["message"]["content"].startswith("None of the demo documents")
