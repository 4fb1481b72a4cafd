"""Policies, global flags, prices and usage tables."""
from __future__ import annotations

import re
from decimal import Decimal

from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models

from .conf import get_config

PARAM_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
DEFAULT_KEY_PARAMS = [
    "temperature",
    "top_p",
    "max_tokens",
    "seed",
    "stop",
    "tools",
    "tool_choice",
    "response_format",
    "system_prompt_version",
]


def default_key_params() -> list[str]:
    return list(DEFAULT_KEY_PARAMS)


def validate_key_params(value: object) -> None:
    if not isinstance(value, list):
        raise ValidationError(
            'Enter a JSON list of parameter names, for example ["temperature", "max_tokens"].'
        )
    seen: set[str] = set()
    for name in value:
        if not isinstance(name, str) or not PARAM_NAME_RE.match(name):
            raise ValidationError(
                "%(name)r is not a parameter name: use lowercase letters, digits and "
                "underscores, starting with a letter (at most 64 characters).",
                params={"name": name},
            )
        if name in seen:
            raise ValidationError("%(name)r is listed twice.", params={"name": name})
        seen.add(name)


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
        help_text="Absolute lifetime of an entry; a hit never extends it.",
    )
    scope = models.CharField(max_length=16, choices=Scope.choices, default=Scope.GLOBAL)
    key_params = models.JSONField(
        default=default_key_params,
        validators=[validate_key_params],
        blank=True,
        help_text="Request params that shape the answer and so enter the key; other params are ignored.",
    )
    normalize_query = models.BooleanField(
        default=False,
        help_text="Unicode NFKC, lower case and collapsed whitespace before hashing.",
    )
    max_entry_bytes = models.PositiveIntegerField(
        default=256 * 1024,
        validators=[MinValueValidator(1), MaxValueValidator(64 * 1024 * 1024)],
        help_text="Larger answers are refused (after compression).",
    )
    compress_threshold_bytes = models.PositiveIntegerField(
        default=4096, help_text="Entries larger than this are zlib-compressed; 0 never compresses."
    )
    rollout_percent = models.PositiveSmallIntegerField(
        default=100,
        validators=[MaxValueValidator(100)],
        help_text="Share of distinct questions that use the cache; the same question always gets the same decision.",
    )
    generation = models.PositiveIntegerField(
        default=1, editable=False, help_text="Part of every key; bumped to purge all entries at once."
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = "cache policy"
        verbose_name_plural = "cache policies"
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        if self.key_params is None:
            # A blank or "null" key_params field means "no params"; the column is NOT NULL.
            self.key_params = []
        max_ttl = int(get_config()["MAX_TTL"])
        if self.ttl_seconds is not None and self.ttl_seconds > max_ttl:
            raise ValidationError(
                {"ttl_seconds": f"At most {max_ttl} seconds (RAGCACHE['MAX_TTL'])."}
            )

    def bump_generation(self) -> None:
        """Invalidate every entry of this policy (they become unreachable and expire)."""
        # F() makes concurrent purges each count; save() fires the signal that tells
        # every process to reload its policy snapshot.
        self.generation = models.F("generation") + 1
        self.save(update_fields=["generation", "updated_at"])
        self.refresh_from_db(fields=["generation"])


class CacheFlags(models.Model):
    """Global switches; a single row (pk=1)."""

    kill_switch = models.BooleanField(
        default=False, help_text="On: ragcache makes no lookups and no stores anywhere."
    )
    tracking_enabled = models.BooleanField(
        default=True, help_text="Off: no usage events are recorded; hits are still served."
    )
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = "global flags"
        verbose_name_plural = "global flags"

    def __str__(self) -> str:
        return "ragcache global flags"

    def save(self, *args, **kwargs) -> None:
        self.pk = 1
        super().save(*args, **kwargs)

    @classmethod
    def load(cls) -> CacheFlags:
        return cls.objects.get_or_create(pk=1)[0]


class ModelPrice(models.Model):
    model = models.CharField(max_length=128, unique=True, help_text="Model name as passed to model=.")
    input_per_1k = models.DecimalField(
        "input price per 1k tokens", max_digits=12, decimal_places=6, validators=[MinValueValidator(Decimal(0))]
    )
    output_per_1k = models.DecimalField(
        "output price per 1k tokens", max_digits=12, decimal_places=6, validators=[MinValueValidator(Decimal(0))]
    )
    currency = models.CharField(max_length=3, default="USD")

    class Meta:
        ordering = ["model"]

    def __str__(self) -> str:
        return self.model

    def cost(self, prompt_tokens: int, completion_tokens: int) -> Decimal:
        return (self.input_per_1k * prompt_tokens + self.output_per_1k * completion_tokens) / 1000


class UsageResult(models.TextChoices):
    HIT = "hit"
    MISS = "miss"
    SHADOW_HIT = "shadow_hit"
    STORE = "store"
    REFUSED = "refused"
    BYPASS = "bypass"


class UsageRecord(models.Model):
    """One usage event, copied from the Redis stream by the aggregation task."""

    event_id = models.CharField(max_length=64, unique=True, help_text="Redis stream id: re-ingesting it is a no-op.")
    ts = models.DateTimeField(db_index=True)
    policy = models.CharField(max_length=64)
    result = models.CharField(max_length=16, choices=UsageResult.choices)
    model = models.CharField(max_length=128, blank=True)
    scope_hash = models.CharField(max_length=32, blank=True)
    key_hash = models.CharField(max_length=32, blank=True)
    reason = models.CharField(max_length=32, blank=True)
    tokens_avoided = models.PositiveIntegerField(default=0)
    cost_avoided = models.DecimalField(max_digits=14, decimal_places=6, default=Decimal(0))
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
    lookups = models.PositiveBigIntegerField(default=0)
    hits = models.PositiveBigIntegerField(default=0)
    misses = models.PositiveBigIntegerField(default=0)
    shadow_hits = models.PositiveBigIntegerField(default=0)
    stores = models.PositiveBigIntegerField(default=0)
    refusals = models.PositiveBigIntegerField(default=0)
    bypasses = models.PositiveBigIntegerField(default=0)
    tokens_avoided = models.PositiveBigIntegerField(default=0)
    cost_avoided = models.DecimalField(max_digits=18, decimal_places=6, default=Decimal(0))
    latency_avoided_ms = models.FloatField(default=0)

    class Meta:
        ordering = ["-period_start", "policy", "model"]
        constraints = [
            models.UniqueConstraint(
                fields=["period_start", "granularity", "policy", "model"], name="ragcache_rollup_unique_period"
            )
        ]

    def __str__(self) -> str:
        return f"{self.granularity} {self.period_start:%Y-%m-%d %H:00} {self.policy}/{self.model}"

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0
