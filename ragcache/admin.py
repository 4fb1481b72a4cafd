from __future__ import annotations

from django.contrib import admin, messages
from django.utils.html import format_html

from .models import CacheFlags, CachePolicy, ModelPrice, UsageRecord, UsageRollup


@admin.register(CachePolicy)
class CachePolicyAdmin(admin.ModelAdmin):
    list_display = ("name", "enabled", "mode", "ttl_seconds", "scope", "rollout_percent", "generation", "updated_at")
    list_editable = ("enabled", "mode", "ttl_seconds", "scope", "rollout_percent")
    list_filter = ("enabled", "mode", "scope")
    search_fields = ("name", "description")
    readonly_fields = ("generation", "key_recipe", "created_at", "updated_at")
    actions = ("purge_entries", "enable_policies", "disable_policies")
    fieldsets = (
        (None, {"fields": ("name", "description", "enabled", "mode", "scope")}),
        ("Entries", {"fields": ("ttl_seconds", "max_entry_bytes", "compress_threshold_bytes", "rollout_percent")}),
        ("Key", {"fields": ("key_params", "normalize_query", "key_recipe", "generation")}),
        (None, {"fields": ("created_at", "updated_at")}),
    )

    @admin.display(description="key recipe")
    def key_recipe(self, obj: CachePolicy) -> str:
        params = ", ".join(obj.key_params or []) or "none"
        scope = "none (shared by all callers)" if obj.scope == "global" else f"the caller's {obj.scope} id (hashed)"
        return format_html(
            "sha256 of canonical JSON of: every message (all roles, in order{}), the model, the params "
            "<code>{}</code>, and context_version.<br>Isolation: {}. Generation {} is part of the key; "
            "purging bumps it.",
            "; normalised: NFKC, lower case, collapsed whitespace" if obj.normalize_query else "",
            params, scope, obj.generation or 1,
        )

    @admin.action(description="Purge entries (bump generation)", permissions=["change"])
    def purge_entries(self, request, queryset):
        for policy in queryset:
            policy.bump_generation()
        self.message_user(request, f"Purged {queryset.count()} polic(y/ies): old entries are unreachable and expire.")

    @admin.action(description="Enable selected policies", permissions=["change"])
    def enable_policies(self, request, queryset):
        self._set_enabled(request, queryset, True)

    @admin.action(description="Disable selected policies", permissions=["change"])
    def disable_policies(self, request, queryset):
        self._set_enabled(request, queryset, False)

    def _set_enabled(self, request, queryset, enabled: bool) -> None:
        # save() per row (not queryset.update) so every process is told of the change.
        for policy in queryset:
            policy.enabled = enabled
            policy.save(update_fields=["enabled", "updated_at"])
        self.message_user(request, f"{'Enabled' if enabled else 'Disabled'} {queryset.count()} polic(y/ies).",
                          messages.SUCCESS)


@admin.register(CacheFlags)
class CacheFlagsAdmin(admin.ModelAdmin):
    list_display = ("__str__", "kill_switch", "tracking_enabled", "updated_at")
    list_editable = ("kill_switch", "tracking_enabled")
    list_display_links = ("__str__",)

    def has_add_permission(self, request) -> bool:
        return not CacheFlags.objects.exists() and super().has_add_permission(request)

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


@admin.register(ModelPrice)
class ModelPriceAdmin(admin.ModelAdmin):
    list_display = ("model", "input_per_1k", "output_per_1k", "currency")
    search_fields = ("model",)


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False


@admin.register(UsageRecord)
class UsageRecordAdmin(ReadOnlyAdmin):
    list_display = ("ts", "policy", "result", "model", "reason", "tokens_avoided", "cost_avoided", "latency_avoided_ms")
    list_filter = ("result", "policy", "model", "reason")
    date_hierarchy = "ts"


@admin.register(UsageRollup)
class UsageRollupAdmin(ReadOnlyAdmin):
    list_display = ("period_start", "granularity", "policy", "model", "lookups", "hits", "misses", "hit_rate_display",
                    "stores", "refusals", "tokens_avoided", "cost_avoided")
    list_filter = ("granularity", "policy", "model")
    date_hierarchy = "period_start"

    @admin.display(description="hit rate")
    def hit_rate_display(self, obj: UsageRollup) -> str:
        return f"{obj.hit_rate:.1%}"
