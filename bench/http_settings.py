"""Settings for ``bench/hotpath.py --http``: the project's settings plus one bench-only view.

Step lines go to a sink that formats and discards them (``BENCH_STEPS_LOG`` = info or
warning), so the server measures ragcache rather than the terminal.
"""
import logging
import os

from project.settings import *  # noqa: F403
from project.settings import LOGGING as _PROJECT_LOGGING

ROOT_URLCONF = "bench.http_urls"
DEBUG = False


class FormattingSink(logging.Handler):
    """Formats every record (what a real handler pays) and writes it nowhere."""

    def emit(self, record: logging.LogRecord) -> None:
        self.format(record)


LOGGING = {
    **_PROJECT_LOGGING,
    "handlers": {
        "sink": {"class": "bench.http_settings.FormattingSink", "formatter": "plain"},
        "console": {"class": "logging.StreamHandler", "formatter": "plain", "level": "WARNING"},
    },
    "loggers": {
        "ragcache": {"handlers": ["sink", "console"], "level": "INFO", "propagate": False},
        "ragcache.steps": {"level": os.environ.get("BENCH_STEPS_LOG", "info").upper()},
    },
}
