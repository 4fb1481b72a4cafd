"""The admin usage report: figures for 24 h / 7 days, a server-drawn SVG chart, the usage
backlog, the link from the ragcache app index, and who may see it."""
from __future__ import annotations

import re
from datetime import timedelta
from decimal import Decimal

import pytest
from django.contrib.auth.models import Permission, User
from django.urls import reverse
from django.utils import timezone

from ragcache.models import ModelPrice, UsageRecord, UsageRollup
from ragcache.usage import UsageEvent, usage_tracker

from .conftest import free_port

REPORT_URL = "/admin/ragcache/usagerollup/report/"


def staff(username: str, *codenames: str) -> User:
    user = User.objects.create_user(username, password="x", is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(content_type__app_label="ragcache", codename__in=codenames))
    return user


@pytest.fixture
def rollups(db):
    hour = timezone.now().replace(minute=0, second=0, microsecond=0)
    UsageRollup.objects.create(period_start=hour, granularity="hour", policy="faq", model="gpt-4o-mini", lookups=40,
                               hits=30, misses=10, stores=9, tokens_avoided=7200, cost_avoided=Decimal("1.875"))
    # Three days ago: in the 7-day section only.
    UsageRollup.objects.create(period_start=hour - timedelta(days=3), granularity="hour", policy="faq",
                               model="gpt-4o-mini", lookups=10, hits=1, misses=9, cost_avoided=Decimal("0.125"))


# The report's columns: policy (with the model under it), lookups, hits, misses, hit rate, shadow hits,
# stale sources, stores, refusals, bypasses, tokens avoided, cost avoided, latency avoided (s).
COST, LATENCY = 11, 12


def cells(row: str) -> list[str]:
    """Each cell's text, tags dropped: ``["faq gpt-4o-mini", "40", ...]``."""
    return [" ".join(re.sub(r"<[^>]+>", " ", cell).split()) for cell in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]


def rows_by_model(part: str) -> dict[str, list[str]]:
    return {found[0].split()[-1]: found for found in map(cells, re.findall(r"<tr>(.*?)</tr>", part, re.S)) if found}


def total_row(part: str) -> list[str]:
    return cells(re.search(r'<tr class="total">(.*?)</tr>', part, re.S).group(1))


def section(html: str, title: str) -> str:
    start = html.index(f"<h2>{title}</h2>")
    end = html.find("<h2>", start + 1)
    return html[start:end if end != -1 else None]


def test_report_page_shows_both_windows_chart_and_backlog(client, rollups):
    for _ in range(3):
        usage_tracker.track(UsageEvent(policy="faq", result="miss", model="gpt-4o-mini"))
    client.force_login(staff("viewer", "view_usagerollup"))
    response = client.get(REPORT_URL)
    assert response.status_code == 200
    assert reverse("admin:ragcache_usagerollup_report") == REPORT_URL
    html = response.content.decode()

    day, week = section(html, "Last 24 hours"), section(html, "Last 7 days")
    total_day, total_week = total_row(day), total_row(week)
    assert total_day[:5] == ["Total", "40", "30", "10", "75.0%"]
    assert total_day[COST] == "1.87500000"  # 8 places, as prices
    assert total_week[:5] == ["Total", "50", "31", "19", "62.0%"]
    assert total_week[COST] == "2.00000000"
    assert rows_by_model(day)["gpt-4o-mini"][0] == "faq gpt-4o-mini"  # the model under its policy
    for part in (day, week):
        svg = re.search(r"<svg .*?</svg>", part, re.S).group(0)
        assert 'class="hit-rate"' in svg and 'class="cost-avoided"' in svg
        assert re.search(r'class="hit-rate"[^>]*points="(\d+\.\d,\d+\.\d ?)+"', svg)
        assert "<script" not in part and "https://" not in part  # drawn by the server, nothing fetched
    # Only periods with lookups are drawn: one hour of the day chart; two days (today, 3 days ago) of the week's,
    # apart (a gap between them, never a 0 % ramp).
    assert re.findall(r'class="hit-rate"[^>]*points="([^"]*)"', day) == [re.search(
        r'class="hit-rate"[^>]*points="([^"]*)"', day).group(1)]
    assert len(re.findall(r'class="hit-rate"[^>]*points="([^"]*)"', week)) == 2
    assert len(re.findall(r'class="hit-rate-dot"', week)) == 2
    assert "gaps: hours without lookups" in day

    backlog = re.search(r'<p id="ragcache-backlog">(.*?)</p>', html, re.S).group(1)
    assert "<strong>3</strong> events in Redis not yet aggregated" in backlog
    assert "Last aggregation: never" in backlog


def test_report_page_survives_redis_being_down(client, rollups, settings):
    caches = {**settings.CACHES}
    caches["ragcache"] = {**caches["ragcache"], "LOCATION": f"redis://127.0.0.1:{free_port()}/0"}
    settings.CACHES = caches
    client.force_login(staff("viewer", "view_usagerollup"))
    response = client.get(REPORT_URL)
    assert response.status_code == 200
    html = response.content.decode()
    assert "Usage backlog: <strong>unavailable</strong>" in html
    assert "1.87500000" in html  # the database figures are still there


def test_only_staff_with_view_permission_on_rollups(client, db):
    client.force_login(staff("policy-editor", "view_cachepolicy", "change_cachepolicy"))
    assert client.get(REPORT_URL).status_code == 403
    app_index = client.get("/admin/ragcache/")
    assert app_index.status_code == 200 and REPORT_URL not in app_index.content.decode()

    client.force_login(User.objects.create_user("not-staff", password="x"))
    assert client.get(REPORT_URL).status_code == 302
    client.logout()
    response = client.get(REPORT_URL)
    assert response.status_code == 302 and response["Location"].startswith("/admin/login/")


def test_linked_from_the_app_index_and_the_rollup_list(client, db):
    client.force_login(staff("viewer", "view_usagerollup"))
    app_index = client.get("/admin/ragcache/").content.decode()
    assert f'href="{REPORT_URL}"' in app_index and 'id="ragcache-report-link"' in app_index
    changelist = client.get("/admin/ragcache/usagerollup/").content.decode()
    assert f'href="{REPORT_URL}"' in changelist


def test_usage_lists_are_read_only_with_filters(client, db):
    UsageRecord.objects.create(event_id="1-0", ts=timezone.now(), policy="faq", result="hit", model="m")
    UsageRecord.objects.create(event_id="1-1", ts=timezone.now(), policy="faq", result="miss", model="m")
    client.force_login(User.objects.create_superuser("root", password="x"))
    assert client.get("/admin/ragcache/usagerecord/add/").status_code == 403
    assert client.get("/admin/ragcache/usagerollup/add/").status_code == 403
    hits = client.get("/admin/ragcache/usagerecord/", {"result": "hit"})
    assert hits.status_code == 200 and hits.context["cl"].result_count == 1
    record = UsageRecord.objects.get(event_id="1-0")
    detail = client.get(f"/admin/ragcache/usagerecord/{record.pk}/change/")
    assert detail.status_code == 200 and 'name="_save"' not in detail.content.decode()
    assert client.get("/admin/ragcache/modelprice/add/").status_code == 200


def test_report_chart_leaves_quiet_hours_as_gaps(client, db):
    """Traffic at -5 h, -4 h and -1 h: two runs (two polylines), the quiet hours between them
    are no points at all, and the hours after the first run are not drawn at 0 %."""
    hour = timezone.now().replace(minute=0, second=0, microsecond=0)
    for back, hits in ((5, 1), (4, 2), (1, 4)):
        UsageRollup.objects.create(period_start=hour - timedelta(hours=back), granularity="hour", policy="faq",
                                   model="m", lookups=4, hits=hits, misses=4 - hits)
    client.force_login(staff("viewer", "view_usagerollup"))
    day = section(client.get(REPORT_URL).content.decode(), "Last 24 hours")
    runs = [points.split() for points in re.findall(r'class="hit-rate"[^>]*points="([^"]*)"', day)]
    assert [len(run) for run in runs] == [2, 1]
    # 25 %, 50 %, 100 % (SVG y grows downwards: 0 % is y=192, 100 % y=12); nothing at 0 %.
    assert [float(point.split(",")[1]) for run in runs for point in run] == [147.0, 102.0, 12.0]


def test_report_costs_carry_the_currency_and_name_unpriced_models(client, rollups):
    ModelPrice.objects.create(model="gpt-4o-mini", input_per_1k="0.00015", output_per_1k="0.0006", currency="EUR")
    hour = timezone.now().replace(minute=0, second=0, microsecond=0)
    UsageRollup.objects.create(period_start=hour, granularity="hour", policy="faq", model="local-llm", lookups=2,
                               hits=1, misses=1, latency_avoided_ms=12345.0)
    client.force_login(staff("viewer", "view_usagerollup"))
    html = client.get(REPORT_URL).content.decode()
    day = section(html, "Last 24 hours")
    rows = rows_by_model(day)
    assert rows["gpt-4o-mini"][COST] == "1.87500000 EUR"
    assert rows["local-llm"][COST] == "0.00000000"
    assert rows["local-llm"][LATENCY] == "12.3"  # seconds, as ragcache_report prints them
    assert "Latency avoided (s)" in day
    assert "No price for local-llm" in day and reverse("admin:ragcache_modelprice_add") in day
    ModelPrice.objects.create(model="local-llm", input_per_1k="0", output_per_1k="0", currency="USD")
    day = section(client.get(REPORT_URL).content.decode(), "Last 24 hours")
    total = re.search(r'<tr class="total">(.*?)</tr>', day, re.S).group(1)
    assert re.search(r'class="num cost cost-total">([^/]*)</td>', total).group(1) == \
        "1.87500000 EUR<br>0.00000000 USD"
    assert "Costs are in several currencies (EUR, USD)" in day


def test_aggregate_now_button(client, policy_factory):
    policy_factory("default")
    from ragcache.services import cache_service

    cache_service.cache_response("q", "x", model="m")
    assert cache_service.get_cached_response("q", model="m") is not None
    client.force_login(staff("viewer", "view_usagerollup"))
    page = client.get(REPORT_URL).content.decode()
    url = reverse("admin:ragcache_usagerollup_aggregate")
    assert f'action="{url}"' in page and 'id="ragcache-aggregate"' in page
    assert client.get(url).status_code == 405
    response = client.post(url)
    assert response.status_code == 302 and response["Location"] == REPORT_URL
    assert [str(m) for m in response.wsgi_request._messages][-1].startswith("Aggregated 2 events in ")
    assert UsageRollup.objects.filter(granularity="hour").values_list("hits", "stores").get() == (1, 1)
    client.logout()
    assert client.post(url).status_code == 302  # to the login page: staff only
    client.force_login(staff("editor", "view_cachepolicy"))
    assert client.post(url).status_code == 403


def test_aggregate_now_when_redis_is_down(client, db, settings):
    caches = {**settings.CACHES}
    caches["ragcache"] = {**caches["ragcache"], "LOCATION": f"redis://127.0.0.1:{free_port()}/0"}
    settings.CACHES = caches
    client.force_login(staff("viewer", "view_usagerollup"))
    response = client.post(reverse("admin:ragcache_usagerollup_aggregate"))
    assert response.status_code == 302
    assert "Redis is not answering: nothing was aggregated" in str(list(response.wsgi_request._messages)[-1])


def test_usage_records_show_seconds_the_short_key_and_only_occurring_reasons(client, db):
    when = timezone.now().replace(microsecond=0)
    UsageRecord.objects.create(event_id="1-0", ts=when, policy="faq", result="bypass", reason="kill_switch",
                               key_hash="0123456789abcdef", latency_avoided_ms=1500)
    UsageRecord.objects.create(event_id="1-1", ts=when, policy="faq", result="hit", key_hash="fedcba9876543210")
    client.force_login(User.objects.create_superuser("root", password="x"))
    page = client.get("/admin/ragcache/usagerecord/").content.decode()
    assert f"{timezone.localtime(when):%Y-%m-%d %H:%M:%S}" in page
    assert "0123456789abcdef" in page and "1.500" in page
    reasons = re.search(r"By reason.*?</ul>", page, re.S).group(0)
    assert re.findall(r'<a href="\?reason=([^"&]*)"', reasons) == ["-", "kill_switch"]
    assert "rollout" not in reasons and "mode off" not in reasons
    filtered = client.get("/admin/ragcache/usagerecord/", {"reason": "kill_switch"})
    assert filtered.context["cl"].result_count == 1
    assert client.get("/admin/ragcache/usagerecord/", {"reason": "-"}).context["cl"].result_count == 1


def test_report_page_never_adds_costs_in_different_currencies(client, db):
    """The total read "3.500000 (mixed currencies)": EUR 1.5 plus USD 2 as one number."""
    ModelPrice.objects.create(model="eu", input_per_1k="0.001", output_per_1k="0.002", currency="EUR")
    ModelPrice.objects.create(model="us", input_per_1k="0.001", output_per_1k="0.002", currency="USD")
    hour = timezone.now().replace(minute=0, second=0, microsecond=0)
    for model, cost in (("eu", "1.5"), ("us", "2"), ("tiny", "0.0000004")):
        UsageRollup.objects.create(period_start=hour, granularity="hour", policy="p", model=model, lookups=2, hits=1,
                                   misses=1, cost_avoided=Decimal(cost))
    client.force_login(staff("viewer", "view_usagerollup"))
    day = section(client.get(REPORT_URL).content.decode(), "Last 24 hours")
    total = re.search(r'<tr class="total">(.*?)</tr>', day, re.S).group(1)
    assert re.search(r'class="num cost cost-total">([^/]*)</td>', total).group(1) == \
        "1.50000000 EUR<br>2.00000000 USD<br>0.00000040 (no price)"
    assert "3.50000" not in day  # the sum (SVG coordinates may contain "3.5")
    assert "Costs are in several currencies (EUR, USD, no price)" in day
    svg = re.search(r"<svg .*?</svg>", day, re.S).group(0)
    assert 'class="hit-rate"' in svg and 'class="cost-avoided"' not in svg and 'class="cost-dot"' not in svg
    assert "cost avoided: not drawn (several currencies)" in day
    assert rows_by_model(day)["tiny"][COST] == "0.00000040"  # was 0.000000: a saving shown as none


def test_report_chart_cost_axis_keeps_small_amounts(client, db):
    ModelPrice.objects.create(model="m", input_per_1k="0.00015", output_per_1k="0.0006", currency="EUR")
    hour = timezone.now().replace(minute=0, second=0, microsecond=0)
    UsageRollup.objects.create(period_start=hour, granularity="hour", policy="p", model="m", lookups=1, hits=1,
                               cost_avoided=Decimal("0.0000004"))
    client.force_login(staff("viewer", "view_usagerollup"))
    svg = re.search(r"<svg .*?</svg>", section(client.get(REPORT_URL).content.decode(), "Last 24 hours"), re.S)
    labels = re.findall(r"<text [^>]*>([^<]*)</text>", svg.group(0))
    assert "0.00000040" in labels and "EUR" in labels and "0.0000" not in labels  # floatformat:4 drew 0.0000


def test_usage_lists_show_small_costs(client, db):
    ModelPrice.objects.create(model="m", input_per_1k="0.00015", output_per_1k="0.0006", currency="EUR")
    UsageRecord.objects.create(event_id="1-0", ts=timezone.now(), policy="faq", result="hit", model="m",
                               cost_avoided=Decimal("0.000000000150"))
    UsageRecord.objects.create(event_id="1-1", ts=timezone.now(), policy="faq", result="hit", model="other",
                               cost_avoided=Decimal("0.25"))
    UsageRollup.objects.create(period_start=timezone.now().replace(minute=0, second=0, microsecond=0),
                               granularity="hour", policy="faq", model="m", lookups=1, hits=1,
                               cost_avoided=Decimal("0.00000015"))
    client.force_login(User.objects.create_superuser("root", password="x"))
    records = client.get("/admin/ragcache/usagerecord/").content.decode()
    assert "&lt;0.00000001<" in records and "0.25000000<" in records  # was 0.000000 and 0.250000
    assert "0.00000015<" in client.get("/admin/ragcache/usagerollup/").content.decode()
