"""The admin and the demo in a real headless Chromium (Debian's ``chromium``, driven by
Playwright; ``.ci/run`` installs it; never a downloaded browser).

One uvicorn server (tests/upstream.py's ``LiveASGIServer``) serves the project as ``make
run`` does: the ASGI app with the admin's static files, the gateway at ``/v1/`` and the
fake LLM at ``/fake-llm/v1/`` (the gateway's upstream here). Each page is saved as a
screenshot under ``.run/screenshots/`` (git-ignored) for a person to look at.

Playwright's sync API keeps an event loop running in the test's thread, and Django refuses
ORM calls from a thread with a running loop; the tests' own ORM calls (fixtures, checks)
are plain sync code, so ``DJANGO_ALLOW_ASYNC_UNSAFE`` is set while the browser runs (the
gateway's own tests run without it).
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from django.utils import timezone

from .upstream import LiveASGIServer

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = Path(__file__).resolve().parent.parent / ".run" / "screenshots"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WIDTH = 1400
PASSWORD = "browser-test-password"


def _close_connections(**kwargs) -> None:
    from django.db import connections

    connections.close_all()


@pytest.fixture(scope="module")
def server():
    """The project under uvicorn with the admin's static files (Django's own handler). Its
    threads close their database connections after each request (CONN_MAX_AGE would keep
    them open past the test database's teardown, which PostgreSQL then refuses)."""
    from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler
    from django.core.asgi import get_asgi_application
    from django.core.signals import request_finished

    request_finished.connect(_close_connections, dispatch_uid="test_browser.close_connections")
    live = LiveASGIServer(ASGIStaticFilesHandler(get_asgi_application())).start()
    yield live
    live.stop()
    request_finished.disconnect(dispatch_uid="test_browser.close_connections")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "chromium is not installed (.ci/run installs it: apt-get install chromium)"
    unsafe = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    profile = tempfile.mkdtemp(prefix="ragcache-chromium-")
    playwright = sync_playwright().start()
    context = playwright.chromium.launch_persistent_context(
        profile, executable_path=CHROMIUM, headless=True, args=FLAGS,
        viewport={"width": WIDTH, "height": 900}, locale="en-US", timezone_id="UTC")
    context.set_default_timeout(15_000)
    SHOTS.mkdir(parents=True, exist_ok=True)
    yield context
    context.close()
    playwright.stop()
    shutil.rmtree(profile, ignore_errors=True)
    if unsafe is None:
        os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
    else:
        os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = unsafe


@pytest.fixture
def site(server, settings, tmp_path):
    """Settings for the live server (same process): the gateway's upstream is the fake LLM
    on that server, which streams with small delays; the demo key lives in tmp_path."""
    from project.demo import fake_upstream
    from ragcache.policies import registry

    settings.RAGCACHE = {**settings.RAGCACHE, "UPSTREAM": {"BASE_URL": server.url + "/fake-llm/v1",
                                                           "API_KEY": "sk-browser-test", "TIMEOUT": 15}}
    settings.DEMO_LLM_API_KEY = None
    settings.DEMO_LLM_FIRST_CHUNK_MS = 150
    settings.DEMO_LLM_CHUNK_DELAY_MS = 10
    settings.DEMO_GATEWAY_KEY_FILE = tmp_path / "demo_gateway_key"
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    fake_upstream.reset()
    registry.invalidate()
    yield server
    fake_upstream.reset()


@pytest.fixture
def page(browser, site):
    tab = browser.new_page()
    yield tab
    tab.close()


@pytest.fixture
def admin_page(page, site):
    """A tab logged in to the admin as a superuser, through the login form."""
    from django.contrib.auth.models import User

    User.objects.create_superuser("browser-admin", password=PASSWORD)
    page.goto(site.url + "/admin/login/?next=/admin/")
    page.fill("#id_username", "browser-admin")
    page.fill("#id_password", PASSWORD)
    submit(page, "input[type=submit]")
    page.wait_for_url(site.url + "/admin/")
    return page


def shot(page, name: str) -> None:
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def fits(page) -> bool:
    """No sideways scrolling at 1,400 px: neither the page nor the list's own scroll box."""
    return page.evaluate("""(width) => document.documentElement.scrollWidth <= width &&
        [...document.querySelectorAll('#changelist .results, #changelist-form .results')]
            .every((box) => box.scrollWidth <= box.clientWidth + 1)""", WIDTH)


def submit(page, selector: str) -> None:
    """Click a submit button and wait for the page it leads to."""
    with page.expect_navigation():
        page.click(selector)


def messages(page) -> str:
    return " ".join(page.locator("ul.messagelist li").all_inner_texts())


# --- admin: policies ---------------------------------------------------------------------------

def test_admin_policy_ttl_edit_and_purge(admin_page, site):
    from ragcache.models import CachePolicy
    from ragcache.services import cache_service

    page = admin_page
    assert cache_service.cache_response("What is ragcache?", "A cache.", model="demo-llm")
    page.goto(site.url + "/admin/ragcache/cachepolicy/")
    assert page.locator("#result_list").is_visible()
    assert page.locator("select[name=form-0-mode] option").all_inner_texts() == ["off", "shadow", "read_only", "on"]
    shot(page, "admin-policy-list")
    assert fits(page), "the policy list scrolls sideways at 1,400 px"

    page.click("#result_list a:text-is('default')")
    assert page.locator("#id_ttl_seconds_words").inner_text() == "= 1 d"
    assert "1 entry" in page.locator(".field-stored_entries .readonly").inner_text()
    assert page.locator("a.deletelink").count() == 0  # default keeps no delete link
    page.fill("#id_ttl_seconds", "3600")
    submit(page, "input[name=_continue]")
    assert "went down from 1 d to 1 h" in messages(page)
    assert page.locator("#id_ttl_seconds_words").inner_text() == "= 1 h"
    shot(page, "admin-policy-ttl-lowered")

    before = CachePolicy.objects.get(name="default").generation
    submit(page, "#ragcache-purge")
    after = CachePolicy.objects.get(name="default").generation
    assert after > before
    text = messages(page)
    assert f'Purged 1 policy: "default" (generation {before} \u2192 {after})' in text
    assert str(after) in page.locator(".field-generation .readonly").inner_text()
    assert page.locator(".field-stored_entries .readonly").inner_text().startswith("no entries")
    shot(page, "admin-policy-purged")


def test_admin_default_cannot_be_deleted_and_says_why(admin_page, site):
    from ragcache.models import CachePolicy

    page = admin_page
    default = CachePolicy.objects.get(name="default")
    page.goto(f"{site.url}/admin/ragcache/cachepolicy/{default.pk}/delete/")
    assert "cannot be deleted" in messages(page)
    assert page.url.endswith(f"/cachepolicy/{default.pk}/change/")
    shot(page, "admin-default-kept")


# --- admin: explain ---------------------------------------------------------------------------

def test_admin_explain_then_delete_the_entry(admin_page, site):
    from ragcache.services import cache_service

    page = admin_page
    answer = {"choices": [{"message": {"role": "assistant", "content": "Redis."}, "finish_reason": "stop"}],
              "usage": {"prompt_tokens": 30, "completion_tokens": 5}}
    assert cache_service.cache_response("Where are entries kept?", answer, model="demo-llm",
                                        params={"temperature": 0}, sources=["doc:1", "doc:2"])
    cache_service.invalidate_sources(["doc:2"])
    page.goto(site.url + "/admin/ragcache/cachepolicy/")
    page.click(".object-tools a:text-is('Explain a lookup')")
    page.fill("#id_model", "demo-llm")
    page.fill("#id_question", "Where are entries kept?")
    page.fill("#id_params", '{"temperature": 0}')
    page.fill("#id_sources", "doc:1\ndoc:2")
    submit(page, "input[name=_explain]")
    assert "The cache is used" in page.locator("#explain-decision").inner_text()
    # doc:2 changed after the answer was stored: the lookup would miss, and the page says why.
    assert page.locator("#explain-verdict strong").inner_text().lower() == "miss"
    assert "invalidated" in page.locator("#explain-verdict").inner_text()
    entry = page.locator("#explain-entry").inner_text()
    assert "doc:1: intact" in entry and "doc:2: invalidated" in entry and "35" in entry
    assert re.search(r"Time left\s+(23 h|1 d)", entry), entry
    assert '{"temperature":0}' in page.locator("#explain-recipe").inner_text()
    shot(page, "admin-explain-entry")

    submit(page, "#explain-delete")
    assert "Deleted the entry with key id" in messages(page)
    assert page.locator("#explain-no-entry").is_visible()
    assert cache_service.get_cached_response("Where are entries kept?", model="demo-llm",
                                             params={"temperature": 0}) is None
    shot(page, "admin-explain-deleted")


# --- admin: report -------------------------------------------------------------------------------

def test_admin_report_chart_and_aggregate_now(admin_page, site):
    from ragcache.models import ModelPrice, UsageRollup
    from ragcache.services import cache_service

    page = admin_page
    ModelPrice.objects.update_or_create(model="demo-llm", defaults={"input_per_1k": "0.0025",
                                                                    "output_per_1k": "0.01", "currency": "USD"})
    hour = timezone.now().replace(minute=0, second=0, microsecond=0)
    for back, hits in ((9, 2), (8, 5), (7, 6), (3, 7), (2, 9)):  # quiet from 6 h to 4 h ago
        UsageRollup.objects.create(period_start=hour - timedelta(hours=back), granularity="hour", policy="default",
                                   model="demo-llm", lookups=10, hits=hits, misses=10 - hits,
                                   tokens_avoided=hits * 120, cost_avoided=Decimal("0.0011") * hits,
                                   latency_avoided_ms=hits * 800.0)
    for _ in range(2):
        cache_service.get_or_call("Is the report live?", lambda: "Yes.", model="demo-llm")
    page.goto(site.url + "/admin/ragcache/usagerollup/report/")
    day = page.locator("svg.ragcache-chart").first
    assert day.locator("polyline.hit-rate").count() == 2  # two runs, a gap between them
    box = day.bounding_box()
    assert box and box["width"] > 600 and box["height"] > 150
    assert "USD" in page.locator("tr.total").first.inner_text()
    shot(page, "admin-report")
    assert fits(page)

    submit(page, "#ragcache-aggregate")
    assert "Aggregated 3 events" in messages(page)
    # The lookups just aggregated are this hour's: a third run, after a quiet hour.
    assert page.locator("svg.ragcache-chart").first.locator("polyline.hit-rate").count() == 3
    shot(page, "admin-report-aggregated")

    from project.demo.gateway_key import ensure_demo_key

    ensure_demo_key()  # a row for the gateway key list (every cache control allowed: its longest)
    for name in ("usagerecord", "usagerollup", "modelprice", "gatewaykey", "cacheflags"):
        page.goto(f"{site.url}/admin/ragcache/{name}/")
        shot(page, f"admin-list-{name}")
        assert fits(page), f"the {name} list scrolls sideways at 1,400 px"
    page.goto(site.url + "/admin/ragcache/usagerecord/")
    assert page.locator("#changelist-filter").get_by_text("By reason").count() == 1


def test_admin_report_fits_1280_px(admin_page, site):
    """The report was 1,493 px wide in a 1,280 px window (14 unwrapped columns). Now its
    tables fit beside the sidebar for long real model names, six-digit counts and costs in
    two currencies; a 128-character model name wraps, and anything wider still scrolls the
    table's own box, never the page."""
    from ragcache.models import ModelPrice, UsageRollup

    page = admin_page
    page.set_viewport_size({"width": 1280, "height": 900})
    ModelPrice.objects.create(model="gpt-4o-mini-2024-07-18", input_per_1k="0.00015", output_per_1k="0.0006")
    ModelPrice.objects.create(model="mistral-large-latest", input_per_1k="0.002", output_per_1k="0.006",
                              currency="EUR")
    hour = timezone.now().replace(minute=0, second=0, microsecond=0)

    def rollup(policy: str, model: str, n: int) -> None:
        UsageRollup.objects.create(period_start=hour - timedelta(hours=2), granularity="hour", policy=policy,
                                   model=model, lookups=n, hits=n // 2, misses=n // 3, shadow_hits=n // 10,
                                   stale_sources=n // 20, stores=n // 3, refusals=n // 50, bypasses=n // 7,
                                   tokens_avoided=n * 200, cost_avoided=Decimal("0.0011") * n,
                                   latency_avoided_ms=n * 800.0)

    rollup("support-tickets", "gpt-4o-mini-2024-07-18", 48_213)
    rollup("default", "mistral-large-latest", 9_876)
    rollup("faq", "claude-3-5-sonnet-20241022", 512)
    widths = """() => [document.documentElement.scrollWidth,
        ...[...document.querySelectorAll('.ragcache-table')].map((box) => box.scrollWidth - box.clientWidth)]"""
    page.goto(site.url + "/admin/ragcache/usagerollup/report/")
    shot(page, "admin-report-1280")
    page_width, *overflows = page.evaluate(widths)
    assert page_width <= 1280 and len(overflows) == 2 and max(overflows) <= 1, (page_width, overflows)
    assert "several currencies" in page.locator("p.mixed-currencies").first.inner_text()

    rollup("long", "m" * 128, 7)  # the longest model name a record can hold
    page.goto(site.url + "/admin/ragcache/usagerollup/report/")
    page_width, *overflows = page.evaluate(widths)
    assert page_width <= 1280, page_width


# --- demo ---------------------------------------------------------------------------------

def ask(page, question: str) -> str:
    """Ask on the demo page; returns the outcome badge's kind (hit, miss, bypass, refresh)."""
    page.fill("textarea[name=question]", question)
    page.click("#ask-form button[type=submit]")
    page.wait_for_function("document.getElementById('total-ms').textContent.endsWith('ms')")
    badge = page.locator("#outcome")
    kind = badge.get_attribute("class").replace("badge", "").strip()
    assert badge.inner_text().lower().startswith(kind), badge.inner_text()
    return kind


def test_demo_same_question_twice_miss_then_hit_with_savings(page, site):
    from ragcache.models import ModelPrice

    ModelPrice.objects.update_or_create(model="demo-llm", defaults={"input_per_1k": "0.0025",
                                                                    "output_per_1k": "0.01", "currency": "USD"})
    page.goto(site.url + "/demo/")
    question = "What does a cache hit save?"
    assert ask(page, question) == "miss"
    assert "called the LLM" in page.locator("#outcome").inner_text()
    assert page.locator("#policy").inner_text() == "default"
    first_answer = page.locator("#answer").inner_text()
    assert first_answer
    shot(page, "demo-miss")

    assert ask(page, question) == "hit"
    assert page.locator("#answer").inner_text() == first_answer
    savings = page.locator("#savings").inner_text()
    assert re.search(r"This hit saved \d+ tokens and 0\.\d+ USD", savings), savings
    shot(page, "demo-hit")


def test_demo_kill_switch_set_in_the_admin_shows_a_bypass(admin_page, site):
    page = admin_page
    page.goto(site.url + "/admin/ragcache/cacheflags/1/change/")
    page.check("#id_kill_switch")
    submit(page, "input[name=_save]")
    assert "was changed successfully" in messages(page)

    page.goto(site.url + "/demo/")
    assert ask(page, "Is the cache on?") == "bypass"
    assert "kill switch" in page.locator("#reason").inner_text()
    assert "asking again calls the LLM again" in page.locator("#savings").inner_text()
    shot(page, "demo-kill-switch")
