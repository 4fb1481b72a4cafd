from django.apps import AppConfig


class DemoConfig(AppConfig):
    name = "project.demo"
    label = "demo"

    def ready(self) -> None:
        from ragcache.sources import track

        from .models import Document

        # Saving or deleting a document invalidates the answers that cite it, after commit.
        track(Document, source=lambda document: document.source_id)
