"""Celery tasks. ``aggregate_usage`` is scheduled by beat (see README)."""
from __future__ import annotations

import logging
from dataclasses import asdict

from celery import shared_task
from django.db import DatabaseError

from . import store
from .aggregation import aggregate
from .connection import operator_hint

logger = logging.getLogger("ragcache.tasks")


@shared_task(
    name="ragcache.tasks.aggregate_usage",
    autoretry_for=(DatabaseError,),
    retry_backoff=2,
    retry_backoff_max=300,
    retry_jitter=True,
    max_retries=8,
    ignore_result=True,
)
def aggregate_usage() -> dict:
    """Ingest pending usage events and update rollups. A database outage makes the task
    retry with backoff; the events stay pending in Redis meanwhile, nothing is lost."""
    try:
        result = aggregate()
    except store.RedisUnavailable as exc:
        logger.warning("ragcache: aggregation stopped; the next run retries. %s", operator_hint(exc))
        return {"status": "redis_unavailable"}
    if result.ingested or result.malformed:
        logger.info(
            "ragcache: aggregated %d usage events (%d duplicates, %d malformed) in %.3fs; backlog %d",
            result.ingested, result.duplicates, result.malformed, result.seconds, result.backlog,
        )
    return asdict(result)
