"""System checks: each misconfiguration is reported with its id and a hint naming the setting."""
from __future__ import annotations

import pytest
from django.core.checks import Error, Warning, run_checks

from ragcache.checks import check_settings

JSON = "django_redis.serializers.json.JSONSerializer"


def ids(messages) -> list[str]:
    return sorted(m.id for m in messages)


def ragcache_messages():
    """Through Django's own registry, as `manage.py check` runs them."""
    return [m for m in run_checks() if m.id and m.id.startswith("ragcache.")]


@pytest.fixture
def cache_alias(settings):
    """Replace the ragcache alias' config; returns a setter."""
    def set_alias(**config):
        caches = {**settings.CACHES}
        caches["ragcache"] = config
        settings.CACHES = caches

    return set_alias


def redis_alias(location="redis://127.0.0.1:6379/0", **options):
    return {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": location,
        "OPTIONS": {"SERIALIZER": JSON, "SOCKET_TIMEOUT": 0.1, "SOCKET_CONNECT_TIMEOUT": 0.1, **options},
    }


def test_project_settings_pass_every_check():
    assert ragcache_messages() == []


@pytest.mark.parametrize("serializer", [None, "django_redis.serializers.pickle.PickleSerializer", "my.PickleLike"])
def test_w001_pickle_serializer_warns_with_the_setting_to_change(cache_alias, serializer, settings):
    alias = redis_alias()
    if serializer is None:
        del alias["OPTIONS"]["SERIALIZER"]  # django-redis defaults to pickle
    else:
        alias["OPTIONS"]["SERIALIZER"] = serializer
    cache_alias(**alias)
    messages = ragcache_messages()
    assert ids(messages) == ["ragcache.W001"]
    assert isinstance(messages[0], Warning)
    assert "CACHES['ragcache']['OPTIONS']['SERIALIZER']" in messages[0].hint
    assert JSON in messages[0].hint


@pytest.mark.parametrize(("location", "broker"), [
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379/0"),  # no path means db 0
    ("redis://localhost:6379/2", "redis://127.0.0.1:6379/2"),  # loopback spelled two ways
    ("redis://127.0.0.1:6379/3", "redis://:secret@127.0.0.1:6379?db=3"),
    ("redis://10.0.0.5:6379/0,redis://10.0.0.6:6379/0", "redis://10.0.0.6:6379/0"),  # replica list
    ("redis://10.0.0.5:6379/1", "amqp://guest@localhost//;redis://10.0.0.5:6379/1"),  # failover list
])
def test_w002_cache_and_broker_in_one_redis_db_warns(cache_alias, settings, location, broker):
    cache_alias(**redis_alias(location))
    settings.CELERY_BROKER_URL = broker
    messages = ragcache_messages()
    assert ids(messages) == ["ragcache.W002"]
    assert "CELERY_BROKER_URL" in messages[0].hint and "CACHES['ragcache']['LOCATION']" in messages[0].msg


@pytest.mark.parametrize(("location", "broker"), [
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/1"),
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6380/0"),
    ("redis://127.0.0.1:6379/0", "amqp://guest@127.0.0.1:5672//"),
    ("redis://127.0.0.1:6379/0", None),
])
def test_w002_not_raised_for_separate_databases(cache_alias, settings, location, broker):
    cache_alias(**redis_alias(location))
    settings.CELERY_BROKER_URL = broker
    assert ragcache_messages() == []


@pytest.mark.parametrize("option", ["SOCKET_TIMEOUT", "SOCKET_CONNECT_TIMEOUT"])
def test_w003_missing_socket_timeout_warns(cache_alias, option):
    alias = redis_alias()
    del alias["OPTIONS"][option]
    cache_alias(**alias)
    messages = ragcache_messages()
    assert ids(messages) == ["ragcache.W003"]
    assert f"CACHES['ragcache']['OPTIONS'][{option!r}]" in messages[0].hint


def test_e001_alias_missing(settings):
    settings.RAGCACHE = {**settings.RAGCACHE, "CACHE_ALIAS": "nope"}
    messages = check_settings()
    assert ids(messages) == ["ragcache.E001"]
    assert isinstance(messages[0], Error) and "CACHES['nope']" in messages[0].hint


def test_e002_not_django_redis(cache_alias):
    cache_alias(BACKEND="django.core.cache.backends.locmem.LocMemCache")
    messages = check_settings()
    assert ids(messages) == ["ragcache.E002"] and "django_redis.cache.RedisCache" in messages[0].msg


def test_e003_unknown_key_and_not_a_dict(settings):
    settings.RAGCACHE = {**settings.RAGCACHE, "KEY_PERFIX": "typo", 3: "x"}
    messages = check_settings()
    assert ids(messages) == ["ragcache.E003", "ragcache.E003"]
    assert "KEY_PERFIX" in messages[1].msg and "KEY_PREFIX" in messages[1].hint
    settings.RAGCACHE = ["not", "a", "dict"]
    assert ids(check_settings()) == ["ragcache.E003"]


@pytest.mark.parametrize(("name", "value"), [
    ("BREAKER_COOLDOWN", -1), ("BREAKER_COOLDOWN", 0), ("LOCK_WAIT", "10"), ("LOCK_TIMEOUT", True),
    ("MAX_TTL", None), ("STREAM_MAXLEN", 1e6), ("AGGREGATE_BATCH", 0), ("RETENTION_DAYS", 1.5),
])
def test_e004_bad_number(settings, name, value):
    settings.RAGCACHE = {**settings.RAGCACHE, name: value}
    messages = check_settings()
    assert ids(messages) == ["ragcache.E004"]
    assert name in messages[0].msg and "default" in messages[0].hint


@pytest.mark.parametrize("prefix", ["", "has space", "a:b", "glob*", "ünï", "tab\there", 42, None])
def test_e005_bad_key_prefix(settings, prefix):
    settings.RAGCACHE = {**settings.RAGCACHE, "KEY_PREFIX": prefix}
    messages = check_settings()
    assert ids(messages) == ["ragcache.E005"] and "KEY_PREFIX" in messages[0].hint


@pytest.mark.parametrize(("name", "value"), [
    ("METRICS_ALLOWED_IPS", "10.0.0.12"),  # a string: "10.0.0.1" would match by substring
    ("METRICS_ALLOWED_IPS", [None]),
    ("METRICS_BEARER_TOKEN", ""),
    ("METRICS_BEARER_TOKEN", 1234),
    ("METRICS_MODELS", "gpt-4o"),
    ("CACHE_ALIAS", ["ragcache"]),
])
def test_e006_wrong_type_for_access_and_label_settings(settings, name, value):
    settings.RAGCACHE = {**settings.RAGCACHE, name: value}
    messages = check_settings()
    assert ids(messages) == ["ragcache.E006"] and name in messages[0].msg


def test_checks_never_raise_on_garbage(settings):
    settings.CACHES = {**settings.CACHES, "ragcache": {"BACKEND": "django_redis.cache.RedisCache",
                                                        "LOCATION": 12, "OPTIONS": "x"}}
    settings.CELERY_BROKER_URL = object()
    assert ids(check_settings()) == ["ragcache.W001", "ragcache.W003", "ragcache.W003"]
