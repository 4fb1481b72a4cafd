"""Policy resolution: an in-memory snapshot of policies, flags, prices and gateway keys.

The hit path runs zero SQL. Each process keeps a snapshot tagged with the version it
was loaded under (``CacheFlags.sequence``, read before the rows). An edit takes a new
version when it commits and writes it to every shard's copy in Redis; every lookup
script returns its shard's copy, and a newer one makes the process reload before it
plans again. ``POLICY_MAX_AGE`` is a backstop for edits Redis never heard of.

When the database cannot be read, the previous snapshot stays in use and the load is
retried at most every ``POLICY_RETRY_INTERVAL`` seconds, with one log line per attempt.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, replace
from decimal import Decimal

from django.db import DatabaseError

from .conf import get_config
from .entries import Usage

logger = logging.getLogger("ragcache.policies")


@dataclass(frozen=True, slots=True)
class Policy:
    name: str
    enabled: bool
    mode: str
    ttl_seconds: int
    scope: str
    ignored_params: frozenset[str]
    normalize_query: bool
    max_entry_bytes: int
    compress_threshold_bytes: int
    rollout_percent: int
    replay_chunk_delay_ms: int
    generation: int

    @property
    def active(self) -> bool:
        return self.enabled and self.mode != "off"


@dataclass(frozen=True, slots=True)
class Price:
    input_per_1k: Decimal
    cached_input_per_1k: Decimal | None
    output_per_1k: Decimal
    currency: str

    def cost(self, usage: Usage) -> Decimal:
        cached = self.input_per_1k if self.cached_input_per_1k is None else self.cached_input_per_1k
        return (self.input_per_1k * usage.prompt_tokens + cached * usage.cached_prompt_tokens
                + self.output_per_1k * usage.completion_tokens) / 1000


@dataclass(frozen=True, slots=True)
class GatewayClient:
    """A gateway key as the gateway sees it (never the key itself)."""

    name: str
    scope: str
    policies: tuple[str, ...]
    controls: frozenset[str]
    active: bool

    @property
    def default_policy(self) -> str:
        return self.policies[0] if self.policies else "default"

    def may_use(self, policy: str) -> bool:
        return policy in self.policies if self.policies else policy == "default"


@dataclass(frozen=True)
class Snapshot:
    version: int
    policies: dict[str, Policy] = field(default_factory=dict)
    kill_switch: bool = False
    tracking_enabled: bool = True
    prices: dict[str, Price] = field(default_factory=dict)
    gateway_keys: dict[str, GatewayClient] = field(default_factory=dict)
    loaded_at: float = 0.0
    available: bool = True  # False: the database could not be read and no earlier snapshot exists

    def cost(self, model: str, usage: Usage) -> Decimal | None:
        price = self.prices.get(model)
        return price.cost(usage) if price is not None else None

    def currency(self, model: str) -> str:
        price = self.prices.get(model)
        return price.currency if price is not None else ""


def load_snapshot() -> Snapshot:
    from .models import CacheFlags, CachePolicy, GatewayKey, ModelPrice

    # The version first: the rows read after it are at least as new as it says.
    flags = CacheFlags.objects.filter(pk=1).first() or CacheFlags()
    config = get_config()
    max_ttl, max_bytes = int(config["MAX_TTL"]), int(config["MAX_ENTRY_BYTES"])
    policies = {
        p.name: Policy(
            name=p.name,
            enabled=p.enabled,
            mode=p.mode,
            ttl_seconds=min(p.ttl_seconds, max_ttl),
            scope=p.scope,
            ignored_params=frozenset(name for name in (p.ignored_params or ()) if isinstance(name, str)),
            normalize_query=p.normalize_query,
            max_entry_bytes=min(p.max_entry_bytes, max_bytes),
            compress_threshold_bytes=p.compress_threshold_bytes,
            rollout_percent=p.rollout_percent,
            replay_chunk_delay_ms=p.replay_chunk_delay_ms,
            generation=p.generation,
        )
        for p in CachePolicy.objects.all()
        if p.ttl_seconds >= 1 and p.mode in ("off", "shadow", "read_only", "on")
    }
    prices = {
        m.model: Price(m.input_per_1k, m.cached_input_per_1k, m.output_per_1k, m.currency)
        for m in ModelPrice.objects.all()
    }
    gateway_keys = {
        k.key_hash: GatewayClient(k.name, k.scope, tuple(k.policies or ()), frozenset(k.allowed_cache_controls or ()),
                                  k.is_active)
        for k in GatewayKey.objects.all()
    }
    return Snapshot(
        version=flags.sequence,
        policies=policies,
        kill_switch=flags.kill_switch,
        tracking_enabled=flags.tracking_enabled,
        prices=prices,
        gateway_keys=gateway_keys,
        loaded_at=time.monotonic(),
    )


class PolicyRegistry:
    def __init__(self) -> None:
        self._snapshot: Snapshot | None = None
        self._retry_at = 0.0
        self._checked_at = 0.0
        self._lock = threading.Lock()

    def check_due(self) -> bool:
        """True at most once a second: for paths that make no lookup, when to ask Redis
        whether the policies changed."""
        now = time.monotonic()
        if now - self._checked_at < 1.0:
            return False
        self._checked_at = now
        return True

    def fresh(self) -> Snapshot | None:
        """The snapshot if it can be used as it is (no reload due); else None."""
        snapshot = self._snapshot
        if snapshot is not None and time.monotonic() - snapshot.loaded_at <= float(get_config()["POLICY_MAX_AGE"]):
            return snapshot
        if snapshot is not None and time.monotonic() < self._retry_at:
            return snapshot  # the database is failing: keep serving what we have
        return None

    def current(self) -> Snapshot:
        """The snapshot, reloaded from the database first if it is due (runs SQL then)."""
        return self.fresh() or self.reload()

    def needs(self, version: int) -> bool:
        """Whether a version seen in Redis is newer than ours (and a reload may be tried)."""
        snapshot = self._snapshot
        return (snapshot is None or version > snapshot.version) and time.monotonic() >= self._retry_at

    def reload(self, seen: int = 0) -> Snapshot:
        """Load from the database; on failure keep the previous snapshot and retry later.

        ``seen``: the policy version a lookup found in Redis, which made us reload. The
        rows just read are this database's latest, so the snapshot counts as at least that
        new: Redis's version is only a signal to reload. A version from elsewhere (another
        database sharing the key prefix, a database restored from a backup) is then never
        chased again by every lookup, at the cost of one SQL reload per lookup."""
        if self._snapshot is not None and time.monotonic() < self._retry_at:
            return self._snapshot
        try:
            snapshot = load_snapshot()
        except DatabaseError as exc:
            interval = float(get_config()["POLICY_RETRY_INTERVAL"])
            with self._lock:
                self._retry_at = time.monotonic() + interval
            _close_if_broken()
            logger.warning(
                "ragcache: could not load cache policies (%s: %s); %s; retrying in %.0f s",
                type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "",
                "keeping the previous ones" if self._snapshot else "the cache is bypassed", interval,
            )
            if self._snapshot is None:
                return Snapshot(version=-1, kill_switch=True, loaded_at=time.monotonic(), available=False)
            return self._snapshot
        if seen > snapshot.version:
            snapshot = replace(snapshot, version=seen)
        with self._lock:
            self._snapshot = snapshot
            self._retry_at = 0.0
        return snapshot

    def invalidate(self) -> None:
        """Drop this process's snapshot (after a local edit, or in tests)."""
        with self._lock:
            self._snapshot = None
            self._retry_at = 0.0


def _close_if_broken() -> None:
    """After a failed load: close the connection if the server dropped it. Django does so
    at request boundaries only; without this a worker thread or a script would retry on a
    dead connection after the database is back."""
    from django.db import Error, connections, router

    from .models import CachePolicy

    conn = connections[router.db_for_read(CachePolicy)]
    if not conn.in_atomic_block:
        try:
            conn.close_if_unusable_or_obsolete()
        except Error:
            pass


registry = PolicyRegistry()


def announce(version: int) -> int:
    """Write ``version`` to every shard's copy (only ever raising it); returns the highest
    version the copies now hold. Raises RedisUnavailable."""
    from . import store
    from .scripts import ANNOUNCE

    layout = store.current_layout()
    replies = store.run_each([(ANNOUNCE, [key], [version]) for key in layout.versions])
    failed = [reply for reply in replies if isinstance(reply, Exception)]
    if failed:
        raise store.RedisUnavailable(f"{len(failed)} of {len(replies)} shards did not take the version: {failed[0]}")
    return max(int(reply) for reply in replies)


def policies_changed() -> None:
    """After a policy, flag, price or gateway key edit commits: take a new version and
    tell every process to reload."""
    from . import store
    from .models import CacheFlags

    registry.invalidate()
    try:
        version = CacheFlags.next_sequence()
        highest = announce(version)
        if highest > version:
            # Redis holds a version from elsewhere (another database under this KEY_PREFIX, a
            # restored backup): take a newer one, or no process would notice this edit.
            logger.warning("ragcache: Redis holds a policy version (%d) ahead of this database's; another "
                           "database may share RAGCACHE['KEY_PREFIX'] (give each its own)", highest)
            announce(CacheFlags.next_sequence(at_least=highest + 1))
    except store.RedisUnavailable:
        logger.warning(
            "ragcache: the change is saved, but Redis is unreachable to announce it; other processes "
            "pick it up within RAGCACHE['POLICY_MAX_AGE'] seconds"
        )
    except DatabaseError:
        logger.warning("ragcache: the change is saved, but its version could not be taken; other processes "
                       "pick it up within RAGCACHE['POLICY_MAX_AGE'] seconds")
