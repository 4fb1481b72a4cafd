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

from ragcache.models import UsageRecord, UsageRollup
from ragcache.reports import window_start
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
    total_day = re.search(r'<tr class="total">(.*?)</tr>', day, re.S).group(1)
    total_week = re.search(r'<tr class="total">(.*?)</tr>', week, re.S).group(1)
    cells = lambda row: re.findall(r"<td[^>]*>([^<]*)</td>", row)  # noqa: E731
    assert cells(total_day)[2:6] == ["40", "30", "10", "75.0%"]
    assert cells(total_day)[12] == "1.875000"  # after the stale sources column
    assert cells(total_week)[2:6] == ["50", "31", "19", "62.0%"]
    assert cells(total_week)[12] == "2.000000"
    for part in (day, week):
        svg = re.search(r"<svg .*?</svg>", part, re.S).group(0)
        assert 'class="hit-rate"' in svg and 'class="cost-avoided"' in svg
        assert re.search(r'class="hit-rate"[^>]*points="(\d+\.\d,\d+\.\d ?)+"', svg)
        assert "<script" not in part and "https://" not in part  # drawn by the server, nothing fetched
    # 24 hourly points in the day chart; one point per calendar day the 168 hours touch in the week chart.
    days = (timezone.now().date() - window_start(7 * 24).date()).days + 1
    assert days in (7, 8)
    assert len(re.search(r'class="hit-rate"[^>]*points="([^"]*)"', day).group(1).split()) == 24
    assert len(re.search(r'class="hit-rate"[^>]*points="([^"]*)"', week).group(1).split()) == days

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
    assert "1.875000" in html  # the database figures are still there


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
