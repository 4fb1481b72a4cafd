"""The demo around the gateway: its key (kept under .run/), its seeded price, its page, and the
snippets ``make run`` prints, run as printed against the live gateway."""
from __future__ import annotations

import io
import json
import re
import shutil
import stat
import subprocess
import sys

import httpx
import pytest
from django.core.management import call_command

from project.demo.apps import DEMO_MODEL
from project.demo.gateway_key import ensure_demo_key
from project.demo.models import Document
from ragcache.gateway import auth
from ragcache.models import GatewayKey, ModelPrice
from ragcache.policies import registry

from .gateway_helpers import data_events


@pytest.fixture
def key_file(tmp_path, settings):
    settings.DEMO_GATEWAY_KEY_FILE = tmp_path / "run" / "demo_gateway_key"
    return settings.DEMO_GATEWAY_KEY_FILE


def test_migrate_seeds_a_price_for_the_demo_models(db, settings):
    for model in (DEMO_MODEL, settings.DEMO_GATEWAY_MODEL):  # the form's and the page script's
        price = ModelPrice.objects.get(model=model)
        assert price.input_per_1k > 0 and price.output_per_1k > 0 and price.currency == "USD"


def test_the_demo_key_is_made_once_and_kept_private(db, key_file):
    key, row = ensure_demo_key()
    assert key.startswith("rck_") and key_file.read_text().strip() == key
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    again, same = ensure_demo_key()
    assert again == key and same.pk == row.pk and GatewayKey.objects.count() == 1
    assert row.key_hash == GatewayKey.hash_key(key) and row.is_active
    assert set(row.allowed_cache_controls) == {"no-cache", "no-store", "max-age", "policy", "sources"}


def test_a_fresh_database_gets_the_keys_file_key(db, key_file):
    key, row = ensure_demo_key()
    row.delete()
    again, made = ensure_demo_key()
    assert again == key and made.key_hash == GatewayKey.hash_key(key)
    made.key_hash = "0" * 64
    made.save()
    assert ensure_demo_key()[1].key_hash == GatewayKey.hash_key(key)  # re-keyed to the file's key


def test_a_deactivated_demo_key_stays_deactivated(db, key_file):
    _, row = ensure_demo_key()
    row.is_active = False
    row.save()
    assert ensure_demo_key()[1].is_active is False
    err = io.StringIO()
    call_command("demo_gateway_key", stdout=io.StringIO(), stderr=err)
    assert "deactivated" in err.getvalue()


def test_the_demo_page_hands_its_script_the_gateway_and_a_working_key(client, db, key_file):
    page = client.get("/demo/").content.decode()
    config = json.loads(re.search(r'<script id="gateway-config" type="application/json">(.*?)</script>', page).group(1))
    assert config["endpoint"] == "/v1/chat/completions" and config["model"] == "demo-llm@documents"
    assert config["key"] == key_file.read_text().strip() and config["active"] is True
    assert "getReader()" in page and "text/event-stream" not in page  # it parses SSE itself
    registry.invalidate()
    auth.forget_last_used()
    response = client.post("/v1/chat/completions", data="{", content_type="application/json",
                           HTTP_AUTHORIZATION=f"Bearer {config['key']}")
    assert response.status_code == 400  # authenticated; the body was broken on purpose


def test_the_printed_python_snippet_runs_against_the_live_gateway(gateway, key_file):
    out = io.StringIO()
    call_command("demo_gateway_key", "--snippet", gateway.base_url + "/", stdout=out)
    printed = out.getvalue()
    code = printed.split("# --- python ---\n", 1)[1].split("# --- end python ---", 1)[0]
    assert f'base_url="{gateway.base_url}"' in code and key_file.read_text().strip() in code
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    first, second, streamed = result.stdout.rstrip("\n").split("\n")
    assert first.startswith("MISS Answer ") and second == "HIT" + first[len("MISS"):]
    assert streamed == first[len("MISS "):]  # the streamed answer has the same text


def test_the_printed_curl_snippet_streams_from_the_live_gateway(gateway, key_file):
    out = io.StringIO()
    call_command("demo_gateway_key", "--snippet", gateway.base_url, stdout=out)
    command = out.getvalue().split("curl:\n", 1)[1]
    assert shutil.which("curl"), "curl is needed to run the printed curl snippet"
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "HTTP/1.1 200" in result.stdout and "x-ragcache: miss" in result.stdout.lower()
    assert result.stdout.rstrip().endswith("data: [DONE]")


def _streamed_text(response) -> str:
    chunks = [json.loads(data) for data in data_events(response.content) if data != b"[DONE]"]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


def test_the_pages_streams_quote_the_documents_and_an_edit_makes_them_stale(gateway, settings):
    """What the page's script does: ask /demo/sources.json, then stream from the gateway with
    the page's model and X-Ragcache-Sources. The answer quotes the documents as they are."""
    key = gateway.key(controls=("sources",))
    document = Document.objects.create(title="Parking rules", body="Parking is free after six. Ask at the desk.")
    question = "Where is parking free?"
    found = httpx.get(gateway.server.url + "/demo/sources.json", params={"q": question}).json()
    assert f"doc:{document.pk}" in found["sources"]
    headers = {"X-Ragcache-Sources": ",".join(found["sources"])}
    messages = [{"role": "user", "content": question}]

    def ask():
        response = gateway.ask(key, messages, stream=True, model=settings.DEMO_GATEWAY_MODEL, headers=headers)
        assert response.status_code == 200
        return response.headers["x-ragcache"], response.headers.get("x-ragcache-reason", ""), _streamed_text(response)

    first = ask()
    assert first[0] == "MISS" and f"[doc:{document.pk}]: Parking is free after six." in first[2]
    assert ask() == ("HIT", "", first[2])
    document.body = "Parking costs 2 EUR an hour. Ask at the desk."
    document.save()  # the demo tracks Document: doc:<pk> is invalidated on commit
    outcome, reason, text = ask()
    assert (outcome, reason) == ("MISS", "stale_source")
    assert f"[doc:{document.pk}]: Parking costs 2 EUR an hour." in text and "free after six" not in text
