"""What ``make run`` prints: a Python snippet with the real ``openai`` client, and ``curl``,
against the gateway (tests/test_gateway_demo.py runs the Python one against a live server)."""
from __future__ import annotations

import json
import shlex

MODEL = "demo-llm"
QUESTION = "What does ragcache do?"


def _literal(text: str) -> str:
    """A Python string literal in double quotes (JSON's escapes are Python's too)."""
    return json.dumps(text)


def python_snippet(base_url: str, key: str) -> str:
    return f'''from openai import OpenAI

client = OpenAI(base_url={_literal(base_url)}, api_key={_literal(key)})
messages = [{{"role": "user", "content": {_literal(QUESTION)}}}]
for attempt in (1, 2):  # the first is a MISS (unless cached earlier), the second a HIT
    raw = client.chat.completions.with_raw_response.create(model={_literal(MODEL)}, messages=messages)
    print(raw.headers["x-ragcache"], raw.parse().choices[0].message.content)
stream = client.chat.completions.create(model={_literal(MODEL)}, messages=messages, stream=True)
for chunk in stream:
    print(chunk.choices[0].delta.content or "", end="", flush=True)
print()
'''


def curl_snippet(base_url: str, key: str) -> str:
    body = json.dumps({"model": MODEL, "stream": True, "messages": [{"role": "user", "content": QUESTION}]})
    return (f"curl -sS -N -i {shlex.quote(base_url + '/chat/completions')} \\\n"
            f"  -H {shlex.quote('Authorization: Bearer ' + key)} -H 'Content-Type: application/json' \\\n"
            f"  -d {shlex.quote(body)}\n")
