"""Requests and plans: what a call asks, and what the cache decides for it from the
in-memory policy snapshot alone (policy, bypass reason, key). No I/O but a policy reload,
yielded as an effect (see effects.py)."""
from __future__ import annotations

import logging
import reprlib
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .conf import get_config
from .effects import RELOAD, Reload
from .exceptions import InvalidRequestError, ScopeRequiredError
from .keys import (
    CacheKey,
    Messages,
    content_digest,
    key_params,
    layout,
    normalize_messages,
    rollout_bucket,
    scope_hash,
    source_hash,
)
from .policies import Policy, Snapshot, registry
from .steplog import log_step
from .steplog import logger as step_logger
from .usage import event_header

logger = logging.getLogger("ragcache.services")

MAX_SOURCE_LENGTH = 512
STREAM_SHARE = 16  # each shard's stream may hold 1/STREAM_SHARE of RAGCACHE["STREAM_MAXLEN"]


@dataclass(slots=True)
class Request:
    messages: Messages
    model: str
    policy: str
    scope: Any
    params: Mapping[str, Any] | None
    context_version: Any
    sources: tuple[str, ...] = ()
    kind: str = "call"
    refresh: bool = False
    no_store: bool = False
    ttl: int | None = None
    gateway_key: str = ""
    started: float = field(default_factory=time.perf_counter)


def make_request(
    messages: Messages, *, model: str, policy: str, scope: Any, params: Any, context_version: Any,
    sources: Iterable[str] | None = None, kind: str = "call", refresh: bool = False, no_store: bool = False,
    ttl: int | None = None, gateway_key: str = "",
) -> Request:
    """Validate what every entry point takes; raises ``InvalidRequestError``."""
    if ttl is not None and (not isinstance(ttl, int) or isinstance(ttl, bool) or ttl < 1):
        raise InvalidRequestError(f"ttl must be a positive number of seconds, not {ttl!r}.")
    if not isinstance(policy, str) or not policy:
        raise InvalidRequestError("policy must be the name of a cache policy, e.g. policy='default'.")
    return Request(messages, model, policy, scope, params, context_version, _sources(sources), kind, refresh,
                   no_store, ttl, gateway_key or "")


def _sources(sources: Iterable[str] | None, *, cited: bool = True) -> tuple[str, ...]:
    """The distinct source ids, in order. ``cited``: the ids one answer cites (at most
    MAX_SOURCES); otherwise ids to invalidate (any number)."""
    if sources is None:
        return ()
    if isinstance(sources, (str, bytes)) or not isinstance(sources, Iterable):
        raise InvalidRequestError('sources must be an iterable of source ids, e.g. sources=["doc:42"].')
    limit = int(get_config()["MAX_SOURCES"]) if cited else None
    found: dict[str, None] = {}
    for source in sources:  # each checked before it is hashed: a list among them is an error, not a TypeError
        if not isinstance(source, str) or not source or len(source) > MAX_SOURCE_LENGTH:
            raise InvalidRequestError(
                f"Each source id must be a non-empty string of at most {MAX_SOURCE_LENGTH} characters, "
                f"not {reprlib.repr(source)}.")
        found[source] = None
        if limit is not None and len(found) > limit:
            raise InvalidRequestError(f"An answer may cite at most {limit} sources (RAGCACHE['MAX_SOURCES']).")
    return tuple(found)


@dataclass(slots=True)
class Plan:
    snapshot: Snapshot
    policy: Policy | None
    key: CacheKey
    bypass: str  # why the cache is not used for this request ("" when it is)
    header: str  # the usage events' header
    sources: str  # "h1,h2": the source hashes, for the scripts

    @property
    def policy_name(self) -> str:
        return self.policy.name if self.policy else "unknown"


def plan(request: Request, snapshot: Snapshot) -> Plan:
    """Decide, from the snapshot alone, how the cache treats ``request``. Raises
    ``InvalidRequestError`` for a request that cannot be keyed, and ``ScopeRequiredError``
    under a per-user or per-tenant policy without ``scope``."""
    policy = snapshot.policies.get(request.policy)
    if policy is not None and policy.scope != "global" and request.scope is None:
        raise ScopeRequiredError(policy.name, policy.scope)
    messages = normalize_messages(request.messages, normalize=bool(policy and policy.normalize_query))
    ignored = policy.ignored_params if policy else frozenset()
    digest = content_digest(messages, model=request.model, params=key_params(request.params, ignored),
                            context_version=request.context_version, kind=request.kind)
    scope = scope_hash(policy.scope if policy else "global", request.scope)
    name = policy.name if policy else "unknown"
    key = CacheKey(tuning().layout, name, policy.generation if policy else 0, scope, digest)
    if step_logger.isEnabledFor(logging.DEBUG):
        log_step(61, {"policy": name, "cache_key": key.short}, logging.DEBUG)
    if not snapshot.available:
        bypass = "policies_unavailable"
    elif policy is None:
        bypass = "unknown_policy"
    elif snapshot.kill_switch:
        bypass = "kill_switch"
    elif not policy.enabled:
        bypass = "disabled"
    elif policy.mode == "off":
        bypass = "mode_off"
    elif rollout_bucket(digest) >= policy.rollout_percent:
        bypass = "rollout"
    elif request.refresh:
        bypass = "no_cache"
    else:
        bypass = ""
    sources = ",".join(source_hash(s) for s in request.sources)
    return Plan(snapshot, policy, key, bypass, event_header(name, request.model, scope, key.short,
                                                            request.gateway_key), sources)


def _snapshot():
    snapshot = registry.fresh()
    if snapshot is None:
        snapshot = yield RELOAD
    return snapshot


_warned_policies: set[str] = set()


def _plan(request: Request):
    snapshot = yield from _snapshot()
    result = plan(request, snapshot)
    if result.bypass == "unknown_policy" and request.policy not in _warned_policies:
        if len(_warned_policies) < 1000:  # once per name and process (bounded: names come from callers)
            _warned_policies.add(request.policy)
        logger.warning("ragcache: no cache policy named %r; calls bypass the cache", request.policy[:64])
    if step_logger.isEnabledFor(logging.DEBUG):
        policy = result.policy
        log_step(60, {"policy": result.policy_name, "mode": policy.mode if policy else None,
                      "scope": policy.scope if policy else None, "bypass": result.bypass or None}, logging.DEBUG)
    return result


def _replan(request: Request, version: int):
    """The shard has a newer policy version: reload (once) and plan again."""
    if registry.needs(version):
        yield Reload(version)
    snapshot = yield from _snapshot()
    return plan(request, snapshot)


class Tuning:
    """Figures derived from the settings that every call needs; rebuilt when they change."""

    __slots__ = ("config", "layout", "stream_maxlen", "lock_ms", "stamp_ttl_ms", "guard_stamp_ttl_ms", "flight_ttl_ms")

    def __init__(self, config: dict) -> None:
        self.config = config
        self.layout = layout(config["KEY_PREFIX"])
        # Per shard: a sixteenth of the cap, so a shard with hot questions holds 16x its even
        # share before trimming (the streams together stay bounded: see conf.STREAM_MAXLEN).
        self.stream_maxlen = max(1, int(config["STREAM_MAXLEN"]) // STREAM_SHARE)
        self.lock_ms = int(float(config["LOCK_TIMEOUT"]) * 1000)
        self.stamp_ttl_ms = (int(config["MAX_TTL"]) + 3600) * 1000  # outlives any entry citing it
        # A stamp a lookup creates for the write guard: the store extends it to stamp_ttl_ms;
        # if nothing is stored it goes soon (a call longer than this is refused as stale).
        self.guard_stamp_ttl_ms = max(3600_000, 2 * self.lock_ms)
        self.flight_ttl_ms = int((float(config["LOCK_WAIT"]) + 5) * 1000)


_tuning: Tuning | None = None


def tuning() -> Tuning:
    global _tuning
    config = get_config()
    found = _tuning
    if found is None or found.config is not config:
        found = _tuning = Tuning(config)
    return found






def _waited_us(request: Request) -> int:
    return int((time.perf_counter() - request.started) * 1_000_000)

