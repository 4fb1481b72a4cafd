"""The admin's usage report (24 h and 7 days, the figures of ``manage.py ragcache_report``
with a server-drawn chart), its "Aggregate now" button, and the usage records' filters.

Costs carry the currency of the model's ``ModelPrice``, with 8 decimals (an amount too
small for them reads ``<0.00000001``, never 0); a model without a price has its cost
avoided shown bare and named under the table (its hits are worth 0 until it has one,
unless the stored answers carried their own cost). Amounts in different currencies are
never added: the total lists one amount per currency, and the chart then draws no cost
line. Latency avoided is in seconds, as in the CLI.
"""
from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.http import HttpResponseNotAllowed, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import reverse

from . import store
from .admin_policy import plural
from .conf import get_config
from .models import UsageRecord
from .reports import NO_CURRENCY, SHOWN_PLACES, build_report, chart, model_currencies, shown_cost

# One click aggregates at most this many events, so the request stays short; the beat
# task (or another click) takes the rest.
AGGREGATE_NOW_MAX_EVENTS = 50_000


def axis_cost(amount: Decimal) -> str:
    """The chart's cost axis label: two significant digits, at most 8 decimals
    (``0.024``, ``0.00000040``, ``12.50``)."""
    if amount >= 1:
        return f"{amount:.2f}"
    if not amount:
        return "0"
    rounded = amount.quantize(Decimal(1).scaleb(-min(SHOWN_PLACES, max(2, 1 - amount.adjusted()))))
    return f"{rounded:f}" if rounded else shown_cost(amount)  # "<0.00000001"


def _rows(report) -> tuple[list[dict], dict, set[str]]:
    rows, unpriced = [], set()
    for row in report.rows:
        if row.currency == NO_CURRENCY and row.hits:
            unpriced.add(row.model or "(no model)")
        rows.append(dict(row.as_dict(), hit_rate_pct=f"{row.hit_rate:.1%}",
                         cost=shown_cost(row.cost_avoided, row.currency),
                         latency_avoided_s=f"{row.latency_avoided_ms / 1000:.1f}"))
    totals = report.totals
    # One amount per currency, never their sum; "" (models without a price) last.
    costs = [shown_cost(amount, currency) if currency != NO_CURRENCY else f"{shown_cost(amount)} (no price)"
             for currency, amount in report.costs.items()] if report.mixed_currencies \
        else [shown_cost(totals.cost_avoided, totals.currency)]
    total = dict(totals.as_dict(), hit_rate_pct=f"{totals.hit_rate:.1%}", costs=costs,
                 latency_avoided_s=f"{totals.latency_avoided_ms / 1000:.1f}", mixed=report.mixed_currencies,
                 currencies=", ".join(currency or "no price" for currency in report.costs))
    return rows, total, unpriced


def report_view(model_admin, request):
    """Last 24 h and 7 days per policy and model, with a server-drawn chart."""
    if not model_admin.has_view_permission(request):
        raise PermissionDenied
    currencies = model_currencies()
    sections = []
    for label, hours in (("Last 24 hours", 24), ("Last 7 days", 7 * 24)):
        report = build_report(hours=hours, currencies=currencies)
        rows, totals, unpriced = _rows(report)
        drawn = chart(report.series, report.step, draw_cost=not report.mixed_currencies)
        sections.append({"label": label, "report": report, "rows": rows, "totals": totals,
                         "unpriced": sorted(unpriced), "chart": drawn, "max_cost": axis_cost(drawn.max_cost)})
    try:
        backlog, last = store.backlog(), store.last_aggregation()
    except store.RedisUnavailable:
        backlog, last = None, None  # the page still shows the database figures
    context = {
        **model_admin.admin_site.each_context(request),
        "title": "RAG cache usage report",
        "opts": model_admin.model._meta,
        "sections": sections,
        "backlog": backlog,
        "backlog_max": f"{int(get_config()['STREAM_MAXLEN']):,}",
        "last_aggregation": datetime.fromtimestamp(last, UTC) if last else None,
        "can_aggregate": model_admin.has_view_permission(request),
        "add_price_url": reverse("admin:ragcache_modelprice_add"),
    }
    return TemplateResponse(request, "admin/ragcache/usage_report.html", context)


def aggregate_view(model_admin, request):
    """POST only (staff who may see the report): run an aggregation now, then back to the report."""
    if request.method != "POST":
        return HttpResponseNotAllowed(["POST"])
    if not model_admin.has_view_permission(request):
        raise PermissionDenied
    from .aggregation import aggregate

    try:
        result = aggregate(max_events=AGGREGATE_NOW_MAX_EVENTS)
    except store.RedisUnavailable:
        messages.error(request, "Redis is not answering: nothing was aggregated. The figures below are those "
                                "already in the database.")
    else:
        if result.status == "busy":
            messages.warning(request, "Another aggregation is running right now (the beat task or another click); "
                                      "it is doing this work. Reload the report in a moment.")
        else:
            rest = (f" {plural(result.backlog, 'event')} still wait; the beat task takes them, or aggregate again."
                    if result.backlog else "")
            messages.success(request, f"Aggregated {plural(result.ingested, 'event')} in {result.seconds:.2f} s."
                                      + rest)
    return HttpResponseRedirect(reverse("admin:ragcache_usagerollup_report"))


class ReasonFilter(admin.SimpleListFilter):
    """"By reason": only the reasons that occur among the records (and "none")."""

    title = "reason"
    parameter_name = "reason"

    def lookups(self, request, model_admin):
        reasons = (UsageRecord.objects.order_by("reason").values_list("reason", flat=True).distinct())
        return [(reason or "-", reason.replace("_", " ") if reason else "none") for reason in reasons]

    def queryset(self, request, queryset):
        value = self.value()
        if value is None:
            return queryset
        return queryset.filter(reason="" if value == "-" else value)
