"""Settings for the ragcache demo project.

Everything that differs between machines comes from the environment, with defaults that
work on a developer's laptop: REDIS_URL, DATABASE_URL, CELERY_BROKER_URL, SECRET_KEY, DEBUG.
"""
from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import dj_database_url

BASE_DIR = Path(__file__).resolve().parent.parent
RUN_DIR = BASE_DIR / ".run"


def env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def redis_url_with_db(url: str, db: int) -> str:
    """The same Redis server as ``url`` but another logical database."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, parts.fragment))


def development_secret_key() -> str:
    # Generated once per checkout and kept in .run/ (git-ignored): never committed, and
    # stable across restarts so logins survive.
    RUN_DIR.mkdir(exist_ok=True)
    key_file = RUN_DIR / "secret_key"
    if not key_file.exists():
        key_file.write_text(secrets.token_urlsafe(50))
        key_file.chmod(0o600)
    return key_file.read_text().strip()


DEBUG = env_bool("DEBUG", True)
SECRET_KEY = os.environ.get("SECRET_KEY") or development_secret_key()
ALLOWED_HOSTS = [h for h in os.environ.get("ALLOWED_HOSTS", "127.0.0.1,localhost,testserver").split(",") if h]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_prometheus",
    "ragcache",
    "project.demo",
]

MIDDLEWARE = [
    "django_prometheus.middleware.PrometheusBeforeMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_prometheus.middleware.PrometheusAfterMiddleware",
]

ROOT_URLCONF = "project.urls"
WSGI_APPLICATION = "project.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {
    "default": dj_database_url.parse(
        os.environ.get("DATABASE_URL") or f"sqlite:///{BASE_DIR / 'db.sqlite3'}",
        conn_max_age=60,
    )
}
if os.environ.get("DATABASE_TEST_NAME"):
    # Lets parallel test runs on one PostgreSQL server use distinct test databases.
    DATABASES["default"]["TEST"] = {"NAME": os.environ["DATABASE_TEST_NAME"]}
elif DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    # A file rather than Django's in-memory default, so that a Celery worker subprocess
    # started by the tests can open the same test database; per process, so parallel
    # test runs never share one.
    DATABASES["default"]["TEST"] = {"NAME": str(Path(tempfile.gettempdir()) / f"ragcache-test-{os.getpid()}.sqlite3")}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"

CACHES = {
    "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
    # ragcache's own alias. JSON serializer: nothing in this Redis is ever unpickled.
    # Short socket timeouts bound a lookup when Redis stalls; ragcache then treats it
    # as a miss and its circuit breaker stops paying the timeout on every request.
    "ragcache": {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": REDIS_URL,
        "OPTIONS": {
            "CLIENT_CLASS": "django_redis.client.DefaultClient",
            "SERIALIZER": "django_redis.serializers.json.JSONSerializer",
            "SOCKET_CONNECT_TIMEOUT": float(os.environ.get("RAGCACHE_CONNECT_TIMEOUT", "0.1")),
            "SOCKET_TIMEOUT": float(os.environ.get("RAGCACHE_SOCKET_TIMEOUT", "0.1")),
        },
    },
}

RAGCACHE = {
    "CACHE_ALIAS": "ragcache",
    "KEY_PREFIX": os.environ.get("RAGCACHE_KEY_PREFIX", "ragcache"),
    "METRICS_ALLOWED_IPS": ["127.0.0.1", "::1"],
    "METRICS_BEARER_TOKEN": os.environ.get("RAGCACHE_METRICS_TOKEN") or None,
}
# A Redis Cluster seed node (e.g. redis://127.0.0.1:7000): when set, ragcache uses the
# cluster instead of CACHES["ragcache"] (see docs/scaling.md).
if os.environ.get("REDIS_CLUSTER_URL"):
    RAGCACHE["REDIS_CLUSTER_URL"] = os.environ["REDIS_CLUSTER_URL"]
# Optional aggregation tuning from the environment (also how tests configure worker subprocesses).
if os.environ.get("RAGCACHE_AGGREGATION_LOCK_TIMEOUT"):
    RAGCACHE["AGGREGATION_LOCK_TIMEOUT"] = float(os.environ["RAGCACHE_AGGREGATION_LOCK_TIMEOUT"])
if os.environ.get("RAGCACHE_AGGREGATE_BATCH"):
    RAGCACHE["AGGREGATE_BATCH"] = int(os.environ["RAGCACHE_AGGREGATE_BATCH"])
# The gateway (POST /v1/chat/completions, docs/gateway.md) forwards to an OpenAI-compatible API.
# Unset, that is this demo's own fake LLM (/fake-llm/v1) on the port `make run` serves, so
# everything works offline. The API key never leaves the server.
RAGCACHE["UPSTREAM"] = {
    "BASE_URL": os.environ.get("RAGCACHE_UPSTREAM_BASE_URL")
    or f"http://127.0.0.1:{os.environ.get('RUN_PORT') or 8000}/fake-llm/v1",
    "API_KEY": os.environ.get("RAGCACHE_UPSTREAM_API_KEY") or os.environ.get("DEMO_LLM_API_KEY") or "sk-demo-fake",
    "TIMEOUT": float(os.environ.get("RAGCACHE_UPSTREAM_TIMEOUT") or 60),
}

# Celery: the broker lives on the same Redis server but in another logical database, so
# ragcache's purge (which only ever touches its own prefix) and the broker never meet.
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL") or redis_url_with_db(REDIS_URL, 1)
CELERY_TASK_DEFAULT_QUEUE = os.environ.get("CELERY_QUEUE", "celery")
CELERY_TASK_IGNORE_RESULT = True
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BEAT_SCHEDULE = {
    "ragcache-aggregate-usage": {
        "task": "ragcache.tasks.aggregate_usage",
        "schedule": float(os.environ.get("RAGCACHE_AGGREGATE_EVERY", "60")),
    },
}

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / ".run" / "static"

# Demo fake LLM: how long it "thinks" (ms), so the cache's effect is visible.
DEMO_LLM_DELAY_MS = int(os.environ.get("DEMO_LLM_DELAY_MS", "800"))
# The OpenAI-compatible fake at /fake-llm/v1/ (project/demo/fake_upstream.py): time to the
# first chunk and between token-sized chunks (ms); DEMO_LLM_API_KEY, when set, is the only
# bearer key it accepts.
DEMO_LLM_FIRST_CHUNK_MS = int(os.environ.get("DEMO_LLM_FIRST_CHUNK_MS", "300"))
DEMO_LLM_CHUNK_DELAY_MS = int(os.environ.get("DEMO_LLM_CHUNK_DELAY_MS", "30"))
DEMO_LLM_API_KEY = os.environ.get("DEMO_LLM_API_KEY") or None
# The model the demo page streams through the gateway. With the built-in fake LLM,
# "demo-llm@documents" answers from the demo's Document rows (as a model doing its own
# retrieval would), so editing a document shows up in a streamed answer too; with a real
# upstream (RAGCACHE_UPSTREAM_BASE_URL), set DEMO_GATEWAY_MODEL to one of its models.
DEMO_GATEWAY_MODEL = os.environ.get("DEMO_GATEWAY_MODEL") or (
    "demo-llm" if os.environ.get("RAGCACHE_UPSTREAM_BASE_URL") else "demo-llm@documents")
# The demo's gateway key (made by `make run` and the demo page; git-ignored, mode 0600).
DEMO_GATEWAY_KEY_FILE = RUN_DIR / "demo_gateway_key"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "loggers": {
        "ragcache": {
            "handlers": ["console"],
            "level": os.environ.get("RAGCACHE_LOG_LEVEL", "INFO"),
            "propagate": False,
        },
    },
}
