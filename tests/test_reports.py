"""ragcache.reports and `manage.py ragcache_report`: the window, grouping, totals, series,
argument validation and both output formats, over UsageRollup rows written here."""
from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from ragcache.models import UsageRollup
from ragcache.reports import build_report, chart, window_start

NOW = datetime(2025, 3, 10, 14, 20, tzinfo=UTC)


def rollup(start: datetime, policy: str = "default", model: str = "gpt", granularity: str = "hour", **counts):
    hits, misses = counts.pop("hits", 0), counts.pop("misses", 0)
    return UsageRollup.objects.create(
        period_start=start, granularity=granularity, policy=policy, model=model,
        lookups=hits + misses + counts.get("shadow_hits", 0), hits=hits, misses=misses, **counts,
    )


def run(*args: str) -> str:
    out = io.StringIO()
    call_command("ragcache_report", *args, stdout=out)
    return out.getvalue()


def test_window_is_the_last_n_hourly_periods_current_included():
    assert window_start(24, NOW) == datetime(2025, 3, 9, 15, tzinfo=UTC)
    assert window_start(1, NOW) == datetime(2025, 3, 10, 14, tzinfo=UTC)


@pytest.mark.django_db
def test_report_groups_per_policy_and_model_with_totals_and_series():
    current = datetime(2025, 3, 10, 14, tzinfo=UTC)
    rollup(current, hits=3, misses=1, stores=1, tokens_avoided=300, cost_avoided=Decimal("0.1"), latency_avoided_ms=5.5)
    rollup(current - timedelta(hours=23), hits=1, misses=1, stores=1, refusals=2, tokens_avoided=100,
           cost_avoided=Decimal("0.2"), latency_avoided_ms=1.0)
    rollup(current, model="other", misses=4, stores=4, bypasses=3)
    rollup(current - timedelta(hours=2), policy="faq", hits=5, shadow_hits=2, tokens_avoided=500,
           cost_avoided=Decimal("0.000001"))
    # Outside the window, and day rows (which repeat the hourly figures): never counted.
    rollup(current - timedelta(hours=24), hits=100, misses=100)
    rollup(datetime(2025, 3, 10, tzinfo=UTC), granularity="day", hits=1000)

    report = build_report(24, now=NOW)
    rows = {(r.policy, r.model): r for r in report.rows}
    assert list(rows) == [("default", "gpt"), ("default", "other"), ("faq", "gpt")]
    gpt = rows[("default", "gpt")]
    assert (gpt.lookups, gpt.hits, gpt.misses, gpt.stores, gpt.refusals, gpt.tokens_avoided) == (6, 4, 2, 2, 2, 400)
    assert gpt.cost_avoided == Decimal("0.3") and gpt.hit_rate == pytest.approx(4 / 6)
    assert gpt.latency_avoided_ms == pytest.approx(6.5)
    assert rows[("default", "other")].bypasses == 3 and rows[("default", "other")].hit_rate == 0.0
    assert (rows[("faq", "gpt")].shadow_hits, rows[("faq", "gpt")].lookups) == (2, 7)

    totals = report.totals
    assert (totals.lookups, totals.hits, totals.misses, totals.stores) == (17, 9, 6, 6)
    assert totals.cost_avoided == Decimal("0.300001")
    assert totals.as_dict()["cost_avoided"] == "0.300001000000"  # exact: the tables' 12 places

    assert report.step == "hour" and len(report.series) == 24
    assert report.series[0].start == datetime(2025, 3, 9, 15, tzinfo=UTC)
    by_start = {p.start: p for p in report.series}
    assert (by_start[current].lookups, by_start[current].hits, by_start[current].cost_avoided) == (8, 3, Decimal("0.1"))
    assert by_start[current - timedelta(hours=1)].lookups == 0  # gaps are zeros, not missing points
    assert sum(p.hits for p in report.series) == totals.hits

    faq_only = build_report(24, policy="faq", now=NOW)
    assert [(r.policy, r.model) for r in faq_only.rows] == [("faq", "gpt")] and faq_only.totals.hits == 5


@pytest.mark.django_db
def test_long_windows_chart_per_day():
    rollup(datetime(2025, 3, 4, 9, tzinfo=UTC), hits=2, misses=2)
    rollup(datetime(2025, 3, 4, 22, tzinfo=UTC), hits=1, misses=3)
    report = build_report(7 * 24, now=NOW)
    assert report.step == "day"
    assert [p.start.day for p in report.series] == [3, 4, 5, 6, 7, 8, 9, 10]
    day = report.series[1]
    assert (day.lookups, day.hits, day.hit_rate) == (8, 3, 3 / 8)


def test_report_rejects_a_bad_window():
    for hours in (0, -1, 10**9, True, 1.5):
        with pytest.raises(ValueError):
            build_report(hours)


def test_chart_geometry_is_plain_numbers():
    empty = chart([])
    assert empty.empty and empty.hit_rate_points == ""


@pytest.mark.django_db
def test_chart_points_follow_hit_rate_and_cost():
    current = datetime(2025, 3, 10, 14, tzinfo=UTC)
    rollup(current, hits=1, misses=0, cost_avoided=Decimal("2"))
    rollup(current - timedelta(hours=1), hits=1, misses=1, cost_avoided=Decimal("1"))
    report = build_report(2, now=NOW)
    drawn = chart(report.series, report.step)
    ys = [float(p.split(",")[1]) for p in drawn.hit_rate_points.split()]
    cost_ys = [float(p.split(",")[1]) for p in drawn.cost_points.split()]
    # SVG y grows downwards: 100 % sits at the top, 50 % half-way.
    assert ys[1] == drawn.top and ys[0] == pytest.approx((drawn.top + drawn.bottom) / 2)
    assert cost_ys[1] == drawn.top and cost_ys[0] == pytest.approx((drawn.top + drawn.bottom) / 2)
    assert drawn.max_cost == Decimal("2") and not drawn.empty


@pytest.mark.django_db
@pytest.mark.parametrize("hours", ["0", "-3", "abc", "1.5", "", "100000000"])
def test_command_rejects_hours_that_are_not_a_positive_whole_number(hours):
    with pytest.raises(CommandError, match="positive whole number"):
        run("--hours", hours)


@pytest.mark.django_db
def test_command_rejects_an_unknown_policy_and_lists_known_ones(policy_factory):
    policy_factory("faq")
    with pytest.raises(CommandError, match=r"No policy named 'faqq'\. Known: default, faq\."):
        run("--policy", "faqq")
    # A policy deleted since, but with usage on record, can still be reported on.
    rollup(timezone.now().replace(minute=0, second=0, microsecond=0), policy="retired", hits=2)
    assert json.loads(run("--policy", "retired", "--format", "json"))["totals"]["hits"] == 2


@pytest.mark.django_db
def test_json_format_is_exact_and_machine_readable():
    current = timezone.now().replace(minute=0, second=0, microsecond=0)
    for _ in range(3):
        rollup(current - timedelta(hours=_ * 30), hits=1, misses=1, tokens_avoided=10, cost_avoided=Decimal("0.1"))
    data = json.loads(run("--format", "json", "--hours", "48"))
    assert data["hours"] == 48 and data["policy"] is None and data["series_step"] == "hour"
    (row,) = data["rows"]
    assert row == {
        "policy": "default", "model": "gpt", "lookups": 4, "hits": 2, "misses": 2, "shadow_hits": 0,
        "stale_sources": 0, "stores": 0, "refusals": 0, "bypasses": 0, "unknown_usage_hits": 0, "tokens_avoided": 20,
        "hit_rate": 0.5, "cost_avoided": "0.200000000000", "currency": "", "latency_avoided_ms": 0.0,
    }
    assert data["totals"]["cost_avoided"] == "0.200000000000" and data["totals"]["policy"] == "TOTAL"
    assert data["totals"]["cost_avoided_by_currency"] == {"": "0.200000000000"}
    assert len(data["series"]) == 48 and all(isinstance(p["cost_avoided"], str) for p in data["series"])


@pytest.mark.django_db
def test_table_format_is_aligned():
    current = timezone.now().replace(minute=0, second=0, microsecond=0)
    rollup(current, hits=12345, misses=1, tokens_avoided=9_876_543, cost_avoided=Decimal("12.5"))
    rollup(current, policy="a-much-longer-policy-name", model="m", misses=7)
    lines = run().splitlines()
    assert lines[0].startswith("ragcache usage, last 24 h (") and lines[0].endswith("all policies")
    table = lines[1:]
    assert len({len(line) for line in table}) == 1  # every line, rules included, has the same width
    header, rule, first, second, _rule, total = table
    assert header.split()[:3] == ["policy", "model", "lookups"]
    assert first.split()[:6] == ["a-much-longer-policy-name", "m", "7", "0", "7", "0.0%"]
    assert second.split()[:6] == ["default", "gpt", "12346", "12345", "1", "100.0%"]
    assert total.split()[:5] == ["TOTAL", "12353", "12345", "8", "99.9%"]
    assert "12.50000000" in second and "9876543" in second
    # Right-aligned figures: the lookups column ends at the same offset on every line.
    end = header.index("lookups") + len("lookups")
    assert first[end - 1] == "7" and second[end - 5:end] == "12346"


@pytest.mark.django_db
def test_table_says_so_when_there_is_no_usage():
    assert "(no usage in this window)" in run("--hours", "1")


@pytest.mark.django_db
def test_rows_of_several_gateway_keys_add_up_in_their_policy_and_model():
    current = datetime(2025, 3, 10, 14, tzinfo=UTC)
    rollup(current, hits=2, misses=1, stale_sources=1, cost_avoided=Decimal("0.000000000001"))
    rollup(current, gateway_key="team-a", hits=3, unknown_usage_hits=1, cost_avoided=Decimal("0.000000000002"))
    rollup(current, gateway_key="team-b", misses=4, stale_sources=2)
    (row,) = build_report(24, now=NOW).rows
    assert (row.policy, row.model, row.hits, row.misses, row.stale_sources, row.unknown_usage_hits) == (
        "default", "gpt", 5, 5, 3, 1)
    assert row.cost_avoided == Decimal("0.000000000003")  # exact before display
    assert row.as_dict()["cost_avoided"] == "0.000000000003"


@pytest.fixture
def three_currencies(db):
    """EUR and USD models, and one without a price whose answers carried their own cost."""
    from ragcache.models import ModelPrice

    ModelPrice.objects.create(model="eu", input_per_1k="0.001", output_per_1k="0.002", currency="EUR")
    ModelPrice.objects.create(model="us", input_per_1k="0.001", output_per_1k="0.002", currency="usd")
    current = timezone.now().replace(minute=0, second=0, microsecond=0)
    rollup(current, model="eu", hits=1, misses=1, cost_avoided=Decimal("1.5"))
    rollup(current - timedelta(hours=1), model="eu", hits=1, cost_avoided=Decimal("0.25"))
    rollup(current, model="us", hits=1, misses=1, cost_avoided=Decimal("2"))
    rollup(current, model="tiny", hits=1, cost_avoided=Decimal("0.000000400000"))


def test_costs_in_several_currencies_are_never_added(three_currencies):
    """EUR 1.75 and USD 2 were reported as one total of 3.75 (plus the unpriced model's)."""
    report = build_report(24)
    assert {row.model: row.currency for row in report.rows} == {"eu": "EUR", "tiny": "", "us": "USD"}
    assert report.mixed_currencies
    assert report.costs == {"EUR": Decimal("1.75"), "USD": Decimal("2"), "": Decimal("0.0000004")}
    data = report.as_dict()
    assert data["totals"]["cost_avoided"] is None and data["totals"]["currency"] is None
    assert data["totals"]["cost_avoided_by_currency"] == {
        "EUR": "1.750000000000", "USD": "2.000000000000", "": "0.000000400000"}
    now = [point for point in data["series"] if point["lookups"] == 5]
    assert now[0]["cost_avoided"] is None
    assert now[0]["cost_avoided_by_currency"] == {"": "0.000000400000", "EUR": "1.500000000000",
                                                  "USD": "2.000000000000"}
    with pytest.raises(ValueError, match="several currencies"):
        report.series[-1].cost_avoided  # noqa: B018 - the property must refuse to add them
    drawn = chart(report.series, report.step, draw_cost=False)
    assert not drawn.cost_drawn and drawn.max_cost == 0 and drawn.hit_rate_points

    table = run()
    total = next(line for line in table.splitlines() if line.startswith("TOTAL"))
    assert "several currencies" in total and "3.75" not in table
    assert table.splitlines()[-1] == ("Cost avoided per currency (never added together): 1.75000000 EUR, "
                                      "2.00000000 USD, 0.00000040 without a model price.")
    rows = {line.split()[1]: line for line in table.splitlines() if line.startswith("default ")}
    assert "1.75000000 EUR" in rows["eu"] and "2.00000000 USD" in rows["us"] and "0.00000040" in rows["tiny"]
    assert json.loads(run("--format", "json"))["totals"]["cost_avoided"] is None


@pytest.mark.django_db
def test_one_currency_keeps_one_total_and_small_savings_show():
    from ragcache.models import ModelPrice

    ModelPrice.objects.create(model="gpt", input_per_1k="0.00015", output_per_1k="0.0006", currency="EUR")
    ModelPrice.objects.create(model="free", input_per_1k="0", output_per_1k="0", currency="USD")
    current = timezone.now().replace(minute=0, second=0, microsecond=0)
    rollup(current, hits=1, cost_avoided=Decimal("0.000000000003"))  # 3e-12: below 8 places, not zero
    rollup(current, model="unpriced", misses=2)  # no price and no cost: not a currency of its own
    report = build_report(24)
    assert not report.mixed_currencies and report.costs == {"EUR": Decimal("0.000000000003")}
    assert report.as_dict()["totals"]["cost_avoided"] == "0.000000000003"
    assert report.as_dict()["totals"]["currency"] == "EUR"
    table = run()
    assert "<0.00000001 EUR" in next(line for line in table.splitlines() if line.startswith("TOTAL"))
    assert "0.00000000 EUR" not in table and "per currency" not in table
    # An unpriced model's answers carried their own cost: in the one price currency (the
    # documented contract), so still one total.
    rollup(current, model="own-cost", hits=1, cost_avoided=Decimal("0.5"))
    report = build_report(24)
    assert not report.mixed_currencies and report.costs == {"EUR": Decimal("0.500000000003")}


def test_shown_cost_has_a_fixed_precision_and_never_shows_a_saving_as_zero():
    from ragcache.reports import SHOWN_PLACES, exact_cost, shown_cost

    assert SHOWN_PLACES == 8  # ModelPrice's decimal places
    assert shown_cost(Decimal("1.875"), "EUR") == "1.87500000 EUR"
    assert shown_cost(Decimal("0.00000004")) == "0.00000004"
    assert shown_cost(Decimal("0.000000004"), "USD") == "<0.00000001 USD"
    assert shown_cost(Decimal(0)) == "0.00000000"
    assert exact_cost(Decimal("0.000000000001")) == "0.000000000001"
