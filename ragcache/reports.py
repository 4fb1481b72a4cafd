"""Usage reports built from the hourly ``UsageRollup`` rows (ORM only, no Redis).

A report covers the last ``hours`` hourly periods, the current (partial) hour included:
with ``hours=24`` at 14:20 UTC it covers 15:00 yesterday up to now. Figures are grouped
per (policy, model), with a totals row and a time series for the chart. Sums are done in
Python over the rollup rows so that costs stay exact ``Decimal`` values on every database.

Costs are in the currency of each row's model's ``ModelPrice`` (today's row; ``""`` for a
model without one, whose cost can only come from answers carrying their own ``cost``, in
"the" price currency). Amounts in different currencies are never added together:
``Report.costs`` holds the total per currency; with prices in several currencies the
totals' ``cost_avoided`` is ``None`` (JSON ``null``), the costs of models without a price
are listed apart (under ``""``: their currency is unknown), and the chart draws no cost
line. JSON carries costs exact, with the
tables' 12 decimal places; people read them with ``ModelPrice``'s 8 (``shown_cost``),
and an amount too small for 8 places is shown as ``<0.00000001``, never as zero.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal

from django.utils import timezone

from .aggregation import UsageTally
from .models import ModelPrice, UsageRollup

COUNTS = ("lookups", "hits", "misses", "shadow_hits", "stale_sources", "stores", "refusals", "bypasses",
          "unknown_usage_hits", "tokens_avoided")
# Above this many hours the chart has one point per day instead of one per hour.
HOURLY_SERIES_MAX_HOURS = 48
# Ten years: longer windows would only overflow date arithmetic.
MAX_HOURS = 10 * 365 * 24
# Decimal places of costs: as the usage tables keep them (exact, for JSON), and as prices
# are entered (for people: tables and the admin).
EXACT_PLACES = UsageRollup._meta.get_field("cost_avoided").decimal_places  # 12
SHOWN_PLACES = ModelPrice._meta.get_field("input_per_1k").decimal_places  # 8
_EXACT = Decimal(1).scaleb(-EXACT_PLACES)
_SHOWN = Decimal(1).scaleb(-SHOWN_PLACES)
NO_CURRENCY = ""  # a model without a ModelPrice


def exact_cost(amount: Decimal) -> str:
    """``Decimal("0.3")`` -> ``"0.300000000000"``: the amount as the tables keep it (12 places)."""
    return f"{Decimal(amount).quantize(_EXACT):f}"


def shown_cost(amount: Decimal, currency: str = NO_CURRENCY) -> str:
    """An amount for people, at ``SHOWN_PLACES`` (8) decimals, with its currency if known:
    ``"1.87500000 EUR"``. A non-zero amount that would round to zero reads
    ``"<0.00000001 EUR"``, so a small saving never shows as nothing."""
    amount = Decimal(amount)
    rounded = amount.quantize(_SHOWN)
    if amount and not rounded:
        text = f"<{_SHOWN:f}" if amount > 0 else f">-{_SHOWN:f}"
    else:
        text = f"{rounded:f}"
    return f"{text} {currency}" if currency else text


def model_currencies() -> dict[str, str]:
    """Model name -> the currency of its ``ModelPrice`` (upper case), from the database."""
    return {model: (currency or "").strip().upper()
            for model, currency in ModelPrice.objects.values_list("model", "currency")}


@dataclass
class ReportRow(UsageTally):
    policy: str = ""
    model: str = ""
    currency: str = NO_CURRENCY  # of cost_avoided: the model's ModelPrice's, "" when it has none

    @property
    def hit_rate(self) -> float:
        """Hits over lookups (shadow hits are lookups that were not served)."""
        return self.hits / self.lookups if self.lookups else 0.0

    def add(self, other: ReportRow | dict) -> None:
        get = other.get if isinstance(other, dict) else lambda name: getattr(other, name)
        for name in COUNTS:
            setattr(self, name, getattr(self, name) + int(get(name)))
        self.cost_avoided += Decimal(get("cost_avoided"))
        self.latency_avoided_ms += float(get("latency_avoided_ms"))

    def as_dict(self) -> dict:
        data = {"policy": self.policy, "model": self.model}
        data.update({name: getattr(self, name) for name in COUNTS})
        data["hit_rate"] = round(self.hit_rate, 4)
        data["cost_avoided"] = exact_cost(self.cost_avoided)
        data["currency"] = self.currency
        data["latency_avoided_ms"] = round(self.latency_avoided_ms, 3)
        return data


@dataclass
class SeriesPoint:
    """One hour (or day) of the chart. ``costs``: cost avoided per currency."""

    start: datetime
    lookups: int = 0
    hits: int = 0
    costs: dict[str, Decimal] = field(default_factory=dict)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0

    @property
    def cost_avoided(self) -> Decimal:
        """The cost avoided, if in one currency (the chart draws it only then); raises
        ``ValueError`` for amounts in several."""
        found = [amount for amount in self.costs.values() if amount]
        if len(found) > 1:
            raise ValueError(f"costs in several currencies ({', '.join(sorted(self.costs))}) cannot be added")
        return found[0] if found else Decimal(0)

    def as_dict(self, mixed: bool = False) -> dict:
        return {
            "start": self.start.isoformat(),
            "lookups": self.lookups,
            "hits": self.hits,
            "hit_rate": round(self.hit_rate, 4),
            "cost_avoided": None if mixed else exact_cost(sum(self.costs.values(), Decimal(0))),
            "cost_avoided_by_currency": {currency: exact_cost(amount) for currency, amount in sorted(self.costs.items())
                                         if amount},
        }


@dataclass
class Report:
    hours: int
    since: datetime
    until: datetime
    policy: str | None
    step: str  # "hour" or "day": the series' resolution
    rows: list[ReportRow]
    totals: ReportRow  # its cost_avoided adds every currency: read it only if not mixed_currencies
    series: list[SeriesPoint]
    costs: dict[str, Decimal] = field(default_factory=dict)  # total cost avoided per currency ("": no price)

    @property
    def mixed_currencies(self) -> bool:
        """Rows priced in more than one currency: the sum of their costs means nothing.
        (With several, the costs of models without a price are listed apart, under "".)"""
        return len(self.costs) > 1

    def as_dict(self) -> dict:
        totals = self.totals.as_dict()
        totals["currency"] = None if self.mixed_currencies else self.totals.currency
        if self.mixed_currencies:
            totals["cost_avoided"] = None
        totals["cost_avoided_by_currency"] = {currency: exact_cost(amount) for currency, amount in self.costs.items()}
        return {
            "hours": self.hours,
            "since": self.since.isoformat(),
            "until": self.until.isoformat(),
            "policy": self.policy,
            "series_step": self.step,
            "rows": [row.as_dict() for row in self.rows],
            "totals": totals,
            "series": [point.as_dict(self.mixed_currencies) for point in self.series],
        }


def window_start(hours: int, now: datetime | None = None) -> datetime:
    """Start of the first of the last ``hours`` hourly periods (the current one included)."""
    now = now or timezone.now()
    return now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=hours - 1)


def build_report(hours: int = 24, policy: str | None = None, now: datetime | None = None,
                 currencies: dict[str, str] | None = None) -> Report:
    """The last ``hours`` hourly periods (1 to ``MAX_HOURS``; else ``ValueError``), of one
    policy or all. ``currencies``: model -> currency (default: ``model_currencies()``)."""
    if not isinstance(hours, int) or isinstance(hours, bool) or not 1 <= hours <= MAX_HOURS:
        raise ValueError(f"hours must be a whole number from 1 to {MAX_HOURS}, not {hours!r}")
    if currencies is None:
        currencies = model_currencies()
    now = now or timezone.now()
    since = window_start(hours, now)
    rollups = UsageRollup.objects.filter(granularity=UsageRollup.Granularity.HOUR, period_start__gte=since)
    if policy is not None:
        rollups = rollups.filter(policy=policy)
    values = rollups.values("period_start", "policy", "model", "cost_avoided", "latency_avoided_ms", *COUNTS)

    step = "hour" if hours <= HOURLY_SERIES_MAX_HOURS else "day"
    bucket_of = _hour if step == "hour" else _day
    series = {start: SeriesPoint(start) for start in _buckets(since, now, step)}
    rows: dict[tuple[str, str], ReportRow] = {}
    totals = ReportRow(policy="TOTAL", model="")
    for value in values:
        key = (value["policy"], value["model"])
        row = rows.get(key)
        if row is None:
            row = rows[key] = ReportRow(policy=key[0], model=key[1], currency=currencies.get(key[1], NO_CURRENCY))
        row.add(value)
        totals.add(value)
        point = series.setdefault(bucket_of(value["period_start"]), SeriesPoint(bucket_of(value["period_start"])))
        point.lookups += value["lookups"]
        point.hits += value["hits"]
        point.costs[row.currency] = point.costs.get(row.currency, Decimal(0)) + value["cost_avoided"]
    named = sorted({row.currency for row in rows.values()} - {NO_CURRENCY})
    if len(named) <= 1:
        # One currency: an answer's own cost is in it too (ModelPrice's currency is "the"
        # currency of costs), so one total, as ever.
        totals.currency = named[0] if named else NO_CURRENCY
        costs = {totals.currency: totals.cost_avoided}
    else:
        costs = {currency: Decimal(0) for currency in named}
        for row in rows.values():
            if row.currency or row.cost_avoided:  # "" last: unpriced models' own costs, currency unknown
                costs[row.currency] = costs.get(row.currency, Decimal(0)) + row.cost_avoided
    return Report(
        hours=hours,
        since=since,
        until=now,
        policy=policy,
        step=step,
        rows=[rows[key] for key in sorted(rows)],
        totals=totals,
        series=[series[start] for start in sorted(series)],
        costs=costs,
    )


def known_policies() -> set[str]:
    """Policy names a report can be asked for: current policies and any seen in rollups."""
    from .models import CachePolicy

    names = set(CachePolicy.objects.values_list("name", flat=True))
    # order_by(): the default ordering's columns would otherwise join the DISTINCT.
    names.update(UsageRollup.objects.order_by().values_list("policy", flat=True).distinct())
    return names


def _hour(when: datetime) -> datetime:
    return when.replace(minute=0, second=0, microsecond=0)


def _day(when: datetime) -> datetime:
    return when.replace(hour=0, minute=0, second=0, microsecond=0)


def _buckets(since: datetime, until: datetime, step: str) -> list[datetime]:
    """Every bucket in the window, so that hours without traffic show as zeros."""
    start, delta = (_hour(since), timedelta(hours=1)) if step == "hour" else (_day(since), timedelta(days=1))
    buckets = []
    while start <= until:
        buckets.append(start)
        start += delta
    return buckets


# --- chart --------------------------------------------------------------------------------

@dataclass
class Chart:
    """Geometry of an inline SVG line chart: hit rate (left axis, 0-100 %) and cost
    avoided (right axis, 0-max) per series point. Drawn server-side: no JavaScript.

    A period without lookups has no hit rate: it is a gap between ``segments`` (each a
    run of periods with lookups), never a 0 % point, so quiet hours draw no false ramp.
    ``hit_rate_points`` / ``cost_points`` join every drawn point, for tests and tools."""

    width: int
    height: int
    left: int
    right: int
    top: int
    bottom: int
    segments: list[ChartSegment]
    max_cost: Decimal
    x_labels: list[tuple[float, str]]
    empty: bool
    gaps: int  # periods without lookups
    cost_drawn: bool = True  # False: costs in several currencies, no cost line (they cannot be added)

    @property
    def hit_rate_points(self) -> str:
        return " ".join(segment.hit_rate_points for segment in self.segments)

    @property
    def cost_points(self) -> str:
        return " ".join(segment.cost_points for segment in self.segments)


@dataclass
class ChartSegment:
    """A run of consecutive periods with lookups; ``dots`` (x, y hit rate, y cost) mark
    each point, so a run of one period is visible too."""

    hit_rate_points: str
    cost_points: str
    dots: list[tuple[str, str, str]]


def chart(series: list[SeriesPoint], step: str = "hour", width: int = 720, height: int = 220,
          draw_cost: bool = True) -> Chart:
    """The chart of ``series``; ``draw_cost=False`` (a report in several currencies) draws
    the hit rate only: every cost point sits at 0 and ``cost_drawn`` is False."""
    left, right, top, bottom = 44, width - 64, 12, height - 28
    costs = [point.cost_avoided if draw_cost else Decimal(0) for point in series]
    max_cost = max(costs, default=Decimal(0))
    n = len(series)
    labels: list[tuple[float, str]] = []
    segments: list[ChartSegment] = []
    run: list[tuple[str, str, str]] = []
    every = max(1, n // 8)  # at most ~8 x-axis labels

    def close_run() -> None:
        if run:
            segments.append(ChartSegment(" ".join(f"{x},{y}" for x, y, _ in run),
                                         " ".join(f"{x},{c}" for x, _, c in run), list(run)))
            run.clear()

    for i, point in enumerate(series):
        x = left + (right - left) * (i / (n - 1) if n > 1 else 0.5)
        if i % every == 0:
            labels.append((round(x, 1), point.start.strftime("%H:%M" if step == "hour" else "%m-%d")))
        if not point.lookups:
            close_run()
            continue
        share = float(costs[i] / max_cost) if max_cost else 0.0
        run.append((f"{x:.1f}", f"{bottom - (bottom - top) * point.hit_rate:.1f}",
                    f"{bottom - (bottom - top) * share:.1f}"))
    close_run()
    return Chart(
        width=width, height=height, left=left, right=right, top=top, bottom=bottom, segments=segments,
        max_cost=max_cost, x_labels=labels,
        empty=not any(point.lookups or any(point.costs.values()) for point in series),
        gaps=sum(1 for point in series if not point.lookups), cost_drawn=draw_cost,
    )
