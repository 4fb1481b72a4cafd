"""/metrics (django-prometheus, behind an access rule) and /ragcache/health."""
from __future__ import annotations

import hmac
import time

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.cache import never_cache
from django_prometheus.exports import ExportToDjangoView

from . import metrics, store
from .conf import get_config
from .policies import registry


def access_allowed(request: HttpRequest) -> bool:
    """Bearer token if RAGCACHE['METRICS_BEARER_TOKEN'] is set; else client IP in
    RAGCACHE['METRICS_ALLOWED_IPS'] (default: loopback only)."""
    config = get_config()
    token = config["METRICS_BEARER_TOKEN"]
    if token:
        header = request.headers.get("Authorization", "")
        return header.startswith("Bearer ") and hmac.compare_digest(header[7:].encode(), str(token).encode())
    allowed = config["METRICS_ALLOWED_IPS"] or ()
    return "*" in allowed or request.META.get("REMOTE_ADDR") in allowed


def _forbidden() -> HttpResponse:
    return HttpResponse("Forbidden: see RAGCACHE['METRICS_ALLOWED_IPS'] / ['METRICS_BEARER_TOKEN'].\n",
                        status=403, content_type="text/plain")


@never_cache
def metrics_view(request: HttpRequest) -> HttpResponse:
    if not access_allowed(request):
        return _forbidden()
    # Shared state lives in Redis: read it at scrape time, so these gauges are right
    # whichever process (web, Celery, another host) did the work.
    try:
        metrics.USAGE_BACKLOG.set(store.backlog())
        last = store.last_aggregation()
        if last:
            metrics.LAST_AGGREGATION.set(last)
    except store.RedisUnavailable:
        pass  # ragcache_redis_up already says so
    return ExportToDjangoView(request)


@never_cache
def health_view(request: HttpRequest) -> HttpResponse:
    if not access_allowed(request):
        return _forbidden()
    body: dict = {"redis": {"ok": False}}
    status = 200
    try:
        body["redis"] = {"ok": True, "latency_ms": round(store.ping() * 1000, 3)}
        body["usage_backlog"] = store.backlog()
        last = store.last_aggregation()
        body["last_aggregation"] = last
        body["last_aggregation_age_s"] = round(time.time() - last, 1) if last else None
    except store.RedisUnavailable as exc:
        body["redis"] = {"ok": False, "error": type(exc.__cause__ or exc).__name__}
        status = 503
    snapshot = registry.current()
    body["policies_loaded"] = sorted(snapshot.policies)
    body["kill_switch"] = snapshot.kill_switch
    body["status"] = "ok" if status == 200 else "unavailable"
    return JsonResponse(body, status=status)
