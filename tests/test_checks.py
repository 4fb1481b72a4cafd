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


# --- settings validation found lacking by a newcomer (0.2) ------------------------------------------

@pytest.mark.parametrize("allowed", [
    ["10.0.0.0/8", "::1/128"], ["192.168.1.0/24", "127.0.0.1", "2001:db8::/32"], ["*"], [], ("fe80::/10",),
])
def test_metrics_allowed_ips_takes_addresses_and_cidr_networks(settings, allowed):
    settings.RAGCACHE = {**settings.RAGCACHE, "METRICS_ALLOWED_IPS": allowed}
    assert ragcache_messages() == []


@pytest.mark.parametrize("bad", ["10.0.0.0/33", "10.0.0.1/8", "not-an-ip", "10.0.0", "::1/129", "", "localhost"])
def test_e006_names_the_entry_of_metrics_allowed_ips_that_is_no_address_or_network(settings, bad):
    settings.RAGCACHE = {**settings.RAGCACHE, "METRICS_ALLOWED_IPS": ["127.0.0.1", bad]}
    messages = check_settings()
    assert ids(messages) == ["ragcache.E006"]
    assert "METRICS_ALLOWED_IPS" in messages[0].msg and repr(bad) in messages[0].msg
    assert "10.0.0.0/8" in messages[0].hint  # says what a network looks like


@pytest.mark.parametrize(("option", "value"), [
    ("SOCKET_TIMEOUT", "5s"), ("SOCKET_TIMEOUT", "0.1"), ("SOCKET_TIMEOUT", -1), ("SOCKET_TIMEOUT", float("nan")),
    ("SOCKET_TIMEOUT", float("inf")), ("SOCKET_TIMEOUT", True), ("SOCKET_CONNECT_TIMEOUT", "5s"),
    ("SOCKET_CONNECT_TIMEOUT", [1]),
])
def test_e004_a_socket_timeout_that_is_not_a_number_is_an_error(cache_alias, option, value):
    """django-redis refuses a string (ImproperlyConfigured) and redis-py a negative or NaN
    timeout (ValueError) when the first connection is made: at run time, not at startup."""
    cache_alias(**redis_alias(**{option: value}))
    messages = ragcache_messages()
    assert ids(messages) == ["ragcache.E004"]
    assert isinstance(messages[0], Error)
    assert f"CACHES['ragcache']['OPTIONS'][{option!r}]" in messages[0].msg and repr(value) in messages[0].msg
    assert "seconds" in messages[0].hint


@pytest.mark.parametrize("option", ["SOCKET_TIMEOUT", "SOCKET_CONNECT_TIMEOUT"])
def test_w003_a_zero_socket_timeout_is_still_only_a_warning(cache_alias, option):
    """0 is "no timeout" to django-redis: a working but unsafe setting."""
    cache_alias(**redis_alias(**{option: 0}))
    assert ids(ragcache_messages()) == ["ragcache.W003"]


@pytest.mark.parametrize("name", ["LOCK_TIMEOUT", "LOCK_WAIT", "BULK_SOCKET_TIMEOUT", "AGGREGATION_STALE_AFTER"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), "5s"])
def test_e004_a_number_setting_that_is_not_a_finite_number(settings, name, value):
    """NaN and infinity passed the check and then crashed every get_or_call (int(nan * 1000))."""
    settings.RAGCACHE = {**settings.RAGCACHE, name: value}
    messages = check_settings()
    assert "ragcache.E004" in ids(messages)
    (error,) = [m for m in messages if m.id == "ragcache.E004"]
    assert name in error.msg and repr(value) in error.msg


@pytest.mark.parametrize("value", ["false", "False", 0, 1, None, "no"])
def test_e006_step_log_queue_must_be_a_bool(settings, value):
    """A string "false" is truthy: the queue would stay on while the settings say off."""
    settings.RAGCACHE = {**settings.RAGCACHE, "STEP_LOG_QUEUE": value}
    messages = check_settings()
    assert ids(messages) == ["ragcache.E006"]
    assert "STEP_LOG_QUEUE" in messages[0].msg and "True or False" in messages[0].msg


@pytest.mark.parametrize("value", [True, False])
def test_step_log_queue_as_a_bool_passes(settings, value):
    settings.RAGCACHE = {**settings.RAGCACHE, "STEP_LOG_QUEUE": value}
    assert ragcache_messages() == []


def test_w007_a_lock_shorter_than_the_followers_wait(settings):
    settings.RAGCACHE = {**settings.RAGCACHE, "LOCK_TIMEOUT": 5.0, "LOCK_WAIT": 30.0}
    messages = ragcache_messages()
    assert ids(messages) == ["ragcache.W007"]
    warning = messages[0]
    assert isinstance(warning, Warning)
    assert "LOCK_TIMEOUT" in warning.msg and "LOCK_WAIT" in warning.msg and "5.0" in warning.msg
    assert "30.0" in warning.msg and "LOCK_TIMEOUT" in warning.hint


@pytest.mark.parametrize(("lock_timeout", "lock_wait"), [(60.0, 10.0), (10, 10), (30, 29.5)])
def test_w007_not_raised_when_the_lock_outlives_the_wait(settings, lock_timeout, lock_wait):
    settings.RAGCACHE = {**settings.RAGCACHE, "LOCK_TIMEOUT": lock_timeout, "LOCK_WAIT": lock_wait}
    assert ragcache_messages() == []


def test_w007_not_raised_on_top_of_a_bad_number(settings):
    settings.RAGCACHE = {**settings.RAGCACHE, "LOCK_TIMEOUT": "5", "LOCK_WAIT": 30.0}
    assert ids(check_settings()) == ["ragcache.E004"]


SECRET = "sk-live-0123456789abcdef"


@pytest.mark.parametrize("upstream", [
    {"BASE_URL": "http://127.0.0.1:8080/v1"},
    {"BASE_URL": "https://api.example/v1", "API_KEY": None},
    {"BASE_URL": "https://api.example/v1", "API_KEY": ""},
    {"BASE_URL": "https://api.example/v1", "API_KEY": "   "},
])
def test_w008_an_upstream_without_an_api_key_is_a_warning(settings, upstream):
    """A local model server may need no key, so this is a warning, not an error."""
    settings.RAGCACHE = {**settings.RAGCACHE, "UPSTREAM": upstream}
    messages = ragcache_messages()
    assert ids(messages) == ["ragcache.W008"]
    assert isinstance(messages[0], Warning)
    assert "API_KEY" in messages[0].msg and "SILENCED_SYSTEM_CHECKS" in messages[0].hint


@pytest.mark.parametrize(("upstream", "says"), [
    ({"BASE_URL": "https://api.example/v1", "API_KEY": 12345}, "API_KEY"),
    ({"BASE_URL": "https://api.example/v1", "API_KEY": [SECRET]}, "API_KEY"),
    ({"BASE_URL": "https://api.example/v1", "API_KEY": SECRET, "TIMEOUT": "60"}, "TIMEOUT"),
    ({"BASE_URL": "https://api.example/v1", "API_KEY": SECRET, "TIMEOUT": float("nan")}, "TIMEOUT"),
    ({"BASE_URL": "https://api.example/v1", "API_KEY": SECRET, "TIMEOUT": True}, "TIMEOUT"),
    ({"BASE_URL": "ftp://api.example/v1", "API_KEY": SECRET}, "BASE_URL"),
    ({"BASE_URL": "api.example/v1", "API_KEY": SECRET}, "BASE_URL"),
    ({"BASE_URL": f"ftp://user:{SECRET}@api.example/v1", "API_KEY": SECRET}, "BASE_URL"),
    ({"BASE_URL": f"ftp://{SECRET}@api.example/v1://x", "API_KEY": SECRET}, "BASE_URL"),
    ({"BASE_URL": 8080, "API_KEY": SECRET}, "BASE_URL"),
])
def test_e010_wrong_types_in_the_upstream_are_errors_that_never_print_the_key(settings, upstream, says):
    settings.RAGCACHE = {**settings.RAGCACHE, "UPSTREAM": upstream}
    messages = ragcache_messages()
    assert ids(messages) == ["ragcache.E010"]
    assert says in messages[0].msg and "RAGCACHE['UPSTREAM']" in messages[0].hint
    assert SECRET not in messages[0].msg + messages[0].hint


def test_a_keyed_http_upstream_passes(settings):
    settings.RAGCACHE = {**settings.RAGCACHE, "UPSTREAM": {"BASE_URL": "https://api.example/v1", "API_KEY": SECRET,
                                                           "TIMEOUT": 30}}
    assert ragcache_messages() == []
