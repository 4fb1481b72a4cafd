"""Print what the cache did and saved, per policy and model, from the hourly rollups.

    manage.py ragcache_report [--hours 24] [--policy NAME] [--format table|json]

Reads only the database (run ``ragcache_aggregate`` first for up-to-the-minute figures).
``--policy`` must name a current policy or one that has rollups; any other name is a
``CommandError`` listing the known names, so a typo is never mistaken for "no traffic".
JSON output keeps counts as integers and costs as decimal strings (exact, 12 places).

Costs are in each model's ``ModelPrice`` currency, shown with 8 decimals (a non-zero amount
below that reads ``<0.00000001``). Amounts in different currencies are never added: with
several, the TOTAL row says so and a line under the table gives the total per currency
(JSON: ``totals.cost_avoided`` is null and ``totals.cost_avoided_by_currency`` has them).
"""
from __future__ import annotations

import argparse
import json

from django.core.management.base import BaseCommand, CommandError

from ragcache.reports import MAX_HOURS, NO_CURRENCY, Report, build_report, known_policies, shown_cost


def positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if not 1 <= number <= MAX_HOURS:
        raise argparse.ArgumentTypeError(
            f"must be a positive whole number of hours (at most {MAX_HOURS}), not {value!r}"
        )
    return number


COLUMNS = (
    ("policy", "policy"), ("model", "model"), ("lookups", "lookups"), ("hits", "hits"), ("misses", "misses"),
    ("hit rate", "hit_rate"), ("shadow hits", "shadow_hits"), ("stale sources", "stale_sources"), ("stores", "stores"),
    ("refusals", "refusals"),
    ("bypasses", "bypasses"), ("tokens avoided", "tokens_avoided"), ("cost avoided", "cost_avoided"),
    ("latency avoided (s)", "latency_avoided_s"),
)


def _cells(row: dict, cost: str) -> list[str]:
    row = dict(row, hit_rate=f"{row['hit_rate']:.1%}", latency_avoided_s=f"{row['latency_avoided_ms'] / 1000:.1f}",
               cost_avoided=cost)
    return [str(row[key]) for _, key in COLUMNS]


def per_currency(report: Report) -> str:
    """``1.50000000 EUR, 2.00000000 USD, 0.00000040 without a model price``."""
    return ", ".join(shown_cost(amount, currency) if currency != NO_CURRENCY
                     else f"{shown_cost(amount)} without a model price" for currency, amount in report.costs.items())


def render_table(report: Report) -> str:
    header = [title for title, _ in COLUMNS]
    body = [_cells(row.as_dict(), shown_cost(row.cost_avoided, row.currency)) for row in report.rows]
    total_cost = ("several currencies" if report.mixed_currencies
                  else shown_cost(report.totals.cost_avoided, report.totals.currency))
    total = _cells(report.totals.as_dict(), total_cost)
    widths = [max(len(cells[i]) for cells in [header, *body, total]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        # Names left-aligned, figures right-aligned.
        padded = (c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
        return "  ".join(padded).rstrip()

    rule = "  ".join("-" * w for w in widths)
    scope = f"policy {report.policy}" if report.policy else "all policies"
    lines = [
        f"ragcache usage, last {report.hours} h ({report.since:%Y-%m-%d %H:%M} to {report.until:%Y-%m-%d %H:%M} UTC), "
        f"{scope}",
        line(header),
        rule,
        *[line(cells) for cells in body],
    ]
    if not body:
        lines.append("(no usage in this window)")
    lines += [rule, line(total)]
    if report.mixed_currencies:
        lines.append(f"Cost avoided per currency (never added together): {per_currency(report)}.")
    return "\n".join(lines)


class Command(BaseCommand):
    help = "Report lookups, hits, misses, hit rate, tokens and cost avoided per policy and model."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--hours", type=positive_int, default=24, metavar="N",
                            help="Cover the last N hourly periods, the current one included (default 24).")
        parser.add_argument("--policy", metavar="NAME", help="Only this policy.")
        parser.add_argument("--format", choices=("table", "json"), default="table", help="Output format.")

    def handle(self, *args, hours: int, policy: str | None, format: str, **options) -> None:
        if policy is not None:
            known = known_policies()
            if policy not in known:
                raise CommandError(f"No policy named {policy!r}. Known: {', '.join(sorted(known)) or 'none'}.")
        report = build_report(hours=hours, policy=policy)
        if format == "json":
            self.stdout.write(json.dumps(report.as_dict(), indent=2))
        else:
            self.stdout.write(render_table(report))
