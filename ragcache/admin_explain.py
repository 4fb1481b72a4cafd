"""The admin's "Explain a lookup" page: why did this question miss?

Staff paste a request (the question or the messages, the model, params, scope, policy,
context_version, whole response or stream) and see what ragcache does with it now: the
key recipe (the canonical inputs that entered the digest, the policy's generation and
the scope), the decision the policies make (used, or bypassed and why), and whether an
entry exists under that key, with its time left, size, tokens and sources (intact or
invalidated). A button deletes that one entry.

The page is POST only, so the question never lands in a URL or an access log, and
nothing here logs it: the step lines this computation may write carry the short key.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from django import forms
from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.template.response import TemplateResponse

from . import connection, store
from .admin_policy import CENSUS_MAX_SCANNED, human_bytes
from .admin_sources import split_source_ids
from .entries import KIND_STREAM, CorruptEntry, parse_meta
from .exceptions import InvalidRequestError
from .keys import KEY_SCHEMA_VERSION, canonical_json, key_params, normalize_messages, rollout_bucket, shard_of
from .models import CachePolicy, human_duration
from .plans import make_request, plan
from .policies import registry

MAX_QUESTION = 200_000  # characters
KINDS = (
    ("call", "a whole response (get_or_call, cache_response; the gateway without stream)"),
    ("stream", "a stream (get_or_stream; the gateway and the OpenAI wrapper with stream=True)"),
)
BYPASS_WORDS = {
    "kill_switch": "the global kill switch is on: nothing is served from the cache or stored, anywhere",
    "disabled": "the policy is disabled",
    "mode_off": "the policy's mode is off",
    "rollout": "this question falls outside the policy's rollout",
    "unknown_policy": "there is no policy of that name",
    "policies_unavailable": "the policies could not be read from the database",
    "no_cache": "the request asked for a fresh answer (no-cache)",
}
MODE_WORDS = {
    "on": "served from the cache on a hit; on a miss the LLM is called and its answer stored",
    "read_only": "served from the cache on a hit; on a miss the LLM is called and nothing is stored (read-only)",
    "shadow": "looked up and counted, but the LLM is always called and nothing is served (shadow)",
}


def bypass_words(reason: str) -> str:
    """A bypass reason (``kill_switch``, ``mode_off``, ...) in plain words."""
    return BYPASS_WORDS.get(reason, reason.replace("_", " "))


class ExplainForm(forms.Form):
    policy = forms.ChoiceField()
    model = forms.CharField(max_length=256, help_text="As passed to model= (or the request's \"model\").")
    question = forms.CharField(
        max_length=MAX_QUESTION, strip=False,
        widget=forms.Textarea(attrs={"rows": 5, "cols": 90, "spellcheck": "false"}),
        help_text="The user's question exactly as your code passes it (one user message), or the whole "
                  'messages list as JSON: [{"role": "user", "content": "..."}]. Never logged.')
    params = forms.CharField(
        required=False, widget=forms.Textarea(attrs={"rows": 2, "cols": 90, "spellcheck": "false"}),
        help_text='params= as a JSON object, e.g. {"temperature": 0}; for the gateway, every field of the request '
                  'body but "model" and "messages". Empty: none.')
    scope = forms.CharField(required=False, max_length=256, help_text="scope= (a user or tenant id). Empty: none.")
    context_version = forms.CharField(
        required=False, max_length=1000,
        help_text="context_version=, as JSON if it is a number or a list (3, [1, 2]); any other text is a string. "
                  "Empty: none.")
    kind = forms.ChoiceField(choices=KINDS, initial="call", widget=forms.RadioSelect)
    sources = forms.CharField(
        required=False, widget=forms.Textarea(attrs={"rows": 2, "cols": 90}),
        help_text="Optional: source ids, separated by commas or line breaks, to name the entry's sources (entries "
                  "keep only hashes).")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        names = list(CachePolicy.objects.order_by("name").values_list("name", flat=True))
        self.fields["policy"].choices = [(name, name) for name in names]

    def clean_question(self) -> Any:
        # Browsers send a textarea's line breaks as CRLF; code rarely has them.
        text = self.cleaned_data["question"].replace("\r\n", "\n")
        if not text.strip():
            raise forms.ValidationError("Paste the question (or the messages as JSON).")
        if text.lstrip().startswith("["):
            try:
                messages_list = json.loads(text)
            except (ValueError, RecursionError):
                return text  # a question that starts with "[": one user message
            if isinstance(messages_list, list) and messages_list and all(isinstance(m, dict) for m in messages_list):
                return messages_list
        return text

    def clean_params(self) -> dict | None:
        raw = self.cleaned_data["params"].strip()
        if not raw:
            return None
        try:
            params = json.loads(raw)
        except (ValueError, RecursionError):
            raise forms.ValidationError('Enter a JSON object, e.g. {"temperature": 0}.') from None
        if not isinstance(params, dict):
            raise forms.ValidationError('Enter a JSON object, e.g. {"temperature": 0}.')
        return params

    def clean_scope(self) -> str | None:
        return self.cleaned_data["scope"].strip() or None

    def clean_context_version(self) -> Any:
        raw = self.cleaned_data["context_version"].strip()
        if not raw:
            return None
        try:
            value = json.loads(raw)
        except (ValueError, RecursionError):
            return raw
        return value if not isinstance(value, str) else raw

    def clean_sources(self) -> list[str]:
        return split_source_ids(self.cleaned_data["sources"])


@dataclass
class Explanation:
    """What the page shows for one request."""

    recipe: list[tuple[str, str]]
    redis_key: str
    key_id: str
    decision: str
    used: bool
    verdict: str = ""  # hit | miss | bypass | shadow hit | unknown
    verdict_words: str = ""
    entry: dict | None = None
    sources: list | None = None
    hints: list[str] = field(default_factory=list)
    error: str = ""


def explain(data: dict) -> Explanation:
    """Plan the request as a lookup would now (policies fresh from the database), then read
    its entry. Raises ``InvalidRequestError`` for a request that cannot be keyed."""
    snapshot = registry.reload()
    request = make_request(data["question"], model=data["model"], policy=data["policy"], scope=data["scope"],
                           params=data["params"], context_version=data["context_version"], kind=data["kind"])
    planned = plan(request, snapshot)
    policy, key = planned.policy, planned.key
    ignored = sorted(policy.ignored_params) if policy else []
    entered = key_params(data["params"], frozenset(ignored))
    messages_list = normalize_messages(data["question"], normalize=bool(policy and policy.normalize_query))
    given = sorted(set(data["params"] or {}) - set(entered))
    recipe = [
        ("Messages", _json(messages_list)),
        ("Normalised", "yes: NFKC, lower case, spaces collapsed inside lines" if policy and policy.normalize_query
         else "no: the text as given (Unicode NFC)"),
        ("Model", data["model"]),
        ("Params in the key", _json(entered) if entered else "none"),
        ("Params left out", ", ".join(given) + " (the policy's ignored params)" if given else "none"),
        ("context_version", _json(data["context_version"]) if data["context_version"] is not None else "none"),
        ("Kind", dict(KINDS)[data["kind"]]),
        ("Key schema", f"version {KEY_SCHEMA_VERSION}"),
        ("Digest", f"sha256 of the canonical JSON of all of the above: {key.digest}"),
        ("Policy", f"{key.policy}, generation {key.generation}" + ("" if policy else " (no such policy)")),
        ("Scope", "global (shared by every caller)" if key.scope == "global"
         else f"{policy.scope if policy else 'scope'} id, hashed: {key.scope}"),
        ("Shard", f"{shard_of(key.digest)} of 256; rollout bucket {rollout_bucket(key.digest)} of 0-99"),
    ]
    if planned.bypass:
        detail = bypass_words(planned.bypass)
        if planned.bypass == "rollout" and policy is not None:
            detail += f" ({policy.rollout_percent} %: buckets 0-{policy.rollout_percent - 1} use the cache)"
        decision, used = f"Bypass ({planned.bypass.replace('_', ' ')}): {detail}.", False
    else:
        decision, used = f"The cache is used: {MODE_WORDS.get(policy.mode, policy.mode)}.", True
    result = Explanation(recipe, key.entry, key.short, decision, used)
    try:
        _read_entry(result, key, data, policy)
    except store.RedisUnavailable:
        result.error = "Redis is not answering: whether an entry exists is unknown."
    result.verdict, result.verdict_words = _verdict(result, planned.bypass, policy)
    return result


def _verdict(result: Explanation, bypass: str, policy) -> tuple[str, str]:
    """What a lookup of this request would be now, in one word and one sentence."""
    if bypass:
        return "bypass", f"the cache is not used ({bypass_words(bypass)})."
    if result.error:
        return "unknown", "Redis is not answering, so a lookup would be a miss (and the LLM called) right now."
    entry = result.entry
    if entry is None:
        return "miss", "nothing is stored under this key (see below)."
    if "corrupt" in entry:
        return "miss", "the entry is unreadable; the lookup deletes it and calls the LLM."
    if any(not source.fresh for source in result.sources or ()):
        return "miss", "a source the entry was built from was invalidated (stale_source)."
    if policy is not None and policy.mode == "shadow":
        return "shadow hit", "the entry would be found and counted, but not served (shadow mode)."
    return "hit", f"the stored answer is served, {entry['ttl']} before it expires."


def _json(value: Any) -> str:
    return canonical_json(value).decode("utf-8", "backslashreplace")


def _read_entry(result: Explanation, key, data: dict, policy) -> None:
    from .sources import entry_sources

    info = store.entry_info(key.entry, shard=key.shard)
    if info is not None:
        entry: dict[str, Any] = {"ttl": human_duration(max(0, int(info["ttl_ms"] or 0) // 1000)),
                                 "memory": human_bytes(int(info["memory"] or 0)),
                                 "body": human_bytes(int(info["body_bytes"]))}
        try:
            meta = parse_meta(info["meta"])
        except CorruptEntry as exc:
            entry["corrupt"] = str(exc)
        else:
            entry.update(
                model=meta.model, kind="stream" if meta.kind == KIND_STREAM else "whole response",
                created=datetime.fromtimestamp(meta.created_at, UTC),
                expires=datetime.fromtimestamp(meta.expires_at, UTC),
                tokens=meta.usage.total if meta.usage.known else None, compressed=meta.compressed,
                cost=meta.cost, latency_ms=meta.latency_ms, finish_reason=meta.finish_reason)
        result.entry = entry
        result.sources = entry_sources(key.entry, data["sources"]) or []
        if any(not source.fresh for source in result.sources):
            result.hints.append("A source of this entry was invalidated after it was stored: a lookup treats it "
                                "as a miss (stale_source) and stores the new answer.")
        return
    if store.guarded(lambda: connection.client().exists(key.lock), shard=key.shard):
        result.hints.append("A call for this question is running now (its single-flight lock is held): "
                            "identical requests wait for its answer.")
    other = "stream" if data["kind"] == "call" else "call"
    twin = plan(make_request(data["question"], model=data["model"], policy=data["policy"], scope=data["scope"],
                             params=data["params"], context_version=data["context_version"], kind=other),
                registry.current()).key
    if store.entry_info(twin.entry, shard=twin.shard) is not None:
        result.hints.append(f"An entry exists for the same request asked as {dict(KINDS)[other]}: whole "
                            "responses and streams are stored apart.")
    if policy is not None:
        older = f"{key.base}:e:{key.policy}:*:{key.scope}:{key.digest}"
        count, _, _ = store.count_keys(older, 1, max_scanned=CENSUS_MAX_SCANNED)
        if count:
            result.hints.append("An entry for this request exists under an earlier generation of the policy: "
                                "it was purged, and the entry only waits to expire.")
    if not result.hints:
        result.hints.append("Nothing is stored under this key: it was never stored (a different question, model, "
                            "params, scope or kind), it expired, it was refused (too large, truncated, an error), "
                            "or it was deleted.")


def explain_view(model_admin, request):
    """GET: the form (``?policy=NAME`` preselects one). POST: the explanation; with
    ``_delete``, delete that entry first (change permission needed)."""
    if not model_admin.has_view_permission(request):
        raise PermissionDenied
    can_delete = model_admin.has_change_permission(request)
    if request.method == "POST":
        form = ExplainForm(request.POST)
    else:
        form = ExplainForm(initial={"policy": request.GET.get("policy", "default"), "kind": "call"})
    explanation = None
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            if "_delete" in request.POST:
                if not can_delete:
                    raise PermissionDenied
                _delete(request, model_admin, data)
            explanation = explain(data)
        except InvalidRequestError as exc:
            form.add_error(None, str(exc))
        except store.RedisUnavailable:
            messages.error(request, "Redis is not answering: nothing was deleted.")
    context = {**model_admin.admin_site.each_context(request), "title": "Explain a lookup",
               "opts": model_admin.model._meta, "form": form, "explanation": explanation,
               "can_delete": can_delete}
    # admin_view adds Cache-Control: no-store (the page shows the question).
    return TemplateResponse(request, "admin/ragcache/explain.html", context)


def _delete(request, model_admin, data: dict) -> None:
    planned = plan(make_request(data["question"], model=data["model"], policy=data["policy"], scope=data["scope"],
                                params=data["params"], context_version=data["context_version"], kind=data["kind"]),
                   registry.reload())
    found = store.entry_info(planned.key.entry, shard=planned.key.shard)
    if found is None:
        model_admin.message_user(request, f"There was no entry to delete (key id {planned.key.short}).",
                                 messages.WARNING)
        return
    store.delete(planned.key.entry, shard=planned.key.shard)
    model_admin.message_user(request, f"Deleted the entry with key id {planned.key.short}: the next identical "
                                      "request is a miss.", messages.SUCCESS)
