"""``manage.py ragcache_gateway_key``: keys of the OpenAI-compatible gateway.

    manage.py ragcache_gateway_key create NAME [--scope ID] [--policy NAME ...] [--allow CONTROL ...]
    manage.py ragcache_gateway_key list
    manage.py ragcache_gateway_key deactivate NAME

``create`` prints the new key once, alone on the last line of its output (only its SHA-256
is stored: it cannot be shown again). ``--policy`` names the policies the key may use, the
first being its default (none: only ``default``); each must exist already (a key naming an
unknown policy would bypass the cache on every request), else ``CommandError`` names it and
the policies that do exist. ``--allow`` the cache controls it may send (no-cache, no-store,
max-age, policy, sources; none by default). ``--scope``, when given, must be printable and not
blank: an empty value (an unset shell variable) would make a key without a scope, sharing
answers with every other such key. ``list`` shows each key's
prefix, never the key or its hash. Every change is announced to every process, as policy
edits are.
"""
from __future__ import annotations

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction

from ...models import CacheControl, CachePolicy, GatewayKey

CONTROLS = [control.value for control in CacheControl]
KNOWN_SHOWN = 20  # policies named in the error for an unknown one; the admin lists them all


class Command(BaseCommand):
    help = "Create, list or deactivate keys of the OpenAI-compatible gateway (POST /v1/chat/completions)."

    def add_arguments(self, parser: CommandParser) -> None:
        actions = parser.add_subparsers(dest="action", required=True, metavar="{create,list,deactivate}")
        create = actions.add_parser("create", help="Create a key and print it once, on the last line.")
        create.add_argument("name", help="A unique slug, shown in usage tables (e.g. acme-prod).")
        create.add_argument("--scope", default=None, help="The scope id of every request made with this key (a "
                            "tenant or user id). Default: none (entries shared with other unscoped keys).")
        create.add_argument("--policy", action="append", default=[], metavar="NAME", dest="policies",
                            help="A cache policy the key may use; repeat for more. The first is its default. "
                            "Default: only 'default'.")
        create.add_argument("--allow", action="append", default=[], metavar="CONTROL", dest="controls",
                            choices=CONTROLS, help=f"A cache control the key may send: {', '.join(CONTROLS)}; "
                            "repeat for more. Default: none.")
        actions.add_parser("list", help="List the keys (prefixes only).")
        deactivate = actions.add_parser("deactivate", help="Deactivate a key: its requests get 401.")
        deactivate.add_argument("name")

    def handle(self, *args, **options) -> None:
        action = options["action"]
        if action == "create":
            self._create(options["name"], options["scope"], options["policies"], options["controls"])
        elif action == "list":
            self._list()
        else:
            self._deactivate(options["name"])

    def _create(self, name: str, scope: str | None, policies: list[str], controls: list[str]) -> None:
        if GatewayKey.objects.filter(name=name).exists():
            raise CommandError(f"A gateway key named {name!r} exists already: choose another name "
                               f"(or deactivate it: ragcache_gateway_key deactivate {name}).")
        if scope is not None and (not scope.strip() or not scope.isprintable()):
            raise CommandError(f"--scope {scope!r} is not a scope id: give a tenant or user id of printable "
                               "characters, or leave --scope out for a key without a scope.")
        policies = list(dict.fromkeys(policies))
        found = set(CachePolicy.objects.filter(name__in=policies).values_list("name", flat=True))
        missing = [p for p in policies if p not in found]
        if missing:
            known = list(CachePolicy.objects.order_by("name").values_list("name", flat=True)[:KNOWN_SHOWN + 1])
            shown = ", ".join(known[:KNOWN_SHOWN]) + (", ..." if len(known) > KNOWN_SHOWN else "")
            raise CommandError(
                f"No cache policy named {', '.join(map(repr, missing))}; nothing was created. Known policies: "
                f"{shown or '(none)'}. Create the policy first (admin: Cache policies), then the key.")
        key_row = GatewayKey(name=name, scope=(scope or "").strip(), policies=policies,
                             allowed_cache_controls=list(dict.fromkeys(controls)))
        key = key_row.set_new_key()
        try:
            key_row.full_clean()
        except ValidationError as exc:
            problems = "; ".join(f"{field}: {' '.join(messages)}" for field, messages in exc.message_dict.items())
            raise CommandError(f"Cannot create the key: {problems}") from None
        with transaction.atomic():
            key_row.save()
        controls_text = ", ".join(key_row.allowed_cache_controls) or "none"
        self.stdout.write(f"Created gateway key {name!r}: scope {key_row.scope or '(none)'}; policies "
                          f"{', '.join(policies) or 'default'}; cache controls {controls_text}.")
        self.stdout.write("Store it now: only its hash is kept, it cannot be shown again.")
        self.stdout.write(key)

    def _list(self) -> None:
        rows = list(GatewayKey.objects.order_by("name"))
        if not rows:
            self.stdout.write("No gateway keys. Create one: manage.py ragcache_gateway_key create NAME")
            return
        self.stdout.write(f"{'name':24} {'prefix':12} {'active':6} {'scope':16} {'policies':20} {'controls':28} "
                          f"last used")
        for row in rows:
            last = row.last_used_at.strftime("%Y-%m-%d %H:%M") if row.last_used_at else "never"
            self.stdout.write(
                f"{row.name:24} {row.key_prefix + '...':12} {'yes' if row.is_active else 'no':6} "
                f"{row.scope or '-':16} {','.join(row.policies or []) or 'default':20} "
                f"{','.join(row.allowed_cache_controls or []) or '-':28} {last}")

    def _deactivate(self, name: str) -> None:
        row = GatewayKey.objects.filter(name=name).first()
        if row is None:
            raise CommandError(f"No gateway key named {name!r} (see: ragcache_gateway_key list).")
        if not row.is_active:
            self.stdout.write(f"Gateway key {name!r} was already inactive.")
            return
        row.is_active = False
        row.save(update_fields=["is_active"])  # a signal announces it: every process reloads
        self.stdout.write(f"Deactivated gateway key {name!r}: its requests now get 401.")
