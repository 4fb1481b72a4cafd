"""/metrics (django-prometheus's registry plus readings taken at scrape time, behind an
access rule) and /ragcache/health. Both tell an outage as it is: a value that cannot be
read is absent, never a number standing for "unknown" (see ragcache.probes)."""
from __future__ import annotations

import hmac
import ipaddress
from functools import lru_cache

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.cache import never_cache
from prometheus_client import CONTENT_TYPE_LATEST

from . import probes
from .conf import get_config
from .policies import registry


def bearer_token(request: HttpRequest) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header; the scheme is matched
    case-insensitively (RFC 6750 via RFC 7235), so ``bearer <token>`` works too."""
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    return credentials.lstrip(" ") or None  # 1*SP between scheme and token (RFC 7235)


@lru_cache(maxsize=16)
def _networks(allowed: tuple[str, ...]) -> tuple[bool, tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]]:
    """(any client allowed, the networks) of METRICS_ALLOWED_IPS entries; an address is a
    network of one. An entry that is neither (system check ragcache.E006) matches nothing."""
    networks = []
    for entry in allowed:
        try:
            networks.append(ipaddress.ip_network(entry))
        except ValueError:
            continue
    return "*" in allowed, tuple(networks)


def client_allowed(remote_addr: str | None, allowed: object) -> bool:
    """Whether ``remote_addr`` (``REMOTE_ADDR``) is in ``allowed``: a list of addresses and CIDR
    networks, or ``"*"`` among them for any client. An IPv4 client seen by a dual-stack server
    as ``::ffff:a.b.c.d`` is matched as ``a.b.c.d``. Anything but a list or tuple of strings
    allows no one (a string is never matched by substring)."""
    if not isinstance(allowed, (list, tuple)) or not all(isinstance(entry, str) for entry in allowed):
        return False
    anyone, networks = _networks(tuple(allowed))
    if anyone:
        return True
    try:
        address = ipaddress.ip_address(remote_addr or "")
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return any(address in network or (mapped is not None and mapped in network) for network in networks)


def access_allowed(request: HttpRequest) -> bool:
    """Bearer token if RAGCACHE['METRICS_BEARER_TOKEN'] is set; else client IP in
    RAGCACHE['METRICS_ALLOWED_IPS'] (addresses and CIDR networks; default: loopback only)."""
    config = get_config()
    token = config["METRICS_BEARER_TOKEN"]
    if token:
        given = bearer_token(request)
        return given is not None and hmac.compare_digest(given.encode(), str(token).encode())
    return client_allowed(request.META.get("REMOTE_ADDR"), config["METRICS_ALLOWED_IPS"])


def _forbidden() -> HttpResponse:
    return HttpResponse("Forbidden: see RAGCACHE['METRICS_ALLOWED_IPS'] / ['METRICS_BEARER_TOKEN'].\n",
                        status=403, content_type="text/plain")


@never_cache
def metrics_view(request: HttpRequest) -> HttpResponse:
    if not access_allowed(request):
        return _forbidden()
    # Shared state lives in Redis, the database and the broker: read it now, in this
    # process, so these gauges are right whichever process (web, Celery, another host)
    # did the work, and absent when they cannot be read.
    return HttpResponse(probes.exposition(probes.read()), content_type=CONTENT_TYPE_LATEST)


@never_cache
def health_view(request: HttpRequest) -> HttpResponse:
    """200 "ok"; 200 "degraded" when ragcache still serves but something it needs is
    broken (Redis refusing writes, a Redis Cluster master down, the database or the broker unreachable, usage events
    waiting longer than AGGREGATION_STALE_AFTER); 503
    "unavailable" when it cannot cache at all (Redis unreachable, or no policies ever
    loaded). ``problems`` names each cause."""
    if not access_allowed(request):
        return _forbidden()
    readings = probes.read()
    redis_state, database, broker = readings.redis, readings.database, readings.broker
    snapshot = registry.current()
    problems = []
    body: dict = {}
    if redis_state.up:
        body["redis"] = {"ok": True, "latency_ms": round(redis_state.latency_s * 1000, 3)}
        if redis_state.masters_full is not None:
            body["redis"]["writes_refused"] = redis_state.masters_full > 0
            if redis_state.masters_full:
                problems.append("redis_refusing_writes")
        if redis_state.masters_down is not None:  # Redis Cluster: one master down is a partial outage
            body["redis"]["masters"] = {"up": redis_state.masters_up, "down": redis_state.masters_down}
            if redis_state.masters_down:
                problems.append("redis_masters_down")
        # Known values only: a key that is missing was not readable, null means "none yet".
        if redis_state.backlog is not None:
            body["usage_backlog"] = redis_state.backlog
        if redis_state.lag_s is not None:
            body["usage_lag_s"] = round(redis_state.lag_s, 1)
            if redis_state.lag_s > float(get_config()["AGGREGATION_STALE_AFTER"]):
                problems.append("aggregation_stale")
        body["last_aggregation"] = redis_state.last_aggregation
        body["last_aggregation_age_s"] = probes.age(redis_state.last_aggregation)
    else:
        body["redis"] = {"ok": False, "error": redis_state.error}
        problems.append("redis_unreachable")
    body["database"] = {"ok": True} if database.up else {"ok": False, "error": database.error}
    if not database.up:
        problems.append("database_unreachable")
    if broker is not None:
        body["broker"] = {"ok": True} if broker.up else {"ok": False, "error": broker.error}
        if not broker.up:
            problems.append("broker_unreachable")
    if not snapshot.available:
        problems.append("policies_unavailable")
    body["policies_loaded"] = sorted(snapshot.policies)
    body["kill_switch"] = snapshot.kill_switch
    unavailable = not redis_state.up or not snapshot.available
    body["status"] = "unavailable" if unavailable else "degraded" if problems else "ok"
    body["problems"] = problems
    return JsonResponse(body, status=503 if unavailable else 200)
