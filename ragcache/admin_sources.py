"""The admin's "Invalidate sources" page (linked from the RAG cache app page): the same
as ``manage.py ragcache_invalidate``, for staff allowed to change cache policies."""
from __future__ import annotations

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


class InvalidateSourcesForm(forms.Form):
    sources = forms.CharField(
        label="Source ids", widget=forms.Textarea(attrs={"rows": 6, "cols": 60, "placeholder": "doc:42\ndoc:43"}),
        help_text=f"One id a line, as your code passes them in sources= (e.g. doc:42); at most {MAX_IDS} ids of "
                  f"at most {MAX_SOURCE_LENGTH} characters.")

    def clean_sources(self) -> list[str]:
        ids = list(dict.fromkeys(line.strip() for line in self.cleaned_data["sources"].splitlines() if line.strip()))
        if not ids:
            raise forms.ValidationError("Enter at least one source id.")
        if len(ids) > MAX_IDS:
            raise forms.ValidationError(f"At most {MAX_IDS} ids at a time ({len(ids)} given).")
        too_long = [i for i in ids if len(i) > MAX_SOURCE_LENGTH]
        if too_long:
            raise forms.ValidationError(f"Ids are at most {MAX_SOURCE_LENGTH} characters; "
                                        f"{len(too_long)} line(s) are longer.")
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
