from django.db import migrations

DEFAULT_KEY_PARAMS = [
    "temperature", "top_p", "max_tokens", "seed", "stop", "tools", "tool_choice", "response_format",
    "system_prompt_version",
]


def create_defaults(apps, schema_editor):
    CachePolicy = apps.get_model("ragcache", "CachePolicy")
    CacheFlags = apps.get_model("ragcache", "CacheFlags")
    CachePolicy.objects.get_or_create(
        name="default",
        defaults={
            "description": "Created by ragcache's migration: global, 24 h TTL.",
            "enabled": True,
            "mode": "on",
            "ttl_seconds": 24 * 3600,
            "scope": "global",
            "key_params": DEFAULT_KEY_PARAMS,
        },
    )
    CacheFlags.objects.get_or_create(pk=1)


class Migration(migrations.Migration):
    dependencies = [("ragcache", "0001_initial")]
    operations = [migrations.RunPython(create_defaults, migrations.RunPython.noop)]
