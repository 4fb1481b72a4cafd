from django.apps import AppConfig
from django.db.models.signals import post_migrate


def create_defaults(app_config, using="default", apps=None, **kwargs) -> None:
    """The rows ragcache needs: the flags row and the ``default`` policy (enabled, global,
    24 h). Runs after every ``migrate`` and after a test database flush (as
    ``django.contrib.sites`` does for its default site), so ``default`` always exists."""
    import time

    from django.db import router

    apps = apps or app_config.apps
    try:
        CacheFlags = apps.get_model("ragcache", "CacheFlags")
        CachePolicy = apps.get_model("ragcache", "CachePolicy")
    except LookupError:
        return
    if not router.allow_migrate_model(using, CachePolicy):
        return
    now_ms = int(time.time() * 1000)
    flags, _ = CacheFlags.objects.using(using).get_or_create(pk=1, defaults={"sequence": now_ms})
    if not CachePolicy.objects.using(using).filter(name="default").exists():
        sequence = max(flags.sequence + 1, now_ms)
        CacheFlags.objects.using(using).filter(pk=1).update(sequence=sequence)
        CachePolicy.objects.using(using).create(
            name="default", description="Created by ragcache: global, 24 h TTL.", enabled=True, mode="on",
            ttl_seconds=24 * 3600, scope="global", generation=sequence,
        )


class RagcacheConfig(AppConfig):
    name = "ragcache"
    verbose_name = "RAG cache"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from . import checks, signals  # noqa: F401  (registers checks and receivers)

        post_migrate.connect(create_defaults, sender=self, dispatch_uid="ragcache.create_defaults")
