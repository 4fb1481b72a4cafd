"""The demo's gateway key: kept in ``settings.DEMO_GATEWAY_KEY_FILE`` (.run/, git-ignored,
mode 0600), and a ``GatewayKey`` row named ``demo`` whose hash matches it.

``ensure_demo_key()`` is idempotent: the file is made once; the row is created, or re-keyed
to the file's key, when it does not match (a fresh database, a new checkout). A key an
operator deactivated stays deactivated. The demo page hands this key to the browser, which
is fine for a local demo and never for a real key.
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path

from django.conf import settings

from ragcache.models import CacheControl, GatewayKey

DEMO_KEY_NAME = "demo"


def _read(path: Path) -> str:
    try:
        key = path.read_text().strip()
    except FileNotFoundError:
        return ""
    return key if key.startswith(GatewayKey.KEY_PREFIX) and len(key) >= 24 else ""


def _write_new(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    key = GatewayKey.KEY_PREFIX + secrets.token_urlsafe(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # made meanwhile by another process
        return _read(path) or _replace(path, key)
    with os.fdopen(fd, "w") as handle:
        handle.write(key + "\n")
    return key


def _replace(path: Path, key: str) -> str:
    temporary = path.with_suffix(".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(key + "\n")
    os.replace(temporary, path)
    return key


def ensure_demo_key(path: Path | None = None) -> tuple[str, GatewayKey]:
    """(the key, its row). Creates what is missing; never reactivates a deactivated key."""
    path = Path(path or settings.DEMO_GATEWAY_KEY_FILE)
    key = _read(path) or _write_new(path)
    key_hash = GatewayKey.hash_key(key)
    row = GatewayKey.objects.filter(name=DEMO_KEY_NAME).first()
    if row is None:
        row = GatewayKey(name=DEMO_KEY_NAME, key_hash=key_hash, key_prefix=key[:10], scope="",
                         policies=["default"], allowed_cache_controls=[c.value for c in CacheControl])
        row.save()
    elif row.key_hash != key_hash:
        row.key_hash, row.key_prefix = key_hash, key[:10]
        row.save(update_fields=["key_hash", "key_prefix"])
    return key, row
