"""Invalidate source documents: every cached answer citing one of them misses from now on.

    manage.py ragcache_invalidate doc:42 doc:43
    manage.py ragcache_invalidate --file changed-ids.txt     # one id a line; "-" reads stdin

The same as ``cache_service.invalidate_sources(ids)``: in every process, policy and
scope, at a cost that does not depend on how many answers cite the sources. Exits with a
``CommandError`` (status 1) when Redis cannot be reached: nothing was invalidated then,
and running the command again is safe.
"""
from __future__ import annotations

import sys

from django.core.management.base import BaseCommand, CommandError

from ragcache.connection import RedisUnavailable
from ragcache.exceptions import InvalidRequestError
from ragcache.services import cache_service
from ragcache.sources import redis_setting


def read_ids(path: str) -> list[str]:
    """One id a line; blank lines and lines starting with # are skipped."""
    try:
        if path == "-":
            text = sys.stdin.read()
        else:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise CommandError(f"Cannot read source ids from {path}: {exc}") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


class Command(BaseCommand):
    help = "Invalidate source ids: cached answers built from them miss from now on, everywhere."

    def add_arguments(self, parser) -> None:
        parser.add_argument("sources", nargs="*", metavar="SOURCE", help='A source id, e.g. "doc:42".')
        parser.add_argument("--file", metavar="PATH", help='Also read ids from PATH, one a line ("-": stdin).')

    def handle(self, *args, sources: list[str], file: str | None, **options) -> None:
        ids = list(sources) + (read_ids(file) if file else [])
        if not ids:
            raise CommandError("Name at least one source id, e.g. manage.py ragcache_invalidate doc:42")
        try:
            count = cache_service.invalidate_sources(ids)
        except InvalidRequestError as exc:
            raise CommandError(str(exc)) from None
        except RedisUnavailable as exc:
            raise CommandError(
                f"Redis is unavailable ({str(exc)[:200]}): nothing was invalidated. Check {redis_setting()} "
                f"and that Redis answers there, then run this command again.") from None
        shown = ", ".join(dict.fromkeys(ids)) if count <= 10 else f"{', '.join(list(dict.fromkeys(ids))[:10])}, ..."
        self.stdout.write(self.style.SUCCESS(
            f"Invalidated {count} source{'s' if count != 1 else ''}: {shown}. Cached answers citing "
            f"{'them' if count != 1 else 'it'} miss from now on (every process, policy and scope)."))
