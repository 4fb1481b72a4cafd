"""Source invalidation, Django side: answers drop when the documents they cite change.

    from ragcache.sources import track

    track(Document, source=lambda doc: f"doc:{doc.pk}")   # e.g. in AppConfig.ready()

Each ``save()`` or ``delete()`` of a ``Document`` (or of a proxy or subclass of it) then
calls ``cache_service.invalidate_sources([f"doc:{pk}"])`` once the transaction commits
(``transaction.on_commit``): never inside it, never for a transaction rolled back. The
answers cached with ``sources=["doc:42", ...]`` miss from then on, in every process,
policy and scope (see docs/invalidation.md).

Bulk writes send no signals (``QuerySet.update()``, ``bulk_create()``, ``bulk_update()``,
raw SQL, another program writing the table): call ``invalidate(ids)`` yourself, inside
the same transaction, e.g.::

    with transaction.atomic():
        changed = list(Document.objects.filter(stale=True).values_list("pk", flat=True))
        Document.objects.filter(pk__in=changed).update(stale=False)
        ragcache.sources.invalidate(f"doc:{pk}" for pk in changed)

Redis unavailable at commit time: the invalidation is not dropped. It is logged at ERROR
(with the ids and the command that replays it), counted in
``ragcache_source_invalidations_deferred_total``, kept in this process and retried every
``RETRY_SECONDS`` by a daemon thread and before any later invalidation from this process.
Until a retry succeeds, processes that still reach Redis may serve answers built from the
old documents. The queue lives in process memory: if the process exits before Redis is
back, the invalidations are lost; that is logged at ERROR (with the ids) and counted in
``ragcache_source_invalidations_dropped_total``, and ``manage.py ragcache_invalidate``
replays them.
"""
from __future__ import annotations

import atexit
import itertools
import logging
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any

from django.db import DEFAULT_DB_ALIAS, models, transaction
from django.db.models.signals import post_delete, post_save

from . import metrics
from .connection import RedisUnavailable
from .exceptions import InvalidRequestError
from .keys import source_hash

__all__ = ["SourceStamp", "entry_sources", "flush", "invalidate", "pending", "source_hash", "track", "untrack"]

logger = logging.getLogger("ragcache.sources")

SourceOf = Callable[[Any], "str | Iterable[str] | None"]

RETRY_SECONDS = 5.0  # between retries of deferred invalidations
MAX_PENDING = 100_000  # deferred ids kept per process; beyond, the oldest are dropped (loudly)
LOGGED_IDS = 20  # ids named in one log line

_SAVE_UID = "ragcache.sources.post_save"
_DELETE_UID = "ragcache.sources.post_delete"


# --- track() ----------------------------------------------------------------------------------

_tracked: dict[type, SourceOf] = {}
_resolved: dict[type, SourceOf | None] = {}  # per concrete class, through its MRO


def track(model: type[models.Model], source: SourceOf) -> None:
    """Invalidate ``source(instance)`` (a source id, an iterable of them, or None for
    none) after every committed ``save()`` or ``delete()`` of ``model``, its proxies and
    subclasses. Idempotent: tracking a model again replaces its ``source`` function and
    never connects twice. Raises ``TypeError`` when ``model`` is not a Django model class
    or ``source`` is not callable."""
    if not isinstance(model, type) or not issubclass(model, models.Model):
        raise TypeError(f"track() takes a Django model class, not {model!r}")
    if not callable(source):
        raise TypeError("track() needs source=callable(instance) -> 'doc:42' (or an iterable of ids)")
    _tracked[model] = source
    _resolved.clear()
    # One receiver for every model (dispatch_uid: connected once however often track() runs);
    # it looks the instance's class up, so proxies and subclasses are covered too.
    post_save.connect(_changed, dispatch_uid=_SAVE_UID, weak=False)
    post_delete.connect(_changed, dispatch_uid=_DELETE_UID, weak=False)


def untrack(model: type[models.Model]) -> None:
    """Stop tracking ``model`` (the receivers go when no model is tracked)."""
    _tracked.pop(model, None)
    _resolved.clear()
    if not _tracked:
        post_save.disconnect(dispatch_uid=_SAVE_UID)
        post_delete.disconnect(dispatch_uid=_DELETE_UID)


def tracked() -> dict[type, SourceOf]:
    """The tracked models and their source functions (a copy)."""
    return dict(_tracked)


def _source_of(cls: type) -> SourceOf | None:
    try:
        return _resolved[cls]
    except KeyError:
        found = next((_tracked[klass] for klass in cls.__mro__ if klass in _tracked), None)
        _resolved[cls] = found
        return found


def _changed(sender: type, instance: Any, using: str = DEFAULT_DB_ALIAS, **kwargs: Any) -> None:
    source = _source_of(type(instance))
    if source is not None:
        invalidate(source(instance), using=using)


# --- invalidate() -----------------------------------------------------------------------------

def redis_setting() -> str:
    """The setting that says where ragcache's Redis is (what error messages tell to check)."""
    from .conf import get_config

    config = get_config()
    if config.get("REDIS_CLUSTER_URL"):
        return "RAGCACHE['REDIS_CLUSTER_URL']"
    return f"CACHES[{config['CACHE_ALIAS']!r}]['LOCATION'] (the alias named by RAGCACHE['CACHE_ALIAS'])"


def _ids(ids: str | Iterable[str] | None) -> tuple[str, ...]:
    if ids is None:
        return ()
    if isinstance(ids, str):
        ids = (ids,)
    from .plans import _sources

    return _sources(ids, cited=False)


def invalidate(ids: str | Iterable[str] | None, *, using: str | None = None) -> None:
    """Invalidate source ids (one id, an iterable of them, or None) once the current
    transaction of database ``using`` commits, at once outside a transaction; never if it
    rolls back. Redis trouble never raises here: the invalidation is deferred and retried
    (see the module docstring). Raises ``InvalidRequestError`` for ids that are not
    non-empty strings of at most 512 characters."""
    found = _ids(ids)
    if found:
        transaction.on_commit(partial(_send, found), using=using, robust=True)


def _send(ids: tuple[str, ...]) -> bool:
    """Invalidate ``ids`` now, with any deferred ones; defer them if Redis fails."""
    with _lock:
        retry = dict(_pending)
    try:
        _invalidate_now(tuple(dict.fromkeys((*retry, *ids))))
    except RedisUnavailable as exc:
        _defer(ids, exc)
        return False
    if retry:
        _forget(retry)
    return True


def _invalidate_now(ids: tuple[str, ...]) -> None:
    from .services import cache_service

    cache_service.invalidate_sources(ids)


# --- the retry queue ----------------------------------------------------------------------------

_lock = threading.Lock()
_pending: dict[str, int] = {}  # id -> sequence number of its latest deferral (insertion order: oldest first)
_sequence = itertools.count(1)
_retrier: threading.Thread | None = None
_wake = threading.Event()


def pending() -> tuple[str, ...]:
    """The source ids whose invalidation failed in this process and waits for a retry."""
    with _lock:
        return tuple(_pending)


def flush() -> int:
    """Retry the deferred invalidations now. Returns how many ids were sent (0 when there
    were none, or Redis is still unavailable; they then stay queued)."""
    with _lock:
        retry = dict(_pending)
    if not retry:
        return 0
    try:
        _invalidate_now(tuple(retry))
    except RedisUnavailable as exc:
        logger.warning("ragcache: %d deferred source invalidation(s) still waiting: Redis unavailable (%s)",
                       len(retry), str(exc)[:200])
        return 0
    _forget(retry)
    return len(retry)


def _forget(sent: dict[str, int]) -> None:
    """Drop the ids sent, unless deferred again since (a later change's invalidation)."""
    with _lock:
        for source, number in sent.items():
            if _pending.get(source) == number:
                del _pending[source]
        left = len(_pending)
    logger.warning("ragcache: %d deferred source invalidation(s) done; %d still waiting", len(sent), left)


def _named(ids: Iterable[str]) -> str:
    ids = list(ids)
    shown = " ".join(_quoted(source[:200]) for source in ids[:LOGGED_IDS])
    return shown + (f" (and {len(ids) - LOGGED_IDS} more)" if len(ids) > LOGGED_IDS else "")


def _quoted(text: str) -> str:
    """A shell word: what to paste after ``manage.py ragcache_invalidate``."""
    import shlex

    return shlex.quote(text)


def _defer(ids: tuple[str, ...], exc: BaseException) -> None:
    dropped: list[str] = []
    with _lock:
        for source in ids:
            _pending.pop(source, None)
            _pending[source] = next(_sequence)
        while len(_pending) > MAX_PENDING:
            oldest = next(iter(_pending))
            del _pending[oldest]
            dropped.append(oldest)
        waiting = len(_pending)
    metrics.SOURCE_INVALIDATIONS_DEFERRED.inc(len(ids))
    logger.error(
        "ragcache: could not invalidate %d source(s) after a commit: Redis unavailable (%s). Answers built from "
        "them may still be served until a retry succeeds; retrying every %.0f s in this process (%d waiting). "
        "If this process stops first, run: manage.py ragcache_invalidate %s",
        len(ids), str(exc)[:200], RETRY_SECONDS, waiting, _named(ids))
    if dropped:
        _lost(dropped, "the retry queue is full")
    _start_retrier()


def _lost(ids: list[str], why: str) -> None:
    metrics.SOURCE_INVALIDATIONS_DROPPED.inc(len(ids))
    logger.error("ragcache: %d source invalidation(s) LOST (%s): answers built from them may be served until they "
                 "expire. Run: manage.py ragcache_invalidate %s", len(ids), why, _named(ids))


def _start_retrier() -> None:
    global _retrier
    with _lock:
        if _retrier is not None and _retrier.is_alive():
            return
        _retrier = threading.Thread(target=_retry_loop, name="ragcache-source-retry", daemon=True)
        _retrier.start()


def _retry_loop() -> None:
    global _retrier
    while True:
        _wake.wait(RETRY_SECONDS)
        _wake.clear()
        try:
            flush()
        except Exception:  # noqa: BLE001 - the retrier must outlive any surprise; it logs and goes on
            logger.exception("ragcache: retrying deferred source invalidations failed")
        with _lock:
            if not _pending:
                _retrier = None
                return


def _at_exit() -> None:
    if not pending():
        return
    flush()  # Redis may be back
    left = list(pending())
    if left:
        _lost(left, "the process is exiting")


def _after_fork_in_child() -> None:
    """A forked child has no retrier thread; it keeps the queue (a second invalidation of
    the same ids is harmless) and starts its own retrier when it needs one."""
    global _lock, _retrier, _wake
    _lock, _retrier, _wake = threading.Lock(), None, threading.Event()
    if _pending:
        _start_retrier()


atexit.register(_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# --- what an entry cites (for the explain and policy views) ---------------------------------------

@dataclass(frozen=True)
class SourceStamp:
    """One source recorded with an entry. ``hash``: ``source_hash(id)`` (entries keep
    hashes, not ids); ``id``: the id, when one of the ids given hashes to it; ``recorded``:
    the stamp stored with the entry; ``current``: the shard's stamp now (None: the source
    was invalidated, or Redis evicted the stamp). The entry is served only while every
    source is ``fresh``."""

    hash: str
    recorded: str
    current: str | None
    id: str | None = None

    @property
    def fresh(self) -> bool:
        return self.current == self.recorded


def entry_sources(key: str, ids: Iterable[str] = ()) -> list[SourceStamp] | None:
    """The sources recorded with the entry at Redis key ``key`` (``CallResult.key``) and
    their stamps' state: [] for an entry citing none, None when there is no entry. ``ids``:
    candidate source ids, to name the hashes they match. Reads Redis (one slot); raises
    ``RedisUnavailable``. Not for the hot path."""
    from . import connection, store

    marker = key.find(":e:")
    if marker < 0:
        raise InvalidRequestError("not a ragcache entry key (<prefix>:<schema>:{<shard>}:e:...)")
    stamp_base = key[:marker] + ":s:"
    names = {source_hash(source): source for source in _ids(ids)}

    def read() -> list[SourceStamp] | None:
        client = connection.client()
        found = client.hmget(key, "m", "b", "s")
        if not found[0] and not found[1]:
            return None
        recorded = [pair.split("=", 1) for pair in (found[2] or b"").decode().split(",") if "=" in pair]
        current = [client.get(stamp_base + h) for h, _ in recorded]
        return [SourceStamp(h, stamp, value.decode() if value is not None else None, names.get(h))
                for (h, stamp), value in zip(recorded, current, strict=True)]

    return store.guarded(read)
