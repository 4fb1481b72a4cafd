"""Announce policy, flag and price edits to every process once they are committed."""
from django.db import transaction
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from .models import CacheFlags, CachePolicy, ModelPrice
from .policies import policies_changed


@receiver(post_save, sender=CachePolicy)
@receiver(post_delete, sender=CachePolicy)
@receiver(post_save, sender=CacheFlags)
@receiver(post_save, sender=ModelPrice)
@receiver(post_delete, sender=ModelPrice)
def announce_change(**kwargs) -> None:
    transaction.on_commit(policies_changed)
