"""The cache's decisions, written once for the sync and async APIs (see effects.py).

Reading order of a hit: ``plans.plan`` (policy from the in-memory snapshot, flags, key)
-> ``lookup`` (one LOOKUP script: the entry, the policy version, the stamps of its
sources and the usage event, in one round trip) -> ``entries.decode`` ->
``outcomes.record_lookup`` (metrics, the step 63 line: every outcome is recorded there).

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
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import orjson

from . import metrics
from .conf import get_config
from .connection import RedisUnavailable
from .effects import END, Begin, Call, Close, ConsumerGone, Emit, Next, Reload, Run, RunEach, Sleep, WaitFlight
from .entries import (
    KIND_RESPONSE,
    KIND_STREAM,
    META_PREFIX,
    CachedResponse,
    CorruptEntry,
    Refused,
    StreamRecorder,
    decode,
    encode,
    extract,
    make_meta,
)
from .exceptions import StreamInterrupted
from .keys import (
    CacheKey,
    source_hash,
)
from .outcomes import CallResult, StreamInfo, record_lookup, record_store
from .plans import (
    Plan,
    Request,
    _plan,
    _replan,
    _sources,
    _waited_us,
    tuning,
)
from .policies import registry
from .scripts import DELETE, EVENT, LOOKUP, PUBLISH, RELEASE, STAMPS, STORE
from .steplog import log_step
from .steplog import logger as step_logger

logger = logging.getLogger("ragcache.services")

FLIGHT_BLOCK_MS = 1000  # one blocking read of a flight; below BULK_SOCKET_TIMEOUT


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
    layout_ = tuning().layout
    shard = plan.key.shard
    try:
        version, lost = yield Run(EVENT, [layout_.streams[shard], layout_.versions[shard]], [
            "1" if plan.snapshot.tracking_enabled and record else "0", tuning().stream_maxlen, *fields], shard)
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
        yield Reload(version)  # e.g. the kill switch was turned off: the next request uses the cache


def lookup(request: Request, *, lock: bool = False):
    """Steps 59-62. ``lock``: take the single-flight lock on a miss (get_or_call)."""
    if step_logger.isEnabledFor(logging.DEBUG):
        log_step(59, {"policy": request.policy[:64], "model": str(request.model)[:128], "single_flight": lock},
                 logging.DEBUG)
    if _later:
        yield from _run_later()
    began = time.perf_counter()
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
            yield Reload(int(reply[1]))  # an edit elsewhere: the next request plans with it
        if status == b"hit":
            try:
                cached = decode(reply[2], reply[3], key.entry)
            except CorruptEntry as exc:
                yield from _corrupt(request, current, str(exc), reply[5])
                return Lookup(current, "miss", "corrupt")
            record_lookup(request, current, "shadow_hit" if shadow else "hit", cached=None if shadow else cached,
                          since=began,
                          lost=reply[4])
            return Lookup(current, "miss", "shadow") if shadow else Lookup(current, "hit", cached=cached)
        if status == b"follower":
            return Lookup(current, "follower", leader=reply[2].decode())
        reason = reply[2].decode()
        if reason == "corrupt":
            metrics.child(metrics.CORRUPT_ENTRIES, policy.name).inc()
            logger.warning("ragcache: unreadable entry %s deleted; served as a miss", key.short)
        record_lookup(request, current, "stale_source" if reason == "stale_source" else "miss", reason, lost=reply[3],
                      since=began)
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
                   [token, "failed", tuning().flight_ttl_ms, "0", 1, "", "", ""]))


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
    key, t = plan.key, tuning()
    try:
        lost = yield Run(RELEASE, [key.lock, key.flight(token) if token else key.lock, t.layout.streams[key.shard]], [
            token, status, t.flight_ttl_ms, "1" if plan.snapshot.tracking_enabled else "0", t.stream_maxlen,
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
        key, t, snapshot = plan.key, tuning(), plan.snapshot
        try:
            reply = yield Run(STORE, [key.entry, t.layout.streams[key.shard], t.layout.versions[key.shard], key.lock,
                                      key.flight(token) if token else key.lock], [
                snapshot.version, ttl * 1000, meta, body, "1" if snapshot.tracking_enabled else "0", t.stream_maxlen,
                plan.header, token, t.layout.stamp_bases[key.shard], plan.sources, stamps, _new_stamp(),
                t.stamp_ttl_ms, t.flight_ttl_ms], key.shard)
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
    if _later:  # a process that only stores runs its deferred cleanups here
        yield from _run_later()
    current = yield from _plan(request)
    if current.bypass and registry.check_due():
        # No lookup tells a store-only caller that the cache came back (kill switch off):
        # ask the shard's version, at most once a second.
        version = yield from _event(current, record=False)
        if version is not None and registry.needs(version):
            yield Reload(version)
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
    lock_ms, flight_ttl = tuning().lock_ms, tuning().flight_ttl_ms
    publishing = bool(token)
    published, cap = 0, policy.max_entry_bytes if policy else 0
    refused = "refused" if may_store else ""
    while True:
        try:
            chunk = yield Next(iterator)
        except BaseException as exc:
            # An error of the upstream, or our caller cancelled (a client that went away).
            reason = "upstream_error" if isinstance(exc, Exception) else "incomplete"
            if may_store:
                record_store(plan, "refused", reason=reason)
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
    yield Begin(_info(own, "miss"))  # no longer shared: the stream says so (reason leader_failed)
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
