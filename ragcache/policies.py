"""Policy resolution: an in-memory snapshot of policies, flags and prices.

The hit path runs zero SQL. Each process keeps a snapshot tagged with the config
version it was loaded under; every lookup script returns Redis's current version, so
an admin edit (which bumps that version on commit) is seen by every process on its very
next lookup. Paths that make no lookup (kill switch, mode off) re-check the version at
most once a second. ``POLICY_MAX_AGE`` is a backstop for edits Redis never heard of.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from decimal import Decimal

from django.db import DatabaseError

from . import store
from .conf import get_config

logger = logging.getLogger("ragcache.policies")

UNKNOWN_VERSION = "unknown"
REVALIDATE_EVERY = 1.0


@dataclass(frozen=True)
class Policy:
    name: str
    enabled: bool
    mode: str
    ttl_seconds: int
    scope: str
    key_params: frozenset[str]
    normalize_query: bool
    max_entry_bytes: int
    compress_threshold_bytes: int
    rollout_percent: int
    generation: int

    @property
    def active(self) -> bool:
        return self.enabled and self.mode != "off"


@dataclass(frozen=True)
class Snapshot:
    version: str
    policies: dict[str, Policy] = field(default_factory=dict)
    kill_switch: bool = False
    tracking_enabled: bool = True
    prices: dict[str, tuple[Decimal, Decimal]] = field(default_factory=dict)
    loaded_at: float = 0.0

    def cost(self, model: str, prompt_tokens: int, completion_tokens: int) -> Decimal | None:
        price = self.prices.get(model)
        if price is None:
            return None
        return (price[0] * prompt_tokens + price[1] * completion_tokens) / 1000


def load_snapshot(version: str) -> Snapshot:
    from .models import CacheFlags, CachePolicy, ModelPrice

    policies = {
        p.name: Policy(
            name=p.name,
            enabled=p.enabled,
            mode=p.mode,
            ttl_seconds=p.ttl_seconds,
            scope=p.scope,
            key_params=frozenset(p.key_params or ()),
            normalize_query=p.normalize_query,
            max_entry_bytes=p.max_entry_bytes,
            compress_threshold_bytes=p.compress_threshold_bytes,
            rollout_percent=p.rollout_percent,
            generation=p.generation,
        )
        for p in CachePolicy.objects.all()
    }
    flags = CacheFlags.objects.filter(pk=1).first() or CacheFlags()
    prices = {m.model: (m.input_per_1k, m.output_per_1k) for m in ModelPrice.objects.all()}
    return Snapshot(
        version=version,
        policies=policies,
        kill_switch=flags.kill_switch,
        tracking_enabled=flags.tracking_enabled,
        prices=prices,
        loaded_at=time.monotonic(),
    )


class PolicyRegistry:
    def __init__(self) -> None:
        self._snapshot: Snapshot | None = None
        self._checked_at = 0.0
        self._lock = threading.Lock()

    def current(self) -> Snapshot:
        snapshot = self._snapshot
        if snapshot is None or time.monotonic() - snapshot.loaded_at > float(get_config()["POLICY_MAX_AGE"]):
            snapshot = self.reload()
        return snapshot

    def reload(self, version: str | None = None) -> Snapshot:
        """Load policies from the database, tagged with Redis's current config version."""
        if version is None:
            try:
                version = store.get_config_version()
            except store.RedisUnavailable:
                version = UNKNOWN_VERSION  # never equal to Redis's: revalidated once it answers
        try:
            snapshot = load_snapshot(version)
        except DatabaseError:
            logger.exception("ragcache: could not load policies; keeping the previous snapshot")
            if self._snapshot is None:
                return Snapshot(version=UNKNOWN_VERSION, kill_switch=True, loaded_at=time.monotonic())
            return self._snapshot
        with self._lock:
            self._snapshot = snapshot
            self._checked_at = time.monotonic()
        return snapshot

    def seen_version(self, version: str) -> Snapshot:
        """Called with the version a lookup returned; reloads if ours is older."""
        snapshot = self.current()
        if snapshot.version != version:
            return self.reload(version)
        self._checked_at = time.monotonic()
        return snapshot

    def revalidate(self) -> Snapshot:
        """For paths that make no lookup: check Redis's version at most once a second."""
        snapshot = self.current()
        if time.monotonic() - self._checked_at < REVALIDATE_EVERY:
            return snapshot
        self._checked_at = time.monotonic()
        try:
            version = store.get_config_version()
        except store.RedisUnavailable:
            return snapshot
        return self.seen_version(version)

    def invalidate(self) -> None:
        """Drop this process's snapshot (after a local edit)."""
        self._snapshot = None


registry = PolicyRegistry()


def policies_changed() -> None:
    """After a policy/flag/price edit commits: tell every process to reload."""
    registry.invalidate()
    try:
        store.bump_config_version()
    except store.RedisUnavailable:
        logger.warning(
            "ragcache: policy change saved, but Redis is unreachable to announce it; other "
            "processes pick it up within RAGCACHE['POLICY_MAX_AGE'] seconds"
        )
