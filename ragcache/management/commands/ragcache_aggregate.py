"""Move pending usage events from Redis into UsageRecord / UsageRollup now.

    manage.py ragcache_aggregate

The same work as the ``ragcache.tasks.aggregate_usage`` beat task. Safe to run at any
time and at the same time as the task: a Redis lock lets one aggregation run at once
(the other prints ``busy``) and the unique event id makes re-runs insert nothing twice.
"""
from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from ragcache import store
from ragcache.aggregation import aggregate
from ragcache.connection import operator_hint


class Command(BaseCommand):
    help = "Ingest pending usage events from Redis and update the hourly/daily rollups now."

    def handle(self, *args, **options) -> None:
        try:
            result = aggregate()
        except store.RedisUnavailable as exc:
            raise CommandError(
                f"{operator_hint(exc)} Batches committed before that are kept; the other events wait in Redis "
                "for the next run.") from exc
        if result.status == "busy":
            self.stdout.write("busy: another aggregation holds the lock; nothing to do here (it will finish the work)")
            return
        self.stdout.write(
            f"ingested={result.ingested} duplicates={result.duplicates} malformed={result.malformed} "
            f"pruned={result.pruned} backlog={result.backlog} seconds={result.seconds:.3f}"
        )
