from django.apps import AppConfig
from django.db.models.signals import post_migrate

# The demo models' price, so that "cost avoided" is real from the first hit: priced like a
# large hosted model (per 1,000 tokens). Created once; edit it in the admin (Model prices).
# ragcache prices an answer by the model the request named: the page's form asks demo-llm,
# its script streams demo-llm@documents through the gateway (settings.DEMO_GATEWAY_MODEL).
DEMO_MODEL = "demo-llm"
DEMO_MODELS = (DEMO_MODEL, "demo-llm@documents")
DEMO_PRICE = {"input_per_1k": "0.0025", "cached_input_per_1k": "0.00125", "output_per_1k": "0.01",
              "currency": "USD"}


def seed_demo_price(app_config, using="default", apps=None, **kwargs) -> None:
    """After ``migrate``: a ``ModelPrice`` for each demo model, unless one exists (never
    overwrites an edited price). Uses the migration state's model: no signal, no announcement."""
    from django.db import router

    apps = apps or app_config.apps
    try:
        ModelPrice = apps.get_model("ragcache", "ModelPrice")
    except LookupError:
        return
    if router.allow_migrate_model(using, ModelPrice):
        for model in DEMO_MODELS:
            ModelPrice.objects.using(using).get_or_create(model=model, defaults=DEMO_PRICE)


class DemoConfig(AppConfig):
    name = "project.demo"
    label = "demo"

    def ready(self) -> None:
        from ragcache.sources import track

        from .models import Document

        post_migrate.connect(seed_demo_price, sender=self, dispatch_uid="project.demo.seed_demo_price")
        # Saving or deleting a document invalidates the answers that cite it, after commit.
        track(Document, source=lambda document: document.source_id)
