from __future__ import annotations

import json
from datetime import UTC, datetime

from django import forms
from django.contrib import admin, messages
from django.db import models
from django.template.response import TemplateResponse
from django.urls import path
from django.utils import timezone
from django.utils.html import format_html

from . import admin_policy, admin_report, store
from .admin_report import ReasonFilter
from .models import CacheControl, CacheFlags, CachePolicy, GatewayKey, ModelPrice, UsageRecord, UsageRollup
from .reports import shown_cost


class _BoundedJSONDecoder(json.JSONDecoder):
    """Input nested too deeply for Python's parser is invalid JSON (a form error), not a 500."""

    def decode(self, s, *args, **kwargs):
        try:
            return super().decode(s, *args, **kwargs)
        except RecursionError:
            raise json.JSONDecodeError("nested too deeply", s, 0) from None


class _PolicyListForm(forms.ModelForm):
    """The list's editable row: mode and scope by their short names, so the row fits."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for name in ("mode", "scope"):
            if name in self.fields:
                self.fields[name].choices = [(value, value or label) for value, label in self.fields[name].choices]


@admin.register(CachePolicy)
class CachePolicyAdmin(admin.ModelAdmin):
    formfield_overrides = {models.JSONField: {"decoder": _BoundedJSONDecoder}}
    # Fits 1,400 px beside the admin's sidebar: short select labels; the generation and the
    # times are on each policy's page.
    list_display = ("name", "enabled", "mode", "ttl_seconds", "ttl_human", "scope", "rollout_percent")
    list_editable = ("enabled", "mode", "ttl_seconds", "scope", "rollout_percent")
    list_filter = ("enabled", ("mode", admin_policy.ShortChoicesFilter), ("scope", admin_policy.ShortChoicesFilter))
    search_fields = ("name", "description")
    readonly_fields = ("generation", "key_recipe", "ttl_human", "stored_entries", "created_at", "updated_at")
    actions = ("purge_entries", "enable_policies", "disable_policies")
    fieldsets = (
        (None, {"fields": ("name", "description", "enabled", "mode", "scope")}),
        ("Entries", {"fields": ("ttl_seconds", "stored_entries", "max_entry_bytes", "compress_threshold_bytes",
                                "rollout_percent", "replay_chunk_delay_ms")}),
        ("Key", {"fields": ("ignored_params", "normalize_query", "key_recipe", "generation")}),
        (None, {"fields": ("created_at", "updated_at")}),
    )

    def get_form(self, request, obj=None, change=False, **kwargs):
        # The TTL in words beside its seconds.
        widgets = {**kwargs.pop("widgets", {}), "ttl_seconds": admin_policy.SecondsInput(attrs={"min": 1})}
        return super().get_form(request, obj, change, widgets=widgets, **kwargs)

    def get_changelist_form(self, request, **kwargs):
        return super().get_changelist_form(request, **{"form": _PolicyListForm, **kwargs})

    @admin.display(description="TTL")
    def ttl_human(self, obj: CachePolicy) -> str:
        return admin_policy.human_duration(obj.ttl_seconds) if obj.ttl_seconds else "-"

    @admin.display(description="stored entries")
    def stored_entries(self, obj: CachePolicy) -> str:
        """A bounded count, taken at most once a minute (admin_policy.census)."""
        if obj.pk is None:
            return "-"
        try:
            found = admin_policy.census(obj)
        except store.RedisUnavailable:
            return "unknown: Redis is not answering"
        return (f"{found.describe()}, generation {obj.generation} (counted at "
                f"{datetime.fromtimestamp(found.taken_at, UTC):%H:%M:%S} UTC; recounted after a minute). Entries "
                "of earlier generations are unreachable and only wait to expire.")

    @admin.display(description="key recipe")
    def key_recipe(self, obj: CachePolicy) -> str:
        # str(): a form re-shown with invalid input (e.g. [1]) must show its errors, not a 500.
        raw = obj.ignored_params if isinstance(obj.ignored_params, list) else []
        params = ", ".join(str(p) for p in raw) or "none"
        scope = "none (shared by all callers)" if obj.scope == "global" else f"the caller's {obj.scope} id (hashed)"
        return format_html(
            "sha256 of canonical JSON of: every message (all roles, in order{}), the model, every request "
            "parameter except <code>{}</code>, and context_version.<br>Isolation: {}. Generation {} is part "
            "of the key; a purge moves it forward.",
            "; normalised: NFKC, lower case, spaces collapsed inside lines" if obj.normalize_query else "",
            params, scope, obj.generation or "(set when saved)",
        )

    @admin.action(description="Purge entries (bump generation)", permissions=["change"])
    def purge_entries(self, request, queryset):
        admin_policy.purge_and_report(self, request, queryset)

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
        names = ", ".join(f'"{policy.name}"' for policy in queryset)
        self.message_user(request, f"{'Enabled' if enabled else 'Disabled'} "
                                   f"{admin_policy.plural(len(queryset), 'policy', 'policies')}: {names}.",
                          messages.SUCCESS)

    def save_model(self, request, obj, form, change) -> None:
        before = CachePolicy.objects.filter(pk=obj.pk).values_list("ttl_seconds", flat=True).first() if change else None
        super().save_model(request, obj, form, change)
        if before and obj.ttl_seconds < before:
            self.message_user(request, (
                f'The TTL of "{obj.name}" went down from {admin_policy.human_duration(before)} to '
                f"{admin_policy.human_duration(obj.ttl_seconds)}. Entries already stored keep the expiry they were "
                "stored with (up to the old TTL); purge the policy to drop them now."), messages.WARNING)

    # "default" is never deleted by accident: the change page hides its delete link, and the
    # delete view and the bulk action say why instead.
    def has_delete_permission(self, request, obj=None) -> bool:
        return super().has_delete_permission(request, obj) and (obj is None or obj.name != admin_policy.DEFAULT_POLICY)

    def delete_view(self, request, object_id, extra_context=None):
        return admin_policy.refuse_default_delete(self, request, object_id) or \
            super().delete_view(request, object_id, extra_context)

    def get_actions(self, request):
        actions = super().get_actions(request)
        if "delete_selected" in actions:
            action = admin_policy.delete_selected_keeping_default
            actions["delete_selected"] = (action, "delete_selected", action.short_description)
        return actions

    def get_urls(self):
        from .admin_explain import explain_view
        from .admin_sources import invalidate_sources_view

        def wrap(view):
            return self.admin_site.admin_view(lambda request, **kwargs: view(self, request, **kwargs))

        return [path("invalidate-sources/", wrap(invalidate_sources_view), name="ragcache_invalidate_sources"),
                path("explain/", wrap(explain_view), name="ragcache_cachepolicy_explain"),
                path("<path:object_id>/purge/", wrap(admin_policy.purge_view), name="ragcache_cachepolicy_purge"),
                *super().get_urls()]


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
    list_display = ("model", "input_per_1k", "cached_input_per_1k", "output_per_1k", "currency")
    search_fields = ("model",)


class GatewayKeyForm(forms.ModelForm):
    allowed_cache_controls = forms.MultipleChoiceField(
        choices=CacheControl.choices, required=False, widget=forms.CheckboxSelectMultiple,
        help_text="Request controls this key may send; any other is refused with 403.")

    class Meta:
        model = GatewayKey
        fields = ("name", "scope", "policies", "allowed_cache_controls", "is_active")


@admin.register(GatewayKey)
class GatewayKeyAdmin(admin.ModelAdmin):
    """Gateway keys: the key itself is shown once, on the page after "Save" of a new one;
    only its SHA-256 is stored, and neither the hash nor the key is ever shown again."""

    form = GatewayKeyForm
    formfield_overrides = {models.JSONField: {"decoder": _BoundedJSONDecoder}}
    list_display = ("name", "key_id", "scope", "policies", "allowed_cache_controls", "is_active", "created_at",
                    "last_used_at")
    list_editable = ("is_active",)
    list_filter = ("is_active",)
    search_fields = ("name", "key_prefix", "scope")
    actions = ("deactivate_keys",)

    @admin.display(description="key", ordering="key_prefix")
    def key_id(self, obj: GatewayKey) -> str:
        return f"{obj.key_prefix}..." if obj.key_prefix else "-"

    def get_readonly_fields(self, request, obj=None):
        return ("key_id", "created_at", "last_used_at") if obj is not None else ()

    def save_model(self, request, obj, form, change) -> None:
        if not change:
            request._ragcache_new_gateway_key = obj.set_new_key()  # shown once by response_add, never stored
        super().save_model(request, obj, form, change)

    def response_add(self, request, obj, post_url_continue=None):
        key = getattr(request, "_ragcache_new_gateway_key", None)
        if key is None:
            return super().response_add(request, obj, post_url_continue)
        context = {**self.admin_site.each_context(request), "title": f"Gateway key {obj.name!r} created",
                   "opts": self.model._meta, "gateway_key": obj, "key": key}
        response = TemplateResponse(request, "admin/ragcache/gatewaykey/created.html", context)
        response["Cache-Control"] = "no-store"
        return response

    @admin.action(description="Deactivate selected keys", permissions=["change"])
    def deactivate_keys(self, request, queryset):
        # save() per row (not queryset.update) so every process is told of the change.
        count = 0
        for key in queryset.filter(is_active=True):
            key.is_active = False
            key.save(update_fields=["is_active"])
            count += 1
        self.message_user(request, f"Deactivated {count} gateway key{'s' if count != 1 else ''}.", messages.SUCCESS)


class ReadOnlyAdmin(admin.ModelAdmin):
    """Usage records and rollups are written by the aggregation only: never added, edited
    or deleted here (without delete permission Django offers no "Delete selected").

    Their cost avoided is shown with the usage report's 8 decimals (``<0.00000001`` for
    less, never 0); bare, in the model's price currency, so that the lists fit 1,400 px."""

    @admin.display(description="cost avoided", ordering="cost_avoided")
    def cost(self, obj) -> str:
        return shown_cost(obj.cost_avoided)

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


@admin.register(UsageRecord)
class UsageRecordAdmin(ReadOnlyAdmin):
    list_display = ("when", "policy", "outcome", "model", "key", "tokens_avoided", "cost", "latency_avoided_s")
    list_filter = (("result", admin_policy.ShortChoicesFilter), "policy", "model", ReasonFilter)
    date_hierarchy = "ts"

    @admin.display(description="time", ordering="ts")
    def when(self, obj: UsageRecord) -> str:
        return f"{timezone.localtime(obj.ts):%Y-%m-%d %H:%M:%S}"

    @admin.display(description="result (reason)", ordering="result")
    def outcome(self, obj: UsageRecord) -> str:
        return f"{obj.result} ({obj.reason.replace('_', ' ')})" if obj.reason else obj.result

    @admin.display(description="key", ordering="key_hash")
    def key(self, obj: UsageRecord) -> str:
        return obj.key_hash or "-"  # the short key id, as in logs and the X-Ragcache-Key header

    @admin.display(description="latency avoided (s)", ordering="latency_avoided_ms")
    def latency_avoided_s(self, obj: UsageRecord) -> str:
        return f"{obj.latency_avoided_ms / 1000:.3f}"


@admin.register(UsageRollup)
class UsageRollupAdmin(ReadOnlyAdmin):
    # Fits 1,400 px beside the sidebar; stores, refusals, bypasses and the rest are in the usage report.
    list_display = ("period", "policy", "model", "lookups", "hits", "misses", "hit_rate_display", "tokens_avoided",
                    "cost")
    list_filter = ("granularity", "policy", "model")
    date_hierarchy = "period_start"

    @admin.display(description="period", ordering="period_start")
    def period(self, obj: UsageRollup) -> str:
        start = timezone.localtime(obj.period_start)
        if obj.granularity == UsageRollup.Granularity.DAY:
            return f"{start:%Y-%m-%d} (day)"
        return f"{start:%Y-%m-%d %H:%M}"

    @admin.display(description="hit rate")
    def hit_rate_display(self, obj: UsageRollup) -> str:
        return f"{obj.hit_rate:.1%}"

    def get_urls(self):
        def wrap(view):
            return self.admin_site.admin_view(lambda request: view(self, request))

        return [path("report/", wrap(admin_report.report_view), name="ragcache_usagerollup_report"),
                path("report/aggregate/", wrap(admin_report.aggregate_view), name="ragcache_usagerollup_aggregate"),
                *super().get_urls()]
