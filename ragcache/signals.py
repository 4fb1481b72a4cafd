"""Announce policy, flag, price and gateway key edits to every process once committed."""
from django.db import transaction
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from .models import CacheFlags, CachePolicy, GatewayKey, ModelPrice
from .policies import policies_changed


def announce_change() -> None:
    """Tell every process to reload its policy snapshot, after the current transaction."""
    transaction.on_commit(policies_changed)


@receiver(post_save, sender=CachePolicy)
@receiver(post_delete, sender=CachePolicy)
@receiver(post_save, sender=CacheFlags)
@receiver(post_save, sender=ModelPrice)
@receiver(post_delete, sender=ModelPrice)
@receiver(post_save, sender=GatewayKey)
@receiver(post_delete, sender=GatewayKey)
def _changed(**kwargs) -> None:
    announce_change()
