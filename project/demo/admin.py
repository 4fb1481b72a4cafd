from django.contrib import admin

from .models import Document


@admin.register(Document)
class DocumentAdmin(admin.ModelAdmin):
    """Saving or deleting a document invalidates ``doc:<pk>`` once the transaction commits
    (``ragcache.sources.track`` in apps.py): answers citing it miss from then on."""

    list_display = ("title", "source", "updated_at")
    search_fields = ("title", "body")
    readonly_fields = ("source", "updated_at")
    fields = ("title", "body", "source", "updated_at")

    @admin.display(description="cited as")
    def source(self, obj: Document) -> str:
        return obj.source_id if obj.pk else "(set when saved)"
