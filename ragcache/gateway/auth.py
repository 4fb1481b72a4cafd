"""Gateway keys: ``Authorization: Bearer <key>`` -> the ``GatewayClient`` it belongs to.

Keys are looked up by their SHA-256 in the in-memory policy snapshot (ragcache.policies),
so authenticating a request runs no SQL. A key the snapshot does not know makes the
process reload the snapshot, at most once per ``UNKNOWN_KEY_RELOAD_INTERVAL`` seconds, so
a key created a moment ago in another process works at once while a flood of made-up keys
costs the database at most one reload a second. Edits to keys (deactivation included) are
announced like policy edits: every process reloads on its next lookup that sees the new
version, and within ``RAGCACHE['POLICY_MAX_AGE']`` at the latest.

``last_used_at`` is written at most once a minute per key and process, with
``QuerySet.update`` (no signal: a busy key never makes every process reload).
"""
from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime

from asgiref.sync import sync_to_async
from django.db import DatabaseError
from django.http import HttpRequest

from ..policies import GatewayClient, Snapshot, registry
from .errors import GatewayError

logger = logging.getLogger("ragcache.gateway")

UNKNOWN_KEY_RELOAD_INTERVAL = 1.0  # seconds
LAST_USED_INTERVAL = 60.0  # seconds
MAX_KEY_LENGTH = 512

_state_lock = threading.Lock()
_last_unknown_reload = 0.0
_last_used: dict[str, float] = {}  # key hash -> when this process last wrote last_used_at (monotonic)


def bearer_key(request: HttpRequest) -> str | None:
    """The credentials of ``Authorization: Bearer <key>`` (scheme case-insensitive), or None."""
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    return credentials.strip(" ") or None


def _hash(key: str) -> str:
    from ..models import GatewayKey

    return GatewayKey.hash_key(key)


async def snapshot() -> Snapshot:
    """The current policy snapshot (reloaded from the database, in a thread, when due)."""
    found = registry.fresh()
    if found is None:
        found = await sync_to_async(registry.reload, thread_sensitive=True)()
    return found


async def _reload_for_unknown_key() -> Snapshot | None:
    global _last_unknown_reload
    now = time.monotonic()
    with _state_lock:
        if now - _last_unknown_reload < UNKNOWN_KEY_RELOAD_INTERVAL:
            return None
        _last_unknown_reload = now
    return await sync_to_async(registry.reload, thread_sensitive=True)()


def _unauthorized(message: str, code: str) -> GatewayError:
    return GatewayError(401, message, code=code, headers={"WWW-Authenticate": 'Bearer realm="ragcache"'})


async def authenticate(request: HttpRequest) -> tuple[GatewayClient, Snapshot]:
    """The key's client and the snapshot it was found in. Raises ``GatewayError`` 401 for a
    missing, unknown or inactive key (the message never repeats the key)."""
    key = bearer_key(request)
    if key is None:
        raise _unauthorized("You didn't provide a gateway key. Send it as 'Authorization: Bearer YOUR_KEY'.",
                            "missing_api_key")
    if len(key) > MAX_KEY_LENGTH:
        raise _unauthorized("Incorrect gateway key provided.", "invalid_api_key")
    key_hash = _hash(key)
    current = await snapshot()
    client = current.gateway_keys.get(key_hash)
    if client is None:
        reloaded = await _reload_for_unknown_key()
        if reloaded is not None:
            current = reloaded
            client = current.gateway_keys.get(key_hash)
    if client is None:
        raise _unauthorized("Incorrect gateway key provided.", "invalid_api_key")
    if not client.active:
        raise _unauthorized(f"The gateway key {client.name!r} is deactivated.", "inactive_api_key")
    await touch(key_hash)
    return client, current


def _write_last_used(key_hash: str) -> None:
    from ..models import GatewayKey

    try:
        GatewayKey.objects.filter(key_hash=key_hash).update(last_used_at=datetime.now(UTC))
    except DatabaseError as exc:
        logger.warning("ragcache: could not record a gateway key's last use (%s)", type(exc).__name__)


async def touch(key_hash: str) -> None:
    """Record the key's use, at most once per ``LAST_USED_INTERVAL`` in this process."""
    now = time.monotonic()
    with _state_lock:
        last = _last_used.get(key_hash)
        if last is not None and now - last < LAST_USED_INTERVAL:
            return
        _last_used[key_hash] = now
    await sync_to_async(_write_last_used, thread_sensitive=True)(key_hash)


def forget_last_used() -> None:
    """Write ``last_used_at`` again on each key's next use (tests)."""
    global _last_unknown_reload
    with _state_lock:
        _last_used.clear()
        _last_unknown_reload = 0.0
