"""Settings for the HTTP rows of ``bench/hotpath.py``: the demo project's settings, with
the bench-only URLs (``bench/http_urls.py``) and the shipped logging writing to /dev/null
through a real handler (every step line formatted and written: what a user pays).

``BENCH_MIDDLEWARE=none`` drops the project's middleware (the rows then show ragcache's
share of a request without Django's session/auth/CSRF/Prometheus layers).
"""
import os

from bench import _common
from project.settings import *  # noqa: F403
from project.settings import LOGGING as _PROJECT_LOGGING

ROOT_URLCONF = "bench.http_urls"
DEBUG = False
LOGGING = _common.shipped_logging(_PROJECT_LOGGING)
if os.environ.get("BENCH_MIDDLEWARE") == "none":
    MIDDLEWARE = []
