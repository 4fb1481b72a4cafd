from django.apps import AppConfig


class RagcacheConfig(AppConfig):
    name = "ragcache"
    verbose_name = "RAG cache"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from . import checks, signals  # noqa: F401  (registers checks and receivers)
