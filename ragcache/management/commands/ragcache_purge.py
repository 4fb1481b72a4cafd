"""Invalidate a policy's cache entries by bumping its generation.

    manage.py ragcache_purge --policy faq [--policy docs] [--delete-keys]
    manage.py ragcache_purge --all

The new generation is part of every key, so old entries become unreachable at once and
expire on their own TTL. ``--delete-keys`` also unlinks them now, scanning only
ragcache's own key prefix: the Redis may be shared (Celery broker, sessions), so this
command never flushes a database.
"""
from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from ragcache import store
from ragcache.admin_policy import announce_now, purge_message
from ragcache.models import CachePolicy


class Command(BaseCommand):
    help = "Purge cached answers of one or more policies (generation bump; optionally unlink old keys)."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--policy", action="append", default=[], metavar="NAME",
                            help="Policy to purge (repeatable).")
        parser.add_argument("--all", action="store_true", help="Purge every policy.")
        parser.add_argument("--delete-keys", action="store_true",
                            help="Also unlink the old generations' keys now (scans only ragcache's prefix).")

    def handle(self, *args, policy: list[str], all: bool, delete_keys: bool, **options) -> None:
        if bool(policy) == bool(all):
            raise CommandError("Give either --policy NAME (repeatable) or --all, not both and not neither.")
        if all:
            policies = list(CachePolicy.objects.order_by("name"))
        else:
            names = list(dict.fromkeys(policy))  # keep order, drop repeats
            found = {p.name: p for p in CachePolicy.objects.filter(name__in=names)}
            unknown = [name for name in names if name not in found]
            if unknown:
                existing = ", ".join(CachePolicy.objects.order_by("name").values_list("name", flat=True)) or "none"
                raise CommandError(f"No cache policy named {', '.join(unknown)}. Existing policies: {existing}.")
            policies = [found[name] for name in names]

        done = []
        for cache_policy in policies:
            old = cache_policy.generation
            # save() inside: every process reloads its policy snapshot on its next lookup.
            cache_policy.purge()
            done.append((cache_policy, old, cache_policy.generation))
            line = f"Purged policy {cache_policy.name!r}: generation {old} -> {cache_policy.generation}."
            if delete_keys:
                line += " " + self._delete_old_keys(cache_policy)
            self.stdout.write(line)
        if not policies:
            self.stdout.write("No cache policies to purge.")
        elif not announce_now():  # the on-commit announcement cannot say whether Redis took it
            self.stderr.write(self.style.WARNING(purge_message(done, announced=False)))

    def _delete_old_keys(self, cache_policy: CachePolicy) -> str:
        layout = store.current_layout()
        try:
            deleted = store.scan_delete(layout.entry_pattern(cache_policy.name),
                                        keep=f":e:{cache_policy.name}:{cache_policy.generation}:")
        except store.RedisUnavailable as exc:
            raise CommandError(
                f"Generation bumped (old entries are unreachable and will expire), but Redis could not be "
                f"scanned to delete them now: {exc}"
            ) from None
        return f"Deleted {deleted} old {'entry' if deleted == 1 else 'entries'} (on every master)."
