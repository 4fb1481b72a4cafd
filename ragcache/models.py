"""Policies, global flags, prices, gateway keys and usage tables.

Invariants live in the database as check constraints too, so a ``QuerySet.update()`` or
a raw SQL edit cannot store a policy ragcache cannot honour (a TTL of 0, a rollout of
150 %). Generations and policy versions come from one monotonic sequence
(``CacheFlags.sequence``): a policy's generation only ever grows, whatever is saved,
deleted or re-created, so entries of an earlier generation can never be reached again.
"""
from __future__ import annotations

import hashlib
import re
import secrets
import time
from decimal import Decimal

from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models, transaction
from django.db.models.functions import Greatest

from .conf import get_config

PARAM_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,63}$")
# Request fields that never shape the answer: transport and bookkeeping. Every other
# request parameter enters the key.
DEFAULT_IGNORED_PARAMS = [
    "stream",
    "user",
    "metadata",
    "timeout",
    "extra_headers",
    "extra_query",
    "store",
    "safety_identifier",
    "prompt_cache_key",
    "prompt_cache_retention",
    "service_tier",
]
MAX_ENTRY_BYTES_CEILING = 64 * 1024 * 1024
MAX_REPLAY_DELAY_MS = 10_000


def default_ignored_params() -> list[str]:
    return list(DEFAULT_IGNORED_PARAMS)


def validate_param_names(value: object) -> None:
    if not isinstance(value, list):
        raise ValidationError('Enter a JSON list of parameter names, for example ["user", "metadata"].')
    seen: set[str] = set()
    for name in value:
        if not isinstance(name, str) or not PARAM_NAME_RE.match(name):
            raise ValidationError(
                "%(name)r is not a parameter name: use letters, digits, '_', '.' or '-', starting with a "
                "letter or '_' (at most 64 characters).",
                params={"name": name},
            )
        if name in seen:
            raise ValidationError("%(name)r is listed twice.", params={"name": name})
        seen.add(name)


# Referenced by migration 0001 (0.1's allow-list of key params, replaced by ignored_params).
def default_key_params() -> list[str]:
    return []


validate_key_params = validate_param_names


def human_duration(seconds: int | None) -> str:
    """``90061`` -> ``"1 d 1 h 1 min 1 s"``; for the admin's TTL column."""
    if seconds is None:
        return ""
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60), ("s", 1)):
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count} {unit}")
    return " ".join(parts) or "0 s"


class CacheFlags(models.Model):
    """Global switches; a single row (pk=1), created by ``migrate``."""

    kill_switch = models.BooleanField(
        default=False, help_text="On: ragcache serves nothing from the cache and stores nothing, anywhere."
    )
    tracking_enabled = models.BooleanField(
        default=True, help_text="Off: no usage events are recorded; hits are still served."
    )
    sequence = models.PositiveBigIntegerField(
        default=0, editable=False,
        help_text="Source of policy generations and versions; only grows (milliseconds since 1970 at least).",
    )
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = "global flags"
        verbose_name_plural = "global flags"

    def __str__(self) -> str:
        return "ragcache global flags"

    def save(self, *args, **kwargs) -> None:
        self.pk = 1
        if self._state.adding:
            self.sequence = max(self.sequence or 0, int(time.time() * 1000))
        elif kwargs.get("update_fields") is None:
            # Never write back a sequence read earlier: it only moves forward, in next_sequence().
            kwargs["update_fields"] = ["kill_switch", "tracking_enabled", "updated_at"]
        super().save(*args, **kwargs)

    @classmethod
    def load(cls) -> CacheFlags:
        return cls.objects.get_or_create(pk=1)[0]

    @classmethod
    def next_sequence(cls, at_least: int = 0) -> int:
        """The next value of the sequence: above every earlier one, at least the current
        time in milliseconds (so values stay above those of a database that was flushed and
        re-created) and at least ``at_least``. Atomic across processes (the row is locked)."""
        now_ms = max(int(time.time() * 1000), at_least)
        with transaction.atomic():
            if not cls.objects.filter(pk=1).update(sequence=Greatest(models.F("sequence") + 1, models.Value(now_ms))):
                cls.load()
                cls.objects.filter(pk=1).update(sequence=Greatest(models.F("sequence") + 1, models.Value(now_ms)))
            return cls.objects.filter(pk=1).values_list("sequence", flat=True).get()


class CachePolicy(models.Model):
    class Mode(models.TextChoices):
        OFF = "off", "off: no lookups, no stores"
        SHADOW = "shadow", "shadow: look up and count would-be hits, always call the LLM"
        READ_ONLY = "read_only", "read-only: serve hits, never store"
        ON = "on", "on: serve hits and store answers"

    class Scope(models.TextChoices):
        GLOBAL = "global", "global: answers shared by every caller"
        TENANT = "tenant", "tenant: answers shared within one tenant"
        USER = "user", "user: answers private to one user"

    name = models.SlugField(max_length=64, unique=True, help_text="Used in code as policy=NAME.")
    description = models.TextField(blank=True)
    enabled = models.BooleanField(default=True)
    mode = models.CharField(max_length=16, choices=Mode.choices, default=Mode.ON)
    ttl_seconds = models.PositiveIntegerField(
        "TTL (seconds)",
        default=24 * 3600,
        validators=[MinValueValidator(1)],
        help_text="Absolute lifetime of an entry; a hit never extends it. Lowering it does not shorten "
        "entries already stored (purge for that).",
    )
    scope = models.CharField(max_length=16, choices=Scope.choices, default=Scope.GLOBAL)
    ignored_params = models.JSONField(
        default=default_ignored_params,
        validators=[validate_param_names],
        blank=True,
        help_text="Request parameters that do not shape the answer (transport, bookkeeping). Every other "
        "parameter enters the key.",
    )
    normalize_query = models.BooleanField(
        default=False,
        help_text="Before hashing message text: Unicode NFKC, lower case, runs of spaces inside a line "
        "collapsed. Line breaks and indentation are kept.",
    )
    max_entry_bytes = models.PositiveIntegerField(
        default=256 * 1024,
        validators=[MinValueValidator(1), MaxValueValidator(MAX_ENTRY_BYTES_CEILING)],
        help_text="Larger answers are refused (after compression). At most RAGCACHE['MAX_ENTRY_BYTES'].",
    )
    compress_threshold_bytes = models.PositiveIntegerField(
        default=4096, help_text="Entries larger than this are zlib-compressed; 0 never compresses."
    )
    rollout_percent = models.PositiveSmallIntegerField(
        default=100,
        validators=[MaxValueValidator(100)],
        help_text="Share of distinct questions that use the cache; the same question always gets the same decision.",
    )
    replay_chunk_delay_ms = models.PositiveIntegerField(
        "stream replay pacing (ms)",
        default=0,
        validators=[MaxValueValidator(MAX_REPLAY_DELAY_MS)],
        help_text="Pause between the chunks of a replayed stream; 0 replays at once.",
    )
    generation = models.PositiveBigIntegerField(
        default=0, editable=False,
        help_text="Part of every key; a purge moves it forward, so old entries are unreachable.",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = "cache policy"
        verbose_name_plural = "cache policies"
        ordering = ["name"]
        constraints = [
            models.CheckConstraint(condition=models.Q(ttl_seconds__gte=1), name="ragcache_policy_ttl_positive"),
            models.CheckConstraint(condition=models.Q(rollout_percent__lte=100), name="ragcache_policy_rollout_le_100"),
            models.CheckConstraint(
                condition=models.Q(max_entry_bytes__gte=1, max_entry_bytes__lte=MAX_ENTRY_BYTES_CEILING),
                name="ragcache_policy_max_entry_bytes_range",
            ),
            models.CheckConstraint(
                condition=models.Q(replay_chunk_delay_ms__lte=MAX_REPLAY_DELAY_MS), name="ragcache_policy_replay_delay",
            ),
            models.CheckConstraint(condition=models.Q(mode__in=["off", "shadow", "read_only", "on"]),
                                   name="ragcache_policy_mode_valid"),
            models.CheckConstraint(condition=models.Q(scope__in=["global", "tenant", "user"]),
                                   name="ragcache_policy_scope_valid"),
        ]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        if self.ignored_params is None:
            self.ignored_params = []  # a blank field means "none"; the column is NOT NULL
        config = get_config()
        if self.ttl_seconds is not None and self.ttl_seconds > int(config["MAX_TTL"]):
            raise ValidationError({"ttl_seconds": f"At most {config['MAX_TTL']} seconds (RAGCACHE['MAX_TTL'])."})
        limit = int(config["MAX_ENTRY_BYTES"])
        if self.max_entry_bytes is not None and self.max_entry_bytes > limit:
            raise ValidationError({"max_entry_bytes": (
                f"At most {limit} bytes (RAGCACHE['MAX_ENTRY_BYTES']): a larger entry could not be read back "
                f"within the Redis socket timeout, and would time out every lookup of it."
            )})

    def save(self, *args, **kwargs) -> None:
        if self._state.adding:
            self.generation = CacheFlags.next_sequence()
        else:
            # A generation read before a purge must never be written back: only purge() moves it.
            fields = kwargs.get("update_fields")
            if fields is None:
                fields = [f.name for f in self._meta.concrete_fields if not f.primary_key]
            kwargs["update_fields"] = [name for name in fields if name != "generation"]
            if not kwargs["update_fields"]:
                return
        super().save(*args, **kwargs)

    def purge(self) -> int:
        """Make every entry of this policy unreachable at once (they expire on their TTL):
        moves the generation forward and tells every process. Returns the new generation."""
        generation = CacheFlags.next_sequence()
        CachePolicy.objects.filter(pk=self.pk, generation__lt=generation).update(generation=generation)
        self.generation = generation
        from .signals import announce_change

        announce_change()
        return generation

    bump_generation = purge  # the 0.1 name


class ModelPrice(models.Model):
    model = models.CharField(max_length=128, unique=True, help_text="Model name as passed to model=.")
    input_per_1k = models.DecimalField(
        "input price per 1k tokens", max_digits=16, decimal_places=8, validators=[MinValueValidator(Decimal(0))]
    )
    cached_input_per_1k = models.DecimalField(
        "cached input price per 1k tokens", max_digits=16, decimal_places=8, null=True, blank=True,
        validators=[MinValueValidator(Decimal(0))],
        help_text="Price of input tokens the provider served from its prompt cache (OpenAI cached_tokens, "
        "Anthropic cache_read_input_tokens). Empty: priced like other input tokens.",
    )
    output_per_1k = models.DecimalField(
        "output price per 1k tokens", max_digits=16, decimal_places=8, validators=[MinValueValidator(Decimal(0))]
    )
    currency = models.CharField(max_length=3, default="USD")

    class Meta:
        ordering = ["model"]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(input_per_1k__gte=0, output_per_1k__gte=0)
                & (models.Q(cached_input_per_1k__isnull=True) | models.Q(cached_input_per_1k__gte=0)),
                name="ragcache_price_not_negative",
            ),
        ]

    def __str__(self) -> str:
        return self.model

    def cost(self, prompt_tokens: int, completion_tokens: int, cached_prompt_tokens: int = 0) -> Decimal:
        """Cost of one call in ``currency``: tokens priced per 1,000."""
        cached_rate = self.input_per_1k if self.cached_input_per_1k is None else self.cached_input_per_1k
        return (self.input_per_1k * prompt_tokens + cached_rate * cached_prompt_tokens
                + self.output_per_1k * completion_tokens) / 1000


class CacheControl(models.TextChoices):
    """Request cache controls a gateway key may send (LiteLLM's ``allowed_cache_controls``)."""

    NO_CACHE = "no-cache", "no-cache: refresh the answer"
    NO_STORE = "no-store", "no-store: never store the answer"
    MAX_AGE = "max-age", "max-age: shorter TTL"
    POLICY = "policy", "X-Ragcache-Policy: choose a policy"
    SOURCES = "sources", "X-Ragcache-Sources: name source documents"


def no_controls() -> list[str]:
    """A new key may send no cache control until an operator allows some."""
    return []


_all_controls = no_controls  # the name migration 0003 refers to


class GatewayKey(models.Model):
    """A client key of the OpenAI-compatible gateway. Only a SHA-256 of the key is kept."""

    name = models.SlugField(max_length=64, unique=True, help_text="Shown in usage tables (not a metric label).")
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    key_prefix = models.CharField(max_length=16, editable=False,
                                  help_text="The key's first characters, to recognise it.")
    scope = models.CharField(
        max_length=128, blank=True,
        help_text="Scope id of every request made with this key (a tenant or user id). Empty: global entries.",
    )
    policies = models.JSONField(
        default=list, blank=True, validators=[validate_param_names],
        help_text='Policies this key may use, e.g. ["default"]. The first is its default. Empty: only "default".',
    )
    allowed_cache_controls = models.JSONField(
        default=no_controls, blank=True,
        help_text="Request controls this key may send: " + ", ".join(c.value for c in CacheControl) + ".",
    )
    is_active = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        verbose_name = "gateway key"
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    KEY_PREFIX = "rck_"

    @staticmethod
    def hash_key(key: str) -> str:
        return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()

    def set_new_key(self) -> str:
        """Give this key a fresh secret; returns it (the only time it is visible)."""
        key = self.KEY_PREFIX + secrets.token_urlsafe(32)
        self.key_hash = self.hash_key(key)
        self.key_prefix = key[:10]
        return key

    def clean(self) -> None:
        controls = self.allowed_cache_controls
        valid = {c.value for c in CacheControl}
        if not isinstance(controls, list) or any(c not in valid for c in controls):
            raise ValidationError(
                {"allowed_cache_controls": f"Enter a JSON list drawn from: {', '.join(sorted(valid))}."})
        if self.policies is None:
            self.policies = []
        if self.scope and (not self.scope.strip() or not self.scope.isprintable()):
            raise ValidationError({"scope": "Enter a tenant or user id of printable characters, or leave it empty "
                                            "for a key without a scope."})
        if isinstance(self.policies, list) and all(isinstance(p, str) for p in self.policies):
            # An unknown policy would make every request with this key bypass the cache.
            found = set(CachePolicy.objects.filter(name__in=self.policies).values_list("name", flat=True))
            missing = [p for p in self.policies if p not in found]
            if missing:
                raise ValidationError({"policies": f"No cache policy named {', '.join(map(repr, missing))}: "
                                                   "create it first (Cache policies), or remove it here."})


class UsageResult(models.TextChoices):
    HIT = "hit"
    MISS = "miss"
    SHADOW_HIT = "shadow_hit"
    STALE_SOURCE = "stale_source"
    STORE = "store"
    REFUSED = "refused"
    BYPASS = "bypass"


class UsageRecord(models.Model):
    """One usage event, copied from a Redis stream by the aggregation task."""

    event_id = models.CharField(
        max_length=64, unique=True, help_text="Shard and Redis stream id: re-ingesting it is a no-op."
    )
    ts = models.DateTimeField(db_index=True)
    policy = models.CharField(max_length=64)
    result = models.CharField(max_length=16, choices=UsageResult.choices)
    model = models.CharField(max_length=128, blank=True)
    scope_hash = models.CharField(max_length=32, blank=True)
    key_hash = models.CharField(max_length=32, blank=True)
    reason = models.CharField(max_length=32, blank=True)
    gateway_key = models.CharField(max_length=64, blank=True)
    tokens_avoided = models.PositiveBigIntegerField(default=0)
    usage_known = models.BooleanField(
        default=True, help_text="False: a hit on an answer whose usage was never reported.")
    cost_avoided = models.DecimalField(max_digits=28, decimal_places=12, default=Decimal(0))
    latency_avoided_ms = models.FloatField(default=0)

    class Meta:
        ordering = ["-ts"]
        indexes = [models.Index(fields=["policy", "ts"])]

    def __str__(self) -> str:
        return f"{self.result} {self.policy} {self.ts:%Y-%m-%d %H:%M:%S}"


class UsageRollup(models.Model):
    class Granularity(models.TextChoices):
        HOUR = "hour"
        DAY = "day"

    period_start = models.DateTimeField()
    granularity = models.CharField(max_length=8, choices=Granularity.choices)
    policy = models.CharField(max_length=64)
    model = models.CharField(max_length=128, blank=True)
    gateway_key = models.CharField(max_length=64, blank=True, default="")
    lookups = models.PositiveBigIntegerField(default=0)
    hits = models.PositiveBigIntegerField(default=0)
    misses = models.PositiveBigIntegerField(default=0)
    shadow_hits = models.PositiveBigIntegerField(default=0)
    stale_sources = models.PositiveBigIntegerField(default=0)
    stores = models.PositiveBigIntegerField(default=0)
    refusals = models.PositiveBigIntegerField(default=0)
    bypasses = models.PositiveBigIntegerField(default=0)
    unknown_usage_hits = models.PositiveBigIntegerField(default=0)
    tokens_avoided = models.PositiveBigIntegerField(default=0)
    cost_avoided = models.DecimalField(max_digits=30, decimal_places=12, default=Decimal(0))
    latency_avoided_ms = models.FloatField(default=0)

    class Meta:
        ordering = ["-period_start", "policy", "model"]
        constraints = [
            models.UniqueConstraint(
                fields=["period_start", "granularity", "policy", "model", "gateway_key"],
                name="ragcache_rollup_unique_period_key",
            )
        ]

    def __str__(self) -> str:
        return f"{self.granularity} {self.period_start:%Y-%m-%d %H:00} {self.policy}/{self.model}"

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0
