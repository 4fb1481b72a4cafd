"""The cache's decisions, written once for the sync and async APIs (see effects.py).

Reading order of a hit: ``plan`` (policy from the in-memory snapshot, flags, key) ->
``lookup`` (one LOOKUP script: the entry, the policy version, the stamps of its sources
and the usage event, in one round trip) -> ``decode`` -> ``record`` (metrics, the step
63 line: every outcome is recorded in that one place).

A miss under mode ``on`` takes the single-flight lock in that same round trip. The
leader calls the LLM and stores (STORE: value and expiry together, the write guard, the
store event, the lock released, the followers told) or releases (RELEASE). Followers
wait on the leader's flight stream: a stream's chunks arrive there live; when the
flight ends without an answer to read, every follower is released at once.

An answer is stored only under the policy state its call began with: the STORE script
refuses it if the policies changed meanwhile (a purge, a mode or TTL edit) or if one of
its sources was invalidated meanwhile.
"""
from __future__ import annotations

import logging
import os
import reprlib
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from . import metrics
from .conf import get_config
from .connection import RedisUnavailable
from .effects import END, RELOAD, Begin, Call, Close, ConsumerGone, Emit, Next, Run, RunEach, Sleep, WaitFlight
from .entries import (
    KIND_RESPONSE,
    KIND_STREAM,
    META_PREFIX,
    CachedResponse,
    CorruptEntry,
    Refused,
    StreamRecorder,
    Usage,
    decode,
    encode,
    extract,
    make_meta,
)
from .exceptions import InvalidRequestError, ScopeRequiredError, StreamInterrupted
from .keys import (
    SHARDS,
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
from .scripts import DELETE, EVENT, LOOKUP, PUBLISH, RELEASE, STAMPS, STORE
from .steplog import log_step
from .steplog import logger as step_logger
from .usage import UsageEvent, event_header, parse_header, usage_tracker

logger = logging.getLogger("ragcache.services")

MAX_SOURCE_LENGTH = 512
FLIGHT_BLOCK_MS = 1000  # one blocking read of a flight; below BULK_SOCKET_TIMEOUT


# --- what the caller gets ------------------------------------------------------------------

@dataclass(slots=True)
class CallResult:
    """What ``get_or_call`` returns. ``response`` has the shape ``call()`` returned (or was
    stored with). ``outcome``: hit, miss, bypass, refresh or error (Redis unavailable);
    ``reason`` says why when there is one (see docs). ``key`` is the entry's Redis key."""

    response: Any
    hit: bool
    key: str | None
    cached: CachedResponse | None = None
    latency_ms: float = 0.0
    outcome: str = "miss"
    reason: str = ""
    stored: bool = False
    policy: str = ""
    key_id: str = ""  # the short key: what logs, usage records and headers show


@dataclass(slots=True)
class StreamInfo:
    """Known before a stream's first chunk: a hit, or what else."""

    hit: bool
    key: str | None
    outcome: str  # hit | miss | shared (a follower of an identical live stream) | bypass | refresh | error
    reason: str
    policy: str
    key_id: str
    cached: CachedResponse | None = None


# --- requests and plans -----------------------------------------------------------------

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
        yield RELOAD
    snapshot = yield from _snapshot()
    return plan(request, snapshot)


class Tuning:
    """Figures derived from the settings that every call needs; rebuilt when they change."""

    __slots__ = ("config", "layout", "stream_maxlen", "lock_ms", "stamp_ttl_ms", "guard_stamp_ttl_ms", "flight_ttl_ms")

    def __init__(self, config: dict) -> None:
        self.config = config
        self.layout = layout(config["KEY_PREFIX"])
        self.stream_maxlen = max(1, int(config["STREAM_MAXLEN"]) // SHARDS)  # per shard
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


def _stream_maxlen() -> int:
    return tuning().stream_maxlen


def _lock_ms() -> int:
    return tuning().lock_ms


def _stamp_ttl_ms() -> int:
    return tuning().stamp_ttl_ms


def _flight_ttl_ms() -> int:
    return tuning().flight_ttl_ms


def _waited_us(request: Request) -> int:
    return int((time.perf_counter() - request.started) * 1_000_000)


# --- recording: metrics, hit rates, step lines and usage, in one place -------------------

class HitRates:
    """Each policy's hit rate over this process's last HIT_RATE_WINDOW lookups."""

    def __init__(self) -> None:
        self._windows: dict[str, deque] = {}
        self._lock = threading.Lock()

    def record(self, policy: str, hit: bool) -> None:
        window = self._windows.get(policy)
        if window is None:
            with self._lock:
                window = self._windows.setdefault(policy, deque(maxlen=int(get_config()["HIT_RATE_WINDOW"])))
        window.append(hit)

    def rate(self, policy: str) -> float | None:
        window = self._windows.get(policy)
        return round(sum(window) / len(window), 4) if window else None


hit_rates = HitRates()


def record_lookup(request: Request, plan: Plan, result: str, reason: str = "", *, cached: CachedResponse | None = None,
                  lost: int = 0) -> None:
    """Count one lookup's outcome: ``result`` is hit, miss, shadow_hit, stale_source,
    bypass or error (the ``ragcache_lookups_total`` label)."""
    name = plan.policy_name
    metrics.child(metrics.LOOKUPS, name, result).inc()
    if lost:
        metrics.child(metrics.EVENTS_LOST, "redis_full").inc()
    if result == "bypass" or result == "error":
        if step_logger.isEnabledFor(logging.DEBUG):
            log_step(62, {"policy": name, "cache_key": plan.key.short, "hit": False, "result": result,
                          "reason": reason}, logging.DEBUG)
            if result == "bypass" and reason != "no_cache":
                _log_tracked(plan, result, reason)
        return
    elapsed = time.perf_counter() - request.started
    metrics.child(metrics.LOOKUP_SECONDS, name).observe(elapsed)
    hit_rates.record(name, result == "hit")
    if step_logger.isEnabledFor(logging.DEBUG):
        log_step(62, {"policy": name, "cache_key": plan.key.short, "hit": result == "hit", "result": result,
                      "reason": reason or None}, logging.DEBUG)
        if result == "miss" and reason:  # lock_timeout, leader_released, corrupt, ...
            _log_tracked(plan, result, reason)
    if result == "hit" and cached is not None:
        record_hit(request, plan, cached, elapsed * 1000, reason)


def record_hit(request: Request, plan: Plan, cached: CachedResponse, waited_ms: float, reason: str = "") -> None:
    """Step 63 for a served hit (its event is already in the stream)."""
    cost = cached.cost
    prices = plan.snapshot.prices
    if cost is None and cached.usage_known and prices:
        price = prices.get(cached.model or request.model) or prices.get(request.model)
        if price is not None:
            cost = price.cost(Usage(cached.prompt_tokens, cached.cached_prompt_tokens, cached.completion_tokens, True))
    usage_tracker.track(UsageEvent(
        policy=plan.policy_name, result="hit", model=request.model, scope_hash=plan.key.scope, key_hash=plan.key.short,
        reason=reason, tokens_avoided=cached.tokens if cached.usage_known else 0, cost_avoided=cost,
        latency_avoided_ms=max(0.0, (cached.latency_ms or 0.0) - waited_ms), latency_ms=waited_ms,
        usage_known=cached.usage_known, gateway_key=request.gateway_key,
    ), written=True)


def _log_tracked(plan: Plan, result: str, reason: str) -> None:
    """Step 63 at DEBUG for a tracked result other than a hit (a bypass, a refusal, a miss
    with a reason); its event is written by a script in its own round trip."""
    if plan.snapshot.tracking_enabled and step_logger.isEnabledFor(logging.DEBUG):
        _, model, scope, key, gateway_key = parse_header(plan.header)
        usage_tracker.track(UsageEvent(policy=plan.policy_name, result=result, model=model, scope_hash=scope,
                                       key_hash=key, reason=reason, gateway_key=gateway_key), written=True)


def record_store(plan: Plan, status: str, *, ttl: int = 0, size: int = 0, reason: str = "") -> None:
    """Step 68: ``status`` is stored, refused or error (``ragcache_stores_total``)."""
    name = plan.policy_name
    metrics.child(metrics.STORES, name, status).inc()
    attrs: dict[str, Any] = {"cache_key": plan.key.short, "hit_rate": hit_rates.rate(name)}
    if status == "stored":
        metrics.ENTRY_BYTES.observe(size)
        attrs["expiry_time"] = datetime.fromtimestamp(time.time() + ttl, UTC).isoformat(timespec="seconds")
        attrs.update(policy=name, ttl=ttl, bytes=size)
    else:
        if status == "refused":
            metrics.child(metrics.REFUSALS, name, reason).inc()
            _log_tracked(plan, "refused", reason)
        attrs.update(policy=name, stored=False, reason=reason or status)
    log_step(68, attrs)


# --- lookup (steps 59-62) -----------------------------------------------------------------

@dataclass(slots=True)
class Lookup:
    plan: Plan
    outcome: str  # hit | miss | leader | follower | bypass | error
    reason: str = ""
    cached: CachedResponse | None = None
    token: str = ""  # ours, when we are the leader
    leader: str = ""  # the leader's, when we follow
    stamps: str = ""  # the request's source stamps when the call began (write guard)


def _event(plan: Plan, *fields: Any, record: bool = True):
    """Append one event (EVENT script) to the plan's shard. Returns the shard's policy
    version, or None when Redis is unavailable."""
    layout_ = layout(get_config()["KEY_PREFIX"])
    shard = plan.key.shard
    try:
        version, lost = yield Run(EVENT, [layout_.streams[shard], layout_.versions[shard]], [
            "1" if plan.snapshot.tracking_enabled and record else "0", _stream_maxlen(), *fields], shard)
    except RedisUnavailable:
        return None
    if lost:
        metrics.child(metrics.EVENTS_LOST, "redis_full").inc()
    return int(version)


def _bypass(request: Request, plan: Plan):
    """Record a bypass: its event, which also tells us the shard's policy version."""
    record_lookup(request, plan, "bypass", plan.bypass)
    if plan.bypass == "no_cache":
        return  # a refresh records its store (or refusal) afterwards
    # Every bypass is recorded, an unknown policy's too (under the name "unknown").
    version = yield from _event(plan, "r", "bypass", "h", plan.header, "x", plan.bypass)
    if version is not None and registry.needs(version):
        yield RELOAD  # e.g. the kill switch was turned off: the next request uses the cache


def lookup(request: Request, *, lock: bool = False):
    """Steps 59-62. ``lock``: take the single-flight lock on a miss (get_or_call)."""
    if step_logger.isEnabledFor(logging.DEBUG):
        log_step(59, {"policy": request.policy[:64], "model": str(request.model)[:128], "single_flight": lock},
                 logging.DEBUG)
    if _later:
        yield from _run_later()
    current = yield from _plan(request)
    for _attempt in range(2):
        if current.bypass:
            yield from _bypass(request, current)
            return Lookup(current, "bypass", current.bypass)
        policy, key = current.policy, current.key
        shadow = policy.mode == "shadow"
        # Only "on" stores; read-only and shadow followers would only queue for nothing.
        token = _new_token() if lock and policy.mode == "on" and not request.no_store else ""
        snapshot = current.snapshot
        t = tuning()
        try:
            keys_ = [key.entry, t.layout.streams[key.shard], t.layout.versions[key.shard], key.lock]
            reply = yield Run(LOOKUP, keys_, [
                snapshot.version, "1" if snapshot.tracking_enabled else "0", "shadow_hit" if shadow else "hit",
                t.lock_ms if token else 0, token, t.stream_maxlen, current.header, _waited_us(request), META_PREFIX,
                t.layout.stamp_bases[key.shard], current.sources, _new_stamp() if current.sources else "",
                t.guard_stamp_ttl_ms], key.shard)
        except RedisUnavailable:
            if token:
                _abandon(key, token)  # a timed-out script may still run on a stalled server
            record_lookup(request, current, "error", "redis_unavailable")
            return Lookup(current, "error", "redis_unavailable")
        except BaseException:
            if token:  # cancelled while the script ran: it may have taken the lock
                _abandon(key, token)
                yield from _release(current, token, "failed")
            raise
        status = reply[0]
        if status == b"stale":
            current = yield from _replan(request, int(reply[1]))
            continue
        if registry.needs(int(reply[1])):
            yield RELOAD  # an edit elsewhere: the next request plans with it
        if status == b"hit":
            try:
                cached = decode(reply[2], reply[3], key.entry)
            except CorruptEntry as exc:
                yield from _corrupt(request, current, str(exc), reply[5])
                return Lookup(current, "miss", "corrupt")
            record_lookup(request, current, "shadow_hit" if shadow else "hit", cached=None if shadow else cached,
                          lost=reply[4])
            return Lookup(current, "miss", "shadow") if shadow else Lookup(current, "hit", cached=cached)
        if status == b"follower":
            return Lookup(current, "follower", leader=reply[2].decode())
        reason = reply[2].decode()
        if reason == "corrupt":
            metrics.child(metrics.CORRUPT_ENTRIES, policy.name).inc()
            logger.warning("ragcache: unreadable entry %s deleted; served as a miss", key.short)
        record_lookup(request, current, "stale_source" if reason == "stale_source" else "miss", reason, lost=reply[3])
        leader = status == b"leader"
        return Lookup(current, "leader" if leader else "miss", reason, token=token if leader else "",
                      stamps=reply[4].decode() if current.sources else "")
    record_lookup(request, current, "error", "policy_changing")
    return Lookup(current, "error", "policy_changing")


def _corrupt(request: Request, plan: Plan, why: str, event_id: bytes):
    """An entry whose metadata passed the script's checks but whose body is unreadable:
    the script recorded a hit. Delete the entry, void that hit (aggregation turns it into
    a miss) and count the lookup as a miss."""
    metrics.child(metrics.CORRUPT_ENTRIES, plan.policy_name).inc()
    logger.warning("ragcache: unreadable entry %s deleted (%s); served as a miss", plan.key.short, why[:100])
    record_lookup(request, plan, "miss", "corrupt")
    try:
        yield Run(DELETE, [plan.key.entry], [], plan.key.shard)
    except RedisUnavailable:
        _later.append((DELETE, [plan.key.entry], []))
    if event_id:
        yield from _event(plan, "r", "void", "ref", event_id)


# --- single flight ---------------------------------------------------------------------------

# Cleanups whose outcome we could not see (a timeout, a cancellation, Redis down): the next
# flow runs them. A lock is released only if it is still ours; an entry whose store may or
# may not have happened is deleted, so that it is either servable or absent.
_later: deque[tuple[Any, list, list]] = deque(maxlen=1000)


def _abandon(key: CacheKey, token: str) -> None:
    _later.append((RELEASE, [key.lock, key.flight(token), key.lock],
                   [token, "failed", _flight_ttl_ms(), "0", 1, "", "", ""]))


def _run_later():
    pending = []
    while _later and len(pending) < 100:
        pending.append(_later.popleft())
    try:
        yield RunEach(pending, bulk=False)  # inside a request: never wait past the hot path's timeout
    except RedisUnavailable:
        _later.extendleft(reversed(pending))


def _release(plan: Plan, token: str, status: str, result: str = "", reason: str = ""):
    """Done without storing: release our lock, end our flight (``released``: no answer to
    read; ``failed``: the leader broke off) and record ``result`` (e.g. refused)."""
    if not token and not result:
        return
    key = plan.key
    streams = layout(get_config()["KEY_PREFIX"]).streams
    try:
        lost = yield Run(RELEASE, [key.lock, key.flight(token) if token else key.lock, streams[key.shard]], [
            token, status, _flight_ttl_ms(), "1" if plan.snapshot.tracking_enabled else "0", _stream_maxlen(),
            plan.header, result, reason], key.shard)
    except BaseException:
        if token:
            _abandon(key, token)
        if isinstance(sys.exc_info()[1], RedisUnavailable):
            return
        raise
    if lost:
        metrics.child(metrics.EVENTS_LOST, "redis_full").inc()


def _new_token() -> str:
    from .store import new_token

    return new_token()


def _new_stamp() -> str:
    return os.urandom(8).hex()


def _follow(request: Request, found: Lookup):
    """Wait for the leader's flight to end. Returns the post-flight lookup (a hit when the
    leader stored) or a miss this caller answers itself (``leader_released``,
    ``lock_timeout``), without a lock: released followers never queue behind each other."""
    plan, key = found.plan, found.plan.key
    flight = key.flight(found.leader)
    deadline = time.monotonic() + float(get_config()["LOCK_WAIT"])
    after = "0-0"
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return (yield from _own_call(request, plan, "lock_timeout"))
        try:
            entries = yield WaitFlight(flight, after, max(1, min(FLIGHT_BLOCK_MS, int(remaining * 1000))), key.shard)
        except RedisUnavailable:
            return (yield from _own_call(request, plan, "redis_unavailable"))
        for entry_id, fields in entries:
            after = entry_id
            status = fields.get(b"s")
            if status == b"stored":
                return (yield from lookup(request))  # a hit (or, if already gone, a recorded miss)
            if status is not None:
                return (yield from _own_call(request, plan, "leader_released"))


def _own_call(request: Request, plan: Plan, reason: str):
    """A follower that calls the LLM itself: its lookup is a miss, recorded now."""
    record_lookup(request, plan, "miss", reason)
    yield from _event(plan, "r", "miss", "h", plan.header, "x", reason)
    return Lookup(plan, "miss", reason)


def _guard_stamps(request: Request, plan: Plan, found: Lookup):
    """The stamps the write guard compares at the store: those the lookup read, or, for a
    call whose lookup read none (a refresh, a shadow hit, a follower calling the LLM
    itself), the current ones, read now, before the call. Without them an answer built
    from a source invalidated during the call would be stored as fresh."""
    policy = plan.policy
    if found.stamps or not plan.sources or request.no_store or policy is None or policy.mode not in ("on", "shadow") \
            or plan.bypass not in ("", "no_cache"):
        return found.stamps
    t, key = tuning(), plan.key
    try:
        stamps = yield Run(STAMPS, [t.layout.versions[key.shard]], [
            t.layout.stamp_bases[key.shard], plan.sources, _new_stamp(), t.guard_stamp_ttl_ms], key.shard)
    except RedisUnavailable:  # stamps that never match: the store (if Redis is back by then) refuses
        return ",".join("-" for _ in request.sources)
    return stamps.decode() if isinstance(stamps, bytes) else str(stamps)


# --- store (step 68) ------------------------------------------------------------------------

def store(request: Request, plan: Plan, answer_of: Callable[[], Any], *, kind: str, latency_ms: float | None,
          token: str = "", stamps: str = "", retry: bool = False):
    """Step 68: admit, encode and store an answer; always releases ``token``'s lock.
    ``answer_of()`` returns the ``Answer`` or raises ``Refused``. ``retry``: a direct
    ``cache_response`` may plan again once if the policies just changed. Returns stored."""
    for _attempt in range(2):
        policy = plan.policy
        # Shadow mode stores too: it measures would-be hits, and always calls the LLM.
        if policy is None or plan.bypass not in ("", "no_cache") or policy.mode not in ("on", "shadow") \
                or request.no_store:
            yield from _release(plan, token, "released")
            return False
        ttl = min(request.ttl or policy.ttl_seconds, policy.ttl_seconds)
        try:
            answer = answer_of()
            meta, body = encode(
                answer.body, kind=kind, model=request.model, finish_reason=answer.finish_reason, usage=answer.usage,
                cost=answer.cost, latency_ms=latency_ms, ttl_seconds=ttl,
                compress_threshold=policy.compress_threshold_bytes, max_bytes=policy.max_entry_bytes,
            )
        except Refused as refusal:
            if refusal.reason.startswith("invalid_"):
                logger.warning("ragcache: answer not cached (%s): %s", refusal.reason, str(refusal)[:200])
            record_store(plan, "refused", reason=refusal.reason)
            yield from _release(plan, token, "released", "refused", refusal.reason)
            return False
        key = plan.key
        layout_ = layout(get_config()["KEY_PREFIX"])
        snapshot = plan.snapshot
        try:
            reply = yield Run(STORE, [key.entry, layout_.streams[key.shard], layout_.versions[key.shard], key.lock,
                                      key.flight(token) if token else key.lock], [
                snapshot.version, ttl * 1000, meta, body, "1" if snapshot.tracking_enabled else "0", _stream_maxlen(),
                plan.header, token, f"{key.base}:s:", plan.sources, stamps, _new_stamp(), _stamp_ttl_ms(),
                _flight_ttl_ms()], key.shard)
        except RedisUnavailable:
            if token:
                _abandon(key, token)
            _later.append((DELETE, [key.entry], []))  # stored or not, we cannot tell: make it absent
            record_store(plan, "error", reason="redis_unavailable")
            return False
        status, version, lost = reply[0], int(reply[1]), reply[2]
        if lost:
            metrics.child(metrics.EVENTS_LOST, "redis_full").inc()
        if status == b"stored":
            record_store(plan, "stored", ttl=ttl, size=len(meta) + len(body))
            return True
        if status == b"stale" and retry and not token:
            plan = yield from _replan(request, version)
            continue
        reason = {b"stale": "policy_changed", b"stale_source": "stale_source", b"full": "redis_full"}.get(
            status, status.decode())
        record_store(plan, "refused", reason=reason)
        return False
    return False


# --- the public operations -----------------------------------------------------------------------

def get_cached_response(request: Request):
    found = yield from lookup(request)
    return found.cached if found.outcome == "hit" else None


def cache_response(request: Request, response: Any, latency_ms: float | None):
    current = yield from _plan(request)
    if current.bypass and registry.check_due():
        # No lookup tells a store-only caller that the cache came back (kill switch off):
        # ask the shard's version, at most once a second.
        version = yield from _event(current, record=False)
        if version is not None and registry.needs(version):
            yield RELOAD
            current = yield from _plan(request)
    return (yield from store(request, current, lambda: extract(response), kind=KIND_RESPONSE,
                             latency_ms=latency_ms, retry=True))


def _may_store(found: Lookup) -> bool:
    return found.outcome in ("miss", "leader") or found.reason == "no_cache"


def _outcome(found: Lookup) -> str:
    if found.outcome == "bypass":
        return "refresh" if found.reason == "no_cache" else "bypass"
    return "miss" if found.outcome == "leader" else found.outcome


def get_or_call(request: Request, call: Callable[[], Any]):
    found = yield from lookup(request, lock=True)
    if found.outcome == "follower":
        found = yield from _follow(request, found)
    plan = found.plan
    if found.outcome == "hit":
        return CallResult(found.cached.response, True, plan.key.entry, found.cached,
                          (time.perf_counter() - request.started) * 1000, "hit", found.reason, False,
                          plan.policy_name, plan.key.short)
    stamps = (yield from _guard_stamps(request, plan, found)) if _may_store(found) else ""
    call_started = time.perf_counter()
    try:
        response = yield Call(call)
    except BaseException:
        yield from _release(plan, found.token, "failed")
        raise
    call_ms = (time.perf_counter() - call_started) * 1000
    stored = False
    if _may_store(found):
        stored = yield from store(request, plan, lambda: extract(response), kind=KIND_RESPONSE, latency_ms=call_ms,
                                  token=found.token, stamps=stamps)
    return CallResult(response, False, plan.key.entry if plan.policy else None, None,
                      (time.perf_counter() - request.started) * 1000, _outcome(found), found.reason, stored,
                      plan.policy_name, plan.key.short)


def _info(found: Lookup, outcome: str) -> StreamInfo:
    plan = found.plan
    return StreamInfo(outcome == "hit", plan.key.entry if plan.policy else None, outcome, found.reason,
                      plan.policy_name, plan.key.short, found.cached)


def get_or_stream(request: Request, call: Callable[[], Any]):
    """Yields ``Begin(StreamInfo)`` first (after calling the LLM on a miss, so that its
    errors reach the caller as they would without the cache), then ``Emit(chunk)``s."""
    found = yield from lookup(request, lock=True)
    if found.outcome == "hit":
        yield Begin(_info(found, "hit"))
        delay = found.plan.policy.replay_chunk_delay_ms / 1000
        for index, chunk in enumerate(found.cached.response):
            if delay and index:
                yield Sleep(delay)
            try:
                yield Emit(chunk)
            except ConsumerGone:
                return
        return
    if found.outcome == "follower":
        yield Begin(_info(found, "shared"))
        yield from _follow_stream(request, found, call)
        return
    may_store = _may_store(found)
    stamps = (yield from _guard_stamps(request, found.plan, found)) if may_store else ""
    started = time.perf_counter()
    try:
        iterator = yield Call(call, stream=True)
    except BaseException:
        yield from _release(found.plan, found.token, "failed")
        raise
    try:
        yield Begin(_info(found, _outcome(found)))
    except ConsumerGone:  # closed before its first chunk: release the lock and the upstream now
        yield from _consumer_gone(found.plan, found.token, iterator, may_store)
        return
    yield from _pass_through(request, found.plan, iterator, found.token, stamps, may_store, started)


def _close(iterator: Any):
    """Close an upstream iterator left unfinished; a failure to close is not the caller's."""
    try:
        yield Close(iterator)
    except Exception:  # noqa: BLE001 - e.g. a generator still running in a cancelled worker thread
        pass


def _consumer_gone(plan: Plan, token: str, iterator: Any, may_store: bool):
    if may_store:
        record_store(plan, "refused", reason="incomplete")
    yield from _release(plan, token, "failed", "refused" if may_store else "", "incomplete")
    yield from _close(iterator)


def _pass_through(request: Request, plan: Plan, iterator: Any, token: str, stamps: str, may_store: bool,
                  started: float):
    """Hand each chunk on as it arrives, record it, and (as leader) publish it to the
    followers; store the recording if the stream completed and admission accepts it.
    ``started``: when the upstream call began (the latency a hit will avoid)."""
    policy = plan.policy
    recorder = StreamRecorder(policy.max_entry_bytes if policy else 0)
    key = plan.key
    lock_ms, flight_ttl = _lock_ms(), _flight_ttl_ms()
    publishing = bool(token)
    published, cap = 0, policy.max_entry_bytes if policy else 0
    refused = "refused" if may_store else ""
    while True:
        try:
            chunk = yield Next(iterator)
        except BaseException as exc:
            # An error of the upstream, or our caller cancelled (a client that went away).
            reason = "upstream_error" if isinstance(exc, Exception) else "incomplete"
            yield from _release(plan, token, "failed", refused, reason)
            yield from _close(iterator)
            raise
        if chunk is END:
            break
        data = recorder.add(chunk) if may_store or publishing else b""
        try:
            yield Emit(chunk)
        except ConsumerGone:
            yield from _consumer_gone(plan, token, iterator, may_store)
            return
        if publishing:
            published += len(data)
            # A chunk that is not JSON cannot be relayed, and past max_entry_bytes the answer
            # cannot be stored while Redis must not hold an unbounded flight: end the flight
            # (followers fail over) and go on for our own consumer alone.
            if not data or published > cap:
                yield from _release(plan, token, "failed")
                publishing, token = False, ""
                continue
            try:
                yield Run(PUBLISH, [key.lock, key.flight(token)], [token, lock_ms, flight_ttl, data], key.shard)
            except RedisUnavailable:
                publishing = False  # the followers time out and call the LLM themselves
            except BaseException:  # cancelled meanwhile (a client that went away): as for a consumer gone
                yield from _consumer_gone(plan, token, iterator, may_store)
                raise
    if may_store:
        yield from store(request, plan, recorder.finish, kind=KIND_STREAM,
                         latency_ms=(time.perf_counter() - started) * 1000, token=token, stamps=stamps)
    else:
        yield from _release(plan, token, "released")


def _follow_stream(request: Request, found: Lookup, call: Callable[[], Any]):
    """Receive an identical live stream's chunks from its leader as they are published. If
    the leader breaks off before this stream handed anything on, call the LLM instead;
    after that, raise ``StreamInterrupted``."""
    plan, key = found.plan, found.plan.key
    flight = key.flight(found.leader)
    idle = float(get_config()["LOCK_WAIT"])
    deadline = time.monotonic() + idle
    after, handed = "0-0", 0
    recorder = StreamRecorder(0)  # only its usage and finish reason are needed: keeps no chunk
    status = None
    while status is None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            status = b"failed"
            break
        try:
            entries = yield WaitFlight(flight, after, max(1, min(FLIGHT_BLOCK_MS, int(remaining * 1000))), key.shard)
        except RedisUnavailable:
            status = b"failed"
            break
        for entry_id, fields in entries:
            after = entry_id
            deadline = time.monotonic() + idle
            data = fields.get(b"c")
            if data is None:
                status = fields.get(b"s") or b"failed"
                break
            chunk = orjson.loads(data)
            recorder.add(chunk)
            handed += 1
            try:
                yield Emit(chunk)
            except ConsumerGone:
                return
    if status in (b"stored", b"released"):
        yield from _record_shared(request, plan, recorder)
        return
    own = yield from _own_call(request, plan, "leader_failed")
    if handed:
        raise StreamInterrupted("the identical stream this one was sharing broke off after its first chunks were "
                                "delivered; it cannot be resumed")
    stamps = yield from _guard_stamps(request, plan, own)
    started = time.perf_counter()
    iterator = yield Call(call, stream=True)
    yield from _pass_through(request, plan, iterator, "", stamps, plan.policy.mode in ("on", "shadow"), started)


def _record_shared(request: Request, plan: Plan, recorder: StreamRecorder):
    """A follower received a whole stream without calling the LLM: a hit (``shared_flight``)
    with the usage its leader's stream reported, or unknown usage."""
    usage = recorder.usage
    now = time.time()
    meta = make_meta(kind=KIND_STREAM, model=request.model, finish_reason=recorder.finish_reason, usage=usage,
                     cost=recorder.cost, latency_ms=None, created=now, expires=now)
    cached = CachedResponse(None, None, request.model, recorder.finish_reason, usage.prompt_tokens,
                            usage.completion_tokens, recorder.cost, None, now, now, plan.key.entry,
                            usage.cached_prompt_tokens, usage.known, "stream")
    record_lookup(request, plan, "hit", "shared_flight", cached=cached)
    yield from _event(plan, "r", "hit", "h", plan.header, "w", _waited_us(request), "e", meta, "x", "shared_flight")


# --- invalidation ---------------------------------------------------------------------------------

INVALIDATE_BATCH = 1000  # stamp keys per DELETE command


def invalidate_sources(ids: Iterable[str]):
    """Delete the stamps of ``ids`` on every shard: every answer recorded with one of them
    stops matching and misses, in every process. Returns the number of sources. Raises
    ``RedisUnavailable`` unless every shard confirmed (the call is idempotent: retry it)."""
    sources = _sources(ids, cited=False)
    if not sources:
        return 0
    hashes = [source_hash(s) for s in sources]
    bases = tuning().layout.stamp_bases
    replies = yield RunEach([(DELETE, [f"{base}{h}" for h in hashes[i:i + INVALIDATE_BATCH]], [])
                             for i in range(0, len(hashes), INVALIDATE_BATCH) for base in bases])
    failed = [reply for reply in replies if isinstance(reply, Exception)]
    if failed:  # a pipeline reports each command's error instead of raising
        raise RedisUnavailable(f"{len(failed)} of {len(replies)} shard deletions failed "
                               f"({str(failed[0])[:200]}): the invalidation is incomplete; retry it")
    metrics.SOURCE_INVALIDATIONS.inc(len(sources))
    return len(sources)
