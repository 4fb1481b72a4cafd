"""The request headers that steer the cache, each honoured only if the key allows it.

=============================  ==================  =============================================
Request header                 Key must allow      Effect
=============================  ==================  =============================================
``Cache-Control: no-cache``    ``no-cache``        skip the lookup, call the upstream, store
                                                   (``X-Ragcache: REFRESH``)
``Cache-Control: no-store``    ``no-store``        serve a hit, but never store this answer
``Cache-Control: max-age=N``   ``max-age``         store this answer for N seconds, 1 <= N <=
                                                   the policy's TTL
``X-Ragcache-Policy: NAME``    ``policy``          use policy NAME (it must also be one of the
                                                   key's policies)
``X-Ragcache-Sources: a,b``    ``sources``         record the answer's source documents (see
                                                   ``cache_service.invalidate_sources``)
=============================  ==================  =============================================

A control the key does not allow is refused with 403 (``code: cache_control_not_allowed``,
naming it), as LiteLLM's ``allowed_cache_controls`` does; it is never silently ignored, so
a client that asks for ``no-store`` knows when it did not get it. Other ``Cache-Control``
directives (``max-stale``, ``no-transform``, ...) are ignored, as HTTP says unknown ones
must be. The scope is never a request header: it is the key's.
"""
from __future__ import annotations

from dataclasses import dataclass

from django.http import HttpRequest

from ..conf import get_config
from ..plans import MAX_SOURCE_LENGTH
from ..policies import GatewayClient, Snapshot
from .errors import GatewayError

POLICY_HEADER = "X-Ragcache-Policy"
SOURCES_HEADER = "X-Ragcache-Sources"
MAX_HEADER_LENGTH = 8192


@dataclass(frozen=True, slots=True)
class Controls:
    """What the request asked for: the service's per-call keyword arguments."""

    policy: str
    refresh: bool = False
    no_store: bool = False
    ttl: int | None = None
    sources: tuple[str, ...] | None = None


def _not_allowed(control: str, name: str, header: str) -> GatewayError:
    return GatewayError(
        403, f"The gateway key {name!r} may not send the cache control {control!r}: ask an operator to allow it "
        f"(gateway key, allowed cache controls).", code="cache_control_not_allowed", param=header)


def cache_control_directives(value: str) -> dict[str, str | None]:
    """``Cache-Control`` as ``{directive (lower case): argument or None}``. Raises
    ``GatewayError`` 400 when a directive appears twice with different arguments."""
    found: dict[str, str | None] = {}
    for part in value.split(","):
        name, sep, argument = part.strip().partition("=")
        name = name.strip().lower()
        if not name:
            continue
        argument_value = argument.strip().strip('"') if sep else None
        if name in found and found[name] != argument_value:
            raise GatewayError(400, f"Cache-Control has {name!r} twice with different values.",
                               code="invalid_cache_control", param="Cache-Control")
        found[name] = argument_value
    return found


def _header_text(headers, name: str) -> str:
    """A header's value as the client sent it: Django hands headers over decoded as
    ISO-8859-1 (as WSGI and ASGI specify), so UTF-8 text such as a source id "Ärzte:1"
    is decoded again. Raises ``GatewayError`` 400 for bytes that are not UTF-8."""
    value = headers[name]
    try:
        return value.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        raise GatewayError(400, f"The {name} header is not UTF-8 text.", code="invalid_header", param=name) from None


def read_controls(request: HttpRequest, client: GatewayClient, snapshot: Snapshot) -> Controls:
    """The controls of ``request`` under ``client``'s permissions. Raises ``GatewayError``:
    403 for a control or policy the key may not use, 400 for a malformed one or an unknown
    policy."""
    headers = request.headers
    for header in ("Cache-Control", POLICY_HEADER, SOURCES_HEADER):
        if len(headers.get(header, "")) > MAX_HEADER_LENGTH:
            raise GatewayError(400, f"The {header} header is longer than {MAX_HEADER_LENGTH} characters.",
                               code="invalid_header", param=header)
    allowed = client.controls

    policy = client.default_policy
    if POLICY_HEADER in headers:
        if "policy" not in allowed:
            raise _not_allowed("policy", client.name, POLICY_HEADER)
        policy = _header_text(headers, POLICY_HEADER).strip()
        if not policy:
            raise GatewayError(400, f"{POLICY_HEADER} is empty: name a cache policy.", code="invalid_policy",
                               param=POLICY_HEADER)
        if not client.may_use(policy):
            raise GatewayError(403, f"The gateway key {client.name!r} may not use the cache policy {policy[:64]!r}.",
                               code="policy_not_allowed", param=POLICY_HEADER)
        if policy not in snapshot.policies:
            raise GatewayError(400, f"There is no cache policy named {policy[:64]!r}.", code="unknown_policy",
                               param=POLICY_HEADER)

    directives = cache_control_directives(headers.get("Cache-Control", ""))
    refresh = "no-cache" in directives
    no_store = "no-store" in directives
    for control, asked in (("no-cache", refresh), ("no-store", no_store), ("max-age", "max-age" in directives)):
        if asked and control not in allowed:
            raise _not_allowed(control, client.name, "Cache-Control")
    ttl = None
    if "max-age" in directives:
        ttl = _max_age(directives["max-age"], snapshot, policy)

    sources = None
    if SOURCES_HEADER in headers:
        if "sources" not in allowed:
            raise _not_allowed("sources", client.name, SOURCES_HEADER)
        sources = tuple(dict.fromkeys(s.strip() for s in _header_text(headers, SOURCES_HEADER).split(",")
                                      if s.strip()))
        if not sources:
            raise GatewayError(400, f"{SOURCES_HEADER} names no source: send comma-separated ids such as doc:42.",
                               code="invalid_sources", param=SOURCES_HEADER)
        limit = int(get_config()["MAX_SOURCES"])
        if len(sources) > limit:
            raise GatewayError(400, f"{SOURCES_HEADER} names {len(sources)} sources; an answer may cite at most "
                               f"{limit} (RAGCACHE['MAX_SOURCES']).", code="invalid_sources", param=SOURCES_HEADER)
        if any(len(source) > MAX_SOURCE_LENGTH for source in sources):
            raise GatewayError(400, f"Each source id in {SOURCES_HEADER} must be at most {MAX_SOURCE_LENGTH} "
                               "characters.", code="invalid_sources", param=SOURCES_HEADER)
    return Controls(policy, refresh, no_store, ttl, sources)


def _max_age(argument: str | None, snapshot: Snapshot, policy: str) -> int:
    limit = snapshot.policies[policy].ttl_seconds if policy in snapshot.policies else None
    if argument is None or not argument.isascii() or not argument.isdigit() or len(argument) > 12:
        raise GatewayError(400, "Cache-Control max-age must be a whole number of seconds, e.g. max-age=600.",
                           code="invalid_cache_control", param="Cache-Control")
    seconds = int(argument)
    if seconds < 1 or (limit is not None and seconds > limit):
        upper = f"the policy's TTL ({limit} s)" if limit is not None else "the policy's TTL"
        raise GatewayError(400, f"Cache-Control max-age must be from 1 to {upper}; use no-store not to store.",
                           code="invalid_cache_control", param="Cache-Control")
    return seconds
