"""A few demo documents for the fake LLM to answer from (edit them in the admin)."""
from django.db import migrations

DOCUMENTS = [
    ("Opening hours",
     "The Lisbon office is open Monday to Friday from 9:00 to 18:00. On public holidays it is closed; "
     "the support line stays open from 10:00 to 16:00."),
    ("Refund policy",
     "Orders can be refunded within 30 days of delivery. Refunds go back to the original payment method "
     "within 5 business days. Gift cards are not refundable."),
    ("Shipping",
     "Standard shipping takes 3 to 5 business days and is free above 50 euros. Express shipping takes 1 "
     "business day and costs 9 euros. We ship to every country in the European Union."),
    ("Password reset",
     "To reset your password, open Settings, choose Security, then Reset password. The link in the email "
     "is valid for 2 hours. Accounts are locked for 15 minutes after 5 failed attempts."),
    ("Support contact",
     "Write to support@example.com or call +351 21 000 0000. Urgent outages are answered within one hour, "
     "other questions within one business day."),
]


def seed(apps, schema_editor):
    Document = apps.get_model("demo", "Document")
    for title, body in DOCUMENTS:
        Document.objects.using(schema_editor.connection.alias).get_or_create(title=title, defaults={"body": body})


def unseed(apps, schema_editor):
    Document = apps.get_model("demo", "Document")
    Document.objects.using(schema_editor.connection.alias).filter(title__in=[t for t, _ in DOCUMENTS]).delete()


class Migration(migrations.Migration):
    dependencies = [("demo", "0001_document")]
    operations = [migrations.RunPython(seed, unseed)]
