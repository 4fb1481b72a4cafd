"""The demo's knowledge base: a few short documents the fake LLM answers from.

Edit one in the admin (Demo > Documents) and the next identical question misses: the
demo app tracks ``Document`` with ``ragcache.sources.track`` (see apps.py), so saving or
deleting one invalidates the answers that cited it (``sources=["doc:<pk>"]``).
"""
from __future__ import annotations

from django.db import models


class Document(models.Model):
    title = models.CharField(max_length=200)
    body = models.TextField(help_text="What the demo's LLM may quote when a question is about this document.")
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["title"]

    def __str__(self) -> str:
        return self.title

    @property
    def source_id(self) -> str:
        """The id answers cite this document by (``sources=``)."""
        return source_id(self.pk)


def source_id(pk: int) -> str:
    return f"doc:{pk}"
