"""The cache policy page's extras: what a policy holds in Redis (a bounded, cached count),
the purge button, sentence-like messages, and why ``default`` is not deleted.

Counting entries never walks the whole database on page load: ``store.count_keys`` stops
after ``CENSUS_LIMIT`` entries or ``CENSUS_MAX_SCANNED`` keys walked per Redis master,
and the result is kept for ``CENSUS_MAX_AGE`` seconds per policy generation in this
process. An incomplete count says "at least".
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from django.contrib import admin, messages
from django.contrib.admin.utils import unquote
from django.contrib.admin.widgets import AdminIntegerFieldWidget
from django.core.exceptions import PermissionDenied
from django.http import HttpResponseNotAllowed, HttpResponseRedirect
from django.urls import reverse
from django.utils.html import format_html
from django.utils.translation import gettext

from . import store
from .conf import get_config
from .models import CacheFlags, CachePolicy, human_duration
from .sources import redis_setting

CENSUS_LIMIT = 10_000  # entries counted (and their MEMORY USAGE read) at most
CENSUS_MAX_SCANNED = 200_000  # keys SCAN walks through at most, per master
CENSUS_MAX_AGE = 60.0  # seconds a count is shown before it is taken again
DEFAULT_POLICY = "default"
DEFAULT_KEPT = (
    'The "default" policy cannot be deleted: every call made without policy= uses it, and migrate would '
    "create it again at once (with a new generation, so its entries would be lost anyway). To stop caching "
    'with it, untick "enabled" or set its mode to off; to drop its entries, purge it.'
)


def plural(count: int, singular: str, plural_form: str | None = None) -> str:
    """``plural(1, "policy", "policies")`` -> ``"1 policy"``; ``2`` -> ``"2 policies"``."""
    return f"{count:,} {singular if count == 1 else (plural_form or singular + 's')}"


def human_bytes(size: int) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    value = float(size)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} bytes"  # not reached


# --- how many entries a policy holds -------------------------------------------------------

@dataclass(frozen=True)
class Census:
    entries: int
    memory: int  # bytes, from MEMORY USAGE
    complete: bool
    taken_at: float  # time.time()

    def describe(self) -> str:
        if self.complete and not self.entries:
            return "no entries"
        if self.complete:
            return f"{plural(self.entries, 'entry', 'entries')}, about {human_bytes(self.memory)} in Redis"
        return (f"at least {plural(self.entries, 'entry', 'entries')}, at least {human_bytes(self.memory)} in "
                f"Redis (the count stops after {CENSUS_LIMIT:,} entries or {CENSUS_MAX_SCANNED:,} keys walked, "
                "so that this page never scans a whole database)")


_census: dict[tuple[str, str, int], Census] = {}
_census_lock = threading.Lock()


def census(policy: CachePolicy) -> Census:
    """Entries of ``policy``'s current generation: counted at most once a minute per
    process; raises ``store.RedisUnavailable``."""
    root = store.current_layout().root
    key = (root, policy.name, policy.generation)
    now = time.time()
    with _census_lock:
        found = _census.get(key)
    if found is not None and now - found.taken_at < CENSUS_MAX_AGE:
        return found
    pattern = f"{root}:{{*}}:e:{policy.name}:{policy.generation}:*"
    entries, memory, complete = store.count_keys(pattern, CENSUS_LIMIT, max_scanned=CENSUS_MAX_SCANNED)
    result = Census(entries, memory, complete, now)
    with _census_lock:
        if len(_census) > 1000:  # bounded: names and generations only ever grow
            _census.clear()
        _census[key] = result
    return result


def forget_census(policy: CachePolicy) -> None:
    with _census_lock:
        for key in [k for k in _census if k[1] == policy.name]:
            del _census[key]


# --- purge ---------------------------------------------------------------------------------

def purge(policies) -> list[tuple[CachePolicy, int, int]]:
    """Purge each policy; returns (policy, old generation, new generation) for each."""
    done = []
    for policy in policies:
        old = policy.generation
        done.append((policy, old, policy.purge()))
        forget_census(policy)
    return done


def announce_now() -> bool:
    """Write a new policy version to every shard of Redis now, so every process reloads
    its policies on its next lookup; False when Redis (or one of its masters) does not
    answer. ``CachePolicy.purge()`` also announces once the transaction commits, without
    telling anyone whether that worked: this is how the admin knows what to say."""
    from .policies import announce

    try:
        announce(CacheFlags.next_sequence())
    except store.RedisUnavailable:
        return False
    return True


def purge_message(done: list[tuple[CachePolicy, int, int]], announced: bool = True) -> str:
    """``Purged 2 policies: default (generation 5 -> 9), faq (generation 6 -> 10). ...``;
    ``announced=False`` (Redis did not answer): what was done, what was not, and when the
    other processes catch up."""
    listed = ", ".join(f'"{policy.name}" (generation {old} \u2192 {new})' for policy, old, new in done)
    longest = human_duration(max((policy.ttl_seconds for policy, _, _ in done), default=0))
    if announced:
        return (f"Purged {plural(len(done), 'policy', 'policies')}: {listed}. Their old entries are unreachable "
                f"from now on, in every process, and expire on their TTL (at most {longest}).")
    max_age = human_duration(max(1, round(float(get_config()["POLICY_MAX_AGE"]))))
    return (f"Purged {plural(len(done), 'policy', 'policies')} in the database only: {listed}. Redis is not "
            f"answering, so the other processes were not told: each moves to the new generation when it next "
            f"reloads its policies, within RAGCACHE['POLICY_MAX_AGE'] ({max_age}); until then, once Redis answers "
            f"again, they may still serve the old entries. Nothing was deleted from Redis (old entries expire on "
            f"their TTL, at most {longest}). Check {redis_setting()}.")


def purge_and_report(model_admin, request, policies) -> None:
    """Purge ``policies`` and say what happened: a success message when Redis took the
    news, a warning naming what did not happen when it did not answer."""
    done = purge(policies)
    announced = announce_now()
    model_admin.message_user(request, purge_message(done, announced),
                             messages.SUCCESS if announced else messages.WARNING)


def missing_object_redirect(model_admin, request, object_id: str) -> HttpResponseRedirect:
    """The admin's own answer to an id that names nothing (``abc``, a deleted row): its
    "doesn't exist" warning and a redirect to the list, never a 500."""
    opts = model_admin.model._meta
    # Django's own wording (and its translations), as its change and delete views say it.
    text = gettext("%(name)s with ID “%(key)s” doesn’t exist. Perhaps it was deleted?")
    model_admin.message_user(request, text % {"name": opts.verbose_name, "key": object_id}, messages.WARNING)
    return HttpResponseRedirect(reverse(f"admin:{opts.app_label}_{opts.model_name}_changelist"))


def purge_view(model_admin, request, object_id: str):
    """POST only: purge one policy (the change page's "Purge entries" button). An id that
    names no policy (not a number, or deleted) redirects to the list with a warning."""
    if request.method != "POST":
        return HttpResponseNotAllowed(["POST"])
    if not model_admin.has_change_permission(request):  # before the lookup: which ids exist is not told
        raise PermissionDenied
    object_id = unquote(object_id)
    policy = model_admin.get_object(request, object_id)  # None for "abc" as for a deleted id
    if policy is None:
        return missing_object_redirect(model_admin, request, object_id)
    if not model_admin.has_change_permission(request, policy):
        raise PermissionDenied
    purge_and_report(model_admin, request, [policy])
    return HttpResponseRedirect(reverse("admin:ragcache_cachepolicy_change", args=[policy.pk]))


# --- default is kept -------------------------------------------------------------------------

def refuse_default_delete(model_admin, request, object_id: str):
    """The delete view of ``default``: a redirect to its page, saying why; else None."""
    policy = CachePolicy.objects.filter(pk=object_id).only("pk", "name").first() if str(object_id).isdigit() else None
    if policy is None or policy.name != DEFAULT_POLICY:
        return None
    model_admin.message_user(request, DEFAULT_KEPT, messages.ERROR)
    return HttpResponseRedirect(reverse("admin:ragcache_cachepolicy_change", args=[policy.pk]))


def delete_selected_keeping_default(model_admin, request, queryset):
    """The list's "Delete selected" action, refused (with the reason) when ``default`` is selected."""
    from django.contrib.admin.actions import delete_selected

    if queryset.filter(name=DEFAULT_POLICY).exists():
        model_admin.message_user(request, "Nothing was deleted. " + DEFAULT_KEPT + " Select the other policies "
                                 "without it to delete them.", messages.ERROR)
        return None
    return delete_selected(model_admin, request, queryset)


delete_selected_keeping_default.short_description = "Delete selected cache policies"
delete_selected_keeping_default.allowed_permissions = ("delete",)


# --- the list page fits 1,400 px ----------------------------------------------------------------

class ShortChoicesFilter(admin.ChoicesFieldListFilter):
    """A choices filter listing values by their short names (``read_only``, not the sentence)."""

    def choices(self, changelist):
        labels = [(str(label), str(value)) for value, label in self.field.flatchoices]
        for choice in super().choices(changelist):
            display = str(choice["display"])
            for label, value in labels:
                if display.startswith(label):  # facet counts may follow the label
                    choice = {**choice, "display": value + display[len(label):]}
                    break
            yield choice


class SecondsInput(AdminIntegerFieldWidget):
    """A number of seconds, with the saved value in words beside it: ``3600`` "= 1 h"."""

    def render(self, name, value, attrs=None, renderer=None):
        html = super().render(name, value, attrs, renderer)
        try:
            seconds = int(value)
        except (TypeError, ValueError):
            return html
        if seconds <= 0:
            return html
        return format_html('{} <span class="ragcache-seconds-words" id="{}_words">= {}</span>', html,
                           (attrs or {}).get("id", name), human_duration(seconds))
