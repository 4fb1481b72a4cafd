"""The admin's "Invalidate sources" page (linked from the RAG cache app page): the same
as ``manage.py ragcache_invalidate``, for staff allowed to change cache policies."""
from __future__ import annotations

import re

from django import forms
from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.http import HttpResponseRedirect
from django.template.response import TemplateResponse

from .connection import RedisUnavailable
from .exceptions import InvalidRequestError
from .plans import MAX_SOURCE_LENGTH
from .services import cache_service
from .sources import redis_setting

MAX_IDS = 10_000  # per submission
_SEPARATORS = re.compile(r"[,\r\n]+")


def split_source_ids(text: str) -> list[str]:
    """``"doc:1, doc:2\ndoc:3"`` -> ``["doc:1", "doc:2", "doc:3"]``: ids are separated by
    commas or line breaks, stripped of surrounding spaces; blanks and repeats dropped, the
    first order kept. (An id containing a comma can only be invalidated with
    ``manage.py ragcache_invalidate`` or ``cache_service.invalidate_sources``.)"""
    return list(dict.fromkeys(part.strip() for part in _SEPARATORS.split(text) if part.strip()))


class InvalidateSourcesForm(forms.Form):
    sources = forms.CharField(
        label="Source ids",
        widget=forms.Textarea(attrs={"rows": 6, "cols": 60, "placeholder": "doc:42, doc:43\ndoc:44"}),
        help_text=f"Separated by commas or line breaks (doc:42, doc:43), as your code passes them in sources=; "
                  f"at most {MAX_IDS:,} ids of at most {MAX_SOURCE_LENGTH} characters each. Spaces around an id "
                  "are ignored; an id containing a comma needs manage.py ragcache_invalidate.")

    def clean_sources(self) -> list[str]:
        ids = split_source_ids(self.cleaned_data["sources"])
        if not ids:
            raise forms.ValidationError("Enter at least one source id.")
        if len(ids) > MAX_IDS:
            raise forms.ValidationError(f"At most {MAX_IDS:,} source ids at a time; {len(ids):,} were given. "
                                        "Submit them in several parts, or use manage.py ragcache_invalidate --file.")
        too_long = [i for i in ids if len(i) > MAX_SOURCE_LENGTH]
        if too_long:
            raise forms.ValidationError(
                f"A source id is at most {MAX_SOURCE_LENGTH} characters; {len(too_long):,} "
                f"{'is' if len(too_long) == 1 else 'are'} longer (the first starts {too_long[0][:40]!r}).")
        return ids


def invalidate_sources_view(model_admin, request):
    """GET: the form. POST: invalidate, then back to the form with a message."""
    if not model_admin.has_change_permission(request):
        raise PermissionDenied
    form = InvalidateSourcesForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        ids = form.cleaned_data["sources"]
        try:
            count = cache_service.invalidate_sources(ids)
        except InvalidRequestError as exc:
            form.add_error("sources", str(exc))
        except RedisUnavailable:
            messages.error(request, f"Redis is unavailable: nothing was invalidated. Check {redis_setting()} and "
                                    "that Redis answers there, then submit again.")
        else:
            shown = ", ".join(ids[:10]) + (f" and {len(ids) - 10} more" if len(ids) > 10 else "")
            messages.success(request, f"Invalidated {count} source{'s' if count != 1 else ''} ({shown}): cached "
                                      "answers citing them miss from now on, in every process, policy and scope.")
            return HttpResponseRedirect(request.path)
    opts = model_admin.model._meta
    context = {**model_admin.admin_site.each_context(request), "title": "Invalidate sources", "opts": opts,
               "form": form}
    return TemplateResponse(request, "admin/ragcache/invalidate_sources.html", context)
